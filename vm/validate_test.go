package vm

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func ptr[T any](v T) *T { return &v }

// validConfig is a cold-boot configuration that passes validation; each
// case below breaks one rule.
func validConfig() Config {
	return Config{
		ID:         "web-1",
		Kernel:     "/var/lib/ember/vmlinux",
		Rootfs:     "/var/lib/ember/rootfs.ext4",
		VCPUCount:  2,
		MemSizeMiB: 256,
		BootArgs:   DefaultBootArgs,
		NetworkInterfaces: []NetworkInterface{
			{IfaceID: "eth0", HostDevName: "tap0", GuestMAC: "06:00:ac:10:00:02"},
		},
		ExtraDrives: []Drive{{ID: "data", PathOnHost: "/srv/data.img"}},
		Vsock:       &Vsock{GuestCID: 3, UDSPath: "/run/ember/web-1/v.sock"},
	}
}

func TestConfigValidateRules(t *testing.T) {
	long := strings.Repeat("a", 65)
	cases := []struct {
		name    string
		mutate  func(*Config)
		field   string
		problem string
	}{
		{"id missing", func(c *Config) { c.ID = "" }, "id", "missing"},
		{"id charset", func(c *Config) { c.ID = "web_1" }, "id", `"web_1" is invalid, must contain only letters, digits and '-'`},
		{"id too long", func(c *Config) { c.ID = long }, "id", `"` + long + `" is 65 characters, must be at most 64`},
		{"kernel missing", func(c *Config) { c.Kernel = "" }, "kernel", "missing: set a kernel in the workspace defaults or in the spec"},
		{"kernel relative", func(c *Config) { c.Kernel = "vmlinux" }, "kernel", `"vmlinux" is not an absolute path`},
		{"rootfs NUL", func(c *Config) { c.Rootfs = "/a\x00b" }, "rootfs", "contains a NUL byte"},
		{"initrd relative", func(c *Config) { c.Initrd = "initrd.img" }, "initrd", `"initrd.img" is not an absolute path`},
		{"vcpus zero", func(c *Config) { c.VCPUCount = 0 }, "vcpu_count", "0 is invalid, must be 1–32"},
		{"vcpus too many", func(c *Config) { c.VCPUCount = 33 }, "vcpu_count", "33 is invalid, must be 1–32"},
		{"memory zero", func(c *Config) { c.MemSizeMiB = 0 }, "mem_size_mib", "0 is invalid, must be 1–1048576"},
		{"memory huge", func(c *Config) { c.MemSizeMiB = 1<<20 + 1 }, "mem_size_mib", "1048577 is invalid, must be 1–1048576"},
		{"boot args too long", func(c *Config) { c.BootArgs = strings.Repeat("x", 2048) }, "boot_args", "2048 bytes, must be at most 2047"},
		{"boot args newline", func(c *Config) { c.BootArgs = "console=ttyS0\ninit=/x" }, "boot_args", "contains a NUL or line break"},
		{"rate limiter negative", func(c *Config) {
			c.RootfsRateLimit = &RateLimiter{Ops: &TokenBucket{Size: -1, RefillTime: 100}}
		}, "rootfs_rate_limit.ops.size", "-1 is invalid, must be 0 or more"},
		{"iface id missing", func(c *Config) { c.NetworkInterfaces[0].IfaceID = "" }, "network_interfaces[0].iface_id", "missing"},
		{"tap too long", func(c *Config) { c.NetworkInterfaces[0].HostDevName = "tap-0123456789ab" },
			"network_interfaces[0].host_dev_name", `"tap-0123456789ab" is 16 bytes, must be at most 15`},
		{"tap with slash", func(c *Config) { c.NetworkInterfaces[0].HostDevName = "tap/0" },
			"network_interfaces[0].host_dev_name", `"tap/0" is not a valid interface name`},
		{"tap missing", func(c *Config) { c.NetworkInterfaces[0].HostDevName = "" }, "network_interfaces[0].host_dev_name", "missing"},
		{"mac format", func(c *Config) { c.NetworkInterfaces[0].GuestMAC = "06-00-ac-10-00-02" },
			"network_interfaces[0].guest_mac", `"06-00-ac-10-00-02" is invalid, must be six colon-separated hex pairs such as 06:00:ac:10:00:02`},
		{"mac short", func(c *Config) { c.NetworkInterfaces[0].GuestMAC = "06:00:ac:10:00" },
			"network_interfaces[0].guest_mac", `"06:00:ac:10:00" is invalid, must be six colon-separated hex pairs such as 06:00:ac:10:00:02`},
		{"mac multicast", func(c *Config) { c.NetworkInterfaces[0].GuestMAC = "01:00:5e:00:00:01" },
			"network_interfaces[0].guest_mac", `"01:00:5e:00:00:01" is a multicast address, must be unicast (clear the low bit of the first octet)`},
		{"mac zero", func(c *Config) { c.NetworkInterfaces[0].GuestMAC = "00:00:00:00:00:00" },
			"network_interfaces[0].guest_mac", `"00:00:00:00:00:00" is the all-zero address`},
		{"mtu small", func(c *Config) { c.NetworkInterfaces[0].MTU = 67 },
			"network_interfaces[0].mtu", "67 is invalid, must be 68–65535 (or 0 for the default)"},
		{"duplicate iface", func(c *Config) {
			c.NetworkInterfaces = append(c.NetworkInterfaces, NetworkInterface{IfaceID: "eth0", HostDevName: "tap1"})
		}, "network_interfaces[1].iface_id", `duplicate "eth0"`},
		{"duplicate tap", func(c *Config) {
			c.NetworkInterfaces = append(c.NetworkInterfaces, NetworkInterface{IfaceID: "eth1", HostDevName: "tap0"})
		}, "network_interfaces[1].host_dev_name", `duplicate "tap0"`},
		{"duplicate mac ignores case", func(c *Config) {
			c.NetworkInterfaces = append(c.NetworkInterfaces, NetworkInterface{IfaceID: "eth1", HostDevName: "tap1", GuestMAC: "06:00:AC:10:00:02"})
		}, "network_interfaces[1].guest_mac", `duplicate "06:00:ac:10:00:02"`},
		{"tx limiter negative", func(c *Config) {
			c.NetworkInterfaces[0].TxRateLimiter = &RateLimiter{Bandwidth: &TokenBucket{Size: 1, RefillTime: -5}}
		}, "network_interfaces[0].tx_rate_limiter.bandwidth.refill_time", "-5 is invalid, must be 0 or more"},
		{"duplicate drive", func(c *Config) {
			c.ExtraDrives = append(c.ExtraDrives, Drive{ID: "data", PathOnHost: "/srv/other.img"})
		}, "extra_drives[1].drive_id", `duplicate "data"`},
		{"reserved drive id", func(c *Config) { c.ExtraDrives[0].ID = "rootfs" },
			"extra_drives[0].drive_id", `"rootfs" is reserved for the root filesystem`},
		{"drive path missing", func(c *Config) { c.ExtraDrives[0].PathOnHost = "" }, "extra_drives[0].path_on_host", "missing"},
		{"drive burst negative", func(c *Config) {
			c.ExtraDrives[0].RateLimiter = &RateLimiter{Bandwidth: &TokenBucket{Size: 1, OneTimeBurst: -1, RefillTime: 1}}
		}, "extra_drives[0].rate_limiter.bandwidth.one_time_burst", "-1 is invalid, must be 0 or more"},
		{"cid reserved", func(c *Config) { c.Vsock.GuestCID = 2 }, "vsock.guest_cid", "2 is invalid, must be 3 or more (and not 4294967295)"},
		{"cid any", func(c *Config) { c.Vsock.GuestCID = 0xFFFFFFFF }, "vsock.guest_cid", "4294967295 is invalid, must be 3 or more (and not 4294967295)"},
		{"socket path too long", func(c *Config) { c.Vsock.UDSPath = "/" + strings.Repeat("s", 107) },
			"vsock.uds_path", "108 bytes, a Unix socket path must be at most 107"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.mutate(&c)
			err := c.Validate()
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("err = %v, want *ValidationError", err)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("errors.Is(err, ErrInvalid) = false")
			}
			want := FieldError{Field: tc.field, Problem: tc.problem}
			if !slices.Contains(ve.Problems, want) {
				t.Fatalf("problems = %v, want to contain %v", ve.Problems, want)
			}
			if len(ve.Problems) != 1 {
				t.Errorf("one broken rule gave %d problems: %v", len(ve.Problems), ve.Problems)
			}
		})
	}
}

