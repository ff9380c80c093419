package nft_test

import (
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/embervm/ember/network/networktest"
)

func openNS(path string) (int, error) { return unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0) }

func closeFD(fd int) { unix.Close(fd) }

// testBridge creates a bridge and attaches ports to it in a test namespace.
type testBridge struct{ name string }

func (b *testBridge) create(t *testing.T, ns string) {
	t.Helper()
	h := networktest.Handle(t, ns)
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: b.name}}); err != nil {
		t.Fatalf("create bridge %s: %v", b.name, err)
	}
	networktest.Up(t, ns, b.name)
}

func (b *testBridge) enslave(t *testing.T, ns, port string) {
	t.Helper()
	h := networktest.Handle(t, ns)
	br, err := h.LinkByName(b.name)
	if err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName(port)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetMaster(l, br); err != nil {
		t.Fatalf("attach %s to %s: %v", port, b.name, err)
	}
}
