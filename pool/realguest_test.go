package pool_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/embervm/ember/pool"
	"github.com/embervm/ember/provider/qemu"
	"github.com/embervm/ember/vm"
)

const goldenID = "golden"

// realKey is the bucket key of the golden snapshot's shape.
var realKey = pool.Key{Stack: "bundle", Version: "1", VCPUCount: 1, MemSizeMiB: guestMemMiB}

// TestRealGuestPool runs the pool on QEMU guests restored from one golden
// snapshot of the bundle. The subtests share the golden VM, which stays
// paused so the damaged-snapshot cases can take snapshots of their own.
func TestRealGuestPool(t *testing.T) {
	env := newRealEnv(t)
	ref := env.golden(t, goldenID, "base")

	t.Run("acquire three tenants", func(t *testing.T) { testAcquireTenants(t, env, ref) })
	t.Run("close during refill", func(t *testing.T) { testCloseDuringRefill(t, env, ref) })
	t.Run("tenant id in use", func(t *testing.T) { testTenantIDInUse(t, env, ref) })
	t.Run("damaged snapshot", func(t *testing.T) { testDamagedSnapshot(t, env) })
}

func testAcquireTenants(t *testing.T, env *realEnv, ref vm.SnapshotRef) {
	reg := prometheus.NewPedanticRegistry()
	p := env.newPool(t, func(o *pool.Options) {
		o.VerifySnapshot = env.verifySnapshot
		o.Registerer = reg
	})
	const depth = 3
	err := p.Register(pool.BucketConfig{Key: realKey, Snapshot: ref, MinDepth: depth, RefillConcurrency: 2})
	if err != nil {
		t.Fatal(err)
	}
	waitStatus(t, p, "the bucket to fill", func(s pool.BucketStatus) bool { return s.Ready == depth })
	ctx := context.Background()

	tenants := []pool.Tenant{
		{ID: "tenant-a", Hostname: "alpha", Env: map[string]string{"EMBER_TENANT": "a", "EMBER_PLAN": "free"}},
		{ID: "tenant-b", Hostname: "bravo", Env: map[string]string{"EMBER_TENANT": "b", "EMBER_PLAN": "pro"}},
		{ID: "tenant-c", Env: map[string]string{"EMBER_TENANT": "c"}},
	}
	for _, tenant := range tenants {
		res, err := p.Acquire(ctx, realKey, tenant)
		if err != nil {
			t.Fatalf("acquire for %s: %v", tenant.ID, err)
		}
		if res.Path != pool.PathWarm {
			t.Errorf("acquire for %s: path %s, want %s", tenant.ID, res.Path, pool.PathWarm)
		}
		if res.Info.ID != tenant.ID || res.Info.State != vm.StateRunning {
			t.Errorf("acquire for %s: vm %s in state %s, want %s running", tenant.ID, res.Info.ID, res.Info.State, tenant.ID)
		}
	}

	// Each tenant answers through the agent with its own hostname and
	// environment. A tenant without a hostname gets its id.
	for _, tenant := range tenants {
		want := tenant.Hostname
		if want == "" {
			want = tenant.ID
		}
		out, err := env.guestExec(ctx, tenant.ID, "hostname")
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(out); got != want {
			t.Errorf("tenant %s: hostname %q, want %q", tenant.ID, got, want)
		}
		out, err = env.guestExec(ctx, tenant.ID, "sh", "-c", `echo "$EMBER_TENANT/$EMBER_PLAN"`)
		if err != nil {
			t.Fatal(err)
		}
		wantEnv := tenant.Env["EMBER_TENANT"] + "/" + tenant.Env["EMBER_PLAN"]
		if got := strings.TrimSpace(out); got != wantEnv {
			t.Errorf("tenant %s: environment %q, want %q", tenant.ID, got, wantEnv)
		}
	}

	st := waitStatus(t, p, "the bucket to refill", func(s pool.BucketStatus) bool { return s.Ready == depth && s.InFlight == 0 })
	if !st.Healthy || st.LastError != "" {
		t.Errorf("bucket after refill: healthy %v, last error %q", st.Healthy, st.LastError)
	}
	checkAcquireMetrics(t, reg, len(tenants), depth)

	// Close destroys the entries but leaves the tenants, which belong to
	// the caller now.
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	want := []string{goldenID, "tenant-a", "tenant-b", "tenant-c"}
	if got := env.vmIDs(t); !slices.Equal(got, want) {
		t.Errorf("vms after close: %v, want %v", got, want)
	}
	for _, tenant := range tenants {
		if err := env.prov.Destroy(ctx, tenant.ID); err != nil {
			t.Fatal(err)
		}
	}
	checkOnlyGolden(t, env)
}

