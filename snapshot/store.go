// Package snapshot keeps snapshots as first-class objects, independent of
// the VM that made them.
//
// A provider writes a snapshot's files; [Store.Record] then describes them in
// a manifest: backend and exact VMM version, kernel and root filesystem
// digests, machine shape, devices, parent (for diffs), the size and SHA-256
// digest of every file, and the creation time. Manifests are written
// crash-safely (temporary file, fsync, rename, fsync of the directory) under
// <root>/<vm id>/<snapshot id>.json.
//
// Before a restore, [Store.Check] verifies compatibility without starting
// anything: same backend, a VMM version that can load the snapshot, the
// expected machine shape, and files present with their recorded sizes. Full
// digest verification runs on request, and always after the store was not
// closed cleanly (a crash may have left a file short or torn).
//
// Diff snapshots form chains through their parent. [Store.Flatten] merges a
// chain into a new full snapshot with a backend's [MemoryMerger], [Store.Delete]
// refuses to delete a snapshot another one depends on, and [Store.GC] applies
// a retention policy.
package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/embervm/ember/internal/fsutil"
	"github.com/embervm/ember/vm"
)

// ManifestVersion is the manifest schema this package writes and reads.
const ManifestVersion = 1

// ErrHasDependants means a snapshot is the parent of another snapshot.
var ErrHasDependants = errors.New("snapshot has dependants")

