package image

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
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
	if standInDir != "" {
		os.RemoveAll(standInDir)
	}
	cleanupDebianKernel()
	os.Exit(code)
}

// requireTools skips the test unless every named program is in $PATH.
func requireTools(t *testing.T, hint string, names ...string) {
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
