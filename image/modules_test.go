package image

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// writeTree writes files (path → contents) below root.
func writeTree(t testing.TB, root string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		p := filepath.Join(root, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// testModule returns a relocatable ELF module whose .modinfo section has
// the given name, depends and softdep values.
func testModule(name, depends, softdep string) []byte {
	info := "license=GPL\x00depends=" + depends + "\x00name=" + name + "\x00"
	if softdep != "" {
		info += "softdep=" + softdep + "\x00"
	}
	return makeELF(elfSpec{typ: 1, sections: []elfSection{{name: ".modinfo", data: []byte(info)}}})
}

const testModulesDep = `kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko
kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/hid/hid-generic.ko:
`

// checkLoadOrder fails unless every module in load comes after the
// modules it depends on, by the edges in deps (name → names).
func checkLoadOrder(t *testing.T, load []Module, deps map[string][]string) {
	t.Helper()
	pos := make(map[string]int)
	for i, m := range load {
		if _, dup := pos[m.Name]; dup {
			t.Errorf("module %s listed twice", m.Name)
		}
		pos[m.Name] = i
	}
	for _, m := range load {
		for _, d := range deps[m.Name] {
			if p, ok := pos[d]; !ok || p > pos[m.Name] {
				t.Errorf("module %s comes before its dependency %s", m.Name, d)
			}
		}
	}
}

func TestClosureFromModulesDep(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string][]byte{"modules.dep": []byte(testModulesDep)})
	ix, err := LoadModuleIndex(root)
	if err != nil {
		t.Fatalf("LoadModuleIndex: %v", err)
	}
	res, err := ix.Closure(DefaultModules, nil)
	if err != nil {
		t.Fatalf("Closure: %v", err)
	}
	got := make([]string, len(res.Load))
	for i, m := range res.Load {
		got[i] = m.Name
	}
	want := []string{
		"virtio_ring", "virtio", "virtio_mmio", "virtio_blk",
		"net_failover", "failover", "virtio_net", "virtio_console",
		"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
		"jbd2", "mbcache", "crc16", "ext4",
	}
	// The edges of modules.dep are transitive, so failover may come
	// either side of net_failover's listing; check the order by edges and
	// the set by sorting.
	checkLoadOrder(t, res.Load, ix.deps)
	if !sameSet(got, want) {
		t.Fatalf("Closure = %v, want the modules %v", got, want)
	}
	for _, m := range res.Load {
		if m.Name == "virtio_console" && m.Path != "kernel/drivers/char/virtio_console.ko.xz" {
			t.Errorf("virtio_console path = %q", m.Path)
		}
	}
	if contains(got, "hid_generic") {
		t.Errorf("closure has an unrequested module")
	}
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	seen := make(map[string]int)
	for _, s := range a {
		seen[s]++
	}
	for _, s := range b {
		seen[s]--
	}
	for _, n := range seen {
		if n != 0 {
			return false
		}
	}
	return true
}

func TestClosureDashUnderscore(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string][]byte{"modules.dep": []byte(testModulesDep)})
	ix, err := LoadModuleIndex(root)
	if err != nil {
		t.Fatal(err)
	}
	res, err := ix.Closure([]string{"hid_generic", "virtio-blk"}, nil)
	if err != nil {
		t.Fatalf("Closure: %v", err)
	}
	if res.Load[0].Name != "hid_generic" || res.Load[0].Path != "kernel/drivers/hid/hid-generic.ko" {
		t.Errorf("hid_generic resolved to %+v", res.Load[0])
	}
	if res.Load[len(res.Load)-1].Name != "virtio_blk" {
		t.Errorf("virtio-blk not resolved: %+v", res.Load)
	}
}

