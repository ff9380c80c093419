package vmtest

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/embervm/ember/vm"
)

func (s *suite) testLifecycle(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	info := s.create(t, p, "life")
	if info.State != vm.StateCreated {
		t.Fatalf("state after create = %s, want created", info.State)
	}
	if info.Backend != p.Backend() {
		t.Errorf("info.Backend = %q, want %q", info.Backend, p.Backend())
	}
	steps := []struct {
		op   vm.Op
		want vm.State
	}{
		{vm.OpStart, vm.StateRunning},
		{vm.OpPause, vm.StatePaused},
		{vm.OpResume, vm.StateRunning},
		{vm.OpPause, vm.StatePaused},
		{vm.OpResume, vm.StateRunning},
		{vm.OpShutdown, vm.StateStopped},
	}
	for _, step := range steps {
		must(t, s.call(ctx, p, "life", step.op), "%s", step.op)
		s.expectState(t, p, "life", step.want)
	}
	must(t, p.Destroy(ctx, "life"), "destroy")
	s.expectGone(t, p, "life")
}

func (s *suite) testInvalidTransitions(t *testing.T) {
	p := s.newProvider(t)
	for _, from := range []vm.State{vm.StateCreated, vm.StateRunning, vm.StatePaused, vm.StateStopped} {
		id := "bad-" + string(from)
		s.bring(t, p, id, from)
		for _, op := range callerOps {
			if vm.Allowed(from, op) {
				continue
			}
			err := s.call(s.ctx(t), p, id, op)
			expectTransitionError(t, err, id, op, from)
			s.expectState(t, p, id, from)
		}
	}
}

func (s *suite) testDuplicateID(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.bring(t, p, "dup", vm.StateRunning)
	_, err := p.Create(ctx, s.h.Config(t, "dup"))
	if !errors.Is(err, vm.ErrAlreadyExists) {
		t.Fatalf("second create: err = %v, want ErrAlreadyExists", err)
	}
	s.expectState(t, p, "dup", vm.StateRunning)
	infos, err := p.List(ctx)
	must(t, err, "list")
	if got := sortedIDs(infos); !slices.Equal(got, []string{"dup"}) {
		t.Fatalf("list = %v, want [dup]", got)
	}
}

func (s *suite) testUnknownID(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	for _, op := range append(slices.Clone(callerOps), vm.OpDestroy, vm.OpRename) {
		if err := s.call(ctx, p, "ghost", op); !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("%s on unknown vm: err = %v, want ErrNotFound", op, err)
		}
	}
	if _, err := p.Get(ctx, "ghost"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("get unknown vm: err = %v, want ErrNotFound", err)
	}
}

func (s *suite) testInvalidConfig(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	cases := []struct {
		name   string
		mutate func(*vm.Config)
		field  string
	}{
		{"zero vcpus", func(c *vm.Config) { c.VCPUCount = 0 }, "vcpu_count"},
		{"bad id", func(c *vm.Config) { c.ID = "no/slash" }, "id"},
		{"missing kernel", func(c *vm.Config) { c.Kernel = "" }, "kernel"},
		{"reserved drive id", func(c *vm.Config) {
			c.ExtraDrives = append(c.ExtraDrives, vm.Drive{ID: vm.RootDriveID, PathOnHost: "/nonexistent"})
		}, fmt.Sprintf("extra_drives[%d].drive_id", len(s.h.Config(t, "x").ExtraDrives))},
		{"long tap name", func(c *vm.Config) {
			c.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "a-name-longer-than-15"}}
		}, "network_interfaces[0].host_dev_name"},
	}
	for _, tc := range cases {
		cfg := s.h.Config(t, "invalid")
		tc.mutate(&cfg)
		_, err := p.Create(ctx, cfg)
		var ve *vm.ValidationError
		if !errors.As(err, &ve) || !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("%s: err = %v, want *vm.ValidationError", tc.name, err)
			continue
		}
		if !slices.ContainsFunc(ve.Problems, func(f vm.FieldError) bool { return f.Field == tc.field }) {
			t.Errorf("%s: problems %v do not name field %q", tc.name, ve.Problems, tc.field)
		}
	}
	infos, err := p.List(ctx)
	must(t, err, "list")
	if len(infos) != 0 {
		t.Fatalf("invalid creates left vms behind: %v", sortedIDs(infos))
	}
	if s.h.Leaked != nil {
		for _, id := range []string{"invalid", "no/slash"} {
			if err := s.h.Leaked(t, p, id); err != nil {
				t.Errorf("invalid create of %q leaked: %v", id, err)
			}
		}
	}
}

