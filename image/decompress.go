package image

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// Compression is a compression format, detected by the magic number at the
// start of a stream.
type Compression int

// Compression formats the builder can decompress.
const (
	CompressionNone Compression = iota
	CompressionGzip
	CompressionXZ
	CompressionZstd
	// CompressionLZ4Legacy is LZ4's legacy frame (magic 0x184C2102), the
	// only LZ4 format that the kernel's boot decompressor reads.
	CompressionLZ4Legacy
	CompressionBzip2
	// CompressionLZMA is the LZMA "alone" format that `lzma` writes.
	CompressionLZMA
)

func (c Compression) String() string {
	switch c {
	case CompressionGzip:
		return "gzip"
	case CompressionXZ:
		return "xz"
	case CompressionZstd:
		return "zstd"
	case CompressionLZ4Legacy:
		return "lz4-legacy"
	case CompressionBzip2:
		return "bzip2"
	case CompressionLZMA:
		return "lzma"
	default:
		return "none"
	}
}

var (
	magicGzip      = []byte{0x1f, 0x8b}
	magicXZ        = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	magicZstd      = []byte{0x28, 0xb5, 0x2f, 0xfd}
	magicLZ4Legacy = []byte{0x02, 0x21, 0x4c, 0x18}
	magicBzip2     = []byte("BZh")
	// magicLZMA is the properties byte for lc=3, lp=0, pb=2 followed by
	// the two low bytes of a dictionary size that is a multiple of 64 KiB.
	// Every kernel build and the `lzma` tool's defaults write it.
	magicLZMA = []byte{0x5d, 0x00, 0x00}
	// magicLZO is the lzop file magic, which CONFIG_KERNEL_LZO payloads
	// start with.
	magicLZO = []byte{0x89, 'L', 'Z', 'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a}
)

// maxDecompressedSize bounds what a decompressor may produce, so a
// malformed or hostile input cannot fill the disk or memory. The largest
// x86 vmlinux images with debug info stay well below it.
const maxDecompressedSize = 1 << 30

// DetectCompression returns the compression format whose magic number b
// starts with, or CompressionNone.
func DetectCompression(b []byte) Compression {
	switch {
	case bytes.HasPrefix(b, magicGzip):
		return CompressionGzip
	case bytes.HasPrefix(b, magicXZ):
		return CompressionXZ
	case bytes.HasPrefix(b, magicZstd):
		return CompressionZstd
	case bytes.HasPrefix(b, magicLZ4Legacy):
		return CompressionLZ4Legacy
	case bytes.HasPrefix(b, magicBzip2) && len(b) > 3 && b[3] >= '1' && b[3] <= '9':
		return CompressionBzip2
	case bytes.HasPrefix(b, magicLZMA):
		return CompressionLZMA
	default:
		return CompressionNone
	}
}

// NewDecompressor returns a reader of the decompressed form of r, which is
// compressed with c. The caller must close it, and Close leaves r open.
func NewDecompressor(c Compression, r io.Reader) (io.ReadCloser, error) {
	switch c {
	case CompressionGzip:
		return gzip.NewReader(r)
	case CompressionXZ:
		// NOTE: the xz library reads no BCJ filters, so it rejects x86
		// kernels built with CONFIG_KERNEL_XZ, which apply the x86 BCJ
		// filter. decompressAll reports them as ErrUnsupportedCompression.
		// Plain xz streams, such as .ko.xz modules, work.
		zr, err := xz.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(zr), nil
	case CompressionZstd:
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		return zr.IOReadCloser(), nil
	case CompressionLZ4Legacy:
		return io.NopCloser(lz4.NewReader(r)), nil
	case CompressionBzip2:
		return io.NopCloser(bzip2.NewReader(r)), nil
	case CompressionLZMA:
		zr, err := lzma.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(zr), nil
	default:
		return nil, fmt.Errorf("new decompressor for %s: %w", c, ErrUnknownCompression)
	}
}

// decompressAll decompresses b, which is compressed with c, refusing output
// larger than maxDecompressedSize.
func decompressAll(c Compression, b []byte) ([]byte, error) {
	if c == CompressionXZ {
		if id, ok := xzBCJFilter(b); ok {
			return nil, fmt.Errorf("decompress xz: the stream uses BCJ filter 0x%02x, which the xz library cannot read (pass an uncompressed vmlinux instead): %w",
				id, ErrUnsupportedCompression)
		}
	}
	zr, err := NewDecompressor(c, bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", c, err)
	}
	defer zr.Close()

	out, err := io.ReadAll(io.LimitReader(zr, maxDecompressedSize+1))
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", c, err)
	}
	if len(out) > maxDecompressedSize {
		return nil, fmt.Errorf("decompress %s: output exceeds %d bytes", c, maxDecompressedSize)
	}
	return out, nil
}