func TestClosureBuiltinAndMissing(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string][]byte{
		"modules.dep":     []byte("kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n"),
		"modules.builtin": []byte("kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio-mmio.ko\n"),
	})
	ix, err := LoadModuleIndex(root)
	if err != nil {
		t.Fatal(err)
	}
	res, err := ix.Closure([]string{"ext4", "virtio_mmio", "a"}, nil)
	if err != nil {
		t.Fatalf("Closure: %v", err)
	}
	if !reflect.DeepEqual(res.Builtin, []string{"ext4", "virtio_mmio"}) {
		t.Errorf("Builtin = %v", res.Builtin)
	}
	if len(res.Load) != 2 || res.Load[0].Name != "b" || res.Load[1].Name != "a" {
		t.Errorf("Load = %+v, want b then a", res.Load)
	}

	res, err = ix.Closure([]string{"a"}, []string{"nosuch", "b", "ext4"})
	if err != nil {
		t.Fatalf("Closure with a missing optional module: %v", err)
	}
	if len(res.Load) != 2 || len(res.Builtin) != 1 {
		t.Errorf("with optional modules: Load %+v, Builtin %v", res.Load, res.Builtin)
	}

	_, err = ix.Closure([]string{"a", "nosuch", "other-missing"}, nil)
	if !errors.Is(err, ErrModuleNotFound) {
		t.Fatalf("Closure error = %v, want ErrModuleNotFound", err)
	}
	for _, name := range []string{"nosuch", "other_missing"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not name %s", err, name)
		}
	}
}

func TestClosureFromModinfo(t *testing.T) {
	root := t.TempDir()
	xzModule := compressors[CompressionXZ](t, testModule("virtio_console", "virtio,virtio_ring", ""))
	writeTree(t, root, map[string][]byte{
		"kernel/drivers/virtio/virtio.ko":      testModule("virtio", "", ""),
		"kernel/drivers/virtio/virtio_ring.ko": testModule("virtio_ring", "", ""),
		"kernel/drivers/virtio/virtio_mmio.ko": testModule("virtio_mmio", "virtio,virtio_ring", ""),
		// A .ko.xz from a package that compresses modules, without the
		// size trailer a kernel payload has.
		"kernel/drivers/char/virtio_console.ko.xz": xzModule[:len(xzModule)-4],
		"kernel/fs/ext4/ext4.ko":                   testModule("ext4", "jbd2,mbcache", "pre: crc32c"),
		"kernel/fs/jbd2/jbd2.ko":                   testModule("jbd2", "", ""),
		"kernel/fs/mbcache.ko":                     testModule("mbcache", "", ""),
		"kernel/crypto/crc32c_generic.ko":          testModule("crc32c_generic", "", ""),
		"kernel/arch/x86/crypto/crc32c-intel.ko":   testModule("crc32c_intel", "", ""),
		"modules.builtin":                          []byte(""),
	})
	ix, err := LoadModuleIndex(root)
	if err != nil {
		t.Fatalf("LoadModuleIndex: %v", err)
	}
	res, err := ix.Closure([]string{"virtio_mmio", "virtio-console", "ext4"}, nil)
	if err != nil {
		t.Fatalf("Closure: %v", err)
	}
	var names []string
	for _, m := range res.Load {
		names = append(names, m.Name)
	}
	// crc32c is a soft dependency alias that no file is named after, so
	// it is skipped without an error.
	want := []string{"virtio", "virtio_ring", "virtio_mmio", "virtio_console", "jbd2", "mbcache", "ext4"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("Closure = %v, want %v", names, want)
	}
	data, err := readModuleFile(filepath.Join(root, "kernel/drivers/char/virtio_console.ko.xz"))
	if err != nil {
		t.Fatalf("readModuleFile: %v", err)
	}
	if info, err := parseModinfo(data); err != nil || info["name"] != "virtio_console" {
		t.Errorf("decompressed module modinfo = %v, %v", info, err)
	}
	if got := uncompressedModulePath("kernel/drivers/char/virtio_console.ko.xz"); got != "kernel/drivers/char/virtio_console.ko" {
		t.Errorf("uncompressedModulePath = %q", got)
	}
}

func TestClosureSoftDependencyLoadedFirst(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string][]byte{
		"kernel/fs/ext4.ko":    testModule("ext4", "", "pre: crc32c post: foo"),
		"kernel/lib/crc32c.ko": testModule("crc32c", "", ""),
		"kernel/lib/foo.ko":    testModule("foo", "", ""),
	})
	ix, err := LoadModuleIndex(root)
	if err != nil {
		t.Fatal(err)
	}
	res, err := ix.Closure([]string{"ext4"}, nil)
	if err != nil {
		t.Fatalf("Closure: %v", err)
	}
	if len(res.Load) != 2 || res.Load[0].Name != "crc32c" || res.Load[1].Name != "ext4" {
		t.Fatalf("Load = %+v, want crc32c then ext4", res.Load)
	}
}

