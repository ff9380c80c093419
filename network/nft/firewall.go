// Package nft installs Ember's egress firewall and NAT with nftables over
// netlink.
//
// Ember owns three tables and reads or changes nothing else in a ruleset.
// They are "ember" in the bridge family for VMs on a bridge, "ember" in the
// inet family for VMs reached through a routed interface, and "ember-nat" in
// the ip family for masquerading. Each table has input and forward base chains
// that jump to a dispatch chain, in which each VM has a rule that matches its
// interface and jumps to the VM's own chain, "vm-" plus the VM id. Every rule
// carries user data naming its owner, which is how a VM's rules are found
// for replacement or removal. Every change is one netlink batch, which the
// kernel applies atomically, so a failed call changes nothing.
//
// A VM's chain first checks, in the bridge family only, the source MAC, then
// ARP, which it accepts when the sender address is the VM's own, then the
// IPv4 source address. In both families it then drops non-IPv4 traffic,
// accepts what the allowlist matches and drops traffic to protected
// networks. Last comes the default policy: drop for deny-all, or a fall
// through to the base chain's accept for allow-all. In the inet family a
// packet from a VM addressed to the host itself is dropped after the VM's
// chain unless the chain accepted it.
//
// A sketch:
//
//	fw := nft.New("") // the process's own namespace
//	err := fw.InstallVM(nft.VMPolicy{
//		VMID: "web-1", Family: nft.FamilyBridge, Iface: "emt-web-1",
//		Allow:   []nft.Rule{{Dest: netip.MustParsePrefix("0.0.0.0/0"), Protocol: nft.ProtocolTCP, Port: 443}},
//		DenyAll: true,
//	})
package nft

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names of Ember's tables and chains. Nothing else in the ruleset is read
// or changed.
const (
	TableName    = "ember"
	NATTableName = "ember-nat"
	// SlotTableName is the NAT table inside each slot namespace.
	SlotTableName = "ember-slot"

	inputChain      = "input"
	forwardChain    = "forward"
	inputDispatch   = "in-vms"
	forwardDispatch = "fwd-vms"
	postrouting     = "postrouting"
	prerouting      = "prerouting"
	// VMChainPrefix starts the name of every per-VM chain.
	VMChainPrefix = "vm-"

	tagPrefix = "ember:"
	tagStatic = tagPrefix + "static"
)

// Family selects which nftables family, and so which hooks, see a VM's
// traffic.
type Family string

const (
	// FamilyBridge is for VMs whose TAP is a bridge port. The bridge
	// family's input and forward hooks run per port, so meta iifname is the
	// TAP. In the inet family the same packets show the bridge as iifname.
	FamilyBridge Family = "bridge"
	// FamilyINet is for VMs reached through a routed interface, such as
	// the host side of a slot's veth pair.
	FamilyINet Family = "inet"
)

