package fcemu

import (
	"encoding/json"
	"fmt"
	"net"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// uffdFaultTimeout bounds how long the emulator waits for the handler to
// serve its first pages.
const uffdFaultTimeout = 10 * time.Second

// uffdMemory is guest memory served by a userfaultfd handler: the
// registered mapping and the userfaultfd, kept for the emulated process's
// life as Firecracker keeps them.
type uffdMemory struct {
	fd  int
	mem []byte
}

func (m *uffdMemory) release() {
	unix.Munmap(m.mem)
	unix.Close(m.fd)
}

// readMemoryUffd does what Firecracker does with the Uffd backend: it maps
// anonymous guest memory, registers it with a new userfaultfd, sends the
// region list and the userfaultfd to the handler listening at socketPath,
// and then reads the first two pages, which page faults make the handler
// fill.
func (s *Server) readMemoryUffd(socketPath string, memSize int64) ([]byte, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		return nil, fmt.Errorf("userfaultfd: %v", errno)
	}
	um := &uffdMemory{fd: int(fd)}
	ok := false
	defer func() {
		if !ok {
			if um.mem != nil {
				unix.Munmap(um.mem)
			}
			unix.Close(um.fd)
		}
	}()

	api := struct{ api, features, ioctls uint64 }{api: 0xAA, features: 1 << 3} // UFFD_FEATURE_EVENT_REMOVE
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, 0xC018AA3F, uintptr(unsafe.Pointer(&api))); errno != 0 {
		return nil, fmt.Errorf("UFFDIO_API: %v", errno)
	}
	mem, err := unix.Mmap(-1, 0, int(memSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map guest memory: %v", err)
	}
	um.mem = mem
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	reg := struct{ start, len, mode, ioctls uint64 }{start: base, len: uint64(memSize), mode: 1}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, 0xC020AA00, uintptr(unsafe.Pointer(&reg))); errno != 0 {
		return nil, fmt.Errorf("UFFDIO_REGISTER: %v", errno)
	}

	region := map[string]uint64{"base_host_virt_addr": base, "size": uint64(memSize), "offset": 0}
	// NOTE: Firecracker 1.7 sends page_size_kib and later releases send
	// page_size in bytes; the release that switched was not checked, so the
	// emulator switches at 1.12.
	if s.opts.Version.Minor >= 12 || s.opts.Version.Major > 1 {
		region["page_size"] = pageSize
	} else {
		region["page_size_kib"] = pageSize / 1024
	}
	msg, _ := json.Marshal([]map[string]uint64{region})
	conn, err := net.DialTimeout("unix", socketPath, time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to the uffd handler: %v", err)
	}
	_, _, err = conn.(*net.UnixConn).WriteMsgUnix(msg, unix.UnixRights(int(fd)), nil)
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("send the userfaultfd: %v", err)
	}

	// Touching the pages blocks until the handler serves the faults, so
	// read them on another goroutine and give up after a deadline.
	pages := make(chan []byte, 1)
	go func() {
		out := make([]byte, 2*pageSize)
		copy(out, mem[:2*pageSize])
		pages <- out
	}()
	select {
	case out := <-pages:
		ok = true
		s.uffd = um
		return out, nil
	case <-time.After(uffdFaultTimeout):
		// The reading goroutine stays blocked, so the mapping must stay.
		ok = true
		return nil, fmt.Errorf("the uffd handler did not serve a page fault within %s", uffdFaultTimeout)
	}
}
