package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/embervm/ember/vm"
)

// Eviction reasons, the values of the evictions metric's reason label.
const (
	evictAge      = "age"
	evictReplaced = "snapshot-replaced"
	evictFailed   = "handoff-failed"
	evictShutdown = "shutdown"
)

// entry is a ready VM in a bucket.
type entry struct {
	id      string
	created time.Time
	// generation is the bucket generation (snapshot binding) the entry was
	// restored for.
	generation int
	att        Attachment
}

type bucket struct {
	p    *Pool
	name string
	// wake has room for one signal; a full channel already has one pending.
	wake chan struct{}
	// done is closed when the refiller loop returns.
	done chan struct{}
	// ctx ends the refiller loop and cancels in-flight refills.
	ctx    context.Context
	cancel context.CancelFunc
	// refills counts refill goroutines in flight.
	refills sync.WaitGroup

	mu         sync.Mutex
	cfg        BucketConfig
	generation int
	ready      []*entry
	inFlight   int
	failures   int
	lastErr    error
	// unhealthy is set after too many consecutive failures or a failed
	// snapshot verification, and cleared by the next successful refill.
	unhealthy   bool
	lastFailure time.Time
	stopped     bool
}

func newBucket(p *Pool, cfg BucketConfig) *bucket {
	ctx, cancel := context.WithCancel(p.closeCtx)
	return &bucket{
		p:      p,
		name:   cfg.Key.String(),
		wake:   make(chan struct{}, 1),
		done:   make(chan struct{}),
		ctx:    ctx,
		cancel: cancel,
		cfg:    cfg,
	}
}

func (b *bucket) start() {
	b.p.metrics.depth.WithLabelValues(b.name).Set(float64(len(b.ready)))
	go b.run()
}

// signal wakes the refiller without blocking.
func (b *bucket) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// run is the refiller loop: evict old entries, start refills, sleep until
// woken or the next eviction check.
func (b *bucket) run() {
	defer close(b.done)
	ticker := time.NewTicker(b.p.opts.EvictInterval)
	defer ticker.Stop()
	for {
		b.evictOld()
		b.fill()
		select {
		case <-b.ctx.Done():
			return
		case <-b.wake:
		case <-ticker.C:
		}
	}
}

// fill starts as many refills as the depth and concurrency limits allow.
func (b *bucket) fill() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return
	}
	if b.failures > 0 && b.p.opts.Now().Sub(b.lastFailure) < b.p.opts.RetryDelay {
		return
	}
	have := len(b.ready) + b.inFlight
	need := min(b.cfg.MinDepth-have, b.cfg.maxDepth()-have, b.cfg.concurrency()-b.inFlight)
	if b.failures > 0 {
		// After a failure, probe with one refill at a time.
		need = min(need, 1-b.inFlight)
	}
	for range need {
		b.inFlight++
		b.refills.Add(1)
		go b.refill(b.generation, b.cfg)
	}
}

// refill restores one entry for generation and adds it to the bucket.
func (b *bucket) refill(generation int, cfg BucketConfig) {
	defer b.refills.Done()
	ctx, cancel := context.WithTimeout(b.ctx, 2*time.Minute)
	defer cancel()

	id := b.p.nextEntryID()
	e, err := b.p.restore(ctx, id, cfg, true, !cfg.KeepRunning)
	if err == nil {
		e.generation = generation
	}

	b.mu.Lock()
	b.inFlight--
	keep := err == nil && !b.stopped && generation == b.generation
	switch {
	case err != nil:
		b.failures++
		b.lastErr = err
		b.lastFailure = b.p.opts.Now()
		if b.failures >= b.p.opts.UnhealthyAfter || errors.Is(err, errVerify) {
			b.unhealthy = true
		}
	case keep:
		b.ready = append(b.ready, e)
		b.failures = 0
		b.lastErr = nil
		b.unhealthy = false
	}
	depth := len(b.ready)
	stopped := b.stopped
	b.mu.Unlock()
	b.p.metrics.depth.WithLabelValues(b.name).Set(float64(depth))

	switch {
	case err != nil:
		b.p.metrics.refillFailures.WithLabelValues(b.name).Inc()
		if !stopped && b.ctx.Err() == nil {
			b.p.log.Warn("pool refill failed", "bucket", b.name, "vm", id, "err", err)
			time.AfterFunc(b.p.opts.RetryDelay, b.signal)
		}
	case !keep:
		reason := evictReplaced
		if stopped {
			reason = evictShutdown
		}
		b.p.discard(e.id, reason, b.name)
	}
	b.signal()
}

// maxAttempts bounds the entries one Acquire tries: the bucket's maximum
// depth, and at least one.
func (b *bucket) maxAttempts() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return max(b.cfg.maxDepth(), 1)
}

