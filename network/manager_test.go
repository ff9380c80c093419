package network_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/networktest"
	"github.com/embervm/ember/network/nft"
	"github.com/embervm/ember/vm"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type fakeEnv struct {
	kernel *networktest.FakeKernel
	fw     *networktest.FakeFirewall
	store  *network.Store
	mgr    *network.Manager
	dbPath string
	nets   []network.Network
}

func testNetworks() []network.Network {
	return []network.Network{
		{Name: "br", Subnet: netip.MustParsePrefix("10.50.0.0/29"), Uplink: "up0", ManageIPForwarding: true,
			DNS: []netip.Addr{netip.MustParseAddr("10.60.0.53")}},
		{Name: "pool", Subnet: netip.MustParsePrefix("10.51.0.0/24")},
		{Name: "sl", Mode: network.ModeSlot, TransitRange: netip.MustParsePrefix("10.70.0.0/24"), Uplink: "up0", ManageIPForwarding: true},
		{Name: "sl2", Mode: network.ModeSlot, TransitRange: netip.MustParsePrefix("10.71.0.0/24")},
	}
}

func newFakeEnv(t *testing.T) *fakeEnv {
	t.Helper()
	e := &fakeEnv{
		kernel: networktest.NewFakeKernel(),
		fw:     networktest.NewFakeFirewall(),
		dbPath: filepath.Join(t.TempDir(), "leases.db"),
		nets:   testNetworks(),
	}
	e.kernel.AddLink("", network.Link{Name: "up0", Kind: "veth", Up: true})
	e.open(t)
	if err := e.mgr.Setup(context.Background()); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	return e
}

