package pool

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/embervm/ember/provider/memory"
	"github.com/embervm/ember/vm"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeNetwork hands out TAP names and records which id owns which.
type fakeNetwork struct {
	mu       sync.Mutex
	next     int
	owners   map[string]string // id -> tap
	handoffs map[string]string // entry id -> tenant id
	failOn   string            // Attach of this id fails
}

func newFakeNetwork() *fakeNetwork {
	return &fakeNetwork{owners: map[string]string{}, handoffs: map[string]string{}}
}

func (n *fakeNetwork) attachment(tap string, i int) Attachment {
	mac := fmt.Sprintf("06:00:00:00:%02x:%02x", i/256, i%256)
	return Attachment{
		Interfaces: []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: tap, GuestMAC: mac}},
		Overrides:  []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: tap}},
		Guest: GuestNetwork{Interfaces: []GuestInterface{{
			MAC:     mac,
			Address: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i / 256), byte(i % 256)}), 16),
		}}},
	}
}

func (n *fakeNetwork) Attach(ctx context.Context, id string) (Attachment, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if id == n.failOn {
		return Attachment{}, errors.New("no free address")
	}
	if _, ok := n.owners[id]; ok {
		return Attachment{}, fmt.Errorf("attach %s: already attached", id)
	}
	n.next++
	tap := fmt.Sprintf("tap%d", n.next)
	n.owners[id] = tap
	return n.attachment(tap, n.next), nil
}

func (n *fakeNetwork) Handoff(ctx context.Context, from, to string) (Attachment, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	tap, ok := n.owners[from]
	if !ok {
		return Attachment{}, fmt.Errorf("handoff %s: not attached", from)
	}
	if prev, ok := n.handoffs[from]; ok {
		return Attachment{}, fmt.Errorf("entry %s handed to %s and %s", from, prev, to)
	}
	delete(n.owners, from)
	n.owners[to] = tap
	n.handoffs[from] = to
	n.next++
	return n.attachment(tap, n.next), nil
}

func (n *fakeNetwork) Detach(ctx context.Context, id string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.owners, id)
	return nil
}

func (n *fakeNetwork) attached() map[string]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string]string{}
	for k, v := range n.owners {
		out[k] = v
	}
	return out
}

// fakeGuest replies to health checks and records personalizations.
type fakeGuest struct {
	mu        sync.Mutex
	sick      map[string]bool // ids whose health check fails
	block     bool            // health checks block until ctx ends
	personas  map[string]Personalization
	healthCnt int
	// gate, when set, blocks every Personalize until it is closed.
	gate chan struct{}
}

func newFakeGuest() *fakeGuest {
	return &fakeGuest{sick: map[string]bool{}, personas: map[string]Personalization{}}
}

func (g *fakeGuest) Health(ctx context.Context, id string) error {
	g.mu.Lock()
	g.healthCnt++
	block, sick := g.block, g.sick[id]
	g.mu.Unlock()
	if block {
		<-ctx.Done()
		return ctx.Err()
	}
	if sick {
		return errors.New("agent not answering")
	}
	return nil
}

