package image

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"os/exec"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// compressors produce each format the way the kernel build packs a
// payload: the compressed stream, then (for all but gzip) the
// uncompressed size as a 32-bit little-endian number.
var compressors = map[Compression]func(t testing.TB, data []byte) []byte{
	CompressionGzip: func(t testing.TB, data []byte) []byte {
		var b bytes.Buffer
		zw := gzip.NewWriter(&b)
		mustWrite(t, zw, data)
		return b.Bytes()
	},
	CompressionXZ: func(t testing.TB, data []byte) []byte {
		var b bytes.Buffer
		zw, err := xz.NewWriter(&b)
		if err != nil {
			t.Fatal(err)
		}
		mustWrite(t, zw, data)
		return appendSize(b.Bytes(), data)
	},
	CompressionZstd: func(t testing.TB, data []byte) []byte {
		var b bytes.Buffer
		zw, err := zstd.NewWriter(&b)
		if err != nil {
			t.Fatal(err)
		}
		mustWrite(t, zw, data)
		return appendSize(b.Bytes(), data)
	},
	CompressionLZ4Legacy: func(t testing.TB, data []byte) []byte {
		var b bytes.Buffer
		zw := lz4.NewWriter(&b)
		if err := zw.Apply(lz4.LegacyOption(true)); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, zw, data)
		return appendSize(b.Bytes(), data)
	},
	CompressionLZMA: func(t testing.TB, data []byte) []byte {
		var b bytes.Buffer
		zw, err := lzma.NewWriter(&b)
		if err != nil {
			t.Fatal(err)
		}
		mustWrite(t, zw, data)
		return appendSize(b.Bytes(), data)
	},
	CompressionBzip2: func(t testing.TB, data []byte) []byte {
		// The standard library reads bzip2 but cannot write it.
		requireTools(t, "install bzip2 to test bzip2 payloads", "bzip2")
		cmd := exec.Command("bzip2", "-c")
		cmd.Stdin = bytes.NewReader(data)
		out, err := cmd.Output()
		if err != nil {
			t.Fatal(err)
		}
		return appendSize(out, data)
	},
}

