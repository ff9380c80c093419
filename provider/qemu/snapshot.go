package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/embervm/ember/internal/fsutil"
	"github.com/embervm/ember/vm"
)

// Files of a snapshot directory <SnapshotDir>/<vm id>/<snapshot id>/.
const (
	snapshotMetaName  = "machine.json"
	snapshotStateName = "state"
	snapshotDriveDir  = "drives"
	// snapshotFormat is the version of machine.json. Restore rejects
	// other versions.
	snapshotFormat = 1
	// migrationFDName names the snapshot file's descriptor inside QEMU
	// between getfd and migrate.
	migrationFDName = "ember-snapshot"
)

// snapshotMeta is machine.json: what a restore needs besides the
// migration stream.
type snapshotMeta struct {
	Format      int    `json:"format"`
	Backend     string `json:"backend"`
	QEMUVersion string `json:"qemu_version"`
	// Accel is the accelerator the VM ran under. A restore must use the
	// same one, because the CPU model differs: -cpu host under KVM, QEMU's
	// default model under TCG.
	Accel     Accel     `json:"accel"`
	ID        string    `json:"id"`
	VMID      string    `json:"vm_id"`
	CreatedAt time.Time `json:"created_at"`
	Machine   machine   `json:"machine"`
	// StateSize is the length of the state file in bytes.
	StateSize int64 `json:"state_size"`
	// Drives parallels Machine.Drives.
	Drives []snapshotDrive `json:"drives,omitempty"`
}

// snapshotDrive records how a snapshot holds one drive. A writable drive
// is copied into the snapshot, because the guest's page cache in the
// migration stream must match the disk it is restored with, and every
// restored VM needs a disk of its own. A read-only drive is referenced at
// its original path, and its size and modification time must not change
// until every restore is done.
type snapshotDrive struct {
	// Copy is the file name under drives/ of a writable drive's copy.
	Copy    string    `json:"copy,omitempty"`
	Size    int64     `json:"size"`
	ModTime time.Time `json:"mod_time,omitzero"`
}

// Snapshot saves a paused VM as a full snapshot: QEMU migrates the machine
// state and all guest memory into a file, and writable drives are copied
// next to it. The VM stays paused and can be resumed. Diff snapshots are
// not supported.
func (p *Provider) Snapshot(ctx context.Context, id string, opts vm.SnapshotOptions) (vm.SnapshotInfo, error) {
	if opts.Type != "" && opts.Type != vm.SnapshotFull {
		if opts.Type == vm.SnapshotDiff {
			return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, &vm.UnsupportedError{Feature: "diff snapshots", Backend: backendName, Version: p.version})
		}
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, &vm.ValidationError{Problems: []vm.FieldError{{Field: "type", Problem: fmt.Sprintf("%q is invalid, must be full or diff", opts.Type)}}})
	}
	if err := vm.ValidateSnapshotID(opts.ID); err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	inst, err := p.lookup(id)
	if err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q: %w", id, err)
	}
	inst.opMu.Lock()
	defer inst.opMu.Unlock()

	if err := inst.check(vm.OpSnapshot); err != nil {
		return vm.SnapshotInfo{}, err
	}
	meta, err := p.snapshot(ctx, inst, opts.ID)
	if err != nil {
		return vm.SnapshotInfo{}, fmt.Errorf("snapshot vm %q as %q: %w", id, opts.ID, err)
	}
	p.log.Info("snapshot created", "vm", id, "snapshot", opts.ID, "state_bytes", meta.StateSize)
	return p.snapshotInfo(meta), nil
}