func (f Family) table() *nftables.Table {
	if f == FamilyBridge {
		return &nftables.Table{Name: TableName, Family: nftables.TableFamilyBridge}
	}
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

var families = []Family{FamilyBridge, FamilyINet}

// VMPolicy is the egress policy of one VM.
type VMPolicy struct {
	VMID   string
	Family Family
	// Iface is the host interface the VM's packets arrive on: its TAP in
	// bridge mode, the host side of its veth pair in slot mode.
	Iface string
	// MAC and IP, when set, drop frames from Iface with another source MAC,
	// ARP sender address or IPv4 source address, so a guest cannot pose as
	// another one. Only FamilyBridge uses them.
	MAC net.HardwareAddr
	IP  netip.Addr
	// Allow lists what the VM may reach. It is checked first, so it can
	// open a path to a protected network too.
	Allow []Rule
	// Protected lists networks that are dropped even under allow-all:
	// other tenants and the host's own addresses.
	Protected []netip.Prefix
	// DenyAll drops everything that Allow does not match. Without it,
	// traffic to anything outside Protected passes.
	DenyAll bool
}

// Validate checks p before anything is installed.
func (p *VMPolicy) Validate() error {
	var errs []error
	if p.VMID == "" || strings.ContainsAny(p.VMID, " \t\n\x00") {
		errs = append(errs, fmt.Errorf("invalid vm id %q", p.VMID))
	}
	if p.Family != FamilyBridge && p.Family != FamilyINet {
		errs = append(errs, fmt.Errorf("unknown family %q, want bridge or inet", p.Family))
	}
	if p.Iface == "" || len(p.Iface) >= unix.IFNAMSIZ {
		errs = append(errs, fmt.Errorf("invalid interface name %q", p.Iface))
	}
	if p.MAC != nil && len(p.MAC) != 6 {
		errs = append(errs, fmt.Errorf("invalid MAC %v", p.MAC))
	}
	if p.IP.IsValid() && !p.IP.Is4() {
		errs = append(errs, fmt.Errorf("source address %s is not IPv4", p.IP))
	}
	if err := ValidateRules(p.Allow); err != nil {
		errs = append(errs, err)
	}
	for _, n := range p.Protected {
		if !n.IsValid() || !n.Addr().Is4() {
			errs = append(errs, fmt.Errorf("protected network %s is not an IPv4 CIDR", n))
		}
	}
	return errors.Join(errs...)
}

// Firewall installs Ember's egress rules in one network namespace. All
// changes to one table are sent as one batch, which the kernel applies
// atomically, so a failed call leaves the previous rules in place.
type Firewall struct {
	// nsPath is the namespace to work in; empty means the process's own.
	nsPath string

	// mu serializes read-modify-write sequences on the tables.
	mu sync.Mutex
}

// New returns a Firewall for the network namespace at nsPath, or for the
// process's own namespace when nsPath is empty. It changes nothing until a
// method is called.
func New(nsPath string) *Firewall { return &Firewall{nsPath: nsPath} }

// dial opens a netlink connection in the namespace at nsPath. The conn
// uses the namespace fd every time it opens a socket, so the caller must
// call done when it is finished with the conn.
func dial(nsPath string) (c *nftables.Conn, done func(), err error) {
	if nsPath == "" {
		c, err = nftables.New()
		return c, func() {}, err
	}
	fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open netns %s: %w", nsPath, err)
	}
	c, err = nftables.New(nftables.WithNetNSFd(fd))
	if err != nil {
		unix.Close(fd)
		return nil, nil, err
	}
	return c, func() { unix.Close(fd) }, nil
}

func tag(kind, id string) []byte { return []byte(tagPrefix + kind + "=" + id) }

func vmTag(id string) []byte { return tag("vm", id) }

func vmChainName(id string) string { return VMChainPrefix + id }

// ensureBase queues the tables, base chains and dispatch chains of family,
// and rewrites the static rules of the base chains. It is idempotent.
func ensureBase(c *nftables.Conn, fam Family) (table *nftables.Table, in, fwd *nftables.Chain) {
	table = c.AddTable(fam.table())
	accept := nftables.ChainPolicyAccept
	in = c.AddChain(&nftables.Chain{Name: inputDispatch, Table: table})
	fwd = c.AddChain(&nftables.Chain{Name: forwardDispatch, Table: table})
	for _, base := range []struct {
		name     string
		hook     *nftables.ChainHook
		dispatch string
	}{{inputChain, nftables.ChainHookInput, inputDispatch}, {forwardChain, nftables.ChainHookForward, forwardDispatch}} {
		ch := c.AddChain(&nftables.Chain{
			Name: base.name, Table: table, Type: nftables.ChainTypeFilter,
			Hooknum: base.hook, Priority: nftables.ChainPriorityFilter, Policy: &accept,
		})
		c.FlushChain(ch)
		// The kernel on the project's hosts has no bridge conntrack, so
		// the bridge family has no ct rule. ARP there is checked in each
		// VM's chain.
		if fam == FamilyINet {
			c.AddRule(&nftables.Rule{Table: table, Chain: ch, UserData: []byte(tagStatic),
				Exprs: join(matchCtEstablished(), []expr.Any{verdict(expr.VerdictAccept)})})
		}
		c.AddRule(&nftables.Rule{Table: table, Chain: ch, UserData: []byte(tagStatic),
			Exprs: []expr.Any{jump(base.dispatch)}})
	}
	return table, in, fwd
}

// vmRules returns the rules of the VM's own chain, in order.
func vmRules(p *VMPolicy) [][]expr.Any {
	var rules [][]expr.Any
	drop := []expr.Any{verdict(expr.VerdictDrop)}
	accept := []expr.Any{verdict(expr.VerdictAccept)}

	if p.Family == FamilyBridge && p.MAC != nil {
		rules = append(rules, join(matchEtherSrcNot(p.MAC), drop))
	}
	if p.Family == FamilyBridge {
		// ARP must reach the gateway and other guests, but only with
		// the VM's own address as sender, so no guest can claim
		// another's address in the neighbour tables.
		if p.IP.IsValid() {
			rules = append(rules, join(matchEtherType(expr.CmpOpEq, unix.ETH_P_ARP), matchAddr(arpSenderIPOffset, expr.CmpOpNeq, p.IP), drop))
		}
		rules = append(rules, join(matchEtherType(expr.CmpOpEq, unix.ETH_P_ARP), accept))
	}
	// Only IPv4 is routed for guests; IPv6 would bypass the IPv4 rules.
	rules = append(rules, join(matchEtherType(expr.CmpOpNeq, unix.ETH_P_IP), drop))
	if p.Family == FamilyBridge && p.IP.IsValid() {
		rules = append(rules, join(matchAddr(ipv4SrcOffset, expr.CmpOpNeq, p.IP), drop))
	}
	for _, r := range p.Allow {
		rules = append(rules, join(ruleExprs(r), accept))
	}
	for _, n := range p.Protected {
		rules = append(rules, join(matchPrefix(ipv4DstOffset, n.Masked()), drop))
	}
	if p.DenyAll {
		rules = append(rules, drop)
	}
	return rules
}

