package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

type testEnv struct {
	store *Store
	dir   string
}

func newEnv(t *testing.T) *testEnv {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &testEnv{store: s, dir: dir}
}

// write creates a file of the given content under the env's directory.
func (e *testEnv) write(t *testing.T, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(e.dir, name)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// record writes state and memory files and records a snapshot of them.
func (e *testEnv) record(t *testing.T, vmID, id, parent string, mem []byte, created time.Time) Manifest {
	t.Helper()
	typ := vm.SnapshotFull
	if parent != "" {
		typ = vm.SnapshotDiff
	}
	info := vm.SnapshotInfo{
		ID: id, VMID: vmID, Type: typ, Parent: parent, Backend: "firecracker",
		VCPUCount: 2, MemSizeMiB: 128, DriveIDs: []string{"rootfs"},
		StatePath:  e.write(t, vmID+"-"+id+".state", []byte("state of "+id)),
		MemoryPath: e.write(t, vmID+"-"+id+".mem", mem),
		CreatedAt:  created,
	}
	m, err := e.store.Record(context.Background(), info, "1.14.1", Inputs{Kernel: e.write(t, "vmlinux", []byte("kernel"))})
	if err != nil {
		t.Fatalf("record %s/%s: %v", vmID, id, err)
	}
	return m
}

func TestRecordAndGet(t *testing.T) {
	e := newEnv(t)
	created := time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC)
	m := e.record(t, "web-1", "base", "", []byte("memory"), created)
	if m.VMMVersion != "1.14.1" || m.KernelSHA256 == "" || m.RootfsSHA256 != "" || len(m.Files) != 2 {
		t.Fatalf("manifest = %+v", m)
	}
	mem, _ := m.File("memory")
	if mem.Size != 6 || mem.SHA256 != sha256Hex("memory") {
		t.Fatalf("memory file = %+v", mem)
	}
	got, err := e.store.Get("web-1", "base")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "base" || !got.CreatedAt.Equal(created) || got.Files[1].SHA256 != mem.SHA256 {
		t.Fatalf("Get = %+v", got)
	}
	if _, err := e.store.Get("web-1", "nope"); !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Fatalf("missing snapshot: err = %v", err)
	}
	if _, err := e.store.Get("web-1", "../../etc"); !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Fatalf("traversal id: err = %v", err)
	}
}

func TestRecordRejects(t *testing.T) {
	e := newEnv(t)
	e.record(t, "web-1", "base", "", []byte("m"), time.Now())
	state := e.write(t, "s", []byte("s"))
	cases := []struct {
		name string
		info vm.SnapshotInfo
		want error
		text string
	}{
		{"duplicate", vm.SnapshotInfo{ID: "base", VMID: "web-1", StatePath: state}, vm.ErrSnapshotExists, ""},
		{"bad id", vm.SnapshotInfo{ID: "a/b", VMID: "web-1", StatePath: state}, vm.ErrInvalid, ""},
		{"no files", vm.SnapshotInfo{ID: "empty", VMID: "web-1"}, nil, "no files"},
		{"missing file", vm.SnapshotInfo{ID: "gone", VMID: "web-1", StatePath: filepath.Join(e.dir, "absent")}, os.ErrNotExist, ""},
		{"diff without parent", vm.SnapshotInfo{ID: "d", VMID: "web-1", Type: vm.SnapshotDiff, StatePath: state}, nil, "without a parent"},
		{"unknown parent", vm.SnapshotInfo{ID: "d", VMID: "web-1", Type: vm.SnapshotDiff, Parent: "x", StatePath: state}, vm.ErrSnapshotNotFound, ""},
	}
	for _, tc := range cases {
		_, err := e.store.Record(context.Background(), tc.info, "1.14.1", Inputs{})
		if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) || (tc.text != "" && !strings.Contains(err.Error(), tc.text)) {
			t.Errorf("%s: err = %v", tc.name, err)
		}
	}
	list, _ := e.store.List("")
	if len(list) != 1 {
		t.Fatalf("rejected records were stored: %d manifests", len(list))
	}
}

