package firecracker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/provider/firecracker/uffd"
	"github.com/embervm/ember/vm"
)

// BackendName is the value of [Provider.Backend].
const BackendName = "firecracker"

// Defaults used where [Config] leaves a field at its zero value.
const (
	DefaultConsoleBufferSize = 64 << 10
	DefaultSocketTimeout     = 5 * time.Second
	DefaultNoFileLimit       = 4096
	DefaultAgentPort         = 1024
	DefaultLogLevel          = "Warning"
)

// MemoryBackend selects how a restore loads guest memory.
type MemoryBackend string

const (
	// MemoryFile makes Firecracker map the memory file. It is the default.
	MemoryFile MemoryBackend = "file"
	// MemoryUffd serves guest memory on demand through a userfaultfd
	// handler that Ember runs for the VM's life.
	MemoryUffd MemoryBackend = "uffd"
)

// Config configures a Provider. Binary, RunDir and SnapshotDir are
// required; every other zero value is a documented default.
type Config struct {
	// Binary is the path of the firecracker executable.
	Binary string
	// RunDir contains one short-named directory per VM with its API socket,
	// console log, Firecracker log and metrics file. Keep it short: a Unix
	// socket path has at most 107 bytes.
	RunDir string
	// SnapshotDir contains snapshots as SnapshotDir/<vm id>/<snapshot id>/.
	SnapshotDir string
	// Logger receives the provider's log; nil discards it.
	Logger *slog.Logger
	// ConsoleBufferSize is how many bytes of recent console output each VM
	// keeps in memory; 0 means DefaultConsoleBufferSize.
	ConsoleBufferSize int
	// SocketTimeout bounds the wait for a new process's API socket; 0 means
	// DefaultSocketTimeout.
	SocketTimeout time.Duration
	// NoFileLimit is the child's RLIMIT_NOFILE; 0 means
	// DefaultNoFileLimit. A huge inherited limit makes Firecracker and the
	// jailer start slowly.
	NoFileLimit uint64
	// Env is the child's whole environment; nil gives it none.
	Env []string
	// AgentPort is the guest vsock port DialAgent connects to; 0 means
	// DefaultAgentPort.
	AgentPort uint32
	// RestoreMemory selects the memory backend of restores; "" means
	// MemoryFile.
	RestoreMemory MemoryBackend
	// KernelNeedsACPI means that the guest kernel finds virtio devices only
	// through ACPI (it lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). Creating a
	// VM with devices then needs Firecracker 1.8 or later.
	KernelNeedsACPI bool
	// HugePages backs guest memory with huge pages: "" or "None" for none,
	// "2M" for 2 MiB pages.
	HugePages string
	// LogLevel is Firecracker's own log level; "" means DefaultLogLevel.
	LogLevel string
	// Jailer, when set, runs every VM through Firecracker's jailer.
	Jailer *JailerConfig
}

// Provider runs VMs on Firecracker. It implements [vm.Provider],
// [vm.ConsoleReader], [vm.AgentDialer], [vm.SnapshotDeleter] and
// [vm.VersionReporter].
type Provider struct {
	cfg Config
	log *slog.Logger

	versionMu sync.Mutex
	// version is the binary's version, read once from the first process.
	version fcapi.Version

	mu sync.Mutex
	// vms contains every VM that exists, keyed by id.
	vms map[string]*machine
	// reserved contains ids whose Create is under way.
	reserved map[string]bool
}

var (
	_ vm.Provider        = (*Provider)(nil)
	_ vm.ConsoleReader   = (*Provider)(nil)
	_ vm.AgentDialer     = (*Provider)(nil)
	_ vm.SnapshotDeleter = (*Provider)(nil)
	_ vm.VersionReporter = (*Provider)(nil)
)

// New checks cfg, creates its directories and returns a Provider.
func New(cfg Config) (*Provider, error) {
	var missing []string
	for name, v := range map[string]string{"Binary": cfg.Binary, "RunDir": cfg.RunDir, "SnapshotDir": cfg.SnapshotDir} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return nil, fmt.Errorf("new firecracker provider: missing %v: %w", missing, vm.ErrInvalid)
	}
	if cfg.RestoreMemory != "" && cfg.RestoreMemory != MemoryFile && cfg.RestoreMemory != MemoryUffd {
		return nil, fmt.Errorf("new firecracker provider: restore memory backend %q is invalid, want %q or %q: %w", cfg.RestoreMemory, MemoryFile, MemoryUffd, vm.ErrInvalid)
	}
	if cfg.ConsoleBufferSize <= 0 {
		cfg.ConsoleBufferSize = DefaultConsoleBufferSize
	}
	if cfg.SocketTimeout <= 0 {
		cfg.SocketTimeout = DefaultSocketTimeout
	}
	if cfg.NoFileLimit == 0 {
		cfg.NoFileLimit = DefaultNoFileLimit
	}
	if cfg.AgentPort == 0 {
		cfg.AgentPort = DefaultAgentPort
	}
	if cfg.RestoreMemory == "" {
		cfg.RestoreMemory = MemoryFile
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = DefaultLogLevel
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	for _, dir := range []string{cfg.RunDir, cfg.SnapshotDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("new firecracker provider: %w", err)
		}
	}
	return &Provider{
		cfg: cfg, log: logger.With("backend", BackendName),
		vms: map[string]*machine{}, reserved: map[string]bool{},
	}, nil
}

