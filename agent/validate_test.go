package agent

import (
	"strings"
	"testing"
)

func TestValidateEnvKey(t *testing.T) {
	tests := []struct {
		key string
		ok  bool
	}{
		{"PATH", true}, {"_x1", true}, {"a", true},
		{"", false}, {"1A", false}, {"A-B", false}, {"A=B", false}, {"A B", false}, {"Ä", false},
		{strings.Repeat("A", 256), false},
	}
	for _, tt := range tests {
		if err := ValidateEnvKey(tt.key); (err == nil) != tt.ok {
			t.Errorf("ValidateEnvKey(%q) = %v, want ok=%v", tt.key, err, tt.ok)
		}
	}
}

func TestValidateGuestPath(t *testing.T) {
	tests := []struct {
		path string
		ok   bool
	}{
		{"/etc/hosts", true}, {"/a/b..c", true}, {"/a/./b", true},
		{"", false}, {"etc/hosts", false}, {"/../etc/passwd", false}, {"/a/../../b", false}, {"/a/..", false}, {"/a\x00b", false},
	}
	for _, tt := range tests {
		if err := ValidateGuestPath(tt.path); (err == nil) != tt.ok {
			t.Errorf("ValidateGuestPath(%q) = %v, want ok=%v", tt.path, err, tt.ok)
		}
	}
}

func TestValidateSecretName(t *testing.T) {
	for _, name := range []string{"db-password", "api.key", "A_1"} {
		if err := ValidateSecretName(name); err != nil {
			t.Errorf("ValidateSecretName(%q) = %v", name, err)
		}
	}
	for _, name := range []string{"", ".", "..", "a/b", "../x", "a b", strings.Repeat("x", 256)} {
		if err := ValidateSecretName(name); err == nil {
			t.Errorf("ValidateSecretName(%q) = nil, want an error", name)
		}
	}
}

func TestValidateHostname(t *testing.T) {
	for _, name := range []string{"web-1", "a.b.c", "X"} {
		if err := ValidateHostname(name); err != nil {
			t.Errorf("ValidateHostname(%q) = %v", name, err)
		}
	}
	for _, name := range []string{"", "-a", "a-", "a..b", "a_b", "a b", strings.Repeat("x", 65)} {
		if err := ValidateHostname(name); err == nil {
			t.Errorf("ValidateHostname(%q) = nil, want an error", name)
		}
	}
}

func TestNetworkConfigValidate(t *testing.T) {
	good := NetworkConfig{
		Interfaces: []InterfaceConfig{{
			MAC:       "06:00:ac:10:00:02",
			Addresses: []string{"172.16.0.2/24", "fd00::2/64"},
			Routes:    []Route{{Destination: "default", Gateway: "172.16.0.1"}, {Destination: "default", Gateway: "fd00::1"}, {Destination: "10.1.0.0/16"}},
			MTU:       1500,
		}},
		DNS: &DNSConfig{Nameservers: []string{"172.16.0.1"}, Search: []string{"example.internal"}},
	}
	if err := good.Validate(); err != nil {
		t.Fatalf("Validate(good) = %v", err)
	}
	bad := []struct {
		name string
		cfg  NetworkConfig
		want string
	}{
		{"bad mac", NetworkConfig{Interfaces: []InterfaceConfig{{MAC: "zz"}}}, "invalid mac"},
		{"duplicate mac", NetworkConfig{Interfaces: []InterfaceConfig{{MAC: "06:00:00:00:00:01"}, {MAC: "06:00:00:00:00:01"}}}, "duplicate mac"},
		{"bad address", NetworkConfig{Interfaces: []InterfaceConfig{{MAC: "06:00:00:00:00:01", Addresses: []string{"10.0.0.1"}}}}, "addresses[0]"},
		{"family mismatch", NetworkConfig{Interfaces: []InterfaceConfig{{MAC: "06:00:00:00:00:01", Routes: []Route{{Destination: "10.0.0.0/8", Gateway: "fd00::1"}}}}}, "address family"},
		{"bad mtu", NetworkConfig{Interfaces: []InterfaceConfig{{MAC: "06:00:00:00:00:01", MTU: 70000}}}, "mtu"},
		{"bad nameserver", NetworkConfig{DNS: &DNSConfig{Nameservers: []string{"dns.google"}}}, "nameservers[0]"},
		{"bad search", NetworkConfig{DNS: &DNSConfig{Search: []string{"a b"}}}, "search[0]"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func FuzzValidateGuestPath(f *testing.F) {
	for _, s := range []string{"/etc/hosts", "/../x", "a", "/a/../b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if ValidateGuestPath(p) != nil {
			return
		}
		for _, elem := range strings.Split(p, "/") {
			if elem == ".." {
				t.Fatalf("accepted %q with a '..' element", p)
			}
		}
		if !strings.HasPrefix(p, "/") || strings.ContainsRune(p, 0) {
			t.Fatalf("accepted %q", p)
		}
	})
}

func FuzzValidateNames(f *testing.F) {
	for _, s := range []string{"PATH", "db-pass", "web-1.example", "../x", "a=b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidateEnvKey(s) == nil && strings.ContainsAny(s, "=\x00 ") {
			t.Fatalf("env key %q accepted", s)
		}
		if ValidateSecretName(s) == nil && (strings.ContainsAny(s, "/\x00") || s == ".." || s == ".") {
			t.Fatalf("secret name %q accepted", s)
		}
		if ValidateHostname(s) == nil && (len(s) > 64 || strings.ContainsAny(s, " /_")) {
			t.Fatalf("hostname %q accepted", s)
		}
	})
}

func FuzzNetworkConfigValidate(f *testing.F) {
	f.Add("06:00:00:00:00:01", "10.0.0.2/24", "default", "10.0.0.1", "10.0.0.1")
	f.Add("zz", "x", "fd00::/8", "10.0.0.1", "")
	f.Fuzz(func(t *testing.T, mac, addr, dst, gw, ns string) {
		cfg := NetworkConfig{
			Interfaces: []InterfaceConfig{{MAC: mac, Addresses: []string{addr}, Routes: []Route{{Destination: dst, Gateway: gw}}}},
			DNS:        &DNSConfig{Nameservers: []string{ns}},
		}
		if cfg.Validate() != nil {
			return
		}
		// A valid route must resolve to a prefix of the gateway's family.
		p, err := cfg.Interfaces[0].Routes[0].Prefix()
		if err != nil || !p.IsValid() {
			t.Fatalf("valid config has route prefix %v, %v", p, err)
		}
	})
}