func (s *suite) testShutdownFromPaused(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.bring(t, p, "stop-paused", vm.StatePaused)
	must(t, p.Shutdown(ctx, "stop-paused", s.grace()), "shutdown paused vm")
	s.expectState(t, p, "stop-paused", vm.StateStopped)
	s.bring(t, p, "stop-created", vm.StateCreated)
	must(t, p.Shutdown(ctx, "stop-created", s.grace()), "shutdown created vm")
	s.expectState(t, p, "stop-created", vm.StateStopped)
}

// snapshotOf drives a new VM to paused and takes a full snapshot "base".
func (s *suite) snapshotOf(t *testing.T, p vm.Provider, id string) vm.SnapshotInfo {
	t.Helper()
	s.bring(t, p, id, vm.StatePaused)
	snap, err := p.Snapshot(s.ctx(t), id, vm.SnapshotOptions{ID: "base"})
	must(t, err, "snapshot %q", id)
	return snap
}

func (s *suite) testSnapshotAndRestore(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	cfg := s.h.Config(t, "src")
	snap := s.snapshotOf(t, p, "src")
	if snap.ID != "base" || snap.VMID != "src" || snap.Type != vm.SnapshotFull || snap.Parent != "" {
		t.Fatalf("snapshot info = {ID:%q VMID:%q Type:%s Parent:%q}, want {base src full \"\"}",
			snap.ID, snap.VMID, snap.Type, snap.Parent)
	}
	if snap.VCPUCount != cfg.VCPUCount || snap.MemSizeMiB != cfg.MemSizeMiB {
		t.Fatalf("snapshot shape = %d vcpu %d MiB, want %d vcpu %d MiB",
			snap.VCPUCount, snap.MemSizeMiB, cfg.VCPUCount, cfg.MemSizeMiB)
	}
	if snap.Backend != p.Backend() {
		t.Errorf("snapshot backend = %q, want %q", snap.Backend, p.Backend())
	}
	s.expectState(t, p, "src", vm.StatePaused)

	listed, err := p.ListSnapshots(ctx, "src")
	must(t, err, "list snapshots")
	if len(listed) != 1 || listed[0].ID != "base" {
		t.Fatalf("list snapshots = %v, want [base]", listed)
	}

	ref := vm.SnapshotRef{VMID: "src", SnapshotID: "base"}
	paused, err := p.Create(ctx, s.restoreConfig(t, "clone-paused", ref))
	must(t, err, "restore paused")
	if paused.State != vm.StatePaused {
		t.Fatalf("restored vm state = %s, want paused", paused.State)
	}
	if paused.Config.VCPUCount != snap.VCPUCount || paused.Config.MemSizeMiB != snap.MemSizeMiB {
		t.Errorf("restored shape = %d vcpu %d MiB, want the snapshot's %d vcpu %d MiB",
			paused.Config.VCPUCount, paused.Config.MemSizeMiB, snap.VCPUCount, snap.MemSizeMiB)
	}
	must(t, p.Resume(ctx, "clone-paused"), "resume restored vm")
	s.expectState(t, p, "clone-paused", vm.StateRunning)

	ref.ResumeImmediately = true
	running, err := p.Create(ctx, s.restoreConfig(t, "clone-running", ref))
	must(t, err, "restore running")
	if running.State != vm.StateRunning {
		t.Fatalf("restored vm with resume_immediately: state = %s, want running", running.State)
	}
	must(t, p.Pause(ctx, "clone-running"), "pause restored vm")
	must(t, p.Destroy(ctx, "clone-running"), "destroy restored vm")
	s.expectGone(t, p, "clone-running")
}

func (s *suite) testSnapshotRules(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.snapshotOf(t, p, "rules")

	_, err := p.Snapshot(ctx, "rules", vm.SnapshotOptions{ID: "base"})
	if !errors.Is(err, vm.ErrSnapshotExists) {
		t.Errorf("snapshot with a used id: err = %v, want ErrSnapshotExists", err)
	}
	for _, bad := range []string{"", "../escape", "a/b", ".hidden"} {
		_, err := p.Snapshot(ctx, "rules", vm.SnapshotOptions{ID: bad})
		if !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("snapshot id %q: err = %v, want ErrInvalid", bad, err)
		}
	}
	must(t, p.Resume(ctx, "rules"), "resume")
	_, err = p.Snapshot(ctx, "rules", vm.SnapshotOptions{ID: "while-running"})
	expectTransitionError(t, err, "rules", vm.OpSnapshot, vm.StateRunning)

	snaps, err := p.ListSnapshots(ctx, "rules")
	must(t, err, "list snapshots")
	if len(snaps) != 1 {
		t.Fatalf("rejected snapshots were recorded: %v", snaps)
	}
}

