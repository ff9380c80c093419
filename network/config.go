package network

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"

	"github.com/embervm/ember/network/nft"
)

// Mode is the way a network connects its VMs to the host.
type Mode string

const (
	// ModeBridge puts every VM's TAP on one bridge with the gateway
	// address. Each VM has its own address in Subnet.
	ModeBridge Mode = "bridge"
	// ModeSlot puts every VM's TAP in its own namespace (a slot) in which
	// the guest has the same address, so clones of one snapshot need no
	// re-addressing. A veth pair joins the slot to the host, and NAT in the
	// slot maps the guest's address to the slot's unique address.
	ModeSlot Mode = "slot"
)

// EgressPolicy is the verdict for a VM's traffic that its allowlist does
// not match.
type EgressPolicy string

const (
	// EgressDenyAll drops everything the allowlist does not match.
	EgressDenyAll EgressPolicy = "deny-all"
	// EgressAllowAll lets a VM reach anything except the host and other
	// VMs, which still need an allowlist rule.
	EgressAllowAll EgressPolicy = "allow-all"
)

// Defaults used where a [Network] field is zero.
var (
	DefaultSubnet       = netip.MustParsePrefix("10.200.0.0/24")
	DefaultGuestSubnet  = netip.MustParsePrefix("172.30.0.0/30")
	DefaultTransitRange = netip.MustParsePrefix("10.201.0.0/16")
)

const (
	DefaultMTU = 1500
	// MaxNameLength keeps derived link names, such as the bridge
	// "embr-"+Name, within the kernel's 15-byte limit.
	MaxNameLength = 9
	// GuestInterface is the guest's network device for the first NIC.
	GuestInterface = "eth0"
)

var namePattern = regexp.MustCompile(`^[a-z0-9]+$`)

// Network is the networking configuration of one workspace. The zero value
// of every field except Name is a documented default.
type Network struct {
	// Name identifies the network in leases and link names: 1 to 9
	// characters from [a-z0-9].
	Name string `json:"name"`
	// Mode "" means ModeBridge.
	Mode Mode `json:"mode,omitempty"`
	// Subnet is the bridge's IPv4 subnet in bridge mode. The first address
	// is the gateway on the bridge; guests get the following ones. Zero
	// means DefaultSubnet. It must be /30 or larger. Unused in slot mode.
	Subnet netip.Prefix `json:"subnet,omitzero"`
	// Bridge is the bridge's name; "" means "embr-" + Name.
	Bridge string `json:"bridge,omitempty"`
	// GuestSubnet is the guest's subnet inside every slot in slot mode:
	// the first address is the gateway on the TAP and the second is the
	// guest. Zero means DefaultGuestSubnet. It must be /30 or larger.
	GuestSubnet netip.Prefix `json:"guest_subnet,omitzero"`
	// TransitRange is split into one /30 per slot in slot mode, for the
	// veth pair: the first address is on the host side, the second is the
	// slot's unique address. Zero means DefaultTransitRange.
	TransitRange netip.Prefix `json:"transit_range,omitzero"`
	// Uplink is the host interface for NAT to the outside. Without one, VMs
	// reach only what their rules allow on the host and in other Ember
	// networks.
	Uplink string `json:"uplink,omitempty"`
	// MTU of TAPs, veths and the bridge; 0 means DefaultMTU.
	MTU int `json:"mtu,omitempty"`
	// DNS servers passed to guests; none by default.
	DNS []netip.Addr `json:"dns,omitempty"`
	// DefaultEgress "" means EgressDenyAll.
	DefaultEgress EgressPolicy `json:"default_egress,omitempty"`
	// Allow applies to every VM in the network, before per-VM rules.
	Allow []nft.Rule `json:"allow,omitempty"`
	// ManageIPForwarding lets Ember set net.ipv4.ip_forward=1 in the host
	// namespace. Without it, a network with an Uplink fails to set up
	// while forwarding is off.
	ManageIPForwarding bool `json:"manage_ip_forwarding,omitempty"`
}

// WithDefaults returns n with every zero field set to its default.
func (n Network) WithDefaults() Network {
	if n.Mode == "" {
		n.Mode = ModeBridge
	}
	if !n.Subnet.IsValid() {
		n.Subnet = DefaultSubnet
	}
	if n.Bridge == "" {
		n.Bridge = "embr-" + n.Name
	}
	if !n.GuestSubnet.IsValid() {
		n.GuestSubnet = DefaultGuestSubnet
	}
	if !n.TransitRange.IsValid() {
		n.TransitRange = DefaultTransitRange
	}
	if n.MTU == 0 {
		n.MTU = DefaultMTU
	}
	if n.DefaultEgress == "" {
		n.DefaultEgress = EgressDenyAll
	}
	return n
}

// Kinds of configuration problems; every [*ConfigError] matches
// ErrInvalidConfig and one of these.
var (
	ErrInvalidConfig  = errors.New("invalid network configuration")
	ErrSubnetOverlap  = errors.New("subnets overlap")
	ErrSubnetTooSmall = errors.New("subnet too small")
)

// ConfigError is one problem in a network's configuration.
type ConfigError struct {
	Network string
	Field   string
	Problem string
	// Kind is ErrSubnetOverlap, ErrSubnetTooSmall, an nft error, or nil.
	Kind error
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("network %q: %s: %s", e.Network, e.Field, e.Problem)
}

func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }

func (e *ConfigError) Unwrap() error { return e.Kind }

