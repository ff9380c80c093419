package agent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"time"
)

// Dialer opens a new byte stream to the agent, such as [DialVsock] bound to a
// Firecracker vsock socket, or a Unix socket that QEMU serves for a
// virtio-serial port.
type Dialer func(ctx context.Context) (net.Conn, error)

// ErrClosed is returned by calls on a closed [Client] or after its
// connection broke.
var ErrClosed = errors.New("agent connection closed")

// Options tunes [Dial]. The zero value is ready to use.
type Options struct {
	// Logger receives retries and protocol oddities; nil discards them.
	Logger *slog.Logger
	// RetryInterval is the first pause between connection attempts; it
	// doubles up to one second. Zero means 50 ms.
	RetryInterval time.Duration
	// HelloInterval is how long the client first waits for a hello reply on
	// an open connection before it sends another hello; the wait doubles up
	// to 5 seconds. Zero means 500 ms.
	HelloInterval time.Duration
}

// Client is a connection to one guest agent. Its methods are safe for
// concurrent use, and concurrent calls run concurrently in the guest up to
// the agent's limit.
type Client struct {
	conn   net.Conn
	fw     *FrameWriter
	fr     *FrameReader
	hello  HelloReply
	logger *slog.Logger
	done   chan struct{}

	mu     sync.Mutex
	calls  map[uint32]*call
	nextID uint32
	err    error
}

type call struct {
	op     string
	resp   chan Response
	stdout *InStream
	stderr *InStream
	stdin  *OutStream
}

// Dial connects to the agent and performs the version handshake. A dial
// error or a silent connection is normal while the guest boots, so Dial
// retries until ctx ends and then returns an error that wraps ctx's error and
// names the last failure.
func Dial(ctx context.Context, dial Dialer, opts *Options) (*Client, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.RetryInterval <= 0 {
		o.RetryInterval = 50 * time.Millisecond
	}
	if o.HelloInterval <= 0 {
		o.HelloInterval = 500 * time.Millisecond
	}

	delay := o.RetryInterval
	var lastErr error
	for attempt := 1; ; attempt++ {
		conn, err := dial(ctx)
		if err == nil {
			var c *Client
			c, err = handshake(ctx, conn, o)
			if err == nil {
				return c, nil
			}
			conn.Close()
			// A version the agent does not speak will not change by retrying.
			if errors.Is(err, ErrUnsupportedVersion) {
				return nil, fmt.Errorf("agent handshake: %w", err)
			}
		}
		lastErr = err
		o.Logger.Debug("agent not ready, retrying", "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to agent after %d attempts: %w (last error: %v)", attempt, ctx.Err(), lastErr)
		case <-time.After(delay):
		}
		delay = min(delay*2, time.Second)
	}
}

// handshake sends hellos on conn until a reply to one of them arrives, the
// connection fails or ctx ends.
func handshake(ctx context.Context, conn net.Conn, o Options) (*Client, error) {
	fw := NewFrameWriter(conn, DefaultMaxFrameSize)
	fr := NewFrameReader(conn, DefaultMaxFrameSize)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	hello, _ := json.Marshal(Hello{Versions: []int{ProtocolVersion}, MaxFrameSize: DefaultMaxFrameSize})
	// Every hello carries a fresh nonce. Only replies to hellos sent on this
	// connection count: a virtio-serial port can still hold replies to an
	// earlier connection's hellos.
	sent := map[uint32]bool{}
	interval := o.HelloInterval
	for {
		nonce := rand.Uint32()
		sent[nonce] = true
		if err := fw.WriteFrame(Frame{Type: FrameHello, ID: nonce, Payload: hello}); err != nil {
			return nil, fmt.Errorf("send hello: %w", err)
		}
		conn.SetReadDeadline(time.Now().Add(interval))
		// QEMU does not read a virtio-serial socket while the guest has the
		// port closed, so every hello waits in the socket buffer until the
		// guest opens it. Backing off keeps a slow boot from filling it.
		interval = min(interval*2, 5*time.Second)
		for {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			f, err := fr.ReadFrame()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("read hello reply: %w", err)
			}
			if f.Type != FrameHello || !sent[f.ID] {
				continue
			}
			var reply HelloReply
			if err := json.Unmarshal(f.Payload, &reply); err != nil {
				return nil, fmt.Errorf("decode hello reply: %w", err)
			}
			if reply.Error != nil {
				return nil, reply.Error
			}
			if reply.Version != ProtocolVersion {
				return nil, fmt.Errorf("agent chose protocol version %d: %w", reply.Version, ErrUnsupportedVersion)
			}
			if !stop() {
				return nil, ctx.Err()
			}
			conn.SetDeadline(time.Time{})
			if reply.MaxFrameSize > 0 && reply.MaxFrameSize < DefaultMaxFrameSize {
				fw.SetMax(reply.MaxFrameSize)
			}
			c := &Client{
				conn:   conn,
				fw:     fw,
				fr:     fr,
				hello:  reply,
				logger: o.Logger,
				done:   make(chan struct{}),
				calls:  map[uint32]*call{},
			}
			go c.readLoop()
			return c, nil
		}
	}
}