func (g *fakeGuest) Personalize(ctx context.Context, id string, p Personalization) error {
	g.mu.Lock()
	gate := g.gate
	g.mu.Unlock()
	if gate != nil {
		<-gate
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.personas[id] = p
	return nil
}

func (g *fakeGuest) setSick(id string, sick bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.sick[id] = sick
}

type fixture struct {
	prov *memory.Provider
	net  *fakeNetwork
	gst  *fakeGuest
	reg  *prometheus.Registry
	pool *Pool
	key  Key
}

// newFixture makes a memory provider with a golden snapshot "golden/base"
// of a 1 vCPU, 128 MiB VM with one NIC, and a pool over it.
func newFixture(t *testing.T, mutate func(*Options)) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{prov: memory.New(), net: newFakeNetwork(), gst: newFakeGuest(), reg: prometheus.NewRegistry(),
		key: Key{Stack: "python", Version: "3.12", VCPUCount: 1, MemSizeMiB: 128}}
	for _, id := range []string{"golden", "golden2"} {
		cfg := vm.Config{ID: id, Kernel: "/k", VCPUCount: 1, MemSizeMiB: 128, BootArgs: "x",
			NetworkInterfaces: []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap-" + id}}}
		if _, err := f.prov.Create(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		mustNil(t, f.prov.Start(ctx, id))
		mustNil(t, f.prov.Pause(ctx, id))
		if _, err := f.prov.Snapshot(ctx, id, vm.SnapshotOptions{ID: "base"}); err != nil {
			t.Fatal(err)
		}
		mustNil(t, f.prov.Destroy(ctx, id))
	}
	opts := Options{Provider: f.prov, Network: f.net, Guest: f.gst, Registerer: f.reg,
		EvictInterval: 10 * time.Millisecond, RetryDelay: 10 * time.Millisecond}
	if mutate != nil {
		mutate(&opts)
	}
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	f.pool = p
	t.Cleanup(func() {
		if err := p.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return f
}

func (f *fixture) bucket(min, max int) BucketConfig {
	return BucketConfig{Key: f.key, Snapshot: vm.SnapshotRef{VMID: "golden", SnapshotID: "base"}, MinDepth: min, MaxDepth: max, RefillConcurrency: 2}
}

func mustNil(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond for up to ten seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func (f *fixture) ready() int {
	st := f.pool.Status()
	if len(st) == 0 {
		return -1
	}
	return st[0].Ready
}

func (f *fixture) vmIDs(t *testing.T) []string {
	infos, err := f.prov.List(context.Background())
	mustNil(t, err)
	var ids []string
	for _, i := range infos {
		ids = append(ids, i.ID)
	}
	return ids
}

func TestAcquireWarm(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(2, 3)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })
	for _, id := range f.vmIDs(t) {
		info, _ := f.prov.Get(context.Background(), id)
		if info.State != vm.StatePaused {
			t.Errorf("ready entry %s is %s, want paused", id, info.State)
		}
	}

	res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "alice", Env: map[string]string{"A": "1"}})
	mustNil(t, err)
	if res.Path != PathWarm {
		t.Errorf("path = %s, want warm", res.Path)
	}
	if res.Info.ID != "alice" || res.Info.State != vm.StateRunning {
		t.Errorf("tenant vm = %s %s, want alice running", res.Info.ID, res.Info.State)
	}
	p := f.gst.personas["alice"]
	if p.Hostname != "alice" || p.Env["A"] != "1" || len(p.Network.Interfaces) != 1 || p.Clock.IsZero() {
		t.Errorf("personalization = %+v", p)
	}
	if _, ok := f.net.attached()["alice"]; !ok {
		t.Error("tenant has no network identity")
	}
	if got := testutil.ToFloat64(f.pool.metrics.hits.WithLabelValues(f.key.String())); got != 1 {
		t.Errorf("hits = %v, want 1", got)
	}
	waitFor(t, "refill after acquire", func() bool { return f.ready() == 2 })
}

func TestAcquireConcurrentNoDoubleHandout(t *testing.T) {
	f := newFixture(t, nil)
	cfg := f.bucket(3, 5)
	cfg.RestoreOnDemand = true
	mustNil(t, f.pool.Register(cfg))
	waitFor(t, "depth 3", func() bool { return f.ready() == 3 })

	const tenants = 12
	results := make([]Result, tenants)
	errs := make([]error, tenants)
	var wg sync.WaitGroup
	for i := range tenants {
		wg.Go(func() {
			results[i], errs[i] = f.pool.Acquire(context.Background(), f.key, Tenant{ID: fmt.Sprintf("t-%d", i)})
		})
	}
	wg.Wait()
	taps := map[string]string{}
	for i := range tenants {
		if errs[i] != nil {
			t.Fatalf("acquire t-%d: %v", i, errs[i])
		}
		tap := results[i].Attachment.Interfaces[0].HostDevName
		if other, ok := taps[tap]; ok {
			t.Fatalf("tap %s handed to t-%d and %s", tap, i, other)
		}
		taps[tap] = fmt.Sprintf("t-%d", i)
		if results[i].Info.State != vm.StateRunning {
			t.Errorf("t-%d state %s", i, results[i].Info.State)
		}
	}
	hits := testutil.ToFloat64(f.pool.metrics.hits.WithLabelValues(f.key.String()))
	misses := testutil.ToFloat64(f.pool.metrics.misses.WithLabelValues(f.key.String()))
	if hits+misses != tenants || hits < 1 {
		t.Errorf("hits %v + misses %v, want %d with at least one hit", hits, misses, tenants)
	}
}

func TestAcquireMissPaths(t *testing.T) {
	cases := []struct {
		name    string
		restore bool
		cold    bool
		want    Path
		wantErr error
	}{
		{"nothing allowed", false, false, "", ErrEmpty},
		{"restore on demand", true, false, PathRestore, nil},
		{"cold boot", false, true, PathCold, nil},
		{"restore before cold", true, true, PathRestore, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, nil)
			cfg := f.bucket(0, 0)
			cfg.RestoreOnDemand = tc.restore
			if tc.cold {
				cfg.ColdBoot = func(id string, att Attachment) (vm.Config, error) {
					return vm.Config{ID: id, Kernel: "/k", VCPUCount: 1, MemSizeMiB: 128, NetworkInterfaces: att.Interfaces}, nil
				}
			}
			mustNil(t, f.pool.Register(cfg))
			res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "bob"})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if len(f.net.attached()) != 0 || len(f.vmIDs(t)) != 0 {
					t.Fatalf("failed acquire left %v / %v", f.net.attached(), f.vmIDs(t))
				}
				return
			}
			mustNil(t, err)
			if res.Path != tc.want || res.Info.State != vm.StateRunning || f.gst.personas["bob"].Hostname != "bob" {
				t.Fatalf("path %s state %s persona %+v", res.Path, res.Info.State, f.gst.personas["bob"])
			}
			if got := testutil.ToFloat64(f.pool.metrics.misses.WithLabelValues(f.key.String())); got != 1 {
				t.Errorf("misses = %v, want 1", got)
			}
		})
	}
}

