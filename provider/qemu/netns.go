package qemu

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/internal/netnsfile"
	"github.com/embervm/ember/vm"
)

// A VM runs its QEMU in the network namespace named by its Config.NetNS,
// or by Options.NetNS when the VM names none, so that QEMU opens TAP
// devices that live in that namespace. Linux switches network namespaces
// per thread, and a child starts in the namespace of the thread that
// forked it. The provider therefore locks a goroutine to its OS thread,
// moves that thread into the namespace with setns(2), starts QEMU there
// and moves the thread back before it unlocks it.
//
// Moving back matters: an unlocked thread left in another namespace would
// run unrelated goroutines there. When the move back fails, the goroutine
// returns still locked so that the Go runtime ends the thread, and QEMU,
// if it started, is killed and reaped because the start is reported as
// failed. QEMU is started without Pdeathsig, because it outlives the
// provider (see Provider.Close), so the forking thread may exit while
// QEMU runs.

// netnsOf returns the network namespace path QEMU of cfg runs in: the
// VM's own, else the provider's, else "" for the provider's namespace.
func (p *Provider) netnsOf(cfg *vm.Config) string {
	if cfg.NetNS != "" {
		return cfg.NetNS
	}
	return p.opts.NetNS
}

// checkNetNS and openNetNS check and open a network namespace file; see
// package netnsfile.
var (
	checkNetNS = netnsfile.Check
	openNetNS  = netnsfile.Open
)

// startInNetNS starts cmd in the network namespace at path, or in the
// caller's namespace when path is "". The calling goroutine's thread never
// changes namespace.
func startInNetNS(cmd *exec.Cmd, path string) error {
	if path == "" {
		return cmd.Start()
	}
	target, err := openNetNS(path)
	if err != nil {
		return err
	}
	defer target.Close()

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// /proc/self/ns/net is the namespace of the thread group leader,
		// so this thread's own namespace is opened through its task entry.
		orig, err := os.Open("/proc/self/task/" + strconv.Itoa(unix.Gettid()) + "/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		startErr := cmd.Start()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked, so the runtime ends it with this
			// goroutine instead of reusing it in the wrong namespace.
			if startErr == nil {
				cmd.Process.Kill()
				cmd.Wait()
			}
			errc <- errors.Join(startErr, fmt.Errorf("return from network namespace %s: %w", path, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- startErr
	}()
	return <-errc
}
