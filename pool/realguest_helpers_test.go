package pool_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/image"
	"github.com/embervm/ember/pool"
	"github.com/embervm/ember/provider/qemu"
	"github.com/embervm/ember/snapshot"
	"github.com/embervm/ember/vm"
)

// The real-guest tests and benchmarks boot Linux guests under QEMU from a
// guest bundle made by `ember image build`, with the Ember agent inside.
const bundleEnv = "EMBER_TEST_BUNDLE"

// guestMemMiB keeps guests small, because several run at once on a
// machine that other test processes share.
const guestMemMiB = 128

// guestTimeout bounds one boot or restore until the agent answers. TCG
// guests on a shared 2-core machine are slow, so it is generous. It only
// stops a hung test and is not a measurement.
const guestTimeout = 2 * time.Minute

// realEnv is a QEMU provider in its own run and snapshot directories, a
// snapshot store, and the bundle's boot configuration.
type realEnv struct {
	prov     *qemu.Provider
	store    *snapshot.Store
	runDir   string
	defaults vm.Defaults
	version  string
}

// newRealEnv returns an environment for real guests or skips the test,
// saying what is missing. Its cleanup destroys every VM the provider still
// has and removes the directories.
func newRealEnv(t testing.TB) *realEnv {
	t.Helper()
	if _, err := exec.LookPath(qemu.DefaultBinary); err != nil {
		t.Skipf("%s not found: install it with `apt-get install qemu-system-x86`", qemu.DefaultBinary)
	}
	bundle := os.Getenv(bundleEnv)
	if bundle == "" {
		t.Skipf("%s is not set: build a bundle with `ember image build --dir DIR --agent AGENT` and set %s=DIR", bundleEnv, bundleEnv)
	}
	manifest, err := image.VerifyBundle(bundle)
	if err != nil {
		t.Skipf("%s=%s is not a usable guest bundle: %v", bundleEnv, bundle, err)
	}

	// A short directory under /tmp keeps the agent socket paths under the
	// 107-byte limit of Unix socket addresses.
	runDir, err := os.MkdirTemp("/tmp", "pbq")
	if err != nil {
		t.Fatal(err)
	}
	store, err := snapshot.Open(filepath.Join(runDir, "manifests"))
	if err != nil {
		os.RemoveAll(runDir)
		t.Fatal(err)
	}
	prov, err := qemu.New(context.Background(), qemu.Options{
		RunDir:      filepath.Join(runDir, "vms"),
		SnapshotDir: filepath.Join(runDir, "snapshots"),
		Accel:       qemu.AccelTCG,
		Logger:      slog.New(slog.DiscardHandler),
	})
	if err != nil {
		store.Close()
		os.RemoveAll(runDir)
		t.Fatalf("new qemu provider: %v", err)
	}
	version, _ := prov.VMMVersion(context.Background())
	env := &realEnv{prov: prov, store: store, runDir: runDir, version: version}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		infos, _ := prov.List(ctx)
		for _, info := range infos {
			if err := prov.Destroy(ctx, info.ID); err != nil {
				t.Errorf("cleanup: destroy %s: %v", info.ID, err)
			}
		}
		prov.Close()
		store.Close()
		os.RemoveAll(runDir)
	})

	// The same boot configuration as `ember run`: the bundle's kernel,
	// initramfs and read-only root filesystem, switched to by the init.
	env.defaults = vm.Defaults{
		Kernel:         filepath.Join(bundle, image.VmlinuxFile),
		Initrd:         filepath.Join(bundle, image.InitramfsFile),
		Rootfs:         filepath.Join(bundle, image.RootfsFile),
		RootfsReadOnly: true,
		VCPUCount:      1,
		MemSizeMiB:     guestMemMiB,
		BootArgs:       manifest.BootArgs[image.ModeSwitchRoot] + " ember.rootflags=ro",
	}
	return env
}

// bootConfig returns the cold-boot configuration of VM id.
func (e *realEnv) bootConfig(id string) (vm.Config, error) {
	return vm.Resolve(id, e.defaults, vm.Spec{})
}

// coldBoot boots VM id and waits for its agent.
func (e *realEnv) coldBoot(ctx context.Context, id string) error {
	cfg, err := e.bootConfig(id)
	if err != nil {
		return err
	}
	if _, err := e.prov.Create(ctx, cfg); err != nil {
		return err
	}
	if err := e.prov.Start(ctx, id); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, guestTimeout)
	defer cancel()
	return pool.AgentGuest{Dialer: e.prov}.Health(ctx, id)
}

// golden cold-boots VM id, snapshots it as snapID and records the snapshot
// in the store. The golden VM stays paused, so further snapshots can be
// taken from it.
func (e *realEnv) golden(t testing.TB, id, snapID string) vm.SnapshotRef {
	t.Helper()
	ctx := context.Background()
	if err := e.coldBoot(ctx, id); err != nil {
		t.Fatalf("cold boot golden vm: %v", err)
	}
	if err := e.prov.Pause(ctx, id); err != nil {
		t.Fatalf("pause golden vm: %v", err)
	}
	return e.snapshot(t, id, snapID)
}

