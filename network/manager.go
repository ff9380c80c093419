package network

import (
	"context"
	"errors"
	"fmt"
	"github.com/embervm/ember/internal/cleanup"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/embervm/ember/network/nft"
	"github.com/embervm/ember/vm"
)

// Errors of the manager. They wrap the vm package's sentinels where one
// fits, so callers can test with either.
var (
	ErrUnknownNetwork = errors.New("unknown network")
	// ErrIPForwardingDisabled means a network needs IPv4 forwarding in the
	// host namespace, it is off, and Ember may not turn it on.
	ErrIPForwardingDisabled = errors.New("ipv4 forwarding is disabled")
	ErrAttached             = fmt.Errorf("network already attached: %w", vm.ErrAlreadyExists)
	// ErrMACInUse means another VM on the same bridge has the MAC that a
	// caller asked for.
	ErrMACInUse = errors.New("mac address in use")
)

const (
	ipForwardKey       = "net.ipv4.ip_forward"
	defaultNetNSPrefix = "ember-"
	// slotTAPName is the TAP's name inside every slot. One name in every
	// slot lets a snapshot that names its TAP restore in any slot.
	slotTAPName = "tap0"
)

// Options configures a [Manager]. Only Networks and Store are required.
type Options struct {
	Networks []Network
	Store    *Store
	// HostNetNS is the path of the namespace that plays the host; "" means
	// the process's own. Tests point it at a namespace they created.
	HostNetNS string
	// NetNSPrefix starts the name of every slot namespace, followed by the
	// VM id; "" means "ember-".
	NetNSPrefix string
	// TAPOwner and TAPGroup own the TAP devices, so an unprivileged VMM
	// can open them. 0 means root.
	TAPOwner uint32
	TAPGroup uint32
	// Kernel and Firewall default to the netlink and nftables
	// implementations for HostNetNS. Tests pass fakes.
	Kernel   Kernel
	Firewall Firewall
	// Logger nil means slog.Default().
	Logger *slog.Logger
}

// Manager owns the host side of Ember's networks: bridges, slots, TAPs,
// leases and egress rules. Its methods are safe for concurrent use; changes
// are serialized.
type Manager struct {
	networks map[string]Network
	order    []string
	store    *Store
	kernel   Kernel
	fw       Firewall
	prefix   string
	owner    uint32
	group    uint32
	log      *slog.Logger

	// mu serializes every change to leases and kernel state.
	mu sync.Mutex
}

