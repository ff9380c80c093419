package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/snapshot"
	"github.com/embervm/ember/vm"
)

// seedStore records a full snapshot web-1/base and a diff web-1/d1 in a new
// state directory and returns the environment that points ember at it.
func seedStore(t *testing.T) ([]string, string) {
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
		if err := os.WriteFile(mem, []byte("memory-"+snap.id), 0o644); err != nil {
			t.Fatal(err)
		}
		state := filepath.Join(files, snap.id+".state")
		if err := os.WriteFile(state, []byte("state-"+snap.id), 0o644); err != nil {
			t.Fatal(err)
		}
		info := vm.SnapshotInfo{ID: snap.id, VMID: "web-1", Type: typ, Parent: snap.parent, Backend: "firecracker",
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
	_, stderr, code = runCLI(t, env, "snapshot", "flatten", "web-1/d1", "flat")
	if code != exitFailure || !strings.Contains(stderr, "diff snapshot merge is not supported by firecracker") {
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
