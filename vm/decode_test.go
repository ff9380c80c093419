package vm

import (
	"errors"
	"strings"
	"testing"
)

func TestDecodeSpecYAMLAndJSON(t *testing.T) {
	yamlSpec := `
kernel: /k
vcpu_count: 2
rootfs_read_only: false
network_interfaces:
  - iface_id: eth0
    host_dev_name: tap0
    guest_mac: "06:00:00:00:00:01"
    rx_rate_limiter:
      bandwidth: {size: 1000, refill_time: 100}
extra_drives: []
track_dirty_pages: false
`
	jsonSpec := `{"kernel":"/k","vcpu_count":2,"rootfs_read_only":false,
"network_interfaces":[{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01",
"rx_rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}],"extra_drives":[],"track_dirty_pages":false}`
	for name, doc := range map[string]string{"yaml": yamlSpec, "json": jsonSpec} {
		s, err := DecodeSpec([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if s.RootfsReadOnly == nil || *s.RootfsReadOnly || s.TrackDirtyPages == nil || *s.TrackDirtyPages {
			t.Errorf("%s: explicit false fields were lost: %+v", name, s)
		}
		if s.ExtraDrives == nil || len(s.ExtraDrives) != 0 {
			t.Errorf("%s: explicit empty extra_drives = %#v, want a non-nil empty slice", name, s.ExtraDrives)
		}
		if s.MemSizeMiB != nil {
			t.Errorf("%s: unset mem_size_mib decoded as %d", name, *s.MemSizeMiB)
		}
		if got := s.NetworkInterfaces[0].RxRateLimiter.Bandwidth.Size; got != 1000 {
			t.Errorf("%s: rx bandwidth size = %d", name, got)
		}
	}
}

func TestDecodeSpecRejects(t *testing.T) {
	cases := []struct {
		name, doc, want string
	}{
		{"unknown field", `{"vcpus": 2}`, `vcpus: unknown field, did you mean "vcpu_count"?`},
		{"nested unknown field", `{"vsock": {"cid": 3}}`, `vsock.cid: unknown field, did you mean "guest_cid"?`},
		{"wrong type", `{"vcpu_count": "two"}`, "vcpu_count: got a string, want an integer"},
		{"nested wrong type", `{"network_interfaces": [{"mtu": "big"}]}`, "network_interfaces[0].mtu: got a string, want an integer"},
		{"negative unsigned", `{"vsock": {"guest_cid": -1}}`, "vsock.guest_cid: got number -1, want an integer of 0 or more"},
		{"unsigned too large", `{"vsock": {"guest_cid": 4294967296}}`, "vsock.guest_cid: got number 4294967296, want an integer from 0 to 4294967295"},
		{"fraction", `{"mem_size_mib": 1.5}`, "mem_size_mib: got number 1.5, want an integer"},
		{"not a mapping", "- 1\n", "decode spec: got an array, want a mapping of fields"},
		{"trailing data", `{"vcpu_count": 1} {"vcpu_count": 2}`, "unexpected data after the spec"},
		{"bad yaml", "kernel: [", "decode spec"},
	}
	for _, tc := range cases {
		_, err := DecodeSpec([]byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want it to contain %q", tc.name, err, tc.want)
		}
	}
}

// checkProblems fails the test unless ve lists exactly want, in order.
func checkProblems(t *testing.T, ve *ValidationError, want []FieldError) {
	t.Helper()
	if len(ve.Problems) != len(want) {
		t.Fatalf("problems = %v, want %v", ve.Problems, want)
	}
	for i := range want {
		if ve.Problems[i] != want[i] {
			t.Errorf("problem %d = %v, want %v", i, ve.Problems[i], want[i])
		}
	}
}

func TestDecodeSpecListsEveryKindOfProblem(t *testing.T) {
	doc := `
vcpuz: 1
rootfs_read_only: 3
vcpu_count: 99
vsock: {guest_cid: -1, uds_path: /v.sock}
`
	_, err := DecodeSpec([]byte(doc))
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValidationError", err)
	}
	// The mistyped guest_cid is not reported again as out of range.
	want := []FieldError{
		{"rootfs_read_only", "got number 3, want true or false"},
		{"vcpuz", `unknown field, did you mean "vcpu_count"?`},
		{"vsock.guest_cid", "got number -1, want an integer of 0 or more"},
		{"vcpu_count", "99 is invalid, must be 1–32"},
	}
	checkProblems(t, ve, want)
}

func TestDecodeSpecListsUnknownFields(t *testing.T) {
	doc := `
kernal: /k
VCPU_COUNT: 2
memory: 128
network_interfaces:
  - {iface_id: eth0, host_dev_name: tap0, guest_mac: "06:00:00:00:00:01"}
  - {iface_id: eth1, host_dev_name: tap1, mac: "06:00:00:00:00:02", rx_rate_limiter: {bandwith: {size: 1}}}
restore_from: {vm_id: a, snapshot_id: b, network_overrides: [{iface_id: eth0, tap: tap2}]}
"": 1
"a.b": 2
`
	_, err := ParseSpec([]byte(doc))
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValidationError", err)
	}
	want := []FieldError{
		{`""`, "unknown field"},
		{`"a.b"`, "unknown field"},
		{"kernal", `unknown field, did you mean "kernel"?`},
		{"memory", "unknown field"},
		{"network_interfaces[1].mac", `unknown field, did you mean "guest_mac"?`},
		{"network_interfaces[1].rx_rate_limiter.bandwith", `unknown field, did you mean "bandwidth"?`},
		{"restore_from.network_overrides[0].tap", "unknown field"},
	}
	checkProblems(t, ve, want)
}