// snapshot takes and records snapshot snapID of the paused VM id.
func (e *realEnv) snapshot(t testing.TB, id, snapID string) vm.SnapshotRef {
	t.Helper()
	ctx := context.Background()
	info, err := e.prov.Snapshot(ctx, id, vm.SnapshotOptions{ID: snapID})
	if err != nil {
		t.Fatalf("snapshot %s/%s: %v", id, snapID, err)
	}
	cfg, err := e.bootConfig(id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Record(ctx, info, e.version, snapshot.Inputs{Kernel: cfg.Kernel, Rootfs: cfg.Rootfs}); err != nil {
		t.Fatalf("record snapshot %s/%s: %v", id, snapID, err)
	}
	return vm.SnapshotRef{VMID: id, SnapshotID: snapID}
}

// snapshotInfo returns the provider's description of snapshot ref.
func (e *realEnv) snapshotInfo(t testing.TB, ref vm.SnapshotRef) vm.SnapshotInfo {
	t.Helper()
	infos, err := e.prov.ListSnapshots(context.Background(), ref.VMID)
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range infos {
		if info.ID == ref.SnapshotID {
			return info
		}
	}
	t.Fatalf("snapshot %s/%s not listed", ref.VMID, ref.SnapshotID)
	return vm.SnapshotInfo{}
}

// verifySnapshot checks a bucket's snapshot in the store before a restore:
// same backend, a QEMU that can load it and every file at its recorded
// size.
func (e *realEnv) verifySnapshot(ctx context.Context, ref vm.SnapshotRef) error {
	_, err := e.store.Check(ctx, ref.VMID, ref.SnapshotID, snapshot.Target{
		Backend:    e.prov.Backend(),
		VMMVersion: e.version,
	})
	return err
}

// newPool returns a pool over the environment's provider with no NICs.
// Its cleanup closes it.
func (e *realEnv) newPool(t testing.TB, mutate func(*pool.Options)) *pool.Pool {
	t.Helper()
	opts := pool.Options{
		Provider:   e.prov,
		Network:    noNetwork{},
		Guest:      pool.AgentGuest{Dialer: e.prov},
		RetryDelay: 200 * time.Millisecond,
	}
	if mutate != nil {
		mutate(&opts)
	}
	p, err := pool.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.Close(ctx); err != nil {
			t.Errorf("close pool: %v", err)
		}
	})
	return p
}

// qemuProcesses maps the pids of processes whose command line mentions the
// environment's run directory, which every QEMU it started does, to their
// command lines.
func (e *realEnv) qemuProcesses(t testing.TB) map[string]string {
	t.Helper()
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	pids := map[string]string{}
	for _, d := range dirs {
		if d.Name()[0] < '0' || d.Name()[0] > '9' {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue // the process exited meanwhile
		}
		if bytes.Contains(cmdline, []byte(e.runDir)) {
			pids[d.Name()] = string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
		}
	}
	return pids
}

// vmDirs returns the names of the run directories of VMs.
func (e *realEnv) vmDirs(t testing.TB) []string {
	t.Helper()
	dirs, err := os.ReadDir(filepath.Join(e.runDir, "vms"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range dirs {
		names = append(names, d.Name())
	}
	return names
}

// vmIDs returns the ids of the provider's VMs.
func (e *realEnv) vmIDs(t testing.TB) []string {
	t.Helper()
	infos, err := e.prov.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, info := range infos {
		ids = append(ids, info.ID)
	}
	return ids
}

// guestExec runs argv in VM id through its agent and returns standard
// output; a non-zero exit is an error that includes standard error.
func (e *realEnv) guestExec(ctx context.Context, id string, argv ...string) (string, error) {
	dial := func(ctx context.Context) (net.Conn, error) { return e.prov.DialAgent(ctx, id) }
	c, err := agent.Dial(ctx, dial, nil)
	if err != nil {
		return "", fmt.Errorf("agent of %s: %w", id, err)
	}
	defer c.Close()
	var stdout, stderr bytes.Buffer
	res, err := c.Exec(ctx, agent.ExecRequest{Argv: argv, Timeout: time.Minute}, agent.ExecIO{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return "", fmt.Errorf("exec %q in %s: %w", argv, id, err)
	}
	if res.ExitCode != 0 {
		return "", fmt.Errorf("exec %q in %s: exit code %d: %s", argv, id, res.ExitCode, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// noNetwork gives VMs no NICs. Restored clones keep their snapshot's MAC,
// so real networking for them needs a namespace per clone.
type noNetwork struct{}

func (noNetwork) Attach(context.Context, string) (pool.Attachment, error) {
	return pool.Attachment{}, nil
}

func (noNetwork) Handoff(context.Context, string, string) (pool.Attachment, error) {
	return pool.Attachment{}, nil
}

func (noNetwork) Detach(context.Context, string) error { return nil }

// waitStatus polls the status of the pool's only bucket until cond holds
// or the guest timeout passes.
func waitStatus(t testing.TB, p *pool.Pool, what string, cond func(pool.BucketStatus) bool) pool.BucketStatus {
	t.Helper()
	deadline := time.Now().Add(guestTimeout)
	for {
		st := p.Status()
		if len(st) == 1 && cond(st[0]) {
			return st[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; status %+v", what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
