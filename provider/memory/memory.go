// Package memory is an in-memory [vm.Provider] for tests of code that drives
// VMs. It runs no guest and starts no process, but it follows the same state
// rules, validation and error types as the real backends, so code that passes
// against it meets the same contract against Firecracker or QEMU.
//
// Test hooks ([Provider.Crash], [Provider.PowerOff]) simulate the events a
// real backend observes: the VMM dying and the guest powering itself off.
package memory

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/embervm/ember/vm"
)

// Backend is the name the provider reports.
const Backend = "memory"

// Provider keeps VMs and snapshots in maps. The zero value is not usable;
// call [New].
type Provider struct {
	now func() time.Time

	mu        sync.Mutex
	vms       map[string]*machine
	snapshots map[snapshotKey]*snapshot
	// lastSnapshot maps a VM id to its most recent snapshot id, the parent
	// of its next diff snapshot.
	lastSnapshot map[string]string
}

type snapshotKey struct{ vmID, id string }

type snapshot struct {
	info vm.SnapshotInfo
	// cfg is the configuration of the VM when the snapshot was taken.
	cfg vm.Config
}

type machine struct {
	info vm.Info
}

var _ vm.Provider = (*Provider)(nil)

// New returns an empty provider.
func New() *Provider {
	return &Provider{
		now:          time.Now,
		vms:          map[string]*machine{},
		snapshots:    map[snapshotKey]*snapshot{},
		lastSnapshot: map[string]string{},
	}
}

// Backend returns "memory".
func (p *Provider) Backend() string { return Backend }

// Create registers a VM. A restore copies the machine shape and devices of
// the snapshot and applies the reference's network overrides.
func (p *Provider) Create(ctx context.Context, cfg vm.Config) (vm.Info, error) {
	if err := ctx.Err(); err != nil {
		return vm.Info{}, err
	}
	if err := cfg.Validate(); err != nil {
		return vm.Info{}, err
	}
	cfg = cfg.Clone()

	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.vms[cfg.ID]; ok {
		return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, vm.ErrAlreadyExists)
	}
	state := vm.StateCreated
	if cfg.RestoreFrom != nil {
		restored, err := p.restoreConfigLocked(cfg)
		if err != nil {
			return vm.Info{}, fmt.Errorf("create vm %q: %w", cfg.ID, err)
		}
		cfg = restored
		state = vm.StatePaused
		if cfg.RestoreFrom.ResumeImmediately {
			state = vm.StateRunning
		}
	}
	m := &machine{info: vm.Info{
		ID:        cfg.ID,
		Backend:   Backend,
		State:     state,
		Config:    cfg,
		CreatedAt: p.now(),
	}}
	p.vms[cfg.ID] = m
	return cloneInfo(m.info), nil
}

// restoreConfigLocked returns cfg with the snapshot's shape and devices.
func (p *Provider) restoreConfigLocked(cfg vm.Config) (vm.Config, error) {
	ref := cfg.RestoreFrom
	stored, ok := p.snapshots[snapshotKey{ref.VMID, ref.SnapshotID}]
	if !ok {
		return cfg, fmt.Errorf("restore snapshot %q of vm %q: %w", ref.SnapshotID, ref.VMID, vm.ErrSnapshotNotFound)
	}
	snap := stored.info
	if cfg.VCPUCount != 0 && cfg.VCPUCount != snap.VCPUCount {
		return cfg, fmt.Errorf("restore snapshot %q: vcpu_count %d requested, snapshot has %d: %w",
			snap.ID, cfg.VCPUCount, snap.VCPUCount, vm.ErrSnapshotIncompatible)
	}
	if cfg.MemSizeMiB != 0 && cfg.MemSizeMiB != snap.MemSizeMiB {
		return cfg, fmt.Errorf("restore snapshot %q: mem_size_mib %d requested, snapshot has %d: %w",
			snap.ID, cfg.MemSizeMiB, snap.MemSizeMiB, vm.ErrSnapshotIncompatible)
	}
	out := stored.cfg.Clone()
	out.ID = cfg.ID
	out.RestoreFrom = ref.Clone()
	out.TrackDirtyPages = cfg.TrackDirtyPages
	for _, o := range ref.NetworkOverrides {
		i := slices.IndexFunc(out.NetworkInterfaces, func(n vm.NetworkInterface) bool { return n.IfaceID == o.IfaceID })
		if i < 0 {
			return cfg, fmt.Errorf("restore snapshot %q: network override for unknown interface %q: %w",
				snap.ID, o.IfaceID, vm.ErrSnapshotIncompatible)
		}
		out.NetworkInterfaces[i].HostDevName = o.HostDevName
	}
	if ref.VsockOverride != nil {
		if out.Vsock == nil {
			return cfg, fmt.Errorf("restore snapshot %q: vsock override for a snapshot without vsock: %w",
				snap.ID, vm.ErrSnapshotIncompatible)
		}
		out.Vsock.UDSPath = ref.VsockOverride.UDSPath
	}
	return out, nil
}