// maxSubnetBits is the longest prefix that still has room for a gateway and
// one guest beside the network and broadcast addresses.
const maxSubnetBits = 30

// Validate checks one network with its defaults applied and returns every
// problem joined.
func (n Network) Validate() error {
	d := n.WithDefaults()
	var errs []error
	add := func(field, problem string, kind error) {
		errs = append(errs, &ConfigError{Network: n.Name, Field: field, Problem: problem, Kind: kind})
	}

	if len(n.Name) == 0 || len(n.Name) > MaxNameLength || !namePattern.MatchString(n.Name) {
		add("name", fmt.Sprintf("%q is invalid, must be 1 to %d characters from [a-z0-9]", n.Name, MaxNameLength), nil)
	}
	if d.Mode != ModeBridge && d.Mode != ModeSlot {
		add("mode", fmt.Sprintf("%q is unknown, use %q or %q", n.Mode, ModeBridge, ModeSlot), nil)
	}
	checkPrefix := func(field string, p netip.Prefix) bool {
		switch {
		case !p.Addr().Is4():
			add(field, fmt.Sprintf("%s is not IPv4", p), nil)
		case p.Masked() != p:
			add(field, fmt.Sprintf("%s has host bits set, did you mean %s?", p, p.Masked()), nil)
		case p.Bits() > maxSubnetBits:
			add(field, fmt.Sprintf("%s is too small, must be /%d or larger to hold a gateway and a guest", p, maxSubnetBits), ErrSubnetTooSmall)
		default:
			return true
		}
		return false
	}
	if d.Mode == ModeSlot {
		okGuest := checkPrefix("guest_subnet", d.GuestSubnet)
		okTransit := checkPrefix("transit_range", d.TransitRange)
		if okGuest && okTransit && d.GuestSubnet.Overlaps(d.TransitRange) {
			add("guest_subnet", fmt.Sprintf("%s overlaps transit_range %s", d.GuestSubnet, d.TransitRange), ErrSubnetOverlap)
		}
	} else {
		checkPrefix("subnet", d.Subnet)
	}
	if err := validateIfName(d.Bridge); err != nil && d.Mode == ModeBridge {
		add("bridge", err.Error(), nil)
	}
	if n.Uplink != "" {
		if err := validateIfName(n.Uplink); err != nil {
			add("uplink", err.Error(), nil)
		}
	}
	if d.MTU < 68 || d.MTU > 65535 {
		add("mtu", fmt.Sprintf("%d is invalid, must be 68–65535 (or 0 for %d)", n.MTU, DefaultMTU), nil)
	}
	for i, a := range n.DNS {
		if !a.Is4() {
			add(fmt.Sprintf("dns[%d]", i), fmt.Sprintf("%s is not an IPv4 address", a), nil)
		}
	}
	if d.DefaultEgress != EgressDenyAll && d.DefaultEgress != EgressAllowAll {
		add("default_egress", fmt.Sprintf("%q is unknown, use %q or %q", n.DefaultEgress, EgressDenyAll, EgressAllowAll), nil)
	}
	for i, r := range n.Allow {
		if err := r.Validate(); err != nil {
			add(fmt.Sprintf("allow[%d]", i), err.Error(), err)
		}
	}
	return errors.Join(errs...)
}

// hostRanges returns the ranges that the network occupies in the host
// namespace: the bridge subnet or the transit range.
func (n Network) hostRanges() []netip.Prefix {
	d := n.WithDefaults()
	if d.Mode == ModeSlot {
		return []netip.Prefix{d.TransitRange}
	}
	return []netip.Prefix{d.Subnet}
}

// ValidateNetworks checks each network and the set: unique names and
// bridges, and no overlap between the ranges that live in the host
// namespace. Slot guest subnets may overlap each other, because each slot is
// its own namespace.
func ValidateNetworks(networks []Network) error {
	var errs []error
	names := map[string]bool{}
	bridges := map[string]string{}
	for i, n := range networks {
		if err := n.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		if names[n.Name] {
			errs = append(errs, &ConfigError{Network: n.Name, Field: "name", Problem: "duplicate network name"})
		}
		names[n.Name] = true
		d := n.WithDefaults()
		if d.Mode == ModeBridge {
			if other, ok := bridges[d.Bridge]; ok {
				errs = append(errs, &ConfigError{Network: n.Name, Field: "bridge", Problem: fmt.Sprintf("%q is also used by network %q", d.Bridge, other)})
			}
			bridges[d.Bridge] = n.Name
		}
		for _, m := range networks[:i] {
			for _, a := range d.hostRanges() {
				for _, b := range m.hostRanges() {
					if a.Overlaps(b) {
						errs = append(errs, &ConfigError{Network: n.Name, Field: "subnet",
							Problem: fmt.Sprintf("%s overlaps %s of network %q", a, b, m.Name), Kind: ErrSubnetOverlap})
					}
				}
			}
		}
	}
	return errors.Join(errs...)
}

func validateIfName(name string) error {
	switch {
	case name == "":
		return errors.New("missing interface name")
	case len(name) > 15:
		return fmt.Errorf("%q is %d bytes, an interface name must be at most 15", name, len(name))
	case name == "." || name == ".." || slices.ContainsFunc([]byte(name), func(c byte) bool { return c == '/' || c == ':' || c <= ' ' || c == 0x7f }):
		return fmt.Errorf("%q is not a valid interface name", name)
	}
	return nil
}
