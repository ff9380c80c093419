package network_test

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/networktest"
	"github.com/embervm/ember/network/nft"
)

const dialTimeout = time.Second

// kernelEnv is a host namespace with uplink up0 (10.60.0.1/24) to a world
// namespace that serves TCP on 10.60.0.2:8080 (allowed) and 10.60.0.3:8080
// (denied), and a Manager working in the host namespace with fake guests.
type kernelEnv struct {
	host, hostName, world string
	kernel                *networktest.GuestKernel
	dbPath                string
	store                 *network.Store
	mgr                   *network.Manager
	nets                  []network.Network
}

var allowWorld = []nft.Rule{{Dest: netip.MustParsePrefix("10.60.0.2/32"), Protocol: nft.ProtocolTCP, Port: 8080}}

func newKernelEnv(t *testing.T) *kernelEnv {
	t.Helper()
	networktest.RequireKernel(t)
	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	e := &kernelEnv{dbPath: filepath.Join(t.TempDir(), "leases.db")}
	e.hostName, e.host = networktest.NewNS(t, "host")
	_, e.world = networktest.NewNS(t, "world")
	networktest.DumpRuleset(t, e.hostName)

	networktest.Veth(t, e.host, "up0", e.world, "eth0")
	networktest.Addr(t, e.host, "up0", "10.60.0.1/24")
	networktest.Addr(t, e.world, "eth0", "10.60.0.2/24")
	networktest.Addr(t, e.world, "eth0", "10.60.0.3/24")
	networktest.DefaultRoute(t, e.world, "10.60.0.1")
	networktest.Serve(t, e.world, "10.60.0.2:8080")
	networktest.Serve(t, e.world, "10.60.0.3:8080")
	networktest.Serve(t, e.host, "10.60.0.1:8080")

	e.nets = []network.Network{
		{Name: "br", Subnet: netip.MustParsePrefix("10.50.0.0/24"), Uplink: "up0", ManageIPForwarding: true, Allow: allowWorld},
		{Name: "pool", Subnet: netip.MustParsePrefix("10.51.0.0/24")},
		{Name: "sl", Mode: network.ModeSlot, TransitRange: netip.MustParsePrefix("10.70.0.0/24"), Uplink: "up0", ManageIPForwarding: true, Allow: allowWorld},
	}
	e.kernel = networktest.NewGuestKernel(t, e.host)
	e.open(t)
	t.Cleanup(func() { e.checkTeardown(t) })
	if _, err := e.mgr.Reconcile(context.Background()); err != nil {
		t.Fatalf("Reconcile (first start): %v", err)
	}
	return e
}

// open opens the store and a Manager, as an Ember process start does.
func (e *kernelEnv) open(t *testing.T) {
	t.Helper()
	e.store, e.mgr = networktest.OpenManager(t, e.dbPath, e.nets, e.host, e.kernel)
}

// checkTeardown removes everything and checks that the host namespace is
// back to lo and up0 with no nftables tables.
func (e *kernelEnv) checkTeardown(t *testing.T) {
	if err := e.mgr.Teardown(context.Background()); err != nil {
		t.Errorf("Teardown: %v", err)
	}
	e.store.Close()
	if got := networktest.LinkNames(t, e.host); !slices.Equal(got, []string{"lo", "up0"}) {
		t.Errorf("host links after Teardown = %v, want [lo up0]", got)
	}
	if got := networktest.RulesetSummary(t, e.host); len(got) != 0 {
		t.Errorf("nft chains after Teardown: %v", got)
	}
	if slots, _ := networktestListSlots(); len(slots) != 0 {
		t.Errorf("slot namespaces after Teardown: %v", slots)
	}
}

func networktestListSlots() ([]string, error) {
	return netnsList(networktest.Prefix + "slot-")
}

// attach attaches a VM and configures its fake guest as the agent would.
func (e *kernelEnv) attach(t *testing.T, id, net string) (network.Attachment, *networktest.Guest) {
	t.Helper()
	a, err := e.mgr.Attach(context.Background(), id, net, network.AttachOptions{})
	if err != nil {
		t.Fatalf("Attach %s: %v", id, err)
	}
	g := e.kernel.Guest(id)
	configure(t, g, a)
	return a, g
}

func configure(t *testing.T, g *networktest.Guest, a network.Attachment) {
	t.Helper()
	mac, err := parseMAC(a.Addressing.MAC)
	if err != nil {
		t.Fatal(err)
	}
	g.Configure(t, a.Addressing.Address, a.Addressing.Gateway, mac)
}

