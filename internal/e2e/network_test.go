package e2e_test

import (
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/embervm/ember/network/networktest"
	"github.com/embervm/ember/vm"
)

// TestNetworkRealGuests runs two guests in bridge mode and two in slot
// mode in a test namespace. Each guest reaches the allowed server and is
// blocked from the denied server, the other tenant, the host and the
// gateway. After a restart of Ember's state (a new lease store handle,
// Manager and QEMU provider), Reconcile finds nothing to change, the rules
// and links are as before, and the guests still reach the allowed server.
// Teardown leaves no namespace, link or nftables table.
func TestNetworkRealGuests(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()

	b1 := e.attach(t, "b1", "br")
	b2 := e.attach(t, "b2", "br")
	s1 := e.attach(t, "s1", "sl")
	s2 := e.attach(t, "s2", "sl")
	guests := []*guest{b1, b2, s1, s2}
	if s1.att.Addressing.Address != s2.att.Addressing.Address {
		t.Fatalf("slot guests have addresses %s and %s, want the same", s1.att.Addressing.Address, s2.att.Addressing.Address)
	}
	e.startAll(t, guests...)
	serveInGuest(t, b2)
	serveInGuest(t, s2)

	b2Addr := b2.att.Addressing.Address.Addr().String() + ":" + guestPort
	s2Addr := s2.att.Lease.SlotAddr.String() + ":" + guestPort
	allowed := "hello from " + allowedAddr
	checkReach(t, []expectation{
		{g: b1, addr: allowedAddr, reach: true, reply: allowed},
		{g: b1, addr: deniedAddr},
		{g: b1, addr: b2Addr},
		{g: b1, addr: s2Addr},
		{g: b1, addr: hostAddr},
		{g: b1, addr: bridgeGatewayAddr},
		{g: b2, addr: allowedAddr, reach: true, reply: allowed},
		{g: b2, addr: deniedAddr},
		{g: s1, addr: allowedAddr, reach: true, reply: allowed},
		{g: s1, addr: deniedAddr},
		{g: s1, addr: s2Addr},
		{g: s1, addr: b2Addr},
		{g: s1, addr: hostAddr},
		{g: s1, addr: bridgeGatewayAddr},
		{g: s2, addr: allowedAddr, reach: true, reply: allowed},
		{g: s2, addr: deniedAddr},
	})

	// Restart: Ember's process ends without tearing anything down, and a
	// new one opens the store, builds a Manager and reconciles. Its QEMU
	// provider adopts the running guests.
	links := networktest.LinkNames(t, e.host)
	rules := networktest.RulesetSummary(t, e.host)
	for _, g := range guests {
		g.client.Close()
	}
	if err := e.prov.Close(); err != nil {
		t.Fatalf("close qemu provider: %v", err)
	}
	e.store.Close()
	e.open(t)
	e.openProvider(t)
	rep, err := e.mgr.Reconcile(ctx)
	if err != nil {
		t.Fatalf("Reconcile after restart: %v", err)
	}
	if len(rep.RemovedLinks)+len(rep.RemovedNamespaces)+len(rep.RemovedRules)+len(rep.Rebuilt) != 0 {
		t.Errorf("Reconcile after restart changed things: %+v", rep)
	}
	if got := networktest.LinkNames(t, e.host); !slices.Equal(got, links) {
		t.Errorf("links after restart = %v, want %v", got, links)
	}
	if got := networktest.RulesetSummary(t, e.host); !slices.Equal(got, rules) {
		t.Errorf("rules after restart:\n%v\nwant\n%v", got, rules)
	}
	for _, g := range guests {
		l, err := e.mgr.Lease(g.id)
		if err != nil || !reflect.DeepEqual(l, g.att.Lease) {
			t.Errorf("lease of %s after restart = %+v, %v; want %+v", g.id, l, err, g.att.Lease)
		}
	}
	e.dialAll(t, guests...)
	serveInGuest(t, b2)
	serveInGuest(t, s2)
	checkReach(t, []expectation{
		{g: b1, addr: allowedAddr, reach: true, reply: allowed},
		{g: b1, addr: deniedAddr},
		{g: b1, addr: b2Addr},
		{g: b2, addr: allowedAddr, reach: true, reply: allowed},
		{g: s1, addr: allowedAddr, reach: true, reply: allowed},
		{g: s1, addr: deniedAddr},
		{g: s1, addr: s2Addr},
		{g: s2, addr: allowedAddr, reach: true, reply: allowed},
	})

	// Teardown as Ember does it: destroy each VM, then detach it.
	for _, g := range guests {
		if err := e.prov.Destroy(ctx, g.id); err != nil {
			t.Errorf("destroy vm %s: %v", g.id, err)
		}
		if err := e.mgr.Detach(ctx, g.id); err != nil {
			t.Errorf("detach vm %s: %v", g.id, err)
		}
	}
	if pids := qemuPIDsUnder(e.runDir); len(pids) != 0 {
		t.Errorf("qemu processes left after destroy: %v", pids)
	}
	if got := networktest.LinkNames(t, e.host); slices.ContainsFunc(got, func(name string) bool {
		return name == b1.att.Lease.TAP || name == b2.att.Lease.TAP || name == s1.att.Lease.HostVeth || name == s2.att.Lease.HostVeth
	}) {
		t.Errorf("host links after detach = %v, want no TAP or slot veth of a guest", got)
	}
	// newEnv's cleanup runs Teardown and checks that nothing is left.
}

