package main

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

// guestEnv returns the environment for CLI tests on a real guest, or skips.
func guestEnv(t *testing.T) (env []string, bundle, runDir string) {
	t.Helper()
	bundle = os.Getenv("EMBER_TEST_BUNDLE")
	if bundle == "" {
		t.Skip("set EMBER_TEST_BUNDLE to a guest bundle (ember image build --dir DIR) to run CLI tests on a real guest")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 not found: install Debian's qemu-system-x86 package")
	}
	runDir = t.TempDir()
	env = []string{"EMBER_STATE_DIR=" + t.TempDir(), "EMBER_RUN_DIR=" + runDir, "EMBER_QEMU_ACCEL=tcg"}
	t.Cleanup(func() {
		// Whatever a failed test left running goes with it.
		runCLI(t, env, "vm", "rm", "cli-a", "cli-b", "cli-c")
	})
	return env, bundle, runDir
}

// mustRun runs ember and fails the test unless it exits with want.
func mustRun(t *testing.T, env []string, want int, args ...string) string {
	t.Helper()
	stdout, stderr, code := runCLI(t, env, args...)
	if code != want {
		t.Fatalf("ember %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, want, stdout, stderr)
	}
	return stdout
}

// mustRunQuiet runs ember and fails the test unless it succeeds without
// writing to stderr, where warnings go.
func mustRunQuiet(t *testing.T, env []string, args ...string) {
	t.Helper()
	stdout, stderr, code := runCLI(t, env, args...)
	if code != exitOK || stderr != "" {
		t.Fatalf("ember %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, stdout, stderr)
	}
}

// checkGuestClock fails the test when the guest clock of VM id reads
// earlier than notBefore, a host time in Unix seconds.
func checkGuestClock(t *testing.T, env []string, id string, notBefore int64) {
	t.Helper()
	out := mustRun(t, env, exitOK, "vm", "exec", id, "--", "date", "+%s")
	guest, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		t.Fatalf("date +%%s in %s printed %q", id, out)
	}
	if guest < notBefore {
		t.Errorf("guest clock of %s is %d, %d s behind the host time before the command", id, guest, notBefore-guest)
	}
}

func TestVMCommandsOnRealGuest(t *testing.T) {
	env, bundle, runDir := guestEnv(t)

	mustRun(t, env, exitOK, "vm", "create", "cli-a", "--bundle", bundle, "--mem", "128")
	mustRun(t, env, exitOK, "vm", "start", "cli-a")
	if out := mustRun(t, env, exitOK, "vm", "exec", "cli-a", "--", "uname", "-s"); out != "Linux\n" {
		t.Fatalf("uname -s printed %q", out)
	}
	mustRun(t, env, 7, "vm", "exec", "cli-a", "--", "sh", "-c", "exit 7")
	if out := mustRun(t, env, exitOK, "vm", "exec", "cli-a", "--", "hostname"); out != "cli-a\n" {
		t.Fatalf("hostname printed %q, want the VM id", out)
	}
	mustRun(t, env, exitOK, "vm", "exec", "cli-a", "--", "sh", "-c", "echo before > /tmp/mark")

	out := mustRun(t, env, exitOK, "vm", "snapshot", "cli-a", "s1", "-o", "json")
	var m struct {
		ID, VMID, Backend string
		Files             []struct{ Size int64 }
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil || m.ID != "s1" || m.Backend != "qemu" || len(m.Files) == 0 {
		t.Fatalf("snapshot report %q (%v)", out, err)
	}
	// A second snapshot, deleted on its own, goes from the store and from
	// the backend's directory.
	stateDir := strings.TrimPrefix(env[0], "EMBER_STATE_DIR=")
	mustRun(t, env, exitOK, "vm", "snapshot", "cli-a", "s2")
	backendCopy := filepath.Join(stateDir, "qemu-snapshots", "cli-a", "s2")
	if _, err := os.Stat(backendCopy); err != nil {
		t.Fatalf("the backend's copy of s2: %v", err)
	}
	if out := mustRun(t, env, exitOK, "snapshot", "rm", "cli-a/s2"); out != "deleted cli-a/s2\n" {
		t.Fatalf("snapshot rm printed %q", out)
	}
	if _, err := os.Stat(backendCopy); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("snapshot rm left the backend's copy: %v", err)
	}
	// A snapshot that fails leaves the VM running, as it found it.
	_, stderr, code := runCLI(t, env, "vm", "snapshot", "cli-a", "d1", "--diff")
	if code != exitFailure || !strings.Contains(stderr, "diff snapshots: not supported by qemu") {
		t.Errorf("diff snapshot on qemu: exit %d stderr %q", code, stderr)
	}
	var after vm.Info
	if err := json.Unmarshal([]byte(mustRun(t, env, exitOK, "vm", "inspect", "cli-a")), &after); err != nil {
		t.Fatal(err)
	}
	if after.State != vm.StateRunning {
		t.Errorf("after a failed snapshot the VM is %s, want running", after.State)
	}
	// The guest clock does not move in a snapshot or during a pause.
	// Restore and resume set it, so the guest is not behind the host time
	// taken before either command, a gap of some seconds otherwise.
	time.Sleep(4 * time.Second)
	before := time.Now().Unix()
	mustRunQuiet(t, env, "vm", "restore", "cli-a/s1", "cli-b", "--resume")
	checkGuestClock(t, env, "cli-b", before)
	if out := mustRun(t, env, exitOK, "vm", "exec", "cli-b", "--", "hostname"); out != "cli-b\n" {
		t.Errorf("restored clone's hostname is %q, want its new id", out)
	}
	if out := mustRun(t, env, exitOK, "vm", "exec", "cli-b", "--", "cat", "/tmp/mark"); out != "before\n" {
		t.Fatalf("restored clone read %q from /tmp/mark", out)
	}
	mustRun(t, env, exitOK, "vm", "pause", "cli-b")
	mustRun(t, env, exitOK, "vm", "rename", "cli-b", "cli-c")
	time.Sleep(4 * time.Second)
	before = time.Now().Unix()
	mustRunQuiet(t, env, "vm", "resume", "cli-c")
	checkGuestClock(t, env, "cli-c", before)
	// An agent that does not reply in time leaves the VM running, with a
	// warning.
	mustRun(t, env, exitOK, "vm", "pause", "cli-c")
	_, stderr, code = runCLI(t, env, "vm", "resume", "cli-c", "--agent-timeout", "1ns")
	if code != exitOK {
		t.Errorf("resume with a timed-out agent: exit %d, want %d", code, exitOK)
	}
	if want := "ember: warning: cli-c runs, but its clock was not set"; !strings.HasPrefix(stderr, want) {
		t.Errorf("resume with a timed-out agent: stderr %q, want it to start with %q", stderr, want)
	}

	var infos []vm.Info
	if err := json.Unmarshal([]byte(mustRun(t, env, exitOK, "vm", "ls", "-o", "json")), &infos); err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 || infos[0].ID != "cli-a" || infos[1].ID != "cli-c" || infos[1].State != vm.StateRunning {
		t.Fatalf("vm ls = %+v", infos)
	}
	if out := mustRun(t, env, exitOK, "vm", "console", "cli-a"); !strings.Contains(out, "ember-agent") {
		t.Fatalf("console lacks the agent's lines: %q", out)
	}

	mustRun(t, env, exitOK, "vm", "shutdown", "cli-a", "--grace", "20s")
	var info vm.Info
	json.Unmarshal([]byte(mustRun(t, env, exitOK, "vm", "inspect", "cli-a")), &info)
	if info.State != vm.StateStopped {
		t.Fatalf("state after shutdown = %s", info.State)
	}
	mustRun(t, env, exitOK, "vm", "rm", "cli-c")
	if out := mustRun(t, env, exitOK, "snapshot", "ls", "cli-a"); !strings.Contains(out, "s1") {
		t.Fatalf("destroying a clone removed the source's snapshot: %q", out)
	}
	mustRun(t, env, exitOK, "vm", "rm", "--with-snapshots", "cli-a")
	if out := mustRun(t, env, exitOK, "snapshot", "ls", "-o", "json", "cli-a"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("snapshots after rm --with-snapshots: %q", out)
	}
	entries, _ := os.ReadDir(filepath.Join(runDir, "qemu"))
	if len(entries) != 0 {
		t.Fatalf("run directory not empty after rm: %v", entries)
	}
	for _, dir := range []string{"qemu-snapshots", "snapshots"} {
		if entries, err := os.ReadDir(filepath.Join(stateDir, dir)); err != nil || len(entries) != 0 {
			t.Errorf("%s after rm --with-snapshots: %v (%v), want an empty directory", dir, entries, err)
		}
	}
}

func TestVMCommandErrors(t *testing.T) {
	env, bundle, runDir := guestEnv(t)
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"vm", "create", "cli-a", "--bundle", bundle, "--nic", "eth0"}, exitUsage, "use IFACE=TAP"},
		{[]string{"vm", "create", "cli-a", "--bundle", bundle, "--vcpus", "0"}, exitFailure, "vcpu_count: 0 is invalid"},
		{[]string{"vm", "create", "cli-a", "--bundle", bundle, "--kernel", "/nonexistent/vmlinux"}, exitFailure, "/nonexistent/vmlinux"},
		{[]string{"vm", "create", "cli-a", "--bundle", bundle, "--nic", "eth0=a-tap-name-too-long"}, exitFailure, "must be at most 15"},
		{[]string{"vm", "start", "cli-zzz"}, exitFailure, "not found"},
		{[]string{"vm", "restore", "cli-zzz/nope", "cli-b"}, exitFailure, "snapshot not found"},
		{[]string{"vm", "exec", "cli-a"}, exitUsage, "needs a VM id and a command"},
		{[]string{"vm", "exec", "cli-zzz", "--", "true"}, exitFailure, "vm not found"},
	}
	for _, tc := range cases {
		_, stderr, code := runCLI(t, env, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("ember %s: exit %d stderr %q, want exit %d and %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(runDir, "qemu"))
	if len(entries) != 0 {
		t.Fatalf("failed creates left run directories: %v", entries)
	}
}
