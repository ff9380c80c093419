package nft_test

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/embervm/ember/network/networktest"
	"github.com/embervm/ember/network/nft"
)

const dialTimeout = time.Second

// bridgeTopology is a host namespace with bridge br0 (10.50.0.1/24) and two
// fake guests on it: A (10.50.0.2) on port tapa and B (10.50.0.3) on port
// tapb. Behind uplink up0 (host 10.60.0.1/24) is a world namespace with
// servers on 10.60.0.2 and 10.60.0.3.
type bridgeTopology struct {
	host, guestA, guestB, world string
}

func newBridgeTopology(t *testing.T) *bridgeTopology {
	t.Helper()
	networktest.RequireKernel(t)
	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	var top bridgeTopology
	var hostName string
	hostName, top.host = networktest.NewNS(t, "host")
	networktest.DumpRuleset(t, hostName)
	_, top.world = networktest.NewNS(t, "world")

	br := &testBridge{name: "br0"}
	br.create(t, top.host)
	networktest.Addr(t, top.host, "br0", "10.50.0.1/24")
	networktest.Sysctl(t, top.host, "net.ipv4.ip_forward", "1")

	a := networktest.NewGuest(t, top.host, "tapa")
	b := networktest.NewGuest(t, top.host, "tapb")
	top.guestA, top.guestB = a.Path, b.Path
	br.enslave(t, top.host, "tapa")
	br.enslave(t, top.host, "tapb")
	a.Configure(t, netip.MustParsePrefix("10.50.0.2/24"), netip.MustParseAddr("10.50.0.1"), nil)
	b.Configure(t, netip.MustParsePrefix("10.50.0.3/24"), netip.MustParseAddr("10.50.0.1"), nil)

	networktest.Veth(t, top.host, "up0", top.world, "eth0")
	networktest.Addr(t, top.host, "up0", "10.60.0.1/24")
	networktest.Addr(t, top.world, "eth0", "10.60.0.2/24")
	networktest.Addr(t, top.world, "eth0", "10.60.0.3/24")
	networktest.DefaultRoute(t, top.world, "10.60.0.1")

	networktest.Serve(t, top.world, "10.60.0.2:8080")
	networktest.Serve(t, top.world, "10.60.0.3:8080")
	networktest.Serve(t, top.guestB, "10.50.0.3:8080")
	networktest.Serve(t, top.host, "10.50.0.1:8080")
	networktest.Serve(t, top.host, "10.60.0.1:8080")
	return &top
}

func expectReach(t *testing.T, from, addr string) {
	t.Helper()
	if _, err := networktest.Dial(from, addr, dialTimeout); err != nil {
		t.Errorf("dial %s: %v, want an answer", addr, err)
	}
}

func expectBlocked(t *testing.T, from, addr string) {
	t.Helper()
	if _, err := networktest.Dial(from, addr, dialTimeout); !errors.Is(err, networktest.ErrNoAnswer) {
		t.Errorf("dial %s: %v, want ErrNoAnswer", addr, err)
	}
}

func policyA(fam nft.Family, denyAll bool) nft.VMPolicy {
	return nft.VMPolicy{
		VMID:    "a",
		Family:  fam,
		Iface:   "tapa",
		IP:      netip.MustParseAddr("10.50.0.2"),
		Allow:   []nft.Rule{{Dest: netip.MustParsePrefix("10.60.0.2/32"), Protocol: nft.ProtocolTCP, Port: 8080}},
		DenyAll: denyAll,
		Protected: []netip.Prefix{
			netip.MustParsePrefix("10.50.0.0/24"),
			netip.MustParsePrefix("10.60.0.1/32"),
		},
	}
}

func TestBridgeFamilyMatchesTAP(t *testing.T) {
	top := newBridgeTopology(t)
	fw := nft.New(top.host)
	t.Cleanup(func() { fw.Teardown() })

	// Without rules every server responds, which proves the topology works.
	for _, addr := range []string{"10.60.0.2:8080", "10.60.0.3:8080", "10.50.0.3:8080", "10.50.0.1:8080"} {
		expectReach(t, top.guestA, addr)
	}

	if err := fw.InstallVM(policyA(nft.FamilyBridge, true)); err != nil {
		t.Fatalf("InstallVM: %v", err)
	}
	expectReach(t, top.guestA, "10.60.0.2:8080")
	expectBlocked(t, top.guestA, "10.60.0.3:8080")
	expectBlocked(t, top.guestA, "10.50.0.3:8080")
	expectBlocked(t, top.guestA, "10.50.0.1:8080")
	expectBlocked(t, top.guestA, "10.60.0.1:8080")
	// B has no policy and is not affected.
	expectReach(t, top.guestB, "10.60.0.3:8080")
}

