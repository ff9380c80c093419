package vm

// Built-in values used where [Defaults] leaves a field at its zero value.
const (
	DefaultVCPUCount  = 1
	DefaultMemSizeMiB = 256
	// DefaultBootArgs sends the console to the first serial port, reboots
	// through the keyboard controller (which Firecracker turns into a VMM
	// exit) and reboots instead of hanging on a panic.
	DefaultBootArgs = "console=ttyS0 reboot=k panic=1"
)

// Defaults is the workspace default configuration. The zero value of each
// field is documented and usable, except that Kernel must be set somewhere,
// here or in the spec.
type Defaults struct {
	Kernel string
	// Initrd is optional.
	Initrd string
	// Rootfs is optional; without it the VM has no root drive and lives in
	// its initramfs.
	Rootfs         string
	RootfsReadOnly bool
	// VCPUCount 0 means DefaultVCPUCount.
	VCPUCount int
	// MemSizeMiB 0 means DefaultMemSizeMiB.
	MemSizeMiB int
	// BootArgs "" means DefaultBootArgs.
	BootArgs        string
	RootfsRateLimit *RateLimiter
	// TrackDirtyPages nil means enabled. Dirty-page tracking is what diff
	// snapshots are built from, so it is on unless turned off. Its cost:
	// KVM write-protects guest memory to log dirty pages, so the first write
	// to each page after every snapshot takes a VM exit, which slows
	// write-heavy guests. Set it to false here (track_dirty_pages = false in
	// the config file) or in a spec to turn it off; full snapshots still
	// work without it.
	TrackDirtyPages *bool
}

// Config is the fully resolved configuration a provider executes. Build it
// with [Resolve]; a hand-built Config must pass [Config.Validate].
type Config struct {
	ID              string       `json:"id"`
	Kernel          string       `json:"kernel,omitempty"`
	Initrd          string       `json:"initrd,omitempty"`
	Rootfs          string       `json:"rootfs,omitempty"`
	RootfsReadOnly  bool         `json:"rootfs_read_only,omitempty"`
	VCPUCount       int          `json:"vcpu_count,omitempty"`
	MemSizeMiB      int          `json:"mem_size_mib,omitempty"`
	BootArgs        string       `json:"boot_args,omitempty"`
	RootfsRateLimit *RateLimiter `json:"rootfs_rate_limit,omitempty"`

	NetworkInterfaces []NetworkInterface `json:"network_interfaces,omitempty"`
	ExtraDrives       []Drive            `json:"extra_drives,omitempty"`
	Vsock             *Vsock             `json:"vsock,omitempty"`

	// RestoreFrom, when set, makes this a restore. The cold-boot fields
	// above are then empty, except VCPUCount and MemSizeMiB when the spec set
	// them explicitly: they are the shape the caller expects the snapshot to
	// have.
	RestoreFrom     *SnapshotRef `json:"restore_from,omitempty"`
	TrackDirtyPages bool         `json:"track_dirty_pages"`
	// NetNS is the network namespace the VMM runs in; empty means the
	// caller's. It applies to cold boots and restores alike.
	NetNS string `json:"netns,omitempty"`
}

// IsRestore reports whether c restores a snapshot instead of booting.
func (c *Config) IsRestore() bool { return c.RestoreFrom != nil }

// Drives returns every block device in attach order: the root drive first
// (when there is one), then the extra drives.
func (c *Config) Drives() []Drive {
	var out []Drive
	if c.Rootfs != "" {
		out = append(out, Drive{
			ID:          RootDriveID,
			PathOnHost:  c.Rootfs,
			IsReadOnly:  c.RootfsReadOnly,
			RateLimiter: c.RootfsRateLimit.Clone(),
		})
	}
	for _, d := range c.ExtraDrives {
		out = append(out, d.Clone())
	}
	return out
}

// Clone returns a deep copy of c.
func (c Config) Clone() Config {
	out := c
	out.RootfsRateLimit = c.RootfsRateLimit.Clone()
	out.NetworkInterfaces = cloneSlice(c.NetworkInterfaces, NetworkInterface.Clone)
	out.ExtraDrives = cloneSlice(c.ExtraDrives, Drive.Clone)
	out.Vsock = clonePtr(c.Vsock)
	out.RestoreFrom = c.RestoreFrom.Clone()
	return out
}

// Resolve merges the workspace defaults and a per-VM spec into the Config
// for VM id and validates it. Every problem found in the defaults, the spec
// or the merged result is returned together in one [*ValidationError].
func Resolve(id string, d Defaults, s Spec) (Config, error) {
	var errs problems
	validateID(&errs, "id", id)
	validateSpec(&errs, &s)
	if errs.err() != nil {
		return Config{}, errs.err()
	}

	cfg := Config{
		ID:              id,
		TrackDirtyPages: pick(s.TrackDirtyPages, pick(d.TrackDirtyPages, true)),
		NetNS:           pick(s.NetNS, ""),
	}
	if s.RestoreFrom != nil {
		cfg.RestoreFrom = s.RestoreFrom.Clone()
		cfg.VCPUCount = pick(s.VCPUCount, 0)
		cfg.MemSizeMiB = pick(s.MemSizeMiB, 0)
		return cfg, cfg.Validate()
	}

	cfg.Kernel = pick(s.Kernel, d.Kernel)
	cfg.Initrd = pick(s.Initrd, d.Initrd)
	cfg.Rootfs = pick(s.Rootfs, d.Rootfs)
	cfg.RootfsReadOnly = pick(s.RootfsReadOnly, d.RootfsReadOnly)
	cfg.VCPUCount = pick(s.VCPUCount, orDefault(d.VCPUCount, DefaultVCPUCount))
	cfg.MemSizeMiB = pick(s.MemSizeMiB, orDefault(d.MemSizeMiB, DefaultMemSizeMiB))
	cfg.BootArgs = pick(s.BootArgs, orDefault(d.BootArgs, DefaultBootArgs))
	cfg.RootfsRateLimit = d.RootfsRateLimit.Clone()
	if s.RootfsRateLimit != nil {
		cfg.RootfsRateLimit = s.RootfsRateLimit.Clone()
	}
	cfg.NetworkInterfaces = cloneSlice(s.NetworkInterfaces, NetworkInterface.Clone)
	cfg.ExtraDrives = cloneSlice(s.ExtraDrives, Drive.Clone)
	cfg.Vsock = clonePtr(s.Vsock)
	return cfg, cfg.Validate()
}

// pick returns *p when p is set and def otherwise.
func pick[T any](p *T, def T) T {
	if p != nil {
		return *p
	}
	return def
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}