// Start boots a created VM.
func (p *Provider) Start(ctx context.Context, id string) error {
	return p.apply(ctx, id, vm.OpStart)
}

// Pause pauses a running VM.
func (p *Provider) Pause(ctx context.Context, id string) error {
	return p.apply(ctx, id, vm.OpPause)
}

// Resume resumes a paused VM.
func (p *Provider) Resume(ctx context.Context, id string) error {
	return p.apply(ctx, id, vm.OpResume)
}

// Shutdown stops the VM at once; there is no guest to wait for.
func (p *Provider) Shutdown(ctx context.Context, id string, grace time.Duration) error {
	return p.apply(ctx, id, vm.OpShutdown)
}

// Destroy removes the VM. Its snapshots stay.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	m, err := p.getLocked(id)
	if err != nil {
		return fmt.Errorf("destroy: %w", err)
	}
	if _, err := vm.Transition(id, m.info.State, vm.OpDestroy); err != nil {
		return err
	}
	delete(p.vms, id)
	return nil
}

// Rename changes the id of a VM.
func (p *Provider) Rename(ctx context.Context, id, newID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := vm.ValidateID(newID); err != nil {
		return fmt.Errorf("rename vm %q: %w", id, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	m, err := p.getLocked(id)
	if err != nil {
		return fmt.Errorf("rename: %w", err)
	}
	if _, err := vm.Transition(id, m.info.State, vm.OpRename); err != nil {
		return err
	}
	if _, ok := p.vms[newID]; ok {
		return fmt.Errorf("rename vm %q to %q: %w", id, newID, vm.ErrAlreadyExists)
	}
	delete(p.vms, id)
	m.info.ID = newID
	m.info.Config.ID = newID
	p.vms[newID] = m
	if last, ok := p.lastSnapshot[id]; ok {
		p.lastSnapshot[newID] = last
		delete(p.lastSnapshot, id)
	}
	return nil
}

// Snapshot records a snapshot of a paused VM. A diff snapshot needs an
// earlier snapshot of the same VM (its parent) and dirty-page tracking.
func (p *Provider) Snapshot(ctx context.Context, id string, opts vm.SnapshotOptions) (vm.SnapshotInfo, error) {
	if err := ctx.Err(); err != nil {
		return vm.SnapshotInfo{}, err
	}
	if err := vm.ValidateSnapshotID(opts.ID); err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	typ := opts.Type
	if typ == "" {
		typ = vm.SnapshotFull
	}
	if typ != vm.SnapshotFull && typ != vm.SnapshotDiff {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: type %q: %w", id, typ, vm.ErrUnsupported)
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	m, err := p.getLocked(id)
	if err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot: %w", err)
	}
	if _, err := vm.Transition(id, m.info.State, vm.OpSnapshot); err != nil {
		return vm.SnapshotInfo{}, err
	}
	key := snapshotKey{id, opts.ID}
	if _, ok := p.snapshots[key]; ok {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot %q of vm %q: %w", opts.ID, id, vm.ErrSnapshotExists)
	}
	info := vm.SnapshotInfo{
		ID:         opts.ID,
		VMID:       id,
		Type:       typ,
		Backend:    Backend,
		VCPUCount:  m.info.Config.VCPUCount,
		MemSizeMiB: m.info.Config.MemSizeMiB,
		CreatedAt:  p.now(),
	}
	if typ == vm.SnapshotDiff {
		parent, ok := p.lastSnapshot[id]
		if !ok {
			return vm.SnapshotInfo{}, fmt.Errorf("diff snapshot of vm %q: no earlier snapshot to diff against: %w", id, vm.ErrSnapshotNotFound)
		}
		if !m.info.Config.TrackDirtyPages {
			return vm.SnapshotInfo{}, &vm.UnsupportedError{Feature: "diff snapshot without track_dirty_pages", Backend: Backend}
		}
		info.Parent = parent
	}
	for _, d := range m.info.Config.Drives() {
		info.DriveIDs = append(info.DriveIDs, d.ID)
	}
	for _, n := range m.info.Config.NetworkInterfaces {
		info.NetworkInterfaces = append(info.NetworkInterfaces, n.IfaceID)
	}
	if v := m.info.Config.Vsock; v != nil {
		info.VsockCID = v.GuestCID
	}
	p.snapshots[key] = &snapshot{info: info, cfg: m.info.Config.Clone()}
	p.lastSnapshot[id] = opts.ID
	return cloneSnapshotInfo(info), nil
}

// DeleteSnapshot removes a snapshot record. A snapshot that is the parent
// of a diff is kept and the call fails.
func (p *Provider) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	key := snapshotKey{vmID, snapshotID}
	if _, ok := p.snapshots[key]; !ok {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, vm.ErrSnapshotNotFound)
	}
	for k, s := range p.snapshots {
		if k.vmID == vmID && s.info.Parent == snapshotID {
			return fmt.Errorf("delete snapshot %q of vm %q: diff snapshot %q depends on it", snapshotID, vmID, k.id)
		}
	}
	delete(p.snapshots, key)
	if p.lastSnapshot[vmID] == snapshotID {
		delete(p.lastSnapshot, vmID)
	}
	return nil
}

