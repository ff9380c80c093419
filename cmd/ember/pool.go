package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/embervm/ember/internal/fsutil"
	"github.com/embervm/ember/pool"
	"github.com/embervm/ember/vm"
)

// poolStateVersion is the schema of pools.json.
const poolStateVersion = 1

// poolState is the record `ember pool` keeps between invocations in
// <state_dir>/pools.json: each pool's bucket settings and the ready entries
// the last invocation left paused.
type poolState struct {
	Version int                   `json:"version"`
	Pools   map[string]*poolEntry `json:"pools"`
}

type poolEntry struct {
	Backend         string             `json:"backend"`
	Key             pool.Key           `json:"key"`
	Snapshot        vm.SnapshotRef     `json:"snapshot"`
	MinDepth        int                `json:"min_depth"`
	MaxDepth        int                `json:"max_depth"`
	KeepRunning     bool               `json:"keep_running,omitempty"`
	RestoreOnDemand bool               `json:"restore_on_demand,omitempty"`
	Entries         []pool.EntryRecord `json:"entries"`
}

func (e *poolEntry) bucket() pool.BucketConfig {
	return pool.BucketConfig{
		Key: e.Key, Snapshot: e.Snapshot, MinDepth: e.MinDepth, MaxDepth: e.MaxDepth,
		KeepRunning: e.KeepRunning, RestoreOnDemand: e.RestoreOnDemand,
		Entries: e.Entries,
	}
}

// errPoolNotFound means no pool of that name is recorded in the state
// directory.
var errPoolNotFound = errors.New("pool not found")

// lookup returns the pool recorded as name.
func (st *poolState) lookup(name string) (*poolEntry, error) {
	e, ok := st.Pools[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s (ember pool ls lists the pools)", errPoolNotFound, name)
	}
	return e, nil
}

type poolFlags struct {
	backend         string
	snapshot        string
	min, max        int
	keepRunning     bool
	restoreOnDemand bool
	timeout         time.Duration
	hostname        string
	env             []string
	noRefill        bool
}

func (a *app) poolCommand() *cobra.Command {
	var f poolFlags
	cmd := group(&cobra.Command{
		Use:   "pool",
		Short: "Keep warm VMs restored from a snapshot and hand them to tenants",
		Long: `Keep warm VMs restored from a snapshot and hand them to tenants. A pool's
entries are paused VMs that stay between ember invocations (qemu backend);
the pool's settings and entries are recorded in <state_dir>/pools.json.
Without a daemon, a pool refills only while an ember pool command runs.
Entries have no network interfaces yet.`,
	})
	addBackendFlag(cmd.PersistentFlags(), &f.backend)
	cmd.PersistentFlags().DurationVar(&f.timeout, "timeout", 5*time.Minute, "how long to wait for the pool to fill")

	create := &cobra.Command{
		Use:   "create NAME --snapshot VM/SNAPSHOT",
		Short: "Create a pool bound to a snapshot and fill it to --min entries",
		Args:  exactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return a.poolCreate(cmd.Context(), args[0], f) },
	}
	create.Flags().StringVar(&f.snapshot, "snapshot", "", "snapshot every entry is restored from, as VM/SNAPSHOT")
	create.Flags().IntVar(&f.min, "min", 2, "entries kept ready")
	create.Flags().IntVar(&f.max, "max", 0, "maximum entries, ready and restoring (0: --min)")
	create.Flags().BoolVar(&f.keepRunning, "keep-running", false, "keep entries running instead of paused")
	create.Flags().BoolVar(&f.restoreOnDemand, "restore-on-demand", true, "serve an empty pool by restoring the snapshot for the tenant")

	acquire := &cobra.Command{
		Use:   "acquire NAME TENANT-ID",
		Short: "Hand a warm VM to a tenant: rename, resume, personalize, health-check",
		Args:  exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.poolAcquire(cmd.Context(), args[0], args[1], f)
		},
	}
	acquire.Flags().StringVar(&f.hostname, "hostname", "", "guest hostname (default: the tenant id)")
	acquire.Flags().StringArrayVar(&f.env, "env", nil, "guest environment variable KEY=VALUE (repeatable)")
	acquire.Flags().BoolVar(&f.noRefill, "no-refill", false, "return without waiting for the pool to refill")

	cmd.AddCommand(create, acquire, &cobra.Command{
		Use:   "ls",
		Short: "List pools with their ready entries",
		Args:  exactArgs(0),
		RunE:  func(cmd *cobra.Command, _ []string) error { return a.poolList(cmd.Context(), f) },
	}, &cobra.Command{
		Use:   "rm NAME",
		Short: "Destroy a pool's entries and forget the pool",
		Args:  exactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return a.poolRemove(cmd.Context(), args[0], f) },
	})
	return cmd
}