func TestAcquireSkipsUnhealthyEntry(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })
	// The first entry's agent will fail after the hand-off.
	f.gst.setSick("carol", true)
	_, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "carol"})
	if err == nil {
		t.Fatal("acquire succeeded although every hand-off fails the health check")
	}
	if !errors.Is(err, ErrEmpty) {
		t.Errorf("err = %v, want ErrEmpty once every entry failed", err)
	}
	if got := testutil.ToFloat64(f.pool.metrics.evictions.WithLabelValues(f.key.String(), evictFailed)); got != 2 {
		t.Errorf("handoff-failed evictions = %v, want 2", got)
	}
	f.gst.setSick("carol", false)
	waitFor(t, "refill", func() bool { return f.ready() == 2 })
	res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "carol"})
	mustNil(t, err)
	if res.Path != PathWarm {
		t.Fatalf("path = %s", res.Path)
	}
	for id := range f.net.attached() {
		if id != "carol" && !f.isEntry(t, id) {
			t.Errorf("network identity leaked for %s", id)
		}
	}
}

func (f *fixture) isEntry(t *testing.T, id string) bool {
	for _, v := range f.vmIDs(t) {
		if v == id {
			return true
		}
	}
	return false
}

func TestAcquireBadInput(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(1, 1)))
	waitFor(t, "depth 1", func() bool { return f.ready() == 1 })

	_, err := f.pool.Acquire(context.Background(), Key{Stack: "nope", VCPUCount: 1, MemSizeMiB: 1}, Tenant{ID: "x"})
	if !errors.Is(err, ErrUnknownBucket) {
		t.Errorf("unknown bucket: err = %v", err)
	}
	_, err = f.pool.Acquire(context.Background(), f.key, Tenant{ID: "bad/id"})
	if !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("invalid tenant id: err = %v", err)
	}
	_, err = f.pool.Acquire(context.Background(), f.key, Tenant{ID: "dave"})
	mustNil(t, err)
	_, err = f.pool.Acquire(context.Background(), f.key, Tenant{ID: "dave"})
	if !errors.Is(err, vm.ErrAlreadyExists) {
		t.Errorf("tenant id in use: err = %v", err)
	}
}

func TestBucketWithMissingSnapshotIsUnhealthy(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.UnhealthyAfter = 2 })
	cfg := f.bucket(1, 1)
	cfg.Snapshot.SnapshotID = "deleted"
	mustNil(t, f.pool.Register(cfg))
	waitFor(t, "unhealthy", func() bool { return !f.pool.Status()[0].Healthy })
	st := f.pool.Status()[0]
	if st.Ready != 0 || st.LastError == "" {
		t.Fatalf("status = %+v", st)
	}
	_, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "erin"})
	if !errors.Is(err, ErrUnhealthy) || !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Fatalf("err = %v, want ErrUnhealthy wrapping ErrSnapshotNotFound", err)
	}
	if n := testutil.ToFloat64(f.pool.metrics.refillFailures.WithLabelValues(f.key.String())); n < 2 {
		t.Errorf("refill failures = %v, want at least 2", n)
	}
	if len(f.net.attached()) != 0 || len(f.vmIDs(t)) != 0 {
		t.Fatalf("failed refills left %v / %v", f.net.attached(), f.vmIDs(t))
	}
}

