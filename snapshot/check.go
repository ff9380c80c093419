package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/embervm/ember/vm"
)

// Target is the backend a restore will run on and the shape it expects.
type Target struct {
	Backend    string
	VMMVersion string
	// VCPUCount and MemSizeMiB, when not zero, must match the snapshot.
	VCPUCount  int
	MemSizeMiB int
	// FullVerify hashes every file instead of checking sizes only.
	FullVerify bool
}

// Check verifies that snapshot id of VM vmID can be restored on t: same
// backend, a compatible VMM version, the expected shape, and every file of
// the snapshot's chain present with its recorded size (and digest when
// t.FullVerify is set or the store is recovering from a crash). Failures
// match vm.ErrSnapshotIncompatible, except a missing manifest, which
// matches vm.ErrSnapshotNotFound.
func (s *Store) Check(ctx context.Context, vmID, id string, t Target) (Manifest, error) {
	chain, err := s.Chain(vmID, id)
	if err != nil {
		return Manifest{}, err
	}
	m := chain[len(chain)-1]
	var problems []string
	if t.Backend != "" && m.Backend != t.Backend {
		problems = append(problems, fmt.Sprintf("written by backend %s, restoring on %s", m.Backend, t.Backend))
	}
	if t.VMMVersion != "" && !VersionCompatible(m.Backend, m.VMMVersion, t.VMMVersion) {
		problems = append(problems, fmt.Sprintf("written by %s %s, which %s %s cannot load", m.Backend, m.VMMVersion, t.Backend, t.VMMVersion))
	}
	if t.VCPUCount != 0 && t.VCPUCount != m.VCPUCount {
		problems = append(problems, fmt.Sprintf("has %d vCPUs, %d expected", m.VCPUCount, t.VCPUCount))
	}
	if t.MemSizeMiB != 0 && t.MemSizeMiB != m.MemSizeMiB {
		problems = append(problems, fmt.Sprintf("has %d MiB of memory, %d expected", m.MemSizeMiB, t.MemSizeMiB))
	}
	if len(problems) > 0 {
		return m, fmt.Errorf("snapshot %s/%s %s: %w", vmID, id, strings.Join(problems, "; "), vm.ErrSnapshotIncompatible)
	}
	full := t.FullVerify || s.recovered
	for _, link := range chain {
		if err := verifyFiles(ctx, link, full); err != nil {
			return m, err
		}
	}
	return m, nil
}

// ErrDamaged means a snapshot's files differ from its manifest: missing,
// of another size, or, in a full check, with other contents. It also
// matches vm.ErrSnapshotIncompatible, because such a snapshot cannot be
// restored.
var ErrDamaged error = damagedError{}

type damagedError struct{}

func (damagedError) Error() string { return "snapshot files damaged" }

func (damagedError) Is(target error) bool { return target == vm.ErrSnapshotIncompatible }

// Verify checks the files of one snapshot: sizes, and digests when full is
// set.
func (s *Store) Verify(ctx context.Context, vmID, id string, full bool) error {
	m, err := s.Get(vmID, id)
	if err != nil {
		return err
	}
	return verifyFiles(ctx, m, full || s.recovered)
}

func verifyFiles(ctx context.Context, m Manifest, full bool) error {
	var errs []error
	for _, f := range m.Files {
		st, err := os.Stat(f.Path)
		switch {
		case errors.Is(err, os.ErrNotExist):
			errs = append(errs, fmt.Errorf("%s file %s is missing", f.Role, f.Path))
			continue
		case err != nil:
			errs = append(errs, err)
			continue
		case st.Size() != f.Size:
			errs = append(errs, fmt.Errorf("%s file %s is %d bytes, the manifest records %d", f.Role, f.Path, st.Size(), f.Size))
			continue
		}
		if !full {
			continue
		}
		got, err := hashFile(ctx, f.Role, f.Path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if got.SHA256 != f.SHA256 {
			errs = append(errs, fmt.Errorf("%s file %s has sha256 %s, the manifest records %s", f.Role, f.Path, got.SHA256, f.SHA256))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("verify snapshot %s/%s: %w: %w", m.VMID, m.ID, ErrDamaged, err)
	}
	return nil
}

// VersionCompatible reports whether a VMM at version running can load a
// snapshot that version written produced. Firecracker loads snapshots only
// on the major.minor that wrote them; other backends need the exact
// version.
func VersionCompatible(backend, written, running string) bool {
	if backend == "firecracker" {
		return majorMinor(written) == majorMinor(running)
	}
	return strings.TrimPrefix(written, "v") == strings.TrimPrefix(running, "v")
}

func majorMinor(v string) string {
	v = strings.TrimPrefix(v, "v")
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return v
	}
	return parts[0] + "." + parts[1]
}