func (p *Provider) snapshot(ctx context.Context, inst *instance, snapID string) (meta *snapshotMeta, err error) {
	mon, err := inst.mon()
	if err != nil {
		return nil, err
	}
	vmID := inst.vmID()
	parent := filepath.Join(p.snapshotDir, vmID)
	final := filepath.Join(parent, snapID)
	if _, err := os.Lstat(final); err == nil {
		return nil, vm.ErrSnapshotExists
	}
	// Write into a hidden temporary directory and rename it at the end,
	// so that a crash never leaves a snapshot that looks complete.
	tmp, err := mkdirTempIn(parent, "."+snapID+".tmp-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()

	// QEMU 7.2 refuses to migrate a VM a second time until it has run
	// again ("paused due to previous migration"). The guest has not run
	// since the previous snapshot, so its state file is still exact and
	// is copied instead.
	inst.mu.Lock()
	previous := inst.migratedTo
	inst.mu.Unlock()
	var size int64
	if previous != "" {
		size, err = fsutil.CopyFile(filepath.Join(tmp, snapshotStateName), filepath.Join(previous, snapshotStateName))
		if err != nil {
			return nil, fmt.Errorf("copy the state of the previous snapshot %s, which qemu requires while the vm has not run since: %w", previous, err)
		}
	} else {
		size, err = migrateToFile(ctx, mon, filepath.Join(tmp, snapshotStateName))
		if err != nil {
			return nil, err
		}
	}

	inst.mu.Lock()
	m := inst.mach
	inst.mu.Unlock()
	meta = &snapshotMeta{
		Format:      snapshotFormat,
		Backend:     backendName,
		QEMUVersion: p.version,
		Accel:       inst.accel,
		ID:          snapID,
		VMID:        vmID,
		CreatedAt:   time.Now().UTC(),
		Machine:     m,
		StateSize:   size,
	}
	if err := os.Mkdir(filepath.Join(tmp, snapshotDriveDir), 0o700); err != nil {
		return nil, err
	}
	for i, d := range m.Drives {
		sd, err := snapshotDriveFile(d, i, filepath.Join(tmp, snapshotDriveDir))
		if err != nil {
			return nil, fmt.Errorf("save drive %q: %w", d.ID, err)
		}
		meta.Drives = append(meta.Drives, sd)
	}
	if err := writeJSONFile(filepath.Join(tmp, snapshotMetaName), meta); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, err
	}
	inst.mu.Lock()
	inst.migratedTo = final
	inst.mu.Unlock()
	return meta, fsutil.SyncDir(parent)
}

