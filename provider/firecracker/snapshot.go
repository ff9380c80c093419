package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/embervm/ember/internal/cleanup"
	"github.com/embervm/ember/internal/fsutil"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/provider/firecracker/memfile"
	"github.com/embervm/ember/provider/firecracker/uffd"
	"github.com/embervm/ember/vm"
)

// Names of the files in a snapshot directory.
const (
	snapStateName  = "vmstate"
	snapMemoryName = "memory"
	snapMetaName   = "meta.json"
)

// metaSchema is the version of the meta.json format.
const metaSchema = 1

// snapshotKey names a snapshot: the VM it was taken of and its id.
type snapshotKey struct {
	VMID       string `json:"vm_id"`
	SnapshotID string `json:"snapshot_id"`
}

// snapshotMeta is a snapshot's meta.json. It records what a restore needs
// to check before it starts a process: the writing Firecracker version, the
// machine shape and devices, and the parent of a diff.
type snapshotMeta struct {
	Schema int             `json:"schema"`
	Info   vm.SnapshotInfo `json:"info"`
	// ParentVMID is the VM of Info.Parent, which differs from Info.VMID
	// when the VM was restored from another VM's snapshot.
	ParentVMID string `json:"parent_vm_id,omitempty"`
	// Config is the configuration of the VM when the snapshot was taken.
	Config vm.Config `json:"config"`
}

// decodeMeta parses and checks a meta.json.
func decodeMeta(data []byte) (*snapshotMeta, error) {
	var meta snapshotMeta
	if err := json.Unmarshal(data, &meta); err != nil {
		return nil, fmt.Errorf("decode snapshot metadata: %w", err)
	}
	if meta.Schema != metaSchema {
		return nil, fmt.Errorf("decode snapshot metadata: schema %d is not supported, want %d", meta.Schema, metaSchema)
	}
	if err := vm.ValidateID(meta.Info.VMID); err != nil {
		return nil, fmt.Errorf("decode snapshot metadata: %w", err)
	}
	if err := vm.ValidateSnapshotID(meta.Info.ID); err != nil {
		return nil, fmt.Errorf("decode snapshot metadata: %w", err)
	}
	if meta.Info.Type != vm.SnapshotFull && meta.Info.Type != vm.SnapshotDiff {
		return nil, fmt.Errorf("decode snapshot metadata: type %q is invalid", meta.Info.Type)
	}
	if meta.Info.Type == vm.SnapshotDiff {
		if err := vm.ValidateSnapshotID(meta.Info.Parent); err != nil {
			return nil, fmt.Errorf("decode snapshot metadata: diff parent: %w", err)
		}
		if err := vm.ValidateID(meta.ParentVMID); err != nil {
			return nil, fmt.Errorf("decode snapshot metadata: diff parent vm: %w", err)
		}
	}
	return &meta, nil
}

func (p *Provider) snapshotDir(vmID, snapID string) string {
	return filepath.Join(p.cfg.SnapshotDir, vmID, snapID)
}