// Backend returns "firecracker".
func (p *Provider) Backend() string { return BackendName }

// VMMVersion returns the Firecracker version, starting a short-lived
// process to read it when no VM has run yet.
func (p *Provider) VMMVersion(ctx context.Context) (string, error) {
	v, err := p.binaryVersion(ctx)
	if err != nil {
		return "", err
	}
	return v.String(), nil
}

// binaryVersion returns the cached version or reads it from a throwaway
// Firecracker process.
func (p *Provider) binaryVersion(ctx context.Context) (fcapi.Version, error) {
	p.versionMu.Lock()
	v := p.version
	p.versionMu.Unlock()
	if !v.IsZero() {
		return v, nil
	}
	dir, err := os.MkdirTemp(p.cfg.RunDir, "v-")
	if err != nil {
		return fcapi.Version{}, fmt.Errorf("read firecracker version: %w", err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "api.sock")
	proc, err := spawn(spawnOptions{
		path: p.cfg.Binary, args: []string{"--api-sock", sock, "--id", "ember-version-probe"},
		env: p.cfg.Env, console: discard{}, noFileLimit: p.cfg.NoFileLimit,
	})
	if err != nil {
		return fcapi.Version{}, fmt.Errorf("read firecracker version: start %s: %w", p.cfg.Binary, err)
	}
	defer proc.kill()
	if err := waitForSocket(ctx, proc, sock, p.cfg.SocketTimeout); err != nil {
		return fcapi.Version{}, fmt.Errorf("read firecracker version: %w", err)
	}
	client := fcapi.New(sock)
	defer client.Close()
	return p.learnVersion(ctx, client)
}

// learnVersion reads the version from a running process once per Provider.
func (p *Provider) learnVersion(ctx context.Context, c *fcapi.Client) (fcapi.Version, error) {
	p.versionMu.Lock()
	defer p.versionMu.Unlock()
	if !p.version.IsZero() {
		return p.version, nil
	}
	v, err := c.Version(ctx)
	if err != nil {
		return fcapi.Version{}, fmt.Errorf("read firecracker version: %w", err)
	}
	if err := fcapi.RequireSupported(v); err != nil {
		return fcapi.Version{}, err
	}
	p.version = v
	p.log.Info("firecracker version", "version", v.String(), "binary", p.cfg.Binary)
	return v, nil
}

func (p *Provider) cachedVersion() fcapi.Version {
	p.versionMu.Lock()
	defer p.versionMu.Unlock()
	return p.version
}

type discard struct{}

func (discard) Write(b []byte) (int, error) { return len(b), nil }

// machine is one VM. Operations on it are serialized by opMu; mu guards
// the fields below it, which the exit watcher also changes.
type machine struct {
	opMu sync.Mutex

	runDir    string
	createdAt time.Time
	console   *ring
	client    *fcapi.Client
	proc      *process
	version   fcapi.Version
	// jail is set when the VM runs under the jailer.
	jail *jail
	// uffd serves the memory of a VM restored with MemoryUffd.
	uffd *uffd.Handler
	// trackDirty is whether dirty-page tracking is on in Firecracker.
	trackDirty bool
	metrics    *metricsReader

	mu     sync.Mutex
	id     string
	state  vm.State
	reason string
	cfg    vm.Config
	// stopping is set while Shutdown or Destroy stops the process, so the
	// exit watcher leaves the state change to them.
	stopping bool
	// parent is the snapshot that the next diff snapshot applies to: the
	// last snapshot taken, or the snapshot the VM was restored from.
	parent *snapshotKey
}

func (m *machine) info() vm.Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	info := vm.Info{
		ID: m.id, Backend: BackendName, State: m.state, Config: m.cfg.Clone(),
		CreatedAt: m.createdAt, Reason: m.reason,
	}
	if m.proc != nil && m.vmmAlive() {
		info.PID = m.pid()
	}
	return info
}

// vmmExited returns a channel closed when the real Firecracker process
// exits: the spawned child, or under a jailer with a new PID namespace, the
// process named by the jail's pid file.
func (m *machine) vmmExited() <-chan struct{} {
	if m.jail != nil && m.jail.exited != nil {
		return m.jail.exited
	}
	return m.proc.exited
}

// vmmAlive reports whether the real Firecracker process runs.
func (m *machine) vmmAlive() bool {
	select {
	case <-m.vmmExited():
		return false
	default:
		return true
	}
}