// migrateToFile migrates the paused VM behind mon into a new file at path
// and returns the file's size. QEMU 7.2 has no file: migration URI, so the
// file's descriptor is handed to QEMU over the QMP socket (getfd) and the
// migration writes to fd:<name>.
func migrateToFile(ctx context.Context, mon *monitor, path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()

	// The default migration bandwidth limit, 32 MiB/s in QEMU 7.2, would
	// make a 256 MiB snapshot take seconds. A local file needs none.
	params := map[string]any{"max-bandwidth": int64(1) << 40}
	if err := mon.run(ctx, "migrate-set-parameters", params, nil); err != nil {
		return 0, err
	}
	if err := mon.runWithFile(ctx, "getfd", map[string]any{"fdname": migrationFDName}, f, nil); err != nil {
		return 0, err
	}
	if err := mon.run(ctx, "migrate", map[string]any{"uri": "fd:" + migrationFDName}, nil); err != nil {
		mon.run(context.Background(), "closefd", map[string]any{"fdname": migrationFDName}, nil)
		return 0, err
	}
	if err := waitMigration(ctx, mon); err != nil {
		return 0, err
	}
	if err := f.Sync(); err != nil {
		return 0, err
	}
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// waitMigration polls query-migrate until the outgoing migration ends.
// When ctx ends first it cancels the migration.
func waitMigration(ctx context.Context, mon *monitor) error {
	for {
		var status struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := mon.run(ctx, "query-migrate", nil, &status); err != nil {
			return err
		}
		switch status.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", status.Status, status.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			mon.run(context.Background(), "migrate_cancel", nil, nil)
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// snapshotDriveFile copies writable drive d (at index i) into dir, or
// records the identity of a read-only one.
func snapshotDriveFile(d machineDrive, i int, dir string) (snapshotDrive, error) {
	st, err := os.Stat(d.Path)
	if err != nil {
		return snapshotDrive{}, err
	}
	if d.ReadOnly {
		return snapshotDrive{Size: st.Size(), ModTime: st.ModTime().UTC()}, nil
	}
	name := fmt.Sprintf("%d-%s.img", i, d.ID)
	size, err := fsutil.CopyFile(filepath.Join(dir, name), d.Path)
	if err != nil {
		return snapshotDrive{}, err
	}
	return snapshotDrive{Copy: name, Size: size}, nil
}

// readSnapshot reads and checks the metadata of snapshot snapID of VM
// vmID.
func (p *Provider) readSnapshot(vmID, snapID string) (*snapshotMeta, error) {
	dir := filepath.Join(p.snapshotDir, vmID, snapID)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("snapshot %s/%s: %w", vmID, snapID, vm.ErrSnapshotNotFound)
	}
	b, err := os.ReadFile(filepath.Join(dir, snapshotMetaName))
	if err != nil {
		return nil, fmt.Errorf("snapshot %s/%s: read metadata: %w: %w", vmID, snapID, ErrSnapshotCorrupt, err)
	}
	var meta snapshotMeta
	if err := json.Unmarshal(b, &meta); err != nil {
		return nil, fmt.Errorf("snapshot %s/%s: decode metadata: %w: %w", vmID, snapID, ErrSnapshotCorrupt, err)
	}
	if meta.Format != snapshotFormat || meta.Backend != backendName {
		return nil, fmt.Errorf("snapshot %s/%s: written by backend %q in format %d, expected %q in format %d: %w",
			vmID, snapID, meta.Backend, meta.Format, backendName, snapshotFormat, vm.ErrSnapshotIncompatible)
	}
	if err := meta.Machine.validate(); err != nil {
		return nil, fmt.Errorf("snapshot %s/%s: machine: %w: %w", vmID, snapID, ErrSnapshotCorrupt, err)
	}
	if len(meta.Drives) != len(meta.Machine.Drives) {
		return nil, fmt.Errorf("snapshot %s/%s: %d drive records for %d drives: %w",
			vmID, snapID, len(meta.Drives), len(meta.Machine.Drives), ErrSnapshotCorrupt)
	}
	for _, d := range meta.Drives {
		if d.Copy != "" && (filepath.Base(d.Copy) != d.Copy || strings.HasPrefix(d.Copy, ".")) {
			return nil, fmt.Errorf("snapshot %s/%s: drive copy name %q is invalid: %w", vmID, snapID, d.Copy, ErrSnapshotCorrupt)
		}
	}
	return &meta, nil
}

// checkRestore checks that snapshot meta can be restored as cfg requests,
// before anything is started.
func (p *Provider) checkRestore(cfg *vm.Config, meta *snapshotMeta, accel Accel) error {
	ref := cfg.RestoreFrom
	name := ref.VMID + "/" + ref.SnapshotID
	dir := filepath.Join(p.snapshotDir, ref.VMID, ref.SnapshotID)
	m := &meta.Machine

	if meta.QEMUVersion != p.version {
		return fmt.Errorf("snapshot %s was written by qemu %s, this is qemu %s: %w", name, meta.QEMUVersion, p.version, vm.ErrSnapshotIncompatible)
	}
	if meta.Accel != accel {
		return fmt.Errorf("snapshot %s was taken under %s, this provider uses %s: %w", name, meta.Accel, accel, vm.ErrSnapshotIncompatible)
	}
	if cfg.VCPUCount != 0 && cfg.VCPUCount != m.VCPUCount {
		return fmt.Errorf("snapshot %s has %d vcpus, the spec expects %d: %w", name, m.VCPUCount, cfg.VCPUCount, vm.ErrSnapshotIncompatible)
	}
	if cfg.MemSizeMiB != 0 && cfg.MemSizeMiB != m.MemSizeMiB {
		return fmt.Errorf("snapshot %s has %d MiB of memory, the spec expects %d MiB: %w", name, m.MemSizeMiB, cfg.MemSizeMiB, vm.ErrSnapshotIncompatible)
	}
	for _, o := range ref.NetworkOverrides {
		if !slices.Contains(m.ifaceIDs(), o.IfaceID) {
			return fmt.Errorf("snapshot %s has no network interface %q to override: %w", name, o.IfaceID, vm.ErrSnapshotIncompatible)
		}
	}
	if ref.VsockOverride != nil {
		return fmt.Errorf("snapshot %s: %w", name, &vm.UnsupportedError{Feature: "vsock_override", Backend: backendName, Version: p.version})
	}
	if m.VsockCID != 0 && !p.vhostVsock {
		return fmt.Errorf("snapshot %s: %w", name, &vm.UnsupportedError{Feature: "vsock without /dev/vhost-vsock", Backend: backendName})
	}

	if err := checkSize(filepath.Join(dir, snapshotStateName), meta.StateSize); err != nil {
		return fmt.Errorf("snapshot %s: state file: %w", name, err)
	}
	for i, d := range meta.Drives {
		drive := m.Drives[i]
		if d.Copy != "" {
			if err := checkSize(filepath.Join(dir, snapshotDriveDir, d.Copy), d.Size); err != nil {
				return fmt.Errorf("snapshot %s: copy of drive %q: %w", name, drive.ID, err)
			}
			continue
		}
		st, err := os.Stat(drive.Path)
		if err != nil {
			return fmt.Errorf("snapshot %s: read-only drive %q: %w: %w", name, drive.ID, vm.ErrSnapshotIncompatible, err)
		}
		if st.Size() != d.Size || !st.ModTime().Equal(d.ModTime) {
			return fmt.Errorf("snapshot %s: read-only drive %q at %s changed since the snapshot: %w", name, drive.ID, drive.Path, vm.ErrSnapshotIncompatible)
		}
	}
	return nil
}

func checkSize(path string, want int64) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrSnapshotCorrupt, err)
	}
	if st.Size() != want {
		return fmt.Errorf("%s is %d bytes, expected %d: %w", path, st.Size(), want, ErrSnapshotCorrupt)
	}
	return nil
}

