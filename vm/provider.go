package vm

import (
	"context"
	"net"
	"time"
)

// Provider runs VMs on one backend. Every method is safe for concurrent use.
// Operations on different VMs run concurrently, and operations on one VM are
// serialized.
//
// Methods return errors that match this package's sentinels: [ErrNotFound]
// for an unknown id, [ErrInvalidTransition] for an operation the VM's state
// does not allow, [ErrInvalid] for a configuration that fails validation,
// [ErrUnsupported] for a feature the backend lacks. A failed Create leaves
// nothing behind: no process, socket or run directory.
//
// The provider, not the caller's context, owns a VM's lifetime: cancelling
// the context of Create or Start abandons the call and cleans up what that
// call made, but never stops a VM that was already running.
type Provider interface {
	// Backend names the backend, such as "firecracker" or "qemu".
	Backend() string

	// Create starts a VMM for cfg. A cold boot leaves the VM in
	// StateCreated, configured but not running; a restore
	// (cfg.RestoreFrom set) leaves it paused, or running when the
	// reference asks to resume immediately.
	Create(ctx context.Context, cfg Config) (Info, error)
	Start(ctx context.Context, id string) error
	Pause(ctx context.Context, id string) error
	Resume(ctx context.Context, id string) error
	// Shutdown asks the guest to power off and waits up to grace for it,
	// then stops the VMM by force. A cancelled ctx skips to the forced stop.
	Shutdown(ctx context.Context, id string, grace time.Duration) error
	// Snapshot saves a paused VM. The snapshot outlives the VM.
	Snapshot(ctx context.Context, id string, opts SnapshotOptions) (SnapshotInfo, error)
	// Destroy stops the VMM, reaps it and removes its run-time files.
	// Snapshots stay. Destroying a VM whose VMM already died is not an
	// error.
	Destroy(ctx context.Context, id string) error
	// Rename changes a VM's id without disturbing the running guest.
	Rename(ctx context.Context, id, newID string) error

	Get(ctx context.Context, id string) (Info, error)
	List(ctx context.Context) ([]Info, error)
	// ListSnapshots returns the snapshots taken of VM vmID, or every
	// snapshot when vmID is empty. The VM need not exist any more.
	ListSnapshots(ctx context.Context, vmID string) ([]SnapshotInfo, error)
}

// Info is a point-in-time view of one VM.
type Info struct {
	ID      string `json:"id"`
	Backend string `json:"backend"`
	State   State  `json:"state"`
	// Config is the configuration the VM runs with. For a restored VM the
	// provider fills in the machine shape and devices from the snapshot.
	Config    Config    `json:"config"`
	CreatedAt time.Time `json:"created_at"`
	// PID is the VMM's process id; 0 when there is none.
	PID int `json:"pid,omitempty"`
	// Reason explains StateFailed or StateStopped when known.
	Reason string `json:"reason,omitempty"`
}

// SnapshotType is the kind of a snapshot.
type SnapshotType string

const (
	// SnapshotFull contains all guest memory.
	SnapshotFull SnapshotType = "full"
	// SnapshotDiff contains only the pages written since the previous
	// snapshot of the same VM, which is its parent.
	SnapshotDiff SnapshotType = "diff"
)

// SnapshotOptions selects what Snapshot writes.
type SnapshotOptions struct {
	// ID names the snapshot; it must pass [ValidateSnapshotID] and be unique
	// for the VM.
	ID string
	// Type is SnapshotFull when empty.
	Type SnapshotType
}

// SnapshotInfo describes a stored snapshot.
type SnapshotInfo struct {
	ID   string       `json:"id"`
	VMID string       `json:"vm_id"`
	Type SnapshotType `json:"type"`
	// Parent is the id of the snapshot a diff applies to; empty for a full
	// snapshot.
	Parent     string `json:"parent,omitempty"`
	Backend    string `json:"backend"`
	VMMVersion string `json:"vmm_version,omitempty"`

	VCPUCount         int      `json:"vcpu_count"`
	MemSizeMiB        int      `json:"mem_size_mib"`
	DriveIDs          []string `json:"drive_ids,omitempty"`
	NetworkInterfaces []string `json:"network_interfaces,omitempty"`
	VsockCID          uint32   `json:"vsock_cid,omitempty"`

	// StatePath and MemoryPath are the snapshot's files; MemoryPath is empty
	// for backends that write a single file.
	StatePath  string    `json:"state_path,omitempty"`
	MemoryPath string    `json:"memory_path,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
}

// ConsoleReader is implemented by providers that capture the guest's serial
// console.
type ConsoleReader interface {
	// Console returns the most recent console output of VM id, bounded by
	// the provider's buffer, while the VM runs and after it stopped.
	Console(ctx context.Context, id string) ([]byte, error)
}

// AgentDialer is implemented by providers that give the host a byte stream
// to the guest agent (vsock on Firecracker, virtio-serial on QEMU).
type AgentDialer interface {
	DialAgent(ctx context.Context, id string) (net.Conn, error)
}

// SnapshotDeleter is implemented by providers that can remove a snapshot's
// files.
type SnapshotDeleter interface {
	DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error
}

// VersionReporter is implemented by providers that know the exact version
// of the VMM they drive.
type VersionReporter interface {
	VMMVersion(ctx context.Context) (string, error)
}

// Reattacher is implemented by providers whose VMs outlive the process that
// created them, such as a CLI that exits while its VMs keep running.
// Reattach finds the VMs recorded in the provider's run directory, takes
// control of those whose VMM is alive and reports the others as failed.
type Reattacher interface {
	Reattach(ctx context.Context) ([]Info, error)
}