func TestCheckCompatibility(t *testing.T) {
	e := newEnv(t)
	e.record(t, "web-1", "base", "", []byte("memory"), time.Now())
	ok := Target{Backend: "firecracker", VMMVersion: "1.14.4", VCPUCount: 2, MemSizeMiB: 128}
	if _, err := e.store.Check(context.Background(), "web-1", "base", ok); err != nil {
		t.Fatalf("compatible target: %v", err)
	}
	cases := []struct {
		name   string
		target Target
		text   string
	}{
		{"other minor", Target{Backend: "firecracker", VMMVersion: "1.15.0"}, "written by firecracker 1.14.1, which firecracker 1.15.0 cannot load"},
		{"other backend", Target{Backend: "qemu"}, "written by backend firecracker, restoring on qemu"},
		{"more memory", Target{MemSizeMiB: 256}, "has 128 MiB of memory, 256 expected"},
		{"other vcpus", Target{VCPUCount: 4}, "has 2 vCPUs, 4 expected"},
	}
	for _, tc := range cases {
		_, err := e.store.Check(context.Background(), "web-1", "base", tc.target)
		if !errors.Is(err, vm.ErrSnapshotIncompatible) || !strings.Contains(err.Error(), tc.text) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.text)
		}
	}
}

func TestCheckDetectsDamagedFiles(t *testing.T) {
	e := newEnv(t)
	m := e.record(t, "web-1", "base", "", []byte("memory"), time.Now())
	mem, _ := m.File("memory")

	// Same size, other content: only a full check notices.
	if err := os.WriteFile(mem.Path, []byte("MEMORY"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Check(context.Background(), "web-1", "base", Target{}); err != nil {
		t.Fatalf("size-only check failed: %v", err)
	}
	_, err := e.store.Check(context.Background(), "web-1", "base", Target{FullVerify: true})
	if !errors.Is(err, vm.ErrSnapshotIncompatible) || !strings.Contains(err.Error(), "has sha256") {
		t.Fatalf("full check: err = %v", err)
	}
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "snapshot files damaged") {
		t.Errorf("full check: err = %v, want ErrDamaged", err)
	}

	if err := os.Truncate(mem.Path, 3); err != nil {
		t.Fatal(err)
	}
	_, err = e.store.Check(context.Background(), "web-1", "base", Target{})
	if !strings.Contains(err.Error(), "is 3 bytes, the manifest records 6") {
		t.Fatalf("truncated: err = %v", err)
	}
	os.Remove(mem.Path)
	err = e.store.Verify(context.Background(), "web-1", "base", false)
	if !strings.Contains(err.Error(), "memory file "+mem.Path+" is missing") {
		t.Fatalf("missing: err = %v", err)
	}
}

func TestRecoveryForcesFullVerification(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "store")
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	e := &testEnv{store: s, dir: dir}
	m := e.record(t, "web-1", "base", "", []byte("memory"), time.Now())
	// A crash: the store is never closed, and a write was interrupted.
	if err := os.WriteFile(filepath.Join(root, "web-1", ".tmp-123"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	mem, _ := m.File("memory")
	os.WriteFile(mem.Path, []byte("MEMORY"), 0o644)

	s2, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if !s2.Recovered() {
		t.Fatal("store opened after a crash does not report recovery")
	}
	if _, err := os.Stat(filepath.Join(root, "web-1", ".tmp-123")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("temporary file survived recovery")
	}
	if err := s2.Verify(context.Background(), "web-1", "base", false); err == nil {
		t.Fatal("recovering store skipped the digest check")
	}
	s2.Close()
	s3, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if s3.Recovered() {
		t.Fatal("cleanly closed store reports recovery")
	}
}

func TestChainAndDeleteProtection(t *testing.T) {
	e := newEnv(t)
	t0 := time.Now()
	e.record(t, "web-1", "base", "", []byte("base"), t0)
	e.record(t, "web-1", "d1", "base", []byte("d1"), t0.Add(time.Second))
	e.record(t, "web-1", "d2", "d1", []byte("d2"), t0.Add(2*time.Second))
	chain, err := e.store.Chain("web-1", "d2")
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 || chain[0].ID != "base" || chain[2].ID != "d2" {
		t.Fatalf("chain = %v", ids(chain))
	}
	if err := e.store.Delete("web-1", "d1"); !errors.Is(err, ErrHasDependants) || !strings.Contains(err.Error(), "d2") {
		t.Fatalf("delete of a parent: err = %v", err)
	}
	d2, _ := e.store.Get("web-1", "d2")
	if err := e.store.Delete("web-1", "d2"); err != nil {
		t.Fatal(err)
	}
	for _, f := range d2.Files {
		if _, err := os.Stat(f.Path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("file %s survived delete", f.Path)
		}
	}
	if err := e.store.Delete("web-1", "d1"); err != nil {
		t.Fatalf("delete after the dependant is gone: %v", err)
	}
}

func TestDeleteRemovesEmptyDirectories(t *testing.T) {
	e := newEnv(t)
	t0 := time.Now()
	e.record(t, "web-1", "base", "", []byte("aaaa"), t0)
	e.record(t, "web-1", "d1", "base", []byte{0, 'b', 0, 0}, t0.Add(time.Second))
	e.record(t, "web-2", "keep", "", []byte("cccc"), t0)

	// Flatten writes into a directory of the store, as ember snapshot
	// flatten does.
	filesDir := filepath.Join(e.store.Root(), "web-1", "files")
	if _, err := e.store.Flatten(context.Background(), "web-1", "d1", "flat", filesDir, overlayMerger{}); err != nil {
		t.Fatal(err)
	}

	vmDir := filepath.Join(e.store.Root(), "web-1")
	steps := []struct {
		id        string
		wantFiles bool // whether filesDir survives the step
		wantVMDir bool
	}{
		{"flat", false, true},
		{"d1", false, true},
		{"base", false, false},
	}
	for _, st := range steps {
		if err := e.store.Delete("web-1", st.id); err != nil {
			t.Fatalf("delete %s: %v", st.id, err)
		}
		if _, err := os.Stat(filesDir); (err == nil) != st.wantFiles {
			t.Errorf("after deleting %s: %s exists = %v, want %v", st.id, filesDir, err == nil, st.wantFiles)
		}
		if _, err := os.Stat(vmDir); (err == nil) != st.wantVMDir {
			t.Errorf("after deleting %s: %s exists = %v, want %v", st.id, vmDir, err == nil, st.wantVMDir)
		}
		if _, err := os.Stat(e.dir); err != nil {
			t.Errorf("after deleting %s: the directory outside the store is gone: %v", st.id, err)
		}
	}
	if _, err := e.store.Get("web-2", "keep"); err != nil {
		t.Fatalf("another VM's snapshot: %v", err)
	}

	// Recording again recreates the VM's directory.
	e.record(t, "web-1", "again", "", []byte("dddd"), t0)
	if _, err := e.store.Get("web-1", "again"); err != nil {
		t.Fatal(err)
	}
}

// overlayMerger applies a diff by writing its non-zero bytes over dst, a
// stand-in for a backend's sparse-file merge.
type overlayMerger struct{}

func (overlayMerger) MergeMemory(ctx context.Context, dst, diff string) error {
	d, err := os.ReadFile(diff)
	if err != nil {
		return err
	}
	base, err := os.ReadFile(dst)
	if err != nil {
		return err
	}
	for i, b := range d {
		if b != 0 {
			base[i] = b
		}
	}
	return os.WriteFile(dst, base, 0o600)
}

func TestFlatten(t *testing.T) {
	e := newEnv(t)
	t0 := time.Now()
	e.record(t, "web-1", "base", "", []byte("aaaaaaaa"), t0)
	e.record(t, "web-1", "d1", "base", []byte{0, 'b', 0, 0, 0, 0, 0, 0}, t0.Add(time.Second))
	e.record(t, "web-1", "d2", "d1", []byte{0, 0, 0, 'c', 0, 0, 0, 0}, t0.Add(2*time.Second))

	if _, err := e.store.Flatten(context.Background(), "web-1", "d2", "flat", filepath.Join(e.dir, "flat"), nil); !errors.Is(err, vm.ErrUnsupported) {
		t.Fatalf("flatten without a merger: err = %v", err)
	}
	m, err := e.store.Flatten(context.Background(), "web-1", "d2", "flat", filepath.Join(e.dir, "flat"), overlayMerger{})
	if err != nil {
		t.Fatal(err)
	}
	mem, _ := m.File("memory")
	data, _ := os.ReadFile(mem.Path)
	if string(data) != "abacaaaa" || m.Type != vm.SnapshotFull || m.Parent != "" || m.KernelSHA256 == "" {
		t.Fatalf("flattened memory %q manifest %+v", data, m)
	}
	state, _ := m.File("state")
	if s, _ := os.ReadFile(state.Path); string(s) != "state of d2" {
		t.Fatalf("flattened state = %q", s)
	}
	if err := e.store.Verify(context.Background(), "web-1", "flat", true); err != nil {
		t.Fatalf("flattened snapshot does not verify: %v", err)
	}
}

func TestGC(t *testing.T) {
	e := newEnv(t)
	now := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	e.record(t, "a", "s1", "", []byte("1"), now.Add(-72*time.Hour))
	e.record(t, "a", "s2", "s1", []byte("2"), now.Add(-48*time.Hour))
	e.record(t, "a", "s3", "", []byte("3"), now.Add(-1*time.Hour))
	e.record(t, "b", "old", "", []byte("4"), now.Add(-100*time.Hour))
	e.record(t, "b", "golden", "", []byte("5"), now.Add(-200*time.Hour))

	deleted, err := e.store.GC(context.Background(), Policy{
		MaxAge: 24 * time.Hour,
		Keep:   []vm.SnapshotRef{{VMID: "b", SnapshotID: "golden"}},
	}, now)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, m := range deleted {
		got[m.VMID+"/"+m.ID] = true
	}
	if len(got) != 3 || !got["a/s1"] || !got["a/s2"] || !got["b/old"] {
		t.Fatalf("deleted = %v, want a/s1 a/s2 b/old", got)
	}
	left, _ := e.store.List("")
	if len(left) != 2 {
		t.Fatalf("left = %v", ids(left))
	}

	deleted, err = e.store.GC(context.Background(), Policy{KeepLast: 1}, now)
	if err != nil || len(deleted) != 0 {
		t.Fatalf("keep-last 1 with one snapshot per vm deleted %v (%v)", ids(deleted), err)
	}
}

func TestVersionCompatible(t *testing.T) {
	cases := []struct {
		backend, written, running string
		want                      bool
	}{
		{"firecracker", "1.14.1", "1.14.4", true},
		{"firecracker", "v1.14.1", "1.14.0", true},
		{"firecracker", "1.14.1", "1.15.1", false},
		{"qemu", "7.2.15", "7.2.15", true},
		{"qemu", "7.2.15", "7.2.16", false},
	}
	for _, tc := range cases {
		if got := VersionCompatible(tc.backend, tc.written, tc.running); got != tc.want {
			t.Errorf("VersionCompatible(%s, %s, %s) = %v", tc.backend, tc.written, tc.running, got)
		}
	}
}

func ids(ms []Manifest) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.VMID+"/"+m.ID)
	}
	return out
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func FuzzDecodeManifest(f *testing.F) {
	f.Add([]byte(`{"manifest_version":1,"id":"base","vm_id":"web-1","type":"full","files":[{"role":"state","path":"/s","size":1,"sha256":"00"}]}`))
	f.Add([]byte(`{"manifest_version":2}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := decodeManifest(data)
		if err == nil && m.Version != ManifestVersion {
			t.Fatalf("accepted manifest version %d", m.Version)
		}
	})
}
