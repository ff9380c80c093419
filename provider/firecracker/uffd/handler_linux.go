package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/provider/firecracker/memfile"
)

// userfaultfd ioctls and events from linux/userfaultfd.h (x86-64 and arm64
// share these values).
const (
	uffdAPI         = 0xAA
	ioctlAPI        = 0xC018AA3F // _IOWR(0xAA, 0x3F, struct uffdio_api)
	ioctlRegister   = 0xC020AA00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	ioctlCopy       = 0xC028AA03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	ioctlZeropage   = 0xC020AA04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	registerMissing = 1
	eventPagefault  = 0x12
	eventRemove     = 0x15
	msgSize         = 32 // sizeof(struct uffd_msg)
)

type uffdioCopy struct {
	dst, src, len, mode uint64
	copied              int64
}

type uffdioZeropage struct {
	start, len, mode uint64
	zeropage         int64
}

// Handler serves the guest memory of one restored VM. Create it with
// [Listen] before sending /snapshot/load, and Close it when the VM is
// destroyed.
type Handler struct {
	socketPath string
	memPath    string
	listener   *net.UnixListener
	log        *slog.Logger
	// stopR and stopW are a pipe that wakes the serve loop to stop.
	stopR, stopW *os.File
	done         chan struct{}
	closing      atomic.Bool

	mu sync.Mutex
	// err is the error that ended the serve loop, if any.
	err error
	// regions is set once Firecracker has connected.
	regions []Region
	faults  uint64
}

// Listen binds a Unix socket at socketPath and serves, in the background,
// the first Firecracker process that connects, from the memory file at
// memPath. A nil logger discards log output.
func Listen(socketPath, memPath string, logger *slog.Logger) (*Handler, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat(memPath); err != nil {
		return nil, fmt.Errorf("start uffd handler on %s: %w", socketPath, err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("start uffd handler on %s: %w", socketPath, err)
	}
	stopR, stopW, err := os.Pipe()
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("start uffd handler on %s: %w", socketPath, err)
	}
	h := &Handler{
		socketPath: socketPath, memPath: memPath, listener: ln, log: logger,
		stopR: stopR, stopW: stopW, done: make(chan struct{}),
	}
	go h.run()
	return h, nil
}

// Close stops serving, closes the userfaultfd and the memory file, and
// removes the socket. It is safe to call more than once. A Firecracker
// process whose memory is still unpopulated blocks on its next page fault
// after Close, so stop the VM first.
func (h *Handler) Close() error {
	select {
	case <-h.done:
	default:
		h.closing.Store(true)
		h.stopW.Close()
		h.listener.Close()
		<-h.done
	}
	os.Remove(h.socketPath)
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// Regions returns the regions Firecracker sent, or nil before it connected.
func (h *Handler) Regions() []Region {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Region(nil), h.regions...)
}

// Faults returns the number of page faults served.
func (h *Handler) Faults() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.faults
}

func (h *Handler) setErr(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == nil {
		h.err = err
	}
}

func (h *Handler) run() {
	defer close(h.done)
	defer h.stopR.Close()

	conn, err := h.listener.AcceptUnix()
	h.listener.Close()
	if err != nil {
		if !h.closing.Load() {
			h.setErr(fmt.Errorf("uffd handler %s: accept: %w", h.socketPath, err))
		}
		return
	}
	regions, uffd, err := receive(conn)
	conn.Close()
	if err != nil {
		h.setErr(fmt.Errorf("uffd handler %s: %w", h.socketPath, err))
		return
	}
	defer unix.Close(uffd)
	h.mu.Lock()
	h.regions = regions
	h.mu.Unlock()

	if err := h.serve(uffd, regions); err != nil {
		h.setErr(fmt.Errorf("uffd handler %s: %w", h.socketPath, err))
	}
}

