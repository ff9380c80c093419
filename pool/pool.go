// Package pool keeps warm VMs restored from a snapshot and hands them to new
// tenants.
//
// A pool has buckets. Each bucket is bound to one snapshot and keeps between
// MinDepth and MaxDepth entries: VMs restored from that snapshot, each with its
// own network identity and run directory, checked with an agent health call
// (or warmed, when the [Guest] is a [Warmer]) and then paused (or left
// running). [Pool.Acquire] claims one entry, renames it to the tenant's VM
// id, hands its network identity to the tenant, resumes it, personalizes
// the guest (clock, addresses, hostname, environment) and checks its
// health. An entry that fails any step is destroyed and the next
// one is tried. When the bucket is empty, Acquire restores on demand or cold
// boots, as the bucket allows, and the [Result] records which path served it.
//
// Every bucket has its own refiller goroutine, so a slow or failing bucket
// never delays another. Entries older than MaxAge are evicted. Registering a
// bucket again with a new snapshot drains the old entries. [Pool.Close]
// destroys every entry, including those a refill is still restoring.
//
// The pool talks to the host network and to the guest agent through the
// [Network] and [Guest] interfaces, so it can be tested with the memory
// provider and fakes.
package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/embervm/ember/vm"
)

// Errors returned by Acquire and Register.
var (
	ErrUnknownBucket = errors.New("unknown pool bucket")
	// ErrEmpty means the bucket had no ready entry and its configuration
	// allows neither restore on demand nor cold boot.
	ErrEmpty = errors.New("pool bucket empty")
	// ErrUnhealthy means the bucket's refills keep failing, for example
	// because its snapshot files are missing or corrupt.
	ErrUnhealthy = errors.New("pool bucket unhealthy")
	ErrClosed    = errors.New("pool closed")
)

// Path is the way an Acquire was served.
type Path string

const (
	PathWarm    Path = "warm"
	PathRestore Path = "restore"
	PathCold    Path = "cold"
)

// Key identifies a bucket: the stack (a named guest image and workload), its
// version and the machine shape.
type Key struct {
	Stack      string `json:"stack"`
	Version    string `json:"version"`
	VCPUCount  int    `json:"vcpu_count"`
	MemSizeMiB int    `json:"mem_size_mib"`
}

func (k Key) String() string {
	return fmt.Sprintf("%s@%s/%dc-%dm", k.Stack, k.Version, k.VCPUCount, k.MemSizeMiB)
}

// BucketConfig configures one bucket.
type BucketConfig struct {
	Key Key
	// Snapshot is the snapshot every entry is restored from.
	Snapshot vm.SnapshotRef
	// MinDepth is the number of ready entries the refiller keeps; MaxDepth
	// bounds ready plus in-flight entries. MaxDepth 0 means MinDepth.
	MinDepth int
	MaxDepth int
	// RefillConcurrency is the number of restores in flight at once; 0
	// means 1.
	RefillConcurrency int
	// MaxAge evicts entries older than this; 0 keeps them forever.
	MaxAge time.Duration
	// KeepRunning leaves entries running instead of pausing them.
	KeepRunning bool
	// RestoreOnDemand serves a miss by restoring the snapshot for the tenant.
	RestoreOnDemand bool
	// ColdBoot, when set, serves a miss that restore on demand did not
	// serve by booting the configuration it returns.
	ColdBoot func(tenantID string, att Attachment) (vm.Config, error)
	// VsockDir, when set, gives every restored VM a vsock override with
	// its own socket in this directory.
	VsockDir string
	// Entries are ready entries that an earlier pool left behind with
	// [Pool.Detach], such as the pool of an earlier CLI invocation.
	// Register adopts those whose VM exists and is paused (or running,
	// with KeepRunning); it destroys the ones in any other state and skips
	// the ones that are gone.
	Entries []EntryRecord
}

// EntryRecord identifies a ready entry across processes.
type EntryRecord struct {
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
}

func (c *BucketConfig) validate() error {
	var errs []error
	if c.Key.Stack == "" {
		errs = append(errs, errors.New("key.stack: missing"))
	}
	if c.Key.VCPUCount < vm.MinVCPUCount || c.Key.VCPUCount > vm.MaxVCPUCount {
		errs = append(errs, fmt.Errorf("key.vcpu_count: %d is invalid, must be %d–%d", c.Key.VCPUCount, vm.MinVCPUCount, vm.MaxVCPUCount))
	}
	if c.Key.MemSizeMiB < 1 {
		errs = append(errs, fmt.Errorf("key.mem_size_mib: %d is invalid, must be 1 or more", c.Key.MemSizeMiB))
	}
	if err := vm.ValidateID(c.Snapshot.VMID); err != nil {
		errs = append(errs, fmt.Errorf("snapshot.vm_id: %w", err))
	}
	if err := vm.ValidateSnapshotID(c.Snapshot.SnapshotID); err != nil {
		errs = append(errs, fmt.Errorf("snapshot.snapshot_id: %w", err))
	}
	if c.MinDepth < 0 {
		errs = append(errs, fmt.Errorf("min_depth: %d is invalid, must be 0 or more", c.MinDepth))
	}
	if c.MaxDepth != 0 && c.MaxDepth < c.MinDepth {
		errs = append(errs, fmt.Errorf("max_depth: %d is less than min_depth %d", c.MaxDepth, c.MinDepth))
	}
	if c.RefillConcurrency < 0 {
		errs = append(errs, fmt.Errorf("refill_concurrency: %d is invalid, must be 0 or more", c.RefillConcurrency))
	}
	if c.MaxAge < 0 {
		errs = append(errs, fmt.Errorf("max_age: %v is invalid, must be 0 or more", c.MaxAge))
	}
	return errors.Join(errs...)
}

