package qemu

import (
	"context"
	"errors"
	"fmt"
	"github.com/embervm/ember/internal/cleanup"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/embervm/ember/vm"
)

// Create starts QEMU for cfg. A cold boot leaves the VM created: QEMU runs
// with its vCPUs stopped until Start. A restore loads the snapshot and
// leaves the VM paused, or running when cfg.RestoreFrom sets
// ResumeImmediately. A failed Create leaves no process or run directory
// behind.
func (p *Provider) Create(ctx context.Context, cfg vm.Config) (vm.Info, error) {
	cfg = cfg.Clone()
	if err := cfg.Validate(); err != nil {
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
	}
	if netns := p.netnsOf(&cfg); netns != "" {
		if err := checkNetNS(netns); err != nil {
			return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
		}
	}
	if err := p.reserve(cfg.ID); err != nil {
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
	}
	defer p.unreserve(cfg.ID)

	inst, err := p.create(ctx, &cfg)
	if err != nil {
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
	}
	p.mu.Lock()
	p.vms[cfg.ID] = inst
	p.mu.Unlock()
	inst.mu.Lock()
	inst.registered = true
	inst.mu.Unlock()
	return inst.info(), nil
}

func (p *Provider) create(ctx context.Context, cfg *vm.Config) (inst *instance, err error) {
	var rb cleanup.Stack
	defer func() {
		if err != nil {
			err = errors.Join(err, rb.Run())
		}
	}()

	dir := filepath.Join(p.runDir, cfg.ID)
	if err := checkSocketPaths(dir); err != nil {
		return nil, err
	}

	m, incoming, accel, err := p.prepare(ctx, cfg, dir, &rb)
	if err != nil {
		return nil, err
	}
	if incoming != nil {
		defer incoming.Close()
	}

	inst = &instance{
		accel:   accel,
		console: newConsoleRing(p.opts.ConsoleBytes, p.opts.ConsoleLines),
		exited:  make(chan struct{}),
		created: time.Now().UTC(),
		log:     p.log,
		id:      cfg.ID,
		dir:     dir,
		cfg:     *cfg,
		mach:    m,
		state:   vm.StateCreated,
	}
	if cfg.IsRestore() {
		// A restored VM starts out paused: its vCPUs stay stopped until
		// the migration stream is loaded and the caller resumes it.
		inst.state = vm.StatePaused
	}
	l := launch{runDir: dir, accel: accel, tcgMultiThread: p.opts.TCGMultiThread}
	var extra []*os.File
	if incoming != nil {
		l.incomingFD = 3
		extra = []*os.File{incoming}
		inst.cfg = m.config(cfg.ID)
		inst.cfg.RestoreFrom = cfg.RestoreFrom.Clone()
		inst.cfg.TrackDirtyPages = cfg.TrackDirtyPages
		inst.cfg.NetNS = cfg.NetNS
	}

	if err := p.startProcess(inst, p.netnsOf(cfg), buildArgs(&m, l), extra); err != nil {
		return nil, err
	}
	started := inst // inst, the named result, is nil when the rollback runs
	rb.AddFunc(func() error {
		started.mu.Lock()
		started.stopping = true
		started.mu.Unlock()
		started.signal(syscall.SIGKILL)
		<-started.exited
		return nil
	})

	mon, err := dialMonitor(ctx, filepath.Join(dir, qmpSocketName), inst.exited, inst.handleEvent)
	if err != nil {
		return nil, p.startFailure(inst, err, cfg.RestoreFrom)
	}
	inst.mu.Lock()
	inst.monitor = mon
	inst.mu.Unlock()

	if cfg.IsRestore() {
		if err := p.finishRestore(ctx, inst, cfg.RestoreFrom); err != nil {
			return nil, err
		}
	} else {
		var status struct {
			Status string `json:"status"`
		}
		if err := mon.run(ctx, "query-status", nil, &status); err != nil {
			return nil, p.startFailure(inst, err, nil)
		}
		if status.Status != "prelaunch" {
			return nil, fmt.Errorf("qemu reports status %q after start, expected prelaunch", status.Status)
		}
	}
	inst.mu.Lock()
	rec := inst.recordLocked()
	inst.mu.Unlock()
	if err := writeRecord(dir, rec); err != nil {
		return nil, err
	}
	p.log.Info("vm created", "vm", cfg.ID, "pid", inst.pid, "accel", accel,
		"restore", cfg.IsRestore(), "state", inst.currentState())
	return inst, nil
}