// Get returns the current view of VM id.
func (p *Provider) Get(ctx context.Context, id string) (vm.Info, error) {
	if err := ctx.Err(); err != nil {
		return vm.Info{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	m, err := p.getLocked(id)
	if err != nil {
		return vm.Info{}, err
	}
	return cloneInfo(m.info), nil
}

// List returns every VM sorted by id.
func (p *Provider) List(ctx context.Context) ([]vm.Info, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]vm.Info, 0, len(p.vms))
	for _, m := range p.vms {
		out = append(out, cloneInfo(m.info))
	}
	slices.SortFunc(out, func(a, b vm.Info) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// ListSnapshots returns the snapshots of vmID, or all when vmID is empty,
// sorted by VM id and snapshot id.
func (p *Provider) ListSnapshots(ctx context.Context, vmID string) ([]vm.SnapshotInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []vm.SnapshotInfo
	for k, s := range p.snapshots {
		if vmID == "" || k.vmID == vmID {
			out = append(out, cloneSnapshotInfo(s.info))
		}
	}
	slices.SortFunc(out, func(a, b vm.SnapshotInfo) int {
		if c := strings.Compare(a.VMID, b.VMID); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Crash simulates the VMM dying: the VM moves to failed.
func (p *Provider) Crash(id string) error {
	return p.event(id, vm.OpFail, "vmm process exited unexpectedly")
}

// PowerOff simulates the guest shutting itself down: the VM moves to
// stopped.
func (p *Provider) PowerOff(id string) error {
	return p.event(id, vm.OpGuestExit, "guest powered off")
}

func (p *Provider) event(id string, op vm.Op, reason string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	m, err := p.getLocked(id)
	if err != nil {
		return err
	}
	to, err := vm.Transition(id, m.info.State, op)
	if err != nil {
		return err
	}
	m.info.State = to
	m.info.Reason = reason
	return nil
}

// apply moves VM id through op.
func (p *Provider) apply(ctx context.Context, id string, op vm.Op) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	m, err := p.getLocked(id)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	to, err := vm.Transition(id, m.info.State, op)
	if err != nil {
		return err
	}
	m.info.State = to
	if op == vm.OpShutdown {
		m.info.Reason = "shut down by request"
	}
	return nil
}

func (p *Provider) getLocked(id string) (*machine, error) {
	m, ok := p.vms[id]
	if !ok {
		return nil, fmt.Errorf("vm %q: %w", id, vm.ErrNotFound)
	}
	return m, nil
}

func cloneInfo(i vm.Info) vm.Info {
	i.Config = i.Config.Clone()
	return i
}

func cloneSnapshotInfo(s vm.SnapshotInfo) vm.SnapshotInfo {
	s.DriveIDs = slices.Clone(s.DriveIDs)
	s.NetworkInterfaces = slices.Clone(s.NetworkInterfaces)
	return s
}
