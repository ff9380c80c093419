package networktest

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/nft"
)

// FakeKernel is a recording, in-memory network.Kernel for tests without
// root. Namespace paths are FakeNSDir + name; "" is the host namespace.
// Set Fail to inject an error into any call, identified by its record.
type FakeKernel struct {
	// Fail, when set, is called with each call's record before the call
	// acts; a non-nil result is returned instead.
	Fail func(call string) error

	mu sync.Mutex
	// calls records every call as "Method arg arg".
	calls []string
	// links maps a namespace path to its links by name.
	links   map[string]map[string]*network.Link
	addrs   map[string][]netip.Prefix // "ns|link" -> addresses
	routes  map[string]netip.Addr     // ns -> default gateway
	sysctls map[string]string         // "ns|key" -> value
	// peers links the two ends of each veth pair, as "ns|name" both ways.
	peers map[string]string
}

// FakeNSDir is the directory prefix of FakeKernel's namespace paths.
const FakeNSDir = "/fake/netns/"

// NewFakeKernel returns a FakeKernel whose host namespace has lo, with IPv4
// forwarding off.
func NewFakeKernel() *FakeKernel {
	k := &FakeKernel{
		links:   map[string]map[string]*network.Link{"": {"lo": {Name: "lo", Kind: "device", Up: true}}},
		addrs:   map[string][]netip.Prefix{},
		routes:  map[string]netip.Addr{},
		sysctls: map[string]string{},
		peers:   map[string]string{},
	}
	return k
}

func (k *FakeKernel) record(format string, args ...any) error {
	call := strings.TrimSpace(fmt.Sprintf(format, args...))
	k.calls = append(k.calls, call)
	if k.Fail != nil {
		return k.Fail(call)
	}
	return nil
}

// Calls returns the recorded calls.
func (k *FakeKernel) Calls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.calls)
}

// AddLink adds a link directly, as someone else on the host would.
func (k *FakeKernel) AddLink(ns string, l network.Link) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.links[ns][l.Name] = &l
}

// State returns a stable text dump of every namespace, link, address and
// sysctl, for comparing before and after.
func (k *FakeKernel) State() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var lines []string
	for ns, links := range k.links {
		lines = append(lines, "ns "+ns)
		for _, l := range links {
			lines = append(lines, fmt.Sprintf("link %s/%s kind=%s alias=%s master=%s up=%v addrs=%v",
				ns, l.Name, l.Kind, l.Alias, l.Master, l.Up, k.addrs[ns+"|"+l.Name]))
		}
	}
	for ns, gw := range k.routes {
		if _, ok := k.links[ns]; ok {
			lines = append(lines, fmt.Sprintf("route %s via %s", ns, gw))
		}
	}
	for key, v := range k.sysctls {
		ns, _, _ := strings.Cut(key, "|")
		if _, ok := k.links[ns]; ok {
			lines = append(lines, fmt.Sprintf("sysctl %s=%s", key, v))
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// Namespaces returns the paths of the named namespaces.
func (k *FakeKernel) Namespaces() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for ns := range k.links {
		if ns != "" {
			out = append(out, ns)
		}
	}
	slices.Sort(out)
	return out
}

// Link returns link name in namespace ns.
func (k *FakeKernel) Link(ns, name string) (network.Link, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l, ok := k.links[ns][name]
	if !ok {
		return network.Link{}, false
	}
	return *l, true
}

// LinkAddrs returns the addresses of link name in namespace ns.
func (k *FakeKernel) LinkAddrs(ns, name string) []netip.Prefix {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.addrs[ns+"|"+name])
}

func (k *FakeKernel) CreateNS(name string) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("CreateNS %s", name); err != nil {
		return "", err
	}
	p := FakeNSDir + name
	if _, ok := k.links[p]; ok {
		return "", fmt.Errorf("create netns %s: %w", name, network.ErrLinkExists)
	}
	k.links[p] = map[string]*network.Link{"lo": {Name: "lo", Kind: "device"}}
	return p, nil
}

func (k *FakeKernel) DeleteNS(name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("DeleteNS %s", name); err != nil {
		return err
	}
	p := FakeNSDir + name
	for l := range k.links[p] {
		k.removeLocked(p, l)
	}
	delete(k.links, p)
	delete(k.routes, p)
	return nil
}

