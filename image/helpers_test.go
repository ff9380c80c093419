package image

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
	"go.uber.org/goleak"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// standInAgentSource is a stand-in for ember-agent, used until tests can
// build the real one: as PID 1 it prints a marker line, the module list and
// the kernel command line, then powers the machine off.
const standInAgentSource = `package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"unsafe"
)

// sysFinitModule is finit_module's system call number on x86_64.
const sysFinitModule = 313

// finitModule loads a kernel module from an open file, like insmod.
func finitModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	empty := []byte{0}
	_, _, errno := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&empty[0])), 0)
	if errno != 0 && errno != syscall.EEXIST {
		return errno
	}
	return nil
}

func main() {
	fmt.Println("EMBER-STANDIN-INIT pid", os.Getpid())
	b, err := os.ReadFile("/etc/ember/modules")
	if err != nil {
		fmt.Println("EMBER-STANDIN-ERROR", err)
	}
	loaded := 0
	list := strings.Fields(string(b))
	for _, p := range list {
		if err := finitModule(p); err != nil {
			fmt.Println("EMBER-STANDIN-ERROR load", p, err)
			continue
		}
		loaded++
	}
	fmt.Printf("EMBER-STANDIN-MODULES loaded %d of %d\n", loaded, len(list))

	// With a root disk attached, mount it the way the agent's switchroot
	// mode does and read a file from it.
	if err := syscall.Mount("devtmpfs", "/dev", "devtmpfs", 0, ""); err != nil {
		fmt.Println("EMBER-STANDIN-ERROR mount devtmpfs", err)
	}
	if _, err := os.Stat("/dev/vda"); err == nil {
		if err := syscall.Mount("/dev/vda", "/newroot", "ext4", syscall.MS_RDONLY, ""); err != nil {
			fmt.Println("EMBER-STANDIN-ERROR mount /dev/vda", err)
		} else if h, err := os.ReadFile("/newroot/etc/hostname"); err != nil {
			fmt.Println("EMBER-STANDIN-ERROR", err)
		} else {
			fmt.Println("EMBER-STANDIN-ROOTFS hostname", strings.TrimSpace(string(h)))
		}
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
`

var (
	standInOnce sync.Once
	standInPath string
	standInErr  error
	standInDir  string
)

// standInAgent returns the path of a static stand-in agent binary, built
// once per test binary with CGO_ENABLED=0.
func standInAgent(t *testing.T) string {
	t.Helper()
	requireTools(t, "the stand-in agent is built with the go tool", "go")
	standInOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ember-image-standin-")
		if err != nil {
			standInErr = err
			return
		}
		standInDir = dir
		if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(standInAgentSource), 0o644); err != nil {
			standInErr = err
			return
		}
		if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module standin\n\ngo 1.22\n"), 0o644); err != nil {
			standInErr = err
			return
		}
		out := filepath.Join(dir, "ember-agent-standin")
		cmd := exec.Command("go", "build", "-trimpath", "-o", out, ".")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod")
		if b, err := cmd.CombinedOutput(); err != nil {
			standInErr = &buildError{out: string(b), err: err}
			return
		}
		standInPath = out
	})
	if standInErr != nil {
		t.Fatalf("build the stand-in agent: %v", standInErr)
	}
	return standInPath
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

func TestMain(m *testing.M) {
	code := m.Run()
	// Decompressors, the download poller and QEMU waiters must all have
	// stopped by now.
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines leaked: %v\n", err)
			code = 1
		}
	}
	if standInDir != "" {
		os.RemoveAll(standInDir)
	}
	cleanupDebianKernel()
	os.Exit(code)
}

// requireTools skips the test unless every named program is in $PATH.
func requireTools(t testing.TB, hint string, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("%s not found in $PATH: %s", n, hint)
		}
	}
}

