package main

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/embervm/ember/image"
)

// minimalVmlinux returns the smallest file the image builder accepts as a
// vmlinux: a 64-bit x86_64 ELF executable header with a non-zero entry
// point and no segments or sections.
func minimalVmlinux() []byte {
	b := make([]byte, 64)
	copy(b, "\x7fELF\x02\x01\x01")
	le := binary.LittleEndian
	le.PutUint16(b[16:], 2)     // ET_EXEC
	le.PutUint16(b[18:], 62)    // EM_X86_64
	le.PutUint32(b[20:], 1)     // EV_CURRENT
	le.PutUint64(b[24:], 1<<24) // e_entry
	le.PutUint16(b[52:], 64)    // e_ehsize
	le.PutUint16(b[54:], 56)    // e_phentsize
	le.PutUint16(b[58:], 64)    // e_shentsize
	return b
}

func TestImageBuildJSONThenCached(t *testing.T) {
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: install e2fsprogs", tool)
		}
	}
	tmp := t.TempDir()
	kernel := filepath.Join(tmp, "vmlinux")
	agent := filepath.Join(tmp, "agent-standin")
	rootfs := filepath.Join(tmp, "rootfs")
	writeFile(t, kernel, minimalVmlinux())
	// Any file will do as the agent here: nothing boots it.
	writeFile(t, agent, []byte("stand-in agent"))
	writeFile(t, filepath.Join(rootfs, "etc/hostname"), []byte("cli-test\n"))
	dir := filepath.Join(tmp, "bundle")

	args := []string{"--output", "json", "image", "build", "--dir", dir, "--kernel", kernel, "--agent", agent, "--rootfs-dir", rootfs}
	stdout, stderr, code := runCLI(t, nil, args...)
	if code != exitOK {
		t.Fatalf("exit code %d; stderr:\n%s", code, stderr)
	}
	var rep imageBuildReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("stdout is not the JSON report: %v\n%s", err, stdout)
	}
	if rep.Cached || rep.Dir != dir || rep.Manifest == nil {
		t.Fatalf("report = %+v", rep)
	}
	if rep.Manifest.BootArgs[image.ModeSwitchRoot] == "" {
		t.Errorf("manifest has no switchroot boot args")
	}
	// Without modules the build warns, on stderr only.
	if !strings.Contains(stderr, "warning: no kernel modules") {
		t.Errorf("stderr lacks the missing-modules warning:\n%s", stderr)
	}

	stdout, stderr, code = runCLI(t, nil, args...)
	if code != exitOK {
		t.Fatalf("second run: exit code %d; stderr:\n%s", code, stderr)
	}
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if !rep.Cached {
		t.Errorf("second run not cached")
	}

	stdout, _, code = runCLI(t, nil, args[2:]...)
	if code != exitOK || !strings.Contains(stdout, "bundle "+dir+" is up to date") {
		t.Errorf("text output (exit %d):\n%s", code, stdout)
	}
}

func TestImageBuildErrors(t *testing.T) {
	tmp := t.TempDir()
	notKernel := filepath.Join(tmp, "notes.txt")
	writeFile(t, notKernel, []byte("not a kernel"))
	agent := filepath.Join(tmp, "agent")
	writeFile(t, agent, []byte("agent"))

	tests := []struct {
		name     string
		args     []string
		code     int
		inStderr string
	}{
		{"missing agent", []string{"image", "build", "--dir", filepath.Join(tmp, "b1"), "--kernel", notKernel, "--agent", filepath.Join(tmp, "none")}, exitFailure, "ember-agent binary not found"},
		{"not a kernel", []string{"image", "build", "--dir", filepath.Join(tmp, "b2"), "--kernel", notKernel, "--agent", agent, "--rootfs-dir", tmp}, exitFailure, "not a vmlinux (ELF), bzImage"},
		{"extra argument", []string{"image", "build", "extra"}, exitUsage, "build takes no arguments"},
		{"unknown flag", []string{"image", "build", "--kernal", "x"}, exitUsage, "unknown flag"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := runCLI(t, nil, tt.args...)
			if code != tt.code {
				t.Fatalf("exit code %d, want %d; stderr:\n%s", code, tt.code, stderr)
			}
			if !strings.Contains(stderr, tt.inStderr) {
				t.Errorf("stderr lacks %q:\n%s", tt.inStderr, stderr)
			}
		})
	}
	for _, d := range []string{"b1", "b2"} {
		if _, err := os.Stat(filepath.Join(tmp, d)); !os.IsNotExist(err) {
			t.Errorf("failed build left %s behind: %v", d, err)
		}
	}
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o755); err != nil {
		t.Fatal(err)
	}
}
