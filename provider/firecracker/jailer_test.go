package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/embervm/ember/vm"
)

func TestJailerArgs(t *testing.T) {
	tests := []struct {
		name string
		cfg  JailerConfig
		want []string
		not  []string
	}{
		{"cgroup v2 limits", JailerConfig{CgroupVersion: 2, CPUQuotaUS: 50000, MemoryMaxBytes: 1 << 28, PidsMax: 64, NewPIDNamespace: true, NetNS: "/var/run/netns/x"},
			[]string{"cpu.max=50000 100000", "memory.max=268435456", "pids.max=64", "--new-pid-ns", "--netns", "/var/run/netns/x", "--cgroup-version", "2"}, nil},
		{"cgroup v1 limits", JailerConfig{CgroupVersion: 1, CPUQuotaUS: 20000, CPUPeriodUS: 40000, MemoryMaxBytes: 1024},
			[]string{"cpu.cfs_quota_us=20000", "cpu.cfs_period_us=40000", "memory.limit_in_bytes=1024", "1"}, []string{"--new-pid-ns", "--netns"}},
		{"no limits", JailerConfig{CgroupVersion: 2}, nil, []string{"--cgroup"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.UID, tt.cfg.GID, tt.cfg.ChrootBaseDir = 123, 456, "/srv/j"
			j := &jail{cfg: tt.cfg, id: "abc123"}
			args := j.jailerArgs("/usr/bin/firecracker", 4096, []string{"--api-sock", "/run/api.sock"})
			joined := strings.Join(args, " ")
			for _, w := range append(tt.want, "--id", "abc123", "--exec-file", "/usr/bin/firecracker", "--uid", "123", "--gid", "456", "no-file=4096") {
				if !slices.Contains(args, w) {
					t.Errorf("args %q lack %q", joined, w)
				}
			}
			for _, n := range tt.not {
				if slices.Contains(args, n) {
					t.Errorf("args %q contain %q", joined, n)
				}
			}
			sep := slices.Index(args, "--")
			if sep < 0 || !slices.Equal(args[sep+1:], []string{"--api-sock", "/run/api.sock"}) {
				t.Errorf("firecracker args are not after --: %q", joined)
			}
		})
	}
}