// claim removes the oldest ready entry of the current generation. It does
// not wake the refiller: the caller signals once the hand-off is over, so
// that the refill's restore does not compete with the hand-off for the
// CPU.
func (b *bucket) claim() *entry {
	b.mu.Lock()
	defer b.mu.Unlock()
	for len(b.ready) > 0 {
		e := b.ready[0]
		b.ready = b.ready[1:]
		b.p.metrics.depth.WithLabelValues(b.name).Set(float64(len(b.ready)))
		if e.generation == b.generation {
			return e
		}
	}
	return nil
}

// evictOld destroys entries older than MaxAge.
func (b *bucket) evictOld() {
	b.mu.Lock()
	if b.cfg.MaxAge == 0 {
		b.mu.Unlock()
		return
	}
	now := b.p.opts.Now()
	var old []*entry
	kept := b.ready[:0]
	for _, e := range b.ready {
		if now.Sub(e.created) > b.cfg.MaxAge {
			old = append(old, e)
		} else {
			kept = append(kept, e)
		}
	}
	b.ready = kept
	depth := len(b.ready)
	b.mu.Unlock()
	if len(old) == 0 {
		return
	}
	b.p.metrics.depth.WithLabelValues(b.name).Set(float64(depth))
	for _, e := range old {
		b.p.discard(e.id, evictAge, b.name)
	}
}

// rebind switches the bucket to cfg and drains entries of the old binding.
func (b *bucket) rebind(cfg BucketConfig) {
	b.mu.Lock()
	b.cfg = cfg
	b.generation++
	old := b.ready
	b.ready = nil
	b.failures, b.lastErr, b.unhealthy = 0, nil, false
	b.mu.Unlock()
	b.p.metrics.depth.WithLabelValues(b.name).Set(0)
	go func() {
		for _, e := range old {
			b.p.discard(e.id, evictReplaced, b.name)
		}
	}()
	b.signal()
}

// adopt adds the entries an earlier pool detached, before the refiller
// starts. It runs while Register holds the pool's lock, so it talks only to
// the provider.
func (b *bucket) adopt(records []EntryRecord) {
	if len(records) == 0 {
		return
	}
	ctx, cancel := cleanupContext()
	defer cancel()
	want := vm.StatePaused
	if b.cfg.KeepRunning {
		want = vm.StateRunning
	}
	for _, r := range records {
		info, err := b.p.opts.Provider.Get(ctx, r.ID)
		switch {
		case errors.Is(err, vm.ErrNotFound):
			b.p.log.Warn("pool entry to adopt is gone", "bucket", b.name, "vm", r.ID)
		case err != nil:
			b.p.log.Warn("pool entry to adopt cannot be read", "bucket", b.name, "vm", r.ID, "err", err)
		case info.State != want:
			b.p.log.Warn("pool entry to adopt is not ready, destroying it", "bucket", b.name, "vm", r.ID, "state", info.State)
			b.p.discard(r.ID, evictFailed, b.name)
		default:
			b.ready = append(b.ready, &entry{id: r.ID, created: r.Created, generation: b.generation})
		}
	}
	b.p.metrics.depth.WithLabelValues(b.name).Set(float64(len(b.ready)))
}

// detach ends the refiller like stop, but returns the ready entries
// instead of destroying them.
func (b *bucket) detach() []EntryRecord {
	b.mu.Lock()
	b.stopped = true
	b.mu.Unlock()
	b.cancel()
	<-b.done
	b.refills.Wait()

	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]EntryRecord, 0, len(b.ready))
	for _, e := range b.ready {
		out = append(out, EntryRecord{ID: e.id, Created: e.created})
	}
	b.ready = nil
	return out
}

// stop ends the refiller, waits for in-flight refills (which destroy what
// they made) and destroys every ready entry.
func (b *bucket) stop(ctx context.Context) error {
	b.mu.Lock()
	b.stopped = true
	b.mu.Unlock()
	b.cancel()
	<-b.done
	b.refills.Wait()

	b.mu.Lock()
	entries := b.ready
	b.ready = nil
	b.mu.Unlock()
	b.p.metrics.depth.WithLabelValues(b.name).Set(0)

	var errs []error
	for _, e := range entries {
		if err := b.p.destroy(ctx, e.id); err != nil {
			errs = append(errs, err)
		}
		b.p.metrics.evictions.WithLabelValues(b.name, evictShutdown).Inc()
	}
	return errors.Join(errs...)
}