// xzBCJFilter returns the ID of the first branch/call/jump filter (IDs
// 0x04 to 0x0b: x86, PowerPC, IA-64, ARM, ARM-Thumb, SPARC, ARM64,
// RISC-V) in the first block header of an xz stream.
//
// The block header follows the 12-byte stream header. It starts with a
// size byte, and the header is (size+1)*4 bytes long. Next comes a flags
// byte: its low two bits are the filter count minus one, and bits 6 and 7
// announce two optional size fields. The filters follow, each an ID, a
// properties size and the properties. Numbers are xz's variable-length
// integers.
func xzBCJFilter(b []byte) (uint64, bool) {
	if len(b) < 14 || !bytes.HasPrefix(b, magicXZ) || b[12] == 0 {
		return 0, false
	}
	hdr := b[12:]
	size := (int(hdr[0]) + 1) * 4
	if size > len(hdr) {
		return 0, false
	}
	hdr = hdr[:size]
	flags := hdr[1]
	rest := hdr[2:]
	for _, present := range []bool{flags&0x40 != 0, flags&0x80 != 0} {
		if !present {
			continue
		}
		_, n := xzVarint(rest)
		if n == 0 {
			return 0, false
		}
		rest = rest[n:]
	}
	for i := 0; i <= int(flags&0x03); i++ {
		id, n := xzVarint(rest)
		if n == 0 {
			return 0, false
		}
		rest = rest[n:]
		propsSize, n := xzVarint(rest)
		if n == 0 || propsSize > uint64(len(rest)-n) {
			return 0, false
		}
		rest = rest[n+int(propsSize):]
		if id >= 0x04 && id <= 0x0b {
			return id, true
		}
	}
	return 0, false
}

// xzVarint decodes one of xz's variable-length integers (7 bits a byte,
// low bits first, at most 9 bytes) and returns it with its length, or a
// length of 0 when b holds no complete integer.
func xzVarint(b []byte) (uint64, int) {
	var v uint64
	for i := 0; i < len(b) && i < 9; i++ {
		v |= uint64(b[i]&0x7f) << (7 * i)
		if b[i]&0x80 == 0 {
			return v, i + 1
		}
	}
	return 0, 0
}

// errSizeMismatch means a kernel payload decompressed to a size other than
// the one recorded after it.
var errSizeMismatch = errors.New("decompressed size does not match the recorded size")

// decompressKernelPayload decompresses a bzImage payload. The kernel build
// appends the decompressed size as a 32-bit little-endian number to every
// format but gzip, whose own trailer already ends with that size. The
// function strips the appended size before decompressing and checks the
// output against it in both cases.
func decompressKernelPayload(c Compression, payload []byte) ([]byte, error) {
	if len(payload) < 4 {
		return nil, fmt.Errorf("decompress %s payload: %d bytes is too short", c, len(payload))
	}
	want := binary.LittleEndian.Uint32(payload[len(payload)-4:])
	stream := payload
	if c != CompressionGzip {
		stream = payload[:len(payload)-4]
	}
	out, err := decompressAll(c, stream)
	if err != nil {
		return nil, err
	}
	if uint32(len(out)) != want {
		return nil, fmt.Errorf("decompress %s payload: got %d bytes, trailer records %d: %w", c, len(out), want, errSizeMismatch)
	}
	return out, nil
}