func TestLinkOrCopyNeverChownsOriginal(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to stage files for another user: run the tests as root")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "private.img")
	if err := os.WriteFile(src, []byte("disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A user who cannot read the original gets a copy it owns.
	dst := filepath.Join(dir, "staged.img")
	if err := linkOrCopy(src, dst, 65534, 65534, true); err != nil {
		t.Fatal(err)
	}
	var srcSt, dstSt syscall.Stat_t
	syscall.Stat(src, &srcSt)
	syscall.Stat(dst, &dstSt)
	if srcSt.Uid != 0 || srcSt.Ino == dstSt.Ino {
		t.Errorf("original owner %d, same inode %v: want the original untouched and a separate copy", srcSt.Uid, srcSt.Ino == dstSt.Ino)
	}
	if dstSt.Uid != 65534 {
		t.Errorf("copy owner = %d, want 65534", dstSt.Uid)
	}

	// A world-readable file used read-only is hard-linked.
	shared := filepath.Join(dir, "kernel")
	os.WriteFile(shared, []byte("k"), 0o644)
	linked := filepath.Join(dir, "kernel.staged")
	if err := linkOrCopy(shared, linked, 65534, 65534, false); err != nil {
		t.Fatal(err)
	}
	var a, b syscall.Stat_t
	syscall.Stat(shared, &a)
	syscall.Stat(linked, &b)
	if a.Ino != b.Ino || a.Uid != 0 {
		t.Errorf("readable file: linked=%v owner=%d, want a hard link and owner 0", a.Ino == b.Ino, a.Uid)
	}
}

// TestRealJailer runs a VM through the real jailer, then checks that
// destroy removed the chroot and the cgroup.
func TestRealJailer(t *testing.T) {
	jailerBin := os.Getenv("EMBER_JAILER_BIN")
	if jailerBin == "" {
		t.Skip("EMBER_JAILER_BIN is not set: set it to the jailer of the same release as EMBER_FIRECRACKER_BIN")
	}
	if os.Getuid() != 0 {
		t.Skip("the jailer needs root: run the test as root")
	}
	env := newRealEnv(t)
	_, nsPath := newTestNetNS(t)
	cgroupVersion := 1
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		cgroupVersion = 2
	}
	base := filepath.Join(env.emu.files, "jail")
	t.Cleanup(func() {
		for _, d := range []string{"/sys/fs/cgroup/ember-test", "/sys/fs/cgroup/cpu/ember-test", "/sys/fs/cgroup/memory/ember-test", "/sys/fs/cgroup/pids/ember-test", "/sys/fs/cgroup/cpuset/ember-test", "/sys/fs/cgroup/cpuacct/ember-test"} {
			syscall.Rmdir(d)
		}
	})
	for _, newPID := range []bool{false, true} {
		name := "same-pid-ns"
		if newPID {
			name = "new-pid-ns"
		}
		t.Run(name, func(t *testing.T) {
			p := env.provider(t, func(c *Config) {
				c.Jailer = &JailerConfig{
					Binary: jailerBin, ChrootBaseDir: base, UID: 65534, GID: 65534,
					CgroupVersion: cgroupVersion, ParentCgroup: "ember-test",
					MemoryMaxBytes: 512 << 20, PidsMax: 100, NewPIDNamespace: newPID,
				}
			})
			ctx := context.Background()
			cfg := env.config("jailed")
			cfg.NetNS = nsPath
			bootEmulated(t, p, cfg)
			waitConsole(t, p, "jailed", "TICK 2")
			info, _ := p.Get(ctx, "jailed")
			if info.PID == 0 {
				t.Fatalf("jailed vm has no pid")
			}
			if got, want := nsInode(t, "/proc/"+strconv.Itoa(info.PID)+"/ns/net"), nsInode(t, nsPath); got != want {
				t.Errorf("jailed firecracker runs in namespace inode %d, want %d (%s)", got, want, nsPath)
			}
			comm, _ := os.ReadFile("/proc/" + strconv.Itoa(info.PID) + "/comm")
			if !strings.HasPrefix(strings.TrimSpace(string(comm)), "firecracker") {
				t.Errorf("pid %d is %q, want the firecracker process", info.PID, comm)
			}
			if err := p.Pause(ctx, "jailed"); err != nil {
				t.Fatal(err)
			}
			if _, err := p.Snapshot(ctx, "jailed", vm.SnapshotOptions{ID: "s"}); err != nil {
				t.Fatal(err)
			}
			if err := p.Destroy(ctx, "jailed"); err != nil {
				t.Fatal(err)
			}
			entries, _ := os.ReadDir(filepath.Join(base, filepath.Base(env.binary)))
			if len(entries) != 0 {
				t.Errorf("chroot left behind: %v", entries)
			}
			// A jailed Firecracker in its own PID namespace is not Ember's
			// child, so init reaps it; until then it is a zombie.
			if stat, err := os.ReadFile("/proc/" + strconv.Itoa(info.PID) + "/stat"); err == nil && !strings.Contains(string(stat), ") Z ") {
				t.Errorf("firecracker %d still runs after destroy: %s", info.PID, stat)
			}
			if cg, _ := filepath.Glob("/sys/fs/cgroup/*/ember-test/*/tasks"); len(cg) > 0 {
				t.Errorf("cgroups left behind: %v", cg)
			}
			snaps, _ := p.ListSnapshots(ctx, "jailed")
			if len(snaps) != 1 {
				t.Errorf("snapshot did not outlive the jail: %v", snaps)
			}
			// Restore inside a new jail.
			ref := vm.SnapshotRef{VMID: "jailed", SnapshotID: "s", ResumeImmediately: true}
			if _, err := p.Create(ctx, vm.Config{ID: "rejailed", RestoreFrom: &ref}); err != nil {
				t.Fatalf("restore in a jail: %v", err)
			}
			waitConsole(t, p, "rejailed", "TICK 4")
			p.Destroy(ctx, "rejailed")
			os.RemoveAll(filepath.Join(env.emu.snapDir, "jailed"))
		})
	}
}