func TestBridgeAllowAllStillProtects(t *testing.T) {
	top := newBridgeTopology(t)
	fw := nft.New(top.host)
	t.Cleanup(func() { fw.Teardown() })

	if err := fw.InstallVM(policyA(nft.FamilyBridge, false)); err != nil {
		t.Fatalf("InstallVM: %v", err)
	}
	expectReach(t, top.guestA, "10.60.0.2:8080")
	expectReach(t, top.guestA, "10.60.0.3:8080")
	expectBlocked(t, top.guestA, "10.50.0.3:8080")
	expectBlocked(t, top.guestA, "10.50.0.1:8080")
	expectBlocked(t, top.guestA, "10.60.0.1:8080")
}

// TestINetFamilyMissesBridgedTAP shows why bridge mode uses the bridge
// family: in the inet family, routed packets from a bridge port carry the
// bridge as iifname, so a rule on the TAP never matches.
func TestINetFamilyMissesBridgedTAP(t *testing.T) {
	top := newBridgeTopology(t)
	fw := nft.New(top.host)
	t.Cleanup(func() { fw.Teardown() })

	if err := fw.InstallVM(policyA(nft.FamilyINet, true)); err != nil {
		t.Fatalf("InstallVM: %v", err)
	}
	expectReach(t, top.guestA, "10.60.0.3:8080")
}

func TestSpoofedSourceDropped(t *testing.T) {
	top := newBridgeTopology(t)
	fw := nft.New(top.host)
	t.Cleanup(func() { fw.Teardown() })
	p := policyA(nft.FamilyBridge, false)
	p.Protected = nil
	if err := fw.InstallVM(p); err != nil {
		t.Fatalf("InstallVM: %v", err)
	}
	expectReach(t, top.guestA, "10.60.0.3:8080")

	// Guest A takes B's address: its packets no longer pass.
	g := &networktest.Guest{Path: top.guestA}
	g.Configure(t, netip.MustParsePrefix("10.50.0.9/24"), netip.MustParseAddr("10.50.0.1"), nil)
	expectBlocked(t, top.guestA, "10.60.0.3:8080")
}

func TestInstallReplaceRemoveIdempotent(t *testing.T) {
	top := newBridgeTopology(t)
	fw := nft.New(top.host)
	t.Cleanup(func() { fw.Teardown() })

	p := policyA(nft.FamilyBridge, true)
	for range 2 {
		if err := fw.InstallVM(p); err != nil {
			t.Fatalf("InstallVM: %v", err)
		}
	}
	if n := countRules(t, top.host, nftables.TableFamilyBridge, "fwd-vms"); n != 1 {
		t.Errorf("fwd-vms has %d rules after installing twice, want 1", n)
	}

	// Replace: allow 10.60.0.3 instead of 10.60.0.2.
	p.Allow = []nft.Rule{{Dest: netip.MustParsePrefix("10.60.0.3/32")}}
	if err := fw.InstallVM(p); err != nil {
		t.Fatalf("InstallVM (replace): %v", err)
	}
	expectBlocked(t, top.guestA, "10.60.0.2:8080")
	expectReach(t, top.guestA, "10.60.0.3:8080")

	// Moving the VM to the other family removes the bridge rules.
	p.Family = nft.FamilyINet
	if err := fw.InstallVM(p); err != nil {
		t.Fatalf("InstallVM (inet): %v", err)
	}
	if n := countRules(t, top.host, nftables.TableFamilyBridge, "fwd-vms"); n != 0 {
		t.Errorf("bridge fwd-vms has %d rules after moving to inet, want 0", n)
	}

	for range 2 {
		if err := fw.RemoveVM("a"); err != nil {
			t.Fatalf("RemoveVM: %v", err)
		}
	}
	ids, err := fw.VMs()
	if err != nil || len(ids) != 0 {
		t.Errorf("VMs after RemoveVM = %v, %v; want none", ids, err)
	}
	expectReach(t, top.guestA, "10.60.0.2:8080")
}

func TestRemoveOrphans(t *testing.T) {
	networktest.RequireKernel(t)
	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	_, host := networktest.NewNS(t, "host")
	fw := nft.New(host)
	t.Cleanup(func() { fw.Teardown() })

	for _, id := range []string{"keep", "orphan1", "orphan2"} {
		if err := fw.InstallVM(nft.VMPolicy{VMID: id, Family: nft.FamilyBridge, Iface: "t-" + id, DenyAll: true}); err != nil {
			t.Fatalf("InstallVM %s: %v", id, err)
		}
	}
	removed, err := fw.RemoveOrphans(func(id string) bool { return id == "keep" })
	if err != nil {
		t.Fatalf("RemoveOrphans: %v", err)
	}
	if !slices.Equal(removed, []string{"orphan1", "orphan2"}) {
		t.Errorf("removed %v, want [orphan1 orphan2]", removed)
	}
	ids, _ := fw.VMs()
	if !slices.Equal(ids, []string{"keep"}) {
		t.Errorf("VMs = %v, want [keep]", ids)
	}
}

