package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime/debug"
	"sync"
	"time"

	"github.com/embervm/ember/agent"
)

// Config configures a [Server]. The zero value serves the whole file system
// with no privileged operations.
type Config struct {
	// Root is the directory that guest paths of file, secret, environment,
	// hostname and resolver operations are resolved in, without following
	// symbolic links out of it. Empty means "/". Tests point it at a
	// temporary directory.
	Root string
	// SecretsDir is the directory, inside Root, that receives secrets.
	// Empty means /run/ember/secrets.
	SecretsDir string
	// EnvFile is the file, inside Root, that records the environment set
	// with OpSetEnv as NUL-separated KEY=value entries. Empty means
	// /run/ember/env.
	EnvFile string
	// MaxConcurrent limits the requests that run at once on one
	// connection; zero means [agent.DefaultMaxConcurrent].
	MaxConcurrent int
	// MaxFrameSize is the largest payload accepted; zero means
	// [agent.DefaultMaxFrameSize].
	MaxFrameSize uint32
	// System performs the operations that change the whole guest. Nil
	// makes them fail with [agent.ErrUnsupported].
	System System
	// Processes starts and tracks exec'd processes. Nil uses os/exec
	// directly, which is right unless the agent is PID 1 and reaps
	// children (see [Reaper]).
	Processes ProcessStarter
	// BaseEnv is the environment of exec'd processes before OpSetEnv and
	// the request's own entries apply. Nil means the agent's environment.
	BaseEnv []string
	// Version is the agent version reported in the handshake and health.
	Version string
	// PollVirtioPort makes [Server.ServeVirtioPort] look for a host
	// connection every 50 ms instead of waiting for the virtio console
	// driver to report it. It is a fallback for a driver that does not wake
	// its pollers when the host connects, and the baseline of the
	// reconnect benchmark.
	PollVirtioPort bool
	// Logger receives the agent's log records; nil discards them.
	Logger *slog.Logger
}

// System performs guest-wide changes that need root. The Linux
// implementation is [NewLinuxSystem]; tests use a recording fake.
type System interface {
	SetHostname(name string) error
	SetClock(t time.Time) error
	// ConfigureNetwork applies the per-interface part of cfg; the server
	// itself writes the resolver file.
	ConfigureNetwork(ctx context.Context, ifaces []agent.InterfaceConfig) error
	// Shutdown syncs file systems and powers off or reboots; it returns only
	// on failure.
	Shutdown(action string) error
}

// ProcessStarter starts processes for exec. Start must register the process
// before it can be reaped by anyone else, and Done is called after Wait.
type ProcessStarter interface {
	Start(cmd *exec.Cmd) error
	Done(pid int)
}

// Server runs agent requests. One Server serves any number of connections.
type Server struct {
	cfg    Config
	root   *os.Root
	logger *slog.Logger
	start  time.Time

	mu sync.Mutex
	// env holds variables set with OpSetEnv; it is never logged.
	env map[string]string
}

// NewServer opens cfg.Root and returns a server. Close releases the root.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Root == "" {
		cfg.Root = "/"
	}
	if cfg.SecretsDir == "" {
		cfg.SecretsDir = "/run/ember/secrets"
	}
	if cfg.EnvFile == "" {
		cfg.EnvFile = "/run/ember/env"
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = agent.DefaultMaxConcurrent
	}
	if cfg.MaxFrameSize == 0 {
		cfg.MaxFrameSize = agent.DefaultMaxFrameSize
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	for _, p := range []string{cfg.SecretsDir, cfg.EnvFile} {
		if err := agent.ValidateGuestPath(p); err != nil {
			return nil, fmt.Errorf("new agent server: %w", err)
		}
	}
	root, err := os.OpenRoot(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("new agent server: open root: %w", err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, root: root, logger: logger, start: time.Now(), env: map[string]string{}}, nil
}

// Close releases the server's root directory. Serve calls in progress must
// have returned.
func (s *Server) Close() error { return s.root.Close() }

// Serve accepts connections from ln and serves each until ctx ends, then
// closes ln and waits for the connections to finish.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept agent connection: %w", err)
		}
		conns.Go(func() {
			if err := s.ServeConn(ctx, conn); err != nil {
				s.logger.Warn("agent connection ended with an error", "remote", conn.RemoteAddr().String(), "err", err)
			}
		})
	}
}

