package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// DefaultVsockPort is the vsock port that the agent listens on unless the
// kernel command line sets ember.agent_port.
const DefaultVsockPort = 1024

// ErrVsockRejected means Firecracker closed the connection or answered the
// CONNECT line with something other than OK, typically because nothing in
// the guest listens on the port yet.
var ErrVsockRejected = errors.New("vsock connect rejected")

// DialVsock connects to a guest vsock port through Firecracker's host-side
// Unix socket at udsPath. Firecracker's protocol for host-initiated
// connections: the host writes "CONNECT <port>\n", and Firecracker answers
// "OK <host port>\n" once the guest accepted, or closes the connection.
// The returned conn carries the guest stream from the first byte after that
// line.
func DialVsock(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, fmt.Errorf("dial vsock socket %s: %w", udsPath, err)
	}
	if err := vsockHandshake(ctx, conn, port); err != nil {
		conn.Close()
		return nil, fmt.Errorf("vsock connect %s port %d: %w", udsPath, port, err)
	}
	return conn, nil
}

// VsockDialer returns a [Dialer] for [Dial] that uses [DialVsock].
func VsockDialer(udsPath string, port uint32) Dialer {
	return func(ctx context.Context) (net.Conn, error) { return DialVsock(ctx, udsPath, port) }
}

// UnixDialer returns a [Dialer] for [Dial] that connects to a Unix socket,
// such as the one that QEMU serves for a virtio-serial port.
func UnixDialer(path string) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
}

func vsockHandshake(ctx context.Context, conn net.Conn, port uint32) error {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	err := readVsockReply(conn, port)
	if !stop() {
		// ctx ended and its deadline may already be set on conn.
		return ctx.Err()
	}
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

func readVsockReply(conn net.Conn, port uint32) error {
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return err
	}
	// Read one byte at a time: bytes after the newline belong to the guest
	// stream and must stay in the connection.
	var line []byte
	var b [1]byte
	for len(line) < 64 {
		if _, err := conn.Read(b[:]); err != nil {
			return fmt.Errorf("%w: %v", ErrVsockRejected, err)
		}
		if b[0] == '\n' {
			return parseVsockReply(string(line))
		}
		line = append(line, b[0])
	}
	return fmt.Errorf("%w: reply line longer than 64 bytes", ErrVsockRejected)
}

func parseVsockReply(line string) error {
	rest, ok := strings.CutPrefix(line, "OK ")
	if !ok {
		return fmt.Errorf("%w: reply %q", ErrVsockRejected, line)
	}
	if _, err := strconv.ParseUint(rest, 10, 32); err != nil {
		return fmt.Errorf("%w: reply %q has no port number", ErrVsockRejected, line)
	}
	return nil
}