func (k *FakeKernel) ListNS(prefix string) ([]string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("ListNS %s", prefix); err != nil {
		return nil, err
	}
	var out []string
	for p := range k.links {
		if name, ok := strings.CutPrefix(p, FakeNSDir); ok && strings.HasPrefix(name, prefix) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out, nil
}

func (k *FakeKernel) NSPath(name string) string { return FakeNSDir + name }

func (k *FakeKernel) nsLocked(ns string) (map[string]*network.Link, error) {
	links, ok := k.links[ns]
	if !ok {
		return nil, fmt.Errorf("netns %s: no such namespace", ns)
	}
	return links, nil
}

func (k *FakeKernel) Links(ns string) ([]network.Link, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("Links %s", ns); err != nil {
		return nil, err
	}
	links, err := k.nsLocked(ns)
	if err != nil {
		return nil, err
	}
	var out []network.Link
	for _, l := range links {
		out = append(out, *l)
	}
	slices.SortFunc(out, func(a, b network.Link) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func (k *FakeKernel) addLocked(ns string, l network.Link) error {
	links, err := k.nsLocked(ns)
	if err != nil {
		return err
	}
	if _, ok := links[l.Name]; ok {
		return fmt.Errorf("create %s %s: %w", l.Kind, l.Name, network.ErrLinkExists)
	}
	links[l.Name] = &l
	return nil
}

func (k *FakeKernel) CreateBridge(name string, mtu int, alias string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("CreateBridge %s", name); err != nil {
		return err
	}
	return k.addLocked("", network.Link{Name: name, Alias: alias, Kind: "bridge"})
}

func (k *FakeKernel) CreateTAP(ns string, spec network.TAPSpec) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("CreateTAP %s %s", ns, spec.Name); err != nil {
		return err
	}
	return k.addLocked(ns, network.Link{Name: spec.Name, Alias: spec.Alias, Kind: "tuntap"})
}

func (k *FakeKernel) CreateVeth(name, alias string, mtu int, peerNS, peer string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("CreateVeth %s %s %s", name, peerNS, peer); err != nil {
		return err
	}
	if _, err := k.nsLocked(peerNS); err != nil {
		return err
	}
	if _, ok := k.links[peerNS][peer]; ok {
		return fmt.Errorf("create veth peer %s: %w", peer, network.ErrLinkExists)
	}
	if err := k.addLocked("", network.Link{Name: name, Alias: alias, Kind: "veth"}); err != nil {
		return err
	}
	k.links[peerNS][peer] = &network.Link{Name: peer, Kind: "veth"}
	k.peers["|"+name] = peerNS + "|" + peer
	k.peers[peerNS+"|"+peer] = "|" + name
	return nil
}

func (k *FakeKernel) DeleteLink(ns, name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("DeleteLink %s %s", ns, name); err != nil {
		return err
	}
	k.removeLocked(ns, name)
	return nil
}

// removeLocked deletes a link and, for a veth, its peer, as the kernel does.
func (k *FakeKernel) removeLocked(ns, name string) {
	links := k.links[ns]
	if _, ok := links[name]; !ok {
		return
	}
	delete(links, name)
	delete(k.addrs, ns+"|"+name)
	for _, other := range links {
		if other.Master == name {
			other.Master = ""
		}
	}
	if peer, ok := k.peers[ns+"|"+name]; ok {
		delete(k.peers, ns+"|"+name)
		delete(k.peers, peer)
		peerNS, peerName, _ := strings.Cut(peer, "|")
		k.removeLocked(peerNS, peerName)
	}
}

func (k *FakeKernel) SetMaster(name, master string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("SetMaster %s %s", name, master); err != nil {
		return err
	}
	l, ok := k.links[""][name]
	if !ok {
		return fmt.Errorf("attach %s to %s: link not found", name, master)
	}
	if _, ok := k.links[""][master]; !ok {
		return fmt.Errorf("attach %s to %s: bridge not found", name, master)
	}
	l.Master = master
	return nil
}

func (k *FakeKernel) MoveLink(fromNS, name, toNS string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("MoveLink %s %s %s", fromNS, name, toNS); err != nil {
		return err
	}
	l, ok := k.links[fromNS][name]
	if !ok {
		return fmt.Errorf("move link %s: not found", name)
	}
	if _, err := k.nsLocked(toNS); err != nil {
		return err
	}
	if _, ok := k.links[toNS][name]; ok {
		return fmt.Errorf("move link %s: %w", name, network.ErrLinkExists)
	}
	delete(k.links[fromNS], name)
	delete(k.addrs, fromNS+"|"+name)
	l.Up, l.Master = false, ""
	k.links[toNS][name] = l
	return nil
}

func (k *FakeKernel) SetUp(ns, name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("SetUp %s %s", ns, name); err != nil {
		return err
	}
	l, ok := k.links[ns][name]
	if !ok {
		return fmt.Errorf("set link %s up: not found", name)
	}
	l.Up = true
	return nil
}

func (k *FakeKernel) ReplaceAddr(ns, name string, addr netip.Prefix) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("ReplaceAddr %s %s %s", ns, name, addr); err != nil {
		return err
	}
	if _, ok := k.links[ns][name]; !ok {
		return fmt.Errorf("set address on %s: link not found", name)
	}
	key := ns + "|" + name
	if !slices.Contains(k.addrs[key], addr) {
		k.addrs[key] = append(k.addrs[key], addr)
	}
	return nil
}

func (k *FakeKernel) ReplaceDefaultRoute(ns string, gw netip.Addr) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("ReplaceDefaultRoute %s %s", ns, gw); err != nil {
		return err
	}
	k.routes[ns] = gw
	return nil
}

