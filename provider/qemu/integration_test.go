package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

// TestBootDevicesAndShutdown boots a guest with a read-only root drive, a
// throttled writable extra drive and the agent port, checks the devices the
// guest lists, and powers it off through ACPI.
func TestBootDevicesAndShutdown(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	files := t.TempDir()

	cfg := testConfig(t, "devices")
	cfg.Rootfs = sparseFile(t, files, "root.img", 8<<20)
	cfg.RootfsReadOnly = true
	cfg.ExtraDrives = []vm.Drive{{
		ID:         "data",
		PathOnHost: sparseFile(t, files, "data.img", 4<<20),
		RateLimiter: &vm.RateLimiter{
			Bandwidth: &vm.TokenBucket{Size: 10 << 20, RefillTime: 1000, OneTimeBurst: 1 << 20},
			Ops:       &vm.TokenBucket{Size: 1000, RefillTime: 1000},
		},
	}}
	info, err := p.Create(ctx, cfg)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if info.State != vm.StateCreated || info.PID == 0 {
		t.Fatalf("after create: state %s pid %d, want created with a pid", info.State, info.PID)
	}
	if err := p.Start(ctx, "devices"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, p, "devices")

	if got := mustAsk(t, p, "devices", "drives"); got != "vda:ro,vdb:rw" {
		t.Errorf("guest drives = %q, want vda:ro,vdb:rw", got)
	}
	if got := mustAsk(t, p, "devices", "write-drive vdb"); got != "ok" {
		t.Fatalf("write to the extra drive: %q", got)
	}
	if got := readHeader(t, cfg.ExtraDrives[0].PathOnHost, 5); string(got) != "ember" {
		t.Errorf("extra drive starts with %q after the guest wrote to it, want \"ember\"", got)
	}
	console, err := p.Console(ctx, "devices")
	if err != nil {
		t.Fatalf("console: %v", err)
	}
	if !bytes.Contains(console, []byte("EMBER-TESTINIT-READY")) {
		t.Errorf("console lacks the init's ready marker:\n%s", tail(console, 2000))
	}

	if err := p.Shutdown(ctx, "devices", time.Minute); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	info, err = p.Get(ctx, "devices")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if info.State != vm.StateStopped || info.Reason != "guest powered off" {
		t.Errorf("after shutdown: state %s reason %q, want stopped after the guest powered off", info.State, info.Reason)
	}
	if info.PID != 0 {
		t.Errorf("after shutdown: pid %d, want 0", info.PID)
	}
	after, err := p.Console(ctx, "devices")
	if err != nil || !bytes.Contains(after, []byte("EMBER-TESTINIT-READY")) {
		t.Errorf("console after exit: err %v, marker missing", err)
	}
	log, err := os.ReadFile(filepath.Join(p.runDir, "devices", serialLogName))
	if err != nil || !bytes.Contains(log, []byte("EMBER-TESTINIT-READY")) {
		t.Errorf("serial log file: err %v, marker missing", err)
	}
	if err := p.Destroy(ctx, "devices"); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if err := leaked(p, "devices"); err != nil {
		t.Error(err)
	}
}