func TestVerifySnapshotFailureMarksUnhealthyAtOnce(t *testing.T) {
	f := newFixture(t, func(o *Options) {
		o.UnhealthyAfter = 100
		o.VerifySnapshot = func(ctx context.Context, ref vm.SnapshotRef) error {
			return fmt.Errorf("memory file size 0, manifest says 134217728")
		}
	})
	mustNil(t, f.pool.Register(f.bucket(1, 1)))
	waitFor(t, "unhealthy", func() bool { return !f.pool.Status()[0].Healthy })
}

func TestAgeEviction(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	f := newFixture(t, func(o *Options) { o.Now = clock })
	cfg := f.bucket(2, 2)
	cfg.MaxAge = time.Minute
	mustNil(t, f.pool.Register(cfg))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })
	before := f.vmIDs(t)

	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	evicted := func() float64 {
		return testutil.ToFloat64(f.pool.metrics.evictions.WithLabelValues(f.key.String(), evictAge))
	}
	waitFor(t, "age evictions", func() bool { return evicted() == 2 })
	waitFor(t, "refill", func() bool { return f.ready() == 2 })
	for _, old := range before {
		if f.isEntry(t, old) {
			t.Errorf("aged entry %s still exists", old)
		}
	}
}

func TestRebindDrainsOldEntries(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })
	old := f.vmIDs(t)

	cfg := f.bucket(2, 2)
	cfg.Snapshot.VMID = "golden2"
	mustNil(t, f.pool.Register(cfg))
	waitFor(t, "old entries drained", func() bool {
		for _, id := range old {
			if f.isEntry(t, id) {
				return false
			}
		}
		return f.ready() == 2
	})
	res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "frank"})
	mustNil(t, err)
	if got := res.Info.Config.RestoreFrom.VMID; got != "golden2" {
		t.Fatalf("acquired vm restored from %s, want golden2", got)
	}
}

func TestCloseDuringRefillLeavesNothing(t *testing.T) {
	f := newFixture(t, nil)
	f.gst.block = true
	cfg := f.bucket(3, 3)
	cfg.RefillConcurrency = 3
	mustNil(t, f.pool.Register(cfg))
	waitFor(t, "refills in flight", func() bool { return f.pool.Status()[0].InFlight == 3 && len(f.vmIDs(t)) == 3 })
	mustNil(t, f.pool.Close(context.Background()))
	if ids := f.vmIDs(t); len(ids) != 0 {
		t.Fatalf("vms left after close: %v", ids)
	}
	if a := f.net.attached(); len(a) != 0 {
		t.Fatalf("network identities left after close: %v", a)
	}
	if _, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "late"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("acquire after close: err = %v", err)
	}
}

func TestCloseDestroysReadyEntries(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(3, 3)))
	waitFor(t, "depth 3", func() bool { return f.ready() == 3 })
	res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "keeper"})
	mustNil(t, err)
	mustNil(t, f.pool.Close(context.Background()))
	ids := f.vmIDs(t)
	if len(ids) != 1 || ids[0] != res.Info.ID {
		t.Fatalf("vms after close = %v, want only the tenant's %s", ids, res.Info.ID)
	}
}

func TestRegisterValidates(t *testing.T) {
	f := newFixture(t, nil)
	bad := BucketConfig{Key: Key{VCPUCount: 0, MemSizeMiB: 0}, MinDepth: 3, MaxDepth: 1, Snapshot: vm.SnapshotRef{VMID: "a", SnapshotID: "../x"}}
	err := f.pool.Register(bad)
	for _, want := range []string{"key.stack: missing", "key.vcpu_count: 0 is invalid", "key.mem_size_mib: 0 is invalid", "snapshot.snapshot_id", "max_depth: 1 is less than min_depth 3"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v, want it to contain %q", err, want)
		}
	}
}

func TestRemoveBucket(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })
	mustNil(t, f.pool.Remove(context.Background(), f.key))
	if ids := f.vmIDs(t); len(ids) != 0 {
		t.Fatalf("vms after remove: %v", ids)
	}
	if err := f.pool.Remove(context.Background(), f.key); !errors.Is(err, ErrUnknownBucket) {
		t.Fatalf("second remove: err = %v", err)
	}
}