func (c *BucketConfig) maxDepth() int {
	if c.MaxDepth == 0 {
		return c.MinDepth
	}
	return c.MaxDepth
}

func (c *BucketConfig) concurrency() int {
	if c.RefillConcurrency == 0 {
		return 1
	}
	return c.RefillConcurrency
}

// Attachment is the network identity of one VM.
type Attachment struct {
	// Interfaces are the devices a cold boot attaches.
	Interfaces []vm.NetworkInterface
	// Overrides point a restored snapshot's interfaces at this VM's TAPs.
	Overrides []vm.NetworkOverride
	// Guest is the addressing the agent applies inside the guest.
	Guest GuestNetwork
	// NetNS is the network namespace the VMM must run in to reach its
	// TAPs; empty means the host's.
	NetNS string
}

// GuestNetwork is the guest-side addressing of a VM.
type GuestNetwork struct {
	Interfaces []GuestInterface
	DNS        []netip.Addr
}

// GuestInterface addresses one guest interface, found by its MAC.
type GuestInterface struct {
	MAC     string
	Address netip.Prefix
	Gateway netip.Addr
}

// Network gives pool entries and tenants their host network identities.
type Network interface {
	// Attach creates a network identity (TAP, lease) for VM id.
	Attach(ctx context.Context, id string) (Attachment, error)
	// Handoff moves the identity of pool entry from to tenant to, and
	// returns the tenant's identity.
	Handoff(ctx context.Context, from, to string) (Attachment, error)
	// Detach releases the identity of VM id. Detaching an id without one
	// is not an error.
	Detach(ctx context.Context, id string) error
}

// Personalization is the tenant identity Acquire applies inside a guest.
type Personalization struct {
	Hostname string
	Env      map[string]string
	Network  GuestNetwork
	// Clock is the host time the guest clock is set to.
	Clock time.Time
}

// Guest talks to the agent inside a VM.
type Guest interface {
	// Health returns nil when the agent in VM id replies to a health request.
	Health(ctx context.Context, id string) error
	// Personalize applies p inside VM id.
	Personalize(ctx context.Context, id string, p Personalization) error
}

// CheckingGuest is a Guest that can personalize a VM and check its agent's
// health in one step. Acquire then calls PersonalizeAndCheck in place of
// Personalize followed by Health, which for an agent reached over a socket
// means one connection instead of two.
type CheckingGuest interface {
	Guest
	// PersonalizeAndCheck applies p inside VM id, then runs a health check
	// and returns nil only when the agent replied to it.
	PersonalizeAndCheck(ctx context.Context, id string, p Personalization) error
}

// Warmer is a Guest that can run the code paths of a personalization in a
// pool entry before the entry is handed out. Refills call Warm in place of
// Health, so Warm must also check the agent's health. It matters under
// software emulation: QEMU's TCG translates guest code again in every
// QEMU process, so a restored guest runs each code path slowly the first
// time. In one measurement on QEMU 7.2 TCG, personalizing an entry that
// was warmed took about 10 ms, against 50–100 ms for one that was not.
type Warmer interface {
	Warm(ctx context.Context, id string) error
}

// Tenant is who an Acquire serves.
type Tenant struct {
	// ID becomes the VM id; it must not be in use.
	ID       string
	Hostname string
	Env      map[string]string
}

// Result is a VM handed to a tenant.
type Result struct {
	Info       vm.Info
	Path       Path
	Attachment Attachment
	// Duration is the time from the Acquire call to the tenant being
	// ready.
	Duration time.Duration
}

// Options configures a Pool.
type Options struct {
	Provider vm.Provider
	Network  Network
	Guest    Guest
	// Registerer receives the pool's metrics; nil registers nothing.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// EvictInterval is how often buckets check entry ages; 0 means one
	// second.
	EvictInterval time.Duration
	// UnhealthyAfter is the number of consecutive refill failures that mark
	// a bucket unhealthy; 0 means 3.
	UnhealthyAfter int
	// RetryDelay is the pause between failed refills; 0 means one second.
	RetryDelay time.Duration
	// VerifySnapshot, when set, checks a bucket's snapshot before each
	// restore (for example that its files exist with the recorded sizes).
	// A failure marks the bucket unhealthy at once.
	VerifySnapshot func(ctx context.Context, ref vm.SnapshotRef) error
}

