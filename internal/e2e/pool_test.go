package e2e_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/network/networktest"
	"github.com/embervm/ember/pool"
	"github.com/embervm/ember/vm"
)

// TestPoolRealGuestsSlots hands warm clones of one snapshot to three
// tenants through the pool with real slot-mode networking: each tenant
// replies with its own hostname at its own slot address, reaches the
// allowed server and nothing else, and the pool refills and shuts down
// without leaks.
func TestPoolRealGuestsSlots(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()

	src := e.attach(t, "golden", "sl")
	e.startAll(t, src)
	if err := e.prov.Pause(ctx, src.id); err != nil {
		t.Fatalf("pause vm golden: %v", err)
	}
	if _, err := e.prov.Snapshot(ctx, src.id, vm.SnapshotOptions{ID: "base"}); err != nil {
		t.Fatalf("snapshot vm golden: %v", err)
	}
	src.client.Close()
	if err := e.prov.Destroy(ctx, src.id); err != nil {
		t.Fatalf("destroy vm golden: %v", err)
	}
	if err := e.mgr.Detach(ctx, src.id); err != nil {
		t.Fatalf("detach vm golden: %v", err)
	}

	netw := &pool.ManagedNetwork{Manager: e.mgr, Network: "sl", MAC: src.att.Lease.MAC}
	pl, err := pool.New(pool.Options{
		Provider: e.prov, Network: netw, Guest: pool.AgentGuest{Dialer: e.prov},
		Registerer: prometheus.NewRegistry(), Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			pl.Close(context.Background())
		}
	})
	key := pool.Key{Stack: "e2e", Version: "1", VCPUCount: 1, MemSizeMiB: guestMemMiB}
	err = pl.Register(pool.BucketConfig{
		Key: key, Snapshot: vm.SnapshotRef{VMID: src.id, SnapshotID: "base"},
		MinDepth: 2, MaxDepth: 3, RestoreOnDemand: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, pl, 2)

	var tenants []*guest
	for i := 1; i <= 3; i++ {
		id := fmt.Sprintf("tenant-%d", i)
		res, err := pl.Acquire(ctx, key, pool.Tenant{ID: id})
		if err != nil {
			t.Fatalf("acquire %s: %v", id, err)
		}
		lease, err := e.mgr.Lease(id)
		if err != nil {
			t.Fatalf("lease of %s: %v", id, err)
		}
		if res.Info.State != vm.StateRunning || res.Info.Config.NetNS == "" {
			t.Fatalf("tenant %s: state %s netns %q", id, res.Info.State, res.Info.Config.NetNS)
		}
		g := &guest{id: id}
		g.att.Lease = lease
		dial := func(ctx context.Context) (net.Conn, error) { return e.prov.DialAgent(ctx, id) }
		dctx, cancel := context.WithTimeout(ctx, agentTimeout)
		g.client, err = agent.Dial(dctx, dial, nil)
		cancel()
		if err != nil {
			t.Fatalf("agent of %s: %v", id, err)
		}
		var out strings.Builder
		if _, err := g.client.Exec(ctx, agent.ExecRequest{Argv: []string{"hostname"}}, agent.ExecIO{Stdout: &out}); err != nil || out.String() != id+"\n" {
			t.Fatalf("hostname of %s = %q (%v)", id, out.String(), err)
		}
		t.Logf("%s acquired by the %s path in %s", id, res.Path, res.Duration)
		tenants = append(tenants, g)
	}

	// Each tenant replies from the host's view at its own slot address.
	for _, g := range tenants {
		serveInGuest(t, g)
		addr := g.att.Lease.SlotAddr.String() + ":" + guestPort
		line, err := networktest.Dial(e.host, addr, 10*time.Second)
		if err != nil || line != "hello from "+g.id {
			t.Errorf("host -> %s at %s: %q, %v; want hello from %s", g.id, addr, line, err, g.id)
		}
	}
	allowed := "hello from " + allowedAddr
	checkReach(t, []expectation{
		{g: tenants[0], addr: allowedAddr, reach: true, reply: allowed},
		{g: tenants[0], addr: deniedAddr},
		{g: tenants[0], addr: tenants[1].att.Lease.SlotAddr.String() + ":" + guestPort},
		{g: tenants[1], addr: allowedAddr, reach: true, reply: allowed},
		{g: tenants[1], addr: hostAddr},
		{g: tenants[2], addr: allowedAddr, reach: true, reply: allowed},
		{g: tenants[2], addr: tenants[0].att.Lease.SlotAddr.String() + ":" + guestPort},
	})

	waitReady(t, pl, 2)
	if err := pl.Close(context.Background()); err != nil {
		t.Fatalf("close pool: %v", err)
	}
	closed = true
	infos, err := e.prov.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != len(tenants) {
		t.Fatalf("vms after closing the pool = %d, want only the %d tenants", len(infos), len(tenants))
	}
	for _, g := range tenants {
		if err := e.prov.Destroy(ctx, g.id); err != nil {
			t.Errorf("destroy %s: %v", g.id, err)
		}
		if err := e.mgr.Detach(ctx, g.id); err != nil {
			t.Errorf("detach %s: %v", g.id, err)
		}
	}
	if leases, err := e.store.List(); err != nil || len(leases) != 0 {
		t.Errorf("leases left: %+v (%v)", leases, err)
	}
}

// waitReady waits until the pool's only bucket has n ready entries.
func waitReady(t *testing.T, pl *pool.Pool, n int) {
	t.Helper()
	deadline := time.Now().Add(agentTimeout)
	for time.Now().Before(deadline) {
		st := pl.Status()
		if len(st) == 1 && st[0].Ready >= n {
			return
		}
		if len(st) == 1 && !st[0].Healthy {
			t.Fatalf("bucket unhealthy: %s", st[0].LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("bucket did not reach %d ready entries: %+v", n, pl.Status())
}
