package nft

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// ErrInvalidRule matches every error about a malformed egress rule.
var ErrInvalidRule = errors.New("invalid egress rule")

// Protocol is a transport protocol an egress rule can match.
type Protocol string

const (
	// ProtocolAny matches every protocol; a rule with it cannot name a port.
	ProtocolAny  Protocol = ""
	ProtocolTCP  Protocol = "tcp"
	ProtocolUDP  Protocol = "udp"
	ProtocolICMP Protocol = "icmp"
)

// protocolNumbers are the IANA protocol numbers that meta l4proto compares.
var protocolNumbers = map[Protocol]byte{ProtocolTCP: 6, ProtocolUDP: 17, ProtocolICMP: 1}

// Rule allows a guest to send IPv4 traffic to Dest, optionally only with
// Protocol and, for TCP and UDP, only to destination Port.
type Rule struct {
	// Dest is an IPv4 network in canonical form (host bits zero); a /32 is
	// one address.
	Dest     netip.Prefix `json:"dest"`
	Protocol Protocol     `json:"protocol,omitempty"`
	// Port is the destination port; 0 means every port.
	Port uint16 `json:"port,omitempty"`
}

// ParseRule parses the text form of a rule: a destination, then an optional
// protocol, then an optional port, separated by spaces:
//
//	10.0.0.0/8
//	192.0.2.53 udp 53
//	0.0.0.0/0 tcp 443
//
// A bare address means a /32.
func ParseRule(s string) (Rule, error) {
	fields := strings.Fields(s)
	if len(fields) == 0 || len(fields) > 3 {
		return Rule{}, fmt.Errorf("%w %q: want \"DEST [PROTOCOL [PORT]]\"", ErrInvalidRule, s)
	}

	var r Rule
	dest := fields[0]
	if !strings.Contains(dest, "/") {
		dest += "/32"
	}
	p, err := netip.ParsePrefix(dest)
	if err != nil {
		return Rule{}, fmt.Errorf("%w %q: destination %q is not an IPv4 address or CIDR", ErrInvalidRule, s, fields[0])
	}
	r.Dest = p
	if len(fields) > 1 {
		r.Protocol = Protocol(strings.ToLower(fields[1]))
	}
	if len(fields) > 2 {
		port, err := strconv.ParseUint(fields[2], 10, 16)
		if err != nil {
			return Rule{}, fmt.Errorf("%w %q: port %q is not a number from 1 to 65535", ErrInvalidRule, s, fields[2])
		}
		r.Port = uint16(port)
		if r.Port == 0 {
			return Rule{}, fmt.Errorf("%w %q: port 0 is invalid, leave the port out to allow every port", ErrInvalidRule, s)
		}
	}
	if err := r.Validate(); err != nil {
		return Rule{}, err
	}
	return r, nil
}

// Validate checks that r can be installed.
func (r Rule) Validate() error {
	switch {
	case !r.Dest.IsValid():
		return fmt.Errorf("%w: missing destination", ErrInvalidRule)
	case !r.Dest.Addr().Is4():
		return fmt.Errorf("%w %q: destination must be IPv4 (IPv6 guest traffic is always dropped)", ErrInvalidRule, r.String())
	case r.Dest.Masked() != r.Dest:
		return fmt.Errorf("%w %q: destination has host bits set, did you mean %s?", ErrInvalidRule, r.String(), r.Dest.Masked())
	}
	if _, ok := protocolNumbers[r.Protocol]; !ok && r.Protocol != ProtocolAny {
		return fmt.Errorf("%w %q: protocol %q is unknown, use tcp, udp or icmp", ErrInvalidRule, r.String(), string(r.Protocol))
	}
	if r.Port != 0 && r.Protocol != ProtocolTCP && r.Protocol != ProtocolUDP {
		return fmt.Errorf("%w %q: a port needs protocol tcp or udp", ErrInvalidRule, r.String())
	}
	return nil
}

// String returns the text form that ParseRule reads.
func (r Rule) String() string {
	s := r.Dest.String()
	if r.Protocol != ProtocolAny {
		s += " " + string(r.Protocol)
	}
	if r.Port != 0 {
		s += " " + strconv.Itoa(int(r.Port))
	}
	return s
}

// ValidateRules checks every rule and returns the problems joined.
func ValidateRules(rules []Rule) error {
	var errs []error
	for i, r := range rules {
		if err := r.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("rule %d: %w", i, err))
		}
	}
	return errors.Join(errs...)
}
