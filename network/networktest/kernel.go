// Package networktest has helpers for testing Ember's host networking: a
// recording fake of the kernel layer for tests without root, and helpers that
// build throwaway network namespaces, veth pairs, fake guests and TCP
// endpoints for tests against the real kernel.
//
// Every namespace these helpers create is named with [Prefix], which
// contains the test process's PID, and is deleted in t.Cleanup. Nothing is
// ever changed in the test process's own namespace: a test builds an outer
// namespace that plays the host and works inside it.
package networktest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	"github.com/embervm/ember/network/netns"
)

// Prefix starts the name of every namespace the helpers create in this
// process.
var Prefix = fmt.Sprintf("embt-net-%d-", os.Getpid())

var nsCounter atomic.Int64

// RequireKernel skips t unless it can create network namespaces and use
// netlink and nftables in them.
func RequireKernel(t testing.TB) {
	t.Helper()
	if err := netns.Available(); err != nil {
		t.Skipf("skipping kernel network test: %v", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("skipping kernel network test: ip (iproute2) is not installed, which means the host's network namespace tooling is missing: apt-get install iproute2")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("skipping kernel network test: /dev/net/tun is missing (%v): load the tun module", err)
	}
}

// NewNS creates a namespace named Prefix+label+counter, deletes it in
// t.Cleanup and returns its name and path.
func NewNS(t testing.TB, label string) (name, path string) {
	t.Helper()
	name = fmt.Sprintf("%s%s%d", Prefix, label, nsCounter.Add(1))
	path, err := netns.Create(name)
	if err != nil {
		t.Fatalf("create test namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(name); err != nil {
			t.Errorf("delete test namespace %s: %v", name, err)
		}
	})
	if err := Handle(t, path).LinkSetUp(mustLink(t, path, "lo")); err != nil {
		t.Fatalf("set lo up in %s: %v", name, err)
	}
	return name, path
}

// CheckNoNamespaceLeaks fails t at the end of the test, after every other
// cleanup, when a namespace starting with prefix is left.
func CheckNoNamespaceLeaks(t testing.TB, prefix string) {
	t.Helper()
	t.Cleanup(func() {
		left, err := netns.List(prefix)
		if err != nil {
			t.Errorf("list namespaces: %v", err)
		}
		if len(left) > 0 {
			t.Errorf("namespaces left behind: %v", left)
		}
	})
}

// Handle returns a netlink handle for the namespace at path.
func Handle(t testing.TB, path string) *netlink.Handle {
	t.Helper()
	ns, err := vnetns.GetFromPath(path)
	if err != nil {
		t.Fatalf("open namespace %s: %v", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", path, err)
	}
	t.Cleanup(h.Close)
	return h
}

func mustLink(t testing.TB, path, name string) netlink.Link {
	t.Helper()
	l, err := Handle(t, path).LinkByName(name)
	if err != nil {
		t.Fatalf("find link %s in %s: %v", name, path, err)
	}
	return l
}

// Links returns the names of the links in the namespace at path.
func Links(t testing.TB, path string) []string {
	t.Helper()
	links, err := Handle(t, path).LinkList()
	if err != nil {
		t.Fatalf("list links in %s: %v", path, err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	return names
}

// Veth creates a veth pair, nameA in nsA and nameB in nsB, both up.
func Veth(t testing.TB, nsA, nameA, nsB, nameB string) {
	t.Helper()
	peerNS, err := vnetns.GetFromPath(nsB)
	if err != nil {
		t.Fatalf("open namespace %s: %v", nsB, err)
	}
	defer peerNS.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: nameA},
		PeerName:      nameB,
		PeerNamespace: netlink.NsFd(peerNS),
	}
	if err := Handle(t, nsA).LinkAdd(veth); err != nil {
		t.Fatalf("create veth %s/%s: %v", nameA, nameB, err)
	}
	Up(t, nsA, nameA)
	Up(t, nsB, nameB)
}

// Up sets link name in the namespace at path up.
func Up(t testing.TB, path, name string) {
	t.Helper()
	if err := Handle(t, path).LinkSetUp(mustLink(t, path, name)); err != nil {
		t.Fatalf("set %s up: %v", name, err)
	}
}

// Addr adds address cidr, such as "10.0.0.1/24", to link name.
func Addr(t testing.TB, path, name, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatalf("parse %s: %v", cidr, err)
	}
	if err := Handle(t, path).AddrAdd(mustLink(t, path, name), a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, name, err)
	}
}

