package vm

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
)

// Limits enforced by validation. Each one is a limit of Firecracker, its
// jailer or the Linux kernel, so a spec that passes here is not rejected
// later for size.
const (
	// MaxIDLength is the longest VM, drive or interface id: the jailer
	// accepts ids of at most 64 characters from [A-Za-z0-9-].
	MaxIDLength = 64
	// MinVCPUCount and MaxVCPUCount bound the vCPU count; Firecracker
	// accepts 1 to 32.
	MinVCPUCount = 1
	MaxVCPUCount = 32
	// MaxMemSizeMiB is an upper bound that catches unit mistakes (a size in
	// bytes or KiB passed as MiB): 1 TiB.
	MaxMemSizeMiB = 1 << 20
	// MaxTAPNameLength is IFNAMSIZ (16) minus the terminating NUL.
	MaxTAPNameLength = 15
	// MaxUnixSocketPath is the size of sockaddr_un.sun_path (108) minus the
	// terminating NUL.
	MaxUnixSocketPath = 107
	// MaxBootArgsLength is the x86 kernel's COMMAND_LINE_SIZE (2048) minus
	// the terminating NUL.
	MaxBootArgsLength = 2047
	// MinMTU is the smallest IPv4 MTU (RFC 791); MaxMTU the largest value
	// the 16-bit length field allows.
	MinMTU = 68
	MaxMTU = 65535
	// MinGuestCID is the first context id a guest may use; 0 to 2 are
	// reserved for the hypervisor, local loopback and the host.
	MinGuestCID = 3
)

var (
	idPattern         = regexp.MustCompile(`^[A-Za-z0-9-]+$`)
	snapshotIDPattern = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
	macPattern        = regexp.MustCompile(`^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$`)
)

// ValidateID checks a VM id: 1 to 64 characters from [A-Za-z0-9-].
func ValidateID(id string) error {
	var errs problems
	validateID(&errs, "id", id)
	return errs.err()
}

// ValidateSnapshotID checks a snapshot id: 1 to 64 characters from
// [A-Za-z0-9._-], no path separator, not starting with a dot and without "..".
func ValidateSnapshotID(id string) error {
	var errs problems
	validateSnapshotID(&errs, "snapshot_id", id)
	return errs.err()
}

// ValidateSpec checks every field that s sets, on its own and against the
// other fields of s, and returns all problems in one [*ValidationError].
// Fields that s leaves unset are not checked; [Resolve] checks the merged
// result.
func ValidateSpec(s *Spec) error {
	var errs problems
	validateSpec(&errs, s)
	return errs.err()
}

// Validate checks a resolved configuration and returns all problems in one
// [*ValidationError].
func (c *Config) Validate() error {
	var errs problems
	validateID(&errs, "id", c.ID)
	if c.NetNS != "" {
		validatePath(&errs, "netns", c.NetNS)
	}
	if c.RestoreFrom != nil {
		validateSnapshotRef(&errs, "restore_from", c.RestoreFrom)
		if c.VCPUCount != 0 {
			validateVCPUCount(&errs, c.VCPUCount)
		}
		if c.MemSizeMiB != 0 {
			validateMemSize(&errs, c.MemSizeMiB)
		}
		return errs.err()
	}

	if c.Kernel == "" {
		errs.add("kernel", "missing: set a kernel in the workspace defaults or in the spec")
	} else {
		validatePath(&errs, "kernel", c.Kernel)
	}
	if c.Initrd != "" {
		validatePath(&errs, "initrd", c.Initrd)
	}
	if c.Rootfs != "" {
		validatePath(&errs, "rootfs", c.Rootfs)
	}
	validateVCPUCount(&errs, c.VCPUCount)
	validateMemSize(&errs, c.MemSizeMiB)
	validateBootArgs(&errs, c.BootArgs)
	validateRateLimiter(&errs, "rootfs_rate_limit", c.RootfsRateLimit)
	validateDevices(&errs, c.NetworkInterfaces, c.ExtraDrives, c.Vsock)
	return errs.err()
}

func validateSpec(errs *problems, s *Spec) {
	if s.Kernel != nil {
		validatePath(errs, "kernel", *s.Kernel)
	}
	if s.Initrd != nil && *s.Initrd != "" {
		validatePath(errs, "initrd", *s.Initrd)
	}
	if s.Rootfs != nil && *s.Rootfs != "" {
		validatePath(errs, "rootfs", *s.Rootfs)
	}
	if s.VCPUCount != nil {
		validateVCPUCount(errs, *s.VCPUCount)
	}
	if s.MemSizeMiB != nil {
		validateMemSize(errs, *s.MemSizeMiB)
	}
	if s.BootArgs != nil {
		validateBootArgs(errs, *s.BootArgs)
	}
	validateRateLimiter(errs, "rootfs_rate_limit", s.RootfsRateLimit)
	validateDevices(errs, s.NetworkInterfaces, s.ExtraDrives, s.Vsock)
	if s.NetNS != nil && *s.NetNS != "" {
		validatePath(errs, "netns", *s.NetNS)
	}
	if s.RestoreFrom != nil {
		validateSnapshotRef(errs, "restore_from", s.RestoreFrom)
	}
}

