package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/embervm/ember/image"
)

// runCLI runs ember with args and returns stdout, stderr and the exit code.
func runCLI(t *testing.T, environ []string, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr, environ)
	return stdout.String(), stderr.String(), code
}

func writeTemp(t *testing.T, name, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const fiveMistakes = `
vcpu_count: 0
extra_drives:
  - {drive_id: data, path_on_host: a.img}
  - {drive_id: data, path_on_host: b.img}
network_interfaces:
  - {iface_id: eth0, host_dev_name: a-very-long-tap-name, guest_mac: "01:02:03:04:05:06"}
vsock: {guest_cid: 1, uds_path: /run/v.sock}
`

func TestSpecValidateListsEveryProblem(t *testing.T) {
	path := writeTemp(t, "bad.yaml", fiveMistakes)
	stdout, stderr, code := runCLI(t, nil, "spec", "validate", path)
	if code != exitFailure {
		t.Fatalf("exit code %d, want %d", code, exitFailure)
	}
	if stdout != "" {
		t.Errorf("stdout = %q, want nothing", stdout)
	}
	for _, want := range []string{
		"5 problems",
		"  vcpu_count: 0 is invalid, must be 1–32",
		`  extra_drives[1].drive_id: duplicate "data"`,
		`  network_interfaces[0].host_dev_name: "a-very-long-tap-name" is 20 bytes, must be at most 15`,
		`  network_interfaces[0].guest_mac: "01:02:03:04:05:06" is a multicast address`,
		"  vsock.guest_cid: 1 is invalid, must be 3 or more",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
}

func TestSpecValidateJSON(t *testing.T) {
	path := writeTemp(t, "bad.yaml", fiveMistakes)
	stdout, _, code := runCLI(t, nil, "spec", "validate", "--output", "json", path)
	if code != exitFailure {
		t.Fatalf("exit code %d, want %d", code, exitFailure)
	}
	var r specReport
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, stdout)
	}
	if r.Valid || len(r.Problems) != 5 || r.Problems[0].Field != "vcpu_count" {
		t.Fatalf("report = %+v", r)
	}
}

func TestSpecValidateAcceptsRelativePaths(t *testing.T) {
	path := writeTemp(t, "ok.json", `{"kernel": "vmlinux", "extra_drives": [{"drive_id": "data", "path_on_host": "data.img"}]}`)
	stdout, stderr, code := runCLI(t, nil, "spec", "validate", path)
	if code != exitOK || !strings.HasSuffix(stdout, ": valid\n") {
		t.Fatalf("exit %d stdout %q stderr %q", code, stdout, stderr)
	}
}

func TestSpecValidateUnreadable(t *testing.T) {
	_, stderr, code := runCLI(t, nil, "spec", "validate", filepath.Join(t.TempDir(), "missing.yaml"))
	if code != exitFailure || !strings.Contains(stderr, "read spec:") || !strings.Contains(stderr, "no such file") {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
	path := writeTemp(t, "unknown.yaml", "vcpus: 2\nmem: 128\n")
	_, stderr, code = runCLI(t, nil, "spec", "validate", path)
	if code != exitFailure {
		t.Errorf("unknown fields: exit %d, want %d", code, exitFailure)
	}
	for _, want := range []string{"2 problems", `vcpus: unknown field, did you mean "vcpu_count"?`, "mem: unknown field"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("unknown fields: stderr lacks %q:\n%s", want, stderr)
		}
	}
	path = writeTemp(t, "mistyped.yaml", "mem_size_mib: lots\n")
	_, stderr, code = runCLI(t, nil, "spec", "validate", path)
	if code != exitFailure {
		t.Errorf("mistyped value: exit %d, want %d", code, exitFailure)
	}
	if want := "1 problem\n  mem_size_mib: got a string, want an integer\n"; !strings.Contains(stderr, want) {
		t.Errorf("mistyped value: stderr %q lacks %q", stderr, want)
	}
}