// checkAcquireMetrics checks the acquire histogram and depth gauge after n
// warm acquires from a bucket that refilled to depth.
func checkAcquireMetrics(t *testing.T, reg *prometheus.Registry, n, depth int) {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var warm, depthSeen bool
	for _, f := range families {
		switch f.GetName() {
		case "ember_pool_acquire_seconds":
			for _, m := range f.GetMetric() {
				labels := map[string]string{}
				for _, l := range m.GetLabel() {
					labels[l.GetName()] = l.GetValue()
				}
				if labels["bucket"] != realKey.String() {
					t.Errorf("acquire histogram: bucket label %q, want %q", labels["bucket"], realKey.String())
				}
				if labels["path"] != string(pool.PathWarm) {
					t.Errorf("acquire histogram: unexpected path %q", labels["path"])
					continue
				}
				warm = true
				if got := m.GetHistogram().GetSampleCount(); got != uint64(n) {
					t.Errorf("acquire histogram, warm path: %d samples, want %d", got, n)
				}
			}
		case "ember_pool_depth":
			depthSeen = true
			if got := f.GetMetric()[0].GetGauge().GetValue(); got != float64(depth) {
				t.Errorf("depth gauge: %v, want %d", got, depth)
			}
		}
	}
	if !warm {
		t.Error("acquire histogram has no warm series")
	}
	if !depthSeen {
		t.Error("depth gauge missing")
	}
	hits, err := testutil.GatherAndCount(reg, "ember_pool_hits_total")
	if err != nil || hits != 1 {
		t.Errorf("hits counter: %d series (%v), want 1", hits, err)
	}
}

// checkOnlyGolden checks that the golden VM is all that is left: no other
// VM in the provider, QEMU process or run directory.
func checkOnlyGolden(t *testing.T, env *realEnv) {
	t.Helper()
	if got := env.vmIDs(t); !slices.Equal(got, []string{goldenID}) {
		t.Errorf("vms: %v, want only %s", got, goldenID)
	}
	if got := env.vmDirs(t); !slices.Equal(got, []string{goldenID}) {
		t.Errorf("run directories: %v, want only %s", got, goldenID)
	}
	goldenDir := filepath.Join(env.runDir, "vms", goldenID) + "/"
	for pid, cmdline := range env.qemuProcesses(t) {
		if !strings.Contains(cmdline, goldenDir) {
			t.Errorf("process %s still runs: %s", pid, cmdline)
		}
	}
}

