package memory_test

import (
	"errors"
	"testing"

	"github.com/embervm/ember/provider/memory"
	"github.com/embervm/ember/vm"
	"github.com/embervm/ember/vm/vmtest"
)

func testConfig(t *testing.T, id string) vm.Config {
	return vm.Config{
		ID:              id,
		Kernel:          "/boot/vmlinux",
		Rootfs:          "/images/rootfs.ext4",
		VCPUCount:       2,
		MemSizeMiB:      128,
		BootArgs:        vm.DefaultBootArgs,
		TrackDirtyPages: true,
	}
}

func TestConformance(t *testing.T) {
	vmtest.Run(t, vmtest.Harness{
		New:    func(t *testing.T) vm.Provider { return memory.New() },
		Config: testConfig,
		Crash: func(t *testing.T, p vm.Provider, id string) {
			if err := p.(*memory.Provider).Crash(id); err != nil {
				t.Fatalf("crash %q: %v", id, err)
			}
		},
		Parallel: true,
	})
}

func TestPowerOffStopsRunningVM(t *testing.T) {
	p := memory.New()
	ctx := t.Context()
	if _, err := p.Create(ctx, testConfig(t, "a")); err != nil {
		t.Fatal(err)
	}
	if err := p.PowerOff("a"); !errors.Is(err, vm.ErrInvalidTransition) {
		t.Fatalf("power-off of a created vm: err = %v, want ErrInvalidTransition", err)
	}
	if err := p.Start(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := p.PowerOff("a"); err != nil {
		t.Fatalf("power-off: %v", err)
	}
	info, err := p.Get(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if info.State != vm.StateStopped || info.Reason != "guest powered off" {
		t.Fatalf("after power-off: state %s reason %q, want stopped and the reason", info.State, info.Reason)
	}
}

func TestRestoreAppliesOverrides(t *testing.T) {
	p := memory.New()
	ctx := t.Context()
	cfg := testConfig(t, "src")
	cfg.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap-src"}}
	cfg.Vsock = &vm.Vsock{GuestCID: 3, UDSPath: "/run/ember/src/vsock.sock"}
	if _, err := p.Create(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	for _, step := range []func() error{
		func() error { return p.Start(ctx, "src") },
		func() error { return p.Pause(ctx, "src") },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Snapshot(ctx, "src", vm.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}

	ref := &vm.SnapshotRef{
		VMID: "src", SnapshotID: "s1",
		NetworkOverrides: []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: "tap-clone"}},
		VsockOverride:    &vm.VsockOverride{UDSPath: "/run/ember/clone/vsock.sock"},
	}
	info, err := p.Create(ctx, vm.Config{ID: "clone", RestoreFrom: ref})
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Config.NetworkInterfaces[0].HostDevName; got != "tap-clone" {
		t.Errorf("restored tap = %q, want tap-clone", got)
	}
	if got := info.Config.Vsock.UDSPath; got != "/run/ember/clone/vsock.sock" {
		t.Errorf("restored vsock path = %q, want the override", got)
	}
	if info.Config.TrackDirtyPages {
		t.Errorf("restored vm tracks dirty pages, but the restore config did not ask for it")
	}

	bad := ref.Clone()
	bad.NetworkOverrides[0].IfaceID = "eth9"
	if _, err := p.Create(ctx, vm.Config{ID: "clone2", RestoreFrom: bad}); !errors.Is(err, vm.ErrSnapshotIncompatible) {
		t.Fatalf("override of an unknown interface: err = %v, want ErrSnapshotIncompatible", err)
	}
}

func TestDeleteSnapshotProtectsDependants(t *testing.T) {
	p := memory.New()
	ctx := t.Context()
	if _, err := p.Create(ctx, testConfig(t, "v")); err != nil {
		t.Fatal(err)
	}
	mustDo(t, p.Start(ctx, "v"), p.Pause(ctx, "v"))
	if _, err := p.Snapshot(ctx, "v", vm.SnapshotOptions{ID: "full"}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(ctx, "v", vm.SnapshotOptions{ID: "d1", Type: vm.SnapshotDiff}); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot(ctx, "v", "full"); err == nil {
		t.Fatal("deleting the parent of a diff succeeded")
	}
	mustDo(t, p.DeleteSnapshot(ctx, "v", "d1"), p.DeleteSnapshot(ctx, "v", "full"))
	if err := p.DeleteSnapshot(ctx, "v", "full"); !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Fatalf("second delete: err = %v, want ErrSnapshotNotFound", err)
	}
}

func TestDiffSnapshotNeedsDirtyTracking(t *testing.T) {
	p := memory.New()
	ctx := t.Context()
	cfg := testConfig(t, "v")
	cfg.TrackDirtyPages = false
	if _, err := p.Create(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	mustDo(t, p.Start(ctx, "v"), p.Pause(ctx, "v"))
	if _, err := p.Snapshot(ctx, "v", vm.SnapshotOptions{ID: "d0", Type: vm.SnapshotDiff}); !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Fatalf("diff without a parent: err = %v, want ErrSnapshotNotFound", err)
	}
	if _, err := p.Snapshot(ctx, "v", vm.SnapshotOptions{ID: "full"}); err != nil {
		t.Fatal(err)
	}
	_, err := p.Snapshot(ctx, "v", vm.SnapshotOptions{ID: "d1", Type: vm.SnapshotDiff})
	var ue *vm.UnsupportedError
	if !errors.As(err, &ue) || ue.Backend != memory.Backend {
		t.Fatalf("diff without dirty tracking: err = %v, want *vm.UnsupportedError from %s", err, memory.Backend)
	}
}

func mustDo(t *testing.T, errs ...error) {
	t.Helper()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}