// readSnapshotMeta loads a snapshot's metadata; a missing snapshot matches
// vm.ErrSnapshotNotFound.
func (p *Provider) readSnapshotMeta(vmID, snapID string) (*snapshotMeta, error) {
	if err := vm.ValidateID(vmID); err != nil {
		return nil, err
	}
	if err := vm.ValidateSnapshotID(snapID); err != nil {
		return nil, err
	}
	dir := p.snapshotDir(vmID, snapID)
	data, err := os.ReadFile(filepath.Join(dir, snapMetaName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("snapshot %s/%s: %w", vmID, snapID, vm.ErrSnapshotNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot %s/%s: %w", vmID, snapID, err)
	}
	meta, err := decodeMeta(data)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s/%s: %w", vmID, snapID, err)
	}
	// The files may have moved with the snapshot directory.
	meta.Info.StatePath = filepath.Join(dir, snapStateName)
	meta.Info.MemoryPath = filepath.Join(dir, snapMemoryName)
	return meta, nil
}

// Snapshot saves a paused VM. A diff snapshot contains the pages written
// since the VM's previous snapshot, or since its restore, which becomes its
// parent.
func (p *Provider) Snapshot(ctx context.Context, id string, opts vm.SnapshotOptions) (vm.SnapshotInfo, error) {
	if opts.Type == "" {
		opts.Type = vm.SnapshotFull
	}
	if opts.Type != vm.SnapshotFull && opts.Type != vm.SnapshotDiff {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: type %q: %w", id, opts.Type, &vm.ValidationError{Problems: []vm.FieldError{{Field: "type", Problem: fmt.Sprintf("%q is invalid, must be %q or %q", opts.Type, vm.SnapshotFull, vm.SnapshotDiff)}}})
	}
	if err := vm.ValidateSnapshotID(opts.ID); err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	m, err := p.lookup(id)
	if err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot: %w", err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.check(vm.OpSnapshot); err != nil {
		return vm.SnapshotInfo{}, err
	}

	m.mu.Lock()
	cfg := m.cfg.Clone()
	parent := m.parent
	m.mu.Unlock()

	req := fcapi.SnapshotCreateParams{SnapshotType: fcapi.SnapshotFull}
	if opts.Type == vm.SnapshotDiff {
		if parent == nil {
			return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: a diff snapshot needs an earlier snapshot of the vm as its parent, take a full snapshot first: %w", id, vm.ErrUnsupported)
		}
		req.SnapshotType = fcapi.SnapshotDiff
		if err := fcapi.CheckSnapshotCreate(m.version, req, m.trackDirty); err != nil {
			return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
		}
	}

	dir := p.snapshotDir(id, opts.ID)
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	if err := os.Mkdir(dir, 0o700); errors.Is(err, os.ErrExist) {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %q: %w", id, opts.ID, vm.ErrSnapshotExists)
	} else if err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(dir)
		}
	}()

	statePath := filepath.Join(dir, snapStateName)
	memPath := filepath.Join(dir, snapMemoryName)
	req.SnapshotPath, req.MemFilePath = statePath, memPath
	if m.jail != nil {
		if req.SnapshotPath, req.MemFilePath, err = m.jail.snapshotPaths(); err != nil {
			return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
		}
	}
	// Snapshot files can be large, so give Firecracker longer than a normal
	// call when the caller set no deadline.
	callCtx := ctx
	if _, has := ctx.Deadline(); !has {
		var cancel context.CancelFunc
		callCtx, cancel = context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
	}
	if err := m.client.CreateSnapshot(callCtx, req); err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, p.apiFailure(m, err))
	}
	if m.jail != nil {
		if err := m.jail.collectSnapshot(statePath, memPath); err != nil {
			return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
		}
	}

	info := vm.SnapshotInfo{
		ID: opts.ID, VMID: id, Type: opts.Type, Backend: BackendName,
		VMMVersion: m.version.String(), VCPUCount: cfg.VCPUCount, MemSizeMiB: cfg.MemSizeMiB,
		StatePath: statePath, MemoryPath: memPath, CreatedAt: time.Now().UTC(),
	}
	for _, d := range cfg.Drives() {
		info.DriveIDs = append(info.DriveIDs, d.ID)
	}
	for _, n := range cfg.NetworkInterfaces {
		info.NetworkInterfaces = append(info.NetworkInterfaces, n.IfaceID)
	}
	if cfg.Vsock != nil {
		info.VsockCID = cfg.Vsock.GuestCID
	}
	meta := snapshotMeta{Schema: metaSchema, Info: info, Config: cfg}
	if opts.Type == vm.SnapshotDiff {
		meta.Info.Parent = parent.SnapshotID
		meta.ParentVMID = parent.VMID
		info.Parent = parent.SnapshotID
	}
	if err := fsutil.WriteJSONAtomic(filepath.Join(dir, snapMetaName), meta, 0o600); err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	ok = true

	m.mu.Lock()
	m.parent = &snapshotKey{VMID: id, SnapshotID: opts.ID}
	m.mu.Unlock()
	p.log.Info("snapshot created", "vm", id, "snapshot", opts.ID, "type", string(opts.Type))
	return info, nil
}