func testCloseDuringRefill(t *testing.T, env *realEnv, ref vm.SnapshotRef) {
	tests := []struct {
		name string
		// prepare brings the pool to the moment of Close.
		prepare func(t *testing.T, p *pool.Pool)
	}{
		{
			name: "first fill",
			prepare: func(t *testing.T, p *pool.Pool) {
				waitStatus(t, p, "a refill in flight", func(s pool.BucketStatus) bool { return s.InFlight > 0 })
			},
		},
		{
			name: "refill after acquire",
			prepare: func(t *testing.T, p *pool.Pool) {
				waitStatus(t, p, "the bucket to fill", func(s pool.BucketStatus) bool { return s.Ready == 2 })
				if _, err := p.Acquire(context.Background(), realKey, pool.Tenant{ID: "tenant-close"}); err != nil {
					t.Fatal(err)
				}
				waitStatus(t, p, "a refill in flight", func(s pool.BucketStatus) bool { return s.InFlight > 0 })
				if err := env.prov.Destroy(context.Background(), "tenant-close"); err != nil {
					t.Fatal(err)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := env.newPool(t, nil)
			err := p.Register(pool.BucketConfig{Key: realKey, Snapshot: ref, MinDepth: 2, RefillConcurrency: 2})
			if err != nil {
				t.Fatal(err)
			}
			tt.prepare(t, p)
			if err := p.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if st := p.Status(); len(st) != 0 {
				t.Errorf("status after close: %+v, want no buckets", st)
			}
			checkOnlyGolden(t, env)
		})
	}
}

func testTenantIDInUse(t *testing.T, env *realEnv, ref vm.SnapshotRef) {
	p := env.newPool(t, nil)
	err := p.Register(pool.BucketConfig{Key: realKey, Snapshot: ref, MinDepth: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	waitStatus(t, p, "the bucket to fill", func(s pool.BucketStatus) bool { return s.Ready == 1 })
	if _, err := p.Acquire(ctx, realKey, pool.Tenant{ID: "tenant-dup", Hostname: "first"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { env.prov.Destroy(context.Background(), "tenant-dup") })
	waitStatus(t, p, "the bucket to refill", func(s pool.BucketStatus) bool { return s.Ready == 1 && s.InFlight == 0 })

	tests := []struct {
		name   string
		tenant pool.Tenant
		check  func(error) bool
	}{
		{"tenant vm exists", pool.Tenant{ID: "tenant-dup", Hostname: "second"}, func(err error) bool { return errors.Is(err, vm.ErrAlreadyExists) }},
		{"id of another vm", pool.Tenant{ID: goldenID}, func(err error) bool { return errors.Is(err, vm.ErrAlreadyExists) }},
		{"invalid id", pool.Tenant{ID: "../escape"}, func(err error) bool {
			var verr *vm.ValidationError
			return errors.As(err, &verr)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := p.Acquire(ctx, realKey, tt.tenant)
			if !tt.check(err) {
				t.Fatalf("acquire for %q: error %v, want the case's typed error", tt.tenant.ID, err)
			}
			// The rejected acquire consumed no entry.
			if st := p.Status(); st[0].Ready != 1 || st[0].InFlight != 0 {
				t.Errorf("status after rejected acquire: %+v, want 1 ready and none in flight", st[0])
			}
		})
	}

	// The first tenant is untouched.
	out, err := env.guestExec(ctx, "tenant-dup", "hostname")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != "first" {
		t.Errorf("tenant-dup hostname after rejected acquires: %q, want %q", got, "first")
	}
}

func testDamagedSnapshot(t *testing.T, env *realEnv) {
	deleteFiles := func(t *testing.T, info vm.SnapshotInfo) {
		if err := os.RemoveAll(filepath.Dir(info.StatePath)); err != nil {
			t.Fatal(err)
		}
	}
	truncateState := func(t *testing.T, info vm.SnapshotInfo) {
		st, err := os.Stat(info.StatePath)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(info.StatePath, st.Size()/2); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name   string
		damage func(*testing.T, vm.SnapshotInfo)
		// verify wires Options.VerifySnapshot to the snapshot store.
		verify bool
		want   error
	}{
		{"files deleted, store check", deleteFiles, true, vm.ErrSnapshotIncompatible},
		{"state truncated, store check", truncateState, true, vm.ErrSnapshotIncompatible},
		{"files deleted, provider error", deleteFiles, false, vm.ErrSnapshotNotFound},
		{"state truncated, provider error", truncateState, false, qemu.ErrSnapshotCorrupt},
	}
	// Every snapshot is taken before any is damaged, because QEMU copies
	// the previous snapshot's state while the golden VM has not run since.
	refs := make([]vm.SnapshotRef, len(tests))
	for i := range tests {
		refs[i] = env.snapshot(t, goldenID, fmt.Sprintf("damaged-%d", i))
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ref := refs[i]
			tt.damage(t, env.snapshotInfo(t, ref))

			p := env.newPool(t, func(o *pool.Options) {
				if tt.verify {
					o.VerifySnapshot = env.verifySnapshot
				}
				o.UnhealthyAfter = 2
			})
			err := p.Register(pool.BucketConfig{Key: realKey, Snapshot: ref, MinDepth: 2, RestoreOnDemand: true})
			if err != nil {
				t.Fatal(err)
			}
			st := waitStatus(t, p, "the bucket to turn unhealthy", func(s pool.BucketStatus) bool { return !s.Healthy })
			if st.Ready != 0 || st.LastError == "" {
				t.Errorf("unhealthy bucket: %d ready, last error %q; want 0 ready and an error", st.Ready, st.LastError)
			}

			_, err = p.Acquire(context.Background(), realKey, pool.Tenant{ID: "tenant-damaged"})
			if !errors.Is(err, pool.ErrUnhealthy) {
				t.Errorf("acquire: error %v, want %v", err, pool.ErrUnhealthy)
			}
			if !errors.Is(err, tt.want) {
				t.Errorf("acquire: error %v, want %v", err, tt.want)
			}
			if err := p.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			checkOnlyGolden(t, env)
		})
	}
}