func (e *fakeEnv) open(t *testing.T) {
	t.Helper()
	s, err := network.OpenStore(e.dbPath)
	if err != nil {
		t.Fatalf("OpenStore: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	e.store = s
	e.mgr, err = network.NewManager(network.Options{
		Networks: e.nets, Store: s, Kernel: e.kernel, Firewall: e.fw,
		NetNSPrefix: "ember-", Logger: quiet,
	})
	if err != nil {
		t.Fatalf("NewManager: %v", err)
	}
}

func (e *fakeEnv) snapshot(t *testing.T) string {
	t.Helper()
	leases, err := e.store.List()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s\n--\n%s\n--\n%d leases", e.kernel.State(), e.fw.State(), len(leases))
}

func TestAttachBridge(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a, err := e.mgr.Attach(ctx, "web-1", "br", network.AttachOptions{Hostname: "web-1"})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	b, err := e.mgr.Attach(ctx, "web-2", "br", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}

	if got, want := a.Lease.Address, netip.MustParsePrefix("10.50.0.2/29"); got != want {
		t.Errorf("first address = %s, want %s", got, want)
	}
	if got, want := b.Lease.Address, netip.MustParsePrefix("10.50.0.3/29"); got != want {
		t.Errorf("second address = %s, want %s", got, want)
	}
	if got, want := a.Lease.Gateway, netip.MustParseAddr("10.50.0.1"); got != want {
		t.Errorf("gateway = %s, want %s", got, want)
	}
	if a.Lease.MAC == b.Lease.MAC {
		t.Errorf("both VMs got MAC %s", a.Lease.MAC)
	}
	mac, _ := net.ParseMAC(a.Lease.MAC)
	if mac[0]&0x02 == 0 || mac[0]&0x01 != 0 {
		t.Errorf("MAC %s is not locally administered unicast", mac)
	}
	if a.Lease.TAP != "emt-web-1" || b.Lease.TAP != "emt-web-2" {
		t.Errorf("TAPs = %s, %s; want emt-web-1, emt-web-2", a.Lease.TAP, b.Lease.TAP)
	}
	tap, ok := e.kernel.Link("", "emt-web-1")
	if !ok || tap.Master != "embr-br" || !tap.Up || tap.Alias != "ember:web-1" || tap.Kind != "tuntap" {
		t.Errorf("tap = %+v, %v; want an up tuntap on embr-br with alias ember:web-1", tap, ok)
	}
	p, ok := e.fw.Policy("web-1")
	if !ok || p.Family != nft.FamilyBridge || p.Iface != "emt-web-1" || !p.DenyAll || p.IP != a.Lease.Address.Addr() {
		t.Errorf("policy = %+v, %v", p, ok)
	}
	if !slices.Contains(p.Protected, netip.MustParsePrefix("10.50.0.0/29")) || !slices.Contains(p.Protected, netip.MustParsePrefix("10.70.0.0/24")) {
		t.Errorf("protected = %v, want the bridge subnet and the transit range", p.Protected)
	}
	if a.NetNSPath != "" {
		t.Errorf("bridge attachment has netns %q", a.NetNSPath)
	}
	nic := a.NetworkInterface("eth0")
	if nic.HostDevName != "emt-web-1" || nic.GuestMAC != a.Lease.MAC || nic.MTU != 1500 {
		t.Errorf("NetworkInterface = %+v", nic)
	}
	if got, want := a.Addressing.KernelArg(), "ip=10.50.0.2::10.50.0.1:255.255.255.248:web-1:eth0:off:10.60.0.53"; got != want {
		t.Errorf("KernelArg = %q, want %q", got, want)
	}
}

func TestAttachSlot(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a, err := e.mgr.Attach(ctx, "c1", "sl", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	b, err := e.mgr.Attach(ctx, "c2", "sl", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if a.Lease.Address != b.Lease.Address || a.Lease.Address != netip.MustParsePrefix("172.30.0.2/30") {
		t.Errorf("guest addresses %s and %s, want 172.30.0.2/30 in both slots", a.Lease.Address, b.Lease.Address)
	}
	if a.Lease.SlotAddr == b.Lease.SlotAddr {
		t.Errorf("both slots have address %s", a.Lease.SlotAddr)
	}
	if a.Lease.SlotAddr != netip.MustParseAddr("10.70.0.2") || b.Lease.SlotAddr != netip.MustParseAddr("10.70.0.6") {
		t.Errorf("slot addresses %s, %s; want 10.70.0.2, 10.70.0.6", a.Lease.SlotAddr, b.Lease.SlotAddr)
	}
	if a.NetNSPath != networktest.FakeNSDir+"ember-c1" {
		t.Errorf("netns = %q", a.NetNSPath)
	}
	if _, ok := e.kernel.Link(a.NetNSPath, "tap0"); !ok {
		t.Error("tap0 missing in the slot")
	}
	if got := e.kernel.LinkAddrs(a.NetNSPath, "tap0"); !slices.Equal(got, []netip.Prefix{netip.MustParsePrefix("172.30.0.1/30")}) {
		t.Errorf("tap0 addresses = %v, want [172.30.0.1/30]", got)
	}
	p, ok := e.fw.Policy("c1")
	if !ok || p.Family != nft.FamilyINet || p.Iface != a.Lease.HostVeth {
		t.Errorf("policy = %+v, want inet on %s", p, a.Lease.HostVeth)
	}
}

func TestAttachRejectsBadInput(t *testing.T) {
	tests := []struct {
		name    string
		id, net string
		opts    network.AttachOptions
		want    error
	}{
		{"invalid vm id", "bad id", "br", network.AttachOptions{}, vm.ErrInvalid},
		{"unknown network", "a", "nope", network.AttachOptions{}, network.ErrUnknownNetwork},
		{"port without protocol", "a", "br", network.AttachOptions{Allow: []nft.Rule{{Dest: netip.MustParsePrefix("10.0.0.0/8"), Port: 80}}}, nft.ErrInvalidRule},
		{"invalid cidr", "a", "br", network.AttachOptions{Allow: []nft.Rule{{Dest: netip.MustParsePrefix("10.0.0.1/8")}}}, nft.ErrInvalidRule},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeEnv(t)
			before := e.snapshot(t)
			_, err := e.mgr.Attach(context.Background(), tt.id, tt.net, tt.opts)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Attach error = %v, want %v", err, tt.want)
			}
			if after := e.snapshot(t); after != before {
				t.Errorf("state changed by a rejected Attach:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

func TestAttachTAPNameTakenByOtherLink(t *testing.T) {
	e := newFakeEnv(t)
	e.kernel.AddLink("", network.Link{Name: "emt-web-1", Kind: "dummy"})
	before := e.snapshot(t)
	_, err := e.mgr.Attach(context.Background(), "web-1", "br", network.AttachOptions{})
	if !errors.Is(err, network.ErrLinkExists) {
		t.Fatalf("Attach error = %v, want ErrLinkExists", err)
	}
	if !strings.Contains(err.Error(), "emt-web-1") {
		t.Errorf("error %q does not name the interface", err)
	}
	if after := e.snapshot(t); after != before {
		t.Errorf("state changed:\n%s\nvs\n%s", before, after)
	}
}

func TestAttachNameCollisionBetweenVMs(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	// Both ids truncate to the same 11 characters.
	a, err := e.mgr.Attach(ctx, "tenant-12345-a", "br", network.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.mgr.Attach(ctx, "tenant-12345-b", "br", network.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if a.Lease.TAP == b.Lease.TAP {
		t.Fatalf("both VMs got TAP %s", a.Lease.TAP)
	}
	for _, name := range []string{a.Lease.TAP, b.Lease.TAP} {
		if len(name) > vm.MaxTAPNameLength {
			t.Errorf("TAP name %q is longer than %d", name, vm.MaxTAPNameLength)
		}
	}
}

func TestAttachTwice(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	if _, err := e.mgr.Attach(ctx, "a", "br", network.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err := e.mgr.Attach(ctx, "a", "sl", network.AttachOptions{})
	if !errors.Is(err, network.ErrAttached) || !errors.Is(err, vm.ErrAlreadyExists) {
		t.Errorf("second Attach error = %v, want ErrAttached matching vm.ErrAlreadyExists", err)
	}
}

func TestAttachExhausted(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	// 10.50.0.0/29: .1 is the gateway, .7 broadcast, so 5 guests fit.
	for i := range 5 {
		if _, err := e.mgr.Attach(ctx, fmt.Sprintf("vm%d", i), "br", network.AttachOptions{}); err != nil {
			t.Fatalf("Attach %d: %v", i, err)
		}
	}
	before := e.snapshot(t)
	if _, err := e.mgr.Attach(ctx, "vm5", "br", network.AttachOptions{}); !errors.Is(err, network.ErrExhausted) {
		t.Fatalf("sixth Attach error = %v, want ErrExhausted", err)
	}
	if after := e.snapshot(t); after != before {
		t.Error("a failed Attach changed state")
	}
	// Released addresses are reused.
	if err := e.mgr.Detach(ctx, "vm2"); err != nil {
		t.Fatal(err)
	}
	a, err := e.mgr.Attach(ctx, "vm5", "br", network.AttachOptions{})
	if err != nil || a.Lease.Address.Addr() != netip.MustParseAddr("10.50.0.4") {
		t.Errorf("Attach after Detach = %v, %v; want 10.50.0.4", a.Lease.Address, err)
	}
}

// TestAttachRollsBackEveryStep fails each kernel and firewall call of an
// Attach in turn and checks that nothing is left.
func TestAttachRollsBackEveryStep(t *testing.T) {
	for _, netName := range []string{"br", "sl"} {
		probe := newFakeEnv(t)
		start := len(probe.kernel.Calls())
		fwStart := len(probe.fw.Calls())
		if _, err := probe.mgr.Attach(context.Background(), "x", netName, network.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
		kCalls := probe.kernel.Calls()[start:]
		fCalls := probe.fw.Calls()[fwStart:]

		inject := func(calls []string, set func(e *fakeEnv, f func(string) error)) {
			for _, target := range calls {
				t.Run(netName+"/"+target, func(t *testing.T) {
					e := newFakeEnv(t)
					before := e.snapshot(t)
					boom := errors.New("injected")
					set(e, func(call string) error {
						if call == target {
							return boom
						}
						return nil
					})
					_, err := e.mgr.Attach(context.Background(), "x", netName, network.AttachOptions{})
					set(e, nil)
					if !errors.Is(err, boom) {
						t.Fatalf("Attach error = %v, want the injected error", err)
					}
					if after := e.snapshot(t); after != before {
						t.Errorf("leftovers after a failed Attach:\nbefore:\n%s\nafter:\n%s", before, after)
					}
				})
			}
		}
		inject(slices.Compact(kCalls), func(e *fakeEnv, f func(string) error) { e.kernel.Fail = f })
		inject(slices.Compact(fCalls), func(e *fakeEnv, f func(string) error) { e.fw.Fail = f })
	}
}

func TestDetachIdempotent(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	before := e.snapshot(t)
	for _, n := range []string{"br", "sl"} {
		if _, err := e.mgr.Attach(ctx, "v-"+n, n, network.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		for _, n := range []string{"br", "sl"} {
			if err := e.mgr.Detach(ctx, "v-"+n); err != nil {
				t.Fatalf("Detach: %v", err)
			}
		}
	}
	if after := e.snapshot(t); after != before {
		t.Errorf("leftovers after Detach:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if _, err := e.mgr.Lease("v-br"); !errors.Is(err, network.ErrLeaseNotFound) {
		t.Errorf("Lease after Detach = %v, want ErrLeaseNotFound", err)
	}
}

func TestDetachKeepsLeaseOnFailure(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	if _, err := e.mgr.Attach(ctx, "a", "sl", network.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("injected")
	e.kernel.Fail = func(call string) error {
		if strings.HasPrefix(call, "DeleteNS") {
			return boom
		}
		return nil
	}
	if err := e.mgr.Detach(ctx, "a"); !errors.Is(err, boom) {
		t.Fatalf("Detach error = %v, want the injected error", err)
	}
	if _, err := e.mgr.Lease("a"); err != nil {
		t.Errorf("lease gone after a failed Detach: %v", err)
	}
	e.kernel.Fail = nil
	if err := e.mgr.Detach(ctx, "a"); err != nil {
		t.Errorf("retried Detach: %v", err)
	}
}

func TestHandoffBridge(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	pool, err := e.mgr.Attach(ctx, "pool-1", "pool", network.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	allow := []nft.Rule{{Dest: netip.MustParsePrefix("10.60.0.2/32"), Protocol: nft.ProtocolTCP, Port: 8080}}
	ten, err := e.mgr.Handoff(ctx, "pool-1", "tenant-1", "br", network.AttachOptions{Allow: allow})
	if err != nil {
		t.Fatalf("Handoff: %v", err)
	}
	if ten.Lease.TAP != pool.Lease.TAP {
		t.Errorf("TAP changed from %s to %s; the VMM holds it open", pool.Lease.TAP, ten.Lease.TAP)
	}
	if tap, _ := e.kernel.Link("", ten.Lease.TAP); tap.Master != "embr-br" {
		t.Errorf("TAP master = %q, want embr-br", tap.Master)
	}
	if ten.Lease.Address == pool.Lease.Address {
		t.Errorf("tenant kept the pool address %s", ten.Lease.Address)
	}
	if ten.Lease.MAC != pool.Lease.MAC {
		t.Errorf("MAC changed from %s to %s; the guest device keeps its MAC", pool.Lease.MAC, ten.Lease.MAC)
	}
	if _, ok := e.fw.Policy("pool-1"); ok {
		t.Error("pool rules still installed")
	}
	if p, ok := e.fw.Policy("tenant-1"); !ok || p.Iface != ten.Lease.TAP || !slices.Equal(p.Allow, allow) {
		t.Errorf("tenant policy = %+v, %v", p, ok)
	}
	if _, err := e.mgr.Lease("pool-1"); !errors.Is(err, network.ErrLeaseNotFound) {
		t.Errorf("pool lease after handoff: %v", err)
	}
	if ten.Addressing.MAC != ten.Lease.MAC || ten.Addressing.Address != ten.Lease.Address {
		t.Errorf("addressing %+v does not match lease", ten.Addressing)
	}
}

func TestHandoffSlot(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	pool, err := e.mgr.Attach(ctx, "pool-1", "sl2", network.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ten, err := e.mgr.Handoff(ctx, "pool-1", "tenant-1", "sl", network.AttachOptions{})
	if err != nil {
		t.Fatalf("Handoff: %v", err)
	}
	if _, ok := e.kernel.Link(ten.NetNSPath, "tap0"); !ok {
		t.Error("tap0 not in the tenant's slot")
	}
	if slices.Contains(e.kernel.Namespaces(), pool.NetNSPath) {
		t.Error("pool slot namespace still exists")
	}
	if ten.Lease.Address != pool.Lease.Address {
		t.Errorf("guest address changed from %s to %s; slots keep it", pool.Lease.Address, ten.Lease.Address)
	}
	if got := e.kernel.LinkAddrs(ten.NetNSPath, "tap0"); len(got) != 1 {
		t.Errorf("tap0 addresses after the move = %v, want the gateway", got)
	}
}

func TestHandoffFailureRestoresPool(t *testing.T) {
	for _, tt := range []struct{ from, to, failOn string }{
		{"pool", "br", "InstallVM tenant"},
		{"sl2", "sl", "InstallVM tenant"},
		{"sl2", "sl", "MoveLink"},
	} {
		t.Run(tt.to+"/"+tt.failOn, func(t *testing.T) {
			e := newFakeEnv(t)
			ctx := context.Background()
			if _, err := e.mgr.Attach(ctx, "pool-1", tt.from, network.AttachOptions{}); err != nil {
				t.Fatal(err)
			}
			before := e.snapshot(t)
			boom := errors.New("injected")
			fail := func(call string) error {
				if strings.HasPrefix(call, tt.failOn) {
					return boom
				}
				return nil
			}
			e.kernel.Fail, e.fw.Fail = fail, fail
			_, err := e.mgr.Handoff(ctx, "pool-1", "tenant", tt.to, network.AttachOptions{})
			e.kernel.Fail, e.fw.Fail = nil, nil
			if !errors.Is(err, boom) {
				t.Fatalf("Handoff error = %v, want the injected error", err)
			}
			if after := e.snapshot(t); after != before {
				t.Errorf("state after a failed Handoff:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

func TestHandoffRejects(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	for _, id := range []string{"p", "busy"} {
		if _, err := e.mgr.Attach(ctx, id, "br", network.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.mgr.Handoff(ctx, "missing", "t", "br", network.AttachOptions{}); !errors.Is(err, network.ErrLeaseNotFound) {
		t.Errorf("unknown source: %v, want ErrLeaseNotFound", err)
	}
	if _, err := e.mgr.Handoff(ctx, "p", "busy", "br", network.AttachOptions{}); !errors.Is(err, network.ErrAttached) {
		t.Errorf("taken target: %v, want ErrAttached", err)
	}
	if _, err := e.mgr.Handoff(ctx, "p", "t", "sl", network.AttachOptions{}); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("mode change: %v, want vm.ErrUnsupported", err)
	}
}

func TestReconcileAfterRestart(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	for _, x := range []struct{ id, net string }{{"b1", "br"}, {"b2", "br"}, {"s1", "sl"}} {
		if _, err := e.mgr.Attach(ctx, x.id, x.net, network.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	want := e.snapshot(t)

	// Restart: reopen the store and build a new manager on the same kernel.
	e.store.Close()
	e.open(t)
	rep, err := e.mgr.Reconcile(ctx)
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	if len(rep.RemovedLinks)+len(rep.RemovedNamespaces)+len(rep.RemovedRules)+len(rep.Rebuilt) != 0 {
		t.Errorf("Reconcile of a clean state changed things: %+v", rep)
	}
	if got := e.snapshot(t); got != want {
		t.Errorf("state after restart and Reconcile:\n%s\nwant:\n%s", got, want)
	}
}

func TestReconcileRepairs(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	for _, x := range []struct{ id, net string }{{"b1", "br"}, {"s1", "sl"}} {
		if _, err := e.mgr.Attach(ctx, x.id, x.net, network.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	want := e.snapshot(t)

	// Damage: an orphaned Ember TAP, a stranger's link, an orphaned slot,
	// orphaned rules, and a missing TAP and slot.
	e.kernel.AddLink("", network.Link{Name: "emt-ghost", Alias: "ember:ghost", Kind: "tuntap"})
	e.kernel.AddLink("", network.Link{Name: "emt-user", Kind: "dummy"})
	if _, err := e.kernel.CreateNS("ember-gone"); err != nil {
		t.Fatal(err)
	}
	if err := e.fw.InstallVM(nft.VMPolicy{VMID: "ghost", Family: nft.FamilyBridge, Iface: "emt-ghost"}); err != nil {
		t.Fatal(err)
	}
	if err := e.kernel.DeleteLink("", "emt-b1"); err != nil {
		t.Fatal(err)
	}
	if err := e.kernel.DeleteNS("ember-s1"); err != nil {
		t.Fatal(err)
	}

	rep, err := e.mgr.Reconcile(ctx)
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	if !slices.Equal(rep.RemovedLinks, []string{"emt-ghost"}) {
		t.Errorf("RemovedLinks = %v, want [emt-ghost]", rep.RemovedLinks)
	}
	if !slices.Equal(rep.RemovedNamespaces, []string{"ember-gone"}) {
		t.Errorf("RemovedNamespaces = %v, want [ember-gone]", rep.RemovedNamespaces)
	}
	if !slices.Equal(rep.RemovedRules, []string{"ghost"}) {
		t.Errorf("RemovedRules = %v, want [ghost]", rep.RemovedRules)
	}
	if slices.Sort(rep.Rebuilt); !slices.Equal(rep.Rebuilt, []string{"b1", "s1"}) {
		t.Errorf("Rebuilt = %v, want [b1 s1]", rep.Rebuilt)
	}
	if _, ok := e.kernel.Link("", "emt-user"); !ok {
		t.Error("Reconcile removed a link that is not Ember's")
	}
	e.kernel.DeleteLink("", "emt-user")
	if got := e.snapshot(t); got != want {
		t.Errorf("state after Reconcile:\n%s\nwant:\n%s", got, want)
	}
}

func TestSetupForwarding(t *testing.T) {
	k := networktest.NewFakeKernel()
	s, err := network.OpenStore(filepath.Join(t.TempDir(), "l.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	nets := []network.Network{{Name: "br", Uplink: "up0"}}
	m, err := network.NewManager(network.Options{Networks: nets, Store: s, Kernel: k, Firewall: networktest.NewFakeFirewall(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Setup(context.Background()); !errors.Is(err, network.ErrIPForwardingDisabled) {
		t.Fatalf("Setup error = %v, want ErrIPForwardingDisabled", err)
	}
	if slices.ContainsFunc(k.Calls(), func(c string) bool { return strings.HasPrefix(c, "SetSysctl") }) {
		t.Error("Setup changed a sysctl without ManageIPForwarding")
	}

	nets[0].ManageIPForwarding = true
	m, _ = network.NewManager(network.Options{Networks: nets, Store: s, Kernel: k, Firewall: networktest.NewFakeFirewall(), Logger: quiet})
	if err := m.Setup(context.Background()); err != nil {
		t.Fatalf("Setup with ManageIPForwarding: %v", err)
	}
	if v, _ := k.Sysctl("", "net.ipv4.ip_forward"); v != "1" {
		t.Errorf("ip_forward = %s, want 1", v)
	}
}

func TestSetupBridgeNameTaken(t *testing.T) {
	k := networktest.NewFakeKernel()
	k.AddLink("", network.Link{Name: "embr-br", Kind: "bridge"})
	s, err := network.OpenStore(filepath.Join(t.TempDir(), "l.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m, err := network.NewManager(network.Options{Networks: []network.Network{{Name: "br"}}, Store: s, Kernel: k, Firewall: networktest.NewFakeFirewall(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Setup(context.Background()); !errors.Is(err, network.ErrLinkExists) {
		t.Errorf("Setup error = %v, want ErrLinkExists", err)
	}
}

func TestNewManagerRejectsBadNetworks(t *testing.T) {
	s, err := network.OpenStore(filepath.Join(t.TempDir(), "l.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = network.NewManager(network.Options{Store: s, Networks: []network.Network{
		{Name: "a", Subnet: netip.MustParsePrefix("10.0.0.0/16")},
		{Name: "b", Subnet: netip.MustParsePrefix("10.0.5.0/24")},
	}})
	if !errors.Is(err, network.ErrSubnetOverlap) {
		t.Errorf("NewManager error = %v, want ErrSubnetOverlap", err)
	}
}

func TestAttachConcurrentUnique(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	const n = 20
	results := make(chan network.Attachment, n)
	errs := make(chan error, n)
	for i := range n {
		go func() {
			a, err := e.mgr.Attach(ctx, fmt.Sprintf("vm-%02d", i), "pool", network.AttachOptions{})
			if err != nil {
				errs <- err
				return
			}
			results <- a
		}()
	}
	addrs, macs, taps := map[netip.Prefix]bool{}, map[string]bool{}, map[string]bool{}
	for range n {
		select {
		case err := <-errs:
			t.Fatalf("Attach: %v", err)
		case a := <-results:
			if addrs[a.Lease.Address] || macs[a.Lease.MAC] || taps[a.Lease.TAP] {
				t.Errorf("duplicate identity %s %s %s", a.Lease.Address, a.Lease.MAC, a.Lease.TAP)
			}
			addrs[a.Lease.Address], macs[a.Lease.MAC], taps[a.Lease.TAP] = true, true, true
		}
	}
	leases, err := e.store.List()
	if err != nil || len(leases) != n {
		t.Errorf("store has %d leases, %v; want %d", len(leases), err, n)
	}
}

func TestAttachGivenMAC(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	snapshotMAC := "06:AA:00:00:00:01"
	a, err := e.mgr.Attach(ctx, "clone-1", "br", network.AttachOptions{MAC: snapshotMAC})
	if err != nil {
		t.Fatal(err)
	}
	if a.Lease.MAC != "06:aa:00:00:00:01" {
		t.Errorf("MAC = %s, want the given one in canonical form", a.Lease.MAC)
	}
	before := e.snapshot(t)
	if _, err := e.mgr.Attach(ctx, "clone-2", "br", network.AttachOptions{MAC: snapshotMAC}); !errors.Is(err, network.ErrMACInUse) {
		t.Errorf("second clone on the bridge: %v, want ErrMACInUse", err)
	}
	if after := e.snapshot(t); after != before {
		t.Error("a rejected Attach changed state")
	}
	// Slots are separate link layers, so clones may share the MAC.
	for _, id := range []string{"slot-1", "slot-2"} {
		if _, err := e.mgr.Attach(ctx, id, "sl", network.AttachOptions{MAC: snapshotMAC}); err != nil {
			t.Errorf("Attach %s in slot mode: %v", id, err)
		}
	}
	if _, err := e.mgr.Attach(ctx, "bad", "br", network.AttachOptions{MAC: "01:00:5e:00:00:01"}); err == nil {
		t.Error("multicast MAC accepted")
	}
}

// TestPolicyProtectedStable checks that a VM's protected list names each
// host address outside Ember's networks once and does not grow when later
// slots add host-side addresses, so that Reconcile after a restart
// installs the same rules.
func TestPolicyProtectedStable(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	uplinkAddr := netip.MustParsePrefix("10.60.0.1/24")
	if err := e.kernel.ReplaceAddr("", "up0", uplinkAddr); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Attach(ctx, "b1", "br", network.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	before, ok := e.fw.Policy("b1")
	if !ok {
		t.Fatal("no policy installed for b1")
	}
	for _, id := range []string{"s1", "s2"} {
		if _, err := e.mgr.Attach(ctx, id, "sl", network.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	e.store.Close()
	e.open(t)
	if _, err := e.mgr.Reconcile(ctx); err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	after, _ := e.fw.Policy("b1")
	if !slices.Equal(after.Protected, before.Protected) {
		t.Errorf("protected after slots and Reconcile = %v, want %v", after.Protected, before.Protected)
	}
	uplinkHost := netip.PrefixFrom(uplinkAddr.Addr(), 32)
	if n := countPrefix(after.Protected, uplinkHost); n != 1 {
		t.Errorf("protected lists the uplink address %s %d times, want once: %v", uplinkHost, n, after.Protected)
	}
	s1, _ := e.mgr.Lease("s1")
	if n := countPrefix(after.Protected, netip.PrefixFrom(s1.HostAddr.Addr(), 32)); n != 0 {
		t.Errorf("protected lists the slot's host address %s, which its network's range covers: %v", s1.HostAddr, after.Protected)
	}
}

func countPrefix(list []netip.Prefix, p netip.Prefix) int {
	n := 0
	for _, q := range list {
		if q == p {
			n++
		}
	}
	return n
}