// ListSnapshots returns the snapshots of VM vmID, or of every VM when vmID
// is empty, sorted by VM id and creation time.
func (p *Provider) ListSnapshots(ctx context.Context, vmID string) ([]vm.SnapshotInfo, error) {
	var vmDirs []string
	if vmID != "" {
		if err := vm.ValidateID(vmID); err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		vmDirs = []string{vmID}
	} else {
		entries, err := os.ReadDir(p.cfg.SnapshotDir)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		for _, e := range entries {
			if e.IsDir() {
				vmDirs = append(vmDirs, e.Name())
			}
		}
	}
	out := []vm.SnapshotInfo{}
	for _, v := range vmDirs {
		entries, err := os.ReadDir(filepath.Join(p.cfg.SnapshotDir, v))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list snapshots of %q: %w", v, err)
		}
		for _, e := range entries {
			if !e.IsDir() {
				continue
			}
			meta, err := p.readSnapshotMeta(v, e.Name())
			if err != nil {
				// A snapshot being written has no meta.json yet.
				if !errors.Is(err, vm.ErrSnapshotNotFound) {
					p.log.Warn("skip unreadable snapshot", "vm", v, "snapshot", e.Name(), "err", err)
				}
				continue
			}
			out = append(out, meta.Info)
		}
	}
	slices.SortFunc(out, func(a, b vm.SnapshotInfo) int {
		if a.VMID != b.VMID {
			if a.VMID < b.VMID {
				return -1
			}
			return 1
		}
		return a.CreatedAt.Compare(b.CreatedAt)
	})
	return out, nil
}

// DeleteSnapshot removes a snapshot's files. A snapshot that a stored diff
// names as its parent is kept, because the diff cannot be restored without
// it.
func (p *Provider) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	if _, err := p.readSnapshotMeta(vmID, snapshotID); err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	all, err := p.ListSnapshots(ctx, "")
	if err != nil {
		return fmt.Errorf("delete snapshot %s/%s: %w", vmID, snapshotID, err)
	}
	for _, s := range all {
		if s.Type != vm.SnapshotDiff || s.Parent != snapshotID {
			continue
		}
		child, err := p.readSnapshotMeta(s.VMID, s.ID)
		if err == nil && child.ParentVMID == vmID {
			return fmt.Errorf("delete snapshot %s/%s: diff %s/%s depends on it: %w", vmID, snapshotID, s.VMID, s.ID, vm.ErrInvalidTransition)
		}
	}
	if err := os.RemoveAll(p.snapshotDir(vmID, snapshotID)); err != nil {
		return fmt.Errorf("delete snapshot %s/%s: %w", vmID, snapshotID, err)
	}
	os.Remove(filepath.Join(p.cfg.SnapshotDir, vmID)) // only succeeds when empty
	return nil
}

// chain returns the memory files to merge for meta: its full base first,
// then each diff in order.
func (p *Provider) chain(meta *snapshotMeta) ([]string, error) {
	files := []string{meta.Info.MemoryPath}
	cur := meta
	for cur.Info.Type == vm.SnapshotDiff {
		if len(files) > 1000 {
			return nil, fmt.Errorf("snapshot chain of %s/%s is longer than 1000", meta.Info.VMID, meta.Info.ID)
		}
		parent, err := p.readSnapshotMeta(cur.ParentVMID, cur.Info.Parent)
		if err != nil {
			return nil, fmt.Errorf("parent of %s/%s: %w", cur.Info.VMID, cur.Info.ID, err)
		}
		files = append(files, parent.Info.MemoryPath)
		cur = parent
	}
	slices.Reverse(files)
	return files, nil
}