// File is one file of a snapshot.
type File struct {
	// Role is "state", "memory" or another backend-specific name.
	Role   string `json:"role"`
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Manifest describes a stored snapshot.
type Manifest struct {
	Version    int             `json:"manifest_version"`
	ID         string          `json:"id"`
	VMID       string          `json:"vm_id"`
	Type       vm.SnapshotType `json:"type"`
	Parent     string          `json:"parent,omitempty"`
	Backend    string          `json:"backend"`
	VMMVersion string          `json:"vmm_version"`

	KernelSHA256 string `json:"kernel_sha256,omitempty"`
	RootfsSHA256 string `json:"rootfs_sha256,omitempty"`

	VCPUCount         int      `json:"vcpu_count"`
	MemSizeMiB        int      `json:"mem_size_mib"`
	DriveIDs          []string `json:"drive_ids,omitempty"`
	NetworkInterfaces []string `json:"network_interfaces,omitempty"`
	VsockCID          uint32   `json:"vsock_cid,omitempty"`

	Files     []File    `json:"files"`
	CreatedAt time.Time `json:"created_at"`
}

// Ref returns the reference that restores m.
func (m *Manifest) Ref() vm.SnapshotRef { return vm.SnapshotRef{VMID: m.VMID, SnapshotID: m.ID} }

// File returns the file with role, if any.
func (m *Manifest) File(role string) (File, bool) {
	for _, f := range m.Files {
		if f.Role == role {
			return f, true
		}
	}
	return File{}, false
}

// Inputs are files a snapshot depends on but does not contain.
type Inputs struct {
	// Kernel and Rootfs are hashed into the manifest, when set, so a
	// restore can tell that the guest's files changed.
	Kernel string
	Rootfs string
}

// Store is a directory of snapshot manifests. Its methods are safe for
// concurrent use within one process; the store takes no lock between
// processes.
type Store struct {
	root string
	// recovered is set when the previous user did not close the store, so
	// every check verifies digests.
	recovered bool

	mu sync.Mutex
}

// markerName is the file that exists while a store is open.
const markerName = ".open"

// Open opens (creating when needed) the store under root. It removes
// temporary files left by an interrupted write.
func Open(root string) (*Store, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	s := &Store{root: root}
	marker := filepath.Join(root, markerName)
	if _, err := os.Stat(marker); err == nil {
		s.recovered = true
	}
	if err := removeTemps(root); err != nil {
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	return s, nil
}

// Close marks the store as cleanly closed.
func (s *Store) Close() error {
	err := os.Remove(filepath.Join(s.root, markerName))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// Recovered reports whether the store was not closed cleanly last time.
func (s *Store) Recovered() bool { return s.recovered }

// Root returns the store's directory.
func (s *Store) Root() string { return s.root }

func removeTemps(root string) error {
	return filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasPrefix(d.Name(), ".tmp-") {
			return os.Remove(path)
		}
		return nil
	})
}

func (s *Store) manifestPath(vmID, id string) string {
	return filepath.Join(s.root, vmID, id+".json")
}

// Record hashes the files of a snapshot a provider wrote and stores its
// manifest. vmmVersion is the exact version of the VMM that wrote it.
func (s *Store) Record(ctx context.Context, info vm.SnapshotInfo, vmmVersion string, in Inputs) (Manifest, error) {
	if err := vm.ValidateID(info.VMID); err != nil {
		return Manifest{}, fmt.Errorf("record snapshot: vm id: %w", err)
	}
	if err := vm.ValidateSnapshotID(info.ID); err != nil {
		return Manifest{}, fmt.Errorf("record snapshot: %w", err)
	}
	if vmmVersion == "" {
		vmmVersion = info.VMMVersion
	}
	m := Manifest{
		Version:           ManifestVersion,
		ID:                info.ID,
		VMID:              info.VMID,
		Type:              info.Type,
		Parent:            info.Parent,
		Backend:           info.Backend,
		VMMVersion:        vmmVersion,
		VCPUCount:         info.VCPUCount,
		MemSizeMiB:        info.MemSizeMiB,
		DriveIDs:          info.DriveIDs,
		NetworkInterfaces: info.NetworkInterfaces,
		VsockCID:          info.VsockCID,
		CreatedAt:         info.CreatedAt,
	}
	if m.Type == "" {
		m.Type = vm.SnapshotFull
	}
	if m.CreatedAt.IsZero() {
		m.CreatedAt = time.Now().UTC()
	}
	if m.Type == vm.SnapshotDiff && m.Parent == "" {
		return Manifest{}, fmt.Errorf("record snapshot %s/%s: diff snapshot without a parent", info.VMID, info.ID)
	}
	for _, f := range []struct{ role, path string }{{"state", info.StatePath}, {"memory", info.MemoryPath}} {
		if f.path == "" {
			continue
		}
		file, err := hashFile(ctx, f.role, f.path)
		if err != nil {
			return Manifest{}, fmt.Errorf("record snapshot %s/%s: %w", info.VMID, info.ID, err)
		}
		m.Files = append(m.Files, file)
	}
	if len(m.Files) == 0 {
		return Manifest{}, fmt.Errorf("record snapshot %s/%s: no files", info.VMID, info.ID)
	}
	for _, in := range []struct {
		path string
		dst  *string
	}{{in.Kernel, &m.KernelSHA256}, {in.Rootfs, &m.RootfsSHA256}} {
		if in.path == "" {
			continue
		}
		f, err := hashFile(ctx, "input", in.path)
		if err != nil {
			return Manifest{}, fmt.Errorf("record snapshot %s/%s: %w", info.VMID, info.ID, err)
		}
		*in.dst = f.SHA256
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if m.Parent != "" {
		if _, err := s.getLocked(m.VMID, m.Parent); err != nil {
			return Manifest{}, fmt.Errorf("record snapshot %s/%s: parent: %w", info.VMID, info.ID, err)
		}
	}
	if _, err := os.Stat(s.manifestPath(m.VMID, m.ID)); err == nil {
		return Manifest{}, fmt.Errorf("record snapshot %s/%s: %w", m.VMID, m.ID, vm.ErrSnapshotExists)
	}
	if err := writeManifest(s.manifestPath(m.VMID, m.ID), &m); err != nil {
		return Manifest{}, fmt.Errorf("record snapshot %s/%s: %w", m.VMID, m.ID, err)
	}
	return m, nil
}

// Get returns the manifest of snapshot id of VM vmID.
func (s *Store) Get(vmID, id string) (Manifest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.getLocked(vmID, id)
}

func (s *Store) getLocked(vmID, id string) (Manifest, error) {
	if vm.ValidateID(vmID) != nil || vm.ValidateSnapshotID(id) != nil {
		return Manifest{}, fmt.Errorf("snapshot %s/%s: %w", vmID, id, vm.ErrSnapshotNotFound)
	}
	data, err := os.ReadFile(s.manifestPath(vmID, id))
	if errors.Is(err, os.ErrNotExist) {
		return Manifest{}, fmt.Errorf("snapshot %s/%s: %w", vmID, id, vm.ErrSnapshotNotFound)
	}
	if err != nil {
		return Manifest{}, fmt.Errorf("read snapshot manifest: %w", err)
	}
	return decodeManifest(data)
}

func decodeManifest(data []byte) (Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return Manifest{}, fmt.Errorf("decode snapshot manifest: %w", err)
	}
	if m.Version != ManifestVersion {
		return Manifest{}, fmt.Errorf("decode snapshot manifest %s/%s: version %d, this ember reads %d", m.VMID, m.ID, m.Version, ManifestVersion)
	}
	return m, nil
}

// List returns every manifest, sorted by VM id and creation time. vmID
// filters to one VM when it is not empty.
func (s *Store) List(vmID string) ([]Manifest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.listLocked(vmID)
}

func (s *Store) listLocked(vmID string) ([]Manifest, error) {
	pattern := filepath.Join(s.root, "*", "*.json")
	if vmID != "" {
		pattern = filepath.Join(s.root, vmID, "*.json")
	}
	paths, err := filepath.Glob(pattern)
	if err != nil {
		return nil, err
	}
	out := make([]Manifest, 0, len(paths))
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		m, err := decodeManifest(data)
		if err != nil {
			return nil, fmt.Errorf("list snapshots: %s: %w", p, err)
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].VMID != out[j].VMID {
			return out[i].VMID < out[j].VMID
		}
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// Chain returns the snapshot and its ancestors, the full snapshot first.
func (s *Store) Chain(vmID, id string) ([]Manifest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var chain []Manifest
	seen := map[string]bool{}
	for cur := id; cur != ""; {
		if seen[cur] {
			return nil, fmt.Errorf("snapshot chain of %s/%s: cycle at %s", vmID, id, cur)
		}
		seen[cur] = true
		m, err := s.getLocked(vmID, cur)
		if err != nil {
			return nil, err
		}
		chain = append(chain, m)
		cur = m.Parent
	}
	for i, j := 0, len(chain)-1; i < j; i, j = i+1, j-1 {
		chain[i], chain[j] = chain[j], chain[i]
	}
	if chain[0].Type != vm.SnapshotFull {
		return nil, fmt.Errorf("snapshot chain of %s/%s starts with a %s snapshot", vmID, id, chain[0].Type)
	}
	return chain, nil
}

// Delete removes a snapshot's manifest and files. A snapshot that is the
// parent of another fails with ErrHasDependants.
func (s *Store) Delete(vmID, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.getLocked(vmID, id)
	if err != nil {
		return err
	}
	all, err := s.listLocked(vmID)
	if err != nil {
		return err
	}
	for _, other := range all {
		if other.Parent == id {
			return fmt.Errorf("delete snapshot %s/%s: %w: %s", vmID, id, ErrHasDependants, other.ID)
		}
	}
	// The manifest goes first: a crash between the two steps leaves
	// orphaned files, never a manifest that points at missing files.
	if err := os.Remove(s.manifestPath(vmID, id)); err != nil {
		return fmt.Errorf("delete snapshot %s/%s: %w", vmID, id, err)
	}
	var errs []error
	for _, f := range m.Files {
		if err := os.Remove(f.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete snapshot %s/%s files: %w", vmID, id, err)
	}
	s.removeEmptyDirs(vmID, m.Files)
	return nil
}

// removeEmptyDirs removes the directories under the store's root that the
// deletion of a snapshot of vmID left empty: those that held its files
// (such as the output of Flatten) and the VM's manifest directory. A
// directory that is not empty stays, and so does everything outside the
// root, which belongs to a provider. The caller holds s.mu, and
// writeManifest copes with a directory removed by another process.
func (s *Store) removeEmptyDirs(vmID string, files []File) {
	vmDir := filepath.Join(s.root, vmID)
	var dirs []string
	for _, f := range files {
		dir := filepath.Dir(f.Path)
		if rel, err := filepath.Rel(vmDir, dir); err == nil && rel != "." && filepath.IsLocal(rel) {
			dirs = append(dirs, dir)
		}
	}
	slices.Sort(dirs)
	for _, dir := range slices.Backward(slices.Compact(dirs)) {
		os.Remove(dir)
	}
	os.Remove(vmDir)
}

func hashFile(ctx context.Context, role, path string) (File, error) {
	f, err := os.Open(path)
	if err != nil {
		return File{}, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, &ctxReader{ctx: ctx, r: f})
	if err != nil {
		return File{}, fmt.Errorf("hash %s: %w", path, err)
	}
	return File{Role: role, Path: path, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// ctxReader stops a long read when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// writeManifest writes a manifest crash-safely, creating its VM's
// directory when needed.
func writeManifest(path string, m *Manifest) error {
	// Another process may remove the directory between the two steps when
	// it deletes the VM's last snapshot, so a second attempt recreates it.
	var err error
	for range 2 {
		if err = os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		if err = fsutil.WriteJSONAtomic(path, m, 0o644); !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return err
}