func validateDevices(errs *problems, nics []NetworkInterface, drives []Drive, vsock *Vsock) {
	ifaceIDs := map[string]int{}
	taps := map[string]int{}
	macs := map[string]int{}
	for i, n := range nics {
		p := fmt.Sprintf("network_interfaces[%d]", i)
		validateID(errs, p+".iface_id", n.IfaceID)
		checkDuplicate(errs, ifaceIDs, p+".iface_id", n.IfaceID, i)
		validateTAPName(errs, p+".host_dev_name", n.HostDevName)
		checkDuplicate(errs, taps, p+".host_dev_name", n.HostDevName, i)
		if n.GuestMAC != "" {
			validateMAC(errs, p+".guest_mac", n.GuestMAC)
			checkDuplicate(errs, macs, p+".guest_mac", strings.ToLower(n.GuestMAC), i)
		}
		validateRateLimiter(errs, p+".rx_rate_limiter", n.RxRateLimiter)
		validateRateLimiter(errs, p+".tx_rate_limiter", n.TxRateLimiter)
		if n.MTU != 0 && (n.MTU < MinMTU || n.MTU > MaxMTU) {
			errs.add(p+".mtu", fmt.Sprintf("%d is invalid, must be %d–%d (or 0 for the default)", n.MTU, MinMTU, MaxMTU))
		}
	}

	driveIDs := map[string]int{}
	for i, d := range drives {
		p := fmt.Sprintf("extra_drives[%d]", i)
		validateID(errs, p+".drive_id", d.ID)
		if d.ID == RootDriveID {
			errs.add(p+".drive_id", fmt.Sprintf("%q is reserved for the root filesystem", RootDriveID))
		}
		checkDuplicate(errs, driveIDs, p+".drive_id", d.ID, i)
		validatePath(errs, p+".path_on_host", d.PathOnHost)
		validateRateLimiter(errs, p+".rate_limiter", d.RateLimiter)
	}

	if vsock != nil {
		if vsock.GuestCID < MinGuestCID || vsock.GuestCID == 0xFFFFFFFF {
			errs.add("vsock.guest_cid", fmt.Sprintf("%d is invalid, must be %d or more (and not 4294967295)", vsock.GuestCID, MinGuestCID))
		}
		validateSocketPath(errs, "vsock.uds_path", vsock.UDSPath)
	}
}

func validateSnapshotRef(errs *problems, p string, r *SnapshotRef) {
	validateID(errs, p+".vm_id", r.VMID)
	validateSnapshotID(errs, p+".snapshot_id", r.SnapshotID)
	seen := map[string]int{}
	taps := map[string]int{}
	for i, o := range r.NetworkOverrides {
		op := fmt.Sprintf("%s.network_overrides[%d]", p, i)
		validateID(errs, op+".iface_id", o.IfaceID)
		checkDuplicate(errs, seen, op+".iface_id", o.IfaceID, i)
		validateTAPName(errs, op+".host_dev_name", o.HostDevName)
		checkDuplicate(errs, taps, op+".host_dev_name", o.HostDevName, i)
	}
	if r.VsockOverride != nil {
		validateSocketPath(errs, p+".vsock_override.uds_path", r.VsockOverride.UDSPath)
	}
}

func validateID(errs *problems, p, id string) {
	switch {
	case id == "":
		errs.add(p, "missing")
	case len(id) > MaxIDLength:
		errs.add(p, fmt.Sprintf("%q is %d characters, must be at most %d", id, len(id), MaxIDLength))
	case !idPattern.MatchString(id):
		errs.add(p, fmt.Sprintf("%q is invalid, must contain only letters, digits and '-'", id))
	}
}

