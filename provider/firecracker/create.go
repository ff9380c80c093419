package firecracker

import (
	"context"
	"errors"
	"fmt"
	"github.com/embervm/ember/internal/cleanup"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/vm"
)

// Names of the files in a VM's run directory.
const (
	apiSocketName  = "api.sock"
	consoleLogName = "console.log"
	vmmLogName     = "firecracker.log"
	metricsName    = "metrics.json"
	uffdSocketName = "uffd.sock"
	mergedMemName  = "memory.merged"
)

// Create starts a Firecracker process for cfg and configures it. A cold
// boot leaves the VM created; a restore leaves it paused, or running when
// cfg.RestoreFrom requests a resume. A failed Create leaves no process, socket
// or run directory behind.
func (p *Provider) Create(ctx context.Context, cfg vm.Config) (vm.Info, error) {
	if err := cfg.Validate(); err != nil {
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
	}
	cfg = cfg.Clone()
	if err := p.checkStatic(cfg); err != nil {
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
	}
	if netns := p.netnsOf(cfg); netns != "" {
		if err := checkNetNS(netns); err != nil {
			return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
		}
	}
	// Checks that need the version run before any process when the version
	// is already known.
	if v := p.cachedVersion(); !v.IsZero() {
		if err := p.checkVersioned(v, cfg); err != nil {
			return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
		}
	}
	var snap *snapshotMeta
	if cfg.IsRestore() {
		var err error
		if snap, err = p.readSnapshotMeta(cfg.RestoreFrom.VMID, cfg.RestoreFrom.SnapshotID); err != nil {
			return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
		}
		if v := p.cachedVersion(); !v.IsZero() {
			if err := p.checkRestore(v, cfg, snap); err != nil {
				return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
			}
		}
	}
	if err := p.reserve(cfg.ID); err != nil {
		return vm.Info{}, err
	}
	defer p.unreserve(cfg.ID)

	var rb cleanup.Stack
	m, err := p.startVMM(ctx, cfg, &rb)
	if err == nil {
		if cfg.IsRestore() {
			err = p.restore(ctx, m, cfg, snap, &rb)
		} else {
			err = p.configure(ctx, m, cfg)
		}
	}
	if err != nil {
		if rbErr := rb.Run(); rbErr != nil {
			p.log.Warn("cleanup after failed create", "vm", cfg.ID, "err", rbErr)
		}
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
	}
	rb.Release()

	p.mu.Lock()
	p.vms[cfg.ID] = m
	p.mu.Unlock()
	go p.watch(m)
	p.log.Info("vm created", "vm", cfg.ID, "state", string(m.info().State), "pid", m.pid(), "restore", cfg.IsRestore())
	return m.info(), nil
}

// netnsOf returns the network namespace VM cfg runs in: its own, or under
// a jailer the jailer's default; "" means Ember's own namespace.
func (p *Provider) netnsOf(cfg vm.Config) string {
	if cfg.NetNS == "" && p.cfg.Jailer != nil {
		return p.cfg.Jailer.NetNS
	}
	return cfg.NetNS
}

// checkStatic rejects what no Firecracker version supports.
func (p *Provider) checkStatic(cfg vm.Config) error {
	for _, n := range cfg.NetworkInterfaces {
		if n.MTU != 0 {
			// No release has an MTU field, so any version fails.
			return fcapi.Require(fcapi.MinSupported, fcapi.FeatureNetworkMTU)
		}
	}
	return nil
}

// checkVersioned checks cfg against Firecracker v.
func (p *Provider) checkVersioned(v fcapi.Version, cfg vm.Config) error {
	if cfg.IsRestore() {
		return nil
	}
	hasDevices := cfg.Rootfs != "" || len(cfg.ExtraDrives) > 0 || len(cfg.NetworkInterfaces) > 0 || cfg.Vsock != nil
	if p.cfg.KernelNeedsACPI && hasDevices {
		if err := fcapi.Require(v, fcapi.FeatureACPI); err != nil {
			return err
		}
	}
	return fcapi.CheckMachineConfig(v, p.machineConfig(cfg))
}

