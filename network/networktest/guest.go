package networktest

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/embervm/ember/network"
)

// GuestKernel is the real netlink network.Kernel except that each TAP is
// replaced by one end of a veth pair whose other end is eth0 in a new fake
// guest namespace. Everything else the manager does (bridge ports, slots,
// NAT, firewall) acts on that link exactly as on a TAP, so the guest side
// can send real traffic without a VM.
type GuestKernel struct {
	network.Kernel
	t        testing.TB
	hostPath string

	mu     sync.Mutex
	guests map[string]*Guest // by VM id
}

// NewGuestKernel returns a GuestKernel for the host namespace at hostPath.
func NewGuestKernel(t testing.TB, hostPath string) *GuestKernel {
	return &GuestKernel{Kernel: network.NewKernel(hostPath), t: t, hostPath: hostPath, guests: map[string]*Guest{}}
}

// CreateTAP creates the stand-in link and its fake guest.
func (k *GuestKernel) CreateTAP(ns string, spec network.TAPSpec) error {
	links, err := k.Links(ns)
	if err != nil {
		return err
	}
	if slices.ContainsFunc(links, func(l network.Link) bool { return l.Name == spec.Name }) {
		return fmt.Errorf("create tap %s: %w", spec.Name, network.ErrLinkExists)
	}

	target := ns
	if target == "" {
		target = k.hostPath
	}
	name, path := NewNS(k.t, "g")
	peer, err := vnetns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer peer.Close()

	h := Handle(k.t, target)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: spec.Name, MTU: spec.MTU},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(peer),
	}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("create stand-in tap %s: %w", spec.Name, err)
	}
	if err := h.LinkSetAlias(veth, spec.Alias); err != nil {
		return err
	}
	Up(k.t, path, "eth0")

	k.mu.Lock()
	defer k.mu.Unlock()
	k.guests[strings.TrimPrefix(spec.Alias, "ember:")] = &Guest{Name: name, Path: path}
	return nil
}

// Guest returns the fake guest created for VM vmID's TAP.
func (k *GuestKernel) Guest(vmID string) *Guest {
	k.mu.Lock()
	defer k.mu.Unlock()
	g, ok := k.guests[vmID]
	if !ok {
		k.t.Fatalf("no fake guest for vm %s", vmID)
	}
	return g
}

// LinkNames returns the sorted link names in the namespace at path.
func LinkNames(t testing.TB, path string) []string {
	names := Links(t, path)
	sort.Strings(names)
	return names
}

// RulesetSummary returns one line per nftables chain in the namespace at
// path, with its rule count, sorted.
func RulesetSummary(t testing.TB, path string) []string {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	c, err := nftables.New(nftables.WithNetNSFd(fd))
	if err != nil {
		t.Fatal(err)
	}
	chains, err := c.ListChains()
	if err != nil {
		t.Fatalf("list chains: %v", err)
	}
	var out []string
	for _, ch := range chains {
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			t.Fatalf("list rules of %s: %v", ch.Name, err)
		}
		out = append(out, fmt.Sprintf("%d %s %s %d", ch.Table.Family, ch.Table.Name, ch.Name, len(rules)))
	}
	sort.Strings(out)
	return out
}