// InstallVM installs or replaces the egress policy of VM p.VMID. Its
// previous rules in p.Family are replaced in one batch. Rules it had in the
// other family are removed first, in a batch of their own.
func (f *Firewall) InstallVM(p VMPolicy) error {
	if err := p.Validate(); err != nil {
		return fmt.Errorf("install firewall for vm %s: %w", p.VMID, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()

	c, done, err := dial(f.nsPath)
	if err != nil {
		return fmt.Errorf("install firewall for vm %s: %w", p.VMID, err)
	}
	defer done()
	// A VM that moved between modes has rules in the other family. They
	// are removed in their own batch, because the rule handles for each
	// batch are read before it is sent.
	for _, fam := range families {
		if fam != p.Family {
			if err := removeVMLocked(c, fam, p.VMID); err != nil {
				return fmt.Errorf("install firewall for vm %s: %w", p.VMID, err)
			}
		}
	}

	old, err := taggedRules(c, p.Family, vmTag(p.VMID), inputDispatch, forwardDispatch)
	if err != nil {
		return fmt.Errorf("install firewall for vm %s: %w", p.VMID, err)
	}
	table, in, fwd := ensureBase(c, p.Family)
	for _, r := range old {
		if err := c.DelRule(r); err != nil {
			return fmt.Errorf("install firewall for vm %s: %w", p.VMID, err)
		}
	}
	name := vmChainName(p.VMID)
	ch := c.AddChain(&nftables.Chain{Name: name, Table: table})
	c.FlushChain(ch)
	for _, e := range vmRules(&p) {
		c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: e, UserData: vmTag(p.VMID)})
	}
	c.AddRule(&nftables.Rule{Table: table, Chain: in, UserData: vmTag(p.VMID),
		Exprs: join(matchIIFName(p.Iface), []expr.Any{jump(name)})})
	if p.Family == FamilyINet {
		// Traffic to the host itself ends here unless the VM's chain
		// accepted it. In the bridge family the input hook also gets
		// routed traffic, so Protected covers the host there.
		c.AddRule(&nftables.Rule{Table: table, Chain: in, UserData: vmTag(p.VMID),
			Exprs: join(matchIIFName(p.Iface), []expr.Any{verdict(expr.VerdictDrop)})})
	}
	c.AddRule(&nftables.Rule{Table: table, Chain: fwd, UserData: vmTag(p.VMID),
		Exprs: join(matchIIFName(p.Iface), []expr.Any{jump(name)})})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install firewall for vm %s: %w", p.VMID, err)
	}
	return nil
}

// RemoveVM removes VM id's chain and jumps from both families. Removing a
// VM that has no rules is not an error.
func (f *Firewall) RemoveVM(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, done, err := dial(f.nsPath)
	if err != nil {
		return fmt.Errorf("remove firewall for vm %s: %w", id, err)
	}
	defer done()
	for _, fam := range families {
		if err := removeVMLocked(c, fam, id); err != nil {
			return fmt.Errorf("remove firewall for vm %s: %w", id, err)
		}
	}
	return nil
}

func removeVMLocked(c *nftables.Conn, fam Family, id string) error {
	if ok, err := tableExists(c, fam.table()); err != nil || !ok {
		return err
	}
	old, err := taggedRules(c, fam, vmTag(id), inputDispatch, forwardDispatch)
	if err != nil {
		return err
	}
	chains, err := vmChains(c, fam)
	if err != nil {
		return err
	}
	hasChain := slices.Contains(chains, id)
	if len(old) == 0 && !hasChain {
		return nil
	}
	for _, r := range old {
		if err := c.DelRule(r); err != nil {
			return err
		}
	}
	if hasChain {
		ch := &nftables.Chain{Name: vmChainName(id), Table: fam.table()}
		c.FlushChain(ch)
		c.DelChain(ch)
	}
	return c.Flush()
}

