package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/embervm/ember/network/nft"
)

// Lease is one VM's network identity. It is stored before the kernel state
// is made, so a crash leaves a lease that [Manager.Reconcile] can finish or
// remove, never an unrecorded link.
type Lease struct {
	VMID    string `json:"vm_id"`
	Network string `json:"network"`
	Mode    Mode   `json:"mode"`
	// TAP is the VM's TAP device, in the host namespace in bridge mode and
	// in NetNS in slot mode.
	TAP string `json:"tap"`
	MAC string `json:"mac"`
	// Address is the guest's address with its subnet's prefix length. In
	// slot mode it is the same in every slot.
	Address netip.Prefix `json:"address"`
	Gateway netip.Addr   `json:"gateway"`

	// Slot is the slot's index in the transit range (slot mode only).
	Slot int `json:"slot,omitempty"`
	// NetNS is the slot namespace's name (slot mode only).
	NetNS string `json:"netns,omitempty"`
	// HostVeth is the host side of the slot's veth pair (slot mode only).
	HostVeth string `json:"host_veth,omitempty"`
	// HostAddr is the host side's address and SlotAddr the slot side's,
	// which is the guest's unique address as seen from the host (slot mode
	// only).
	HostAddr netip.Prefix `json:"host_addr,omitzero"`
	SlotAddr netip.Addr   `json:"slot_addr,omitzero"`

	// Allow is the VM's own allowlist, added after the network's.
	Allow     []nft.Rule `json:"allow,omitempty"`
	Hostname  string     `json:"hostname,omitempty"`
	CreatedAt time.Time  `json:"created_at"`
}

// ErrExhausted means a network has no free address or slot left.
var ErrExhausted = errors.New("network has no free address")

// slotVethName is the slot side of the veth pair inside every slot.
const slotVethName = "veth0"

// Link name prefixes. An Ember link also carries the alias aliasPrefix+id,
// which is what marks it as Ember's.
const (
	tapPrefix     = "emt-"
	vethPrefix    = "emv-"
	aliasPrefix   = "ember:"
	bridgeAliasID = "bridge:"
)

// nameCandidates returns up to 100 interface names for vmID in order of
// preference: prefix plus as much of the id as fits, then shorter forms with
// a numeric suffix.
func nameCandidates(prefix, vmID string) []string {
	room := 15 - len(prefix)
	out := []string{prefix + truncate(vmID, room)}
	for i := 2; i < 100; i++ {
		suffix := "-" + strconv.Itoa(i)
		out = append(out, prefix+truncate(vmID, room-len(suffix))+suffix)
	}
	return out
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// macFor derives a MAC from an IPv4 address: 06:xx is locally administered
// unicast, and the second octet keeps bridge addresses apart from slot
// addresses. Unique addresses on the host give unique MACs.
func macFor(kind byte, a netip.Addr) string {
	b := a.As4()
	return net.HardwareAddr{0x06, kind, b[0], b[1], b[2], b[3]}.String()
}

const (
	macKindBridge = 0x00
	macKindSlot   = 0x01
)

func parseMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 {
		return nil, fmt.Errorf("mac %q is not a 6-byte MAC address", s)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("mac %q is multicast", s)
	}
	return mac, nil
}

// addrAt returns the address i positions after the start of p.
func addrAt(p netip.Prefix, i uint32) netip.Addr {
	b := p.Masked().Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += i
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func prefixSize(p netip.Prefix) uint64 { return 1 << (32 - p.Bits()) }

// allocateBridge picks the lowest free guest address in n's subnet. The
// first address is the gateway and the last is the broadcast address.
func allocateBridge(n Network, leases []Lease) (addr netip.Prefix, gw netip.Addr, err error) {
	used := map[netip.Addr]bool{}
	for _, l := range leases {
		if l.Network == n.Name {
			used[l.Address.Addr()] = true
		}
	}
	gw = addrAt(n.Subnet, 1)
	for i := uint64(2); i < prefixSize(n.Subnet)-1; i++ {
		a := addrAt(n.Subnet, uint32(i))
		if !used[a] {
			return netip.PrefixFrom(a, n.Subnet.Bits()), gw, nil
		}
	}
	return netip.Prefix{}, netip.Addr{}, fmt.Errorf("allocate address in %s of network %s: %w", n.Subnet, n.Name, ErrExhausted)
}

// allocateSlot picks the lowest free slot in n's transit range.
func allocateSlot(n Network, leases []Lease) (int, error) {
	used := map[int]bool{}
	for _, l := range leases {
		if l.Network == n.Name && l.Mode == ModeSlot {
			used[l.Slot] = true
		}
	}
	slots := int(prefixSize(n.TransitRange) / 4)
	for i := range slots {
		if !used[i] {
			return i, nil
		}
	}
	return 0, fmt.Errorf("allocate slot in %s of network %s: %w", n.TransitRange, n.Name, ErrExhausted)
}

// slotAddrs returns the host-side prefix and the slot-side address of slot i.
func slotAddrs(n Network, i int) (host netip.Prefix, slot netip.Addr) {
	base := uint32(i) * 4
	return netip.PrefixFrom(addrAt(n.TransitRange, base+1), 30), addrAt(n.TransitRange, base+2)
}

// Addressing returns the guest addressing of l in network n.
func (l Lease) Addressing(n Network) GuestAddressing {
	return GuestAddressing{
		Interface: GuestInterface,
		MAC:       l.MAC,
		Address:   l.Address,
		Gateway:   l.Gateway,
		DNS:       append([]netip.Addr(nil), n.DNS...),
		Hostname:  l.Hostname,
		MTU:       n.WithDefaults().MTU,
	}
}