func reach(t *testing.T, from *networktest.Guest, addr string) {
	t.Helper()
	if _, err := networktest.Dial(from.Path, addr, dialTimeout); err != nil {
		t.Errorf("%s -> %s: %v, want an answer", from.Name, addr, err)
	}
}

func blocked(t *testing.T, from *networktest.Guest, addr string) {
	t.Helper()
	if _, err := networktest.Dial(from.Path, addr, dialTimeout); !errors.Is(err, networktest.ErrNoAnswer) {
		t.Errorf("%s -> %s: %v, want ErrNoAnswer", from.Name, addr, err)
	}
}

func TestKernelBridgeMode(t *testing.T) {
	e := newKernelEnv(t)
	a1, g1 := e.attach(t, "b1", "br")
	a2, g2 := e.attach(t, "b2", "br")
	networktest.Serve(t, g2.Path, a2.Addressing.Address.Addr().String()+":8080")
	networktest.Serve(t, e.host, "10.50.0.1:8080")

	if a1.Lease.TAP != "emt-b1" {
		t.Errorf("TAP = %s", a1.Lease.TAP)
	}
	reach(t, g1, "10.60.0.2:8080")
	blocked(t, g1, "10.60.0.3:8080")
	blocked(t, g1, a2.Addressing.Address.Addr().String()+":8080")
	blocked(t, g1, "10.50.0.1:8080")
	blocked(t, g1, "10.60.0.1:8080")
	reach(t, g2, "10.60.0.2:8080")
}

func TestKernelSlotMode(t *testing.T) {
	e := newKernelEnv(t)
	a1, g1 := e.attach(t, "s1", "sl")
	a2, g2 := e.attach(t, "s2", "sl")
	if a1.Addressing.Address != a2.Addressing.Address {
		t.Fatalf("slots have guest addresses %s and %s, want the same", a1.Addressing.Address, a2.Addressing.Address)
	}
	networktest.Serve(t, g2.Path, a2.Addressing.Address.Addr().String()+":8080")

	// The host reaches guest 2 at its slot's unique address.
	line, err := networktest.Dial(e.host, a2.Lease.SlotAddr.String()+":8080", dialTimeout)
	if err != nil || line != "hello from 172.30.0.2:8080" {
		t.Errorf("host -> slot address %s: %q, %v", a2.Lease.SlotAddr, line, err)
	}
	reach(t, g1, "10.60.0.2:8080")
	blocked(t, g1, "10.60.0.3:8080")
	blocked(t, g1, a2.Lease.SlotAddr.String()+":8080")
	blocked(t, g1, "10.60.0.1:8080")
	reach(t, g2, "10.60.0.2:8080")
}

func TestKernelRestartReconciles(t *testing.T) {
	e := newKernelEnv(t)
	_, gb := e.attach(t, "b1", "br")
	_, gs := e.attach(t, "s1", "sl")
	// An orphan: kernel state whose lease vanished, as after a crash
	// between the two.
	e.attach(t, "orph", "sl")
	if err := e.store.Delete("orph"); err != nil {
		t.Fatal(err)
	}
	e.store.Close()

	e.open(t)
	rep, err := e.mgr.Reconcile(context.Background())
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	if !slices.Equal(rep.RemovedLinks, []string{"emv-orph"}) || !slices.Equal(rep.RemovedRules, []string{"orph"}) ||
		len(rep.RemovedNamespaces) != 1 || len(rep.Rebuilt) != 0 {
		t.Errorf("report = %+v, want emv-orph, its slot and its rules removed", rep)
	}
	links := networktest.LinkNames(t, e.host)
	rules := networktest.RulesetSummary(t, e.host)

	// A second restart finds nothing to do and duplicates nothing.
	e.store.Close()
	e.open(t)
	rep, err = e.mgr.Reconcile(context.Background())
	if err != nil {
		t.Fatalf("second Reconcile: %v", err)
	}
	if len(rep.RemovedLinks)+len(rep.RemovedNamespaces)+len(rep.RemovedRules)+len(rep.Rebuilt) != 0 {
		t.Errorf("second Reconcile changed things: %+v", rep)
	}
	if got := networktest.LinkNames(t, e.host); !slices.Equal(got, links) {
		t.Errorf("links changed: %v, want %v", got, links)
	}
	if got := networktest.RulesetSummary(t, e.host); !slices.Equal(got, rules) {
		t.Errorf("rules changed:\n%v\nwant\n%v", got, rules)
	}
	reach(t, gb, "10.60.0.2:8080")
	blocked(t, gb, "10.60.0.3:8080")
	reach(t, gs, "10.60.0.2:8080")
	blocked(t, gs, "10.60.0.3:8080")
}