// prepare checks cfg against the host, creates the run directory dir and
// returns the machine to start, the accelerator and, for a restore, the
// opened snapshot state file. Undo steps go on rb.
func (p *Provider) prepare(ctx context.Context, cfg *vm.Config, dir string, rb *cleanup.Stack) (machine, *os.File, Accel, error) {
	if cfg.IsRestore() {
		meta, err := p.readSnapshot(cfg.RestoreFrom.VMID, cfg.RestoreFrom.SnapshotID)
		if err != nil {
			return machine{}, nil, "", err
		}
		accel := p.acceleratorFor(ctx, meta.Machine.Kernel)
		if err := p.checkRestore(cfg, meta, accel); err != nil {
			return machine{}, nil, "", err
		}
		if err := makeRunDir(dir); err != nil {
			return machine{}, nil, "", err
		}
		rb.AddFunc(func() error { return os.RemoveAll(dir) })
		m, incoming, err := p.prepareRestore(cfg, meta, dir)
		if err != nil {
			return machine{}, nil, "", err
		}
		return m, incoming, accel, nil
	}

	m, err := machineFromConfig(cfg, p.vhostVsock)
	if err != nil {
		return machine{}, nil, "", err
	}
	if err := checkHostFiles(&m, cfg); err != nil {
		return machine{}, nil, "", err
	}
	if err := makeRunDir(dir); err != nil {
		return machine{}, nil, "", err
	}
	rb.AddFunc(func() error { return os.RemoveAll(dir) })
	accel := p.acceleratorFor(ctx, m.Kernel)
	if accel == AccelTCG {
		m.BootArgs = withTSCHint(m.BootArgs, p.tscKHz)
	}
	return m, nil, accel, nil
}

// startFailure returns err, or QEMU's own exit message when QEMU exited
// during start, which is the more useful of the two. During a restore
// (ref set) an exit means that QEMU could not load the snapshot.
func (p *Provider) startFailure(inst *instance, err error, ref *vm.SnapshotRef) error {
	select {
	case <-inst.exited:
	case <-time.After(100 * time.Millisecond):
		return err
	}
	if ref != nil {
		return p.loadFailure(inst, ref)
	}
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return fmt.Errorf("qemu exited during start: %s", describeExit(inst.exitErr, inst.stderrTail()))
}

// checkSocketPaths checks that the sockets in run directory dir fit in a
// Unix socket address.
func checkSocketPaths(dir string) error {
	for _, name := range []string{qmpSocketName, agentSocketName} {
		path := filepath.Join(dir, name)
		if len(path) > vm.MaxUnixSocketPath {
			return &vm.ValidationError{Problems: []vm.FieldError{{
				Field:   "id",
				Problem: fmt.Sprintf("socket path %s is %d bytes, must be at most %d: use a shorter id or run directory", path, len(path), vm.MaxUnixSocketPath),
			}}}
		}
	}
	return nil
}

// makeRunDir creates a VM's run directory. A directory left behind by a
// QEMU that no longer runs is removed first. One whose pid file names a
// live QEMU belongs to a VM that this provider does not know, so the id is
// taken.
func makeRunDir(dir string) error {
	err := os.Mkdir(dir, 0o700)
	if !errors.Is(err, os.ErrExist) {
		return err
	}
	if pid, ok := livePID(filepath.Join(dir, pidFileName)); ok {
		return fmt.Errorf("run directory %s is in use by qemu pid %d: %w", dir, pid, vm.ErrAlreadyExists)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove stale run directory: %w", err)
	}
	return os.Mkdir(dir, 0o700)
}

func livePID(pidFile string) (int, bool) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	return pid, syscall.Kill(pid, 0) == nil
}

func (p *Provider) reserve(id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.vms[id]; ok || p.pending[id] {
		return vm.ErrAlreadyExists
	}
	p.pending[id] = true
	return nil
}

func (p *Provider) unreserve(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.pending, id)
}

// Start boots a created VM.
func (p *Provider) Start(ctx context.Context, id string) error {
	return p.control(ctx, id, vm.OpStart, "cont")
}

// Pause stops the vCPUs of a running VM.
func (p *Provider) Pause(ctx context.Context, id string) error {
	return p.control(ctx, id, vm.OpPause, "stop")
}

// Resume continues a paused VM.
func (p *Provider) Resume(ctx context.Context, id string) error {
	return p.control(ctx, id, vm.OpResume, "cont")
}

// control runs one QMP command that moves VM id through op.
func (p *Provider) control(ctx context.Context, id string, op vm.Op, command string) error {
	inst, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("%s vm %q: %w", op, id, err)
	}
	inst.opMu.Lock()
	defer inst.opMu.Unlock()

	if err := inst.check(op); err != nil {
		return err
	}
	mon, err := inst.mon()
	if err != nil {
		return fmt.Errorf("%s vm %q: %w", op, id, err)
	}
	if err := mon.run(ctx, command, nil, nil); err != nil {
		return fmt.Errorf("%s vm %q: %w", op, id, err)
	}
	return inst.settle(op)
}

// settle applies op after its QMP command succeeded. The matching QMP
// event may have applied it already, which is not an error.
func (inst *instance) settle(op vm.Op) error {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	target := map[vm.Op]vm.State{vm.OpStart: vm.StateRunning, vm.OpPause: vm.StatePaused, vm.OpResume: vm.StateRunning}[op]
	if inst.state == target {
		return nil
	}
	return inst.transitionLocked(op)
}

