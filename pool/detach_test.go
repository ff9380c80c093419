package pool

import (
	"context"
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/embervm/ember/vm"
)

func TestDetachAndAdopt(t *testing.T) {
	f := newFixture(t, nil)
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })

	detached, err := f.pool.Detach(context.Background())
	mustNil(t, err)
	records := detached[f.key]
	if len(records) != 2 {
		t.Fatalf("detached entries = %+v, want 2", records)
	}
	if ids := f.vmIDs(t); len(ids) != 2 {
		t.Fatalf("detach destroyed entries: vms = %v", ids)
	}
	if _, err := f.pool.Detach(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("second detach: err = %v", err)
	}

	// A second pool over the same provider adopts the entries, plus one
	// record whose VM is gone and one whose VM is not ready.
	ctx := context.Background()
	notReady := "not-ready"
	_, err = f.prov.Create(ctx, vm.Config{ID: notReady, Kernel: "/k", VCPUCount: 1, MemSizeMiB: 128})
	mustNil(t, err)
	mustNil(t, f.prov.Start(ctx, notReady))
	cfg := f.bucket(2, 2)
	cfg.Entries = append(records, EntryRecord{ID: "gone"}, EntryRecord{ID: notReady})

	p2, err := New(Options{Provider: f.prov, Network: f.net, Guest: f.gst, Registerer: prometheus.NewRegistry()})
	mustNil(t, err)
	t.Cleanup(func() { p2.Close(context.Background()) })
	mustNil(t, p2.Register(cfg))
	if st := p2.Status()[0]; st.Ready != 2 {
		t.Fatalf("adopted ready = %d, want 2", st.Ready)
	}
	if got := testutil.ToFloat64(p2.metrics.depth.WithLabelValues(f.key.String())); got != 2 {
		t.Errorf("depth gauge after adopt = %v, want 2", got)
	}
	if _, err := f.prov.Get(ctx, notReady); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("a running vm offered as an entry was not destroyed: %v", err)
	}
	res, err := p2.Acquire(ctx, f.key, Tenant{ID: "adopter"})
	mustNil(t, err)
	if res.Path != PathWarm || (res.Info.Config.RestoreFrom == nil) {
		t.Fatalf("acquire from adopted entries: path %s info %+v", res.Path, res.Info)
	}
	adopted := false
	for from := range f.net.handoffs {
		if from == records[0].ID || from == records[1].ID {
			adopted = true
		}
	}
	if !adopted {
		t.Fatalf("hand-off did not use an adopted entry: %v", f.net.handoffs)
	}
}
