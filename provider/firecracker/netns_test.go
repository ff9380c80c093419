package firecracker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/vm"
)

// testNetNSPrefix starts the name of every namespace these tests create, so
// a leftover is easy to attribute and remove.
const testNetNSPrefix = "emfc2-"

// newTestNetNS creates a named network namespace with iproute2 and deletes
// it when the test ends. It skips without root or without ip(8).
func newTestNetNS(t *testing.T) (name, path string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("creating a network namespace needs root: run the test as root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("ip(8) is not installed: install iproute2")
	}
	var b [4]byte
	rand.Read(b[:])
	name = testNetNSPrefix + hex.EncodeToString(b[:])
	runIP(t, "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
			t.Errorf("delete netns %s: %v: %s", name, err, out)
		}
	})
	return name, "/run/netns/" + name
}

func runIP(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// nsInode returns the inode of the namespace file at path; two paths with
// the same inode name the same namespace.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return st.Ino
}

// threadsOutside returns the ids of this process's threads whose network
// namespace is not want.
func threadsOutside(t *testing.T, want uint64) []string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, task := range tasks {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join("/proc/self/task", task.Name(), "ns/net"), &st); err != nil {
			continue // the thread exited
		}
		if st.Ino != want {
			out = append(out, task.Name())
		}
	}
	return out
}