// withPoolState locks <state_dir>/pools.lock, loads pools.json, runs fn and
// saves the state fn left, so concurrent ember pool commands take turns.
func (a *app) withPoolState(fn func(st *poolState) error) error {
	l, err := a.config()
	if err != nil {
		return err
	}
	dir := l.Config.StateDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(dir, "pools.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock pool state: %w", err)
	}
	path := filepath.Join(dir, "pools.json")
	st := &poolState{Version: poolStateVersion, Pools: map[string]*poolEntry{}}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return err
	default:
		if err := json.Unmarshal(data, st); err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
		if st.Version != poolStateVersion {
			return fmt.Errorf("read %s: version %d, this ember reads %d", path, st.Version, poolStateVersion)
		}
	}
	fnErr := fn(st)
	if err := fsutil.WriteJSONAtomic(path, st, 0o600); err != nil {
		return errors.Join(fnErr, fmt.Errorf("save pool state: %w", err))
	}
	return fnErr
}

// openPool builds a provider and a pool over it with the given pools
// registered (adopting their recorded entries).
func (a *app) openPool(ctx context.Context, backend string, entries map[string]*poolEntry) (*pool.Pool, vm.Provider, error) {
	l, err := a.config()
	if err != nil {
		return nil, nil, err
	}
	p, err := newProvider(ctx, backend, l.Config, a.logger())
	if err != nil {
		return nil, nil, err
	}
	dialer, ok := p.(vm.AgentDialer)
	_, persistent := p.(vm.Detacher)
	if !ok || !persistent {
		return nil, nil, fmt.Errorf("backend %s cannot keep pool entries between ember invocations; use the pool package from a long-running process", backend)
	}
	pl, err := pool.New(pool.Options{
		Provider: p, Network: noNetwork{}, Guest: pool.AgentGuest{Dialer: dialer},
		Registerer: prometheus.NewRegistry(), Logger: a.logger(),
	})
	if err != nil {
		return nil, nil, err
	}
	for name, e := range entries {
		if err := pl.Register(e.bucket()); err != nil {
			return nil, nil, fmt.Errorf("pool %s: %w", name, err)
		}
	}
	return pl, p, nil
}

// closePool detaches the pool, records the entries it leaves ready and
// releases the provider without stopping its VMs.
func closePool(pl *pool.Pool, p vm.Provider, entries map[string]*poolEntry) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	detached, err := pl.Detach(ctx)
	for _, e := range entries {
		e.Entries = detached[e.Key]
		if e.Entries == nil {
			e.Entries = []pool.EntryRecord{}
		}
	}
	if d, ok := p.(vm.Detacher); ok {
		err = errors.Join(err, d.Close())
	}
	return err
}

