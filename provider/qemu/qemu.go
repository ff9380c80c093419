package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/embervm/ember/vm"
)

const backendName = "qemu"

// Built-in values used where [Options] leaves a field at its zero value.
const (
	DefaultBinary         = "qemu-system-x86_64"
	DefaultProbeTimeout   = 20 * time.Second
	DefaultStopTimeout    = 5 * time.Second
	DefaultConsoleBytes   = 256 << 10
	DefaultConsoleLines   = 4000
	defaultQMPDialTimeout = 10 * time.Second
)

// ErrSnapshotCorrupt means a snapshot's files are damaged or incomplete:
// its metadata cannot be read, or a file is shorter or longer than when it
// was written.
var ErrSnapshotCorrupt = errors.New("snapshot corrupt")

// Options configures a [Provider]. The zero value of every field is a
// documented default.
type Options struct {
	// Binary is the QEMU system emulator; "" means DefaultBinary looked up
	// in PATH.
	Binary string
	// RunDir is the parent of the per-VM run directories, which contain
	// the QMP and agent sockets, the console log and the pid file. ""
	// means "ember-qemu" under os.TempDir(). Keep it short: the socket
	// paths <RunDir>/<vm id>/agent.sock must fit in 107 bytes.
	RunDir string
	// SnapshotDir contains snapshots as <SnapshotDir>/<vm id>/<snapshot
	// id>/. "" means "snapshots" under RunDir.
	SnapshotDir string
	// Accel selects the accelerator; "" means AccelAuto.
	Accel Accel
	// TCGMultiThread runs each vCPU on its own host thread under TCG
	// (-accel tcg,thread=multi). It only helps guests with more than one
	// vCPU.
	TCGMultiThread bool
	// ProbeTimeout bounds the probe boot that AccelAuto runs on hosts
	// with a hardware KVM module; 0 means DefaultProbeTimeout.
	ProbeTimeout time.Duration
	// StopTimeout is how long a forced stop waits after SIGTERM before it
	// sends SIGKILL; 0 means DefaultStopTimeout.
	StopTimeout time.Duration
	// ConsoleBytes and ConsoleLines bound the in-memory console buffer of
	// each VM; 0 means DefaultConsoleBytes and DefaultConsoleLines. The
	// console log file in the run directory is not bounded.
	ConsoleBytes int
	ConsoleLines int
	// TSCKHz is the TSC frequency in kHz passed to TCG guests through the
	// tsc_early_khz kernel parameter, unless their boot args set it. 0
	// means the host's, read from /proc/cpuinfo when the host kernel has
	// the exact value. A negative value turns the hint off. Without it, a
	// TCG guest on a busy host can hang while it calibrates its clock.
	TSCKHz int
	// NetNS is the path of a network namespace, such as
	// /run/netns/<name>, in which QEMU processes start and open their
	// TAP devices, for VMs whose Config.NetNS is empty. A VM's own NetNS
	// takes precedence. "" means the provider's own namespace.
	NetNS string
	// Logger receives life-cycle events; nil means slog.Default().
	Logger *slog.Logger
}

// Provider runs VMs as QEMU microvm processes. Create one with [New].
type Provider struct {
	opts        Options
	binary      string
	version     string
	runDir      string
	snapshotDir string
	log         *slog.Logger
	// vhostVsock reports whether /dev/vhost-vsock existed at New.
	vhostVsock bool
	// tscKHz is the TSC hint for TCG guests; 0 means none.
	tscKHz int

	accelOnce sync.Once
	accel     Accel

	mu sync.Mutex
	// vms maps ids to VMs, including VMs whose process has exited, until
	// Destroy.
	vms map[string]*instance
	// pending contains the ids of VMs that Create is setting up.
	pending map[string]bool
}

var (
	_ vm.Provider        = (*Provider)(nil)
	_ vm.ConsoleReader   = (*Provider)(nil)
	_ vm.AgentDialer     = (*Provider)(nil)
	_ vm.SnapshotDeleter = (*Provider)(nil)
	_ vm.VersionReporter = (*Provider)(nil)
	_ vm.Detacher        = (*Provider)(nil)
)

var versionPattern = regexp.MustCompile(`QEMU emulator version (\d+\.\d+\.\d+)`)

