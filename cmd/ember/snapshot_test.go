package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/snapshot"
	"github.com/embervm/ember/vm"
)

// seedStore records a full snapshot web-1/base and a diff web-1/d1 in a new
// state directory and returns the environment that points ember at it and
// the directory of the snapshot files. The memory files differ in size.
func seedStore(t *testing.T) ([]string, string) {
	t.Helper()
	return recordChain(t, "firecracker", func(path, id string) {
		if err := os.WriteFile(path, []byte("memory-"+id), 0o644); err != nil {
			t.Fatal(err)
		}
	})
}

// recordChain records a full snapshot web-1/base and a diff web-1/d1 of
// backend in a new state directory, with memory files that writeMemory
// creates, and returns the environment that points ember at it and the
// directory of the snapshot files.
func recordChain(t *testing.T, backend string, writeMemory func(path, id string)) ([]string, string) {
	t.Helper()
	state := t.TempDir()
	s, err := snapshot.Open(filepath.Join(state, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	files := t.TempDir()
	for _, snap := range []struct{ id, parent string }{{"base", ""}, {"d1", "base"}} {
		typ := vm.SnapshotFull
		if snap.parent != "" {
			typ = vm.SnapshotDiff
		}
		mem := filepath.Join(files, snap.id+".mem")
		writeMemory(mem, snap.id)
		state := filepath.Join(files, snap.id+".state")
		if err := os.WriteFile(state, []byte("state-"+snap.id), 0o644); err != nil {
			t.Fatal(err)
		}
		info := vm.SnapshotInfo{ID: snap.id, VMID: "web-1", Type: typ, Parent: snap.parent, Backend: backend,
			VCPUCount: 1, MemSizeMiB: 128, StatePath: state, MemoryPath: mem, CreatedAt: time.Now()}
		if _, err := s.Record(context.Background(), info, "1.14.1", snapshot.Inputs{}); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"EMBER_STATE_DIR=" + state}, files
}

func TestSnapshotCommands(t *testing.T) {
	env, files := seedStore(t)

	stdout, stderr, code := runCLI(t, env, "snapshot", "ls")
	if code != exitOK || !strings.Contains(stdout, "web-1  base") || !strings.Contains(stdout, "d1") {
		t.Fatalf("ls: exit %d stdout %q stderr %q", code, stdout, stderr)
	}

	stdout, _, code = runCLI(t, env, "snapshot", "inspect", "web-1/d1")
	var m snapshot.Manifest
	if code != exitOK || json.Unmarshal([]byte(stdout), &m) != nil || m.Parent != "base" || m.VMMVersion != "1.14.1" {
		t.Fatalf("inspect: exit %d stdout %q", code, stdout)
	}

	if stdout, stderr, code = runCLI(t, env, "snapshot", "verify", "--full", "web-1/base"); code != exitOK {
		t.Fatalf("verify: exit %d %q %q", code, stdout, stderr)
	}
	os.Truncate(filepath.Join(files, "base.mem"), 1)
	_, stderr, code = runCLI(t, env, "snapshot", "verify", "web-1/base")
	if code != exitFailure || !strings.Contains(stderr, "is 1 bytes, the manifest records 11") {
		t.Fatalf("verify truncated: exit %d stderr %q", code, stderr)
	}
	os.WriteFile(filepath.Join(files, "base.mem"), []byte("memory-base"), 0o644)

	_, stderr, code = runCLI(t, env, "snapshot", "rm", "web-1/base")
	if code != exitFailure || !strings.Contains(stderr, "snapshot has dependants: d1") {
		t.Fatalf("rm parent: exit %d stderr %q", code, stderr)
	}
	// The seeded memory files differ in size, so the merge must fail.
	_, stderr, code = runCLI(t, env, "snapshot", "flatten", "web-1/d1", "flat")
	if code != exitFailure || !strings.Contains(stderr, "memory file sizes differ") {
		t.Fatalf("flatten: exit %d stderr %q", code, stderr)
	}
	for _, ref := range []string{"web-1/d1", "web-1/base"} {
		if _, stderr, code = runCLI(t, env, "snapshot", "rm", ref); code != exitOK {
			t.Fatalf("rm %s: exit %d stderr %q", ref, code, stderr)
		}
	}
	if stdout, _, _ = runCLI(t, env, "snapshot", "ls", "-o", "json"); strings.TrimSpace(stdout) != "[]" {
		t.Fatalf("ls after rm = %q", stdout)
	}
}

func TestSnapshotRmSeveral(t *testing.T) {
	env, files := seedStore(t)
	state := strings.TrimPrefix(env[0], "EMBER_STATE_DIR=")

	// The parent first: it is rejected, and the diff after it still goes.
	stdout, stderr, code := runCLI(t, env, "snapshot", "rm", "web-1/base", "web-1/d1")
	if code != exitFailure {
		t.Errorf("rm base d1: exit %d, want %d", code, exitFailure)
	}
	if stdout != "deleted web-1/d1\n" {
		t.Errorf("rm base d1: stdout %q", stdout)
	}
	if !strings.Contains(stderr, "snapshot has dependants: d1") {
		t.Errorf("rm base d1: stderr %q", stderr)
	}
	if _, err := os.Stat(filepath.Join(files, "d1.mem")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("d1's memory file survived: %v", err)
	}

	stdout, stderr, code = runCLI(t, env, "snapshot", "rm", "-o", "json", "web-1/base", "web-1/missing")
	if code != exitFailure {
		t.Errorf("rm base missing: exit %d, want %d", code, exitFailure)
	}
	var out struct{ Deleted []string }
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("rm base missing: stdout %q: %v", stdout, err)
	}
	if len(out.Deleted) != 1 || out.Deleted[0] != "web-1/base" {
		t.Errorf("rm base missing: deleted %q, want [web-1/base]", out.Deleted)
	}
	if !strings.Contains(stderr, "snapshot not found") {
		t.Errorf("rm base missing: stderr %q", stderr)
	}

	entries, err := os.ReadDir(filepath.Join(state, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("store after deleting every snapshot: %v, want an empty directory", entries)
	}
	// Deleting a snapshot of a backend that has no copy of it starts no
	// provider, which would create the backend's directories.
	for _, dir := range []string{"firecracker-snapshots", "qemu-snapshots"} {
		if _, err := os.Stat(filepath.Join(state, dir)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after snapshot rm: %v", dir, err)
		}
	}
}

func TestSnapshotRmBackendCopyLeft(t *testing.T) {
	env, _ := seedStore(t)
	state := strings.TrimPrefix(env[0], "EMBER_STATE_DIR=")
	// A backend record that the Firecracker provider cannot read.
	dir := filepath.Join(state, "firecracker-snapshots", "web-1", "d1")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "meta.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}

	_, stderr, code := runCLI(t, env, "snapshot", "rm", "web-1/d1")
	if code != exitFailure {
		t.Errorf("rm: exit %d, want %d", code, exitFailure)
	}
	if !strings.Contains(stderr, "deleted the manifest of web-1/d1, but not the firecracker backend's copy") {
		t.Errorf("rm: stderr %q", stderr)
	}

	_, stderr, code = runCLI(t, env, "snapshot", "inspect", "web-1/d1")
	if code != exitFailure {
		t.Errorf("inspect after rm: exit %d, want %d", code, exitFailure)
	}
	if !strings.Contains(stderr, "snapshot not found") {
		t.Errorf("inspect after rm: stderr %q", stderr)
	}
}

func TestSnapshotRefErrors(t *testing.T) {
	env, _ := seedStore(t)
	for _, ref := range []string{"nosep", "web_1/base", "web-1/../x"} {
		_, stderr, code := runCLI(t, env, "snapshot", "inspect", ref)
		if code != exitUsage || !strings.Contains(stderr, "snapshot reference") {
			t.Errorf("%s: exit %d stderr %q", ref, code, stderr)
		}
	}
	_, stderr, code := runCLI(t, env, "snapshot", "inspect", "web-1/missing")
	if code != exitFailure || !strings.Contains(stderr, "snapshot not found") {
		t.Errorf("missing: exit %d stderr %q", code, stderr)
	}
}

// seedChain records a full snapshot web-1/base and a diff web-1/d1 of the
// given backend, with sparse memory files of 16 pages in Firecracker's
// layout: the diff's data regions are the pages it changed.
func seedChain(t *testing.T, backend string) []string {
	t.Helper()
	pages := map[string]map[int64]byte{"base": {0: 'a', 1: 'a'}, "d1": {1: 'b', 5: 'b'}}
	env, _ := recordChain(t, backend, func(path, id string) { writePages(t, path, 16, pages[id]) })
	return env
}

const pageSize = 4096

// writePages creates a file of n pages in which the given pages are filled
// with their byte and every other page is a hole.
func writePages(t *testing.T, path string, n int64, pages map[int64]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(n * pageSize); err != nil {
		t.Fatal(err)
	}
	for idx, fill := range pages {
		if _, err := f.WriteAt(bytes.Repeat([]byte{fill}, pageSize), idx*pageSize); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSnapshotFlattenFirecracker(t *testing.T) {
	env := seedChain(t, "firecracker")
	stdout, stderr, code := runCLI(t, env, "snapshot", "flatten", "web-1/d1", "flat")
	if code != exitOK {
		t.Fatalf("flatten: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "flattened web-1/d1 into web-1/flat") {
		t.Errorf("flatten output = %q", stdout)
	}

	stdout, _, code = runCLI(t, env, "snapshot", "inspect", "web-1/flat")
	var m snapshot.Manifest
	if code != exitOK || json.Unmarshal([]byte(stdout), &m) != nil {
		t.Fatalf("inspect: exit %d stdout %q", code, stdout)
	}
	if m.Type != vm.SnapshotFull || m.Parent != "" || m.Backend != "firecracker" {
		t.Errorf("flattened manifest: type %s, parent %q, backend %s; want a full firecracker snapshot without parent", m.Type, m.Parent, m.Backend)
	}
	mem, ok := m.File("memory")
	if !ok {
		t.Fatalf("flattened snapshot has no memory file: %+v", m.Files)
	}
	got, err := os.ReadFile(mem.Path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 16*pageSize {
		t.Fatalf("flattened memory is %d bytes, want %d", len(got), 16*pageSize)
	}
	want := map[int64]byte{0: 'a', 1: 'b', 2: 0, 5: 'b', 15: 0}
	for idx, fill := range want {
		if !bytes.Equal(got[idx*pageSize:(idx+1)*pageSize], bytes.Repeat([]byte{fill}, pageSize)) {
			t.Errorf("page %d starts with %q, want all %q", idx, got[idx*pageSize], fill)
		}
	}
	if _, _, code := runCLI(t, env, "snapshot", "verify", "--full", "web-1/flat"); code != exitOK {
		t.Errorf("verify of the flattened snapshot: exit %d", code)
	}

	// The chain is left as it was.
	stdout, _, _ = runCLI(t, env, "snapshot", "inspect", "web-1/d1")
	if !strings.Contains(stdout, `"parent": "base"`) && !strings.Contains(stdout, `"parent":"base"`) {
		t.Errorf("diff d1 lost its parent after flatten: %q", stdout)
	}
}

func TestSnapshotFlattenUnsupportedBackend(t *testing.T) {
	env := seedChain(t, "qemu")
	_, stderr, code := runCLI(t, env, "snapshot", "flatten", "web-1/d1", "flat")
	if code != exitFailure || !strings.Contains(stderr, "diff snapshot merge: not supported by qemu") {
		t.Fatalf("flatten: exit %d stderr %q", code, stderr)
	}
	if _, _, code := runCLI(t, env, "snapshot", "inspect", "web-1/flat"); code == exitOK {
		t.Errorf("a failed flatten recorded web-1/flat")
	}
}