func TestConfigValidateAcceptsValid(t *testing.T) {
	c := validConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	c.Rootfs, c.NetworkInterfaces, c.ExtraDrives, c.Vsock = "", nil, nil, nil
	if err := c.Validate(); err != nil {
		t.Fatalf("minimal config: %v", err)
	}
}

func TestSnapshotIDRules(t *testing.T) {
	cases := []struct {
		id      string
		problem string
	}{
		{"", "missing"},
		{"a/b", `"a/b" contains a path separator`},
		{`a\b`, `"a\\b" contains a path separator`},
		{"..", `".." contains ".."`},
		{"a..b", `"a..b" contains ".."`},
		{".hidden", `".hidden" starts with '.'`},
		{"has space", `"has space" is invalid, must contain only letters, digits, '.', '_' and '-'`},
		{strings.Repeat("s", 65), `"` + strings.Repeat("s", 65) + `" is 65 characters, must be at most 64`},
	}
	for _, tc := range cases {
		err := ValidateSnapshotID(tc.id)
		var ve *ValidationError
		if !errors.As(err, &ve) || len(ve.Problems) != 1 {
			t.Errorf("ValidateSnapshotID(%q) = %v, want one problem", tc.id, err)
			continue
		}
		if got := ve.Problems[0]; got.Field != "snapshot_id" || got.Problem != tc.problem {
			t.Errorf("ValidateSnapshotID(%q) = %v, want snapshot_id: %s", tc.id, got, tc.problem)
		}
	}
	for _, ok := range []string{"base", "snap-2026.12.04_1", "a.b"} {
		if err := ValidateSnapshotID(ok); err != nil {
			t.Errorf("ValidateSnapshotID(%q) = %v, want nil", ok, err)
		}
	}
}