func (p *Provider) machineConfig(cfg vm.Config) fcapi.MachineConfig {
	return fcapi.MachineConfig{
		VCPUCount: cfg.VCPUCount, MemSizeMiB: cfg.MemSizeMiB,
		TrackDirtyPages: cfg.TrackDirtyPages, HugePages: p.cfg.HugePages,
	}
}

// startVMM creates the run directory and log files, spawns Firecracker
// (directly or through the jailer), waits for its API socket and reads its
// version. Every step registers its undo on rb.
func (p *Provider) startVMM(ctx context.Context, cfg vm.Config, rb *cleanup.Stack) (*machine, error) {
	runDir, err := p.newRunDir()
	if err != nil {
		return nil, fmt.Errorf("create run directory: %w", err)
	}
	rb.Add(func(context.Context) error { return os.RemoveAll(runDir) })

	m := &machine{
		id: cfg.ID, cfg: cfg, runDir: runDir, createdAt: time.Now(),
		console: newRing(p.cfg.ConsoleBufferSize), trackDirty: cfg.TrackDirtyPages,
	}
	consoleLog, err := os.OpenFile(filepath.Join(runDir, consoleLogName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create console log: %w", err)
	}
	for _, name := range []string{vmmLogName, metricsName} {
		if err := os.WriteFile(filepath.Join(runDir, name), nil, 0o600); err != nil {
			consoleLog.Close()
			return nil, fmt.Errorf("create %s: %w", name, err)
		}
	}
	console := io.MultiWriter(consoleLog, m.console)

	apiSock := filepath.Join(runDir, apiSocketName)
	logPath := filepath.Join(runDir, vmmLogName)
	metricsPath := filepath.Join(runDir, metricsName)
	opts := spawnOptions{
		path: p.cfg.Binary,
		args: []string{
			"--api-sock", apiSock, "--id", cfg.ID,
			"--log-path", logPath, "--level", p.cfg.LogLevel,
			"--metrics-path", metricsPath,
		},
		env: p.cfg.Env, console: console, noFileLimit: p.cfg.NoFileLimit,
		netns: cfg.NetNS,
	}
	if p.cfg.Jailer != nil {
		j, err := p.newJail(cfg, runDir)
		if err != nil {
			consoleLog.Close()
			return nil, err
		}
		rb.Add(func(context.Context) error { return j.teardown() })
		m.jail = j
		opts, apiSock, metricsPath, err = j.spawnOptions(opts)
		if err != nil {
			consoleLog.Close()
			return nil, err
		}
	}

	proc, err := spawn(opts)
	if err != nil {
		consoleLog.Close()
		return nil, fmt.Errorf("start %s: %w", opts.path, err)
	}
	m.proc = proc
	rb.Add(func(context.Context) error {
		proc.kill()
		consoleLog.Close()
		return nil
	})
	go func() {
		<-proc.exited
		consoleLog.Close()
	}()

	if m.jail != nil {
		if err := m.jail.waitFirecracker(ctx, proc, p.cfg.SocketTimeout); err != nil {
			return nil, err
		}
	}
	if err := waitForSocket(ctx, proc, apiSock, p.cfg.SocketTimeout); err != nil {
		return nil, err
	}
	m.client = fcapi.New(apiSock)
	rb.Add(func(context.Context) error { m.client.Close(); return nil })
	m.metrics = newMetricsReader(metricsPath)

	v, err := p.learnVersion(ctx, m.client)
	if err != nil {
		return nil, err
	}
	m.version = v
	return m, nil
}

// configure sends the cold-boot configuration: machine, boot source,
// drives, network interfaces and vsock. Logger and metrics were set on the
// command line.
func (p *Provider) configure(ctx context.Context, m *machine, cfg vm.Config) error {
	if err := p.checkVersioned(m.version, cfg); err != nil {
		return err
	}
	mc := p.machineConfig(cfg)
	if err := m.client.PutMachineConfig(ctx, mc); err != nil {
		return fmt.Errorf("configure machine: %w", err)
	}

	paths := m.pathMapper()
	kernel, err := paths(cfg.Kernel, "vmlinux", false)
	if err != nil {
		return err
	}
	boot := fcapi.BootSource{KernelImagePath: kernel, BootArgs: cfg.BootArgs}
	if cfg.Initrd != "" {
		if boot.InitrdPath, err = paths(cfg.Initrd, "initrd", false); err != nil {
			return err
		}
	}
	if err := m.client.PutBootSource(ctx, boot); err != nil {
		return fmt.Errorf("configure boot source: %w", err)
	}

	for _, d := range cfg.Drives() {
		path, err := paths(d.PathOnHost, driveName(d.ID), !d.IsReadOnly)
		if err != nil {
			return err
		}
		drive := fcapi.Drive{
			DriveID: d.ID, PathOnHost: path, IsRootDevice: d.ID == vm.RootDriveID,
			IsReadOnly: d.IsReadOnly, RateLimiter: rateLimiter(d.RateLimiter),
		}
		if err := m.client.PutDrive(ctx, drive); err != nil {
			return fmt.Errorf("configure drive %q: %w", d.ID, err)
		}
	}
	for _, n := range cfg.NetworkInterfaces {
		nic := fcapi.NetworkInterface{
			IfaceID: n.IfaceID, HostDevName: n.HostDevName, GuestMAC: n.GuestMAC,
			RxRateLimiter: rateLimiter(n.RxRateLimiter), TxRateLimiter: rateLimiter(n.TxRateLimiter),
		}
		if err := m.client.PutNetworkInterface(ctx, nic); err != nil {
			return fmt.Errorf("configure network interface %q: %w", n.IfaceID, err)
		}
	}
	if cfg.Vsock != nil {
		hostPath := cfg.Vsock.UDSPath
		if err := clearStaleSocket(hostPath); err != nil {
			return fmt.Errorf("configure vsock: %w", err)
		}
		path, err := m.socketPathInJail(hostPath)
		if err != nil {
			return err
		}
		if err := m.client.PutVsock(ctx, fcapi.Vsock{GuestCID: cfg.Vsock.GuestCID, UDSPath: path}); err != nil {
			return fmt.Errorf("configure vsock: %w", err)
		}
	}
	m.state = vm.StateCreated
	return nil
}

// rateLimiter converts a limiter, dropping disabled buckets, which
// Firecracker would otherwise treat as present.
func rateLimiter(r *vm.RateLimiter) *fcapi.RateLimiter {
	if r == nil {
		return nil
	}
	out := &fcapi.RateLimiter{}
	if r.Bandwidth.Enabled() {
		out.Bandwidth = &fcapi.TokenBucket{Size: r.Bandwidth.Size, OneTimeBurst: r.Bandwidth.OneTimeBurst, RefillTime: r.Bandwidth.RefillTime}
	}
	if r.Ops.Enabled() {
		out.Ops = &fcapi.TokenBucket{Size: r.Ops.Size, OneTimeBurst: r.Ops.OneTimeBurst, RefillTime: r.Ops.RefillTime}
	}
	if out.Bandwidth == nil && out.Ops == nil {
		return nil
	}
	return out
}

// Start boots a created VM with InstanceStart.
func (p *Provider) Start(ctx context.Context, id string) error {
	m, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.check(vm.OpStart); err != nil {
		return err
	}
	if err := m.client.Action(ctx, fcapi.ActionInstanceStart); err != nil {
		return fmt.Errorf("start vm %q: %w", id, p.apiFailure(m, err))
	}
	return m.transition(vm.OpStart)
}

// Pause pauses a running VM with PATCH /vm.
func (p *Provider) Pause(ctx context.Context, id string) error {
	return p.patchState(ctx, id, vm.OpPause, fcapi.VMPaused)
}

// Resume resumes a paused VM with PATCH /vm.
func (p *Provider) Resume(ctx context.Context, id string) error {
	return p.patchState(ctx, id, vm.OpResume, fcapi.VMResumed)
}

func (p *Provider) patchState(ctx context.Context, id string, op vm.Op, state string) error {
	m, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.check(op); err != nil {
		return err
	}
	if err := m.client.PatchVM(ctx, state); err != nil {
		return fmt.Errorf("%s vm %q: %w", op, id, p.apiFailure(m, err))
	}
	return m.transition(op)
}

// apiFailure adds errNotRunning to err when the process has died, so the
// caller can tell a dead VMM from a rejected request.
func (p *Provider) apiFailure(m *machine, err error) error {
	if m.proc != nil && !m.vmmAlive() {
		return errors.Join(err, errNotRunning)
	}
	return err
}
