package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestRunDemoOnRealGuest runs `ember run` against a real QEMU guest built
// from the bundle in EMBER_TEST_BUNDLE.
func TestRunDemoOnRealGuest(t *testing.T) {
	bundle := os.Getenv("EMBER_TEST_BUNDLE")
	if bundle == "" {
		t.Skip("set EMBER_TEST_BUNDLE to a guest bundle (ember image build --dir DIR) to run the end-to-end demo")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 not found: install Debian's qemu-system-x86 package")
	}
	state, run := t.TempDir(), t.TempDir()
	env := []string{"EMBER_STATE_DIR=" + state, "EMBER_RUN_DIR=" + run, "EMBER_QEMU_ACCEL=tcg"}
	stdout, stderr, code := runCLI(t, env, "run", "--bundle", bundle, "--clones", "2", "-o", "json")
	if code != exitOK {
		t.Fatalf("ember run: exit %d\nstderr:\n%s", code, stderr)
	}
	var got demoTimings
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("stdout is not the JSON report: %v\n%s", err, stdout)
	}
	if !strings.HasPrefix(got.Uname, "Linux ") || got.Backend != "qemu" || got.Accel != "tcg" {
		t.Errorf("report = %+v", got)
	}
	if len(got.Clones) != 2 || len(got.Restores) != 2 {
		t.Fatalf("clones = %+v, restores = %v", got.Clones, got.Restores)
	}
	seen := map[string]bool{}
	for _, c := range got.Clones {
		if c.Hostname != c.ID || seen[c.Hostname] {
			t.Errorf("clone %s answered with hostname %q", c.ID, c.Hostname)
		}
		seen[c.Hostname] = true
		if c.State != "counted to 20000 before the snapshot" {
			t.Errorf("clone %s lost the workload's file: %q", c.ID, c.State)
		}
	}
	if got.ColdBoot <= 0 || got.Snapshot <= 0 || got.ExecRoundTrip <= 0 {
		t.Errorf("missing timings: %+v", got)
	}

	entries, err := os.ReadDir(filepath.Join(run, "qemu"))
	if err != nil || len(entries) != 0 {
		t.Errorf("run directory after ember run: %v (%v)", entries, err)
	}
	out, _ := exec.Command("pgrep", "-f", run).Output()
	if len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("qemu processes left running: %s", out)
	}
}
