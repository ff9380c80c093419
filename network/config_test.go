package network_test

import (
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/nft"
)

func TestNetworkDefaults(t *testing.T) {
	d := network.Network{Name: "w"}.WithDefaults()
	if d.Mode != network.ModeBridge || d.Subnet != network.DefaultSubnet || d.Bridge != "embr-w" ||
		d.MTU != network.DefaultMTU || d.DefaultEgress != network.EgressDenyAll ||
		d.GuestSubnet != network.DefaultGuestSubnet || d.TransitRange != network.DefaultTransitRange {
		t.Errorf("WithDefaults = %+v", d)
	}
	if err := (network.Network{Name: "w"}).Validate(); err != nil {
		t.Errorf("zero network with a name: %v", err)
	}
}

func TestValidateNetworkProblems(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name  string
		n     network.Network
		kind  error
		field string
	}{
		{"missing name", network.Network{}, nil, "name"},
		{"long name", network.Network{Name: "abcdefghij"}, nil, "name"},
		{"uppercase name", network.Network{Name: "Web"}, nil, "name"},
		{"unknown mode", network.Network{Name: "a", Mode: "vlan"}, nil, "mode"},
		{"subnet too small", network.Network{Name: "a", Subnet: p("10.0.0.0/31")}, network.ErrSubnetTooSmall, "subnet"},
		{"host bits", network.Network{Name: "a", Subnet: p("10.0.0.1/24")}, nil, "subnet"},
		{"ipv6 subnet", network.Network{Name: "a", Subnet: p("fd00::/64")}, nil, "subnet"},
		{"guest subnet too small", network.Network{Name: "a", Mode: network.ModeSlot, GuestSubnet: p("172.30.0.0/31")}, network.ErrSubnetTooSmall, "guest_subnet"},
		{"transit too small", network.Network{Name: "a", Mode: network.ModeSlot, TransitRange: p("10.9.0.0/32")}, network.ErrSubnetTooSmall, "transit_range"},
		{"guest overlaps transit", network.Network{Name: "a", Mode: network.ModeSlot, GuestSubnet: p("10.201.0.0/30")}, network.ErrSubnetOverlap, "guest_subnet"},
		{"long uplink", network.Network{Name: "a", Uplink: "an-uplink-name-too-long"}, nil, "uplink"},
		{"bad uplink", network.Network{Name: "a", Uplink: "eth 0"}, nil, "uplink"},
		{"mtu", network.Network{Name: "a", MTU: 20}, nil, "mtu"},
		{"ipv6 dns", network.Network{Name: "a", DNS: []netip.Addr{netip.MustParseAddr("::1")}}, nil, "dns[0]"},
		{"egress", network.Network{Name: "a", DefaultEgress: "maybe"}, nil, "default_egress"},
		{"rule port without protocol", network.Network{Name: "a", Allow: []nft.Rule{{Dest: p("10.0.0.0/8"), Port: 53}}}, nft.ErrInvalidRule, "allow[0]"},
		{"rule invalid cidr", network.Network{Name: "a", Allow: []nft.Rule{{Dest: p("10.0.0.1/8")}}}, nft.ErrInvalidRule, "allow[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.n.Validate()
			if !errors.Is(err, network.ErrInvalidConfig) {
				t.Fatalf("Validate = %v, want ErrInvalidConfig", err)
			}
			if tt.kind != nil && !errors.Is(err, tt.kind) {
				t.Errorf("Validate = %v, want %v", err, tt.kind)
			}
			var ce *network.ConfigError
			if !errors.As(err, &ce) || ce.Field != tt.field {
				t.Errorf("Validate = %v, want a problem with field %s", err, tt.field)
			}
		})
	}
}

