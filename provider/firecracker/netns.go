package firecracker

import (
	"fmt"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/internal/netnsfile"
)

// A VM whose Config.NetNS is set runs its Firecracker in that network
// namespace, so that Firecracker can open TAP devices that live there.
// Linux switches namespaces per thread, and a child starts in the network
// namespace of the thread that forked it. Unjailed, Ember therefore locks a
// goroutine to its OS thread and moves that thread into the namespace with
// setns(2). It forks Firecracker there, then moves the thread back before
// unlocking it. Jailed, the jailer joins the namespace itself (--netns), so
// Ember starts the jailer from any thread.
//
// Switching back is required, not only tidy: the child's parent-death
// signal (Pdeathsig) fires when the thread that forked it exits, so a
// thread left to die would take the VMM with it. When the switch back
// fails, the goroutine exits still locked, the Go runtime destroys the
// thread, and the spawn is reported as failed after the child was killed.

// checkNetNS and openNetNS check and open a network namespace file; see
// package netnsfile.
var (
	checkNetNS = netnsfile.Check
	openNetNS  = netnsfile.Open
)

// spawnInNetNS starts the child of opts inside the network namespace at
// path. The calling goroutine's thread never changes namespace.
func spawnInNetNS(path string, opts spawnOptions) (*process, error) {
	target, err := openNetNS(path)
	if err != nil {
		return nil, err
	}
	defer target.Close()

	type result struct {
		proc *process
		err  error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// The thread's own namespace must be opened on this thread:
		// /proc/self/ns/net names the namespace of the thread group leader.
		self := "/proc/self/task/" + strconv.Itoa(unix.Gettid()) + "/ns/net"
		orig, err := os.Open(self)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("open own network namespace: %w", err)}
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("enter network namespace %s: %w", path, err)}
			return
		}

		proc, spawnErr := startChild(opts)

		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked, so the runtime destroys it when
			// this goroutine returns; its child would get Pdeathsig then.
			if proc != nil {
				proc.kill()
			}
			done <- result{err: fmt.Errorf("leave network namespace %s: %w", path, err)}
			return
		}
		runtime.UnlockOSThread()
		done <- result{proc: proc, err: spawnErr}
	}()
	r := <-done
	return r.proc, r.err
}