func TestConfigShowSources(t *testing.T) {
	path := writeTemp(t, "config.toml", "version = 1\n[defaults]\nmem_size_mib = 512\n")
	stdout, stderr, code := runCLI(t, []string{"EMBER_DEFAULTS_VCPU_COUNT=3"}, "--config", path, "config", "show", "-o", "json")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var out struct {
		File    string
		Entries []configEntry
	}
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatal(err)
	}
	got := map[string]configEntry{}
	for _, e := range out.Entries {
		got[e.Key] = e
	}
	if e := got["defaults.mem_size_mib"]; e.Value != "512" || e.Source.Kind != "file" || e.Source.Detail != path {
		t.Errorf("mem_size_mib entry = %+v", e)
	}
	if e := got["defaults.vcpu_count"]; e.Value != "3" || e.Source.Kind != "env" || e.Env != "EMBER_DEFAULTS_VCPU_COUNT" {
		t.Errorf("vcpu_count entry = %+v", e)
	}
	if e := got["backend"]; e.Source.Kind != "default" {
		t.Errorf("backend entry = %+v", e)
	}
	// Keys without an environment override name no variable.
	for _, k := range []string{"version", "defaults.rootfs_rate_limit"} {
		if e := got[k]; e.Env != "" {
			t.Errorf("%s entry names the variable %q, which does not override it", k, e.Env)
		}
	}
}

func TestConfigShowBundleDefaults(t *testing.T) {
	state := t.TempDir()
	bundle := filepath.Join(state, "images", "default")
	env := []string{"EMBER_STATE_DIR=" + state}

	stdout, stderr, code := runCLI(t, env, "config", "show")
	if code != exitOK {
		t.Fatalf("without a bundle: exit %d: %s", code, stderr)
	}
	if want := "# bundle: none in " + bundle + ","; !strings.Contains(stdout, want) {
		t.Errorf("without a bundle: stdout lacks %q:\n%s", want, stdout)
	}

	if err := os.MkdirAll(bundle, 0o755); err != nil {
		t.Fatal(err)
	}
	manifest := `{"schema_version":1,"boot_args":{"switchroot":"console=ttyS0 ember.mode=switchroot"}}`
	if err := os.WriteFile(filepath.Join(bundle, image.ManifestFile), []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code = runCLI(t, env, "config", "show", "-o", "json")
	if code != exitOK {
		t.Fatalf("with a bundle: exit %d: %s", code, stderr)
	}
	var out struct {
		Bundle  string
		Entries []configEntry
	}
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatal(err)
	}
	if out.Bundle != bundle {
		t.Errorf("bundle = %q, want %q", out.Bundle, bundle)
	}
	want := map[string]string{
		"defaults.kernel":           filepath.Join(bundle, image.VmlinuxFile),
		"defaults.initrd":           filepath.Join(bundle, image.InitramfsFile),
		"defaults.rootfs":           filepath.Join(bundle, image.RootfsFile),
		"defaults.rootfs_read_only": "true",
		"defaults.boot_args":        "console=ttyS0 ember.mode=switchroot ember.rootflags=ro",
	}
	for _, e := range out.Entries {
		v, fromBundle := want[e.Key]
		if !fromBundle {
			if e.Source.Kind == "bundle" {
				t.Errorf("%s: source bundle, want the configuration's", e.Key)
			}
			continue
		}
		if e.Value != v {
			t.Errorf("%s = %q, want %q", e.Key, e.Value, v)
		}
		if e.Source.Kind != "bundle" {
			t.Errorf("%s: source %q, want bundle", e.Key, e.Source.Kind)
		}
	}

	// A kernel in the configuration turns the bundle off, as in vm create.
	stdout, _, _ = runCLI(t, append(env, "EMBER_DEFAULTS_KERNEL=/boot/vmlinux"), "config", "show")
	if strings.Contains(stdout, "# bundle") || strings.Contains(stdout, bundle) {
		t.Errorf("with defaults.kernel set, the bundle still shows:\n%s", stdout)
	}
}

