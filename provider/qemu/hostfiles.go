package qemu

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/embervm/ember/vm"
)

// checkHostFiles checks the files a cold boot reads before QEMU starts, so
// that a missing or wrong file is reported as a validation problem naming
// the field instead of as a QEMU exit message.
func checkHostFiles(m *machine, cfg *vm.Config) error {
	var problems []vm.FieldError
	add := func(field, problem string) {
		problems = append(problems, vm.FieldError{Field: field, Problem: problem})
	}

	if err := checkPVHKernel(m.Kernel); err != nil {
		add("kernel", err.Error())
	}
	if m.Initrd != "" {
		if err := checkRegularFile(m.Initrd); err != nil {
			add("initrd", err.Error())
		}
	}
	extra := 0
	for _, d := range m.Drives {
		field := "rootfs"
		if d.ID != vm.RootDriveID {
			field = fmt.Sprintf("extra_drives[%d].path_on_host", extra)
			extra++
		}
		if err := checkDriveFile(d.Path); err != nil {
			add(field, err.Error())
		}
	}
	for i, n := range m.NICs {
		if len(n.TAP) > vm.MaxTAPNameLength {
			add(fmt.Sprintf("network_interfaces[%d].host_dev_name", i), fmt.Sprintf("%q is longer than %d bytes", n.TAP, vm.MaxTAPNameLength))
		}
	}
	if len(problems) > 0 {
		return &vm.ValidationError{Problems: problems}
	}
	return nil
}

func checkRegularFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return describeStatError(path, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is a %s, must be a regular file", path, fileKind(st.Mode()))
	}
	return nil
}

// checkDriveFile accepts a regular file or a block device.
func checkDriveFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return describeStatError(path, err)
	}
	if !st.Mode().IsRegular() && st.Mode()&fs.ModeDevice == 0 {
		return fmt.Errorf("%s is a %s, must be a regular file or a block device", path, fileKind(st.Mode()))
	}
	if st.Mode()&fs.ModeCharDevice != 0 {
		return fmt.Errorf("%s is a character device, must be a regular file or a block device", path)
	}
	return nil
}

func describeStatError(path string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s does not exist", path)
	}
	return err
}

func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeSymlink != 0:
		return "symbolic link"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	}
	return "special file"
}

// xenELFNotePhys32Entry is the ELF note type (XEN_ELFNOTE_PHYS32_ENTRY, in
// the "Xen" namespace) that holds a kernel's 32-bit PVH entry point. QEMU's
// microvm machine boots an uncompressed ELF kernel only through it.
const xenELFNotePhys32Entry = 18

// checkPVHKernel checks that path is an x86-64 ELF kernel with a PVH entry
// point note. A bzImage, a truncated file or a kernel built without
// CONFIG_PVH fails here.
func checkPVHKernel(path string) error {
	if err := checkRegularFile(path); err != nil {
		return err
	}
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s is not an ELF vmlinux: %w", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("%s is an ELF file for %s, must be x86-64", path, f.Machine)
	}
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_NOTE {
			continue
		}
		data := make([]byte, prog.Filesz)
		if _, err := prog.ReadAt(data, 0); err != nil {
			return fmt.Errorf("%s: read ELF notes: %w (is the file truncated?)", path, err)
		}
		if hasNote(data, "Xen", xenELFNotePhys32Entry) {
			return nil
		}
	}
	return fmt.Errorf("%s has no PVH entry point note, build the kernel with CONFIG_PVH=y", path)
}

// hasNote reports whether the ELF note section data contains a note with
// the given name and type.
func hasNote(data []byte, name string, typ uint32) bool {
	for len(data) >= 12 {
		nameSize := binary.LittleEndian.Uint32(data[0:])
		descSize := binary.LittleEndian.Uint32(data[4:])
		noteType := binary.LittleEndian.Uint32(data[8:])
		data = data[12:]
		nameEnd := align4(uint64(nameSize))
		descEnd := nameEnd + align4(uint64(descSize))
		if descEnd > uint64(len(data)) {
			return false
		}
		noteName := data[:nameSize]
		if len(noteName) > 0 && noteName[len(noteName)-1] == 0 {
			noteName = noteName[:len(noteName)-1]
		}
		if noteType == typ && string(noteName) == name {
			return true
		}
		data = data[descEnd:]
	}
	return false
}

func align4(n uint64) uint64 { return (n + 3) &^ 3 }