// AgentVersion returns the version string that the agent sent in the
// handshake.
func (c *Client) AgentVersion() string { return c.hello.AgentVersion }

// MaxConcurrent returns how many requests the agent runs at once on this
// connection.
func (c *Client) MaxConcurrent() int { return c.hello.MaxConcurrent }

// Close closes the connection. Calls in progress fail with [ErrClosed].
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

func (c *Client) readLoop() {
	defer close(c.done)
	for {
		f, err := c.fr.ReadFrame()
		if errors.Is(err, ErrFrameTooLarge) && !errors.Is(err, ErrCorruptStream) {
			c.logger.Warn("agent sent an oversized frame", "err", err)
			continue
		}
		if err != nil {
			c.failAll(err)
			return
		}
		c.dispatch(f)
	}
}

func (c *Client) failAll(err error) {
	c.mu.Lock()
	c.err = err
	calls := c.calls
	c.calls = map[uint32]*call{}
	c.mu.Unlock()
	closed := fmt.Errorf("%w: %v", ErrClosed, err)
	for _, cl := range calls {
		cl.abort(closed)
	}
}

func (c *Client) dispatch(f Frame) {
	c.mu.Lock()
	cl := c.calls[f.ID]
	if f.Type == FrameResponse {
		delete(c.calls, f.ID)
	}
	c.mu.Unlock()
	if cl == nil {
		// Late frames of a call that the caller abandoned.
		return
	}

	switch f.Type {
	case FrameResponse:
		var resp Response
		if err := json.Unmarshal(f.Payload, &resp); err != nil {
			resp = Response{Error: Errorf(CodeInternal, "undecodable response: %v", err)}
		}
		// The agent sends all stream data before the response, so any stream
		// still open ends here.
		for _, s := range []*InStream{cl.stdout, cl.stderr} {
			if s != nil {
				s.Push(nil, true)
			}
		}
		if cl.stdin != nil {
			cl.stdin.Abort(io.ErrClosedPipe)
		}
		cl.resp <- resp
	case FrameData:
		s := cl.stdout
		if f.Stream == StreamStderr {
			s = cl.stderr
		}
		if s == nil || (f.Stream != StreamStdout && f.Stream != StreamStderr) {
			c.logger.Warn("agent sent data for a stream the call does not read", "op", cl.op, "request", f.ID, "stream", f.Stream)
			return
		}
		if err := s.Push(f.Payload, f.Flags&FlagEOF != 0); err != nil {
			c.logger.Warn("agent broke stream rules", "op", cl.op, "request", f.ID, "err", err)
			s.Abort(err)
		}
	case FrameWindow:
		if n, err := ParseWindow(f.Payload); err == nil && cl.stdin != nil && f.Stream == StreamStdin {
			cl.stdin.Grant(n)
		}
	}
}

func (cl *call) abort(err error) {
	for _, s := range []*InStream{cl.stdout, cl.stderr} {
		if s != nil {
			s.Abort(err)
		}
	}
	if cl.stdin != nil {
		cl.stdin.Abort(err)
	}
	select {
	case cl.resp <- Response{Error: &Error{Message: err.Error()}}:
	default:
	}
}

