package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/embervm/ember/internal/fsutil"
	"github.com/embervm/ember/vm"
)

// MemoryMerger writes the memory of a diff snapshot onto a copy of its
// base. Backends provide it; Firecracker's diff memory files are sparse
// files whose data regions are the dirty pages.
type MemoryMerger interface {
	// MergeMemory applies the memory file diff onto dst, which already
	// contains the merged memory of the diff's ancestors.
	MergeMemory(ctx context.Context, dst, diff string) error
}

// Flatten merges the chain ending at snapshot id of VM vmID into a new
// full snapshot newID of the same VM, with its files in dir. The state file
// is the last snapshot's; the memory is the base's with every diff applied
// in order. The chain is left untouched.
func (s *Store) Flatten(ctx context.Context, vmID, id, newID, dir string, merger MemoryMerger) (m Manifest, err error) {
	if err := vm.ValidateSnapshotID(newID); err != nil {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: %w", vmID, id, err)
	}
	chain, err := s.Chain(vmID, id)
	if err != nil {
		return Manifest{}, err
	}
	for _, link := range chain {
		if err := verifyFiles(ctx, link, false); err != nil {
			return Manifest{}, err
		}
	}
	last := chain[len(chain)-1]
	state, ok := last.File("state")
	if !ok {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: no state file", vmID, id)
	}
	baseMem, ok := chain[0].File("memory")
	if !ok {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: the base has no memory file", vmID, id)
	}
	if len(chain) > 1 && merger == nil {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: backend %s: %w", vmID, id, last.Backend,
			&vm.UnsupportedError{Feature: "diff snapshot merge", Backend: last.Backend})
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: %w", vmID, id, err)
	}
	statePath := filepath.Join(dir, newID+".state")
	memPath := filepath.Join(dir, newID+".mem")
	defer func() {
		if err != nil {
			os.Remove(statePath)
			os.Remove(memPath)
		}
	}()
	if _, err := fsutil.CopyFile(statePath, state.Path); err != nil {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: copy state: %w", vmID, id, err)
	}
	if _, err := fsutil.CopyFile(memPath, baseMem.Path); err != nil {
		return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: copy base memory: %w", vmID, id, err)
	}
	for _, link := range chain[1:] {
		mem, ok := link.File("memory")
		if !ok {
			return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: diff %s has no memory file", vmID, id, link.ID)
		}
		if err := merger.MergeMemory(ctx, memPath, mem.Path); err != nil {
			return Manifest{}, fmt.Errorf("flatten snapshot %s/%s: merge %s: %w", vmID, id, link.ID, err)
		}
	}

	info := vm.SnapshotInfo{
		ID: newID, VMID: vmID, Type: vm.SnapshotFull, Backend: last.Backend, VMMVersion: last.VMMVersion,
		VCPUCount: last.VCPUCount, MemSizeMiB: last.MemSizeMiB, DriveIDs: last.DriveIDs,
		NetworkInterfaces: last.NetworkInterfaces, VsockCID: last.VsockCID,
		StatePath: statePath, MemoryPath: memPath, CreatedAt: time.Now().UTC(),
	}
	m, err = s.Record(ctx, info, last.VMMVersion, Inputs{})
	if err != nil {
		return Manifest{}, err
	}
	m.KernelSHA256, m.RootfsSHA256 = last.KernelSHA256, last.RootfsSHA256
	s.mu.Lock()
	defer s.mu.Unlock()
	return m, writeManifest(s.manifestPath(vmID, newID), &m)
}

// Policy is a retention policy for [Store.GC].
type Policy struct {
	// KeepLast keeps the newest KeepLast snapshots of each VM; 0 keeps all.
	KeepLast int
	// MaxAge deletes snapshots older than MaxAge; 0 disables the rule.
	MaxAge time.Duration
	// Keep protects snapshots from deletion, such as those a pool bucket
	// restores from.
	Keep []vm.SnapshotRef
}

// GC deletes the snapshots the policy does not keep and returns them. A
// snapshot that another snapshot depends on is kept while the dependant
// exists.
func (s *Store) GC(ctx context.Context, p Policy, now time.Time) ([]Manifest, error) {
	all, err := s.List("")
	if err != nil {
		return nil, err
	}
	type key struct{ vmID, id string }
	protected := map[key]bool{}
	for _, r := range p.Keep {
		protected[key{r.VMID, r.SnapshotID}] = true
	}
	byVM := map[string][]Manifest{}
	for _, m := range all {
		byVM[m.VMID] = append(byVM[m.VMID], m)
	}
	var victims []Manifest
	for _, list := range byVM {
		sort.Slice(list, func(i, j int) bool { return list[i].CreatedAt.After(list[j].CreatedAt) })
		for i, m := range list {
			old := p.MaxAge > 0 && now.Sub(m.CreatedAt) > p.MaxAge
			excess := p.KeepLast > 0 && i >= p.KeepLast
			if (old || excess) && !protected[key{m.VMID, m.ID}] {
				victims = append(victims, m)
			}
		}
	}
	// Delete dependants before parents: repeat while progress is made.
	var deleted []Manifest
	for len(victims) > 0 {
		var rest []Manifest
		for _, m := range victims {
			if err := ctx.Err(); err != nil {
				return deleted, err
			}
			err := s.Delete(m.VMID, m.ID)
			switch {
			case err == nil:
				deleted = append(deleted, m)
			case errors.Is(err, ErrHasDependants):
				rest = append(rest, m)
			default:
				return deleted, err
			}
		}
		if len(rest) == len(victims) {
			break
		}
		victims = rest
	}
	return deleted, nil
}
