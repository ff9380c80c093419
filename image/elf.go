package image

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"regexp"
)

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY, the note type that
// carries a kernel's 32-bit PVH entry point. Firecracker and QEMU look for
// it in a PT_NOTE segment owned by "Xen".
const xenElfnotePhys32Entry = 18

// VmlinuxInfo describes a verified vmlinux image.
type VmlinuxInfo struct {
	// Entry is the ELF entry point, the 64-bit entry of an x86_64 vmlinux.
	Entry uint64
	// PVHEntry is the physical address from the PVH note, or 0 without one.
	PVHEntry uint32
	// HasPVH reports whether the image has the PVH entry note, which QEMU's
	// microvm machine needs to boot an ELF kernel directly.
	HasPVH bool
}

// VerifyVmlinux checks that r holds a bootable x86_64 vmlinux: a 64-bit
// little-endian ELF executable for x86_64 with either a PVH entry note or a
// non-zero entry point. Errors match [ErrNotVmlinux].
func VerifyVmlinux(r io.ReaderAt) (*VmlinuxInfo, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("verify vmlinux: %w: %w", ErrNotVmlinux, err)
	}
	defer f.Close()

	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("verify vmlinux: class %v %v, want 64-bit little-endian: %w", f.Class, f.Data, ErrNotVmlinux)
	}
	if f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("verify vmlinux: machine %v, want EM_X86_64: %w", f.Machine, ErrNotVmlinux)
	}
	if f.Type != elf.ET_EXEC {
		return nil, fmt.Errorf("verify vmlinux: type %v, want ET_EXEC: %w", f.Type, ErrNotVmlinux)
	}

	info := &VmlinuxInfo{Entry: f.Entry}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		// A note segment larger than this is not a kernel's note segment.
		if p.Filesz > 1<<20 {
			continue
		}
		data := make([]byte, p.Filesz)
		if _, err := p.ReadAt(data, 0); err != nil {
			return nil, fmt.Errorf("verify vmlinux: read PT_NOTE at 0x%x: %w: %w", p.Off, ErrNotVmlinux, err)
		}
		if entry, ok := findPVHNote(data); ok {
			info.PVHEntry = entry
			info.HasPVH = true
			break
		}
	}
	if !info.HasPVH && info.Entry == 0 {
		return nil, fmt.Errorf("verify vmlinux: no PVH note and entry point is 0: %w", ErrNotVmlinux)
	}
	return info, nil
}

// findPVHNote walks the ELF notes in data, each a 12-byte header (name
// size, descriptor size, type) followed by the name and the descriptor,
// both padded to 4 bytes. It returns the entry of the first Xen note of
// type XEN_ELFNOTE_PHYS32_ENTRY.
func findPVHNote(data []byte) (uint32, bool) {
	le := binary.LittleEndian
	for len(data) >= 12 {
		nameSize := uint64(le.Uint32(data[0:]))
		descSize := uint64(le.Uint32(data[4:]))
		noteType := le.Uint32(data[8:])
		data = data[12:]

		namePadded := (nameSize + 3) &^ 3
		descPadded := (descSize + 3) &^ 3
		if namePadded+descPadded > uint64(len(data)) {
			return 0, false
		}
		name := data[:nameSize]
		desc := data[namePadded : namePadded+descSize]
		data = data[namePadded+descPadded:]

		if noteType == xenElfnotePhys32Entry && bytes.Equal(bytes.TrimRight(name, "\x00"), []byte("Xen")) && len(desc) >= 4 {
			return le.Uint32(desc), true
		}
	}
	return 0, false
}

// linuxBanner matches the version banner that every kernel image carries,
// "Linux version 6.1.0-57-cloud-amd64 (...)".
var linuxBanner = regexp.MustCompile(`Linux version ([0-9][^\s\x00]{0,127})`)

// kernelReleaseFromImage returns the kernel release from the version
// banner inside an uncompressed kernel image, or "" when it has none.
func kernelReleaseFromImage(b []byte) string {
	m := linuxBanner.FindSubmatch(b)
	if m == nil {
		return ""
	}
	return string(m[1])
}