// waitFilled waits until the pool's bucket has MinDepth ready entries, is
// unhealthy, or the timeout passes.
func waitFilled(ctx context.Context, pl *pool.Pool, key pool.Key, timeout time.Duration) (pool.BucketStatus, error) {
	deadline := time.Now().Add(timeout)
	for {
		var st pool.BucketStatus
		for _, s := range pl.Status() {
			if s.Key == key {
				st = s
			}
		}
		switch {
		case st.Ready >= st.MinDepth:
			return st, nil
		case !st.Healthy:
			return st, fmt.Errorf("pool %s is unhealthy: %s", key.Stack, st.LastError)
		case time.Now().After(deadline):
			return st, fmt.Errorf("pool %s has %d of %d entries ready after %s", key.Stack, st.Ready, st.MinDepth, timeout)
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (a *app) poolCreate(ctx context.Context, name string, f poolFlags) error {
	if err := vm.ValidateID(name); err != nil {
		return usageError{fmt.Errorf("pool name: %w", err)}
	}
	// The flags are checked before anything is opened, so that a typo
	// costs no provider start.
	switch {
	case f.snapshot == "":
		return usageError{errors.New("missing --snapshot VM/SNAPSHOT, the snapshot every entry is restored from")}
	case f.min < 0:
		return usageError{fmt.Errorf("--min %d is invalid, must be 0 or more", f.min)}
	case f.max != 0 && f.max < f.min:
		return usageError{fmt.Errorf("--max %d is invalid, must be 0 (meaning --min) or at least --min %d", f.max, f.min)}
	}
	srcVM, snapID, err := parseSnapshotRef(f.snapshot)
	if err != nil {
		return err
	}
	l, err := a.config()
	if err != nil {
		return err
	}
	backend, err := backendName(f.backend, l.Config)
	if err != nil {
		return err
	}
	return a.withPoolState(func(st *poolState) error {
		if _, ok := st.Pools[name]; ok {
			return fmt.Errorf("pool %s already exists: %w", name, vm.ErrAlreadyExists)
		}
		e := &poolEntry{Backend: backend, Snapshot: vm.SnapshotRef{VMID: srcVM, SnapshotID: snapID},
			MinDepth: f.min, MaxDepth: f.max, KeepRunning: f.keepRunning, RestoreOnDemand: f.restoreOnDemand}
		pl, p, err := a.openPool(ctx, backend, nil)
		if err != nil {
			return err
		}
		snaps, err := p.ListSnapshots(ctx, srcVM)
		if err != nil {
			return errors.Join(err, closePool(pl, p, nil))
		}
		i := indexSnapshot(snaps, snapID)
		if i < 0 {
			return errors.Join(fmt.Errorf("snapshot %s/%s: %w", srcVM, snapID, vm.ErrSnapshotNotFound), closePool(pl, p, nil))
		}
		e.Key = pool.Key{Stack: name, Version: snapID, VCPUCount: snaps[i].VCPUCount, MemSizeMiB: snaps[i].MemSizeMiB}
		start := time.Now()
		entries := map[string]*poolEntry{name: e}
		if err := pl.Register(e.bucket()); err != nil {
			return errors.Join(err, closePool(pl, p, nil))
		}
		status, waitErr := waitFilled(ctx, pl, e.Key, f.timeout)
		if err := closePool(pl, p, entries); err != nil || waitErr != nil {
			// Keep what was filled so rm can destroy it.
			st.Pools[name] = e
			return errors.Join(waitErr, err)
		}
		st.Pools[name] = e
		if a.jsonOutput() {
			return a.writeJSON(map[string]any{"pool": name, "ready": status.Ready, "fill_ns": time.Since(start)})
		}
		fmt.Fprintf(a.stdout, "pool %s: %d entries ready from %s/%s in %s\n", name, len(e.Entries), srcVM, snapID, roundDuration(time.Since(start)))
		return nil
	})
}

func indexSnapshot(snaps []vm.SnapshotInfo, id string) int {
	for i, s := range snaps {
		if s.ID == id {
			return i
		}
	}
	return -1
}

func (a *app) poolAcquire(ctx context.Context, name, tenant string, f poolFlags) error {
	env := map[string]string{}
	for _, kv := range f.env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return usageError{fmt.Errorf("--env %q is invalid, use KEY=VALUE", kv)}
		}
		env[k] = v
	}
	return a.withPoolState(func(st *poolState) error {
		e, err := st.lookup(name)
		if err != nil {
			return err
		}
		entries := map[string]*poolEntry{name: e}
		pl, p, err := a.openPool(ctx, e.Backend, entries)
		if err != nil {
			return err
		}
		res, acqErr := pl.Acquire(ctx, e.Key, pool.Tenant{ID: tenant, Hostname: f.hostname, Env: env})
		if acqErr == nil && !f.noRefill {
			if _, err := waitFilled(ctx, pl, e.Key, f.timeout); err != nil {
				a.logger().Warn("pool did not refill", "pool", name, "err", err)
			}
		}
		if err := closePool(pl, p, entries); err != nil || acqErr != nil {
			return errors.Join(acqErr, err)
		}
		if a.jsonOutput() {
			return a.writeJSON(map[string]any{"vm": res.Info.ID, "path": res.Path, "duration_ns": res.Duration, "state": res.Info.State})
		}
		fmt.Fprintf(a.stdout, "%s ready (%s path, %s)\n", res.Info.ID, res.Path, roundDuration(res.Duration))
		return nil
	})
}

func (a *app) poolList(ctx context.Context, f poolFlags) error {
	return a.withPoolState(func(st *poolState) error {
		names := make([]string, 0, len(st.Pools))
		for n := range st.Pools {
			names = append(names, n)
		}
		sort.Strings(names)
		// The listing has one row per pool, in name order, with the
		// maximum depth in effect (a recorded 0 means the minimum).
		type row struct {
			Name string `json:"name"`
			poolEntry
			Ready int `json:"ready"`
		}
		rows := make([]row, 0, len(names))
		for _, n := range names {
			r := row{Name: n, poolEntry: *st.Pools[n], Ready: len(st.Pools[n].Entries)}
			if r.MaxDepth == 0 {
				r.MaxDepth = r.MinDepth
			}
			rows = append(rows, r)
		}
		if a.jsonOutput() {
			return a.writeJSON(rows)
		}
		tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "POOL\tSNAPSHOT\tSHAPE\tREADY\tMIN\tMAX\tBACKEND")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%s/%s\t%dc/%dMiB\t%d\t%d\t%d\t%s\n", r.Name, r.Snapshot.VMID, r.Snapshot.SnapshotID,
				r.Key.VCPUCount, r.Key.MemSizeMiB, r.Ready, r.MinDepth, r.MaxDepth, r.Backend)
		}
		return tw.Flush()
	})
}