// checkRestore checks a restore of snap on Firecracker v before anything
// is sent.
func (p *Provider) checkRestore(v fcapi.Version, cfg vm.Config, snap *snapshotMeta) error {
	ref := cfg.RestoreFrom
	if snap.Info.Backend != BackendName {
		return fmt.Errorf("restore %s/%s: written by backend %q: %w", ref.VMID, ref.SnapshotID, snap.Info.Backend, vm.ErrSnapshotIncompatible)
	}
	written, err := fcapi.ParseVersion(snap.Info.VMMVersion)
	if err != nil {
		return fmt.Errorf("restore %s/%s: %w: %w", ref.VMID, ref.SnapshotID, err, vm.ErrSnapshotIncompatible)
	}
	if !written.SameMinor(v) {
		return fmt.Errorf("restore %s/%s: written by firecracker %s, which firecracker %s cannot load (snapshots load only on the minor version that wrote them): %w",
			ref.VMID, ref.SnapshotID, written, v, vm.ErrSnapshotIncompatible)
	}
	if cfg.VCPUCount != 0 && cfg.VCPUCount != snap.Info.VCPUCount {
		return fmt.Errorf("restore %s/%s: snapshot has %d vcpus, expected %d: %w", ref.VMID, ref.SnapshotID, snap.Info.VCPUCount, cfg.VCPUCount, vm.ErrSnapshotIncompatible)
	}
	if cfg.MemSizeMiB != 0 && cfg.MemSizeMiB != snap.Info.MemSizeMiB {
		return fmt.Errorf("restore %s/%s: snapshot has %d MiB of memory, expected %d: %w", ref.VMID, ref.SnapshotID, snap.Info.MemSizeMiB, cfg.MemSizeMiB, vm.ErrSnapshotIncompatible)
	}
	for _, o := range ref.NetworkOverrides {
		if !slices.Contains(snap.Info.NetworkInterfaces, o.IfaceID) {
			return fmt.Errorf("restore %s/%s: network override for %q, which the snapshot does not have: %w", ref.VMID, ref.SnapshotID, o.IfaceID, vm.ErrSnapshotIncompatible)
		}
	}
	if len(ref.NetworkOverrides) > 0 {
		if err := fcapi.Require(v, fcapi.FeatureNetworkOverrides); err != nil {
			return err
		}
	}
	if ref.VsockOverride != nil {
		if snap.Config.Vsock == nil {
			return fmt.Errorf("restore %s/%s: vsock override, but the snapshot has no vsock device: %w", ref.VMID, ref.SnapshotID, vm.ErrSnapshotIncompatible)
		}
		if err := fcapi.Require(v, fcapi.FeatureVsockOverride); err != nil {
			return err
		}
	}
	return nil
}