// readInitramfs returns the records of a gzip-compressed newc archive by
// name, in archive order, with their contents.
func readInitramfs(t *testing.T, data []byte) ([]cpio.Record, map[string][]byte) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("gunzip initramfs: %v", err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzip initramfs: %v", err)
	}
	records, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(raw)))
	if err != nil {
		t.Fatalf("read cpio: %v", err)
	}
	contents := make(map[string][]byte)
	for _, r := range records {
		var b []byte
		if r.ReaderAt != nil && r.FileSize > 0 {
			b = make([]byte, r.FileSize)
			if _, err := r.ReadAt(b, 0); err != nil && err != io.EOF {
				t.Fatalf("read %s: %v", r.Name, err)
			}
		}
		contents[r.Name] = b
	}
	return records, contents
}

// checkInitramfsModules checks that the initramfs file lists every module
// of the manifest in order and stores each listed module as an ELF file.
func checkInitramfsModules(t *testing.T, path string, m *Manifest) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, contents := readInitramfs(t, data)
	list := strings.Fields(string(contents["etc/ember/modules"]))
	if len(list) != len(m.Modules) {
		t.Fatalf("module list has %d entries, manifest %d: %v", len(list), len(m.Modules), list)
	}
	for i, p := range list {
		if ModuleName(p) != m.Modules[i] {
			t.Errorf("module list entry %d is %s, manifest says %s", i, p, m.Modules[i])
		}
		want := "/lib/modules/" + m.KernelRelease + "/"
		if !strings.HasPrefix(p, want) {
			t.Errorf("module path %s is not under %s", p, want)
		}
		ko, ok := contents[strings.TrimPrefix(p, "/")]
		if !ok {
			t.Errorf("listed module %s is not in the archive", p)
			continue
		}
		if !bytes.HasPrefix(ko, []byte("\x7fELF")) {
			t.Errorf("module %s is not an uncompressed ELF file", p)
		}
	}
}

// elfSpec describes a small ELF64 file for tests.
type elfSpec struct {
	class   elf.Class
	machine elf.Machine
	typ     elf.Type
	entry   uint64
	// notes become one PT_NOTE segment.
	notes []elfNote
	// sections are named sections with contents, such as ".modinfo".
	sections []elfSection
}

type elfNote struct {
	name string
	typ  uint32
	desc []byte
}

type elfSection struct {
	name string
	data []byte
}

// pvhNote returns the Xen note that carries a PVH entry point.
func pvhNote(entry uint32) elfNote {
	desc := make([]byte, 4)
	binary.LittleEndian.PutUint32(desc, entry)
	return elfNote{name: "Xen", typ: xenElfnotePhys32Entry, desc: desc}
}