// prepareRestore returns the machine a restore runs with and the opened
// state file. It applies the TAP overrides and copies each writable
// drive's snapshot copy into the new VM's run directory dir.
func (p *Provider) prepareRestore(cfg *vm.Config, meta *snapshotMeta, dir string) (machine, *os.File, error) {
	ref := cfg.RestoreFrom
	snapDir := filepath.Join(p.snapshotDir, ref.VMID, ref.SnapshotID)
	m := meta.Machine
	m.Drives = slices.Clone(m.Drives)
	m.NICs = slices.Clone(m.NICs)
	for _, o := range ref.NetworkOverrides {
		for i := range m.NICs {
			if m.NICs[i].IfaceID == o.IfaceID {
				m.NICs[i].TAP = o.HostDevName
			}
		}
	}
	if err := os.Mkdir(filepath.Join(dir, driveCopyDir), 0o700); err != nil {
		return machine{}, nil, err
	}
	for i, d := range meta.Drives {
		if d.Copy == "" {
			continue
		}
		dst := filepath.Join(dir, driveCopyDir, d.Copy)
		if _, err := fsutil.CopyFile(dst, filepath.Join(snapDir, snapshotDriveDir, d.Copy)); err != nil {
			return machine{}, nil, fmt.Errorf("copy drive %q for the restored vm: %w", m.Drives[i].ID, err)
		}
		m.Drives[i].Path = dst
	}
	f, err := os.Open(filepath.Join(snapDir, snapshotStateName))
	if err != nil {
		return machine{}, nil, err
	}
	return m, f, nil
}

