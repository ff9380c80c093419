package fcapi

// Request and response bodies of the Firecracker API. Field names and
// optionality follow Firecracker's swagger definition (firecracker.yaml).
// Every optional field is omitted when unset, because Firecracker rejects a
// body that contains a field its version does not know.

// InstanceInfo is the body of GET /.
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

// Instance states reported in [InstanceInfo.State].
const (
	InstanceNotStarted = "Not started"
	InstanceRunning    = "Running"
	InstancePaused     = "Paused"
)

// VersionInfo is the body of GET /version.
type VersionInfo struct {
	FirecrackerVersion string `json:"firecracker_version"`
}

// MachineConfig is the body of PUT /machine-config.
type MachineConfig struct {
	VCPUCount       int    `json:"vcpu_count"`
	MemSizeMiB      int    `json:"mem_size_mib"`
	SMT             bool   `json:"smt,omitempty"`
	TrackDirtyPages bool   `json:"track_dirty_pages,omitempty"`
	HugePages       string `json:"huge_pages,omitempty"`
}

// BootSource is the body of PUT /boot-source.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// TokenBucket is one bucket of a [RateLimiter]. RefillTime is in
// milliseconds.
type TokenBucket struct {
	Size         int64 `json:"size"`
	OneTimeBurst int64 `json:"one_time_burst,omitempty"`
	RefillTime   int64 `json:"refill_time"`
}

// RateLimiter throttles a drive or a network queue.
type RateLimiter struct {
	Bandwidth *TokenBucket `json:"bandwidth,omitempty"`
	Ops       *TokenBucket `json:"ops,omitempty"`
}

// Drive is the body of PUT /drives/{drive_id}.
type Drive struct {
	DriveID      string       `json:"drive_id"`
	PathOnHost   string       `json:"path_on_host"`
	IsRootDevice bool         `json:"is_root_device"`
	IsReadOnly   bool         `json:"is_read_only"`
	RateLimiter  *RateLimiter `json:"rate_limiter,omitempty"`
}

// NetworkInterface is the body of PUT /network-interfaces/{iface_id}.
type NetworkInterface struct {
	IfaceID       string       `json:"iface_id"`
	HostDevName   string       `json:"host_dev_name"`
	GuestMAC      string       `json:"guest_mac,omitempty"`
	RxRateLimiter *RateLimiter `json:"rx_rate_limiter,omitempty"`
	TxRateLimiter *RateLimiter `json:"tx_rate_limiter,omitempty"`
}

// Vsock is the body of PUT /vsock.
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// Logger is the body of PUT /logger.
type Logger struct {
	LogPath       string `json:"log_path,omitempty"`
	Level         string `json:"level,omitempty"`
	ShowLevel     bool   `json:"show_level,omitempty"`
	ShowLogOrigin bool   `json:"show_log_origin,omitempty"`
}

// Metrics is the body of PUT /metrics.
type Metrics struct {
	MetricsPath string `json:"metrics_path"`
}

// Action types accepted by PUT /actions.
const (
	ActionInstanceStart  = "InstanceStart"
	ActionSendCtrlAltDel = "SendCtrlAltDel"
	ActionFlushMetrics   = "FlushMetrics"
)

// InstanceAction is the body of PUT /actions.
type InstanceAction struct {
	ActionType string `json:"action_type"`
}

// VM states accepted by PATCH /vm.
const (
	VMPaused  = "Paused"
	VMResumed = "Resumed"
)

// VMState is the body of PATCH /vm.
type VMState struct {
	State string `json:"state"`
}

// Snapshot types accepted by PUT /snapshot/create.
const (
	SnapshotFull = "Full"
	SnapshotDiff = "Diff"
)

// SnapshotCreateParams is the body of PUT /snapshot/create.
type SnapshotCreateParams struct {
	SnapshotType string `json:"snapshot_type,omitempty"`
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

// Memory backend types of [MemoryBackend].
const (
	BackendFile = "File"
	BackendUffd = "Uffd"
)

// MemoryBackend says where a loaded snapshot's memory comes from: a file, or
// a userfaultfd handler listening on the Unix socket at BackendPath.
type MemoryBackend struct {
	BackendType string `json:"backend_type"`
	BackendPath string `json:"backend_path"`
}

// NetworkOverride points a snapshot's interface at another host TAP.
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride gives a restored vsock device a new host socket path.
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// SnapshotLoadParams is the body of PUT /snapshot/load. Several fields exist
// only on some versions; build it with [NewLoadParams], which picks the
// fields the running version understands and rejects the rest.
type SnapshotLoadParams struct {
	SnapshotPath        string            `json:"snapshot_path"`
	MemBackend          *MemoryBackend    `json:"mem_backend,omitempty"`
	EnableDiffSnapshots bool              `json:"enable_diff_snapshots,omitempty"`
	TrackDirtyPages     bool              `json:"track_dirty_pages,omitempty"`
	ResumeVM            bool              `json:"resume_vm,omitempty"`
	NetworkOverrides    []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride       *VsockOverride    `json:"vsock_override,omitempty"`
	ClockRealtime       bool              `json:"clock_realtime,omitempty"`
}

// Fault is the body of every error reply.
type Fault struct {
	FaultMessage string `json:"fault_message"`
}