// TestNetworkSlotClones restores two clones of one snapshot into two
// slots. The clones keep the source's MAC and address, which slot mode
// allows because every slot is its own link layer, and both reach the
// allowed server while the denied server and each other stay blocked.
func TestNetworkSlotClones(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()

	src := e.attach(t, "src", "sl")
	e.startAll(t, src)
	if err := e.prov.Pause(ctx, src.id); err != nil {
		t.Fatalf("pause vm src: %v", err)
	}
	if _, err := e.prov.Snapshot(ctx, src.id, vm.SnapshotOptions{ID: "base"}); err != nil {
		t.Fatalf("snapshot vm src: %v", err)
	}
	src.client.Close()
	if err := e.prov.Destroy(ctx, src.id); err != nil {
		t.Fatalf("destroy vm src: %v", err)
	}
	if err := e.mgr.Detach(ctx, src.id); err != nil {
		t.Fatalf("detach vm src: %v", err)
	}

	c1 := e.restore(t, "c1", "sl", src.id, "base")
	c2 := e.restore(t, "c2", "sl", src.id, "base")
	e.dialAll(t, c1, c2)
	for _, c := range []*guest{c1, c2} {
		info, err := e.prov.Get(ctx, c.id)
		if err != nil {
			t.Fatalf("get vm %s: %v", c.id, err)
		}
		if info.Config.NetNS != c.att.NetNSPath {
			t.Errorf("vm %s runs in netns %q, want its slot %q", c.id, info.Config.NetNS, c.att.NetNSPath)
		}
		if nics := info.Config.NetworkInterfaces; len(nics) != 1 || nics[0].GuestMAC != src.att.Lease.MAC {
			t.Errorf("vm %s nics = %+v, want the source's MAC %s", c.id, nics, src.att.Lease.MAC)
		}
	}
	if c1.att.NetNSPath == c2.att.NetNSPath {
		t.Fatalf("both clones are in slot %s", c1.att.NetNSPath)
	}
	serveInGuest(t, c2)

	allowed := "hello from " + allowedAddr
	checkReach(t, []expectation{
		{g: c1, addr: allowedAddr, reach: true, reply: allowed},
		{g: c1, addr: deniedAddr},
		{g: c1, addr: c2.att.Lease.SlotAddr.String() + ":" + guestPort},
		{g: c2, addr: allowedAddr, reach: true, reply: allowed},
		{g: c2, addr: deniedAddr},
	})
	// The host reaches a clone at its slot's own address, so the two
	// clones that share one guest address are distinguished.
	line, err := networktest.Dial(e.host, c2.att.Lease.SlotAddr.String()+":"+guestPort, 10*time.Second)
	if err != nil || line != "hello from c2" {
		t.Errorf("host -> c2 at %s: %q, %v; want hello from c2", c2.att.Lease.SlotAddr, line, err)
	}

	for _, c := range []*guest{c1, c2} {
		if err := e.prov.Destroy(ctx, c.id); err != nil {
			t.Errorf("destroy vm %s: %v", c.id, err)
		}
		if err := e.mgr.Detach(ctx, c.id); err != nil {
			t.Errorf("detach vm %s: %v", c.id, err)
		}
	}
}