// TestSnapshotClones restores three clones of one snapshot, gives each a
// hostname of its own and checks that each replies with its own identity
// and writes to its own copy of the writable drive.
func TestSnapshotClones(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	files := t.TempDir()

	cfg := testConfig(t, "origin")
	cfg.Rootfs = sparseFile(t, files, "root.img", 8<<20)
	if _, err := p.Create(ctx, cfg); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "origin"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, p, "origin")
	if got := mustAsk(t, p, "origin", "hostname origin"); got != "ok" {
		t.Fatalf("set hostname: %q", got)
	}
	if err := p.Pause(ctx, "origin"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	snap, err := p.Snapshot(ctx, "origin", vm.SnapshotOptions{ID: "base"})
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	if snap.MemSizeMiB != testMemMiB || len(snap.DriveIDs) != 1 {
		t.Errorf("snapshot info: %d MiB drives %v", snap.MemSizeMiB, snap.DriveIDs)
	}
	if err := p.Resume(ctx, "origin"); err != nil {
		t.Fatalf("resume after snapshot: %v", err)
	}
	if got := mustAsk(t, p, "origin", "whoami"); got != "origin" {
		t.Errorf("origin after resume: whoami = %q", got)
	}

	clones := []string{"clone-1", "clone-2", "clone-3"}
	for _, id := range clones {
		ref := &vm.SnapshotRef{VMID: "origin", SnapshotID: "base", ResumeImmediately: true}
		info, err := p.Create(ctx, vm.Config{ID: id, RestoreFrom: ref})
		if err != nil {
			t.Fatalf("restore %s: %v", id, err)
		}
		if info.State != vm.StateRunning {
			t.Fatalf("restore %s: state %s, want running", id, info.State)
		}
		if info.Config.MemSizeMiB != testMemMiB || info.Config.Rootfs == cfg.Rootfs {
			t.Errorf("restore %s: config %d MiB rootfs %s, want the snapshot's shape on a private drive copy",
				id, info.Config.MemSizeMiB, info.Config.Rootfs)
		}
	}
	for _, id := range clones {
		waitAgent(t, p, id)
		if got := mustAsk(t, p, id, "whoami"); got != "origin" {
			t.Errorf("%s before rename: whoami = %q, want the snapshot's hostname", id, got)
		}
		if got := mustAsk(t, p, id, "hostname "+id); got != "ok" {
			t.Fatalf("%s: set hostname: %q", id, got)
		}
	}
	if got := mustAsk(t, p, "clone-1", "write-drive vda"); got != "ok" {
		t.Fatalf("clone-1 write: %q", got)
	}
	for _, id := range clones {
		if got := mustAsk(t, p, id, "whoami"); got != id {
			t.Errorf("%s: whoami = %q", id, got)
		}
	}
	clone1Drive := filepath.Join(p.runDir, "clone-1", driveCopyDir)
	entries, err := os.ReadDir(clone1Drive)
	if err != nil || len(entries) != 1 {
		t.Fatalf("clone-1 drive copies: %v %v", entries, err)
	}
	if got := readHeader(t, filepath.Join(clone1Drive, entries[0].Name()), 5); string(got) != "ember" {
		t.Errorf("clone-1's drive copy starts with %q, want the guest's write", got)
	}
	if got := readHeader(t, cfg.Rootfs, 5); string(got) == "ember" {
		t.Errorf("clone-1's write reached the origin's drive")
	}
	if got := mustAsk(t, p, "origin", "whoami"); got != "origin" {
		t.Errorf("origin after clones: whoami = %q", got)
	}
}

// TestRenameKeepsGuest renames a running VM and reaches its agent under
// the new id.
func TestRenameKeepsGuest(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	if _, err := p.Create(ctx, testConfig(t, "before")); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "before"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, p, "before")
	pid := mustGet(t, p, "before").PID
	if err := p.Rename(ctx, "before", "after"); err != nil {
		t.Fatalf("rename: %v", err)
	}
	if got := mustAsk(t, p, "after", "ping"); got != "pong" {
		t.Errorf("ping after rename = %q", got)
	}
	if info := mustGet(t, p, "after"); info.PID != pid || info.State != vm.StateRunning {
		t.Errorf("after rename: pid %d state %s, want pid %d running", info.PID, info.State, pid)
	}
	if _, err := os.Stat(filepath.Join(p.runDir, "before")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("old run directory: %v, want it gone", err)
	}
	if err := p.Pause(ctx, "after"); err != nil {
		t.Errorf("pause after rename: %v", err)
	}
}

