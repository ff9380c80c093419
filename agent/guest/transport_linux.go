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
// rather than blocking, so there is nothing to wait on.
const disconnectedPoll = 50 * time.Millisecond

// ServeVirtioPort serves the protocol over the virtio-serial device at path
// until ctx ends. The port is one byte stream for all host connections: when
// the host disconnects, reads return EOF, so the agent ends the session,
// reopens the port and waits for the next byte.
func (s *Server) ServeVirtioPort(ctx context.Context, path string) error {
	for ctx.Err() == nil {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open virtio-serial port %s: %w", path, err)
		}
		first := make([]byte, 1)
		n, err := f.Read(first)
		if n == 0 {
			f.Close()
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read virtio-serial port %s: %w", path, err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(disconnectedPoll):
			}
			continue
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
