package vm

// Spec is the per-VM override of the workspace [Defaults]. Every field is
// optional. A nil pointer or a nil slice means "unset, use the default"; a
// pointer to false or 0, or an empty non-nil slice, is an explicit override.
//
// The JSON (and YAML) field names are the ones Firecracker's API uses, so a
// Firecracker user can read a spec without a dictionary.
type Spec struct {
	// Kernel is the host path of an uncompressed ELF vmlinux.
	Kernel *string `json:"kernel,omitempty"`
	// Initrd is the host path of an initramfs; an empty string removes the
	// workspace's default initramfs.
	Initrd *string `json:"initrd,omitempty"`
	// Rootfs is the host path of the root filesystem image. An empty string
	// boots without a root drive.
	Rootfs         *string `json:"rootfs,omitempty"`
	RootfsReadOnly *bool   `json:"rootfs_read_only,omitempty"`
	VCPUCount      *int    `json:"vcpu_count,omitempty"`
	MemSizeMiB     *int    `json:"mem_size_mib,omitempty"`
	// BootArgs replaces the whole default kernel command line.
	BootArgs        *string      `json:"boot_args,omitempty"`
	RootfsRateLimit *RateLimiter `json:"rootfs_rate_limit,omitempty"`
	// NetworkInterfaces, ExtraDrives and Vsock are per-VM devices with no
	// workspace default: unset means none.
	NetworkInterfaces []NetworkInterface `json:"network_interfaces,omitzero"`
	ExtraDrives       []Drive            `json:"extra_drives,omitzero"`
	Vsock             *Vsock             `json:"vsock,omitempty"`
	RestoreFrom       *SnapshotRef       `json:"restore_from,omitempty"`
	// TrackDirtyPages enables KVM dirty-page logging, which diff snapshots
	// need. See [Defaults.TrackDirtyPages] for its cost.
	TrackDirtyPages *bool `json:"track_dirty_pages,omitempty"`
	// NetNS is the path of a network namespace (such as
	// /run/netns/NAME) that the VMM runs in, so that it can open TAP
	// devices that live there. Unset runs the VMM in the caller's
	// namespace.
	NetNS *string `json:"netns,omitempty"`
}

// RootDriveID is the drive id reserved for the root filesystem.
const RootDriveID = "rootfs"

// Drive is a block device backed by a host file.
type Drive struct {
	ID          string       `json:"drive_id"`
	PathOnHost  string       `json:"path_on_host"`
	IsReadOnly  bool         `json:"is_read_only,omitempty"`
	RateLimiter *RateLimiter `json:"rate_limiter,omitempty"`
}

// NetworkInterface is a virtio-net device backed by a host TAP device. The
// TAP must exist before the VM is created; Ember's network package creates it.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	// GuestMAC is six colon-separated hex pairs of a unicast address. Empty
	// lets the backend choose one.
	GuestMAC      string       `json:"guest_mac,omitempty"`
	RxRateLimiter *RateLimiter `json:"rx_rate_limiter,omitempty"`
	TxRateLimiter *RateLimiter `json:"tx_rate_limiter,omitempty"`
	// MTU of the guest device in bytes; 0 keeps the backend's default.
	MTU int `json:"mtu,omitempty"`
}

// RateLimiter throttles a device with two independent token buckets. A nil
// bucket does not limit.
type RateLimiter struct {
	// Bandwidth counts bytes.
	Bandwidth *TokenBucket `json:"bandwidth,omitempty"`
	// Ops counts I/O operations (block) or packets (network).
	Ops *TokenBucket `json:"ops,omitempty"`
}

// TokenBucket is Firecracker's token bucket. A bucket whose Size or
// RefillTime is 0 is disabled.
type TokenBucket struct {
	// Size is the bucket capacity in tokens, refilled in full every
	// RefillTime milliseconds.
	Size int64 `json:"size"`
	// OneTimeBurst is an initial credit of tokens that is not refilled.
	OneTimeBurst int64 `json:"one_time_burst,omitempty"`
	// RefillTime is in milliseconds.
	RefillTime int64 `json:"refill_time"`
}

// Enabled reports whether the bucket limits anything.
func (b *TokenBucket) Enabled() bool {
	return b != nil && b.Size > 0 && b.RefillTime > 0
}

// Vsock is a virtio-vsock device whose host side is a Unix socket.
type Vsock struct {
	// GuestCID is the guest's context id; 0, 1 and 2 are reserved.
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// SnapshotRef names a snapshot to restore and the overrides to apply.
type SnapshotRef struct {
	VMID       string `json:"vm_id"`
	SnapshotID string `json:"snapshot_id"`
	// ResumeImmediately makes the restored VM running instead of paused.
	ResumeImmediately bool              `json:"resume_immediately,omitempty"`
	NetworkOverrides  []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride     *VsockOverride    `json:"vsock_override,omitempty"`
}

// NetworkOverride attaches a snapshot's interface to a different host TAP.
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride gives the restored vsock device a new host socket path.
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// Clone returns a deep copy of s.
func (s Spec) Clone() Spec {
	c := s
	c.Kernel = clonePtr(s.Kernel)
	c.Initrd = clonePtr(s.Initrd)
	c.Rootfs = clonePtr(s.Rootfs)
	c.RootfsReadOnly = clonePtr(s.RootfsReadOnly)
	c.VCPUCount = clonePtr(s.VCPUCount)
	c.MemSizeMiB = clonePtr(s.MemSizeMiB)
	c.BootArgs = clonePtr(s.BootArgs)
	c.RootfsRateLimit = s.RootfsRateLimit.Clone()
	c.NetworkInterfaces = cloneSlice(s.NetworkInterfaces, NetworkInterface.Clone)
	c.ExtraDrives = cloneSlice(s.ExtraDrives, Drive.Clone)
	c.Vsock = clonePtr(s.Vsock)
	c.RestoreFrom = s.RestoreFrom.Clone()
	c.TrackDirtyPages = clonePtr(s.TrackDirtyPages)
	c.NetNS = clonePtr(s.NetNS)
	return c
}

// Clone returns a deep copy of r; a nil r gives nil.
func (r *RateLimiter) Clone() *RateLimiter {
	if r == nil {
		return nil
	}
	return &RateLimiter{Bandwidth: clonePtr(r.Bandwidth), Ops: clonePtr(r.Ops)}
}

// Clone returns a deep copy of d.
func (d Drive) Clone() Drive {
	d.RateLimiter = d.RateLimiter.Clone()
	return d
}

// Clone returns a deep copy of n.
func (n NetworkInterface) Clone() NetworkInterface {
	n.RxRateLimiter = n.RxRateLimiter.Clone()
	n.TxRateLimiter = n.TxRateLimiter.Clone()
	return n
}

// Clone returns a deep copy of r; a nil r gives nil.
func (r *SnapshotRef) Clone() *SnapshotRef {
	if r == nil {
		return nil
	}
	c := *r
	c.NetworkOverrides = cloneSlice(r.NetworkOverrides, func(o NetworkOverride) NetworkOverride { return o })
	c.VsockOverride = clonePtr(r.VsockOverride)
	return &c
}

func clonePtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}

func cloneSlice[T any](s []T, clone func(T) T) []T {
	if s == nil {
		return nil
	}
	out := make([]T, len(s))
	for i, v := range s {
		out[i] = clone(v)
	}
	return out
}
