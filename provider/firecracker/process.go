package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// process is one running Firecracker (or jailer) child. Go's os/exec
// tracks the child through a pidfd where the kernel supports it, so Wait
// and Signal never hit a reused PID.
type process struct {
	cmd *exec.Cmd
	// exited is closed after the child was reaped; state is set before.
	exited chan struct{}
	state  *os.ProcessState
	// copyDone is closed when the console copier has drained stdout.
	copyDone chan struct{}
}

// spawnOptions describes one child.
type spawnOptions struct {
	path string
	args []string
	env  []string
	// console receives the child's stdout (the guest serial console) and
	// stderr.
	console     io.Writer
	noFileLimit uint64
	// netns is the path of the network namespace the child starts in; ""
	// keeps Ember's own.
	netns string
}

// spawn starts the child directly, without a shell: stdin is /dev/null, the
// environment is only opts.env, stdout and stderr go to opts.console. With
// opts.netns set, the child starts in that network namespace.
func spawn(opts spawnOptions) (*process, error) {
	if opts.netns != "" {
		return spawnInNetNS(opts.netns, opts)
	}
	return startChild(opts)
}

// startChild starts the child in the calling thread's network namespace.
func startChild(opts spawnOptions) (*process, error) {
	cmd := exec.Command(opts.path, opts.args...)
	cmd.Env = append([]string{}, opts.env...)
	cmd.Stdin = nil
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	// A new process group keeps terminal signals meant for Ember away from
	// the VMM; Pdeathsig stops an orphaned VMM if Ember itself dies.
	// NOTE: Linux sends Pdeathsig when the forking thread exits, not only
	// the process. The Go runtime ends a thread only when a goroutine exits
	// while locked to it, so a VMM dies with Ember's thread if code
	// elsewhere in the process does that on the thread that forked it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	if opts.noFileLimit > 0 {
		// NOTE: the limit is set right after the child started, so code
		// that runs in the child before this call still sees Ember's own
		// limit. os/exec has no hook between fork and exec to close that
		// window.
		lim := unix.Rlimit{Cur: opts.noFileLimit, Max: opts.noFileLimit}
		_ = unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, &lim, nil)
	}
	p := &process{cmd: cmd, exited: make(chan struct{}), copyDone: make(chan struct{})}
	go func() {
		defer close(p.copyDone)
		io.Copy(opts.console, stdout)
	}()
	go func() {
		// Drain the console before Wait closes the pipe.
		<-p.copyDone
		err := cmd.Wait()
		p.state = cmd.ProcessState
		if p.state == nil {
			p.state = &os.ProcessState{}
			_ = err
		}
		close(p.exited)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// alive reports whether the child has not exited.
func (p *process) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// signal sends sig unless the child already exited.
func (p *process) signal(sig syscall.Signal) {
	if p.alive() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// wait waits for the child to exit or for d to pass, and reports whether it
// exited.
func (p *process) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.exited:
		return true
	case <-t.C:
		return false
	}
}

// kill sends SIGKILL and waits for the child to be reaped.
func (p *process) kill() {
	p.signal(syscall.SIGKILL)
	<-p.exited
}

// exitDescription describes how the child ended, such as "exit status 1"
// or "signal: killed".
func (p *process) exitDescription() string {
	if p.state == nil {
		return "running"
	}
	return p.state.String()
}

// waitForSocket waits until the API socket at path accepts connections. It
// polls every millisecond for the first fastPollPeriod, which covers a
// normal start, then backs off exponentially up to 50 ms. It gives up when
// ctx ends, when timeout passes, or when the child exits.
func waitForSocket(ctx context.Context, p *process, path string, timeout time.Duration) error {
	start := time.Now()
	deadline := start.Add(timeout)
	delay := time.Millisecond
	for {
		conn, err := net.DialTimeout("unix", path, 100*time.Millisecond)
		if err == nil {
			conn.Close()
			return nil
		}
		if !p.alive() {
			return fmt.Errorf("wait for api socket %s: %w (%s)", path, errProcessExited, p.exitDescription())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for api socket %s: timed out after %s: %w", path, timeout, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("wait for api socket %s: %w", path, ctx.Err())
		case <-p.exited:
			t.Stop()
		case <-t.C:
		}
		if time.Since(start) > fastPollPeriod {
			delay = min(delay*2, 50*time.Millisecond)
		}
	}
}

// fastPollPeriod is how long waitForSocket polls every millisecond.
// Firecracker 1.14.1 served its socket a median 1.5 ms after the start on
// a 2-core test machine under load (docs/benchmarks.md). A doubling
// backoff from the start overslept that by up to half the elapsed time.
const fastPollPeriod = 50 * time.Millisecond

var errProcessExited = errors.New("firecracker exited")

// ring is a fixed-size buffer that keeps the most recent bytes written.
type ring struct {
	mu   sync.Mutex
	buf  []byte
	size int
}

func newRing(size int) *ring { return &ring{size: size} }

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, p...)
	if over := len(r.buf) - r.size; over > 0 {
		r.buf = append(r.buf[:0], r.buf[over:]...)
	}
	return len(p), nil
}

// Bytes returns a copy of the buffered bytes.
func (r *ring) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.buf...)
}

// clearStaleSocket removes a Unix socket file that nothing listens on, so a
// new listener can bind its path. A socket that accepts a connection is in
// use and is left alone.
func clearStaleSocket(path string) error {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	conn, err := net.DialTimeout("unix", path, 200*time.Millisecond)
	if err == nil {
		conn.Close()
		return fmt.Errorf("socket %s: %w", path, errSocketInUse)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

var errSocketInUse = errors.New("socket is in use by a running process")
