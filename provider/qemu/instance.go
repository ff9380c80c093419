package qemu

import (
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/embervm/ember/vm"
)

// instance is one VM and its QEMU process.
type instance struct {
	// opMu serializes the operations on this VM. It is held across QMP
	// commands, so the event and wait goroutines never take it: they
	// take only mu, which no code holds across a blocking call.
	opMu sync.Mutex

	// cmd is QEMU when this provider started it, and nil when it adopted
	// a QEMU that an earlier provider started.
	cmd *exec.Cmd
	// pid is QEMU's process id, and pidfd a pidfd of an adopted QEMU.
	pid   int
	pidfd int
	// wake is the write end of a pipe whose closing stops the wait
	// goroutine of an adopted QEMU.
	wake     *os.File
	monitor  *monitor
	console  *consoleRing
	follower *consoleFollower
	// accel is the accelerator QEMU runs under.
	accel Accel
	// exited is closed once the process has exited.
	exited  chan struct{}
	created time.Time
	log     *slog.Logger

	mu    sync.Mutex
	id    string
	dir   string
	cfg   vm.Config
	mach  machine
	state vm.State
	// reason explains StateStopped or StateFailed.
	reason string
	// stopping is set when the provider itself ends the process, so that
	// the exit is not reported as a VMM failure.
	stopping bool
	// guestShutdown is set when QEMU reported a shutdown that the guest
	// initiated (a power-off, reboot or panic).
	guestShutdown string
	exitErr       error
	// migratedTo is the directory of the snapshot last migrated out of
	// this VM while its vCPUs have stayed stopped since; "" once it runs.
	migratedTo string
	// registered is set once Create has returned the VM. Until then a
	// failure is reported by Create's error, not logged.
	registered bool
	// detached is set by Provider.Close: QEMU keeps running for a later
	// provider to adopt, and this one no longer tracks it.
	detached bool
}

func (inst *instance) info() vm.Info {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	info := vm.Info{
		ID:        inst.id,
		Backend:   backendName,
		State:     inst.state,
		Config:    inst.cfg.Clone(),
		CreatedAt: inst.created,
		Reason:    inst.reason,
	}
	if !inst.exitedLocked() {
		info.PID = inst.pid
	}
	return info
}

func (inst *instance) exitedLocked() bool {
	select {
	case <-inst.exited:
		return true
	default:
		return false
	}
}

// transition applies op through vm.Transition and returns the new state.
func (inst *instance) transition(op vm.Op) error {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return inst.transitionLocked(op)
}

func (inst *instance) transitionLocked(op vm.Op) error {
	to, err := vm.Transition(inst.id, inst.state, op)
	if err != nil {
		return err
	}
	if to == vm.StateRunning {
		inst.migratedTo = ""
	}
	if to != inst.state {
		inst.log.Debug("vm state changed", "vm", inst.id, "from", inst.state, "to", to, "op", op)
	}
	inst.state = to
	return nil
}

// check returns the transition error for op without applying it.
func (inst *instance) check(op vm.Op) error {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	_, err := vm.Transition(inst.id, inst.state, op)
	return err
}

func (inst *instance) currentState() vm.State {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return inst.state
}

func (inst *instance) runDir() string {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return inst.dir
}

func (inst *instance) path(name string) string {
	return filepath.Join(inst.runDir(), name)
}

func (inst *instance) vmID() string {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return inst.id
}