func (a *app) poolRemove(ctx context.Context, name string, f poolFlags) error {
	return a.withPoolState(func(st *poolState) error {
		e, err := st.lookup(name)
		if err != nil {
			return err
		}
		// Adopt the entries without refilling, then remove the bucket,
		// which destroys them.
		drain := *e
		drain.MinDepth, drain.MaxDepth = 0, 0
		pl, p, err := a.openPool(ctx, e.Backend, map[string]*poolEntry{name: &drain})
		if err != nil {
			return err
		}
		rmErr := pl.Remove(ctx, e.Key)
		if err := closePool(pl, p, nil); err != nil || rmErr != nil {
			return errors.Join(rmErr, err)
		}
		delete(st.Pools, name)
		if !a.jsonOutput() {
			fmt.Fprintf(a.stdout, "pool %s removed (%d entries destroyed)\n", name, len(e.Entries))
			return nil
		}
		return a.writeJSON(map[string]any{"removed": name, "destroyed": len(e.Entries)})
	})
}

// noNetwork gives pool entries no network interfaces: CLI pools have no
// workspace network configuration yet.
type noNetwork struct{}

func (noNetwork) Attach(context.Context, string) (pool.Attachment, error) {
	return pool.Attachment{}, nil
}

func (noNetwork) Handoff(context.Context, string, string) (pool.Attachment, error) {
	return pool.Attachment{}, nil
}

func (noNetwork) Detach(context.Context, string) error { return nil }