// VMs returns the ids of the VMs that have a chain or a jump rule in
// either family.
func (f *Firewall) VMs() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, done, err := dial(f.nsPath)
	if err != nil {
		return nil, fmt.Errorf("list firewall vms: %w", err)
	}
	defer done()
	var ids []string
	for _, fam := range families {
		if ok, err := tableExists(c, fam.table()); err != nil {
			return nil, fmt.Errorf("list firewall vms: %w", err)
		} else if !ok {
			continue
		}
		chains, err := vmChains(c, fam)
		if err != nil {
			return nil, fmt.Errorf("list firewall vms: %w", err)
		}
		ids = append(ids, chains...)
		rules, err := taggedRules(c, fam, []byte(tagPrefix+"vm="), inputDispatch, forwardDispatch)
		if err != nil {
			return nil, fmt.Errorf("list firewall vms: %w", err)
		}
		for _, r := range rules {
			ids = append(ids, strings.TrimPrefix(string(r.UserData), tagPrefix+"vm="))
		}
	}
	slices.Sort(ids)
	return slices.Compact(ids), nil
}

// RemoveOrphans removes the rules of every VM for which keep returns false,
// and returns their ids.
func (f *Firewall) RemoveOrphans(keep func(vmID string) bool) ([]string, error) {
	ids, err := f.VMs()
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, id := range ids {
		if keep(id) {
			continue
		}
		if err := f.RemoveVM(id); err != nil {
			return removed, err
		}
		removed = append(removed, id)
	}
	return removed, nil
}

// EnsureNAT installs or replaces the masquerade rule of network name:
// packets from src leaving through uplink get the uplink's address.
func (f *Firewall) EnsureNAT(name string, src netip.Prefix, uplink string) error {
	if !src.IsValid() || !src.Addr().Is4() || uplink == "" || len(uplink) >= unix.IFNAMSIZ {
		return fmt.Errorf("ensure nat for network %s: invalid source %s or uplink %q", name, src, uplink)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	c, done, err := dial(f.nsPath)
	if err != nil {
		return fmt.Errorf("ensure nat for network %s: %w", name, err)
	}
	defer done()

	table := &nftables.Table{Name: NATTableName, Family: nftables.TableFamilyIPv4}
	old, err := taggedRulesIn(c, table, tag("nat", name), postrouting)
	if err != nil {
		return fmt.Errorf("ensure nat for network %s: %w", name, err)
	}

	c.AddTable(table)
	ch := c.AddChain(&nftables.Chain{
		Name: postrouting, Table: table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
	})
	for _, r := range old {
		if err := c.DelRule(r); err != nil {
			return fmt.Errorf("ensure nat for network %s: %w", name, err)
		}
	}
	c.AddRule(&nftables.Rule{Table: table, Chain: ch, UserData: tag("nat", name),
		Exprs: join(matchPrefix(ipv4SrcOffset, src.Masked()), matchOIFName(uplink), []expr.Any{&expr.Masq{}})})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("ensure nat for network %s: %w", name, err)
	}
	return nil
}

// RemoveNAT removes the masquerade rule of network name, if any.
func (f *Firewall) RemoveNAT(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, done, err := dial(f.nsPath)
	if err != nil {
		return fmt.Errorf("remove nat for network %s: %w", name, err)
	}
	defer done()
	table := &nftables.Table{Name: NATTableName, Family: nftables.TableFamilyIPv4}
	old, err := taggedRulesIn(c, table, tag("nat", name), postrouting)
	if err != nil || len(old) == 0 {
		return err
	}
	for _, r := range old {
		if err := c.DelRule(r); err != nil {
			return fmt.Errorf("remove nat for network %s: %w", name, err)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("remove nat for network %s: %w", name, err)
	}
	return nil
}

// Teardown deletes every Ember table in the namespace. It is safe to repeat.
func (f *Firewall) Teardown() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, done, err := dial(f.nsPath)
	if err != nil {
		return fmt.Errorf("tear down firewall: %w", err)
	}
	defer done()
	return deleteTables(c, FamilyBridge.table(), FamilyINet.table(),
		&nftables.Table{Name: NATTableName, Family: nftables.TableFamilyIPv4})
}

func deleteTables(c *nftables.Conn, tables ...*nftables.Table) error {
	n := 0
	for _, t := range tables {
		ok, err := tableExists(c, t)
		if err != nil {
			return fmt.Errorf("delete nft tables: %w", err)
		}
		if ok {
			c.DelTable(t)
			n++
		}
	}
	if n == 0 {
		return nil
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("delete nft tables: %w", err)
	}
	return nil
}