func TestKernelHandoff(t *testing.T) {
	e := newKernelEnv(t)
	_, g := e.attach(t, "pool-1", "pool")
	// The pool network has no uplink and denies everything.
	blocked(t, g, "10.60.0.2:8080")

	a, err := e.mgr.Handoff(context.Background(), "pool-1", "tenant-1", "br", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Handoff: %v", err)
	}
	if got := networktest.LinkNames(t, e.host); !slices.Contains(got, a.Lease.TAP) {
		t.Fatalf("TAP %s gone after handoff: %v", a.Lease.TAP, got)
	}
	// The agent reconfigures the guest with the tenant's addressing.
	configure(t, g, a)
	reach(t, g, "10.60.0.2:8080")
	blocked(t, g, "10.60.0.3:8080")
	blocked(t, g, "10.51.0.1:8080")
}

func TestKernelSlotHandoff(t *testing.T) {
	e := newKernelEnv(t)
	e.nets = append(e.nets, network.Network{Name: "spool", Mode: network.ModeSlot, TransitRange: netip.MustParsePrefix("10.72.0.0/24")})
	e.store.Close()
	e.open(t)
	if _, err := e.mgr.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	pool, g := e.attach(t, "pool-1", "spool")
	blocked(t, g, "10.60.0.2:8080")

	a, err := e.mgr.Handoff(context.Background(), "pool-1", "tenant-1", "sl", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Handoff: %v", err)
	}
	if a.NetNSPath == pool.NetNSPath {
		t.Fatal("handoff kept the pool's slot")
	}
	// Same guest address in every slot: no reconfiguration needed.
	reach(t, g, "10.60.0.2:8080")
	blocked(t, g, "10.60.0.3:8080")
	if slots, _ := networktestListSlots(); len(slots) != 1 {
		t.Errorf("slot namespaces after handoff: %v, want only the tenant's", slots)
	}
}

func TestKernelTAPNameTaken(t *testing.T) {
	e := newKernelEnv(t)
	// A stranger's link with the name Ember would pick.
	h := networktest.Handle(t, e.host)
	if err := h.LinkAdd(newStranger("emt-web-1")); err != nil {
		t.Fatal(err)
	}
	before := networktest.RulesetSummary(t, e.host)
	_, err := e.mgr.Attach(context.Background(), "web-1", "br", network.AttachOptions{})
	if !errors.Is(err, network.ErrLinkExists) {
		t.Fatalf("Attach error = %v, want ErrLinkExists", err)
	}
	if got := networktest.RulesetSummary(t, e.host); !slices.Equal(got, before) {
		t.Errorf("rules changed by a failed Attach: %v", got)
	}
	if _, err := e.mgr.Lease("web-1"); !errors.Is(err, network.ErrLeaseNotFound) {
		t.Errorf("lease after a failed Attach: %v", err)
	}
	if l, _ := h.LinkByName("emt-web-1"); l == nil || l.Type() != "bridge" || l.Attrs().Alias != "" {
		t.Error("the stranger's link was changed")
	}
	h.LinkDel(newStranger("emt-web-1"))
}

func TestKernelRealTAP(t *testing.T) {
	networktest.RequireKernel(t)
	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	_, host := networktest.NewNS(t, "host")
	s, err := network.OpenStore(filepath.Join(t.TempDir(), "l.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m, err := network.NewManager(network.Options{
		Networks: []network.Network{{Name: "br"}, {Name: "sl", Mode: network.ModeSlot}},
		Store:    s, HostNetNS: host, NetNSPrefix: networktest.Prefix + "slot-",
		TAPOwner: 1234, Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := m.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	a, err := m.Attach(ctx, "vm-1", "br", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	l, err := networktest.Handle(t, host).LinkByName(a.Lease.TAP)
	if err != nil {
		t.Fatal(err)
	}
	if l.Type() != "tuntap" || l.Attrs().Alias != "ember:vm-1" || l.Attrs().MTU != 1500 {
		t.Errorf("TAP = type %s alias %q mtu %d", l.Type(), l.Attrs().Alias, l.Attrs().MTU)
	}
	if owner := tapOwner(t, host, a.Lease.TAP); owner != 1234 {
		t.Errorf("TAP owner = %d, want 1234", owner)
	}
	sa, err := m.Attach(ctx, "vm-2", "sl", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Attach slot: %v", err)
	}
	if l, err := networktest.Handle(t, sa.NetNSPath).LinkByName("tap0"); err != nil || l.Type() != "tuntap" {
		t.Errorf("tap0 in slot: %v, %v", l, err)
	}
	if err := m.Teardown(ctx); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if got := networktest.LinkNames(t, host); !slices.Equal(got, []string{"lo"}) {
		t.Errorf("links after Teardown = %v", got)
	}
}
