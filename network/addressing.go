package network

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// MaxHostnameLength is the longest hostname the kernel's ip= parser keeps
// (__NEW_UTS_LEN).
const MaxHostnameLength = 64

// GuestAddressing is the configuration of a guest's interface. A guest gets
// it at cold boot from the kernel's ip= argument ([GuestAddressing.KernelArg]).
// After a restore or a handoff, the pool passes these fields to the guest
// agent's network-configure call.
type GuestAddressing struct {
	// Interface is the guest's device name, such as "eth0".
	Interface string `json:"interface"`
	// MAC is the guest device's address, six colon-separated hex pairs. The
	// guest agent finds the interface to configure by it.
	MAC string `json:"mac"`
	// Address is the guest's address with the subnet's prefix length.
	Address  netip.Prefix `json:"address"`
	Gateway  netip.Addr   `json:"gateway"`
	DNS      []netip.Addr `json:"dns,omitempty"`
	Hostname string       `json:"hostname,omitempty"`
	MTU      int          `json:"mtu,omitempty"`
}

// KernelArg returns the kernel command-line argument that configures the
// interface at boot, in the form the kernel's IP autoconfiguration reads:
//
//	ip=<client>::<gateway>:<netmask>:<hostname>:<device>:off[:<dns0>[:<dns1>]]
//
// The kernel takes at most two DNS servers; later ones are left out. The
// guest kernel needs CONFIG_IP_PNP, and the MAC and MTU are set by the VMM,
// not by this argument.
func (a GuestAddressing) KernelArg() string {
	mask := netip.AddrFrom4(prefixMask(a.Address.Bits()))
	fields := []string{
		a.Address.Addr().String(), "", a.Gateway.String(), mask.String(),
		a.Hostname, a.Interface, "off",
	}
	for i, d := range a.DNS {
		if i == 2 {
			break
		}
		fields = append(fields, d.String())
	}
	return "ip=" + strings.Join(fields, ":")
}

// ParseKernelArg reads the ip= argument that KernelArg writes. Fields
// KernelArg does not write (server address, autoconf other than "off") are
// rejected.
func ParseKernelArg(s string) (GuestAddressing, error) {
	var a GuestAddressing
	rest, ok := strings.CutPrefix(s, "ip=")
	if !ok {
		return a, errors.New("parse ip= argument: missing \"ip=\" prefix")
	}
	f := strings.Split(rest, ":")
	if len(f) < 7 || len(f) > 9 {
		return a, fmt.Errorf("parse ip= argument %q: %d fields, want 7 to 9", s, len(f))
	}

	addr, err := netip.ParseAddr(f[0])
	if err != nil || !addr.Is4() {
		return a, fmt.Errorf("parse ip= argument %q: client address %q is not IPv4", s, f[0])
	}
	if f[1] != "" {
		return a, fmt.Errorf("parse ip= argument %q: server address is not supported", s)
	}
	gw, err := netip.ParseAddr(f[2])
	if err != nil || !gw.Is4() {
		return a, fmt.Errorf("parse ip= argument %q: gateway %q is not IPv4", s, f[2])
	}

	mask, err := netip.ParseAddr(f[3])
	if err != nil || !mask.Is4() {
		return a, fmt.Errorf("parse ip= argument %q: netmask %q is not IPv4", s, f[3])
	}
	bits, ok := maskBits(mask.As4())
	if !ok {
		return a, fmt.Errorf("parse ip= argument %q: netmask %s is not contiguous", s, mask)
	}

	if len(f[4]) > MaxHostnameLength {
		return a, fmt.Errorf("parse ip= argument %q: hostname longer than %d bytes", s, MaxHostnameLength)
	}
	if err := validateIfName(f[5]); err != nil {
		return a, fmt.Errorf("parse ip= argument %q: device: %w", s, err)
	}
	if f[6] != "off" {
		return a, fmt.Errorf("parse ip= argument %q: autoconf %q is not supported, want \"off\"", s, f[6])
	}

	for _, d := range f[7:] {
		dns, err := netip.ParseAddr(d)
		if err != nil || !dns.Is4() {
			return a, fmt.Errorf("parse ip= argument %q: DNS server %q is not IPv4", s, d)
		}
		a.DNS = append(a.DNS, dns)
	}
	a.Address = netip.PrefixFrom(addr, bits)
	a.Gateway = gw
	a.Hostname = f[4]
	a.Interface = f[5]
	return a, nil
}

// Validate checks that a describes a usable configuration.
func (a GuestAddressing) Validate() error {
	var errs []error
	if err := validateIfName(a.Interface); err != nil {
		errs = append(errs, fmt.Errorf("interface: %w", err))
	}
	if _, err := parseMAC(a.MAC); err != nil {
		errs = append(errs, err)
	}
	if !a.Address.IsValid() || !a.Address.Addr().Is4() {
		errs = append(errs, fmt.Errorf("address %s is not an IPv4 prefix", a.Address))
	} else if !a.Address.Contains(a.Gateway) {
		errs = append(errs, fmt.Errorf("gateway %s is outside %s", a.Gateway, a.Address.Masked()))
	}
	if len(a.Hostname) > MaxHostnameLength || strings.ContainsAny(a.Hostname, ": \t\n\x00") {
		errs = append(errs, fmt.Errorf("hostname %q is invalid", a.Hostname))
	}
	return errors.Join(errs...)
}

func prefixMask(bits int) [4]byte {
	var m uint32
	if bits > 0 {
		m = ^uint32(0) << (32 - bits)
	}
	return [4]byte{byte(m >> 24), byte(m >> 16), byte(m >> 8), byte(m)}
}

func maskBits(m [4]byte) (int, bool) {
	v := uint32(m[0])<<24 | uint32(m[1])<<16 | uint32(m[2])<<8 | uint32(m[3])
	bits := 0
	for v&(1<<31) != 0 {
		bits++
		v <<= 1
	}
	return bits, v == 0
}