func TestInstallInvalidLeavesNothing(t *testing.T) {
	networktest.RequireKernel(t)
	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	_, host := networktest.NewNS(t, "host")
	fw := nft.New(host)
	t.Cleanup(func() { fw.Teardown() })

	bad := nft.VMPolicy{VMID: "a", Family: nft.FamilyBridge, Iface: "tapa",
		Allow: []nft.Rule{{Dest: netip.MustParsePrefix("10.0.0.0/8"), Port: 80}}}
	if err := fw.InstallVM(bad); !errors.Is(err, nft.ErrInvalidRule) {
		t.Fatalf("InstallVM error = %v, want ErrInvalidRule", err)
	}
	c := dialNS(t, host)
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	if len(tables) != 0 {
		t.Errorf("%d tables after a rejected install, want 0", len(tables))
	}
}

func TestNATAndTeardown(t *testing.T) {
	networktest.RequireKernel(t)
	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	_, host := networktest.NewNS(t, "host")
	fw := nft.New(host)

	src := netip.MustParsePrefix("10.50.0.0/24")
	for range 2 {
		if err := fw.EnsureNAT("default", src, "up0"); err != nil {
			t.Fatalf("EnsureNAT: %v", err)
		}
	}
	if n := countRulesIn(t, host, nftables.TableFamilyIPv4, nft.NATTableName, "postrouting"); n != 1 {
		t.Errorf("postrouting has %d rules after EnsureNAT twice, want 1", n)
	}
	if err := fw.RemoveNAT("default"); err != nil {
		t.Fatalf("RemoveNAT: %v", err)
	}
	if n := countRulesIn(t, host, nftables.TableFamilyIPv4, nft.NATTableName, "postrouting"); n != 0 {
		t.Errorf("postrouting has %d rules after RemoveNAT, want 0", n)
	}
	if err := fw.EnsureNAT("bad", src, ""); err == nil {
		t.Error("EnsureNAT without uplink = nil, want an error")
	}
	for range 2 {
		if err := fw.Teardown(); err != nil {
			t.Fatalf("Teardown: %v", err)
		}
	}
	c := dialNS(t, host)
	if tables, _ := c.ListTables(); len(tables) != 0 {
		t.Errorf("%d tables after Teardown, want 0", len(tables))
	}
}

// dialNS opens an nftables conn in the namespace at path. The namespace fd
// stays open until the test ends, because the conn uses it for every socket.
func dialNS(t *testing.T, path string) *nftables.Conn {
	t.Helper()
	fd, err := openNS(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeFD(fd) })
	c, err := nftables.New(nftables.WithNetNSFd(fd))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func countRules(t *testing.T, ns string, fam nftables.TableFamily, chain string) int {
	return countRulesIn(t, ns, fam, nft.TableName, chain)
}

func countRulesIn(t *testing.T, ns string, fam nftables.TableFamily, table, chain string) int {
	t.Helper()
	c := dialNS(t, ns)
	tb := &nftables.Table{Name: table, Family: fam}
	rules, err := c.GetRules(tb, &nftables.Chain{Name: chain, Table: tb})
	if err != nil {
		t.Fatalf("list rules of %s: %v", chain, err)
	}
	return len(rules)
}

func TestARPSpoofDropped(t *testing.T) {
	top := newBridgeTopology(t)
	fw := nft.New(top.host)
	t.Cleanup(func() { fw.Teardown() })
	macA, _ := net.ParseMAC("06:00:0a:32:00:02")
	macB, _ := net.ParseMAC("06:00:0a:32:00:03")
	ga := &networktest.Guest{Name: "a", Path: top.guestA}
	gb := &networktest.Guest{Name: "b", Path: top.guestB}
	ga.Configure(t, netip.MustParsePrefix("10.50.0.2/24"), netip.MustParseAddr("10.50.0.1"), macA)
	gb.Configure(t, netip.MustParsePrefix("10.50.0.3/24"), netip.MustParseAddr("10.50.0.1"), macB)

	p := policyA(nft.FamilyBridge, false)
	p.MAC = macA
	p.Protected = nil
	if err := fw.InstallVM(p); err != nil {
		t.Fatalf("InstallVM: %v", err)
	}
	// B talks to the host, so the host's neighbour table maps B's address
	// to B's MAC.
	expectReach(t, top.guestB, "10.60.0.3:8080")
	if got := neighbourMAC(t, top.host, "10.50.0.3"); got.String() != macB.String() {
		t.Fatalf("host neighbour for 10.50.0.3 = %v, want %v", got, macB)
	}

	// A claims B's address. Its ARP and IPv4 packets must not get
	// through, and the host must keep B's MAC.
	ga.Configure(t, netip.MustParsePrefix("10.50.0.3/24"), netip.MustParseAddr("10.50.0.1"), macA)
	expectBlocked(t, top.guestA, "10.60.0.3:8080")
	if got := neighbourMAC(t, top.host, "10.50.0.3"); got.String() != macB.String() {
		t.Errorf("host neighbour for 10.50.0.3 = %v after A's claim, want B's %v", got, macB)
	}
}

func neighbourMAC(t *testing.T, ns, ip string) net.HardwareAddr {
	t.Helper()
	neighs, err := networktest.Handle(t, ns).NeighList(0, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.IP.String() == ip {
			return n.HardwareAddr
		}
	}
	return nil
}