// vmmExitedCleanly reports whether Firecracker exited with status 0. The
// status of a jailed Firecracker in its own PID namespace is unknown, so
// its exit counts as a failure.
func (m *machine) vmmExitedCleanly() bool {
	if m.jail != nil && m.jail.exited != nil {
		return false
	}
	return m.proc.state.Success()
}

func (m *machine) pid() int {
	if m.jail != nil && m.jail.firecrackerPID > 0 {
		return m.jail.firecrackerPID
	}
	return m.proc.pid()
}

// transition applies op through the one state table.
func (m *machine) transition(op vm.Op) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.transitionLocked(op)
}

func (m *machine) transitionLocked(op vm.Op) error {
	to, err := vm.Transition(m.id, m.state, op)
	if err != nil {
		return err
	}
	m.state = to
	return nil
}

// check returns the TransitionError op would cause, without changing state.
func (m *machine) check(op vm.Op) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, err := vm.Transition(m.id, m.state, op)
	return err
}

// watch moves the VM to stopped or failed when its process exits on its
// own. A guest power-off makes Firecracker exit with status 0.
func (p *Provider) watch(m *machine) {
	<-m.vmmExited()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopping || m.state == vm.StateDestroyed || m.state == vm.StateStopped {
		return
	}
	desc := m.proc.exitDescription()
	if m.state == vm.StateRunning && m.vmmExitedCleanly() {
		if err := m.transitionLocked(vm.OpGuestExit); err == nil {
			m.reason = "guest powered off"
			p.log.Info("guest powered off", "vm", m.id)
			return
		}
	}
	if err := m.transitionLocked(vm.OpFail); err == nil {
		m.reason = "firecracker exited unexpectedly: " + desc
		p.log.Error("firecracker exited unexpectedly", "vm", m.id, "status", desc)
	}
}

// lookup returns VM id or an error that matches vm.ErrNotFound.
func (p *Provider) lookup(id string) (*machine, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m, ok := p.vms[id]
	if !ok {
		return nil, fmt.Errorf("vm %q: %w", id, vm.ErrNotFound)
	}
	return m, nil
}

// Get returns a view of VM id.
func (p *Provider) Get(ctx context.Context, id string) (vm.Info, error) {
	m, err := p.lookup(id)
	if err != nil {
		return vm.Info{}, err
	}
	return m.info(), nil
}

// List returns every VM, sorted by id.
func (p *Provider) List(ctx context.Context) ([]vm.Info, error) {
	p.mu.Lock()
	ms := make([]*machine, 0, len(p.vms))
	for _, m := range p.vms {
		ms = append(ms, m)
	}
	p.mu.Unlock()
	out := make([]vm.Info, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.info())
	}
	slices.SortFunc(out, func(a, b vm.Info) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out, nil
}

// Rename changes a VM's id. The run directory is not named after the id, so
// the running process is untouched.
func (p *Provider) Rename(ctx context.Context, id, newID string) error {
	if err := vm.ValidateID(newID); err != nil {
		return fmt.Errorf("rename vm %q: %w", id, err)
	}
	m, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("rename: %w", err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.check(vm.OpRename); err != nil {
		return err
	}
	if id == newID {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, taken := p.vms[newID]; taken || p.reserved[newID] {
		return fmt.Errorf("rename vm %q to %q: %w", id, newID, vm.ErrAlreadyExists)
	}
	if p.vms[id] != m {
		return fmt.Errorf("rename vm %q: %w", id, vm.ErrNotFound)
	}
	delete(p.vms, id)
	p.vms[newID] = m
	m.mu.Lock()
	m.id = newID
	m.cfg.ID = newID
	m.mu.Unlock()
	return nil
}

// Console returns the most recent console output of VM id.
func (p *Provider) Console(ctx context.Context, id string) ([]byte, error) {
	m, err := p.lookup(id)
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	return m.console.Bytes(), nil
}

// reserve claims id for a Create under way.
func (p *Provider) reserve(id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.vms[id]; ok || p.reserved[id] {
		return fmt.Errorf("create vm %q: %w", id, vm.ErrAlreadyExists)
	}
	p.reserved[id] = true
	return nil
}

func (p *Provider) unreserve(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.reserved, id)
}

// newRunDir creates a VM's run directory under a short random name, so its
// socket paths stay short whatever the VM's id.
func (p *Provider) newRunDir() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	dir := filepath.Join(p.cfg.RunDir, hex.EncodeToString(b[:]))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	if len(filepath.Join(dir, "uffd.sock")) > vm.MaxUnixSocketPath {
		os.Remove(dir)
		return "", fmt.Errorf("run directory %s is too long for Unix socket paths (at most %d bytes): %w", dir, vm.MaxUnixSocketPath, vm.ErrInvalid)
	}
	return dir, nil
}

// errNotRunning wraps API failures on a VMM that already died.
var errNotRunning = errors.New("firecracker is not running")