func TestEditDistance(t *testing.T) {
	cases := []struct {
		a, b string
		want int
	}{
		{"", "", 0},
		{"", "abc", 3},
		{"kernel", "kernel", 0},
		{"kernal", "kernel", 1},
		{"bandwith", "bandwidth", 1},
		{"mtu", "mut", 2},
		{"vcpus", "vcpu_count", 6},
	}
	for _, tc := range cases {
		if got := editDistance(tc.a, tc.b); got != tc.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := editDistance(tc.b, tc.a); got != tc.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tc.b, tc.a, got, tc.want)
		}
	}
}

func TestDecodeSpecFiveMistakes(t *testing.T) {
	doc := `
vcpu_count: 0
mem_size_mib: 64
extra_drives:
  - {drive_id: data, path_on_host: /a}
  - {drive_id: data, path_on_host: /b}
network_interfaces:
  - {iface_id: eth0, host_dev_name: this-name-is-too-long, guest_mac: "01:00:00:00:00:01"}
vsock: {guest_cid: 2, uds_path: /run/v.sock}
`
	_, err := DecodeSpec([]byte(doc))
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValidationError", err)
	}
	if len(ve.Problems) != 5 {
		t.Fatalf("%d problems, want 5: %v", len(ve.Problems), ve.Problems)
	}
}

func TestSpecResolvePaths(t *testing.T) {
	s, err := ParseSpec([]byte(`{"kernel":"vmlinux","rootfs":"/abs/root.ext4","initrd":"","extra_drives":[{"drive_id":"d","path_on_host":"data/d.img"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	s.ResolvePaths("/specs")
	if *s.Kernel != "/specs/vmlinux" || *s.Rootfs != "/abs/root.ext4" || *s.Initrd != "" || s.ExtraDrives[0].PathOnHost != "/specs/data/d.img" {
		t.Fatalf("ResolvePaths gave kernel %q rootfs %q initrd %q drive %q", *s.Kernel, *s.Rootfs, *s.Initrd, s.ExtraDrives[0].PathOnHost)
	}
}

// FuzzDecodeSpec checks that decoding and validating arbitrary input never
// panics, that an accepted spec resolves without panicking, and that a
// validation failure always names at least one field.
func FuzzDecodeSpec(f *testing.F) {
	for _, seed := range []string{
		`{}`,
		`{"kernel":"/k","vcpu_count":2,"mem_size_mib":128}`,
		`{"network_interfaces":[{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01","mtu":1500}]}`,
		`{"extra_drives":[{"drive_id":"data","path_on_host":"/d","rate_limiter":{"ops":{"size":10,"refill_time":100}}}]}`,
		`{"restore_from":{"vm_id":"a","snapshot_id":"b","network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],"vsock_override":{"uds_path":"/v"}}}`,
		"vsock:\n  guest_cid: 3\n  uds_path: /v.sock\n",
		`{"vcpu_count":0,"extra_drives":[{"drive_id":"rootfs"}]}`,
		`{"vcpus":1,"network_interfaces":[{"mac":"x","rx_rate_limiter":{"bandwith":{}}}],"restore_from":{"network_overrides":[{"tap":"t"}]}}`,
		`{"KERNEL":"/k","ẞẞ":1}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := DecodeSpec(data)
		var ve *ValidationError
		if errors.As(err, &ve) {
			if len(ve.Problems) == 0 {
				t.Fatal("validation error without problems")
			}
			for _, p := range ve.Problems {
				if p.Field == "" || p.Problem == "" {
					t.Fatalf("incomplete problem %+v", p)
				}
			}
			return
		}
		if err != nil {
			return
		}
		cfg, err := Resolve("fuzz", Defaults{Kernel: "/k"}, s)
		if err == nil {
			if verr := cfg.Validate(); verr != nil {
				t.Fatalf("Resolve accepted a config that Validate rejects: %v", verr)
			}
		}
	})
}

func TestDecodeSpecRejectsYAMLExtras(t *testing.T) {
	for name, doc := range map[string]string{
		"two documents":  "vcpu_count: 1\n---\nvcpu_count: 2\n",
		"duplicate keys": "vcpu_count: 1\nvcpu_count: 2\n",
	} {
		if _, err := DecodeSpec([]byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := DecodeSpec([]byte("---\nvcpu_count: 1\n")); err != nil {
		t.Errorf("leading document marker: %v", err)
	}
}