func TestRestoreConfigRules(t *testing.T) {
	c := Config{
		ID: "clone",
		RestoreFrom: &SnapshotRef{
			VMID:       "src",
			SnapshotID: "../etc",
			NetworkOverrides: []NetworkOverride{
				{IfaceID: "eth0", HostDevName: "tap-clone-0000000"},
				{IfaceID: "eth0", HostDevName: "tap2"},
			},
			VsockOverride: &VsockOverride{UDSPath: "relative.sock"},
		},
	}
	err := c.Validate()
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValidationError", err)
	}
	want := []FieldError{
		{"restore_from.snapshot_id", `"../etc" contains a path separator`},
		{"restore_from.network_overrides[0].host_dev_name", `"tap-clone-0000000" is 17 bytes, must be at most 15`},
		{"restore_from.network_overrides[1].iface_id", `duplicate "eth0"`},
		{"restore_from.vsock_override.uds_path", `"relative.sock" is not an absolute path`},
	}
	if !slices.Equal(ve.Problems, want) {
		t.Fatalf("problems:\n got %v\nwant %v", ve.Problems, want)
	}
}

func TestValidationErrorMessage(t *testing.T) {
	one := &ValidationError{Problems: []FieldError{{"vcpu_count", "0 is invalid, must be 1–32"}}}
	if got, want := one.Error(), "invalid configuration: vcpu_count: 0 is invalid, must be 1–32"; got != want {
		t.Errorf("one problem: %q, want %q", got, want)
	}
	two := &ValidationError{Problems: []FieldError{{"a", "x"}, {"b", "y"}}}
	if got, want := two.Error(), "invalid configuration, 2 problems:\n  a: x\n  b: y"; got != want {
		t.Errorf("two problems: %q, want %q", got, want)
	}
}