// restore loads snap into the fresh process of m. A failed load ends the
// Firecracker process; the caller's rollback then removes everything.
func (p *Provider) restore(ctx context.Context, m *machine, cfg vm.Config, snap *snapshotMeta, rb *cleanup.Stack) error {
	if err := p.checkRestore(m.version, cfg, snap); err != nil {
		return err
	}
	ref := cfg.RestoreFrom

	memPath := snap.Info.MemoryPath
	if snap.Info.Type == vm.SnapshotDiff {
		files, err := p.chain(snap)
		if err != nil {
			return fmt.Errorf("restore %s/%s: %w", ref.VMID, ref.SnapshotID, err)
		}
		memPath = filepath.Join(m.runDir, mergedMemName)
		if err := memfile.Merge(memPath, files[0], files[1:]...); err != nil {
			return fmt.Errorf("restore %s/%s: %w", ref.VMID, ref.SnapshotID, err)
		}
	}

	// The restored VM's devices are the snapshot's, with the overrides.
	restored := snap.Config.Clone()
	restored.ID = cfg.ID
	restored.RestoreFrom = ref.Clone()
	restored.TrackDirtyPages = cfg.TrackDirtyPages
	// The namespace is the restore's own, not the one the source VM ran in.
	restored.NetNS = cfg.NetNS
	for _, o := range ref.NetworkOverrides {
		for i := range restored.NetworkInterfaces {
			if restored.NetworkInterfaces[i].IfaceID == o.IfaceID {
				restored.NetworkInterfaces[i].HostDevName = o.HostDevName
			}
		}
	}

	opts := fcapi.LoadOptions{
		TrackDirtyPages: cfg.TrackDirtyPages,
		ResumeVM:        ref.ResumeImmediately,
	}
	for _, o := range ref.NetworkOverrides {
		opts.NetworkOverrides = append(opts.NetworkOverrides, fcapi.NetworkOverride{IfaceID: o.IfaceID, HostDevName: o.HostDevName})
	}
	if snap.Config.Vsock != nil {
		hostPath := snap.Config.Vsock.UDSPath
		if ref.VsockOverride != nil {
			hostPath = ref.VsockOverride.UDSPath
		}
		// Firecracker binds the vsock socket during the load and fails with
		// "Address in use" when the file exists, so clear a stale one.
		if err := clearStaleSocket(hostPath); err != nil {
			if errors.Is(err, errSocketInUse) && ref.VsockOverride == nil {
				if reqErr := fcapi.Require(m.version, fcapi.FeatureVsockOverride); reqErr != nil {
					return fmt.Errorf("restore %s/%s: the snapshot's vsock path %s is in use and %w", ref.VMID, ref.SnapshotID, hostPath, reqErr)
				}
				return fmt.Errorf("restore %s/%s: the snapshot's vsock path %s is in use, set a vsock override: %w", ref.VMID, ref.SnapshotID, hostPath, err)
			}
			return fmt.Errorf("restore %s/%s: %w", ref.VMID, ref.SnapshotID, err)
		}
		if ref.VsockOverride != nil {
			jailed, err := m.socketPathInJail(hostPath)
			if err != nil {
				return err
			}
			opts.VsockOverride = &fcapi.VsockOverride{UDSPath: jailed}
		}
		restored.Vsock.UDSPath = hostPath
	}

	statePath := snap.Info.StatePath
	if m.jail != nil {
		// The snapshot refers to its drives by their paths in the old jail,
		// which are the same names in this one.
		for _, d := range snap.Config.Drives() {
			if _, err := m.jail.stage(d.PathOnHost, driveName(d.ID), !d.IsReadOnly); err != nil {
				return err
			}
		}
		var err error
		if statePath, memPath, err = m.jail.stageSnapshot(statePath, memPath); err != nil {
			return err
		}
	}
	opts.SnapshotPath = statePath
	if p.cfg.RestoreMemory == MemoryUffd {
		sock := filepath.Join(m.runDir, uffdSocketName)
		hostMem := memPath
		opts.UffdSocketPath = sock
		if m.jail != nil {
			// The jailed Firecracker connects to the socket in its chroot.
			hostMem = m.jail.hostPath(memPath)
			opts.UffdSocketPath = "/run/" + uffdSocketName
			sock = m.jail.hostPath(opts.UffdSocketPath)
		}
		h, err := uffd.Listen(sock, hostMem, p.log.With("vm", cfg.ID))
		if err != nil {
			return fmt.Errorf("restore %s/%s: %w", ref.VMID, ref.SnapshotID, err)
		}
		m.uffd = h
		rb.Add(func(context.Context) error { return h.Close() })
	} else {
		opts.MemFilePath = memPath
	}

	params, err := fcapi.NewLoadParams(m.version, opts)
	if err != nil {
		return err
	}
	if err := m.client.LoadSnapshot(ctx, params); err != nil {
		return fmt.Errorf("restore %s/%s: %w", ref.VMID, ref.SnapshotID, p.apiFailure(m, err))
	}

	m.cfg = restored
	m.trackDirty = cfg.TrackDirtyPages
	m.parent = &snapshotKey{VMID: ref.VMID, SnapshotID: ref.SnapshotID}
	m.state = vm.StatePaused
	if ref.ResumeImmediately {
		m.state = vm.StateRunning
	}
	return nil
}
