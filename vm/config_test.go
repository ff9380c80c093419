package vm

import (
	"errors"
	"reflect"
	"slices"
	"testing"
)

func TestResolveUnsetFieldsTakeDefaults(t *testing.T) {
	d := Defaults{
		Kernel:          "/k",
		Initrd:          "/i",
		Rootfs:          "/r",
		RootfsReadOnly:  true,
		VCPUCount:       4,
		MemSizeMiB:      512,
		BootArgs:        "console=ttyS0",
		RootfsRateLimit: &RateLimiter{Ops: &TokenBucket{Size: 100, RefillTime: 1000}},
		TrackDirtyPages: ptr(false),
	}
	got, err := Resolve("vm-1", d, Spec{})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		ID: "vm-1", Kernel: "/k", Initrd: "/i", Rootfs: "/r", RootfsReadOnly: true,
		VCPUCount: 4, MemSizeMiB: 512, BootArgs: "console=ttyS0",
		RootfsRateLimit: &RateLimiter{Ops: &TokenBucket{Size: 100, RefillTime: 1000}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Resolve = %+v\nwant %+v", got, want)
	}
	if got.RootfsRateLimit == d.RootfsRateLimit {
		t.Fatal("resolved rate limiter aliases the defaults")
	}
}

func TestResolveZeroAndFalseOverrides(t *testing.T) {
	d := Defaults{Kernel: "/k", Initrd: "/i", Rootfs: "/r", RootfsReadOnly: true, BootArgs: "quiet", TrackDirtyPages: ptr(true)}
	s := Spec{
		Initrd:          ptr(""),
		Rootfs:          ptr(""),
		RootfsReadOnly:  ptr(false),
		BootArgs:        ptr(""),
		TrackDirtyPages: ptr(false),
	}
	got, err := Resolve("vm-1", d, s)
	if err != nil {
		t.Fatal(err)
	}
	if got.Initrd != "" || got.Rootfs != "" || got.RootfsReadOnly || got.BootArgs != "" || got.TrackDirtyPages {
		t.Fatalf("explicit empty/false overrides were not applied: %+v", got)
	}
	if len(got.Drives()) != 0 {
		t.Fatalf("Drives() = %v, want none without a rootfs", got.Drives())
	}
}

func TestResolveBuiltInDefaults(t *testing.T) {
	got, err := Resolve("vm-1", Defaults{Kernel: "/k"}, Spec{})
	if err != nil {
		t.Fatal(err)
	}
	if got.VCPUCount != DefaultVCPUCount || got.MemSizeMiB != DefaultMemSizeMiB || got.BootArgs != DefaultBootArgs {
		t.Errorf("built-in defaults not applied: %+v", got)
	}
	if !got.TrackDirtyPages {
		t.Error("dirty-page tracking is off although neither defaults nor spec set it")
	}
}

func TestResolveSpecOverrides(t *testing.T) {
	d := Defaults{Kernel: "/k", Rootfs: "/r", VCPUCount: 1, MemSizeMiB: 128,
		RootfsRateLimit: &RateLimiter{Ops: &TokenBucket{Size: 1, RefillTime: 1}}}
	limiter := &RateLimiter{Bandwidth: &TokenBucket{Size: 1 << 20, RefillTime: 100}}
	s := Spec{
		Kernel: ptr("/k2"), VCPUCount: ptr(2), MemSizeMiB: ptr(1024), BootArgs: ptr("x=1"),
		RootfsRateLimit:   limiter,
		NetworkInterfaces: []NetworkInterface{{IfaceID: "eth0", HostDevName: "tap0"}},
		ExtraDrives:       []Drive{{ID: "data", PathOnHost: "/d", IsReadOnly: true}},
		Vsock:             &Vsock{GuestCID: 7, UDSPath: "/v.sock"},
	}
	got, err := Resolve("vm-1", d, s)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kernel != "/k2" || got.VCPUCount != 2 || got.MemSizeMiB != 1024 || got.BootArgs != "x=1" {
		t.Errorf("scalar overrides not applied: %+v", got)
	}
	if !reflect.DeepEqual(got.RootfsRateLimit, limiter) {
		t.Errorf("rate limiter = %+v, want the spec's", got.RootfsRateLimit)
	}
	drives := got.Drives()
	if len(drives) != 2 || drives[0].ID != RootDriveID || drives[0].PathOnHost != "/r" || drives[1].ID != "data" {
		t.Errorf("Drives() = %+v, want rootfs then data", drives)
	}
	s.ExtraDrives[0].PathOnHost = "/changed"
	if got.ExtraDrives[0].PathOnHost != "/d" {
		t.Error("resolved config aliases the spec's drives")
	}
}

