package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/vm"
)

// Close detaches the provider from its VMs and leaves their QEMU processes
// running: it closes the QMP connections and stops following the consoles.
// A Provider created later with the same RunDir adopts the VMs. Close does
// not wait for anything else and the provider must not be used afterwards.
func (p *Provider) Close() error {
	p.mu.Lock()
	insts := make([]*instance, 0, len(p.vms))
	for _, inst := range p.vms {
		insts = append(insts, inst)
	}
	p.vms = map[string]*instance{}
	p.mu.Unlock()

	for _, inst := range insts {
		inst.opMu.Lock()
		inst.mu.Lock()
		inst.detached = true
		mon := inst.monitor
		inst.monitor = nil
		inst.mu.Unlock()
		if mon != nil {
			mon.close()
		}
		if inst.follower != nil {
			inst.follower.stop()
		}
		if inst.wake != nil {
			// Closing the pipe wakes the adopted VM's wait goroutine,
			// which then closes the pidfd and returns.
			inst.wake.Close()
			inst.wake = nil
		}
		inst.opMu.Unlock()
	}
	return nil
}

// adoptAll registers the VMs whose run directories an earlier provider
// left in RunDir. A VM whose QEMU still runs is tracked again, and one
// whose QEMU exited while no provider watched it is registered as failed,
// so that its console can be read before it is destroyed. Run directories
// without a readable vm.json are skipped with a warning.
func (p *Provider) adoptAll(ctx context.Context) {
	entries, err := os.ReadDir(p.runDir)
	if err != nil {
		p.log.Warn("cannot list the run directory to adopt vms", "dir", p.runDir, "err", err)
		return
	}
	for _, e := range entries {
		dir := filepath.Join(p.runDir, e.Name())
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") || dir == p.snapshotDir {
			continue
		}
		rec, err := readRecord(dir)
		if err != nil {
			p.log.Warn("skipping run directory without a valid vm record", "dir", dir, "err", err)
			continue
		}
		inst := p.adopt(ctx, dir, rec)
		p.mu.Lock()
		p.vms[rec.ID] = inst
		p.mu.Unlock()
		p.log.Info("vm adopted", "vm", rec.ID, "pid", rec.PID, "state", inst.currentState())
	}
}

// adopt builds the instance of an existing run directory.
func (p *Provider) adopt(ctx context.Context, dir string, rec vmRecord) *instance {
	inst := &instance{
		console:    newConsoleRing(p.opts.ConsoleBytes, p.opts.ConsoleLines),
		exited:     make(chan struct{}),
		created:    rec.CreatedAt,
		log:        p.log,
		pid:        rec.PID,
		accel:      rec.Accel,
		pidfd:      -1,
		id:         rec.ID,
		dir:        dir,
		cfg:        rec.Config,
		mach:       rec.Machine,
		state:      vm.StatePaused,
		registered: true,
	}
	if follower, err := newConsoleFollower(filepath.Join(dir, serialLogName), inst.console); err == nil {
		inst.follower = follower
		go follower.run()
	}

	fail := func(reason string) *instance {
		inst.state = vm.StateFailed
		inst.reason = reason
		close(inst.exited)
		if inst.follower != nil {
			inst.follower.stop()
		}
		return inst
	}

	// The pid file proves that the recorded pid is still this VM's QEMU
	// and not a recycled pid. A pidfd then follows that process.
	if rec.Exit != nil {
		inst.state, inst.reason = rec.Exit.State, rec.Exit.Reason
		close(inst.exited)
		if inst.follower != nil {
			inst.follower.stop()
		}
		return inst
	}
	if pid, ok := livePID(filepath.Join(dir, pidFileName)); !ok || pid != rec.PID {
		return fail("qemu exited while no provider was watching it")
	}
	pidfd, err := unix.PidfdOpen(rec.PID, 0)
	if err != nil {
		return fail("qemu exited while no provider was watching it")
	}
	wakeR, wakeW, err := os.Pipe()
	if err != nil {
		unix.Close(pidfd)
		return fail("cannot watch qemu: " + err.Error())
	}
	inst.pidfd = pidfd
	inst.wake = wakeW
	go p.waitAdopted(inst, pidfd, wakeR)

	mon, err := dialMonitor(ctx, filepath.Join(dir, qmpSocketName), inst.exited, inst.handleEvent)
	if err != nil {
		inst.mu.Lock()
		inst.reason = "cannot reconnect to qmp: " + err.Error()
		inst.mu.Unlock()
		p.log.Error("adopted vm has no qmp connection", "vm", rec.ID, "err", err)
		return inst
	}
	inst.mu.Lock()
	inst.monitor = mon
	inst.mu.Unlock()

	var status struct {
		Status string `json:"status"`
	}
	if err := mon.run(ctx, "query-status", nil, &status); err != nil {
		p.log.Error("cannot query the state of an adopted vm", "vm", rec.ID, "err", err)
		return inst
	}
	inst.mu.Lock()
	switch status.Status {
	case "prelaunch":
		inst.state = vm.StateCreated
	case "running":
		inst.state = vm.StateRunning
	default:
		// paused, postmigrate, and the stops after an error.
		inst.state = vm.StatePaused
	}
	inst.mu.Unlock()
	return inst
}

// waitAdopted waits for an adopted QEMU, which is not this process's
// child, to exit: its pidfd becomes readable then. Closing the write end
// of the wake pipe, as Close does, ends the wait without an exit.
func (p *Provider) waitAdopted(inst *instance, pidfd int, wake *os.File) {
	defer wake.Close()
	fds := []unix.PollFd{
		{Fd: int32(pidfd), Events: unix.POLLIN},
		{Fd: int32(wake.Fd()), Events: unix.POLLIN},
	}
	for {
		_, err := unix.Poll(fds, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || fds[1].Revents != 0 {
			unix.Close(pidfd)
			return
		}
		if fds[0].Revents != 0 {
			break
		}
	}
	// The exit status belongs to QEMU's parent, which is gone, so it is
	// not known here.
	p.finishExit(inst, errors.New("qemu exited (exit status unknown: the process was adopted)"))
	inst.opMu.Lock()
	unix.Close(pidfd)
	inst.pidfd = -1
	inst.opMu.Unlock()
}

// recordLocked returns the vm.json content for inst.
func (inst *instance) recordLocked() vmRecord {
	rec := vmRecord{
		ID:        inst.id,
		PID:       inst.pid,
		Accel:     inst.accel,
		Config:    inst.cfg.Clone(),
		Machine:   inst.mach,
		CreatedAt: inst.created,
	}
	if inst.state == vm.StateStopped || inst.state == vm.StateFailed {
		rec.Exit = &exitRecord{State: inst.state, Reason: inst.reason}
	}
	return rec
}

// persistExitLocked records in vm.json that QEMU has ended, in the state
// inst is in now. A failure is logged: the VM itself is unaffected, only a
// later adopter would report it as failed.
func (inst *instance) persistExitLocked() {
	if inst.detached || inst.dir == "" {
		return
	}
	if err := writeRecord(inst.dir, inst.recordLocked()); err != nil {
		inst.log.Warn("cannot record the final state of the vm", "vm", inst.id, "err", err)
	}
}
