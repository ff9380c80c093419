package uffd

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestParseRegions(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []Region
		wantErr bool
	}{
		{name: "page size in bytes", in: `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]`,
			want: []Region{{BaseHostVirtAddr: 4096, Size: 8192, PageSize: 4096}}},
		{name: "page size in KiB", in: `[{"base_host_virt_addr":8192,"size":4096,"offset":4096,"page_size_kib":4}]`,
			want: []Region{{BaseHostVirtAddr: 8192, Size: 4096, Offset: 4096, PageSize: 4096, PageSizeKiB: 4}}},
		{name: "empty list", in: `[]`, wantErr: true},
		{name: "not json", in: `{`, wantErr: true},
		{name: "no page size", in: `[{"base_host_virt_addr":4096,"size":4096,"offset":0}]`, wantErr: true},
		{name: "page size not power of two", in: `[{"base_host_virt_addr":0,"size":3000,"offset":0,"page_size":3000}]`, wantErr: true},
		{name: "unaligned base", in: `[{"base_host_virt_addr":100,"size":4096,"offset":0,"page_size":4096}]`, wantErr: true},
		{name: "size not a page multiple", in: `[{"base_host_virt_addr":0,"size":100,"offset":0,"page_size":4096}]`, wantErr: true},
		{name: "overlap", in: `[{"base_host_virt_addr":0,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]`, wantErr: true},
		{name: "overflow", in: `[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseRegions([]byte(tt.in))
			if tt.wantErr {
				if !errors.Is(err, ErrBadRegions) {
					t.Fatalf("error = %v, want ErrBadRegions", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) || got[0] != tt.want[0] {
				t.Errorf("regions = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func FuzzParseRegions(f *testing.F) {
	f.Add([]byte(`[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]`))
	f.Add([]byte(`[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size_kib":4}]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		regions, err := ParseRegions(data)
		if err != nil {
			if !errors.Is(err, ErrBadRegions) {
				t.Fatalf("error %v does not match ErrBadRegions", err)
			}
			return
		}
		for _, r := range regions {
			if r.PageSize == 0 || r.Size%r.PageSize != 0 || r.BaseHostVirtAddr%r.PageSize != 0 {
				t.Fatalf("accepted bad region %+v", r)
			}
		}
	})
}

// faultingMemory plays Firecracker's part: a registered anonymous mapping
// whose userfaultfd is sent to the handler.
type faultingMemory struct {
	fd  int
	mem []byte
}

func newFaultingMemory(t *testing.T, size int) *faultingMemory {
	t.Helper()
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		t.Skipf("userfaultfd(2) failed with %v: run as root or set vm.unprivileged_userfaultfd=1", errno)
	}
	api := struct{ api, features, ioctls uint64 }{api: uffdAPI, features: 1 << 3}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, ioctlAPI, uintptr(unsafe.Pointer(&api))); errno != 0 {
		unix.Close(int(fd))
		t.Skipf("UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE failed: %v", errno)
	}
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	reg := struct{ start, len, mode, ioctls uint64 }{start: uint64(uintptr(unsafe.Pointer(&mem[0]))), len: uint64(size), mode: registerMissing}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, ioctlRegister, uintptr(unsafe.Pointer(&reg))); errno != 0 {
		t.Fatalf("UFFDIO_REGISTER: %v", errno)
	}
	fm := &faultingMemory{fd: int(fd), mem: mem}
	t.Cleanup(func() {
		unix.Munmap(mem)
		unix.Close(int(fd))
	})
	return fm
}

func (fm *faultingMemory) send(t *testing.T, socketPath string, regionJSON []byte) {
	t.Helper()
	conn, err := net.Dial("unix", socketPath)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, _, err := conn.(*net.UnixConn).WriteMsgUnix(regionJSON, unix.UnixRights(fm.fd), nil); err != nil {
		t.Fatal(err)
	}
}