// WindowPayload encodes the payload of a FrameWindow that grants n bytes.
func WindowPayload(n int) []byte {
	return binary.BigEndian.AppendUint32(nil, uint32(n))
}

// ParseWindow decodes the payload of a FrameWindow.
func ParseWindow(p []byte) (int, error) {
	if len(p) != 4 {
		return 0, fmt.Errorf("window frame payload of %d bytes, want 4", len(p))
	}
	return int(binary.BigEndian.Uint32(p)), nil
}

// callStreams selects which streams a call carries.
type callStreams struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
}

// Call sends a request for op with args and decodes the result into result,
// which may be nil. It is the building block of the typed methods and lets
// callers reach operations of newer agents.
func (c *Client) Call(ctx context.Context, op string, args, result any) error {
	return c.call(ctx, op, args, result, callStreams{})
}

func (c *Client) call(ctx context.Context, op string, args, result any, streams callStreams) error {
	rawArgs, err := json.Marshal(args)
	if err != nil {
		return fmt.Errorf("agent %s: encode arguments: %w", op, err)
	}
	payload, err := json.Marshal(Request{Op: op, Args: rawArgs})
	if err != nil {
		return fmt.Errorf("agent %s: encode request: %w", op, err)
	}

	cl := &call{op: op, resp: make(chan Response, 1)}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return fmt.Errorf("agent %s: %w: %v", op, ErrClosed, c.err)
	}
	c.nextID++
	id := c.nextID
	grant := func(s Stream) func(int) {
		return func(n int) {
			c.fw.WriteFrame(Frame{Type: FrameWindow, Stream: s, ID: id, Payload: WindowPayload(n)})
		}
	}
	if streams.stdout != nil {
		cl.stdout = NewInStream(DefaultWindow, grant(StreamStdout))
	}
	if streams.stderr != nil {
		cl.stderr = NewInStream(DefaultWindow, grant(StreamStderr))
	}
	if streams.stdin != nil {
		maxChunk := int(c.fw.Max())
		cl.stdin = NewOutStream(DefaultWindow, maxChunk, func(p []byte, eof bool) error {
			var flags uint16
			if eof {
				flags = FlagEOF
			}
			return c.fw.WriteFrame(Frame{Type: FrameData, Stream: StreamStdin, Flags: flags, ID: id, Payload: p})
		})
	}
	c.calls[id] = cl
	c.mu.Unlock()

	if err := c.fw.WriteFrame(Frame{Type: FrameRequest, ID: id, Payload: payload}); err != nil {
		c.forget(id)
		return fmt.Errorf("agent %s request %d: send: %w", op, id, err)
	}

	var copiers sync.WaitGroup
	copyOut := func(w io.Writer, s *InStream) {
		copiers.Go(func() {
			if _, err := io.Copy(w, s); err != nil {
				// The caller's writer failed; stop the stream so the agent
				// is not blocked on a window that never opens.
				s.Abort(err)
			}
		})
	}
	if cl.stdout != nil {
		copyOut(streams.stdout, cl.stdout)
	}
	if cl.stderr != nil {
		copyOut(streams.stderr, cl.stderr)
	}
	if cl.stdin != nil {
		// This goroutine is not waited for: it may be blocked in the caller's
		// reader, as with os/exec. It ends when that reader returns.
		go func() {
			if _, err := io.Copy(cl.stdin, streams.stdin); err != nil {
				return
			}
			cl.stdin.Close()
		}()
	}

	var resp Response
	select {
	case resp = <-cl.resp:
	case <-ctx.Done():
		c.forget(id)
		c.fw.WriteFrame(Frame{Type: FrameCancel, ID: id})
		cl.abort(ctx.Err())
		copiers.Wait()
		return fmt.Errorf("agent %s request %d: %w", op, id, ctx.Err())
	}
	copiers.Wait()
	if resp.Error != nil {
		if resp.Error.Code == "" {
			return fmt.Errorf("agent %s request %d: %w", op, id, errors.New(resp.Error.Message))
		}
		return fmt.Errorf("agent %s request %d: %w", op, id, resp.Error)
	}
	if result != nil && len(resp.Result) > 0 {
		if err := json.Unmarshal(resp.Result, result); err != nil {
			return fmt.Errorf("agent %s request %d: decode result: %w", op, id, err)
		}
	}
	return nil
}

