package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/embervm/ember/agent"
)

// outputGrace is how long exec waits for the output pipes to reach EOF after
// the process exited. A background child that inherited stdout keeps the
// pipe open; after this grace the agent stops reading and replies.
const outputGrace = 2 * time.Second

func (s *Server) exec(r *request, args json.RawMessage) (any, error) {
	var req agent.ExecRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "exec: empty argv")
	}
	for _, a := range req.Argv {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "exec: argument contains a NUL byte")
		}
	}
	for _, e := range req.Env {
		if err := agent.ValidateEnvEntry(e); err != nil {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "exec: %v", err)
		}
	}
	if req.Timeout < 0 {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "exec: negative timeout %v", req.Timeout)
	}
	dir := s.cfg.Root
	if req.Dir != "" {
		if err := agent.ValidateGuestPath(req.Dir); err != nil {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "exec: working directory: %v", err)
		}
		dir = filepath.Join(s.cfg.Root, req.Dir)
	}

	ctx := r.ctx
	var timedOut bool
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, req.Timeout)
		defer cancel()
	}

	env := s.execEnv(req.Env)
	program, err := lookPath(req.Argv[0], env)
	if err != nil {
		return nil, agent.Errorf(agent.CodeNotFound, "exec %s: %v", req.Argv[0], err)
	}
	cmd := exec.Command(program, req.Argv[1:]...)
	cmd.Args[0] = req.Argv[0]
	cmd.Dir = dir
	cmd.Env = env
	// A process group of its own lets cancel and timeout kill the children
	// of the process too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}

	var cleanup []io.Closer
	defer func() {
		for _, c := range cleanup {
			c.Close()
		}
	}()
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", req.Argv[0], err)
	}
	cleanup = append(cleanup, stdoutR, stdoutW)
	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", req.Argv[0], err)
	}
	cleanup = append(cleanup, stderrR, stderrW)
	cmd.Stdout, cmd.Stderr = stdoutW, stderrW
	var stdinW *os.File
	if req.Stdin {
		stdinR, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("exec %s: %w", req.Argv[0], err)
		}
		cleanup = append(cleanup, stdinR, w)
		cmd.Stdin, stdinW = stdinR, w
	}

	if err := s.startProcess(cmd); err != nil {
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return nil, agent.Errorf(agent.CodeNotFound, "exec %s: %v", req.Argv[0], err)
		}
		return nil, fmt.Errorf("exec %s: %w", req.Argv[0], err)
	}
	pid := cmd.Process.Pid
	// The child has its own copies now; closing ours lets the output pipes
	// reach EOF when the child exits.
	stdoutW.Close()
	stderrW.Close()
	if f, ok := cmd.Stdin.(*os.File); ok {
		f.Close()
	}

	var copiers sync.WaitGroup
	copiers.Go(func() { io.Copy(r.stdout, stdoutR) })
	copiers.Go(func() { io.Copy(r.stderr, stderrR) })
	if stdinW != nil {
		// Not waited for: it ends when the stream ends or is aborted after
		// the process exited.
		go func() {
			io.Copy(stdinW, r.stdin)
			stdinW.Close()
		}()
	}

	waitDone := make(chan struct{})
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		select {
		case <-ctx.Done():
			timedOut = errors.Is(ctx.Err(), context.DeadlineExceeded) && r.ctx.Err() == nil
			// Kill the whole group; the leader is in it.
			syscall.Kill(-pid, syscall.SIGKILL)
		case <-waitDone:
		}
	}()
	waitErr := cmd.Wait()
	close(waitDone)
	<-killerDone
	s.processDone(pid)

	copied := make(chan struct{})
	go func() { copiers.Wait(); close(copied) }()
	select {
	case <-copied:
	case <-time.After(outputGrace):
		stdoutR.Close()
		stderrR.Close()
		<-copied
	}
	if r.stdin != nil {
		r.stdin.Abort(io.ErrClosedPipe)
	}

	if cause := context.Cause(r.ctx); cause != nil {
		return nil, cause
	}
	res := agent.ExecResult{TimedOut: timedOut}
	var exitErr *exec.ExitError
	if waitErr != nil && !errors.As(waitErr, &exitErr) {
		return nil, fmt.Errorf("exec %s: wait: %w", req.Argv[0], waitErr)
	}
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		res.ExitCode = -1
		res.Signal = ws.Signal().String()
	} else {
		res.ExitCode = ws.ExitStatus()
	}
	return res, nil
}

func (s *Server) startProcess(cmd *exec.Cmd) error {
	if s.cfg.Processes != nil {
		return s.cfg.Processes.Start(cmd)
	}
	return cmd.Start()
}

func (s *Server) processDone(pid int) {
	if s.cfg.Processes != nil {
		s.cfg.Processes.Done(pid)
	}
}

// lookPath finds program in the PATH of the process's environment, which
// may differ from the agent's own, as a shell would.
func lookPath(program string, env []string) (string, error) {
	if strings.Contains(program, "/") {
		return program, nil
	}
	path := ""
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for dir := range strings.SplitSeq(path, ":") {
		if dir == "" {
			dir = "."
		}
		candidate := filepath.Join(dir, program)
		fi, err := os.Stat(candidate)
		if err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return candidate, nil
		}
	}
	return "", fmt.Errorf("%q not found in PATH %q: %w", program, path, exec.ErrNotFound)
}

// execEnv merges the base environment, the variables set with OpSetEnv and
// the request's entries, later sources winning.
func (s *Server) execEnv(extra []string) []string {
	base := s.cfg.BaseEnv
	if base == nil {
		base = os.Environ()
	}
	merged := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := merged[k]; !ok {
			order = append(order, k)
		}
		merged[k] = v
	}
	for _, e := range base {
		if k, v, ok := strings.Cut(e, "="); ok {
			set(k, v)
		}
	}
	s.mu.Lock()
	for k, v := range s.env {
		set(k, v)
	}
	s.mu.Unlock()
	for _, e := range extra {
		k, v, _ := strings.Cut(e, "=")
		set(k, v)
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+merged[k])
	}
	return env
}

func decodeArgs(args json.RawMessage, v any) error {
	if len(args) == 0 {
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(args)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return agent.Errorf(agent.CodeInvalidArgument, "invalid arguments: %v", err)
	}
	return nil
}
