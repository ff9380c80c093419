package nft

import (
	"errors"
	"net/netip"
	"testing"
)

func TestParseRule(t *testing.T) {
	tests := []struct {
		in   string
		want Rule
	}{
		{"10.0.0.0/8", Rule{Dest: netip.MustParsePrefix("10.0.0.0/8")}},
		{"192.0.2.53 udp 53", Rule{Dest: netip.MustParsePrefix("192.0.2.53/32"), Protocol: ProtocolUDP, Port: 53}},
		{"0.0.0.0/0 TCP 443", Rule{Dest: netip.MustParsePrefix("0.0.0.0/0"), Protocol: ProtocolTCP, Port: 443}},
		{"198.51.100.0/24 icmp", Rule{Dest: netip.MustParsePrefix("198.51.100.0/24"), Protocol: ProtocolICMP}},
	}
	for _, tt := range tests {
		got, err := ParseRule(tt.in)
		if err != nil {
			t.Errorf("ParseRule(%q): %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseRule(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func TestParseRuleInvalid(t *testing.T) {
	for _, in := range []string{
		"",
		"10.0.0.0/33",
		"10.0.0.300",
		"example.com",
		"10.0.0.1/8",
		"2001:db8::/32",
		"10.0.0.0/8 sctp",
		"10.0.0.0/8 tcp 0",
		"10.0.0.0/8 tcp 65536",
		"10.0.0.0/8 tcp http",
		"10.0.0.0/8 icmp 8",
		"10.0.0.0/8 tcp 80 extra",
	} {
		if _, err := ParseRule(in); !errors.Is(err, ErrInvalidRule) {
			t.Errorf("ParseRule(%q) error = %v, want ErrInvalidRule", in, err)
		}
	}
}

func TestValidatePortWithoutProtocol(t *testing.T) {
	r := Rule{Dest: netip.MustParsePrefix("10.0.0.0/8"), Port: 80}
	if err := r.Validate(); !errors.Is(err, ErrInvalidRule) {
		t.Errorf("Validate = %v, want ErrInvalidRule", err)
	}
	if err := ValidateRules([]Rule{{Dest: netip.MustParsePrefix("10.0.0.0/8")}, r}); !errors.Is(err, ErrInvalidRule) {
		t.Errorf("ValidateRules = %v, want ErrInvalidRule", err)
	}
	if err := (Rule{}).Validate(); !errors.Is(err, ErrInvalidRule) {
		t.Errorf("zero Rule Validate = %v, want ErrInvalidRule", err)
	}
}

func TestVMPolicyValidate(t *testing.T) {
	good := VMPolicy{VMID: "a", Family: FamilyBridge, Iface: "tap0"}
	if err := good.Validate(); err != nil {
		t.Fatalf("Validate(good) = %v", err)
	}
	bad := []VMPolicy{
		{VMID: "", Family: FamilyBridge, Iface: "tap0"},
		{VMID: "a", Family: "ip6", Iface: "tap0"},
		{VMID: "a", Family: FamilyBridge, Iface: "a-name-longer-than-15"},
		{VMID: "a", Family: FamilyBridge, Iface: "tap0", Allow: []Rule{{Dest: netip.MustParsePrefix("10.0.0.0/8"), Port: 1}}},
		{VMID: "a", Family: FamilyBridge, Iface: "tap0", Protected: []netip.Prefix{netip.MustParsePrefix("fd00::/8")}},
	}
	for i, p := range bad {
		if err := p.Validate(); err == nil {
			t.Errorf("bad policy %d: Validate = nil", i)
		}
	}
}

func FuzzParseRule(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "1.2.3.4 tcp 80", "0.0.0.0/0 udp 53", "x", "10.0.0.0/8 icmp"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidRule) {
				t.Fatalf("ParseRule(%q) error %v does not match ErrInvalidRule", s, err)
			}
			return
		}
		if err := r.Validate(); err != nil {
			t.Fatalf("ParseRule(%q) returned a rule that fails Validate: %v", s, err)
		}
		again, err := ParseRule(r.String())
		if err != nil || again != r {
			t.Fatalf("round trip of %q via %q = %+v, %v", s, r.String(), again, err)
		}
	})
}