// finishRestore waits until QEMU has loaded the migration stream, then
// resumes the VM when ref sets ResumeImmediately. A stream that QEMU cannot load
// makes it exit, and its message is returned.
func (p *Provider) finishRestore(ctx context.Context, inst *instance, ref *vm.SnapshotRef) error {
	mon, err := inst.mon()
	if err != nil {
		return p.loadFailure(inst, ref)
	}
	for {
		var status struct {
			Status string `json:"status"`
		}
		if err := mon.run(ctx, "query-status", nil, &status); err != nil {
			// A QEMU that fails to load the stream exits, which breaks
			// the QMP connection a moment before the process wait
			// reports the exit: give the exit time to arrive.
			select {
			case <-inst.exited:
				return p.loadFailure(inst, ref)
			case <-time.After(5 * time.Second):
				return err
			}
		}
		if status.Status == "paused" {
			break
		}
		if status.Status != "inmigrate" {
			return fmt.Errorf("qemu reports status %q after loading the snapshot, expected paused", status.Status)
		}
		select {
		case <-inst.exited:
			return p.loadFailure(inst, ref)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
	if !ref.ResumeImmediately {
		return nil
	}
	if err := mon.run(ctx, "cont", nil, nil); err != nil {
		return err
	}
	return inst.settle(vm.OpResume)
}

func (p *Provider) loadFailure(inst *instance, ref *vm.SnapshotRef) error {
	<-inst.exited
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return fmt.Errorf("qemu could not load snapshot %s/%s: %s: %w",
		ref.VMID, ref.SnapshotID, describeExit(inst.exitErr, inst.stderrTail()), vm.ErrSnapshotIncompatible)
}

// ListSnapshots returns the snapshots of VM vmID, or of every VM when vmID
// is empty, sorted by VM id and creation time. Unreadable snapshots are
// skipped with a warning.
func (p *Provider) ListSnapshots(ctx context.Context, vmID string) ([]vm.SnapshotInfo, error) {
	var vmIDs []string
	if vmID != "" {
		if err := vm.ValidateID(vmID); err != nil {
			return nil, fmt.Errorf("list snapshots of vm %q: %w", vmID, err)
		}
		vmIDs = []string{vmID}
	} else {
		entries, err := os.ReadDir(p.snapshotDir)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		for _, e := range entries {
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				vmIDs = append(vmIDs, e.Name())
			}
		}
	}
	out := []vm.SnapshotInfo{}
	for _, id := range vmIDs {
		entries, err := os.ReadDir(filepath.Join(p.snapshotDir, id))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list snapshots of vm %q: %w", id, err)
		}
		var infos []vm.SnapshotInfo
		for _, e := range entries {
			if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			meta, err := p.readSnapshot(id, e.Name())
			if err != nil {
				p.log.Warn("skipping unreadable snapshot", "vm", id, "snapshot", e.Name(), "err", err)
				continue
			}
			infos = append(infos, p.snapshotInfo(meta))
		}
		slices.SortFunc(infos, func(a, b vm.SnapshotInfo) int { return a.CreatedAt.Compare(b.CreatedAt) })
		out = append(out, infos...)
	}
	return out, nil
}

// DeleteSnapshot removes snapshot snapshotID of VM vmID. VMs restored from
// it are not affected: they run on their own copies of the writable
// drives, and QEMU reads the state file only while restoring.
func (p *Provider) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	if err := vm.ValidateID(vmID); err != nil {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, err)
	}
	if err := vm.ValidateSnapshotID(snapshotID); err != nil {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, err)
	}
	dir := filepath.Join(p.snapshotDir, vmID, snapshotID)
	if _, err := os.Lstat(dir); err != nil {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, vm.ErrSnapshotNotFound)
	}
	// Rename first so that a crash during removal leaves a hidden
	// directory, never a partial snapshot that looks valid.
	trash, err := os.MkdirTemp(filepath.Join(p.snapshotDir, vmID), "."+snapshotID+".delete-")
	if err != nil {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, err)
	}
	target := filepath.Join(trash, snapshotID)
	if err := os.Rename(dir, target); err != nil {
		os.Remove(trash)
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, err)
	}
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("delete snapshot %q of vm %q: %w", snapshotID, vmID, err)
	}
	// The VM's directory goes with its last snapshot. While other
	// snapshots are left in it, the removal fails and changes nothing.
	os.Remove(filepath.Join(p.snapshotDir, vmID))
	return nil
}

// mkdirTempIn creates a temporary directory in parent, creating parent
// first. DeleteSnapshot removes a VM's directory when its last snapshot
// goes, which can happen between the two steps, so a second attempt
// recreates it.
func mkdirTempIn(parent, pattern string) (string, error) {
	var err error
	for range 2 {
		if err = os.MkdirAll(parent, 0o700); err != nil {
			return "", err
		}
		var dir string
		if dir, err = os.MkdirTemp(parent, pattern); !errors.Is(err, fs.ErrNotExist) {
			return dir, err
		}
	}
	return "", err
}

func (p *Provider) snapshotInfo(meta *snapshotMeta) vm.SnapshotInfo {
	return vm.SnapshotInfo{
		ID:                meta.ID,
		VMID:              meta.VMID,
		Type:              vm.SnapshotFull,
		Backend:           backendName,
		VMMVersion:        meta.QEMUVersion,
		VCPUCount:         meta.Machine.VCPUCount,
		MemSizeMiB:        meta.Machine.MemSizeMiB,
		DriveIDs:          meta.Machine.driveIDs(),
		NetworkInterfaces: meta.Machine.ifaceIDs(),
		VsockCID:          meta.Machine.VsockCID,
		StatePath:         filepath.Join(p.snapshotDir, meta.VMID, meta.ID, snapshotStateName),
		CreatedAt:         meta.CreatedAt,
	}
}