func TestClosureRejects(t *testing.T) {
	tests := []struct {
		name  string
		files map[string][]byte
		want  error
	}{
		{"cycle", map[string][]byte{
			"kernel/a.ko": testModule("a", "b", ""),
			"kernel/b.ko": testModule("b", "a", ""),
		}, ErrInvalidModulesDep},
		{"missing dependency", map[string][]byte{
			"kernel/a.ko": testModule("a", "gone", ""),
		}, ErrModuleNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			writeTree(t, root, tt.files)
			ix, err := LoadModuleIndex(root)
			if err != nil {
				t.Fatal(err)
			}
			_, err = ix.Closure([]string{"a"}, nil)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Closure error = %v, want %v", err, tt.want)
			}
		})
	}

	root := t.TempDir()
	writeTree(t, root, map[string][]byte{"kernel/a.ko": []byte("not an ELF file")})
	ix, err := LoadModuleIndex(root)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ix.Closure([]string{"a"}, nil); err == nil || !strings.Contains(err.Error(), "kernel/a.ko") {
		t.Fatalf("Closure on a non-ELF module: error %v, want one naming the file", err)
	}
}

func TestParseModulesDepRejects(t *testing.T) {
	tests := []struct {
		name, input string
	}{
		{"no colon", "kernel/a.ko kernel/b.ko\n"},
		{"empty path", ": kernel/b.ko\n"},
		{"not a module", "kernel/a.txt:\n"},
		{"dependency not a module", "kernel/a.ko: b\n"},
		{"duplicate", "kernel/a.ko:\nkernel/a.ko:\n"},
		{"space in path", "kernel/a b.ko:\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseModulesDep(strings.NewReader(tt.input))
			if !errors.Is(err, ErrInvalidModulesDep) {
				t.Fatalf("ParseModulesDep error = %v, want ErrInvalidModulesDep", err)
			}
		})
	}

	root := t.TempDir()
	writeTree(t, root, map[string][]byte{"modules.dep": []byte("kernel/a.ko: kernel/b.ko\n")})
	if _, err := LoadModuleIndex(root); !errors.Is(err, ErrInvalidModulesDep) {
		t.Fatalf("LoadModuleIndex with a dangling dependency: error %v, want ErrInvalidModulesDep", err)
	}
}

func TestParseModulesDepSkipsComments(t *testing.T) {
	deps, err := ParseModulesDep(strings.NewReader("# generated\n\nkernel/a.ko:   kernel/b.ko.zst \nkernel/b.ko.zst:\n"))
	if err != nil {
		t.Fatalf("ParseModulesDep: %v", err)
	}
	want := map[string][]string{"kernel/a.ko": {"kernel/b.ko.zst"}, "kernel/b.ko.zst": {}}
	if !reflect.DeepEqual(deps, want) {
		t.Fatalf("deps = %v, want %v", deps, want)
	}
}

func FuzzParseModulesDep(f *testing.F) {
	f.Add(testModulesDep)
	f.Add("kernel/a.ko:\n# comment\n")
	f.Add("a.ko: b.ko c.ko.xz\nb.ko:\nc.ko.xz: a.ko\n")
	f.Fuzz(func(t *testing.T, input string) {
		deps, err := ParseModulesDep(strings.NewReader(input))
		if err != nil {
			if !errors.Is(err, ErrInvalidModulesDep) {
				t.Fatalf("error %v does not match ErrInvalidModulesDep", err)
			}
			return
		}
		for mod, list := range deps {
			if !isModuleFile(mod) {
				t.Fatalf("accepted module path %q", mod)
			}
			for _, d := range list {
				if !isModuleFile(d) {
					t.Fatalf("accepted dependency %q", d)
				}
			}
		}
		// Resolving any accepted file must end, in order or with an error.
		ix := newModuleIndex("fuzz")
		if err := ix.loadModulesDep(strings.NewReader(input)); err != nil {
			return
		}
		res, err := ix.Closure(sortedKeys(ix.paths), nil)
		if err != nil {
			return
		}
		checkLoadOrder(t, res.Load, ix.deps)
	})
}