func validateSnapshotID(errs *problems, p, id string) {
	switch {
	case id == "":
		errs.add(p, "missing")
	case strings.ContainsAny(id, `/\`):
		errs.add(p, fmt.Sprintf("%q contains a path separator", id))
	case strings.Contains(id, ".."):
		errs.add(p, fmt.Sprintf("%q contains \"..\"", id))
	case strings.HasPrefix(id, "."):
		errs.add(p, fmt.Sprintf("%q starts with '.'", id))
	case len(id) > MaxIDLength:
		errs.add(p, fmt.Sprintf("%q is %d characters, must be at most %d", id, len(id), MaxIDLength))
	case !snapshotIDPattern.MatchString(id):
		errs.add(p, fmt.Sprintf("%q is invalid, must contain only letters, digits, '.', '_' and '-'", id))
	}
}

func validateVCPUCount(errs *problems, n int) {
	if n < MinVCPUCount || n > MaxVCPUCount {
		errs.add("vcpu_count", fmt.Sprintf("%d is invalid, must be %d–%d", n, MinVCPUCount, MaxVCPUCount))
	}
}

func validateMemSize(errs *problems, n int) {
	if n < 1 || n > MaxMemSizeMiB {
		errs.add("mem_size_mib", fmt.Sprintf("%d is invalid, must be 1–%d", n, MaxMemSizeMiB))
	}
}

func validateBootArgs(errs *problems, s string) {
	if len(s) > MaxBootArgsLength {
		errs.add("boot_args", fmt.Sprintf("%d bytes, must be at most %d", len(s), MaxBootArgsLength))
	}
	if strings.ContainsRune(s, 0) || strings.ContainsAny(s, "\n\r") {
		errs.add("boot_args", "contains a NUL or line break")
	}
}

func validatePath(errs *problems, p, path string) {
	switch {
	case path == "":
		errs.add(p, "missing")
	case strings.ContainsRune(path, 0):
		errs.add(p, "contains a NUL byte")
	case !filepath.IsAbs(path):
		errs.add(p, fmt.Sprintf("%q is not an absolute path", path))
	}
}

func validateSocketPath(errs *problems, p, path string) {
	validatePath(errs, p, path)
	if len(path) > MaxUnixSocketPath {
		errs.add(p, fmt.Sprintf("%d bytes, a Unix socket path must be at most %d", len(path), MaxUnixSocketPath))
	}
}

func validateTAPName(errs *problems, p, name string) {
	switch {
	case name == "":
		errs.add(p, "missing")
	case len(name) > MaxTAPNameLength:
		errs.add(p, fmt.Sprintf("%q is %d bytes, must be at most %d", name, len(name), MaxTAPNameLength))
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n\x00"):
		errs.add(p, fmt.Sprintf("%q is not a valid interface name", name))
	}
}

func validateMAC(errs *problems, p, mac string) {
	if !macPattern.MatchString(mac) {
		errs.add(p, fmt.Sprintf("%q is invalid, must be six colon-separated hex pairs such as 06:00:ac:10:00:02", mac))
		return
	}
	var first byte
	fmt.Sscanf(mac[:2], "%02x", &first)
	if first&1 == 1 {
		errs.add(p, fmt.Sprintf("%q is a multicast address, must be unicast (clear the low bit of the first octet)", mac))
	}
	if strings.Trim(mac, "0:") == "" {
		errs.add(p, fmt.Sprintf("%q is the all-zero address", mac))
	}
}

func validateRateLimiter(errs *problems, p string, r *RateLimiter) {
	if r == nil {
		return
	}
	validateTokenBucket(errs, p+".bandwidth", r.Bandwidth)
	validateTokenBucket(errs, p+".ops", r.Ops)
}

func validateTokenBucket(errs *problems, p string, b *TokenBucket) {
	if b == nil {
		return
	}
	for _, f := range []struct {
		name  string
		value int64
	}{{"size", b.Size}, {"one_time_burst", b.OneTimeBurst}, {"refill_time", b.RefillTime}} {
		if f.value < 0 {
			errs.add(p+"."+f.name, fmt.Sprintf("%d is invalid, must be 0 or more", f.value))
		}
	}
}

// checkDuplicate records value at index i and reports a duplicate of an
// earlier index. Empty values are reported elsewhere as missing.
func checkDuplicate(errs *problems, seen map[string]int, p, value string, i int) {
	if value == "" {
		return
	}
	if _, ok := seen[value]; ok {
		errs.add(p, fmt.Sprintf("duplicate %q", value))
		return
	}
	seen[value] = i
}

// problems collects field problems in the order they are found.
type problems struct {
	list []FieldError
}

func (p *problems) add(field, problem string) {
	p.list = append(p.list, FieldError{Field: field, Problem: problem})
}

func (p *problems) err() error {
	if len(p.list) == 0 {
		return nil
	}
	return &ValidationError{Problems: p.list}
}

// Validate checks the fields that d sets; zero values are valid because
// they select the built-in defaults.
func (d *Defaults) Validate() error {
	var errs problems
	for _, f := range []struct{ name, path string }{{"kernel", d.Kernel}, {"initrd", d.Initrd}, {"rootfs", d.Rootfs}} {
		if f.path != "" {
			validatePath(&errs, f.name, f.path)
		}
	}
	if d.VCPUCount != 0 {
		validateVCPUCount(&errs, d.VCPUCount)
	}
	if d.MemSizeMiB != 0 {
		validateMemSize(&errs, d.MemSizeMiB)
	}
	validateBootArgs(&errs, d.BootArgs)
	validateRateLimiter(&errs, "rootfs_rate_limit", d.RootfsRateLimit)
	return errs.err()
}