func (k *FakeKernel) Addrs(ns string) ([]netip.Prefix, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("Addrs %s", ns); err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for key, a := range k.addrs {
		if strings.HasPrefix(key, ns+"|") {
			out = append(out, a...)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out, nil
}

func (k *FakeKernel) Sysctl(ns, key string) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("Sysctl %s %s", ns, key); err != nil {
		return "", err
	}
	v, ok := k.sysctls[ns+"|"+key]
	if !ok {
		return "0", nil
	}
	return v, nil
}

func (k *FakeKernel) SetSysctl(ns, key, value string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.record("SetSysctl %s %s %s", ns, key, value); err != nil {
		return err
	}
	k.sysctls[ns+"|"+key] = value
	return nil
}

// FakeFirewall is a recording, in-memory network.Firewall.
type FakeFirewall struct {
	// Fail, when set, is called with each call's record before the call
	// acts; a non-nil result is returned instead.
	Fail func(call string) error

	mu       sync.Mutex
	calls    []string
	policies map[string]nft.VMPolicy
	nat      map[string]string
	slotNAT  map[string]nft.SlotNAT
}

// NewFakeFirewall returns an empty FakeFirewall.
func NewFakeFirewall() *FakeFirewall {
	return &FakeFirewall{policies: map[string]nft.VMPolicy{}, nat: map[string]string{}, slotNAT: map[string]nft.SlotNAT{}}
}

func (f *FakeFirewall) record(format string, args ...any) error {
	call := fmt.Sprintf(format, args...)
	f.calls = append(f.calls, call)
	if f.Fail != nil {
		return f.Fail(call)
	}
	return nil
}

// Policy returns the installed policy of VM id.
func (f *FakeFirewall) Policy(id string) (nft.VMPolicy, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.policies[id]
	return p, ok
}

// State returns a stable text dump of the installed rules.
func (f *FakeFirewall) State() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var lines []string
	for id, p := range f.policies {
		lines = append(lines, fmt.Sprintf("vm %s %s iface=%s allow=%v deny=%v", id, p.Family, p.Iface, p.Allow, p.DenyAll))
	}
	for name, v := range f.nat {
		lines = append(lines, "nat "+name+" "+v)
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func (f *FakeFirewall) InstallVM(p nft.VMPolicy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("InstallVM %s", p.VMID); err != nil {
		return err
	}
	if err := p.Validate(); err != nil {
		return err
	}
	f.policies[p.VMID] = p
	return nil
}

func (f *FakeFirewall) RemoveVM(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("RemoveVM %s", id); err != nil {
		return err
	}
	delete(f.policies, id)
	return nil
}

func (f *FakeFirewall) VMs() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("VMs"); err != nil {
		return nil, err
	}
	var ids []string
	for id := range f.policies {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

func (f *FakeFirewall) EnsureNAT(name string, src netip.Prefix, uplink string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("EnsureNAT %s", name); err != nil {
		return err
	}
	f.nat[name] = src.String() + " via " + uplink
	return nil
}

func (f *FakeFirewall) RemoveNAT(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("RemoveNAT %s", name); err != nil {
		return err
	}
	delete(f.nat, name)
	return nil
}

func (f *FakeFirewall) InstallSlotNAT(nsPath string, s nft.SlotNAT) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("InstallSlotNAT %s", nsPath); err != nil {
		return err
	}
	f.slotNAT[nsPath] = s
	return nil
}

func (f *FakeFirewall) Teardown() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("Teardown"); err != nil {
		return err
	}
	clear(f.policies)
	clear(f.nat)
	return nil
}

// Calls returns the recorded calls.
func (f *FakeFirewall) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}