func TestResolveRestoreIgnoresColdBootFields(t *testing.T) {
	d := Defaults{Kernel: "/k", Rootfs: "/r", VCPUCount: 2, MemSizeMiB: 512}
	ref := &SnapshotRef{VMID: "src", SnapshotID: "base",
		NetworkOverrides: []NetworkOverride{{IfaceID: "eth0", HostDevName: "tap9"}}}
	s := Spec{
		Kernel: ptr("/other"), BootArgs: ptr("x"), RestoreFrom: ref,
		ExtraDrives: []Drive{{ID: "data", PathOnHost: "/d"}},
		MemSizeMiB:  ptr(1024),
	}
	got, err := Resolve("clone", d, s)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{ID: "clone", RestoreFrom: ref, MemSizeMiB: 1024, TrackDirtyPages: true}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Resolve = %+v\nwant %+v", got, want)
	}
}

func TestResolveReportsEveryProblem(t *testing.T) {
	s := Spec{
		VCPUCount:  ptr(0),
		MemSizeMiB: ptr(-1),
		ExtraDrives: []Drive{
			{ID: "data", PathOnHost: "/a"},
			{ID: "data", PathOnHost: "b"},
		},
		NetworkInterfaces: []NetworkInterface{{IfaceID: "eth0", HostDevName: "tap-too-long-name", GuestMAC: "zz"}},
	}
	_, err := Resolve("bad id", Defaults{Kernel: "/k"}, s)
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValidationError", err)
	}
	var fields []string
	for _, p := range ve.Problems {
		fields = append(fields, p.Field)
	}
	want := []string{
		"id", "vcpu_count", "mem_size_mib",
		"network_interfaces[0].host_dev_name", "network_interfaces[0].guest_mac",
		"extra_drives[1].drive_id", "extra_drives[1].path_on_host",
	}
	if !slices.Equal(fields, want) {
		t.Fatalf("fields = %v\nwant %v", fields, want)
	}
}

func TestResolveDefaultsProblems(t *testing.T) {
	_, err := Resolve("vm-1", Defaults{VCPUCount: 64}, Spec{})
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValidationError", err)
	}
	want := []FieldError{
		{"kernel", "missing: set a kernel in the workspace defaults or in the spec"},
		{"vcpu_count", "64 is invalid, must be 1–32"},
	}
	if !slices.Equal(ve.Problems, want) {
		t.Fatalf("problems = %v, want %v", ve.Problems, want)
	}
}

func TestSpecCloneIsDeep(t *testing.T) {
	s := Spec{
		VCPUCount:         ptr(2),
		RootfsRateLimit:   &RateLimiter{Ops: &TokenBucket{Size: 1}},
		NetworkInterfaces: []NetworkInterface{{IfaceID: "eth0", RxRateLimiter: &RateLimiter{}}},
		RestoreFrom:       &SnapshotRef{NetworkOverrides: []NetworkOverride{{IfaceID: "a"}}},
	}
	c := s.Clone()
	*c.VCPUCount = 3
	c.RootfsRateLimit.Ops.Size = 9
	c.NetworkInterfaces[0].IfaceID = "eth1"
	c.RestoreFrom.NetworkOverrides[0].IfaceID = "b"
	if *s.VCPUCount != 2 || s.RootfsRateLimit.Ops.Size != 1 || s.NetworkInterfaces[0].IfaceID != "eth0" ||
		s.RestoreFrom.NetworkOverrides[0].IfaceID != "a" {
		t.Fatalf("mutating the clone changed the original: %+v", s)
	}
}

func TestResolveNetNS(t *testing.T) {
	got, err := Resolve("vm-1", Defaults{Kernel: "/k"}, Spec{NetNS: ptr("/run/netns/slot-1")})
	if err != nil || got.NetNS != "/run/netns/slot-1" {
		t.Fatalf("netns = %q, err %v", got.NetNS, err)
	}
	restore, err := Resolve("vm-2", Defaults{}, Spec{NetNS: ptr("/run/netns/slot-2"), RestoreFrom: &SnapshotRef{VMID: "a", SnapshotID: "b"}})
	if err != nil || restore.NetNS != "/run/netns/slot-2" {
		t.Fatalf("restore netns = %q, err %v", restore.NetNS, err)
	}
	_, err = Resolve("vm-3", Defaults{Kernel: "/k"}, Spec{NetNS: ptr("slot")})
	var ve *ValidationError
	if !errors.As(err, &ve) || ve.Problems[0] != (FieldError{"netns", `"slot" is not an absolute path`}) {
		t.Fatalf("relative netns: err = %v", err)
	}
}