// receive reads Firecracker's one message: the region list with the
// userfaultfd attached.
func receive(conn *net.UnixConn) ([]Region, int, error) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, -1, fmt.Errorf("receive regions: %w", err)
	}
	fds, err := parseRights(oob[:oobn])
	if err != nil {
		return nil, -1, err
	}
	if len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, -1, fmt.Errorf("receive regions: got %d file descriptors, want 1", len(fds))
	}
	regions, err := ParseRegions(buf[:n])
	if err != nil {
		unix.Close(fds[0])
		return nil, -1, err
	}
	return regions, fds[0], nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("receive regions: parse control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// serve answers userfaultfd events until Close or until Firecracker closes
// its end of the userfaultfd.
func (h *Handler) serve(uffd int, regions []Region) error {
	mem, err := os.Open(h.memPath)
	if err != nil {
		return err
	}
	defer mem.Close()
	fi, err := mem.Stat()
	if err != nil {
		return err
	}
	extents, err := memfile.DataExtents(mem)
	if err != nil {
		return err
	}
	var data []byte
	if fi.Size() > 0 {
		data, err = unix.Mmap(int(mem.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_PRIVATE)
		if err != nil {
			return fmt.Errorf("map memory file %s: %w", h.memPath, err)
		}
		defer unix.Munmap(data)
	}
	pageSize := uint64(os.Getpagesize())
	srv := &server{uffd: uffd, data: data, extents: extents, regions: regions, basePage: pageSize}

	msgs := make([]byte, msgSize*16)
	fds := []unix.PollFd{
		{Fd: int32(uffd), Events: unix.POLLIN},
		{Fd: int32(h.stopR.Fd()), Events: unix.POLLIN},
	}
	for {
		fds[0].Revents, fds[1].Revents = 0, 0
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			return fmt.Errorf("poll: %w", err)
		}
		if fds[1].Revents != 0 {
			return nil // Close was called
		}
		if fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0 && fds[0].Revents&unix.POLLIN == 0 {
			return nil // Firecracker exited
		}
		n, err := unix.Read(uffd, msgs)
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read events: %w", err)
		}
		if n == 0 {
			return nil
		}
		for off := 0; off+msgSize <= n; off += msgSize {
			if err := srv.handle(msgs[off : off+msgSize]); err != nil {
				return err
			}
			h.mu.Lock()
			h.faults = srv.faults
			h.mu.Unlock()
		}
	}
}

// server holds what the serve loop needs to answer one event.
type server struct {
	uffd     int
	data     []byte
	extents  []memfile.Extent
	regions  []Region
	basePage uint64
	// removed lists address ranges the guest discarded; their next fault
	// gets a zero page.
	removed []addrRange
	faults  uint64
	zeroBuf []byte
}

type addrRange struct{ start, end uint64 }

func (s *server) handle(msg []byte) error {
	event := msg[0]
	arg := msg[8:]
	switch event {
	case eventPagefault:
		addr := binary.LittleEndian.Uint64(arg[8:16])
		return s.fault(addr)
	case eventRemove:
		start := binary.LittleEndian.Uint64(arg[0:8])
		end := binary.LittleEndian.Uint64(arg[8:16])
		s.removed = append(s.removed, addrRange{start, end})
		return nil
	default:
		// Fork, remap and unmap events do not change what a fault needs.
		return nil
	}
}

func (s *server) fault(addr uint64) error {
	r, ok := find(s.regions, addr)
	if !ok {
		return fmt.Errorf("page fault at %#x outside every region", addr)
	}
	s.faults++
	page := addr &^ (r.PageSize - 1)
	fileOff := r.Offset + (page - r.BaseHostVirtAddr)

	if s.isRemoved(page) || !s.hasData(int64(fileOff), int64(r.PageSize)) || fileOff+r.PageSize > uint64(len(s.data)) {
		return s.zero(page, r.PageSize)
	}
	c := uffdioCopy{dst: page, src: uint64(uintptr(unsafe.Pointer(&s.data[fileOff]))), len: r.PageSize}
	return s.ioctl(ioctlCopy, unsafe.Pointer(&c), page)
}

func (s *server) zero(page, size uint64) error {
	if size != s.basePage {
		// UFFDIO_ZEROPAGE does not support huge pages, so copy zeroes.
		if uint64(len(s.zeroBuf)) < size {
			s.zeroBuf = make([]byte, size)
		}
		c := uffdioCopy{dst: page, src: uint64(uintptr(unsafe.Pointer(&s.zeroBuf[0]))), len: size}
		return s.ioctl(ioctlCopy, unsafe.Pointer(&c), page)
	}
	z := uffdioZeropage{start: page, len: size}
	return s.ioctl(ioctlZeropage, unsafe.Pointer(&z), page)
}

// ioctl runs a populate ioctl. EEXIST means another fault already populated
// the page, and EAGAIN means the mapping changed under us so the fault will
// be raised again; neither is an error.
func (s *server) ioctl(req uintptr, arg unsafe.Pointer, page uint64) error {
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(s.uffd), req, uintptr(arg))
		switch errno {
		case 0, syscall.EEXIST, syscall.EAGAIN:
			return nil
		case syscall.EINTR:
			continue
		case syscall.ENOENT, syscall.ESRCH:
			// The faulting process is gone.
			return nil
		default:
			return fmt.Errorf("populate page %#x: %w", page, errno)
		}
	}
}

func (s *server) isRemoved(page uint64) bool {
	for _, r := range s.removed {
		if page >= r.start && page < r.end {
			return true
		}
	}
	return false
}

// hasData reports whether any byte of [off, off+n) lies in a data extent.
func (s *server) hasData(off, n int64) bool {
	i := sort.Search(len(s.extents), func(i int) bool { return s.extents[i].End() > off })
	return i < len(s.extents) && s.extents[i].Offset < off+n
}
