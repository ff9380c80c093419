package guest

import (
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reaper collects the exit status of orphaned processes, which the kernel
// hands to PID 1, without stealing the status of processes that exec
// started and waits for itself.
//
// Each pass peeks at an exited child with waitid(WNOWAIT) and reaps it only
// if exec does not track it. A tracked zombie can hide untracked ones from
// that peek, so Done starts another pass once exec has reaped its child.
// Start holds the lock across fork and registration, so a pass never finds
// a child that is not registered yet.
type Reaper struct {
	logger *slog.Logger
	poke   chan struct{}

	// forkMu is held for reading by Start across fork and registration, and
	// for writing by a reaping pass.
	forkMu sync.RWMutex

	mu      sync.Mutex
	tracked map[int]bool
}

var _ ProcessStarter = (*Reaper)(nil)

// NewReaper returns a reaper; Run starts it.
func NewReaper(logger *slog.Logger) *Reaper {
	return &Reaper{logger: logger, poke: make(chan struct{}, 1), tracked: map[int]bool{}}
}

// Start starts cmd and tracks its process until Done.
func (r *Reaper) Start(cmd *exec.Cmd) error {
	r.forkMu.RLock()
	defer r.forkMu.RUnlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	r.mu.Lock()
	r.tracked[cmd.Process.Pid] = true
	r.mu.Unlock()
	return nil
}

// Done stops tracking pid after exec reaped it and starts a reaping pass.
func (r *Reaper) Done(pid int) {
	r.mu.Lock()
	delete(r.tracked, pid)
	r.mu.Unlock()
	r.wake()
}

func (r *Reaper) wake() {
	select {
	case r.poke <- struct{}{}:
	default:
	}
}

// Run reaps on every SIGCHLD and Done until ctx ends.
func (r *Reaper) Run(ctx context.Context) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGCHLD)
	defer signal.Stop(sigs)
	for {
		r.reapPass()
		select {
		case <-ctx.Done():
			return
		case <-sigs:
		case <-r.poke:
		}
	}
}

func (r *Reaper) reapPass() {
	r.forkMu.Lock()
	defer r.forkMu.Unlock()
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if err != nil {
			return // ECHILD: no children at all
		}
		pid := siginfoPid(&info)
		if pid == 0 {
			return // children exist, none has exited
		}
		r.mu.Lock()
		mine := r.tracked[pid]
		r.mu.Unlock()
		if mine {
			return // exec's Wait will reap it, then Done calls again
		}
		var ws unix.WaitStatus
		if _, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err != nil {
			return
		}
		r.logger.Debug("reaped orphan", "pid", pid, "status", int(ws))
	}
}

// siginfoPid returns si_pid of a SIGCHLD siginfo, which Linux stores after
// the three int32 fields and their padding, at offset 16.
func siginfoPid(info *unix.Siginfo) int {
	b := (*[128]byte)(unsafe.Pointer(info))
	return int(int32(binary.NativeEndian.Uint32(b[16:20])))
}