func (s *suite) testRestoreErrors(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	snap := s.snapshotOf(t, p, "origin")

	missing := vm.SnapshotRef{VMID: "origin", SnapshotID: "nope"}
	if _, err := p.Create(ctx, s.restoreConfig(t, "r1", missing)); !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Errorf("restore of a missing snapshot: err = %v, want ErrSnapshotNotFound", err)
	}

	bigger := s.restoreConfig(t, "r2", vm.SnapshotRef{VMID: "origin", SnapshotID: "base"})
	bigger.MemSizeMiB = snap.MemSizeMiB * 2
	if _, err := p.Create(ctx, bigger); !errors.Is(err, vm.ErrSnapshotIncompatible) {
		t.Errorf("restore with more memory than the snapshot: err = %v, want ErrSnapshotIncompatible", err)
	}

	if _, err := p.Create(ctx, s.restoreConfig(t, "origin", vm.SnapshotRef{VMID: "origin", SnapshotID: "base"})); !errors.Is(err, vm.ErrAlreadyExists) {
		t.Errorf("restore onto an existing id: err = %v, want ErrAlreadyExists", err)
	}

	for _, id := range []string{"r1", "r2"} {
		if _, err := p.Get(ctx, id); !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("failed restore left vm %q: get err = %v", id, err)
		}
		if s.h.Leaked != nil {
			if err := s.h.Leaked(t, p, id); err != nil {
				t.Errorf("failed restore of %q leaked: %v", id, err)
			}
		}
	}
	s.expectState(t, p, "origin", vm.StatePaused)
}

func (s *suite) testDiffSnapshot(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.snapshotOf(t, p, "differ")
	must(t, p.Resume(ctx, "differ"), "resume")
	must(t, p.Pause(ctx, "differ"), "pause")
	diff, err := p.Snapshot(ctx, "differ", vm.SnapshotOptions{ID: "delta", Type: vm.SnapshotDiff})
	if errors.Is(err, vm.ErrUnsupported) {
		var ue *vm.UnsupportedError
		if !errors.As(err, &ue) || ue.Backend == "" || ue.Feature == "" {
			t.Fatalf("diff snapshot unsupported, but err = %#v is not a complete *vm.UnsupportedError", err)
		}
		t.Skipf("backend %s does not support diff snapshots: %v", p.Backend(), err)
	}
	must(t, err, "diff snapshot")
	if diff.Type != vm.SnapshotDiff || diff.Parent != "base" {
		t.Fatalf("diff snapshot = {Type:%s Parent:%q}, want {diff base}", diff.Type, diff.Parent)
	}
}

func (s *suite) testSnapshotOutlivesVM(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.snapshotOf(t, p, "mortal")
	must(t, p.Destroy(ctx, "mortal"), "destroy")
	s.expectGone(t, p, "mortal")

	snaps, err := p.ListSnapshots(ctx, "mortal")
	must(t, err, "list snapshots")
	if len(snaps) != 1 || snaps[0].ID != "base" {
		t.Fatalf("snapshots after destroy = %v, want [base]", snaps)
	}
	all, err := p.ListSnapshots(ctx, "")
	must(t, err, "list all snapshots")
	if len(all) != 1 {
		t.Fatalf("all snapshots = %v, want one", all)
	}
	info, err := p.Create(ctx, s.restoreConfig(t, "heir", vm.SnapshotRef{VMID: "mortal", SnapshotID: "base", ResumeImmediately: true}))
	must(t, err, "restore after the source vm was destroyed")
	if info.State != vm.StateRunning {
		t.Fatalf("restored state = %s, want running", info.State)
	}
}