func (b *bucket) status() BucketStatus {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := BucketStatus{
		Key:      b.cfg.Key,
		Snapshot: b.cfg.Snapshot,
		Ready:    len(b.ready),
		InFlight: b.inFlight,
		MinDepth: b.cfg.MinDepth,
		MaxDepth: b.cfg.maxDepth(),
		Healthy:  !b.unhealthy,
	}
	if b.lastErr != nil {
		s.LastError = b.lastErr.Error()
	}
	return s
}

// current returns the bucket's configuration and, when the bucket is
// unhealthy, an error wrapping ErrUnhealthy and the last failure.
func (b *bucket) current() (BucketConfig, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.unhealthy {
		return b.cfg, fmt.Errorf("bucket %s: %w: %w", b.name, ErrUnhealthy, b.lastErr)
	}
	return b.cfg, nil
}

// errVerify marks a failed snapshot verification.
var errVerify = errors.New("snapshot verification failed")

// restore makes VM id from cfg's snapshot with its own network identity,
// waits for its agent and pauses it when pause is set. For a pool entry
// (forEntry set) it warms the guest when the Guest is a [Warmer]. On
// failure it leaves nothing behind.
func (p *Pool) restore(ctx context.Context, id string, cfg BucketConfig, forEntry, pause bool) (e *entry, err error) {
	if p.opts.VerifySnapshot != nil {
		if err := p.opts.VerifySnapshot(ctx, cfg.Snapshot); err != nil {
			return nil, fmt.Errorf("restore %s: %w: %w", id, errVerify, err)
		}
	}
	att, err := p.opts.Network.Attach(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("restore %s: attach network: %w", id, err)
	}
	created := false
	defer func() {
		if err != nil {
			p.rollback(id, created)
		}
	}()

	ref := cfg.Snapshot
	ref.ResumeImmediately = true
	ref.NetworkOverrides = att.Overrides
	if cfg.VsockDir != "" {
		ref.VsockOverride = &vm.VsockOverride{UDSPath: filepath.Join(cfg.VsockDir, id+".vsock")}
	}
	restoreCfg := vm.Config{
		ID:          id,
		RestoreFrom: &ref,
		VCPUCount:   cfg.Key.VCPUCount,
		MemSizeMiB:  cfg.Key.MemSizeMiB,
		NetNS:       att.NetNS,
	}
	if _, err := p.opts.Provider.Create(ctx, restoreCfg); err != nil {
		return nil, fmt.Errorf("restore %s from snapshot %s/%s: %w", id, ref.VMID, ref.SnapshotID, err)
	}
	created = true
	if w, ok := p.opts.Guest.(Warmer); ok && forEntry {
		if err := w.Warm(ctx, id); err != nil {
			return nil, fmt.Errorf("restore %s: warm the guest: %w", id, err)
		}
	} else if err := p.opts.Guest.Health(ctx, id); err != nil {
		return nil, fmt.Errorf("restore %s: agent health: %w", id, err)
	}
	if pause {
		if err := p.opts.Provider.Pause(ctx, id); err != nil {
			return nil, fmt.Errorf("restore %s: pause: %w", id, err)
		}
	}
	return &entry{id: id, created: p.opts.Now(), att: att}, nil
}

// rollback destroys VM id (when it was created) and releases its network
// identity, on a context of its own.
func (p *Pool) rollback(id string, created bool) {
	ctx, cancel := cleanupContext()
	defer cancel()
	if created {
		if err := p.opts.Provider.Destroy(ctx, id); err != nil && !errors.Is(err, vm.ErrNotFound) {
			p.log.Error("pool rollback: destroy failed", "vm", id, "err", err)
		}
	}
	if err := p.opts.Network.Detach(ctx, id); err != nil {
		p.log.Error("pool rollback: network detach failed", "vm", id, "err", err)
	}
}

// destroy removes VM id and its network identity.
func (p *Pool) destroy(ctx context.Context, id string) error {
	var errs []error
	if err := p.opts.Provider.Destroy(ctx, id); err != nil && !errors.Is(err, vm.ErrNotFound) {
		errs = append(errs, fmt.Errorf("destroy pool vm %s: %w", id, err))
	}
	if err := p.opts.Network.Detach(ctx, id); err != nil {
		errs = append(errs, fmt.Errorf("detach pool vm %s: %w", id, err))
	}
	return errors.Join(errs...)
}

// discard destroys an entry on a cleanup context and counts the eviction.
func (p *Pool) discard(id, reason, bucket string) {
	ctx, cancel := cleanupContext()
	defer cancel()
	if err := p.destroy(ctx, id); err != nil {
		p.log.Error("pool eviction failed", "bucket", bucket, "vm", id, "reason", reason, "err", err)
	}
	p.metrics.evictions.WithLabelValues(bucket, reason).Inc()
	p.log.Debug("pool entry evicted", slog.String("bucket", bucket), slog.String("vm", id), slog.String("reason", reason))
}