// SlotNAT is the address translation inside one slot namespace: the guest's
// address, the same in every slot, appears outside the slot as SlotAddr.
type SlotNAT struct {
	// Iface is the slot side of the veth pair.
	Iface     string
	SlotAddr  netip.Addr
	GuestAddr netip.Addr
}

// InstallSlotNAT replaces the NAT table in the slot namespace at nsPath.
func InstallSlotNAT(nsPath string, s SlotNAT) error {
	if !s.SlotAddr.Is4() || !s.GuestAddr.Is4() || s.Iface == "" {
		return fmt.Errorf("install slot nat in %s: invalid translation %+v", nsPath, s)
	}
	c, done, err := dial(nsPath)
	if err != nil {
		return fmt.Errorf("install slot nat in %s: %w", nsPath, err)
	}
	defer done()
	table := &nftables.Table{Name: SlotTableName, Family: nftables.TableFamilyIPv4}
	if ok, err := tableExists(c, table); err != nil {
		return fmt.Errorf("install slot nat in %s: %w", nsPath, err)
	} else if ok {
		c.DelTable(table)
	}

	c.AddTable(table)
	pre := c.AddChain(&nftables.Chain{Name: prerouting, Table: table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	post := c.AddChain(&nftables.Chain{Name: postrouting, Table: table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})

	guest := s.GuestAddr.As4()
	slot := s.SlotAddr.As4()
	c.AddRule(&nftables.Rule{Table: table, Chain: pre, UserData: []byte(tagStatic), Exprs: join(
		matchIIFName(s.Iface), matchIPv4(), matchAddr(ipv4DstOffset, expr.CmpOpEq, s.SlotAddr),
		[]expr.Any{
			&expr.Immediate{Register: 1, Data: guest[:]},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		})})
	c.AddRule(&nftables.Rule{Table: table, Chain: post, UserData: []byte(tagStatic), Exprs: join(
		matchOIFName(s.Iface), matchIPv4(), matchAddr(ipv4SrcOffset, expr.CmpOpEq, s.GuestAddr),
		[]expr.Any{
			&expr.Immediate{Register: 1, Data: slot[:]},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		})})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install slot nat in %s: %w", nsPath, err)
	}
	return nil
}

func tableExists(c *nftables.Conn, t *nftables.Table) (bool, error) {
	tables, err := c.ListTablesOfFamily(t.Family)
	if err != nil {
		return false, err
	}
	for _, x := range tables {
		if x.Name == t.Name {
			return true, nil
		}
	}
	return false, nil
}

func vmChains(c *nftables.Conn, fam Family) ([]string, error) {
	chains, err := c.ListChainsOfTableFamily(fam.table().Family)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, ch := range chains {
		if ch.Table.Name == TableName && strings.HasPrefix(ch.Name, VMChainPrefix) {
			ids = append(ids, strings.TrimPrefix(ch.Name, VMChainPrefix))
		}
	}
	return ids, nil
}

// taggedRules returns the rules in the named chains of fam's table whose
// user data is tag, or starts with tag when tag ends in "=". A missing table
// or chain has no rules.
func taggedRules(c *nftables.Conn, fam Family, tag []byte, chains ...string) ([]*nftables.Rule, error) {
	return taggedRulesIn(c, fam.table(), tag, chains...)
}

func taggedRulesIn(c *nftables.Conn, t *nftables.Table, tag []byte, chains ...string) ([]*nftables.Rule, error) {
	ok, err := tableExists(c, t)
	if err != nil || !ok {
		return nil, err
	}
	existing, err := c.ListChainsOfTableFamily(t.Family)
	if err != nil {
		return nil, err
	}
	want := string(tag)
	matches := func(userData string) bool {
		if strings.HasSuffix(want, "=") {
			return strings.HasPrefix(userData, want)
		}
		return userData == want
	}
	var out []*nftables.Rule
	for _, name := range chains {
		if !slices.ContainsFunc(existing, func(ch *nftables.Chain) bool { return ch.Table.Name == t.Name && ch.Name == name }) {
			continue
		}
		rules, err := c.GetRules(t, &nftables.Chain{Name: name, Table: t})
		if err != nil {
			return nil, fmt.Errorf("list rules of chain %s: %w", name, err)
		}
		for _, r := range rules {
			if matches(string(r.UserData)) {
				out = append(out, r)
			}
		}
	}
	return out, nil
}

// InstallSlotNAT is [InstallSlotNAT] as a method, so a Firewall satisfies
// interfaces that include it.
func (f *Firewall) InstallSlotNAT(nsPath string, s SlotNAT) error { return InstallSlotNAT(nsPath, s) }