func TestValidateNetworksSet(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name string
		nets []network.Network
		want error
	}{
		{"overlapping bridge subnets", []network.Network{{Name: "a", Subnet: p("10.0.0.0/16")}, {Name: "b", Subnet: p("10.0.200.0/24")}}, network.ErrSubnetOverlap},
		{"bridge overlaps transit", []network.Network{{Name: "a", Subnet: p("10.201.3.0/24")}, {Name: "b", Mode: network.ModeSlot}}, network.ErrSubnetOverlap},
		{"two defaults overlap", []network.Network{{Name: "a"}, {Name: "b"}}, network.ErrSubnetOverlap},
		{"duplicate name", []network.Network{{Name: "a"}, {Name: "a", Subnet: p("10.9.0.0/24")}}, network.ErrInvalidConfig},
		{"duplicate bridge", []network.Network{{Name: "a", Bridge: "br0"}, {Name: "b", Bridge: "br0", Subnet: p("10.9.0.0/24")}}, network.ErrInvalidConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := network.ValidateNetworks(tt.nets); !errors.Is(err, tt.want) {
				t.Errorf("ValidateNetworks = %v, want %v", err, tt.want)
			}
		})
	}
	// Slot guest subnets live in their own namespaces and may repeat.
	ok := []network.Network{
		{Name: "a", Mode: network.ModeSlot, TransitRange: p("10.1.0.0/24")},
		{Name: "b", Mode: network.ModeSlot, TransitRange: p("10.2.0.0/24")},
		{Name: "c", Subnet: p("10.3.0.0/24")},
	}
	if err := network.ValidateNetworks(ok); err != nil {
		t.Errorf("ValidateNetworks(valid set) = %v", err)
	}
}

func FuzzValidateNetwork(f *testing.F) {
	f.Add("a", "bridge", "10.0.0.0/24", "up0", 1500, "10.0.0.0/8 tcp 80")
	f.Add("s1", "slot", "172.30.0.0/30", "", 0, "0.0.0.0/0")
	f.Fuzz(func(t *testing.T, name, mode, subnet, uplink string, mtu int, rule string) {
		n := network.Network{Name: name, Mode: network.Mode(mode), Uplink: uplink, MTU: mtu}
		if p, err := netip.ParsePrefix(subnet); err == nil {
			n.Subnet, n.GuestSubnet = p, p
		}
		if r, err := nft.ParseRule(rule); err == nil {
			n.Allow = []nft.Rule{r}
		}
		err := n.Validate()
		if err != nil && !errors.Is(err, network.ErrInvalidConfig) {
			t.Fatalf("Validate error %v does not match ErrInvalidConfig", err)
		}
		if err == nil {
			d := n.WithDefaults()
			if len(d.Bridge) > 15 || (d.Mode != network.ModeBridge && d.Mode != network.ModeSlot) || d.Subnet.Bits() > 30 {
				t.Fatalf("Validate accepted %+v", d)
			}
			if err := network.ValidateNetworks([]network.Network{n}); err != nil {
				t.Fatalf("ValidateNetworks rejects a valid single network: %v", err)
			}
		}
	})
}

func TestKernelArgRoundTrip(t *testing.T) {
	a := network.GuestAddressing{
		Interface: "eth0", MAC: "06:00:0a:32:00:02",
		Address: netip.MustParsePrefix("10.50.0.2/24"), Gateway: netip.MustParseAddr("10.50.0.1"),
		DNS:      []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("8.8.8.8"), netip.MustParseAddr("9.9.9.9")},
		Hostname: "web-1",
	}
	if err := a.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	arg := a.KernelArg()
	if want := "ip=10.50.0.2::10.50.0.1:255.255.255.0:web-1:eth0:off:1.1.1.1:8.8.8.8"; arg != want {
		t.Errorf("KernelArg = %q, want %q", arg, want)
	}
	got, err := network.ParseKernelArg(arg)
	if err != nil {
		t.Fatalf("ParseKernelArg: %v", err)
	}
	if got.Address != a.Address || got.Gateway != a.Gateway || got.Hostname != a.Hostname || len(got.DNS) != 2 {
		t.Errorf("round trip = %+v", got)
	}
}

