package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// VirtioPortName is the name of the virtio-serial port that QEMU gives the
// agent.
const VirtioPortName = "ember.agent"

// VsockListener accepts vsock connections through the Go runtime's poller,
// so Close interrupts a pending Accept.
type VsockListener struct {
	f *os.File
}

// ListenVsock listens on a vsock port for connections from any CID, which
// is how the host reaches the guest through Firecracker.
func ListenVsock(port uint32) (*VsockListener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("listen vsock port %d: socket: %w", port, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("listen vsock port %d: bind: %w", port, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("listen vsock port %d: %w", port, err)
	}
	return &VsockListener{f: os.NewFile(uintptr(fd), fmt.Sprintf("vsock:%d", port))}, nil
}

// Accept waits for the next connection.
func (l *VsockListener) Accept() (io.ReadWriteCloser, error) {
	rc, err := l.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var acceptErr error
	err = rc.Read(func(fd uintptr) bool {
		nfd, _, acceptErr = unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		return !errors.Is(acceptErr, unix.EAGAIN)
	})
	if err != nil {
		return nil, err
	}
	if acceptErr != nil {
		return nil, acceptErr
	}
	// A non-blocking descriptor in an os.File uses the poller as well.
	return os.NewFile(uintptr(nfd), "vsock-conn"), nil
}

// Close stops the listener.
func (l *VsockListener) Close() error { return l.f.Close() }

// ServeVsock serves every connection on the vsock listener until ctx ends.
func (s *Server) ServeVsock(ctx context.Context, l *VsockListener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept vsock connection: %w", err)
		}
		go func() {
			if err := s.ServeConn(ctx, conn); err != nil {
				s.logger.Warn("vsock connection ended with an error", "err", err)
			}
		}()
	}
}

// FindVirtioPort returns the device path of the virtio-serial port with the
// given name, from the names in sysfsRoot/class/virtio-ports/*/name. Without
// udev there is no /dev/virtio-ports/<name> link, so sysfs is the only
// source.
func FindVirtioPort(sysfsRoot, name string) (string, error) {
	matches, err := filepath.Glob(filepath.Join(sysfsRoot, "class/virtio-ports/*/name"))
	if err != nil {
		return "", err
	}
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(filepath.Dir(m)), nil
		}
	}
	return "", fmt.Errorf("virtio-serial port %q: %w", name, os.ErrNotExist)
}

// disconnectedPoll is how often the agent checks a virtio-serial port whose
// host end is not connected. The driver returns EOF at once in that state
// rather than blocking, so a read cannot wait for the host.
const disconnectedPoll = 50 * time.Millisecond

// hostWaiter waits for the host end of an open virtio-serial port to
// connect.
//
// Linux's virtio console driver reports EPOLLHUP for a port whose host end
// is closed and wakes the port's pollers when the host opens it, so an
// edge-triggered epoll wait for EPOLLOUT returns as soon as the host
// connects. The port is registered once per open file. The first report
// is the state at registration, a hangup, and is skipped like every
// hangup. With poll set, or after an epoll call failed, a wait is a plain
// sleep.
type hostWaiter struct {
	// epfd is the epoll instance the port is registered with, or -1.
	epfd int
}

func newHostWaiter(f *os.File, poll bool) *hostWaiter {
	w := &hostWaiter{epfd: -1}
	if poll {
		return w
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return w
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return w
	}
	var ctlErr error
	err = raw.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: unix.EPOLLOUT | unix.EPOLLET, Fd: int32(fd)}
		ctlErr = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err != nil || ctlErr != nil {
		unix.Close(epfd)
		return w
	}
	w.epfd = epfd
	return w
}

// wait returns when the host may have connected, when ctx ends, or after
// disconnectedPoll at the latest.
func (w *hostWaiter) wait(ctx context.Context) {
	if w.epfd >= 0 {
		if err := w.epollWait(ctx); err == nil {
			return
		}
		w.close()
	}
	select {
	case <-ctx.Done():
	case <-time.After(disconnectedPoll):
	}
}

func (w *hostWaiter) epollWait(ctx context.Context) error {
	deadline := time.Now().Add(disconnectedPoll)
	events := make([]unix.EpollEvent, 1)
	for ctx.Err() == nil {
		ms := time.Until(deadline).Milliseconds()
		if ms <= 0 {
			return nil
		}
		n, err := unix.EpollWait(w.epfd, events, int(ms))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n > 0 && events[0].Events&unix.EPOLLHUP == 0 {
			return nil
		}
	}
	return nil
}

// close releases the epoll instance. It accepts a nil waiter.
func (w *hostWaiter) close() {
	if w != nil && w.epfd >= 0 {
		unix.Close(w.epfd)
		w.epfd = -1
	}
}

// ServeVirtioPort serves the protocol over the virtio-serial device at path
// until ctx ends. The port is one byte stream for all host connections:
// when the host disconnects, reads return EOF, so the agent ends the
// session, reopens the port and waits for the next byte. While it waits,
// the port stays open: closing it discards what the host has already
// sent, such as the hello of a client that connected a moment before.
func (s *Server) ServeVirtioPort(ctx context.Context, path string) error {
	for ctx.Err() == nil {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open virtio-serial port %s: %w", path, err)
		}
		first := make([]byte, 1)
		n, err := f.Read(first)
		var waiter *hostWaiter
		for n == 0 && ctx.Err() == nil {
			if err != nil && !errors.Is(err, io.EOF) {
				waiter.close()
				f.Close()
				return fmt.Errorf("read virtio-serial port %s: %w", path, err)
			}
			if waiter == nil {
				waiter = newHostWaiter(f, s.cfg.PollVirtioPort)
			}
			waiter.wait(ctx)
			n, err = f.Read(first)
		}
		waiter.close()
		if n == 0 {
			f.Close()
			break
		}
		s.logger.Info("host connected on virtio-serial port", "port", path)
		conn := &prefixedConn{prefix: first[:n], File: f}
		if err := s.ServeConn(ctx, conn); err != nil {
			s.logger.Warn("virtio-serial session ended with an error", "port", path, "err", err)
		}
	}
	return nil
}

// prefixedConn returns an already read prefix before the file's bytes.
type prefixedConn struct {
	prefix []byte
	*os.File
}

func (c *prefixedConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.File.Read(p)
}