func TestConfigFileFromEnvironment(t *testing.T) {
	path := writeTemp(t, "config.toml", "version = 1\nbackend = \"firecracker\"\n")
	stdout, stderr, code := runCLI(t, []string{"EMBER_CONFIG=" + path}, "config", "show")
	if code != exitOK || !strings.Contains(stdout, "# file: "+path) || !strings.Contains(stdout, `"firecracker"`) {
		t.Fatalf("exit %d stdout %q stderr %q", code, stdout, stderr)
	}
}

func TestConfigValidate(t *testing.T) {
	good := writeTemp(t, "good.toml", "version = 1\n[qemu]\naccel = \"tcg\"\n")
	if stdout, stderr, code := runCLI(t, nil, "config", "validate", good); code != exitOK || !strings.Contains(stdout, "valid") {
		t.Fatalf("good file: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	bad := writeTemp(t, "bad.toml", "version = 1\n[qemu]\naccel = \"hvf\"\n")
	_, stderr, code := runCLI(t, nil, "config", "validate", bad)
	if code != exitFailure || !strings.Contains(stderr, `qemu.accel = "hvf"`) || !strings.Contains(stderr, `one of ["auto" "kvm" "tcg"]`) {
		t.Fatalf("bad file: exit %d stderr %q", code, stderr)
	}
}

func TestBrokenEnvironmentFailsConfigShow(t *testing.T) {
	_, stderr, code := runCLI(t, []string{"EMBER_BACKEND=xen"}, "config", "show")
	if code != exitFailure || !strings.Contains(stderr, `config backend = "xen" (from env EMBER_BACKEND)`) {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
}

func TestUsageErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string // the start of the message after "ember: "
		help string // the command the hint names
	}{
		{[]string{"bogus"}, `unknown command "bogus"`, "ember"},
		{[]string{"config", "bogus"}, `unknown command "bogus" for "ember config"`, "ember config"},
		{[]string{"spec", "validate"}, "missing FILE", "ember spec validate"},
		{[]string{"vm", "restore", "a/b"}, "missing NEW-ID", "ember vm restore"},
		{[]string{"vm", "start", "a", "b"}, `start takes ID, got 2 arguments: ["a" "b"]`, "ember vm start"},
		{[]string{"version", "x"}, `version takes no arguments, got ["x"]`, "ember version"},
		{[]string{"--output", "yaml", "version"}, `--output "yaml" is invalid`, "ember version"},
		{[]string{"version", "--no-such-flag"}, "unknown flag: --no-such-flag", "ember version"},
		{[]string{"vm", "create", "a", "--vcpus", "two"}, `--vcpus "two" is invalid, want a whole number`, "ember vm create"},
		{[]string{"vm", "create", "a", "--rootfs-read-only=maybe"}, `--rootfs-read-only "maybe" is invalid, want true or false`, "ember vm create"},
		{[]string{"vm", "shutdown", "a", "--grace", "5"}, `--grace "5" is invalid, want a duration such as 30s or 2m`, "ember vm shutdown"},
		{[]string{"snapshot", "rm"}, "missing snapshot: pass one or more", "ember snapshot rm"},
	}
	for _, tc := range cases {
		_, stderr, code := runCLI(t, []string{"EMBER_STATE_DIR=" + t.TempDir()}, tc.args...)
		if code != exitUsage {
			t.Errorf("%v: exit %d, want %d", tc.args, code, exitUsage)
		}
		if !strings.HasPrefix(stderr, "ember: "+tc.want) {
			t.Errorf("%v: stderr %q, want it to start with %q", tc.args, stderr, "ember: "+tc.want)
		}
		if hint := "Run '" + tc.help + " --help' for usage.\n"; !strings.HasSuffix(stderr, hint) {
			t.Errorf("%v: stderr %q, want it to end with %q", tc.args, stderr, hint)
		}
	}
}

func TestVersion(t *testing.T) {
	stdout, _, code := runCLI(t, nil, "version", "-o", "json")
	var v versionInfo
	if code != exitOK || json.Unmarshal([]byte(stdout), &v) != nil || v.Version == "" || v.ConfigVersion != 1 {
		t.Fatalf("exit %d stdout %q", code, stdout)
	}
}
