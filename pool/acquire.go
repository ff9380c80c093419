package pool

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/embervm/ember/vm"
)

// Acquire hands a VM from the bucket with key to tenant. It tries ready
// entries oldest first; an entry that fails a step is destroyed and the next
// one is tried. On a miss it restores on demand or cold boots, as the bucket
// allows. The returned VM is running, renamed to tenant.ID, with the
// tenant's network identity applied inside the guest.
func (p *Pool) Acquire(ctx context.Context, key Key, tenant Tenant) (Result, error) {
	start := p.opts.Now()
	if err := vm.ValidateID(tenant.ID); err != nil {
		return Result{}, fmt.Errorf("acquire: tenant: %w", err)
	}
	b, err := p.bucket(key)
	if err != nil {
		return Result{}, fmt.Errorf("acquire for %s: %w", tenant.ID, err)
	}
	release, err := p.reserveTenant(ctx, tenant.ID)
	if err != nil {
		return Result{}, err
	}
	defer release()

	// Entries that fail are destroyed and the next is tried, but a refill
	// can add entries while this loop runs, so the attempts are bounded by
	// the bucket's depth: a fault that breaks every entry must not loop.
	for attempt := 0; attempt < b.maxAttempts(); attempt++ {
		e := b.claim()
		if e == nil {
			break
		}
		res, err := p.handOff(ctx, e, tenant)
		if err == nil {
			p.metrics.hits.WithLabelValues(b.name).Inc()
			return p.finish(b, res, PathWarm, start), nil
		}
		p.log.Warn("pool hand-off failed, trying the next entry", "bucket", b.name, "vm", e.id, "tenant", tenant.ID, "err", err)
		p.metrics.evictions.WithLabelValues(b.name, evictFailed).Inc()
		if ctx.Err() != nil {
			return Result{}, fmt.Errorf("acquire for %s: %w", tenant.ID, ctx.Err())
		}
	}

	p.metrics.misses.WithLabelValues(b.name).Inc()
	cfg, unhealthy := b.current()
	var errs []error
	if unhealthy != nil {
		errs = append(errs, unhealthy)
	}
	if cfg.RestoreOnDemand && unhealthy == nil {
		res, err := p.restoreFor(ctx, cfg, tenant)
		if err == nil {
			return p.finish(b, res, PathRestore, start), nil
		}
		errs = append(errs, fmt.Errorf("restore on demand: %w", err))
	}
	if cfg.ColdBoot != nil {
		res, err := p.coldBoot(ctx, cfg, tenant)
		if err == nil {
			return p.finish(b, res, PathCold, start), nil
		}
		errs = append(errs, fmt.Errorf("cold boot: %w", err))
	}
	if len(errs) == 0 {
		errs = append(errs, ErrEmpty)
	}
	return Result{}, fmt.Errorf("acquire for %s from bucket %s: %w", tenant.ID, b.name, errors.Join(errs...))
}

// reserveTenant makes sure tenant id is neither a VM already nor in another
// Acquire, and holds it until release is called.
func (p *Pool) reserveTenant(ctx context.Context, id string) (release func(), err error) {
	p.mu.Lock()
	if p.acquiring[id] {
		p.mu.Unlock()
		return nil, fmt.Errorf("acquire for %s: another acquire for this tenant is in progress: %w", id, vm.ErrAlreadyExists)
	}
	p.acquiring[id] = true
	p.mu.Unlock()
	release = func() {
		p.mu.Lock()
		delete(p.acquiring, id)
		p.mu.Unlock()
	}
	if _, err := p.opts.Provider.Get(ctx, id); err == nil {
		release()
		return nil, fmt.Errorf("acquire for %s: tenant id in use: %w", id, vm.ErrAlreadyExists)
	} else if !errors.Is(err, vm.ErrNotFound) {
		release()
		return nil, fmt.Errorf("acquire for %s: %w", id, err)
	}
	return release, nil
}

// finish records the acquire's path and duration.
func (p *Pool) finish(b *bucket, res Result, path Path, start time.Time) Result {
	res.Path = path
	res.Duration = p.opts.Now().Sub(start)
	p.metrics.acquire.WithLabelValues(b.name, string(path)).Observe(res.Duration.Seconds())
	return res
}