// ServeConn serves one connection until the peer closes it, the stream
// breaks or ctx ends. It closes conn and returns after every request of the
// connection has finished; the returned error is nil for a clean close.
// A panic while serving is logged and returned as an error.
func (s *Server) ServeConn(ctx context.Context, conn io.ReadWriteCloser) (err error) {
	ctx, cancel := context.WithCancel(ctx)
	sess := &session{
		srv:  s,
		fw:   agent.NewFrameWriter(conn, s.cfg.MaxFrameSize),
		fr:   agent.NewFrameReader(conn, s.cfg.MaxFrameSize),
		ctx:  ctx,
		reqs: map[uint32]*request{},
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer func() {
		if p := recover(); p != nil {
			s.logger.Error("agent connection panicked", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			err = fmt.Errorf("serve agent connection: panic: %v", p)
		}
		stop()
		cancel()
		conn.Close()
		sess.abortAll(errors.New("connection closed"))
		sess.handlers.Wait()
	}()
	return sess.readLoop()
}

type session struct {
	srv      *Server
	fw       *agent.FrameWriter
	fr       *agent.FrameReader
	ctx      context.Context
	helloed  bool
	handlers sync.WaitGroup

	mu   sync.Mutex
	reqs map[uint32]*request
}

// request is one running request and its streams.
type request struct {
	id     uint32
	op     string
	ctx    context.Context
	cancel context.CancelCauseFunc
	stdin  *agent.InStream
	stdout *agent.OutStream
	stderr *agent.OutStream
	// afterReply runs once the response has been written.
	afterReply func()
}

func (ss *session) readLoop() error {
	for {
		f, err := ss.fr.ReadFrame()
		var tooLarge *agent.FrameTooLargeError
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			return nil
		case errors.As(err, &tooLarge):
			ss.rejectOversized(tooLarge)
			if !tooLarge.Skipped {
				return fmt.Errorf("read frame: %w", err)
			}
			continue
		default:
			if ss.ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("read frame: %w", err)
		}
		ss.handleFrame(f)
	}
}

func (ss *session) rejectOversized(e *agent.FrameTooLargeError) {
	ss.srv.logger.Warn("rejected oversized frame", "type", e.Type.String(), "request", e.ID, "size", e.Size, "max", e.Max)
	if r := ss.lookup(e.ID); r != nil {
		r.cancel(agent.Errorf(agent.CodeFrameTooLarge, "%v", e))
		return
	}
	ss.reply(e.ID, nil, agent.Errorf(agent.CodeFrameTooLarge, "%v", e))
}

func (ss *session) handleFrame(f agent.Frame) {
	switch f.Type {
	case agent.FrameHello:
		ss.hello(f)
	case agent.FrameRequest:
		ss.startRequest(f)
	case agent.FrameData:
		r := ss.lookup(f.ID)
		if r == nil {
			// Data of a request that already failed, such as an upload
			// whose path was rejected; the client stops sending when the
			// response arrives.
			return
		}
		if f.Stream != agent.StreamStdin || r.stdin == nil {
			r.cancel(agent.Errorf(agent.CodeBadRequest, "request %d does not read stream %d", f.ID, f.Stream))
			return
		}
		if err := r.stdin.Push(f.Payload, f.Flags&agent.FlagEOF != 0); err != nil {
			r.cancel(agent.Errorf(agent.CodeBadRequest, "stdin of request %d: %v", f.ID, err))
		}
	case agent.FrameWindow:
		r := ss.lookup(f.ID)
		n, err := agent.ParseWindow(f.Payload)
		if r == nil || err != nil {
			return
		}
		switch {
		case f.Stream == agent.StreamStdout && r.stdout != nil:
			r.stdout.Grant(n)
		case f.Stream == agent.StreamStderr && r.stderr != nil:
			r.stderr.Grant(n)
		}
	case agent.FrameCancel:
		if r := ss.lookup(f.ID); r != nil {
			r.cancel(agent.Errorf(agent.CodeCanceled, "request %d canceled by the host", f.ID))
		}
	default:
		ss.srv.logger.Warn("rejected frame of unknown type", "type", f.Type.String(), "request", f.ID)
		if ss.lookup(f.ID) == nil {
			ss.reply(f.ID, nil, agent.Errorf(agent.CodeBadRequest, "unexpected %s", f.Type))
		}
	}
}

func (ss *session) hello(f agent.Frame) {
	var h agent.Hello
	reply := agent.HelloReply{
		AgentVersion:  ss.srv.cfg.Version,
		MaxFrameSize:  ss.srv.cfg.MaxFrameSize,
		MaxConcurrent: ss.srv.cfg.MaxConcurrent,
	}
	if err := json.Unmarshal(f.Payload, &h); err != nil {
		reply.Error = agent.Errorf(agent.CodeBadRequest, "invalid hello: %v", err)
	} else if !contains(h.Versions, agent.ProtocolVersion) {
		reply.Error = agent.Errorf(agent.CodeUnsupportedVersion, "agent speaks protocol version %d, client offered %v", agent.ProtocolVersion, h.Versions)
	} else {
		reply.Version = agent.ProtocolVersion
		if h.MaxFrameSize > 0 && h.MaxFrameSize < reply.MaxFrameSize {
			reply.MaxFrameSize = h.MaxFrameSize
			ss.fw.SetMax(h.MaxFrameSize)
		}
		ss.helloed = true
	}
	payload, _ := json.Marshal(reply)
	if err := ss.fw.WriteFrame(agent.Frame{Type: agent.FrameHello, ID: f.ID, Payload: payload}); err != nil {
		ss.srv.logger.Warn("write hello reply failed", "err", err)
	}
}

func contains(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

func (ss *session) lookup(id uint32) *request {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.reqs[id]
}

func (ss *session) startRequest(f agent.Frame) {
	if !ss.helloed {
		ss.reply(f.ID, nil, agent.Errorf(agent.CodeBadRequest, "request %d before hello", f.ID))
		return
	}
	var req agent.Request
	if err := json.Unmarshal(f.Payload, &req); err != nil {
		ss.reply(f.ID, nil, agent.Errorf(agent.CodeBadRequest, "invalid request %d: %v", f.ID, err))
		return
	}
	op, ok := operations[req.Op]
	if !ok {
		ss.reply(f.ID, nil, agent.Errorf(agent.CodeUnknownOp, "unknown operation %q", req.Op))
		return
	}

	ctx, cancel := context.WithCancelCause(ss.ctx)
	r := &request{id: f.ID, op: req.Op, ctx: ctx, cancel: cancel}
	window := agent.DefaultWindow
	maxChunk := int(ss.fw.Max())
	if op.stdin {
		r.stdin = agent.NewInStream(window, ss.grantFunc(f.ID, agent.StreamStdin))
	}
	if op.stdout {
		r.stdout = agent.NewOutStream(window, maxChunk, ss.sendFunc(f.ID, agent.StreamStdout))
	}
	if op.stderr {
		r.stderr = agent.NewOutStream(window, maxChunk, ss.sendFunc(f.ID, agent.StreamStderr))
	}

	ss.mu.Lock()
	if _, dup := ss.reqs[f.ID]; dup {
		ss.mu.Unlock()
		cancel(nil)
		ss.reply(f.ID, nil, agent.Errorf(agent.CodeBadRequest, "request id %d is already in use", f.ID))
		return
	}
	if len(ss.reqs) >= ss.srv.cfg.MaxConcurrent {
		ss.mu.Unlock()
		cancel(nil)
		ss.reply(f.ID, nil, agent.Errorf(agent.CodeBusy, "request %d rejected: %d requests already running, the maximum", f.ID, ss.srv.cfg.MaxConcurrent))
		return
	}
	ss.reqs[f.ID] = r
	ss.mu.Unlock()

	// A cancelled request must not stay blocked on a stream: a closed
	// window or a stdin that never ends.
	context.AfterFunc(ctx, func() {
		cause := context.Cause(ctx)
		if r.stdin != nil {
			r.stdin.Abort(cause)
		}
		for _, s := range []*agent.OutStream{r.stdout, r.stderr} {
			if s != nil {
				s.Abort(cause)
			}
		}
	})

	ss.handlers.Go(func() { ss.run(r, op, req.Args) })
}

func (ss *session) run(r *request, op operation, args json.RawMessage) {
	defer r.cancel(nil)
	var result any
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				ss.srv.logger.Error("agent request panicked", "op", r.op, "request", r.id, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				err = agent.Errorf(agent.CodeInternal, "%s request %d panicked: %v", r.op, r.id, p)
			}
		}()
		result, err = op.handle(ss.srv, r, args)
	}()
	// A cause set by the session (cancel, a broken stream rule) explains
	// the failure better than what the handler saw.
	if cause := context.Cause(r.ctx); err != nil && cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause
	}
	for _, s := range []*agent.OutStream{r.stdout, r.stderr} {
		if s != nil && err == nil {
			s.Close()
		}
	}
	if r.stdin != nil {
		r.stdin.Abort(io.ErrClosedPipe)
	}

	ss.mu.Lock()
	delete(ss.reqs, r.id)
	ss.mu.Unlock()
	if err != nil {
		ss.srv.logger.Info("agent request failed", "op", r.op, "request", r.id, "err", err)
	}
	ss.reply(r.id, result, err)
	if r.afterReply != nil && err == nil {
		r.afterReply()
	}
}

