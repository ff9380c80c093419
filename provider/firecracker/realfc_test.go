package firecracker

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
	"github.com/embervm/ember/vm/vmtest"
)

// realEnv describes a real Firecracker run: the binary from
// EMBER_FIRECRACKER_BIN and a guest kernel from EMBER_FIRECRACKER_KERNEL or
// the fcprobe test kernel.
type realEnv struct {
	binary, kernel, rootfs string
	emu                    emuEnv
}

// findProbeKernel looks for shared/testdata/fcprobe/fcprobe.elf in every
// ancestor of the working directory, which finds the read-only shared/
// folder that CI places beside the repository.
func findProbeKernel() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		p := filepath.Join(dir, "shared", "testdata", "fcprobe", "fcprobe.elf")
		if _, err := os.Stat(p); err == nil {
			return p
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

func newRealEnv(t *testing.T) realEnv {
	t.Helper()
	bin := os.Getenv("EMBER_FIRECRACKER_BIN")
	if bin == "" {
		t.Skip("EMBER_FIRECRACKER_BIN is not set: set it to a Firecracker binary (1.7 to 1.16) to run the real-Firecracker tests")
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skipf("/dev/kvm is not available (%v): Firecracker needs KVM", err)
	}
	kernel := os.Getenv("EMBER_FIRECRACKER_KERNEL")
	if kernel == "" {
		kernel = findProbeKernel()
	}
	if kernel == "" {
		t.Skip("no guest kernel: set EMBER_FIRECRACKER_KERNEL, or place shared/testdata/fcprobe/fcprobe.elf beside the repository")
	}
	env := newEmuEnv(t)
	rootfs := filepath.Join(env.files, "rootfs.img")
	if err := os.WriteFile(rootfs, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return realEnv{binary: bin, kernel: kernel, rootfs: rootfs, emu: env}
}

func (e realEnv) provider(t *testing.T, mutate ...func(*Config)) *Provider {
	t.Helper()
	cfg := Config{Binary: e.binary, RunDir: e.emu.runDir, SnapshotDir: e.emu.snapDir, LogLevel: "Info"}
	for _, f := range mutate {
		f(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (e realEnv) config(id string) vm.Config {
	return vm.Config{
		ID: id, Kernel: e.kernel, Rootfs: e.rootfs, RootfsReadOnly: true,
		VCPUCount: 1, MemSizeMiB: 64, BootArgs: "console=ttyS0 reboot=k panic=1",
		TrackDirtyPages: true,
	}
}

func TestRealConformance(t *testing.T) {
	envs := map[*testing.T]realEnv{}
	vmtest.Run(t, vmtest.Harness{
		New: func(t *testing.T) vm.Provider {
			env := newRealEnv(t)
			envs[t] = env
			return env.provider(t)
		},
		Config: func(t *testing.T, id string) vm.Config { return envs[t].config(id) },
		Crash: func(t *testing.T, p vm.Provider, id string) {
			info, _ := p.Get(context.Background(), id)
			syscall.Kill(info.PID, syscall.SIGKILL)
		},
		Leaked: func(t *testing.T, p vm.Provider, id string) error {
			if infos, _ := p.List(context.Background()); len(infos) > 0 {
				return nil
			}
			return leaked(envs[t].emu)
		},
		Timeout:       30 * time.Second,
		ShutdownGrace: 500 * time.Millisecond,
		Concurrency:   2,
	})
}

func TestRealBootAndRestore(t *testing.T) {
	for _, backend := range []MemoryBackend{MemoryFile, MemoryUffd} {
		t.Run(string(backend), func(t *testing.T) {
			env := newRealEnv(t)
			p := env.provider(t, func(c *Config) { c.RestoreMemory = backend })
			ctx := context.Background()
			bootEmulated(t, p, env.config("probe"))
			out := waitConsole(t, p, "probe", "SCAN-DONE")
			if !strings.Contains(out, "id=2") {
				t.Errorf("guest found no block device: %q", out)
			}
			atDiff := snapshotFullThenDiff(t, p, "probe", 3, 6)
			if err := p.Destroy(ctx, "probe"); err != nil {
				t.Fatal(err)
			}

			for _, snap := range []string{"full", "delta"} {
				id := "back-" + snap
				ref := vm.SnapshotRef{VMID: "probe", SnapshotID: snap, ResumeImmediately: true}
				start := time.Now()
				if _, err := p.Create(ctx, vm.Config{ID: id, RestoreFrom: &ref, TrackDirtyPages: true}); err != nil {
					// Firecracker 1.7.0 rejects the ioctl flags that newer
					// host kernels report for a userfaultfd registration.
					if backend == MemoryUffd && strings.Contains(err.Error(), "Unrecognized ioctl flags") {
						t.Skipf("this Firecracker cannot use userfaultfd on this host kernel: %v", err)
					}
					t.Fatalf("restore %s: %v", snap, err)
				}
				want := 4
				if snap == "delta" {
					want = atDiff + 1
				}
				got := waitConsole(t, p, id, fmt.Sprintf("TICK %d", want))
				t.Logf("restore of %s (%s): TICK %d after %s", snap, backend, want, time.Since(start))
				if strings.Contains(got, "GUEST-READY") {
					t.Errorf("restored guest booted again: %q", got)
				}
				if err := p.Destroy(ctx, id); err != nil {
					t.Error(err)
				}
			}
			if err := leaked(env.emu); err != nil {
				t.Error(err)
			}
		})
	}
}