// A refill competes with the hand-off for the CPU, so it starts only once
// the hand-off is over.
func TestRefillWaitsForHandOff(t *testing.T) {
	// No periodic wake-up of the refiller during the test.
	f := newFixture(t, func(o *Options) { o.EvictInterval = time.Hour })
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })

	gate := make(chan struct{})
	f.gst.mu.Lock()
	f.gst.gate = gate
	f.gst.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "alice"})
		done <- err
	}()
	waitFor(t, "the hand-off to claim an entry", func() bool { return f.ready() == 1 })
	if st := f.pool.Status()[0]; st.InFlight != 0 {
		t.Errorf("refills in flight during the hand-off: %d, want 0", st.InFlight)
	}

	close(gate)
	mustNil(t, <-done)
	waitFor(t, "refill after the hand-off", func() bool { return f.ready() == 2 })
}

// checkingGuest is a fakeGuest that personalizes and checks health in one
// step.
type checkingGuest struct {
	*fakeGuest
	mu     sync.Mutex
	checks []string
	// healthIDs are the ids of separate Health calls.
	healthIDs []string
}

func (g *checkingGuest) Health(ctx context.Context, id string) error {
	g.mu.Lock()
	g.healthIDs = append(g.healthIDs, id)
	g.mu.Unlock()
	return g.fakeGuest.Health(ctx, id)
}

func (g *checkingGuest) PersonalizeAndCheck(ctx context.Context, id string, p Personalization) error {
	if err := g.fakeGuest.Personalize(ctx, id, p); err != nil {
		return err
	}
	g.mu.Lock()
	g.checks = append(g.checks, id)
	g.mu.Unlock()
	g.fakeGuest.mu.Lock()
	sick := g.fakeGuest.sick[id]
	g.fakeGuest.mu.Unlock()
	if sick {
		return errors.New("agent not answering")
	}
	return nil
}

// A CheckingGuest personalizes and checks a tenant in one call, so Acquire
// makes no separate health call.
func TestAcquireWithCheckingGuest(t *testing.T) {
	var g *checkingGuest
	f := newFixture(t, func(o *Options) {
		g = &checkingGuest{fakeGuest: o.Guest.(*fakeGuest)}
		o.Guest = g
	})
	mustNil(t, f.pool.Register(f.bucket(1, 1)))
	waitFor(t, "depth 1", func() bool { return f.ready() == 1 })

	res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "carol"})
	mustNil(t, err)
	if res.Path != PathWarm {
		t.Errorf("path = %s, want warm", res.Path)
	}
	g.mu.Lock()
	checks := slices.Clone(g.checks)
	healthIDs := slices.Clone(g.healthIDs)
	g.mu.Unlock()
	if slices.Contains(healthIDs, "carol") {
		t.Errorf("separate health calls %v include the tenant", healthIDs)
	}
	if !slices.Equal(checks, []string{"carol"}) {
		t.Errorf("personalize-and-check calls: %v, want [carol]", checks)
	}
}

// warmingGuest is a fakeGuest that records Warm calls.
type warmingGuest struct {
	*fakeGuest
	mu     sync.Mutex
	warmed []string
}

func (g *warmingGuest) Warm(ctx context.Context, id string) error {
	g.mu.Lock()
	g.warmed = append(g.warmed, id)
	g.mu.Unlock()
	return g.fakeGuest.Health(ctx, id)
}

func (g *warmingGuest) warmedIDs() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.warmed)
}

// Refills warm their entries through a Warmer; restores on demand, whose
// tenant waits, do not.
func TestRefillWarmsEntries(t *testing.T) {
	var g *warmingGuest
	f := newFixture(t, func(o *Options) {
		g = &warmingGuest{fakeGuest: o.Guest.(*fakeGuest)}
		o.Guest = g
	})
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })
	warmed := g.warmedIDs()
	if len(warmed) != 2 {
		t.Fatalf("warmed %v, want the 2 entries", warmed)
	}
	for _, id := range warmed {
		if !f.isEntry(t, id) {
			t.Errorf("warmed %s, which is not a pool entry", id)
		}
	}

	cfg := f.bucket(0, 0)
	cfg.Key.Stack = "on-demand"
	cfg.RestoreOnDemand = true
	mustNil(t, f.pool.Register(cfg))
	res, err := f.pool.Acquire(context.Background(), cfg.Key, Tenant{ID: "dave"})
	mustNil(t, err)
	if res.Path != PathRestore {
		t.Errorf("path = %s, want restore", res.Path)
	}
	if slices.Contains(g.warmedIDs(), "dave") {
		t.Error("restore on demand warmed the tenant's vm")
	}
}
