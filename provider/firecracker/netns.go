package firecracker

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/vm"
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

// checkNetNS reports whether path names a network namespace, as a
// *vm.ValidationError for the field "netns" when it does not.
func checkNetNS(path string) error {
	f, err := openNetNS(path)
	if err != nil {
		return err
	}
	f.Close()
	return nil
}

// openNetNS opens the network namespace file at path, such as
// /run/netns/NAME or /proc/PID/ns/net. A path that does not exist, or
// that is not a network namespace, returns a *vm.ValidationError.
func openNetNS(path string) (*os.File, error) {
	invalid := func(problem string) error {
		return &vm.ValidationError{Problems: []vm.FieldError{{Field: "netns", Problem: problem}}}
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, invalid(fmt.Sprintf("%s does not exist: create the network namespace first (ip netns add NAME)", path))
	}
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	// A namespace file is a regular file to stat(2). Checking first keeps
	// open(2) away from FIFOs and devices, where it can block or act.
	if !fi.Mode().IsRegular() {
		return nil, invalid(fmt.Sprintf("%s is not a network namespace", path))
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	// NS_GET_NSTYPE fails with ENOTTY on a file that is not a namespace.
	// On a namespace file it returns the namespace's CLONE_NEW* flag.
	kind, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil || kind != unix.CLONE_NEWNET {
		f.Close()
		return nil, invalid(fmt.Sprintf("%s is not a network namespace", path))
	}
	return f, nil
}

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