// handOff gives entry e to tenant: rename, network hand-off, resume,
// personalize, health check. On failure it destroys the VM under whichever
// id it has and releases both network identities.
func (p *Pool) handOff(ctx context.Context, e *entry, tenant Tenant) (res Result, err error) {
	renamed := false
	defer func() {
		if err == nil {
			return
		}
		id := e.id
		if renamed {
			id = tenant.ID
		}
		p.rollback(id, true)
		if renamed {
			p.rollback(e.id, false)
		}
	}()

	if err := p.opts.Provider.Rename(ctx, e.id, tenant.ID); err != nil {
		return res, fmt.Errorf("rename %s to %s: %w", e.id, tenant.ID, err)
	}
	renamed = true
	att, err := p.opts.Network.Handoff(ctx, e.id, tenant.ID)
	if err != nil {
		return res, fmt.Errorf("network hand-off %s to %s: %w", e.id, tenant.ID, err)
	}
	info, err := p.opts.Provider.Get(ctx, tenant.ID)
	if err != nil {
		return res, err
	}
	if info.State == vm.StatePaused {
		if err := p.opts.Provider.Resume(ctx, tenant.ID); err != nil {
			return res, fmt.Errorf("resume %s: %w", tenant.ID, err)
		}
	}
	if err := p.personalize(ctx, tenant, att); err != nil {
		return res, err
	}
	return p.result(ctx, tenant.ID, att)
}

// personalize applies the tenant's identity inside the guest and checks the
// agent's health afterwards.
func (p *Pool) personalize(ctx context.Context, tenant Tenant, att Attachment) error {
	hostname := tenant.Hostname
	if hostname == "" {
		hostname = tenant.ID
	}
	err := p.opts.Guest.Personalize(ctx, tenant.ID, Personalization{
		Hostname: hostname,
		Env:      tenant.Env,
		Network:  att.Guest,
		Clock:    p.opts.Now(),
	})
	if err != nil {
		return fmt.Errorf("personalize %s: %w", tenant.ID, err)
	}
	if err := p.opts.Guest.Health(ctx, tenant.ID); err != nil {
		return fmt.Errorf("health of %s after hand-off: %w", tenant.ID, err)
	}
	return nil
}

func (p *Pool) result(ctx context.Context, id string, att Attachment) (Result, error) {
	info, err := p.opts.Provider.Get(ctx, id)
	if err != nil {
		return Result{}, err
	}
	return Result{Info: info, Attachment: att}, nil
}

// restoreFor restores the bucket's snapshot directly as the tenant's VM.
func (p *Pool) restoreFor(ctx context.Context, cfg BucketConfig, tenant Tenant) (res Result, err error) {
	e, err := p.restore(ctx, tenant.ID, cfg, false)
	if err != nil {
		return res, err
	}
	defer func() {
		if err != nil {
			p.rollback(tenant.ID, true)
		}
	}()
	if err := p.personalize(ctx, tenant, e.att); err != nil {
		return res, err
	}
	return p.result(ctx, tenant.ID, e.att)
}

// coldBoot boots the bucket's cold-boot configuration as the tenant's VM.
func (p *Pool) coldBoot(ctx context.Context, cfg BucketConfig, tenant Tenant) (res Result, err error) {
	att, err := p.opts.Network.Attach(ctx, tenant.ID)
	if err != nil {
		return res, fmt.Errorf("attach network: %w", err)
	}
	created := false
	defer func() {
		if err != nil {
			p.rollback(tenant.ID, created)
		}
	}()
	vmCfg, err := cfg.ColdBoot(tenant.ID, att)
	if err != nil {
		return res, err
	}
	vmCfg.ID = tenant.ID
	if vmCfg.NetNS == "" {
		vmCfg.NetNS = att.NetNS
	}
	if _, err := p.opts.Provider.Create(ctx, vmCfg); err != nil {
		return res, err
	}
	created = true
	if err := p.opts.Provider.Start(ctx, tenant.ID); err != nil {
		return res, err
	}
	if err := p.opts.Guest.Health(ctx, tenant.ID); err != nil {
		return res, fmt.Errorf("agent health after boot: %w", err)
	}
	if err := p.personalize(ctx, tenant, att); err != nil {
		return res, err
	}
	return p.result(ctx, tenant.ID, att)
}