// TestVMMDeath kills QEMU and checks that the VM fails with a reason,
// keeps its console, and that another VM is not disturbed.
func TestVMMDeath(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	for _, id := range []string{"victim", "bystander"} {
		if _, err := p.Create(ctx, testConfig(t, id)); err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
		if err := p.Start(ctx, id); err != nil {
			t.Fatalf("start %s: %v", id, err)
		}
	}
	waitAgent(t, p, "victim")

	pid := mustGet(t, p, "victim").PID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	info := waitFor(t, p, "victim", vm.StateFailed)
	if !strings.Contains(info.Reason, "signal: killed") || info.PID != 0 {
		t.Errorf("failed vm: reason %q pid %d", info.Reason, info.PID)
	}

	console, err := p.Console(ctx, "victim")
	if err != nil || !bytes.Contains(console, []byte("EMBER-TESTINIT-READY")) {
		t.Errorf("console after the crash: err %v, marker missing", err)
	}
	if _, err := p.DialAgent(ctx, "victim"); err == nil {
		t.Errorf("dial agent of a dead vm succeeded")
	}
	if err := p.Pause(ctx, "victim"); !errors.Is(err, vm.ErrInvalidTransition) {
		t.Errorf("pause failed vm: %v, want ErrInvalidTransition", err)
	}

	waitAgent(t, p, "bystander")
	if err := p.Destroy(ctx, "victim"); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if err := leaked(p, "victim"); err != nil {
		t.Error(err)
	}
}

// TestGuestPowerOff checks that a guest that powers itself off leaves the
// VM stopped, not failed.
func TestGuestPowerOff(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	if _, err := p.Create(ctx, testConfig(t, "quitter")); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "quitter"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, p, "quitter")
	mustAsk(t, p, "quitter", "poweroff")
	info := waitFor(t, p, "quitter", vm.StateStopped)
	if !strings.Contains(info.Reason, "guest-shutdown") {
		t.Errorf("reason %q, want a guest shutdown", info.Reason)
	}
}

func mustGet(t testing.TB, p *Provider, id string) vm.Info {
	t.Helper()
	info, err := p.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("get %q: %v", id, err)
	}
	return info
}

// waitFor polls VM id until it reaches state want. The bound only stops a
// hung test.
func waitFor(t testing.TB, p *Provider, id string, want vm.State) vm.Info {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		info := mustGet(t, p, id)
		if info.State == want {
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("vm %q is %s (%s), want %s", id, info.State, info.Reason, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSnapshotChain snapshots a restored VM that never ran, twice in a row
// (the second copies the first, because QEMU does not migrate a VM again
// before it has run), and restores the last snapshot.
func TestSnapshotChain(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	if _, err := p.Create(ctx, testConfig(t, "first")); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "first"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, p, "first")
	mustAsk(t, p, "first", "hostname chained")
	if err := p.Pause(ctx, "first"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if _, err := p.Snapshot(ctx, "first", vm.SnapshotOptions{ID: "one"}); err != nil {
		t.Fatalf("snapshot one: %v", err)
	}

	ref := &vm.SnapshotRef{VMID: "first", SnapshotID: "one"}
	if _, err := p.Create(ctx, vm.Config{ID: "second", RestoreFrom: ref}); err != nil {
		t.Fatalf("restore second: %v", err)
	}
	for _, id := range []string{"two", "three"} {
		if _, err := p.Snapshot(ctx, "second", vm.SnapshotOptions{ID: id}); err != nil {
			t.Fatalf("snapshot %s of the restored vm: %v", id, err)
		}
	}
	two, err := os.Stat(filepath.Join(p.snapshotDir, "second", "two", snapshotStateName))
	if err != nil {
		t.Fatal(err)
	}
	three, err := os.Stat(filepath.Join(p.snapshotDir, "second", "three", snapshotStateName))
	if err != nil {
		t.Fatal(err)
	}
	if two.Size() != three.Size() {
		t.Errorf("state sizes %d and %d, want the copy to equal the original", two.Size(), three.Size())
	}

	ref = &vm.SnapshotRef{VMID: "second", SnapshotID: "three", ResumeImmediately: true}
	if _, err := p.Create(ctx, vm.Config{ID: "third", RestoreFrom: ref}); err != nil {
		t.Fatalf("restore third: %v", err)
	}
	waitAgent(t, p, "third")
	if got := mustAsk(t, p, "third", "whoami"); got != "chained" {
		t.Errorf("third: whoami = %q, want the hostname set before the first snapshot", got)
	}
	if err := p.Resume(ctx, "second"); err != nil {
		t.Fatalf("resume second: %v", err)
	}
	if got := mustAsk(t, p, "second", "whoami"); got != "chained" {
		t.Errorf("second: whoami = %q", got)
	}
}
