package qemu

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"

	"github.com/embervm/ember/vm"
)

// startProcess starts QEMU with args for inst in the network namespace at
// path netns ("" for the provider's own). extra are inherited as
// descriptors 3, 4 and so on. QEMU's stdin and stdout are /dev/null, its
// stderr goes to qemu.log in the run directory, and the serial console to
// serial.log, which a follower copies into the ring buffer. A goroutine
// reaps the process and records its exit in inst.
func (p *Provider) startProcess(inst *instance, netns string, args []string, extra []*os.File) error {
	stderrLog, err := os.OpenFile(inst.path(stderrLogName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer stderrLog.Close()
	follower, err := newConsoleFollower(inst.path(serialLogName), inst.console)
	if err != nil {
		return err
	}

	cmd := exec.Command(p.binary, args...)
	cmd.Stderr = stderrLog
	cmd.ExtraFiles = extra
	cmd.Env = []string{}
	// A session of its own keeps terminal signals and hangups meant for
	// the caller, such as ^C in an interactive ember command, away from
	// QEMU, which outlives the caller when the provider is closed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}

	if err := startInNetNS(cmd, netns); err != nil {
		follower.close()
		return fmt.Errorf("start %s: %w", p.binary, err)
	}
	inst.cmd = cmd
	inst.pid = cmd.Process.Pid
	inst.follower = follower
	go follower.run()
	go func() {
		err := cmd.Wait()
		p.finishExit(inst, err)
	}()
	return nil
}

// finishExit records the exit of QEMU, reported by exitErr, and moves the
// VM to the state the exit implies: stopped after a guest power-off or a
// stop that the provider requested, failed after anything else. It then
// releases the QMP connection and the console follower.
func (p *Provider) finishExit(inst *instance, exitErr error) {
	// QEMU's exit ends the QMP connection. Let the event goroutine handle
	// the events sent before it, such as a guest SHUTDOWN, so that the
	// exit is judged with them.
	inst.mu.Lock()
	mon := inst.monitor
	inst.mu.Unlock()
	if mon != nil {
		select {
		case <-mon.eventsDone:
		case <-time.After(2 * time.Second):
		}
	}

	inst.mu.Lock()
	inst.exitErr = exitErr
	close(inst.exited)
	mon = inst.monitor
	inst.monitor = nil
	switch {
	case inst.stopping || inst.detached:
		// The operation that stopped QEMU records the new state, and a
		// detached VM belongs to whichever provider adopts it.
	case inst.guestShutdown != "" && inst.state == vm.StateRunning:
		inst.transitionLocked(vm.OpGuestExit)
		inst.reason = "guest shut down (" + inst.guestShutdown + ")"
	case vm.Allowed(inst.state, vm.OpFail):
		inst.transitionLocked(vm.OpFail)
		inst.reason = "qemu exited unexpectedly: " + describeExit(exitErr, inst.stderrTail())
	}
	if !inst.stopping {
		inst.persistExitLocked()
	}
	id, state, reason := inst.id, inst.state, inst.reason
	logged := inst.registered && !inst.detached
	inst.mu.Unlock()

	if mon != nil {
		mon.close()
	}
	if inst.follower != nil {
		inst.follower.stop()
	}
	switch {
	case !logged:
	case state == vm.StateFailed:
		inst.log.Error("qemu exited unexpectedly", "vm", id, "err", exitErr, "reason", reason)
	default:
		inst.log.Info("qemu exited", "vm", id, "state", state, "exit", describeExit(exitErr, ""))
	}
}

// handleEvent keeps the VM's state true to QMP events that the provider
// did not cause itself, such as a stop after a guest I/O error.
func (inst *instance) handleEvent(ev qmp.Event) {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	switch ev.Event {
	case "STOP":
		if inst.state == vm.StateRunning {
			inst.transitionLocked(vm.OpPause)
		}
	case "RESUME":
		if inst.state == vm.StatePaused {
			inst.transitionLocked(vm.OpResume)
		}
	case "SHUTDOWN":
		if guest, _ := ev.Data["guest"].(bool); guest {
			reason, _ := ev.Data["reason"].(string)
			inst.guestShutdown = orDefault(reason, "guest")
		}
	}
	inst.log.Debug("qmp event", "vm", inst.id, "event", ev.Event, "data", ev.Data)
}

// stderrTail returns the last lines QEMU wrote to stderr, which contain
// its reason for exiting, such as a kernel it could not load.
func (inst *instance) stderrTail() string {
	b, err := os.ReadFile(inst.dirLocked() + "/" + stderrLogName)
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 1024 {
		s = s[len(s)-1024:]
	}
	return s
}

func (inst *instance) dirLocked() string { return inst.dir }

func describeExit(err error, stderr string) string {
	msg := "exit status 0"
	if err != nil {
		msg = err.Error()
	}
	if stderr != "" {
		msg += ": " + stderr
	}
	return msg
}

// mon returns the QMP connection, or an error when QEMU has exited.
func (inst *instance) mon() (*monitor, error) {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	if inst.monitor == nil {
		return nil, fmt.Errorf("qemu of vm %q is not running", inst.id)
	}
	return inst.monitor, nil
}

// signal sends sig to QEMU unless it has exited. A child is signalled
// through its os.Process and an adopted process through its pidfd, so a
// recycled pid is never hit.
func (inst *instance) signal(sig syscall.Signal) {
	select {
	case <-inst.exited:
		return
	default:
	}
	if inst.cmd != nil {
		inst.cmd.Process.Signal(sig)
		return
	}
	unix.PidfdSendSignal(inst.pidfd, sig, nil, 0)
}

// waitExit waits up to d for QEMU to exit and reports whether it did.
func (inst *instance) waitExit(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-inst.exited:
		return true
	case <-t.C:
		return false
	}
}

// kill stops QEMU by force: SIGTERM, then SIGKILL after stopTimeout. It
// returns once the process is reaped.
func (inst *instance) kill(stopTimeout time.Duration) {
	inst.mu.Lock()
	inst.stopping = true
	inst.mu.Unlock()
	inst.signal(syscall.SIGTERM)
	if inst.waitExit(stopTimeout) {
		return
	}
	inst.signal(syscall.SIGKILL)
	<-inst.exited
}