// NewManager validates opts and returns a Manager. It changes nothing in
// the kernel; call [Manager.Reconcile] (or [Manager.Setup]) next.
func NewManager(opts Options) (*Manager, error) {
	if opts.Store == nil {
		return nil, errors.New("new network manager: missing lease store")
	}
	if err := ValidateNetworks(opts.Networks); err != nil {
		return nil, fmt.Errorf("new network manager: %w", err)
	}
	m := &Manager{
		networks: map[string]Network{},
		store:    opts.Store,
		kernel:   opts.Kernel,
		fw:       opts.Firewall,
		prefix:   opts.NetNSPrefix,
		owner:    opts.TAPOwner,
		group:    opts.TAPGroup,
		log:      opts.Logger,
	}
	for _, n := range opts.Networks {
		m.networks[n.Name] = n.WithDefaults()
		m.order = append(m.order, n.Name)
	}
	if m.kernel == nil {
		m.kernel = NewKernel(opts.HostNetNS)
	}
	if m.fw == nil {
		m.fw = nft.New(opts.HostNetNS)
	}
	if m.prefix == "" {
		m.prefix = defaultNetNSPrefix
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	return m, nil
}

// Attachment is a VM's network identity: its lease, the location of its
// TAP, and the guest's addressing.
type Attachment struct {
	Lease Lease
	// NetNSPath is the slot namespace that contains the TAP in slot mode.
	// The VMM must open the TAP from inside it, so it goes in vm.Spec.NetNS.
	// It is "" in bridge mode.
	NetNSPath  string
	Addressing GuestAddressing
}

// NetworkInterface returns the vm package's interface description for the
// attachment, ready to put in a vm.Spec.
func (a Attachment) NetworkInterface(ifaceID string) vm.NetworkInterface {
	return vm.NetworkInterface{
		IfaceID:     ifaceID,
		HostDevName: a.Lease.TAP,
		GuestMAC:    a.Lease.MAC,
		MTU:         a.Addressing.MTU,
	}
}

// NetworkOverride returns the override that points a restored snapshot's
// interface ifaceID at the attachment's TAP.
func (a Attachment) NetworkOverride(ifaceID string) vm.NetworkOverride {
	return vm.NetworkOverride{IfaceID: ifaceID, HostDevName: a.Lease.TAP}
}

// AttachOptions are per-VM settings.
type AttachOptions struct {
	// Allow is added to the network's allowlist for this VM.
	Allow []nft.Rule
	// Hostname is passed to the guest; "" leaves it unset.
	Hostname string
	// MAC is the guest device's MAC when the caller must keep it, such as
	// a VM restored from a snapshot, which carries its MAC. "" derives one
	// from the leased address. In bridge mode it must be unique on the
	// bridge, because the guest agent finds interfaces by MAC and does not
	// change them.
	MAC string
}

func (o AttachOptions) validate() error {
	if err := nft.ValidateRules(o.Allow); err != nil {
		return err
	}
	if len(o.Hostname) > MaxHostnameLength || strings.ContainsAny(o.Hostname, ": \t\n\x00") {
		return fmt.Errorf("hostname %q is invalid: at most %d bytes without ':' or spaces", o.Hostname, MaxHostnameLength)
	}
	if o.MAC != "" {
		if _, err := parseMAC(o.MAC); err != nil {
			return fmt.Errorf("%w: use six hex pairs of a unicast address such as 06:00:0a:00:00:02", err)
		}
	}
	return nil
}

// Setup creates or checks every network's bridge, NAT rule and IPv4
// forwarding. It is idempotent.
func (m *Manager) Setup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.setupLocked(ctx)
}

func (m *Manager) setupLocked(ctx context.Context) error {
	for _, name := range m.order {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := m.networks[name]
		if err := m.setupNetwork(n); err != nil {
			return fmt.Errorf("set up network %s: %w", n.Name, err)
		}
	}
	return nil
}

func (m *Manager) setupNetwork(n Network) error {
	if n.Mode == ModeBridge {
		if err := m.ensureBridge(n); err != nil {
			return err
		}
	}
	if n.Uplink == "" {
		return nil
	}
	if err := m.ensureForwarding(""); err != nil {
		return err
	}
	src := n.Subnet
	if n.Mode == ModeSlot {
		src = n.TransitRange
	}
	return m.fw.EnsureNAT(n.Name, src, n.Uplink)
}

func (m *Manager) ensureBridge(n Network) error {
	alias := aliasPrefix + bridgeAliasID + n.Name
	links, err := m.kernel.Links("")
	if err != nil {
		return err
	}
	i := slices.IndexFunc(links, func(l Link) bool { return l.Name == n.Bridge })
	switch {
	case i < 0:
		if err := m.kernel.CreateBridge(n.Bridge, n.MTU, alias); err != nil {
			return err
		}
		m.log.Info("created bridge", "network", n.Name, "link", n.Bridge)
	case links[i].Alias != alias:
		return fmt.Errorf("bridge %s: %w: it is not Ember's (alias %q), rename it or set another bridge name",
			n.Bridge, ErrLinkExists, links[i].Alias)
	}
	gw := netip.PrefixFrom(addrAt(n.Subnet, 1), n.Subnet.Bits())
	if err := m.kernel.ReplaceAddr("", n.Bridge, gw); err != nil {
		return err
	}
	return m.kernel.SetUp("", n.Bridge)
}

// ensureForwarding turns IPv4 forwarding on in namespace ns, which is the
// host when ns is "", if Ember may.
func (m *Manager) ensureForwarding(ns string) error {
	v, err := m.kernel.Sysctl(ns, ipForwardKey)
	if err != nil {
		return err
	}
	if v == "1" {
		return nil
	}
	managed := ns != ""
	for _, n := range m.networks {
		managed = managed || (n.Uplink != "" && n.ManageIPForwarding)
	}
	if !managed {
		return fmt.Errorf("%w in the host namespace: run sysctl -w %s=1 or set manage_ip_forwarding", ErrIPForwardingDisabled, ipForwardKey)
	}
	if ns == "" {
		m.log.Info("enabling ipv4 forwarding", "sysctl", ipForwardKey)
	}
	return m.kernel.SetSysctl(ns, ipForwardKey, "1")
}