func (c *Client) forget(id uint32) {
	c.mu.Lock()
	delete(c.calls, id)
	c.mu.Unlock()
}

// Health returns the agent's version, uptime and boot id.
func (c *Client) Health(ctx context.Context) (HealthResult, error) {
	var res HealthResult
	err := c.Call(ctx, OpHealth, struct{}{}, &res)
	return res, err
}

// ExecIO holds the streams of an exec. A nil Stdin gives the process an empty
// stdin; a nil Stdout or Stderr discards that output.
type ExecIO struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
}

// Exec runs a process in the guest and streams its standard streams. It
// returns once the process has exited and its output has been written. A
// non-zero exit is not an error: read ExecResult. When ctx ends, the agent
// kills the process and Exec returns ctx's error.
func (c *Client) Exec(ctx context.Context, req ExecRequest, stdio ExecIO) (ExecResult, error) {
	req.Stdin = stdio.Stdin != nil
	streams := callStreams{stdin: stdio.Stdin, stdout: stdio.Stdout, stderr: stdio.Stderr}
	if streams.stdout == nil {
		streams.stdout = io.Discard
	}
	if streams.stderr == nil {
		streams.stderr = io.Discard
	}
	var res ExecResult
	err := c.call(ctx, OpExec, req, &res, streams)
	return res, err
}

// PutFile writes the content of r to req.Path in the guest, atomically
// replacing any existing file, and returns the number of bytes written.
func (c *Client) PutFile(ctx context.Context, req FilePutRequest, r io.Reader) (int64, error) {
	var res FilePutResult
	err := c.call(ctx, OpFilePut, req, &res, callStreams{stdin: r})
	return res.Size, err
}

// GetFile copies the guest file at path to w.
func (c *Client) GetFile(ctx context.Context, path string, w io.Writer) (FileInfo, error) {
	var res FileInfo
	err := c.call(ctx, OpFileGet, FileGetRequest{Path: path}, &res, callStreams{stdout: w})
	return res, err
}

// SetEnv sets and unsets variables of the environment that later execs
// inherit.
func (c *Client) SetEnv(ctx context.Context, env map[string]string, unset ...string) error {
	return c.Call(ctx, OpSetEnv, SetEnvRequest{Env: env, Unset: unset}, nil)
}

// SetSecrets writes each secret to its own file in the guest's secrets
// directory.
func (c *Client) SetSecrets(ctx context.Context, secrets map[string][]byte) error {
	return c.Call(ctx, OpSetSecrets, SetSecretsRequest{Secrets: secrets}, nil)
}

// ConfigureNetwork applies cfg to the guest's interfaces and resolver.
func (c *Client) ConfigureNetwork(ctx context.Context, cfg NetworkConfig) error {
	return c.Call(ctx, OpNetwork, cfg, nil)
}

// SyncClock sets the guest's wall clock to now, typically time.Now() right
// after a restore.
func (c *Client) SyncClock(ctx context.Context, now time.Time) error {
	return c.Call(ctx, OpClockSync, ClockSyncRequest{UnixNano: now.UnixNano()}, nil)
}

// SetHostname sets the guest's host name and /etc/hostname.
func (c *Client) SetHostname(ctx context.Context, name string) error {
	return c.Call(ctx, OpSetHostname, SetHostnameRequest{Hostname: name}, nil)
}

// Shutdown requests that the agent sync and then power off or reboot the guest,
// with action [ActionPowerOff] or [ActionReboot]. It returns once the agent
// has accepted the request.
func (c *Client) Shutdown(ctx context.Context, action string) error {
	return c.Call(ctx, OpShutdown, ShutdownRequest{Action: action}, nil)
}
