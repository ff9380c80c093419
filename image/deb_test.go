package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

type tarEntry struct {
	name     string
	typ      byte
	body     string
	linkname string
}

func makeTar(t testing.TB, entries []tarEntry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body)), Linkname: e.linkname}
		if e.typ == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
			h.Mode = 0o755
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

type arEntry struct {
	name string
	data []byte
}

// makeAr writes an ar archive the way dpkg-deb does: names padded with
// spaces, mode 100644, data padded to an even length with '\n'.
func makeAr(members []arEntry) []byte {
	var b bytes.Buffer
	b.WriteString(arMagic)
	for _, m := range members {
		fmt.Fprintf(&b, "%-16s%-12d%-6d%-6d%-8s%-10d`\n", m.name, 0, 0, 0, "100644", len(m.data))
		b.Write(m.data)
		if len(m.data)%2 == 1 {
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

// makeDeb returns a Debian package whose data.tar, compressed with c,
// holds entries.
func makeDeb(t testing.TB, c Compression, entries []tarEntry) []byte {
	t.Helper()
	data := makeTar(t, entries)
	name := "data.tar"
	if c != CompressionNone {
		data = compressors[c](t, data)
		// Only the kernel payload carries a size trailer.
		if c != CompressionGzip {
			data = data[:len(data)-4]
		}
		name += map[Compression]string{CompressionXZ: ".xz", CompressionZstd: ".zst", CompressionGzip: ".gz", CompressionBzip2: ".bz2"}[c]
	}
	return makeAr([]arEntry{
		{"debian-binary", []byte("2.0\n")},
		{"control.tar.xz", []byte("not read")},
		{name, data},
	})
}

func TestExtractDebCompressions(t *testing.T) {
	entries := []tarEntry{
		{name: "./", typ: tar.TypeDir},
		{name: "./boot/", typ: tar.TypeDir},
		{name: "./boot/vmlinuz-6.1.0-test", body: "kernel"},
		{name: "./lib/modules/6.1.0-test/kernel/a.ko", body: "odd"},
		{name: "./lib/modules/6.1.0-test/build", typ: tar.TypeSymlink, linkname: "/usr/src/x"},
		{name: "./usr/share/doc/linux-image/changelog.gz", body: "skipped"},
	}
	for _, c := range []Compression{CompressionXZ, CompressionZstd, CompressionGzip, CompressionNone} {
		t.Run(c.String(), func(t *testing.T) {
			deb := filepath.Join(t.TempDir(), "k.deb")
			if err := os.WriteFile(deb, makeDeb(t, c, entries), 0o644); err != nil {
				t.Fatal(err)
			}
			dest := t.TempDir()
			keep := func(name string) bool { return name != "usr/share/doc/linux-image/changelog.gz" }
			files, err := extractDeb(context.Background(), deb, dest, keep)
			if err != nil {
				t.Fatalf("extractDeb: %v", err)
			}
			want := []string{"boot/vmlinuz-6.1.0-test", "lib/modules/6.1.0-test/kernel/a.ko"}
			if !reflect.DeepEqual(files, want) {
				t.Fatalf("files = %v, want %v", files, want)
			}
			got, err := os.ReadFile(filepath.Join(dest, "lib/modules/6.1.0-test/kernel/a.ko"))
			if err != nil || string(got) != "odd" {
				t.Fatalf("a.ko = %q, %v", got, err)
			}
			if _, err := os.Lstat(filepath.Join(dest, "lib/modules/6.1.0-test/build")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("symbolic link was extracted: %v", err)
			}
			if _, err := os.Stat(filepath.Join(dest, "usr")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("entry rejected by keep was extracted: %v", err)
			}
		})
	}
}

func TestExtractDebBadInput(t *testing.T) {
	good := makeDeb(t, CompressionGzip, []tarEntry{{name: "./boot/vmlinuz-1", body: "k"}})
	tests := []struct {
		name string
		deb  []byte
	}{
		{"empty file", nil},
		{"not an ar archive", []byte("PK\x03\x04 zip file")},
		{"no data member", makeAr([]arEntry{{"debian-binary", []byte("2.0\n")}})},
		{"unknown data compression", makeAr([]arEntry{{"data.tar.lzo", []byte("x")}})},
		{"truncated member", good[:len(good)-20]},
		{"bad header terminator", bytes.Replace(good, []byte("`\n"), []byte("xx"), 1)},
		{"bad size field", bytes.Replace(makeAr([]arEntry{{"data.tar", []byte("x")}}), []byte("1         `"), []byte("-1        `"), 1)},
		{"corrupt compressed data", makeAr([]arEntry{{"data.tar.xz", []byte("\xfd7zXZ\x00garbage")}})},
		{"path traversal", makeDeb(t, CompressionNone, []tarEntry{{name: "../../etc/evil", body: "x"}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			deb := filepath.Join(dir, "k.deb")
			if err := os.WriteFile(deb, tt.deb, 0o644); err != nil {
				t.Fatal(err)
			}
			dest := filepath.Join(dir, "out")
			_, err := extractDeb(context.Background(), deb, dest, func(string) bool { return true })
			if !errors.Is(err, ErrInvalidDeb) {
				t.Fatalf("extractDeb error = %v, want ErrInvalidDeb", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "etc")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("a file was written outside the destination")
			}
		})
	}
}

func TestExtractDebCancelled(t *testing.T) {
	deb := filepath.Join(t.TempDir(), "k.deb")
	if err := os.WriteFile(deb, makeDeb(t, CompressionNone, []tarEntry{{name: "boot/vmlinuz-1", body: "k"}}), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := extractDeb(ctx, deb, t.TempDir(), func(string) bool { return true })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("extractDeb error = %v, want context.Canceled", err)
	}
}

func TestReadArMembers(t *testing.T) {
	ar := makeAr([]arEntry{{"debian-binary", []byte("2.0\n")}, {"odd/", []byte("abc")}, {"data.tar", []byte("xy")}})
	members, err := readArMembers(ar)
	if err != nil {
		t.Fatalf("readArMembers: %v", err)
	}
	want := []arMember{{"debian-binary", 4}, {"odd", 3}, {"data.tar", 2}}
	if !reflect.DeepEqual(members, want) {
		t.Fatalf("members = %v, want %v", members, want)
	}
}

func FuzzReadArMembers(f *testing.F) {
	f.Add(makeAr([]arEntry{{"debian-binary", []byte("2.0\n")}, {"data.tar.xz", []byte("abc")}}))
	f.Add([]byte(arMagic))
	f.Add([]byte(arMagic + "short"))
	f.Fuzz(func(t *testing.T, b []byte) {
		members, err := readArMembers(b)
		if err != nil && !errors.Is(err, ErrInvalidDeb) {
			t.Fatalf("error %v does not match ErrInvalidDeb", err)
		}
		var total int64
		for _, m := range members {
			if m.Size < 0 {
				t.Fatalf("member %q has negative size", m.Name)
			}
			total += m.Size
		}
		if total > int64(len(b)) {
			t.Fatalf("members claim %d bytes of a %d-byte archive", total, len(b))
		}
	})
}

func TestLoadKernelFileKinds(t *testing.T) {
	vmlinux := testVmlinux("6.1.0-kinds")
	bz := makeBzImage(compressors[CompressionZstd](t, vmlinux), "6.1.0-kinds (b@h) #1", 4, 0)
	deb := makeDeb(t, CompressionXZ, []tarEntry{
		{name: "./boot/vmlinuz-6.1.0-kinds", body: string(bz)},
		{name: "./lib/modules/6.1.0-kinds/kernel/drivers/virtio/virtio.ko", body: "ko"},
	})
	tests := []struct {
		name        string
		data        []byte
		wantModules bool
	}{
		{"vmlinux", vmlinux, false},
		{"bzImage", bz, false},
		{"deb", deb, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "kernel")
			if err := os.WriteFile(p, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			k, err := loadKernelFile(context.Background(), p, dir)
			if err != nil {
				t.Fatalf("loadKernelFile: %v", err)
			}
			if !bytes.Equal(k.vmlinux, vmlinux) {
				t.Errorf("vmlinux differs")
			}
			if k.release != "6.1.0-kinds" {
				t.Errorf("release = %q", k.release)
			}
			if (k.moduleRoot != "") != tt.wantModules {
				t.Errorf("moduleRoot = %q", k.moduleRoot)
			}
		})
	}
}

func TestLoadKernelFileRejects(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"text file", []byte("hello"), ErrNotVmlinux},
		{"deb without kernel", makeDeb(t, CompressionGzip, []tarEntry{{name: "./usr/bin/x", body: "x"}}), ErrInvalidDeb},
		{"deb with two module trees", makeDeb(t, CompressionGzip, []tarEntry{
			{name: "./boot/vmlinuz-1", body: "x"},
			{name: "./lib/modules/1/a.ko", body: "x"},
			{name: "./lib/modules/2/a.ko", body: "x"},
		}), ErrInvalidDeb},
		{"deb with a bad kernel", makeDeb(t, CompressionGzip, []tarEntry{{name: "./boot/vmlinuz-1", body: "not a kernel"}}), ErrNotVmlinux},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "kernel")
			if err := os.WriteFile(p, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := loadKernelFile(context.Background(), p, dir)
			if !errors.Is(err, tt.want) {
				t.Fatalf("loadKernelFile error = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestParseApt(t *testing.T) {
	depends := []byte("linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n  Depends: <virtual>\n")
	if got, ok := parseAptDepends(depends, "linux-image-"); !ok || got != "linux-image-6.1.0-57-cloud-amd64" {
		t.Errorf("parseAptDepends = %q, %v", got, ok)
	}
	if _, ok := parseAptDepends([]byte("linux-image-cloud-amd64\n  Recommends: x\n"), "linux-image-"); ok {
		t.Errorf("parseAptDepends found a dependency in output without one")
	}

	show := []byte("Package: linux-image-6.1.0-57-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+3)\nVersion: 6.1.192-3\nSize: 26705532\nSHA256: abc123\n\nPackage: other\nVersion: 1\n")
	p, err := parseAptShow(show)
	if err != nil {
		t.Fatalf("parseAptShow: %v", err)
	}
	want := &debPackage{Name: "linux-image-6.1.0-57-cloud-amd64", Version: "6.1.192-3", SHA256: "abc123", Size: 26705532}
	if !reflect.DeepEqual(p, want) {
		t.Errorf("parseAptShow = %+v, want %+v", p, want)
	}
	for _, bad := range []string{"", "Package: x\n", "Package: x\nVersion: 1\nSize: big\n"} {
		if _, err := parseAptShow([]byte(bad)); err == nil {
			t.Errorf("parseAptShow(%q) accepted", bad)
		}
	}
}