func TestNetNSInvalidPath(t *testing.T) {
	env := newEmuEnv(t)
	// A binary that does not exist proves no process is started.
	p, err := New(Config{Binary: "/nonexistent/firecracker", RunDir: env.runDir, SnapshotDir: env.snapDir})
	if err != nil {
		t.Fatal(err)
	}
	regular := filepath.Join(env.files, "vmlinux")
	fifo := filepath.Join(env.files, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, netns, problem string
	}{
		{"missing", "/run/netns/" + testNetNSPrefix + "missing", "does not exist"},
		{"regular file", regular, "is not a network namespace"},
		{"directory", env.files, "is not a network namespace"},
		// Opening a FIFO without a writer would block.
		{"fifo", fifo, "is not a network namespace"},
		{"other namespace type", "/proc/self/ns/uts", "is not a network namespace"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := emuConfig(env, "nsbad")
			cfg.NetNS = tt.netns
			_, err := p.Create(context.Background(), cfg)
			var ve *vm.ValidationError
			if !errors.As(err, &ve) || len(ve.Problems) != 1 || ve.Problems[0].Field != "netns" {
				t.Fatalf("Create error = %v, want a validation error on netns", err)
			}
			if !strings.Contains(ve.Problems[0].Problem, tt.problem) {
				t.Errorf("problem = %q, want it to contain %q", ve.Problems[0].Problem, tt.problem)
			}
			if !errors.Is(err, vm.ErrInvalid) {
				t.Errorf("Create error %v does not match vm.ErrInvalid", err)
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

func TestNetNSEmulated(t *testing.T) {
	_, nsPath := newTestNetNS(t)
	hostNS := nsInode(t, "/proc/self/ns/net")
	target := nsInode(t, nsPath)
	env := newEmuEnv(t)
	p := newEmulated(t, "1.14.1", env)
	ctx := context.Background()

	cfg := emuConfig(env, "inns")
	cfg.NetNS = nsPath
	bootEmulated(t, p, cfg)
	info, err := p.Get(ctx, "inns")
	if err != nil {
		t.Fatal(err)
	}
	if got := nsInode(t, "/proc/"+strconv.Itoa(info.PID)+"/ns/net"); got != target {
		t.Errorf("firecracker runs in namespace inode %d, want %d (%s)", got, target, nsPath)
	}
	if info.Config.NetNS != nsPath {
		t.Errorf("Info.Config.NetNS = %q, want %q", info.Config.NetNS, nsPath)
	}
	if left := threadsOutside(t, hostNS); len(left) > 0 {
		t.Errorf("threads %v of the test process are outside its network namespace", left)
	}

	// A restore runs in the namespace of its own config.
	if err := p.Pause(ctx, "inns"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(ctx, "inns", vm.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	if err := p.Destroy(ctx, "inns"); err != nil {
		t.Fatal(err)
	}
	ref := vm.SnapshotRef{VMID: "inns", SnapshotID: "s", ResumeImmediately: true}
	info, err = p.Create(ctx, vm.Config{ID: "back", RestoreFrom: &ref, NetNS: nsPath})
	if err != nil {
		t.Fatal(err)
	}
	if got := nsInode(t, "/proc/"+strconv.Itoa(info.PID)+"/ns/net"); got != target {
		t.Errorf("restored firecracker runs in namespace inode %d, want %d", got, target)
	}
	if err := p.Destroy(ctx, "back"); err != nil {
		t.Fatal(err)
	}

	// A restore without NetNS runs in Ember's namespace, whatever the
	// source VM used.
	info, err = p.Create(ctx, vm.Config{ID: "home", RestoreFrom: &ref})
	if err != nil {
		t.Fatal(err)
	}
	if got := nsInode(t, "/proc/"+strconv.Itoa(info.PID)+"/ns/net"); got != hostNS {
		t.Errorf("restore without netns runs in namespace inode %d, want Ember's %d", got, hostNS)
	}
	if info.Config.NetNS != "" {
		t.Errorf("restore without netns reports NetNS %q", info.Config.NetNS)
	}
	if err := p.Destroy(ctx, "home"); err != nil {
		t.Fatal(err)
	}
	if err := leaked(env); err != nil {
		t.Error(err)
	}
}

func TestNetNSSpawnFailure(t *testing.T) {
	_, nsPath := newTestNetNS(t)
	hostNS := nsInode(t, "/proc/self/ns/net")
	env := newEmuEnv(t)
	p, err := New(Config{Binary: filepath.Join(env.files, "no-such-firecracker"), RunDir: env.runDir, SnapshotDir: env.snapDir})
	if err != nil {
		t.Fatal(err)
	}
	cfg := emuConfig(env, "nobin")
	cfg.NetNS = nsPath
	_, err = p.Create(context.Background(), cfg)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Create with a missing binary = %v, want an error matching os.ErrNotExist", err)
	}
	if left := threadsOutside(t, hostNS); len(left) > 0 {
		t.Errorf("threads %v were left in the VM's network namespace", left)
	}
	if err := leaked(env); err != nil {
		t.Error(err)
	}
}

func TestJailerNetNS(t *testing.T) {
	tests := []struct {
		name, jailerNS, vmNS, want string
	}{
		{"vm namespace", "", "/run/netns/vm", "/run/netns/vm"},
		{"vm overrides jailer default", "/run/netns/default", "/run/netns/vm", "/run/netns/vm"},
		{"jailer default", "/run/netns/default", "", "/run/netns/default"},
		{"none", "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := t.TempDir()
			p := &Provider{cfg: Config{Binary: "/usr/bin/firecracker", Jailer: &JailerConfig{
				Binary: "/usr/bin/jailer", ChrootBaseDir: base, UID: os.Getuid(), GID: os.Getgid(), NetNS: tt.jailerNS,
			}}}
			j, err := p.newJail(vm.Config{ID: "x", NetNS: tt.vmNS}, filepath.Join(base, "run", "abc123"))
			if err != nil {
				t.Fatal(err)
			}
			opts, _, _, err := j.spawnOptions(spawnOptions{path: "/usr/bin/firecracker", netns: tt.vmNS})
			if err != nil {
				t.Fatal(err)
			}
			if opts.netns != "" {
				t.Errorf("jailer would be started in namespace %q; it must join it itself", opts.netns)
			}
			i := slices.Index(opts.args, "--netns")
			sep := slices.Index(opts.args, "--")
			switch {
			case tt.want == "" && i >= 0:
				t.Errorf("args %q pass --netns, want none", opts.args)
			case tt.want != "" && (i < 0 || i > sep || opts.args[i+1] != tt.want):
				t.Errorf("args %q, want jailer option --netns %s", opts.args, tt.want)
			}
			if got := p.netnsOf(vm.Config{NetNS: tt.vmNS}); got != tt.want {
				t.Errorf("netnsOf = %q, want %q", got, tt.want)
			}
		})
	}
}

func FuzzCheckNetNS(f *testing.F) {
	f.Add("/proc/self/ns/net")
	f.Add("/proc/self/ns/uts")
	f.Add("/run/netns/" + testNetNSPrefix + "missing")
	f.Add("/dev/null")
	f.Add("/")
	f.Fuzz(func(t *testing.T, path string) {
		// Stay inside paths whose files cannot block or change on open.
		if !strings.HasPrefix(path, "/proc/self/ns/") && !strings.HasPrefix(path, "/run/netns/") {
			path = "/run/netns/" + path
		}
		err := checkNetNS(path)
		var ve *vm.ValidationError
		if errors.As(err, &ve) && (len(ve.Problems) != 1 || ve.Problems[0].Field != "netns") {
			t.Errorf("checkNetNS(%q) = %v, want one problem on netns", path, err)
		}
		if err != nil {
			return
		}
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err != nil || st.Type != unix.NSFS_MAGIC {
			t.Errorf("checkNetNS accepted %q, which is not on nsfs (statfs type %#x, %v)", path, st.Type, err)
		}
	})
}
