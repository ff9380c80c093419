package guest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/agent"
)

// inPrivateNetns runs fn on a thread in a new, empty network namespace. The
// thread stays locked, so it exits with fn and the namespace goes away with
// it; the host's namespace is never touched.
func inPrivateNetns(t *testing.T, fn func() error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace; run the tests as root")
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("%w: unshare(CLONE_NEWNET): %v", errSkip, err)
			return
		}
		errc <- fn()
	}()
	if err := <-errc; errors.Is(err, errSkip) {
		t.Skipf("%v; run as root on a kernel with network namespaces and veth", err)
	} else if err != nil {
		t.Fatal(err)
	}
}

var errSkip = errors.New("test facility missing")

// addVethLink creates a veth pair whose first end has the given name and
// MAC. veth is used because it is built into more kernels than dummy.
func addVethLink(name string, mac net.HardwareAddr) error {
	nl, err := openRtnetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	info := unix.IfInfomsg{Family: unix.AF_UNSPEC}
	m := nlmsg{typ: unix.RTM_NEWLINK, flags: unix.NLM_F_CREATE | unix.NLM_F_EXCL, body: append([]byte{}, structBytes(&info)...)}
	m.addAttr(unix.IFLA_IFNAME, append([]byte(name), 0))
	m.addAttr(unix.IFLA_ADDRESS, mac)
	var kind nlmsg
	kind.addAttr(unix.IFLA_INFO_KIND, []byte("veth"))
	m.addAttr(unix.IFLA_LINKINFO, kind.body)
	return nl.do(m)
}

func TestLinuxSystemConfigureNetwork(t *testing.T) {
	inPrivateNetns(t, func() error {
		mac, _ := net.ParseMAC("06:00:0a:63:00:02")
		if err := addVethLink("ember-t0", mac); err != nil {
			return fmt.Errorf("%w: create veth link: %v", errSkip, err)
		}
		if err := SetLinkUp("lo"); err != nil {
			return err
		}
		sys := &LinuxSystem{}
		ctx := context.Background()
		cfg := agent.InterfaceConfig{
			MAC:       mac.String(),
			Addresses: []string{"10.99.0.2/24", "fd00:99::2/64"},
			Routes:    []agent.Route{{Destination: "default", Gateway: "10.99.0.1"}, {Destination: "10.100.0.0/16"}},
			MTU:       1400,
		}
		// Twice: configuring is idempotent.
		for range 2 {
			if err := sys.ConfigureNetwork(ctx, []agent.InterfaceConfig{cfg}); err != nil {
				t.Errorf("ConfigureNetwork: %v", err)
				return nil
			}
		}
		link, err := net.InterfaceByName("ember-t0")
		if err != nil {
			return err
		}
		if link.Flags&net.FlagUp == 0 || link.MTU != 1400 {
			t.Errorf("link flags %v, mtu %d; want up with mtu 1400", link.Flags, link.MTU)
		}
		if got := addrStrings(t, link); !slices.Contains(got, "10.99.0.2/24") || !slices.Contains(got, "fd00:99::2/64") {
			t.Errorf("addresses = %v", got)
		}
		routes, _ := os.ReadFile("/proc/thread-self/net/route")
		// Default route: destination 00000000 via gateway 10.99.0.1 (0100630A
		// little-endian); the on-link route: 10.100.0.0 is 0000640A.
		if !strings.Contains(string(routes), "ember-t0\t00000000\t0100630A") || !strings.Contains(string(routes), "ember-t0\t0000640A\t00000000") {
			t.Errorf("routes:\n%s", routes)
		}

		// A new address replaces the old one.
		cfg.Addresses = []string{"10.99.0.3/24"}
		cfg.Routes = nil
		if err := sys.ConfigureNetwork(ctx, []agent.InterfaceConfig{cfg}); err != nil {
			t.Errorf("ConfigureNetwork with a new address: %v", err)
		}
		if got := addrStrings(t, link); slices.Contains(got, "10.99.0.2/24") || !slices.Contains(got, "10.99.0.3/24") {
			t.Errorf("addresses after replace = %v", got)
		}

		err = sys.ConfigureNetwork(ctx, []agent.InterfaceConfig{{MAC: "06:00:00:00:00:99"}})
		if !errors.Is(err, agent.ErrNotFound) {
			t.Errorf("ConfigureNetwork(unknown mac) = %v, want ErrNotFound", err)
		}
		if err := ConfigureByName("ember-t0", agent.InterfaceConfig{Addresses: []string{"10.99.0.4/24"}}); err != nil {
			t.Errorf("ConfigureByName: %v", err)
		}
		return nil
	})
}

func addrStrings(t *testing.T, link *net.Interface) []string {
	addrs, err := link.Addrs()
	if err != nil {
		t.Fatalf("list addresses: %v", err)
	}
	var out []string
	for _, a := range addrs {
		out = append(out, a.String())
	}
	return out
}