// Shutdown requests a power-off from a running guest with an ACPI
// power-button press and waits up to grace for QEMU to exit. A VM that is created or
// paused cannot handle the press, so it skips that step. If QEMU is still
// running after grace (or ctx ends first), Shutdown sends SIGTERM, then
// SIGKILL after StopTimeout, and always reaps the process.
func (p *Provider) Shutdown(ctx context.Context, id string, grace time.Duration) error {
	inst, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("shutdown vm %q: %w", id, err)
	}
	inst.opMu.Lock()
	defer inst.opMu.Unlock()

	if err := inst.check(vm.OpShutdown); err != nil {
		return err
	}
	inst.mu.Lock()
	inst.stopping = true
	state := inst.state
	inst.mu.Unlock()

	reason := "stopped by the provider"
	if state == vm.StateRunning {
		if mon, err := inst.mon(); err == nil {
			if err := mon.run(ctx, "system_powerdown", nil, nil); err != nil {
				p.log.Warn("acpi power-down failed, stopping qemu by force", "vm", id, "err", err)
			} else {
				timer := time.NewTimer(grace)
				select {
				case <-inst.exited:
					reason = "guest powered off"
				case <-timer.C:
					reason = fmt.Sprintf("guest did not power off within %s, qemu stopped by signal", grace)
				case <-ctx.Done():
					reason = "shutdown cancelled, qemu stopped by signal"
				}
				timer.Stop()
			}
		}
	}
	inst.kill(p.opts.StopTimeout)

	inst.mu.Lock()
	defer inst.mu.Unlock()
	if inst.state != vm.StateStopped {
		if err := inst.transitionLocked(vm.OpShutdown); err != nil {
			return err
		}
		inst.reason = reason
	}
	inst.persistExitLocked()
	p.log.Info("vm shut down", "vm", id, "reason", inst.reason)
	return nil
}

// Destroy kills QEMU, reaps it and removes the run directory. Snapshots
// stay. Destroying a VM whose QEMU already exited is not an error.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	inst, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("destroy vm %q: %w", id, err)
	}
	inst.opMu.Lock()
	defer inst.opMu.Unlock()

	if err := inst.check(vm.OpDestroy); err != nil {
		return err
	}
	inst.mu.Lock()
	inst.stopping = true
	inst.mu.Unlock()
	inst.signal(syscall.SIGKILL)
	<-inst.exited

	dir := inst.runDir()
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("destroy vm %q: remove run directory: %w", id, err)
	}
	if err := inst.transition(vm.OpDestroy); err != nil {
		return err
	}
	p.mu.Lock()
	delete(p.vms, inst.vmID())
	p.mu.Unlock()
	p.log.Info("vm destroyed", "vm", id)
	return nil
}

// Rename changes the id of VM id to newID and renames its run directory.
// QEMU keeps running: its open files and listening sockets move with the
// directory, so the agent socket is reachable at the new path.
func (p *Provider) Rename(ctx context.Context, id, newID string) error {
	if err := vm.ValidateID(newID); err != nil {
		return fmt.Errorf("rename vm %q: %w", id, err)
	}
	inst, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("rename vm %q: %w", id, err)
	}
	inst.opMu.Lock()
	defer inst.opMu.Unlock()

	if err := inst.check(vm.OpRename); err != nil {
		return err
	}
	if id == newID {
		return nil
	}
	newDir := filepath.Join(p.runDir, newID)
	if err := checkSocketPaths(newDir); err != nil {
		return fmt.Errorf("rename vm %q: %w", id, err)
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.vms[newID]; ok || p.pending[newID] {
		return fmt.Errorf("rename vm %q to %q: %w", id, newID, vm.ErrAlreadyExists)
	}
	if _, err := os.Lstat(newDir); err == nil {
		return fmt.Errorf("rename vm %q to %q: run directory %s exists: %w", id, newID, newDir, vm.ErrAlreadyExists)
	}
	inst.mu.Lock()
	defer inst.mu.Unlock()
	if err := os.Rename(inst.dir, newDir); err != nil {
		return fmt.Errorf("rename vm %q to %q: %w", id, newID, err)
	}
	inst.id = newID
	inst.dir = newDir
	inst.cfg.ID = newID
	delete(p.vms, id)
	p.vms[newID] = inst
	if err := writeRecord(newDir, inst.recordLocked()); err != nil {
		// QEMU and the provider run on under the new id, but a later
		// provider cannot adopt this VM.
		p.log.Warn("vm record not updated after rename", "vm", newID, "err", err)
	}
	p.log.Info("vm renamed", "vm", newID, "old_id", id)
	return nil
}

// DialAgent connects to the host end of VM id's "ember.agent"
// virtio-serial port. QEMU serves one connection at a time on it, and the
// guest's end of the port is open while a connection exists.
func (p *Provider) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	inst, err := p.lookup(id)
	if err != nil {
		return nil, fmt.Errorf("dial agent of vm %q: %w", id, err)
	}
	if _, err := inst.mon(); err != nil {
		return nil, fmt.Errorf("dial agent of vm %q: %w", id, err)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", inst.path(agentSocketName))
	if err != nil {
		return nil, fmt.Errorf("dial agent of vm %q: %w", id, err)
	}
	return conn, nil
}