func mustWrite(t testing.TB, w io.WriteCloser, data []byte) {
	t.Helper()
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func appendSize(stream, data []byte) []byte {
	return binary.LittleEndian.AppendUint32(append([]byte(nil), stream...), uint32(len(data)))
}

func TestExtractVmlinuxEachCompression(t *testing.T) {
	vmlinux := testVmlinux("6.1.0-test")
	for c, compress := range compressors {
		t.Run(c.String(), func(t *testing.T) {
			payload := compress(t, vmlinux)
			if got := DetectCompression(payload); got != c {
				t.Fatalf("DetectCompression = %v, want %v", got, c)
			}
			img := makeBzImage(payload, "6.1.0-test (builder@host) #1 SMP", 4, 0x3c0)
			got, hdr, err := ExtractVmlinux(img)
			if err != nil {
				t.Fatalf("ExtractVmlinux: %v", err)
			}
			if !bytes.Equal(got, vmlinux) {
				t.Fatalf("vmlinux differs: %d bytes, want %d", len(got), len(vmlinux))
			}
			if hdr.PayloadLength != uint32(len(payload)) {
				t.Errorf("PayloadLength = %d, want %d", hdr.PayloadLength, len(payload))
			}
			info, err := VerifyVmlinux(bytes.NewReader(got))
			if err != nil {
				t.Fatalf("VerifyVmlinux: %v", err)
			}
			if !info.HasPVH || info.PVHEntry != 0x1000120 {
				t.Errorf("PVH = %v 0x%x, want true 0x1000120", info.HasPVH, info.PVHEntry)
			}
		})
	}
}

func TestParseSetupHeaderFields(t *testing.T) {
	for _, sects := range []int{4, 27} {
		img := makeBzImage([]byte{0x1f, 0x8b, 0, 0, 0, 0, 0, 0}, "6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1", sects, 0x2cc)
		h, err := ParseSetupHeader(img)
		if err != nil {
			t.Fatalf("setup_sects %d: %v", sects, err)
		}
		if h.SetupSects != sects {
			t.Errorf("SetupSects = %d, want %d", h.SetupSects, sects)
		}
		if h.Version != 0x020f {
			t.Errorf("Version = %#x, want 0x20f", h.Version)
		}
		if h.PayloadOffset != 0x2cc || h.PayloadLength != 8 {
			t.Errorf("payload = %#x+%d, want 0x2cc+8", h.PayloadOffset, h.PayloadLength)
		}
		if want := int64(sects+1)*512 + 0x2cc; h.PayloadStart() != want {
			t.Errorf("PayloadStart = %d, want %d", h.PayloadStart(), want)
		}
		if !h.Has64BitEntry() {
			t.Errorf("Has64BitEntry = false")
		}
		if h.InitSize != 0x2000000 {
			t.Errorf("InitSize = %#x", h.InitSize)
		}
		if got := releaseFromVersionString(h.KernelVersion); got != "6.1.0-57-cloud-amd64" {
			t.Errorf("release = %q from %q", got, h.KernelVersion)
		}
	}
}

func TestExtractVmlinuxBadInput(t *testing.T) {
	vmlinux := testVmlinux("6.1.0-test")
	good := compressors[CompressionGzip](t, vmlinux)
	lz4Payload := compressors[CompressionLZ4Legacy](t, vmlinux)

	tests := []struct {
		name  string
		image func() []byte
		want  error
	}{
		{"short file", func() []byte { return make([]byte, 100) }, ErrNotBzImage},
		{"no HdrS magic", func() []byte {
			img := makeBzImage(good, "x", 4, 0)
			copy(img[offHeaderMagic:], "MZxx")
			return img
		}, ErrNotBzImage},
		{"protocol 2.06", func() []byte {
			img := makeBzImage(good, "x", 4, 0)
			binary.LittleEndian.PutUint16(img[offVersion:], 0x0206)
			return img
		}, ErrNotBzImage},
		{"zero payload length", func() []byte {
			img := makeBzImage(good, "x", 4, 0)
			binary.LittleEndian.PutUint32(img[offPayloadLength:], 0)
			return img
		}, ErrNotBzImage},
		{"payload past end", func() []byte {
			img := makeBzImage(good, "x", 4, 0)
			return img[:len(img)-10]
		}, ErrNotBzImage},
		{"huge payload offset", func() []byte {
			img := makeBzImage(good, "x", 4, 0)
			binary.LittleEndian.PutUint32(img[offPayloadOffset:], 0xffffffff)
			return img
		}, ErrNotBzImage},
		{"unknown compression", func() []byte {
			return makeBzImage([]byte("LZO!compressed-data"), "x", 4, 0)
		}, ErrUnknownCompression},
		{"wrong size trailer", func() []byte {
			p := append([]byte(nil), lz4Payload...)
			binary.LittleEndian.PutUint32(p[len(p)-4:], uint32(len(vmlinux)+1))
			return makeBzImage(p, "x", 4, 0)
		}, errSizeMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ExtractVmlinux(tt.image())
			if !errors.Is(err, tt.want) {
				t.Fatalf("ExtractVmlinux error = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestExtractVmlinuxUnsupported(t *testing.T) {
	vmlinux := testVmlinux("6.1.0-test")
	lzo := append(append([]byte(nil), magicLZO...), "rest of an lzop file"...)
	if _, _, err := ExtractVmlinux(makeBzImage(lzo, "x", 4, 0)); !errors.Is(err, ErrUnsupportedCompression) {
		t.Errorf("LZO payload: error %v, want ErrUnsupportedCompression", err)
	}

	// Kernels built with CONFIG_KERNEL_XZ use xz's x86 BCJ filter, which
	// only the xz tool can write.
	requireTools(t, "install xz-utils to test xz payloads with a BCJ filter", "xz")
	cmd := exec.Command("xz", "--format=xz", "--check=crc32", "--x86", "--lzma2", "-c")
	cmd.Stdin = bytes.NewReader(vmlinux)
	stream, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if id, ok := xzBCJFilter(stream); !ok || id != 0x04 {
		t.Fatalf("xzBCJFilter = %#x, %v, want 0x04, true", id, ok)
	}
	_, _, err = ExtractVmlinux(makeBzImage(appendSize(stream, vmlinux), "x", 4, 0))
	if !errors.Is(err, ErrUnsupportedCompression) {
		t.Fatalf("xz payload with the x86 filter: error %v, want ErrUnsupportedCompression", err)
	}
	plain := compressors[CompressionXZ](t, vmlinux)
	if _, ok := xzBCJFilter(plain); ok {
		t.Errorf("xzBCJFilter found a filter in a plain xz stream")
	}
}

func FuzzXZBCJFilter(f *testing.F) {
	f.Add(compressors[CompressionXZ](f, []byte("data")))
	f.Add([]byte("\xfd7zXZ\x00\x00\x01\x69\x22\xde\x36\x02\x01\x04\x00\x21\x01\x16\x00\x0d\x86\x35\x1f"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if id, ok := xzBCJFilter(b); ok && (id < 0x04 || id > 0x0b) {
			t.Fatalf("reported filter %#x outside the BCJ range", id)
		}
	})
}

func TestExtractVmlinuxCorruptPayload(t *testing.T) {
	vmlinux := testVmlinux("6.1.0-test")
	for c, compress := range compressors {
		t.Run(c.String(), func(t *testing.T) {
			p := compress(t, vmlinux)
			// Keep the magic, damage the stream, and cut it short.
			bad := append([]byte(nil), p[:len(p)/2]...)
			for i := 8; i < len(bad); i += 7 {
				bad[i] ^= 0x5a
			}
			_, _, err := ExtractVmlinux(makeBzImage(bad, "x", 4, 0))
			if err == nil {
				t.Fatalf("ExtractVmlinux accepted a corrupt %s payload", c)
			}
		})
	}
}

func TestVerifyVmlinuxRejects(t *testing.T) {
	tests := []struct {
		name string
		file []byte
	}{
		{"not elf", []byte("MZ this is a PE file, not an ELF one............................................")},
		{"32-bit", makeELF(elfSpec{class: elf.ELFCLASS32, entry: 0x100000})},
		{"arm64", makeELF(elfSpec{machine: elf.EM_AARCH64, entry: 0x100000})},
		{"relocatable", makeELF(elfSpec{typ: elf.ET_REL, entry: 0x100000})},
		{"no note and zero entry", makeELF(elfSpec{})},
		{"other note type", makeELF(elfSpec{notes: []elfNote{{name: "Xen", typ: 17, desc: []byte{1, 2, 3, 4}}}})},
		{"pvh note of another owner", makeELF(elfSpec{notes: []elfNote{{name: "GNU", typ: 18, desc: []byte{1, 2, 3, 4}}}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := VerifyVmlinux(bytes.NewReader(tt.file))
			if !errors.Is(err, ErrNotVmlinux) {
				t.Fatalf("VerifyVmlinux error = %v, want ErrNotVmlinux", err)
			}
		})
	}
}

func TestVerifyVmlinuxEntryWithoutNote(t *testing.T) {
	info, err := VerifyVmlinux(bytes.NewReader(makeELF(elfSpec{entry: 0x1000000})))
	if err != nil {
		t.Fatalf("VerifyVmlinux: %v", err)
	}
	if info.HasPVH || info.Entry != 0x1000000 {
		t.Errorf("info = %+v, want entry 0x1000000 without PVH", info)
	}
}

func TestKernelReleaseFromImage(t *testing.T) {
	if got := kernelReleaseFromImage(testVmlinux("6.12.9-amd64")); got != "6.12.9-amd64" {
		t.Errorf("release = %q", got)
	}
	if got := kernelReleaseFromImage([]byte("printk: Linux version %s\x00")); got != "" {
		t.Errorf("release from a format string = %q, want empty", got)
	}
}

func FuzzParseSetupHeader(f *testing.F) {
	f.Add(makeBzImage([]byte{0x1f, 0x8b, 8, 0}, "6.1.0 #1", 4, 0))
	f.Add(makeBzImage([]byte{0x02, 0x21, 0x4c, 0x18}, "", 1, 0x10))
	f.Add(make([]byte, setupHeaderEnd))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseSetupHeader(b)
		if err != nil {
			if !errors.Is(err, ErrNotBzImage) {
				t.Fatalf("error %v does not match ErrNotBzImage", err)
			}
			return
		}
		if h.SetupSects < 1 || h.Version < minPayloadProtocol || h.PayloadLength == 0 {
			t.Fatalf("accepted header %+v", h)
		}
	})
}

func FuzzExtractVmlinux(f *testing.F) {
	small := testVmlinux("1")
	for _, c := range []Compression{CompressionGzip, CompressionLZ4Legacy, CompressionZstd, CompressionXZ, CompressionLZMA} {
		f.Add(makeBzImage(compressors[c](f, small), "1", 1, 0))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		out, hdr, err := ExtractVmlinux(b)
		if err != nil {
			return
		}
		if hdr == nil || uint32(len(out)) != binary.LittleEndian.Uint32(b[hdr.PayloadStart()+int64(hdr.PayloadLength)-4:]) {
			t.Fatalf("accepted output whose size does not match the trailer")
		}
	})
}

func FuzzFindPVHNote(f *testing.F) {
	f.Add([]byte{4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, 'X', 'e', 'n', 0, 1, 2, 3, 4})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 18, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		findPVHNote(b)
	})
}