// Pool is a set of warm buckets. Its methods are safe for concurrent use.
type Pool struct {
	opts    Options
	log     *slog.Logger
	metrics *metrics

	// closeCtx is cancelled by Close and ends every refiller.
	closeCtx context.Context
	cancel   context.CancelFunc

	// idPrefix makes entry ids unique across pools and restarts.
	idPrefix string

	mu      sync.Mutex
	buckets map[string]*bucket
	closed  bool
	// seq numbers entry ids within this pool.
	seq uint64
	// acquiring holds the tenant ids of Acquire calls in progress.
	acquiring map[string]bool
}

// New returns a pool with no buckets.
func New(opts Options) (*Pool, error) {
	if opts.Provider == nil || opts.Network == nil || opts.Guest == nil {
		return nil, errors.New("new pool: Provider, Network and Guest are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.EvictInterval == 0 {
		opts.EvictInterval = time.Second
	}
	if opts.UnhealthyAfter == 0 {
		opts.UnhealthyAfter = 3
	}
	if opts.RetryDelay == 0 {
		opts.RetryDelay = time.Second
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, fmt.Errorf("new pool: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool{
		opts:      opts,
		log:       opts.Logger,
		metrics:   m,
		closeCtx:  ctx,
		cancel:    cancel,
		idPrefix:  fmt.Sprintf("pool-%08x", rand.Uint32()),
		buckets:   map[string]*bucket{},
		acquiring: map[string]bool{},
	}, nil
}

// Register adds a bucket, or rebinds an existing bucket with the same key
// to a new configuration. Rebinding drains the old entries: they are no
// longer handed out and are destroyed, and the refiller restores new ones
// from the new snapshot.
func (p *Pool) Register(cfg BucketConfig) error {
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("register bucket %s: %w", cfg.Key, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	name := cfg.Key.String()
	if b, ok := p.buckets[name]; ok {
		b.rebind(cfg)
		return nil
	}
	b := newBucket(p, cfg)
	b.adopt(cfg.Entries)
	p.buckets[name] = b
	b.start()
	return nil
}

// Detach stops every refiller and returns each bucket's ready entries
// without destroying them, so a later pool can adopt them through
// BucketConfig.Entries. Refills still in flight are rolled back. The pool
// is closed afterwards.
func (p *Pool) Detach(ctx context.Context) (map[Key][]EntryRecord, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	p.closed = true
	buckets := make([]*bucket, 0, len(p.buckets))
	for _, b := range p.buckets {
		buckets = append(buckets, b)
	}
	p.buckets = map[string]*bucket{}
	p.mu.Unlock()

	p.cancel()
	out := map[Key][]EntryRecord{}
	for _, b := range buckets {
		out[b.cfg.Key] = b.detach()
	}
	return out, ctx.Err()
}

// Remove stops a bucket's refiller and destroys its entries.
func (p *Pool) Remove(ctx context.Context, key Key) error {
	p.mu.Lock()
	b, ok := p.buckets[key.String()]
	delete(p.buckets, key.String())
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("remove bucket %s: %w", key, ErrUnknownBucket)
	}
	return b.stop(ctx)
}

// Close stops every refiller and destroys every entry, waiting for
// in-flight refills to finish and destroying what they made.
func (p *Pool) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	buckets := make([]*bucket, 0, len(p.buckets))
	for _, b := range p.buckets {
		buckets = append(buckets, b)
	}
	p.buckets = map[string]*bucket{}
	p.mu.Unlock()

	p.cancel()
	var errs []error
	for _, b := range buckets {
		errs = append(errs, b.stop(ctx))
	}
	return errors.Join(errs...)
}

// BucketStatus is a point-in-time view of one bucket.
type BucketStatus struct {
	Key      Key            `json:"key"`
	Snapshot vm.SnapshotRef `json:"snapshot"`
	Ready    int            `json:"ready"`
	InFlight int            `json:"in_flight"`
	MinDepth int            `json:"min_depth"`
	MaxDepth int            `json:"max_depth"`
	Healthy  bool           `json:"healthy"`
	// LastError is the most recent refill failure.
	LastError string `json:"last_error,omitempty"`
}

// Status returns every bucket sorted by key.
func (p *Pool) Status() []BucketStatus {
	p.mu.Lock()
	buckets := make([]*bucket, 0, len(p.buckets))
	for _, b := range p.buckets {
		buckets = append(buckets, b)
	}
	p.mu.Unlock()
	out := make([]BucketStatus, 0, len(buckets))
	for _, b := range buckets {
		out = append(out, b.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key.String() < out[j].Key.String() })
	return out
}

func (p *Pool) bucket(key Key) (*bucket, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrClosed
	}
	b, ok := p.buckets[key.String()]
	if !ok {
		return nil, fmt.Errorf("bucket %s: %w", key, ErrUnknownBucket)
	}
	return b, nil
}

func (p *Pool) nextEntryID() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seq++
	return fmt.Sprintf("%s-%d", p.idPrefix, p.seq)
}

// cleanupContext returns a context for cleanup that survives the caller's
// cancellation but not forever.
func cleanupContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}