func (s *suite) testRename(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.bring(t, p, "old-name", vm.StateRunning)
	s.bring(t, p, "taken", vm.StateCreated)

	err := p.Rename(ctx, "old-name", "taken")
	if !errors.Is(err, vm.ErrAlreadyExists) {
		t.Fatalf("rename onto an existing id: err = %v, want ErrAlreadyExists", err)
	}
	if err := p.Rename(ctx, "old-name", "bad/name"); !errors.Is(err, vm.ErrInvalid) {
		t.Fatalf("rename to an invalid id: err = %v, want ErrInvalid", err)
	}
	s.expectState(t, p, "old-name", vm.StateRunning)

	must(t, p.Rename(ctx, "old-name", "new-name"), "rename")
	if _, err := p.Get(ctx, "old-name"); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("get old name after rename: err = %v, want ErrNotFound", err)
	}
	info, err := p.Get(ctx, "new-name")
	must(t, err, "get new name")
	if info.State != vm.StateRunning || info.ID != "new-name" || info.Config.ID != "new-name" {
		t.Fatalf("renamed vm = {ID:%q Config.ID:%q State:%s}, want new-name running", info.ID, info.Config.ID, info.State)
	}
	must(t, p.Pause(ctx, "new-name"), "pause after rename")
	must(t, p.Resume(ctx, "new-name"), "resume after rename")

	infos, err := p.List(ctx)
	must(t, err, "list")
	if got := sortedIDs(infos); !slices.Equal(got, []string{"new-name", "taken"}) {
		t.Fatalf("list after rename = %v, want [new-name taken]", got)
	}
	must(t, p.Destroy(ctx, "new-name"), "destroy renamed vm")
	s.expectGone(t, p, "new-name")
	if s.h.Leaked != nil {
		if err := s.h.Leaked(t, p, "old-name"); err != nil {
			t.Fatalf("renamed vm left resources under its old id: %v", err)
		}
	}
}

func (s *suite) testConcurrentVMs(t *testing.T) {
	p := s.newProvider(t)
	n := s.h.Concurrency
	if n == 0 {
		n = 4
	}
	errs := parallel(n, func(i int) error {
		ctx := s.ctx(t)
		id := fmt.Sprintf("conc-%d", i)
		if _, err := p.Create(ctx, s.h.Config(t, id)); err != nil {
			return fmt.Errorf("create %s: %w", id, err)
		}
		for _, op := range []vm.Op{vm.OpStart, vm.OpPause, vm.OpResume, vm.OpPause} {
			if err := s.call(ctx, p, id, op); err != nil {
				return fmt.Errorf("%s %s: %w", op, id, err)
			}
		}
		if _, err := p.Snapshot(ctx, id, vm.SnapshotOptions{ID: "snap"}); err != nil {
			return fmt.Errorf("snapshot %s: %w", id, err)
		}
		if _, err := p.Get(ctx, id); err != nil {
			return fmt.Errorf("get %s: %w", id, err)
		}
		return p.Destroy(ctx, id)
	})
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for i := range n {
		s.expectGone(t, p, fmt.Sprintf("conc-%d", i))
	}
	snaps, err := p.ListSnapshots(s.ctx(t), "")
	must(t, err, "list snapshots")
	if len(snaps) != n {
		t.Fatalf("snapshots = %d, want %d", len(snaps), n)
	}
}

func (s *suite) testConcurrentSameVM(t *testing.T) {
	p := s.newProvider(t)
	s.bring(t, p, "contended", vm.StateRunning)
	const callers = 8
	errs := parallel(callers, func(int) error { return p.Pause(s.ctx(t), "contended") })
	succeeded := 0
	for _, err := range errs {
		switch {
		case err == nil:
			succeeded++
		case errors.Is(err, vm.ErrInvalidTransition):
		default:
			t.Errorf("concurrent pause: unexpected error %v", err)
		}
	}
	if succeeded != 1 {
		t.Fatalf("%d of %d concurrent pauses succeeded, want exactly 1", succeeded, callers)
	}
	s.expectState(t, p, "contended", vm.StatePaused)
}

func (s *suite) testCrash(t *testing.T) {
	if s.h.Crash == nil {
		t.Skip("harness has no Crash hook")
	}
	p := s.newProvider(t)
	ctx := s.ctx(t)
	s.bring(t, p, "victim", vm.StateRunning)
	s.bring(t, p, "bystander", vm.StateRunning)

	s.h.Crash(t, p, "victim")
	s.waitState(t, p, "victim", vm.StateFailed)
	for _, op := range callerOps {
		expectTransitionError(t, s.call(ctx, p, "victim", op), "victim", op, vm.StateFailed)
	}
	s.expectState(t, p, "bystander", vm.StateRunning)
	must(t, p.Destroy(ctx, "victim"), "destroy crashed vm")
	s.expectGone(t, p, "victim")
	must(t, p.Pause(ctx, "bystander"), "pause the other vm")
}

func (s *suite) testDestroyCleanup(t *testing.T) {
	p := s.newProvider(t)
	ctx := s.ctx(t)
	for _, state := range []vm.State{vm.StateCreated, vm.StateRunning, vm.StatePaused, vm.StateStopped} {
		id := "gone-" + string(state)
		s.bring(t, p, id, state)
		must(t, p.Destroy(ctx, id), "destroy %s vm", state)
		s.expectGone(t, p, id)
		if err := p.Destroy(ctx, id); !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("second destroy of %q: err = %v, want ErrNotFound", id, err)
		}
	}
}