// readPage reads a page of the registered memory on another goroutine and
// fails the test when the handler does not serve the fault.
func (fm *faultingMemory) readPage(t *testing.T, idx int) []byte {
	t.Helper()
	ps := os.Getpagesize()
	got := make(chan []byte, 1)
	go func() {
		out := make([]byte, ps)
		copy(out, fm.mem[idx*ps:(idx+1)*ps])
		got <- out
	}()
	select {
	case out := <-got:
		return out
	case <-time.After(10 * time.Second):
		t.Fatalf("page %d was not served", idx)
		return nil
	}
}

func TestHandlerServesFaults(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2)
	}
	ps := os.Getpagesize()
	dir := t.TempDir()
	memPath := filepath.Join(dir, "memory")
	f, err := os.Create(memPath)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(int64(8 * ps))
	f.WriteAt(bytes.Repeat([]byte{'A'}, ps), 0)
	f.WriteAt(bytes.Repeat([]byte{'C'}, ps), int64(3*ps))
	f.Close()

	fm := newFaultingMemory(t, 8*ps)
	socketPath := filepath.Join(dir, "uffd.sock")
	h, err := Listen(socketPath, memPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	region, _ := json.Marshal([]Region{{BaseHostVirtAddr: uint64(uintptr(unsafe.Pointer(&fm.mem[0]))), Size: uint64(8 * ps), PageSize: uint64(ps)}})
	fm.send(t, socketPath, region)

	if got := fm.readPage(t, 0); !bytes.Equal(got, bytes.Repeat([]byte{'A'}, ps)) {
		t.Errorf("page 0 = %q..., want the file's data", got[:8])
	}
	if got := fm.readPage(t, 1); !bytes.Equal(got, make([]byte, ps)) {
		t.Errorf("page 1 (a hole) = %q..., want zeroes", got[:8])
	}
	if got := fm.readPage(t, 3); got[0] != 'C' {
		t.Errorf("page 3 = %q..., want 'C'", got[:8])
	}

	// A removed page is served as zeroes on its next fault.
	if err := unix.Madvise(fm.mem[0:ps], unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	var after []byte
	for time.Now().Before(deadline) {
		if after = fm.readPage(t, 0); after[0] == 0 {
			break
		}
		// The remove event may be handled after the next fault; discard
		// the page again and retry.
		unix.Madvise(fm.mem[0:ps], unix.MADV_DONTNEED)
	}
	if after[0] != 0 {
		t.Errorf("page 0 after MADV_DONTNEED = %q, want zeroes", after[0])
	}
	if got := h.Faults(); got < 3 {
		t.Errorf("Faults() = %d, want at least 3", got)
	}
	if err := h.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if _, err := os.Stat(socketPath); !os.IsNotExist(err) {
		t.Errorf("socket %s left behind", socketPath)
	}
}

func TestHandlerRejectsBadHandshake(t *testing.T) {
	dir := t.TempDir()
	memPath := filepath.Join(dir, "memory")
	os.WriteFile(memPath, make([]byte, 4096), 0o600)

	if _, err := Listen(filepath.Join(dir, "a.sock"), filepath.Join(dir, "missing"), nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Listen with a missing memory file: %v", err)
	}

	socketPath := filepath.Join(dir, "uffd.sock")
	h, err := Listen(socketPath, memPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", socketPath)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte(`[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096}]`))
	conn.Close()
	// The message has no file descriptor, so the handler stops with an
	// error.
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		t.Fatal("handler did not stop after a bad handshake")
	}
	if err := h.Close(); err == nil {
		t.Errorf("Close after a bad handshake returned nil")
	}
}

func TestHandlerCloseBeforeConnect(t *testing.T) {
	dir := t.TempDir()
	memPath := filepath.Join(dir, "memory")
	os.WriteFile(memPath, make([]byte, 4096), 0o600)
	socketPath := filepath.Join(dir, "uffd.sock")
	h, err := Listen(socketPath, memPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := os.Stat(socketPath); !os.IsNotExist(err) {
		t.Errorf("socket left behind")
	}
}
