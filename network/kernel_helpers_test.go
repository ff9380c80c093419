package network_test

import (
	"net"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/embervm/ember/network/netns"
	"github.com/embervm/ember/network/networktest"
)

func parseMAC(s string) (net.HardwareAddr, error) { return net.ParseMAC(s) }

func netnsList(prefix string) ([]string, error) { return netns.List(prefix) }

// newStranger returns a link that is not Ember's. It is a bridge because
// the dummy driver is not available on every test kernel.
func newStranger(name string) *netlink.Bridge {
	return &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
}

// tapOwner returns the owner uid of TAP name in namespace ns, as netlink
// reports it, and fails t when the link is not a persistent TAP.
func tapOwner(t *testing.T, ns, name string) uint32 {
	t.Helper()
	l, err := networktest.Handle(t, ns).LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	tun, ok := l.(*netlink.Tuntap)
	if !ok {
		t.Fatalf("%s is a %T, not a tuntap", name, l)
	}
	if tun.NonPersist || tun.Mode != netlink.TUNTAP_MODE_TAP {
		t.Errorf("%s: persist=%v mode=%v, want a persistent TAP", name, !tun.NonPersist, tun.Mode)
	}
	return tun.Owner
}