// reply writes the response of request id: err as an [*agent.Error], or
// result as JSON.
func (ss *session) reply(id uint32, result any, err error) {
	var resp agent.Response
	if err != nil {
		var ae *agent.Error
		if !errors.As(err, &ae) {
			ae = &agent.Error{Code: agent.CodeFailed, Message: err.Error()}
		}
		resp.Error = ae
	} else if result != nil {
		raw, merr := json.Marshal(result)
		if merr != nil {
			resp.Error = agent.Errorf(agent.CodeInternal, "encode result: %v", merr)
		} else {
			resp.Result = raw
		}
	}
	payload, _ := json.Marshal(resp)
	if werr := ss.fw.WriteFrame(agent.Frame{Type: agent.FrameResponse, ID: id, Payload: payload}); werr != nil && ss.ctx.Err() == nil {
		ss.srv.logger.Warn("write response failed", "request", id, "err", werr)
	}
}

func (ss *session) grantFunc(id uint32, s agent.Stream) func(int) {
	return func(n int) {
		ss.fw.WriteFrame(agent.Frame{Type: agent.FrameWindow, Stream: s, ID: id, Payload: agent.WindowPayload(n)})
	}
}

func (ss *session) sendFunc(id uint32, s agent.Stream) func([]byte, bool) error {
	return func(p []byte, eof bool) error {
		var flags uint16
		if eof {
			flags = agent.FlagEOF
		}
		return ss.fw.WriteFrame(agent.Frame{Type: agent.FrameData, Stream: s, Flags: flags, ID: id, Payload: p})
	}
}

func (ss *session) abortAll(err error) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for _, r := range ss.reqs {
		r.cancel(err)
		if r.stdin != nil {
			r.stdin.Abort(err)
		}
		for _, s := range []*agent.OutStream{r.stdout, r.stderr} {
			if s != nil {
				s.Abort(err)
			}
		}
	}
}