// DefaultRoute adds a default route via gw in the namespace at path.
func DefaultRoute(t testing.TB, path, gw string) {
	t.Helper()
	r := &netlink.Route{Gw: net.ParseIP(gw)}
	if err := Handle(t, path).RouteAdd(r); err != nil {
		t.Fatalf("add default route via %s: %v", gw, err)
	}
}

// Sysctl writes value to /proc/sys/key inside the namespace at path.
func Sysctl(t testing.TB, path, key, value string) {
	t.Helper()
	err := netns.Do(path, func() error {
		return os.WriteFile("/proc/sys/"+strings.ReplaceAll(key, ".", "/"), []byte(value), 0o644)
	})
	if err != nil {
		t.Fatalf("sysctl %s=%s: %v", key, value, err)
	}
}

// Guest is a fake guest: a namespace whose eth0 is one end of a veth pair.
// The other end replaces the VM's TAP.
type Guest struct {
	Name string
	Path string
}

// NewGuest creates a fake guest whose eth0 pairs with a link named tap in
// the namespace at hostPath; it returns before tap is attached anywhere.
func NewGuest(t testing.TB, hostPath, tap string) *Guest {
	t.Helper()
	name, path := NewNS(t, "g")
	Veth(t, hostPath, tap, path, "eth0")
	return &Guest{Name: name, Path: path}
}

// Configure gives the guest its address, gateway and MAC, as the agent or
// the kernel's ip= argument would in a real guest.
func (g *Guest) Configure(t testing.TB, addr netip.Prefix, gateway netip.Addr, mac net.HardwareAddr) {
	t.Helper()
	h := Handle(t, g.Path)
	link := mustLink(t, g.Path, "eth0")
	if mac != nil {
		if err := h.LinkSetHardwareAddr(link, mac); err != nil {
			t.Fatalf("set guest mac: %v", err)
		}
	}
	addrs, _ := h.AddrList(link, netlink.FAMILY_V4)
	for _, a := range addrs {
		h.AddrDel(link, &a)
	}
	Addr(t, g.Path, "eth0", addr.String())
	if err := h.RouteReplace(&netlink.Route{Gw: gateway.AsSlice()}); err != nil {
		t.Fatalf("set guest default route via %s: %v", gateway, err)
	}
}

// Serve starts a TCP server on addr inside the namespace at path that
// writes "hello from ADDR\n" to every connection. It stops in t.Cleanup.
func Serve(t testing.TB, path, addr string) {
	t.Helper()
	var ln net.Listener
	err := netns.Do(path, func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "hello from %s\n", addr)
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
}

// ErrNoAnswer means a TCP dial timed out without a response, because a
// firewall on the path dropped the packets.
var ErrNoAnswer = errors.New("dial timed out without a response")

// Dial connects from inside the namespace at path to the TCP server at
// addr and returns the line it sent. A dropped connection attempt returns
// ErrNoAnswer after timeout.
func Dial(path, addr string, timeout time.Duration) (string, error) {
	var c net.Conn
	err := netns.Do(path, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", addr, timeout)
		return err
	})
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "", fmt.Errorf("dial %s: %w", addr, ErrNoAnswer)
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}

// DumpRuleset logs the nftables ruleset of the named namespace when t has
// failed, for diagnosis.
func DumpRuleset(t testing.TB, name string) {
	t.Helper()
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		out, err := exec.Command("ip", "netns", "exec", name, "nft", "list", "ruleset").CombinedOutput()
		t.Logf("nft ruleset in %s (err %v):\n%s", name, err, out)
	})
}