// New checks that the QEMU binary runs, creates the run and snapshot
// directories, adopts the VMs that an earlier provider left running in
// RunDir (see [Provider.Close]) and returns a provider. With AccelAuto the
// accelerator is chosen at the first cold boot, because the KVM probe
// needs a kernel.
func New(ctx context.Context, opts Options) (*Provider, error) {
	switch opts.Accel {
	case "":
		opts.Accel = AccelAuto
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return nil, fmt.Errorf("new qemu provider: accelerator %q is invalid, must be auto, kvm or tcg", opts.Accel)
	}
	opts.ProbeTimeout = orDefault(opts.ProbeTimeout, DefaultProbeTimeout)
	opts.StopTimeout = orDefault(opts.StopTimeout, DefaultStopTimeout)
	opts.ConsoleBytes = orDefault(opts.ConsoleBytes, DefaultConsoleBytes)
	opts.ConsoleLines = orDefault(opts.ConsoleLines, DefaultConsoleLines)
	if opts.RunDir == "" {
		opts.RunDir = filepath.Join(os.TempDir(), "ember-qemu")
	}
	if opts.SnapshotDir == "" {
		opts.SnapshotDir = filepath.Join(opts.RunDir, "snapshots")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}

	binary := orDefault(opts.Binary, DefaultBinary)
	path, err := exec.LookPath(binary)
	if err != nil {
		return nil, fmt.Errorf("new qemu provider: find %s: %w (install Debian's qemu-system-x86 package)", binary, err)
	}
	out, err := exec.CommandContext(ctx, path, "-version").Output()
	if err != nil {
		return nil, fmt.Errorf("new qemu provider: run %s -version: %w", path, err)
	}
	match := versionPattern.FindSubmatch(out)
	if match == nil {
		return nil, fmt.Errorf("new qemu provider: %s -version printed no QEMU version: %q", path, out)
	}

	for _, dir := range []string{opts.RunDir, opts.SnapshotDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("new qemu provider: %w", err)
		}
	}
	_, statErr := os.Stat("/dev/vhost-vsock")

	p := &Provider{
		opts:        opts,
		binary:      path,
		version:     string(match[1]),
		runDir:      opts.RunDir,
		snapshotDir: opts.SnapshotDir,
		log:         log.With("backend", backendName),
		vhostVsock:  statErr == nil,
		vms:         map[string]*instance{},
		pending:     map[string]bool{},
	}
	switch {
	case opts.TSCKHz > 0:
		p.tscKHz = opts.TSCKHz
	case opts.TSCKHz == 0:
		p.tscKHz = hostTSCKHz()
	}
	if opts.Accel != AccelAuto {
		p.accelOnce.Do(func() { p.accel = opts.Accel })
		p.log.Info("accelerator selected", "accel", p.accel, "reason", "set in options")
	}
	p.adoptAll(ctx)
	return p, nil
}

// Backend returns "qemu".
func (p *Provider) Backend() string { return backendName }

// VMMVersion returns the QEMU version, such as "7.2.22".
func (p *Provider) VMMVersion(context.Context) (string, error) { return p.version, nil }

// Accel returns the accelerator in use, or "" when AccelAuto has not
// chosen one yet.
func (p *Provider) Accel() Accel {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accel
}

// Get returns the current view of VM id.
func (p *Provider) Get(_ context.Context, id string) (vm.Info, error) {
	inst, err := p.lookup(id)
	if err != nil {
		return vm.Info{}, fmt.Errorf("get vm %q: %w", id, err)
	}
	return inst.info(), nil
}

// List returns every VM that has not been destroyed, sorted by id.
func (p *Provider) List(context.Context) ([]vm.Info, error) {
	p.mu.Lock()
	insts := make([]*instance, 0, len(p.vms))
	for _, inst := range p.vms {
		insts = append(insts, inst)
	}
	p.mu.Unlock()

	infos := make([]vm.Info, len(insts))
	for i, inst := range insts {
		infos[i] = inst.info()
	}
	slices.SortFunc(infos, func(a, b vm.Info) int { return strings.Compare(a.ID, b.ID) })
	return infos, nil
}

// Console returns the most recent console output of VM id.
func (p *Provider) Console(_ context.Context, id string) ([]byte, error) {
	inst, err := p.lookup(id)
	if err != nil {
		return nil, fmt.Errorf("read console of vm %q: %w", id, err)
	}
	if inst.follower != nil {
		inst.follower.poll()
	}
	return inst.console.Bytes(), nil
}

func (p *Provider) lookup(id string) (*instance, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	inst, ok := p.vms[id]
	if !ok {
		return nil, vm.ErrNotFound
	}
	return inst, nil
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}
