package pool

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/networktest"
)

// TestPoolWithManagedNetwork drives the pool through the real network
// manager (over recording fakes of the kernel and firewall) in slot mode.
func TestPoolWithManagedNetwork(t *testing.T) {
	store, err := network.OpenStore(filepath.Join(t.TempDir(), "leases.db"))
	mustNil(t, err)
	t.Cleanup(func() { store.Close() })
	kernel := networktest.NewFakeKernel()
	kernel.AddLink("", network.Link{Name: "up0", Kind: "veth", Up: true})
	mgr, err := network.NewManager(network.Options{
		Networks: []network.Network{{Name: "slots", Mode: network.ModeSlot,
			TransitRange: netip.MustParsePrefix("10.70.0.0/24"), Uplink: "up0", ManageIPForwarding: true}},
		Store: store, Kernel: kernel, Firewall: networktest.NewFakeFirewall(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	mustNil(t, err)
	mustNil(t, mgr.Setup(context.Background()))

	netw := &ManagedNetwork{Manager: mgr, Network: "slots", MAC: "06:00:0a:00:00:02"}
	f := newFixture(t, func(o *Options) { o.Network = netw })
	f.pool.opts.Network = netw
	mustNil(t, f.pool.Register(f.bucket(2, 2)))
	waitFor(t, "depth 2", func() bool { return f.ready() == 2 })

	res, err := f.pool.Acquire(context.Background(), f.key, Tenant{ID: "tenant-a"})
	mustNil(t, err)
	lease, err := mgr.Lease("tenant-a")
	mustNil(t, err)
	if res.Attachment.NetNS == "" || res.Info.Config.NetworkInterfaces[0].HostDevName != lease.TAP {
		t.Fatalf("attachment %+v, lease %+v, vm nics %+v", res.Attachment, lease, res.Info.Config.NetworkInterfaces)
	}
	if g := res.Attachment.Guest.Interfaces[0]; g.MAC != "06:00:0a:00:00:02" || !g.Address.IsValid() {
		t.Fatalf("guest addressing = %+v", g)
	}
	if f.gst.personas["tenant-a"].Network.Interfaces[0].Address != res.Attachment.Guest.Interfaces[0].Address {
		t.Fatalf("agent was not given the tenant's address")
	}

	mustNil(t, f.pool.Close(context.Background()))
	mustNil(t, f.prov.Destroy(context.Background(), "tenant-a"))
	mustNil(t, netw.Detach(context.Background(), "tenant-a"))
	leases, err := store.List()
	mustNil(t, err)
	if len(leases) != 0 {
		t.Fatalf("leases left after close and detach: %+v", leases)
	}
}
