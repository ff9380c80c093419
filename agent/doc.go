// Package agent defines the protocol between the host and Ember's guest
// agent, and the host-side [Client].
//
// # Transport
//
// The protocol runs over one reliable byte stream. On Firecracker that is a
// vsock connection, which the host opens through the VM's vsock Unix socket
// with [DialVsock]. On QEMU it is a virtio-serial port named "ember.agent"
// whose host end is a Unix socket that QEMU serves ([UnixDialer]). [Dial]
// takes one [Dialer] function, so callers never see which transport is used.
//
// # Frames
//
// The stream is a sequence of frames: a 12-byte header (payload length,
// type, stream number, flags, request id) and a payload of at most
// [DefaultMaxFrameSize] bytes. Control payloads ([Hello], [Request],
// [Response]) are JSON. Data frames carry raw bytes of one stream of a
// request: stdin, stdout or stderr of an exec, or the content of a file.
//
// # Why a small frame format of our own
//
// The agent must stay small and import only the standard library, so that
// the static guest binary has few dependencies to audit and the host client
// can be used anywhere. A multiplexer library (yamux, smux) or gRPC would
// bring a large dependency set into the guest binary. The format only needs
// request ids, three byte streams per request, per-stream flow control and a
// size limit, which take a few hundred lines. JSON for the control messages
// keeps them readable in a hex dump, and the bulk bytes of exec and files
// travel unencoded in data frames.
//
// # Sessions and requests
//
// A connection starts with a version handshake: the client sends a
// FrameHello with the versions it speaks, and the agent answers with the
// version it chose, its own version string, the maximum frame size and the
// number of requests it runs at once on this connection. Each hello carries a
// nonce that the reply repeats. A virtio-serial port is a single byte stream
// that keeps data across host reconnects, so the client ignores replies to
// hellos it did not send on the current connection.
//
// Then the client sends requests, each with a new id, without waiting for
// earlier ones; the agent runs them concurrently up to its limit and answers a
// request beyond it with [ErrBusy]. A request ends with exactly one
// FrameResponse. A FrameCancel stops a request: an exec'd process is killed.
//
// Each stream of a request has a window of [DefaultWindow] bytes: a sender
// stops once it has sent that many bytes that the receiver has not granted
// back with a FrameWindow. The goroutine that reads frames therefore never
// blocks on a slow consumer, and one stalled exec does not hold up the
// connection.
//
// # Errors
//
// Bad input gets an error reply and the agent keeps serving: an oversized
// frame ([ErrFrameTooLarge]; a claimed size above 64 MiB closes the
// connection, because skipping it is not practical), an unknown operation
// ([ErrUnknownOp]), invalid arguments such as a bad environment variable name
// or a path with ".." ([ErrInvalidArgument]), and too many concurrent
// requests ([ErrBusy]). The client's errors wrap an [*Error] that matches
// these sentinels with [errors.Is].
//
// # Usage
//
//	c, err := agent.Dial(ctx, agent.VsockDialer("/run/vm/v.sock", agent.DefaultVsockPort), nil)
//	if err != nil {
//		return err // ctx ended before the guest answered
//	}
//	defer c.Close()
//	var out bytes.Buffer
//	res, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"uname", "-r"}}, agent.ExecIO{Stdout: &out})
//
// This package imports only the standard library; a test enforces that.
package agent
