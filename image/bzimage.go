package image

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Offsets into a bzImage file of the x86 boot protocol's setup header
// fields, as listed in the kernel's Documentation/arch/x86/boot.rst.
const (
	offSetupSects    = 0x1f1
	offBootFlag      = 0x1fe
	offHeaderMagic   = 0x202
	offVersion       = 0x206
	offKernelVersion = 0x20e
	offLoadFlags     = 0x211
	offXLoadFlags    = 0x236
	offPayloadOffset = 0x248
	offPayloadLength = 0x24c
	offInitSize      = 0x260

	// setupHeaderEnd is the end of init_size, the last field this parser
	// reads. Headers of protocol 2.10 and later always reach it.
	setupHeaderEnd = offInitSize + 4

	// minPayloadProtocol is boot protocol 2.08, the first with
	// payload_offset and payload_length.
	minPayloadProtocol = 0x0208

	// xlfKernel64 is the xloadflags bit that marks a kernel with a 64-bit
	// entry point at 0x200 past the protected-mode code.
	xlfKernel64 = 1 << 0
)

var headerMagic = []byte("HdrS")

// SetupHeader contains the fields of a bzImage's setup header that the
// builder needs to find and check the compressed kernel payload.
type SetupHeader struct {
	// SetupSects is the size of the real-mode setup code in 512-byte
	// sectors, not counting the boot sector. A stored 0 means 4.
	SetupSects int
	// Version is the boot protocol version, such as 0x020f for 2.15.
	Version uint16
	// KernelVersion is the version string the setup code points at, such
	// as "6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP ...".
	// It is empty when the pointer is unset or out of range.
	KernelVersion string
	LoadFlags     uint8
	XLoadFlags    uint16
	// PayloadOffset is the offset of the compressed payload from the start
	// of the protected-mode code, which begins at (SetupSects+1)*512.
	PayloadOffset uint32
	// PayloadLength is the payload's length in bytes, including the
	// 4-byte decompressed size that the kernel build appends.
	PayloadLength uint32
	// InitSize is the memory the kernel needs while it decompresses itself.
	InitSize uint32
}

// Has64BitEntry reports whether the kernel declares a 64-bit entry point.
func (h *SetupHeader) Has64BitEntry() bool { return h.XLoadFlags&xlfKernel64 != 0 }

// ProtectedModeOffset returns the file offset where the protected-mode
// kernel (and so the payload's base) starts.
func (h *SetupHeader) ProtectedModeOffset() int64 { return int64(h.SetupSects+1) * 512 }

// PayloadStart returns the file offset of the compressed payload.
func (h *SetupHeader) PayloadStart() int64 {
	return h.ProtectedModeOffset() + int64(h.PayloadOffset)
}

// ParseSetupHeader parses the setup header at the start of a bzImage. It
// needs at least the first 0x264 bytes of the file and checks the "HdrS"
// magic, the boot protocol version (2.08 or later, for the payload fields)
// and that the payload fields are non-zero. [ExtractVmlinux], not this
// function, checks the payload against the file size.
func ParseSetupHeader(b []byte) (*SetupHeader, error) {
	if len(b) < setupHeaderEnd {
		return nil, fmt.Errorf("parse setup header: %d bytes, need %d: %w", len(b), setupHeaderEnd, ErrNotBzImage)
	}
	if !bytes.Equal(b[offHeaderMagic:offHeaderMagic+4], headerMagic) {
		return nil, fmt.Errorf("parse setup header: magic %q at 0x%x, want %q: %w",
			b[offHeaderMagic:offHeaderMagic+4], offHeaderMagic, headerMagic, ErrNotBzImage)
	}
	le := binary.LittleEndian
	h := &SetupHeader{
		SetupSects:    int(b[offSetupSects]),
		Version:       le.Uint16(b[offVersion:]),
		LoadFlags:     b[offLoadFlags],
		XLoadFlags:    le.Uint16(b[offXLoadFlags:]),
		PayloadOffset: le.Uint32(b[offPayloadOffset:]),
		PayloadLength: le.Uint32(b[offPayloadLength:]),
		InitSize:      le.Uint32(b[offInitSize:]),
	}
	if h.SetupSects == 0 {
		h.SetupSects = 4
	}
	if h.Version < minPayloadProtocol {
		return nil, fmt.Errorf("parse setup header: boot protocol %d.%02d has no payload fields (need 2.08 or later): %w",
			h.Version>>8, h.Version&0xff, ErrNotBzImage)
	}
	if h.PayloadLength == 0 {
		return nil, fmt.Errorf("parse setup header: payload_length is 0: %w", ErrNotBzImage)
	}
	h.KernelVersion = kernelVersionString(b, le.Uint16(b[offKernelVersion:]))
	return h, nil
}

// kernelVersionString reads the NUL-terminated version string that the
// kernel_version field points at, relative to 0x200. It returns "" when the
// pointer is unset or the string is not inside b.
func kernelVersionString(b []byte, ptr uint16) string {
	if ptr == 0 {
		return ""
	}
	start := int(ptr) + 0x200
	if start >= len(b) {
		return ""
	}
	end := bytes.IndexByte(b[start:], 0)
	if end < 0 {
		return ""
	}
	return string(b[start : start+end])
}

// releaseFromVersionString returns the first word of a kernel version
// string: "6.1.0-57-cloud-amd64" from "6.1.0-57-cloud-amd64 (debian...) #1".
func releaseFromVersionString(s string) string {
	if i := bytes.IndexAny([]byte(s), " \t\n"); i >= 0 {
		return s[:i]
	}
	return s
}

// ExtractVmlinux returns the uncompressed vmlinux ELF image inside a bzImage
// file's contents, with the parsed setup header. It locates the payload
// from the setup header, detects its compression by magic number,
// decompresses it and checks the size the kernel build appended.
func ExtractVmlinux(bzImage []byte) ([]byte, *SetupHeader, error) {
	hdr, err := ParseSetupHeader(bzImage)
	if err != nil {
		return nil, nil, err
	}
	start := hdr.PayloadStart()
	end := start + int64(hdr.PayloadLength)
	if end > int64(len(bzImage)) {
		return nil, nil, fmt.Errorf("extract vmlinux: payload [%d, %d) is past the end of the %d-byte file: %w",
			start, end, len(bzImage), ErrNotBzImage)
	}
	payload := bzImage[start:end]
	kind := DetectCompression(payload)
	if bytes.HasPrefix(payload, magicLZO) {
		return nil, nil, fmt.Errorf("extract vmlinux: the payload is LZO-compressed, which the builder cannot read (pass an uncompressed vmlinux instead): %w",
			ErrUnsupportedCompression)
	}
	if kind == CompressionNone {
		return nil, nil, fmt.Errorf("extract vmlinux: payload at offset %d starts with % x: %w",
			start, payload[:min(len(payload), 6)], ErrUnknownCompression)
	}
	vmlinux, err := decompressKernelPayload(kind, payload)
	if err != nil {
		return nil, nil, fmt.Errorf("extract vmlinux: %w", err)
	}
	return vmlinux, hdr, nil
}