// Lease returns the lease of VM vmID.
func (m *Manager) Lease(vmID string) (Lease, error) { return m.store.Get(vmID) }

// Attach gives VM vmID an identity in network netName: a lease, a TAP
// attached to the bridge or placed in a new slot, and its egress rules. A
// failed Attach leaves no lease, link, namespace or rule behind.
func (m *Manager) Attach(ctx context.Context, vmID, netName string, o AttachOptions) (Attachment, error) {
	if err := vm.ValidateID(vmID); err != nil {
		return Attachment{}, fmt.Errorf("attach vm %s: %w", vmID, err)
	}
	n, ok := m.networks[netName]
	if !ok {
		return Attachment{}, fmt.Errorf("attach vm %s: %w %q", vmID, ErrUnknownNetwork, netName)
	}
	if err := o.validate(); err != nil {
		return Attachment{}, fmt.Errorf("attach vm %s: %w", vmID, err)
	}
	if err := ctx.Err(); err != nil {
		return Attachment{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()

	var l Lease
	err := m.store.Update(func(leases []Lease) ([]Lease, []string, error) {
		if slices.ContainsFunc(leases, func(x Lease) bool { return x.VMID == vmID }) {
			return nil, nil, ErrAttached
		}
		var err error
		l, err = m.newLease(vmID, n, o, leases)
		return []Lease{l}, nil, err
	})
	if err != nil {
		return Attachment{}, fmt.Errorf("attach vm %s: %w", vmID, err)
	}

	var rb cleanup.Stack
	rb.AddFunc(func() error { return m.store.Delete(vmID) })
	if err := m.build(&rb, l, n, true); err != nil {
		return Attachment{}, fmt.Errorf("attach vm %s: %w", vmID, errors.Join(err, rb.Run()))
	}
	m.log.Info("attached vm", "vm", vmID, "network", n.Name, "tap", l.TAP, "address", l.Address, "mac", l.MAC)
	return m.attachment(l, n), nil
}

// newLease allocates an identity for vmID in n against the current leases
// and the host's links.
func (m *Manager) newLease(vmID string, n Network, o AttachOptions, leases []Lease) (Lease, error) {
	l := Lease{
		VMID: vmID, Network: n.Name, Mode: n.Mode,
		Allow: slices.Clone(o.Allow), Hostname: o.Hostname,
		CreatedAt: time.Now().UTC(),
	}
	hostLinks, err := m.kernel.Links("")
	if err != nil {
		return Lease{}, err
	}
	if n.Mode == ModeBridge {
		if l.Address, l.Gateway, err = allocateBridge(n, leases); err != nil {
			return Lease{}, err
		}
		l.MAC = macFor(macKindBridge, l.Address.Addr())
		if o.MAC != "" {
			mac, _ := parseMAC(o.MAC)
			l.MAC = mac.String()
			if i := slices.IndexFunc(leases, func(x Lease) bool { return x.Network == n.Name && x.MAC == l.MAC }); i >= 0 {
				return Lease{}, fmt.Errorf("%w: %s belongs to vm %s on bridge %s", ErrMACInUse, l.MAC, leases[i].VMID, n.Bridge)
			}
		}
		l.TAP, err = pickName(tapPrefix, vmID, leases, hostLinks)
		return l, err
	}

	if l.Slot, err = allocateSlot(n, leases); err != nil {
		return Lease{}, err
	}
	l.HostAddr, l.SlotAddr = slotAddrs(n, l.Slot)
	l.Address = netip.PrefixFrom(addrAt(n.GuestSubnet, 2), n.GuestSubnet.Bits())
	l.Gateway = addrAt(n.GuestSubnet, 1)
	l.MAC = macFor(macKindSlot, l.SlotAddr)
	if o.MAC != "" {
		// Every slot is its own link layer, so clones may share a MAC.
		mac, _ := parseMAC(o.MAC)
		l.MAC = mac.String()
	}
	l.TAP = slotTAPName
	l.NetNS = m.prefix + vmID
	l.HostVeth, err = pickName(vethPrefix, vmID, leases, hostLinks)
	return l, err
}

// pickName returns the first name for vmID that no lease uses. A name
// taken by a link that is not Ember's is an error, so Ember never takes over
// someone else's interface. A name taken by an orphaned Ember link is
// skipped until Reconcile removes that link.
func pickName(prefix, vmID string, leases []Lease, hostLinks []Link) (string, error) {
	for _, name := range nameCandidates(prefix, vmID) {
		if slices.ContainsFunc(leases, func(l Lease) bool { return l.TAP == name && l.Mode == ModeBridge || l.HostVeth == name }) {
			continue
		}
		i := slices.IndexFunc(hostLinks, func(l Link) bool { return l.Name == name })
		if i < 0 {
			return name, nil
		}
		if !strings.HasPrefix(hostLinks[i].Alias, aliasPrefix) {
			return "", fmt.Errorf("interface name %s: %w and is not Ember's (kind %s): delete or rename it",
				name, ErrLinkExists, hostLinks[i].Kind)
		}
	}
	return "", fmt.Errorf("no free interface name for vm %s: %w", vmID, ErrLinkExists)
}

// build creates the kernel state of lease l: its TAP (when createTAP) and
// slot, and its egress rules. Each step adds its undo to rb.
func (m *Manager) build(rb *cleanup.Stack, l Lease, n Network, createTAP bool) error {
	if n.Mode == ModeBridge {
		if createTAP {
			if err := m.kernel.CreateTAP("", m.tapSpec(l.TAP, l.VMID, n)); err != nil {
				return err
			}
			rb.AddFunc(func() error { return m.kernel.DeleteLink("", l.TAP) })
		}
		if err := m.kernel.SetMaster(l.TAP, n.Bridge); err != nil {
			return err
		}
		if err := m.kernel.SetUp("", l.TAP); err != nil {
			return err
		}
	} else {
		if err := m.buildSlot(rb, l, n); err != nil {
			return err
		}
		if createTAP {
			if err := m.kernel.CreateTAP(m.kernel.NSPath(l.NetNS), m.tapSpec(l.TAP, l.VMID, n)); err != nil {
				return err
			}
		}
		if err := m.configureSlotTAP(l, n); err != nil {
			return err
		}
	}
	return m.installRules(rb, l, n)
}

func (m *Manager) tapSpec(name, vmID string, n Network) TAPSpec {
	return TAPSpec{Name: name, MTU: n.MTU, Owner: m.owner, Group: m.group, Alias: aliasPrefix + vmID}
}

// buildSlot creates the slot namespace of l, its veth pair, routes, NAT and
// forwarding.
func (m *Manager) buildSlot(rb *cleanup.Stack, l Lease, n Network) error {
	path, err := m.kernel.CreateNS(l.NetNS)
	if err != nil {
		return err
	}
	rb.AddFunc(func() error { return m.kernel.DeleteNS(l.NetNS) })
	steps := []func() error{
		func() error { return m.kernel.SetUp(path, "lo") },
		func() error {
			if err := m.kernel.CreateVeth(l.HostVeth, aliasPrefix+l.VMID, n.MTU, path, slotVethName); err != nil {
				return err
			}
			rb.AddFunc(func() error { return m.kernel.DeleteLink("", l.HostVeth) })
			return nil
		},
		func() error { return m.kernel.ReplaceAddr("", l.HostVeth, l.HostAddr) },
		func() error { return m.kernel.SetUp("", l.HostVeth) },
		func() error { return m.kernel.ReplaceAddr(path, slotVethName, netip.PrefixFrom(l.SlotAddr, 30)) },
		func() error { return m.kernel.SetUp(path, slotVethName) },
		func() error { return m.kernel.ReplaceDefaultRoute(path, l.HostAddr.Addr()) },
		func() error { return m.ensureForwarding(path) },
		func() error {
			return m.fw.InstallSlotNAT(path, nft.SlotNAT{Iface: slotVethName, SlotAddr: l.SlotAddr, GuestAddr: l.Address.Addr()})
		},
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return fmt.Errorf("build slot %s: %w", l.NetNS, err)
		}
	}
	return nil
}

// configureSlotTAP gives the TAP in l's slot the gateway address and sets
// it up. Moving a link between namespaces clears both.
func (m *Manager) configureSlotTAP(l Lease, n Network) error {
	path := m.kernel.NSPath(l.NetNS)
	gw := netip.PrefixFrom(l.Gateway, n.GuestSubnet.Bits())
	if err := m.kernel.ReplaceAddr(path, l.TAP, gw); err != nil {
		return err
	}
	return m.kernel.SetUp(path, l.TAP)
}

func (m *Manager) installRules(rb *cleanup.Stack, l Lease, n Network) error {
	p, err := m.policy(l, n)
	if err != nil {
		return err
	}
	if err := m.fw.InstallVM(p); err != nil {
		return err
	}
	rb.AddFunc(func() error { return m.fw.RemoveVM(l.VMID) })
	return nil
}

// policy builds the egress policy of l. Protected covers every Ember
// network's host-side range and every address of the host namespace.
func (m *Manager) policy(l Lease, n Network) (nft.VMPolicy, error) {
	p := nft.VMPolicy{
		VMID:    l.VMID,
		Allow:   append(slices.Clone(n.Allow), l.Allow...),
		DenyAll: n.DefaultEgress == EgressDenyAll,
	}
	if l.Mode == ModeBridge {
		mac, err := parseMAC(l.MAC)
		if err != nil {
			return p, err
		}
		p.Family, p.Iface, p.MAC, p.IP = nft.FamilyBridge, l.TAP, mac, l.Address.Addr()
	} else {
		p.Family, p.Iface = nft.FamilyINet, l.HostVeth
	}
	for _, name := range m.order {
		p.Protected = append(p.Protected, m.networks[name].hostRanges()...)
	}
	addrs, err := m.kernel.Addrs("")
	if err != nil {
		return p, err
	}
	// An address inside a range already protected, such as a bridge's
	// gateway or a slot's host-side veth address, gets no rule of its
	// own. Otherwise a VM's rules would depend on how many slots existed
	// when it attached, and Reconcile would rewrite them after a restart.
	for _, a := range addrs {
		addr := a.Addr()
		covered := slices.ContainsFunc(p.Protected, func(r netip.Prefix) bool { return r.Contains(addr) })
		if !addr.IsLoopback() && !covered {
			p.Protected = append(p.Protected, netip.PrefixFrom(addr, 32))
		}
	}
	// NOTE: host addresses outside Ember's networks that are added after
	// this call are not protected until the VM's rules are installed
	// again (Reconcile does that).
	return p, nil
}

func (m *Manager) attachment(l Lease, n Network) Attachment {
	a := Attachment{Lease: l, Addressing: l.Addressing(n)}
	if l.Mode == ModeSlot {
		a.NetNSPath = m.kernel.NSPath(l.NetNS)
	}
	return a
}

// Detach removes VM vmID's rules, TAP, slot and lease. Detaching a VM
// without a lease is not an error. When a kernel step fails, the lease is
// kept so that a later Detach or Reconcile can finish.
func (m *Manager) Detach(ctx context.Context, vmID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	l, err := m.store.Get(vmID)
	if errors.Is(err, ErrLeaseNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach vm %s: %w", vmID, err)
	}
	if err := m.destroy(l); err != nil {
		return fmt.Errorf("detach vm %s: %w", vmID, err)
	}
	if err := m.store.Delete(vmID); err != nil {
		return fmt.Errorf("detach vm %s: %w", vmID, err)
	}
	m.log.Info("detached vm", "vm", vmID, "network", l.Network)
	return nil
}

// destroy removes the kernel state of l; each step is idempotent.
func (m *Manager) destroy(l Lease) error {
	errs := []error{m.fw.RemoveVM(l.VMID)}
	if l.Mode == ModeBridge {
		errs = append(errs, m.kernel.DeleteLink("", l.TAP))
	} else {
		errs = append(errs, m.kernel.DeleteLink("", l.HostVeth), m.kernel.DeleteNS(l.NetNS))
	}
	return errors.Join(errs...)
}