func TestParseKernelArgInvalid(t *testing.T) {
	for _, s := range []string{
		"", "ip=dhcp", "ip=10.0.0.2::10.0.0.1:255.255.255.0:h:eth0:dhcp",
		"ip=10.0.0.2:10.0.0.9:10.0.0.1:255.255.255.0:h:eth0:off",
		"ip=10.0.0.2::10.0.0.1:255.0.255.0:h:eth0:off",
		"ip=10.0.0.2::10.0.0.1:255.255.255.0:h::off",
		"ip=10.0.0.2::10.0.0.1:255.255.255.0:h:eth0:off:nope",
		"ip=fd00::2::10.0.0.1:255.255.255.0:h:eth0:off",
	} {
		if _, err := network.ParseKernelArg(s); err == nil {
			t.Errorf("ParseKernelArg(%q) = nil error", s)
		}
	}
}

func TestGuestAddressingValidate(t *testing.T) {
	good := network.GuestAddressing{Interface: "eth0", MAC: "06:00:00:00:00:01",
		Address: netip.MustParsePrefix("10.0.0.2/24"), Gateway: netip.MustParseAddr("10.0.0.1")}
	bad := []func(*network.GuestAddressing){
		func(a *network.GuestAddressing) { a.MAC = "01:00:00:00:00:01" },
		func(a *network.GuestAddressing) { a.MAC = "zz" },
		func(a *network.GuestAddressing) { a.Gateway = netip.MustParseAddr("10.9.0.1") },
		func(a *network.GuestAddressing) { a.Interface = "" },
		func(a *network.GuestAddressing) { a.Hostname = "a:b" },
	}
	for i, mutate := range bad {
		a := good
		mutate(&a)
		if err := a.Validate(); err == nil {
			t.Errorf("bad addressing %d: Validate = nil", i)
		}
	}
}

func FuzzParseKernelArg(f *testing.F) {
	f.Add("ip=10.50.0.2::10.50.0.1:255.255.255.0:web-1:eth0:off:1.1.1.1")
	f.Add("ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off")
	f.Fuzz(func(t *testing.T, s string) {
		a, err := network.ParseKernelArg(s)
		if err != nil {
			return
		}
		again, err := network.ParseKernelArg(a.KernelArg())
		if err != nil {
			t.Fatalf("KernelArg of a parsed value does not parse: %q: %v", a.KernelArg(), err)
		}
		if again.Address != a.Address || again.Gateway != a.Gateway || again.Hostname != a.Hostname || again.Interface != a.Interface {
			t.Fatalf("round trip of %q changed it: %+v vs %+v", s, a, again)
		}
	})
}

func TestStorePersistsAndChecksSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := network.OpenStore(path)
	if err != nil {
		t.Fatal(err)
	}
	l := network.Lease{VMID: "a", Network: "br", Mode: network.ModeBridge, TAP: "emt-a",
		Address: netip.MustParsePrefix("10.0.0.2/24"), Allow: []nft.Rule{{Dest: netip.MustParsePrefix("10.1.0.0/16"), Protocol: nft.ProtocolTCP, Port: 443}}}
	if err := s.Update(func([]network.Lease) ([]network.Lease, []string, error) { return []network.Lease{l}, nil, nil }); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("abort")
	if err := s.Update(func([]network.Lease) ([]network.Lease, []string, error) {
		return []network.Lease{{VMID: "b"}}, []string{"a"}, boom
	}); !errors.Is(err, boom) {
		t.Fatalf("Update = %v, want the fn's error", err)
	}
	s.Close()

	s, err = network.OpenStore(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Get("a")
	if err != nil || got.TAP != "emt-a" || got.Address != l.Address || len(got.Allow) != 1 || got.Allow[0] != l.Allow[0] {
		t.Errorf("Get after reopen = %+v, %v", got, err)
	}
	if _, err := s.Get("b"); !errors.Is(err, network.ErrLeaseNotFound) {
		t.Errorf("an aborted Update was applied: %v", err)
	}
	s.Close()

	// A database written by a newer version is refused.
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte("meta")).Put([]byte("schema"), []byte("2")) })
	db.Close()
	if _, err := network.OpenStore(path); !errors.Is(err, network.ErrSchemaVersion) || !strings.Contains(err.Error(), "2") {
		t.Errorf("OpenStore of schema 2 = %v, want ErrSchemaVersion", err)
	}
}
