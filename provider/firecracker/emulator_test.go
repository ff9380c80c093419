package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/provider/firecracker/fcemu"
	"github.com/embervm/ember/vm"
	"github.com/embervm/ember/vm/vmtest"
)

// TestMain lets the test binary act as a fake firecracker: the provider
// spawns os.Args[0] with fcemu.EnvVersion in the child's environment.
func TestMain(m *testing.M) {
	if os.Getenv(fcemu.EnvVersion) != "" {
		os.Exit(fcemu.Main(os.Args[1:]))
	}
	code := m.Run()
	if code == 0 {
		// Every VM was destroyed, so nothing of the provider may still run:
		// no console copier, exit watcher, namespace spawner or uffd server.
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines leaked: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// emulatedVersions are the releases whose behaviour the emulator plays in
// the conformance runs.
var emulatedVersions = []string{"1.7.0", "1.10.1", "1.12.1", "1.14.1", "1.16.0"}

// emuEnv holds the environment of one emulated provider.
type emuEnv struct {
	runDir, snapDir, files string
}

func newEmuEnv(t *testing.T) emuEnv {
	t.Helper()
	// Run directories hold Unix sockets, so keep their paths short.
	run, err := os.MkdirTemp("", "fct")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	files := t.TempDir()
	for _, name := range []string{"vmlinux", "rootfs.ext4"} {
		if err := os.WriteFile(filepath.Join(files, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return emuEnv{runDir: filepath.Join(run, "run"), snapDir: filepath.Join(run, "snap"), files: files}
}

func newEmulated(t *testing.T, version string, env emuEnv, mutate ...func(*Config)) *Provider {
	t.Helper()
	cfg := Config{
		Binary:      os.Args[0],
		RunDir:      env.runDir,
		SnapshotDir: env.snapDir,
		Env:         []string{fcemu.EnvVersion + "=" + version},
	}
	for _, f := range mutate {
		f(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func emuConfig(env emuEnv, id string) vm.Config {
	return vm.Config{
		ID: id, Kernel: filepath.Join(env.files, "vmlinux"), Rootfs: filepath.Join(env.files, "rootfs.ext4"),
		VCPUCount: 1, MemSizeMiB: 64, BootArgs: vm.DefaultBootArgs, TrackDirtyPages: true,
		Vsock: &vm.Vsock{GuestCID: 3, UDSPath: filepath.Join(env.runDir, id+".vsock")},
	}
}

// leaked reports what a destroyed VM left: run directories, sockets, and
// live children.
func leaked(env emuEnv) error {
	entries, err := os.ReadDir(env.runDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var left []string
	for _, e := range entries {
		left = append(left, e.Name())
	}
	if len(left) > 0 {
		return fmt.Errorf("run directory entries left: %v", left)
	}
	return nil
}

func TestConformanceEmulated(t *testing.T) {
	for _, version := range emulatedVersions {
		t.Run(version, func(t *testing.T) {
			var envs = map[*testing.T]emuEnv{}
			vmtest.Run(t, vmtest.Harness{
				New: func(t *testing.T) vm.Provider {
					env := newEmuEnv(t)
					envs[t] = env
					return newEmulated(t, version, env)
				},
				// Restoring a second copy next to a running source needs
				// a new vsock path, which only 1.16 accepts, so older
				// versions run the suite without vsock.
				Config: func(t *testing.T, id string) vm.Config {
					cfg := emuConfig(envs[t], id)
					if !fcapi.Supports(fcapi.MustParse(version), fcapi.FeatureVsockOverride) {
						cfg.Vsock = nil
					}
					return cfg
				},
				RestoreConfig: func(t *testing.T, id string, ref vm.SnapshotRef) vm.Config {
					if fcapi.Supports(fcapi.MustParse(version), fcapi.FeatureVsockOverride) {
						ref.VsockOverride = &vm.VsockOverride{UDSPath: filepath.Join(envs[t].runDir, id+".vsock")}
					}
					return vm.Config{ID: id, RestoreFrom: &ref, TrackDirtyPages: true}
				},
				Crash: func(t *testing.T, p vm.Provider, id string) {
					info, err := p.Get(context.Background(), id)
					if err != nil || info.PID == 0 {
						t.Fatalf("crash %q: no pid (%v)", id, err)
					}
					syscall.Kill(info.PID, syscall.SIGKILL)
				},
				Leaked: func(t *testing.T, p vm.Provider, id string) error {
					// Only check when no VM is left, because the run
					// directory is shared by every VM of the provider.
					infos, _ := p.List(context.Background())
					if len(infos) > 0 {
						return nil
					}
					return leaked(envs[t])
				},
				Timeout:       20 * time.Second,
				ShutdownGrace: 2 * time.Second,
				Concurrency:   3,
			})
		})
	}
}

// bootEmulated creates and starts VM id and waits for GUEST-READY.
func bootEmulated(t *testing.T, p *Provider, cfg vm.Config) {
	t.Helper()
	ctx := context.Background()
	if _, err := p.Create(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Destroy(context.Background(), cfg.ID) })
	if err := p.Start(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, p, cfg.ID, "GUEST-READY")
}

func waitConsole(t *testing.T, p *Provider, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := p.Console(context.Background(), id)
		if err == nil && strings.Contains(string(out), want) {
			return string(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("console of %q lacks %q after 10s: %q (err %v)", id, want, out, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// snapshotFullThenDiff waits until VM id's guest printed TICK fullTick,
// takes the full snapshot "full", lets the guest run to TICK diffTick and
// takes the diff snapshot "delta". It returns the last tick the console
// showed before the diff, which a restore of "delta" continues from.
func snapshotFullThenDiff(t *testing.T, p *Provider, id string, fullTick, diffTick int) int {
	t.Helper()
	ctx := context.Background()
	waitConsole(t, p, id, fmt.Sprintf("TICK %d", fullTick))
	if err := p.Pause(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(ctx, id, vm.SnapshotOptions{ID: "full"}); err != nil {
		t.Fatal(err)
	}
	if err := p.Resume(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, p, id, fmt.Sprintf("TICK %d", diffTick))
	if err := p.Pause(ctx, id); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond) // let the last TICK line reach the console
	out, _ := p.Console(ctx, id)
	atDiff := lastTick(string(out))
	if _, err := p.Snapshot(ctx, id, vm.SnapshotOptions{ID: "delta", Type: vm.SnapshotDiff}); err != nil {
		t.Fatal(err)
	}
	return atDiff
}

// lastTick returns the highest TICK number in console output.
func lastTick(out string) int {
	n := -1
	for _, line := range strings.Split(out, "\n") {
		var v int
		if _, err := fmt.Sscanf(line, "TICK %d", &v); err == nil && v > n {
			n = v
		}
	}
	return n
}

func TestVersionGatedRestore(t *testing.T) {
	tests := []struct {
		version string
		ref     func(r *vm.SnapshotRef, vsock string)
		want    fcapi.Feature
	}{
		{"1.10.1", func(r *vm.SnapshotRef, _ string) {
			r.NetworkOverrides = []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: "tapnew"}}
		}, fcapi.FeatureNetworkOverrides},
		{"1.12.1", func(r *vm.SnapshotRef, _ string) {
			r.NetworkOverrides = []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: "tapnew"}}
		}, ""},
		{"1.14.1", func(r *vm.SnapshotRef, v string) { r.VsockOverride = &vm.VsockOverride{UDSPath: v} }, fcapi.FeatureVsockOverride},
		{"1.16.0", func(r *vm.SnapshotRef, v string) { r.VsockOverride = &vm.VsockOverride{UDSPath: v} }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.version+"/"+string(tt.want), func(t *testing.T) {
			env := newEmuEnv(t)
			p := newEmulated(t, tt.version, env)
			ctx := context.Background()
			cfg := emuConfig(env, "src")
			cfg.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tapold"}}
			if tt.want != fcapi.FeatureVsockOverride && tt.version != "1.16.0" {
				cfg.Vsock = nil
			}
			bootEmulated(t, p, cfg)
			if err := p.Pause(ctx, "src"); err != nil {
				t.Fatal(err)
			}
			if _, err := p.Snapshot(ctx, "src", vm.SnapshotOptions{ID: "s1"}); err != nil {
				t.Fatal(err)
			}
			ref := vm.SnapshotRef{VMID: "src", SnapshotID: "s1", ResumeImmediately: true}
			tt.ref(&ref, filepath.Join(env.runDir, "copy.vsock"))
			_, err := p.Create(ctx, vm.Config{ID: "copy", RestoreFrom: &ref, TrackDirtyPages: true})
			if tt.want == "" {
				if err != nil {
					t.Fatalf("restore: %v", err)
				}
				p.Destroy(ctx, "copy")
				return
			}
			var ue *vm.UnsupportedError
			if !errors.As(err, &ue) || ue.Feature != string(tt.want) || ue.Version != tt.version || ue.MinVersion == "" {
				t.Fatalf("restore error = %v, want unsupported %q naming %s and a minimum version", err, tt.want, tt.version)
			}
			if _, err := p.Get(ctx, "copy"); !errors.Is(err, vm.ErrNotFound) {
				t.Errorf("failed restore left the vm: %v", err)
			}
		})
	}
}

// TestRestoreContinuesGuest checks that memory really comes back: the
// emulated guest's tick counter continues after a restore from a full
// snapshot, from a diff chain merged onto its base, and through the uffd
// handler.
func TestRestoreContinuesGuest(t *testing.T) {
	for _, backend := range []MemoryBackend{MemoryFile, MemoryUffd} {
		t.Run(string(backend), func(t *testing.T) {
			if backend == MemoryUffd {
				if _, _, errno := syscall.Syscall(323, 0, 0, 0); errno == syscall.EPERM {
					t.Skip("userfaultfd(2) is not permitted: run as root or set vm.unprivileged_userfaultfd=1")
				}
			}
			env := newEmuEnv(t)
			p := newEmulated(t, "1.14.1", env, func(c *Config) { c.RestoreMemory = backend })
			ctx := context.Background()
			bootEmulated(t, p, emuConfig(env, "ticker"))
			atDiff := snapshotFullThenDiff(t, p, "ticker", 2, 4)
			p.Destroy(ctx, "ticker")

			ref := vm.SnapshotRef{VMID: "ticker", SnapshotID: "delta", ResumeImmediately: true}
			if _, err := p.Create(ctx, vm.Config{ID: "again", RestoreFrom: &ref}); err != nil {
				t.Fatalf("restore of the diff chain: %v", err)
			}
			defer p.Destroy(ctx, "again")
			got := waitConsole(t, p, "again", fmt.Sprintf("TICK %d", atDiff+1))
			if first := strings.Index(got, "TICK 1\n"); first >= 0 {
				t.Errorf("restored guest started counting from 1: %q", got)
			}
		})
	}
}

func TestSnapshotFromOtherVersion(t *testing.T) {
	env := newEmuEnv(t)
	old := newEmulated(t, "1.10.1", env)
	ctx := context.Background()
	bootEmulated(t, old, emuConfig(env, "old"))
	old.Pause(ctx, "old")
	if _, err := old.Snapshot(ctx, "old", vm.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	old.Destroy(ctx, "old")

	newer := newEmulated(t, "1.14.1", env)
	if _, err := newer.VMMVersion(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := newer.Create(ctx, vm.Config{ID: "new", RestoreFrom: &vm.SnapshotRef{VMID: "old", SnapshotID: "s"}})
	if !errors.Is(err, vm.ErrSnapshotIncompatible) {
		t.Fatalf("restore across versions: err = %v, want ErrSnapshotIncompatible", err)
	}
	for _, v := range []string{"1.10.1", "1.14.1"} {
		if !strings.Contains(err.Error(), v) {
			t.Errorf("error %q does not name version %s", err, v)
		}
	}
	if err := leaked(env); err != nil {
		t.Error(err)
	}
}

func TestDiffWithoutDirtyTracking(t *testing.T) {
	for _, tt := range []struct {
		version string
		wantErr bool
	}{{"1.10.1", true}, {"1.14.1", false}} {
		t.Run(tt.version, func(t *testing.T) {
			env := newEmuEnv(t)
			p := newEmulated(t, tt.version, env)
			ctx := context.Background()
			cfg := emuConfig(env, "nodirty")
			cfg.TrackDirtyPages = false
			bootEmulated(t, p, cfg)
			p.Pause(ctx, "nodirty")
			if _, err := p.Snapshot(ctx, "nodirty", vm.SnapshotOptions{ID: "full"}); err != nil {
				t.Fatal(err)
			}
			_, err := p.Snapshot(ctx, "nodirty", vm.SnapshotOptions{ID: "d", Type: vm.SnapshotDiff})
			var ue *vm.UnsupportedError
			if tt.wantErr && (!errors.As(err, &ue) || ue.Feature != string(fcapi.FeatureDiffWithoutDirtyTracking)) {
				t.Fatalf("diff without tracking on %s: err = %v, want unsupported", tt.version, err)
			}
			if !tt.wantErr && err != nil {
				t.Fatalf("diff without tracking on %s: %v", tt.version, err)
			}
		})
	}
}

func TestInvalidConfigStartsNoProcess(t *testing.T) {
	env := newEmuEnv(t)
	// A binary that does not exist proves no process is started: any
	// attempt would fail with a different error.
	p, err := New(Config{Binary: "/nonexistent/firecracker", RunDir: env.runDir, SnapshotDir: env.snapDir})
	if err != nil {
		t.Fatal(err)
	}
	good := emuConfig(env, "bad")
	tests := []struct {
		name   string
		mutate func(*vm.Config)
		want   error
	}{
		{"no kernel", func(c *vm.Config) { c.Kernel = "" }, vm.ErrInvalid},
		{"relative kernel", func(c *vm.Config) { c.Kernel = "vmlinux" }, vm.ErrInvalid},
		{"zero vcpus", func(c *vm.Config) { c.VCPUCount = 0 }, vm.ErrInvalid},
		{"33 vcpus", func(c *vm.Config) { c.VCPUCount = 33 }, vm.ErrInvalid},
		{"no memory", func(c *vm.Config) { c.MemSizeMiB = 0 }, vm.ErrInvalid},
		{"bad id", func(c *vm.Config) { c.ID = "a/b" }, vm.ErrInvalid},
		{"long tap", func(c *vm.Config) {
			c.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap-name-too-long-x"}}
		}, vm.ErrInvalid},
		{"multicast mac", func(c *vm.Config) {
			c.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap0", GuestMAC: "01:00:00:00:00:01"}}
		}, vm.ErrInvalid},
		{"reserved cid", func(c *vm.Config) { c.Vsock = &vm.Vsock{GuestCID: 2, UDSPath: "/tmp/v.sock"} }, vm.ErrInvalid},
		{"negative bucket", func(c *vm.Config) {
			c.RootfsRateLimit = &vm.RateLimiter{Bandwidth: &vm.TokenBucket{Size: -1, RefillTime: 1}}
		}, vm.ErrInvalid},
		{"duplicate drive", func(c *vm.Config) {
			c.ExtraDrives = []vm.Drive{{ID: "d", PathOnHost: "/a"}, {ID: "d", PathOnHost: "/b"}}
		}, vm.ErrInvalid},
		{"mtu", func(c *vm.Config) {
			c.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap0", MTU: 1400}}
		}, vm.ErrUnsupported},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := good.Clone()
			tt.mutate(&cfg)
			_, err := p.Create(context.Background(), cfg)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Create error = %v, want %v", err, tt.want)
			}
			if strings.Contains(err.Error(), "/nonexistent/firecracker") {
				t.Errorf("Create tried to start a process: %v", err)
			}
		})
	}
	if err := leaked(env); err != nil {
		t.Error(err)
	}
}

func TestCrashDetection(t *testing.T) {
	env := newEmuEnv(t)
	p := newEmulated(t, "1.14.1", env, func(c *Config) {
		c.Env = append(c.Env, fcemu.EnvCrashAfterStart+"=200ms")
	})
	bootEmulated(t, p, emuConfig(env, "crashy"))
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, _ := p.Get(context.Background(), "crashy")
		if info.State == vm.StateFailed {
			if !strings.Contains(info.Reason, "exit status 3") || info.PID != 0 {
				t.Errorf("failed vm: reason %q, pid %d; want exit status 3 and no pid", info.Reason, info.PID)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vm state = %s 10s after the crash, want failed", info.State)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := p.Destroy(context.Background(), "crashy"); err != nil {
		t.Fatalf("destroy a crashed vm: %v", err)
	}
	if err := leaked(env); err != nil {
		t.Error(err)
	}
}

func TestAgentAndMetrics(t *testing.T) {
	env := newEmuEnv(t)
	p := newEmulated(t, "1.16.0", env)
	ctx := context.Background()
	bootEmulated(t, p, emuConfig(env, "talk"))

	conn, err := p.DialAgent(ctx, "talk")
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("ping"))
	buf := make([]byte, 4)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(buf); err != nil || string(buf) != "ping" {
		t.Errorf("echo over vsock = %q, %v", buf, err)
	}
	conn.Close()

	var m Metrics
	for range 3 {
		if m, err = p.Metrics(ctx, "talk"); err != nil {
			t.Fatal(err)
		}
	}
	if m.Flushes != 3 || m.Net.TxBytes != 3*fcemu.MetricsNetTxBytes || m.Block.ReadBytes != 3*fcemu.MetricsBlockReadB || m.VCPU.ExitIOIn != 3*fcemu.MetricsVcpuExitsIO {
		t.Errorf("metrics after 3 flushes = %+v", m)
	}
}