// makeELF writes the file elfSpec describes: the ELF header, one program
// header for the notes, the note data, the section contents, a section
// name table and the section headers.
func makeELF(s elfSpec) []byte {
	if s.class == 0 {
		s.class = elf.ELFCLASS64
	}
	if s.machine == 0 {
		s.machine = elf.EM_X86_64
	}
	if s.typ == 0 {
		s.typ = elf.ET_EXEC
	}
	le := binary.LittleEndian
	pad4 := func(b []byte) []byte {
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}

	var notes []byte
	for _, n := range s.notes {
		name := append([]byte(n.name), 0)
		hdr := make([]byte, 12)
		le.PutUint32(hdr[0:], uint32(len(name)))
		le.PutUint32(hdr[4:], uint32(len(n.desc)))
		le.PutUint32(hdr[8:], n.typ)
		notes = append(notes, hdr...)
		notes = append(notes, pad4(name)...)
		notes = append(notes, pad4(append([]byte(nil), n.desc...))...)
	}

	const ehSize, phSize, shSize = 64, 56, 64
	phNum := 0
	if len(notes) > 0 {
		phNum = 1
	}
	off := ehSize + phNum*phSize
	body := []byte{}
	noteOff := off
	body = append(body, notes...)

	// Section 0 is the null section; the last one is .shstrtab.
	shstr := []byte{0}
	type shdr struct {
		name, typ uint32
		off, size uint64
	}
	var shdrs []shdr
	for _, sec := range s.sections {
		nameOff := uint32(len(shstr))
		shstr = append(shstr, append([]byte(sec.name), 0)...)
		shdrs = append(shdrs, shdr{name: nameOff, typ: uint32(elf.SHT_PROGBITS), off: uint64(off + len(body)), size: uint64(len(sec.data))})
		body = append(body, sec.data...)
	}
	strNameOff := uint32(len(shstr))
	shstr = append(shstr, []byte(".shstrtab\x00")...)
	shdrs = append(shdrs, shdr{name: strNameOff, typ: uint32(elf.SHT_STRTAB), off: uint64(off + len(body)), size: uint64(len(shstr))})
	body = append(body, shstr...)
	for (off+len(body))%8 != 0 {
		body = append(body, 0)
	}
	shOff := off + len(body)
	shNum := len(shdrs) + 1

	out := make([]byte, ehSize+phNum*phSize)
	copy(out, []byte{0x7f, 'E', 'L', 'F', byte(s.class), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)})
	le.PutUint16(out[16:], uint16(s.typ))
	le.PutUint16(out[18:], uint16(s.machine))
	le.PutUint32(out[20:], uint32(elf.EV_CURRENT))
	le.PutUint64(out[24:], s.entry)
	le.PutUint64(out[32:], ehSize)        // e_phoff
	le.PutUint64(out[40:], uint64(shOff)) // e_shoff
	le.PutUint16(out[52:], ehSize)
	le.PutUint16(out[54:], phSize)
	le.PutUint16(out[56:], uint16(phNum))
	le.PutUint16(out[58:], shSize)
	le.PutUint16(out[60:], uint16(shNum))
	le.PutUint16(out[62:], uint16(shNum-1)) // e_shstrndx
	if phNum == 1 {
		ph := out[ehSize:]
		le.PutUint32(ph[0:], uint32(elf.PT_NOTE))
		le.PutUint64(ph[8:], uint64(noteOff))
		le.PutUint64(ph[32:], uint64(len(notes))) // p_filesz
		le.PutUint64(ph[40:], uint64(len(notes))) // p_memsz
		le.PutUint64(ph[48:], 4)
	}
	out = append(out, body...)
	out = append(out, make([]byte, shSize)...) // null section
	for _, h := range shdrs {
		sh := make([]byte, shSize)
		le.PutUint32(sh[0:], h.name)
		le.PutUint32(sh[4:], h.typ)
		le.PutUint64(sh[24:], h.off)
		le.PutUint64(sh[32:], h.size)
		le.PutUint64(sh[48:], 1)
		out = append(out, sh...)
	}
	return out
}

// testVmlinux returns a small x86_64 ELF executable with a PVH note and a
// version banner, standing in for a real vmlinux.
func testVmlinux(release string) []byte {
	return makeELF(elfSpec{
		entry:    0x1000000,
		notes:    []elfNote{{name: "GNU", typ: 3, desc: []byte{1, 2, 3, 4}}, pvhNote(0x1000120)},
		sections: []elfSection{{name: ".rodata", data: []byte("\x00Linux version " + release + " (test@example) #1 SMP\x00")}},
	})
}

// makeBzImage wraps a compressed payload in a minimal bzImage: a boot
// sector and setupSects sectors of setup code holding the setup header
// and a version string, then the payload at payloadOffset from the start
// of the protected-mode code.
func makeBzImage(payload []byte, version string, setupSects int, payloadOffset uint32) []byte {
	stored := setupSects
	if setupSects == 4 {
		stored = 0 // 0 means 4 in the boot protocol
	}
	pm := (setupSects + 1) * 512
	img := make([]byte, pm+int(payloadOffset)+len(payload))
	le := binary.LittleEndian
	img[offSetupSects] = byte(stored)
	le.PutUint16(img[offBootFlag:], 0xaa55)
	copy(img[offHeaderMagic:], "HdrS")
	le.PutUint16(img[offVersion:], 0x020f)
	// The version string sits after the header, inside the setup code.
	const versionAt = 0x300
	le.PutUint16(img[offKernelVersion:], versionAt-0x200)
	copy(img[versionAt:], version+"\x00")
	img[offLoadFlags] = 1
	le.PutUint16(img[offXLoadFlags:], xlfKernel64)
	le.PutUint32(img[offPayloadOffset:], payloadOffset)
	le.PutUint32(img[offPayloadLength:], uint32(len(payload)))
	le.PutUint32(img[offInitSize:], 0x2000000)
	copy(img[pm+int(payloadOffset):], payload)
	return img
}
