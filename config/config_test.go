package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadDefaultsWithoutFile(t *testing.T) {
	l, err := Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	if l.Config.Backend != "qemu" || l.Config.Defaults.MemSizeMiB != 256 || !l.Config.Defaults.TrackDirtyPages {
		t.Fatalf("built-in defaults = %+v", l.Config)
	}
	for _, k := range Keys() {
		if got := l.Sources[k]; got.Kind != "default" {
			t.Errorf("source of %s = %v, want default", k, got)
		}
	}
}

func TestLoadPrecedence(t *testing.T) {
	path := writeFile(t, `version = 1
backend = "firecracker"
[defaults]
vcpu_count = 2
mem_size_mib = 512
kernel = "/k"
[defaults.rootfs_rate_limit.ops]
size = 100
refill_time = 1000
`)
	l, err := Load(path, []string{"EMBER_DEFAULTS_VCPU_COUNT=4", "EMBER_QEMU_ACCEL=tcg", "UNRELATED=1"})
	if err != nil {
		t.Fatal(err)
	}
	c := l.Config
	if c.Backend != "firecracker" || c.Defaults.VCPUCount != 4 || c.Defaults.MemSizeMiB != 512 || c.QEMU.Accel != "tcg" {
		t.Fatalf("effective config = %+v", c)
	}
	want := map[string]Source{
		"backend":                    {"file", path},
		"defaults.vcpu_count":        {"env", "EMBER_DEFAULTS_VCPU_COUNT"},
		"defaults.mem_size_mib":      {"file", path},
		"qemu.accel":                 {"env", "EMBER_QEMU_ACCEL"},
		"defaults.rootfs_rate_limit": {"file", path},
		"state_dir":                  {"default", ""},
	}
	for k, w := range want {
		if got := l.Sources[k]; got != w {
			t.Errorf("source of %s = %v, want %v", k, got, w)
		}
	}
	d := c.VMDefaults()
	if d.RootfsRateLimit == nil || d.RootfsRateLimit.Ops.Size != 100 || d.RootfsRateLimit.Bandwidth != nil {
		t.Errorf("rate limiter = %+v", d.RootfsRateLimit)
	}
	if d.TrackDirtyPages == nil || !*d.TrackDirtyPages {
		t.Error("track_dirty_pages default lost")
	}
}

func TestUnknownKeySuggestions(t *testing.T) {
	cases := []struct{ key, want string }{
		{"bakend", "backend"},
		{"qemu.accelerator", "qemu.accel"},
		{"defaults.mem_size_mb", "defaults.mem_size_mib"},
		{"qemu.zzz", ""},
		{"defaultz.kernel", ""},
		// A key of another table is not suggested.
		{"qemu.kernel", ""},
	}
	for _, tc := range cases {
		if got := suggestKey(tc.key); got != tc.want {
			t.Errorf("suggestKey(%q) = %q, want %q", tc.key, got, tc.want)
		}
	}
}

func TestLoadRejects(t *testing.T) {
	cases := []struct {
		name, file string
		env        []string
		want       string
	}{
		{"unknown key", "version = 1\nbakend = \"qemu\"\n", nil, "unknown keys: bakend (did you mean backend?)"},
		{"unknown nested key", "version = 1\n[qemu]\naccelerator = \"tcg\"\n", nil, "unknown keys: qemu.accelerator (did you mean qemu.accel?)"},
		{"unknown key and a bad value", "version = 1\n[defaults]\nmem_size_mb = 128\nvcpu_count = 64\n", nil,
			"unknown keys: defaults.mem_size_mb (did you mean defaults.mem_size_mib?)\nconfig defaults.vcpu_count (from file "},
		{"missing version", "backend = \"qemu\"\n", nil, "version: missing, add `version = 1`"},
		{"future version", "version = 2\n", nil, `config version = "2" (from file `},
		{"wrong type", "version = 1\n[defaults]\nvcpu_count = \"two\"\n", nil, "vcpu_count"},
		{"syntax", "version = 1\nbackend = \n", nil, "line 2"},
		{"bad enum", "version = 1\nbackend = \"xen\"\n", nil, `config backend = "xen" (from file `},
		{"bad env int", "version = 1\n", []string{"EMBER_DEFAULTS_MEM_SIZE_MIB=lots"},
			`config defaults.mem_size_mib = "lots" (from env EMBER_DEFAULTS_MEM_SIZE_MIB) is invalid: accepted: an integer 1–1048576 (MiB)`},
		{"bad env bool", "version = 1\n", []string{"EMBER_DEFAULTS_TRACK_DIRTY_PAGES=maybe"},
			`config defaults.track_dirty_pages = "maybe" (from env EMBER_DEFAULTS_TRACK_DIRTY_PAGES) is invalid: accepted: true or false`},
		{"bad env enum", "version = 1\n", []string{"EMBER_QEMU_ACCEL=hvf"},
			`config qemu.accel = "hvf" (from env EMBER_QEMU_ACCEL) is invalid: accepted: one of ["auto" "kvm" "tcg"]`},
		{"relative state dir", "version = 1\nstate_dir = \"state\"\n", nil, `config state_dir = "state" (from file `},
		{"vcpu out of range", "version = 1\n[defaults]\nvcpu_count = 99\n", nil, "config defaults.vcpu_count (from file "},
		{"relative kernel", "version = 1\n", []string{"EMBER_DEFAULTS_KERNEL=vmlinux"},
			`config defaults.kernel = "vmlinux" (from env EMBER_DEFAULTS_KERNEL) is invalid: accepted: an absolute path, or empty for none`},
		{"negative bucket", "version = 1\n[defaults.rootfs_rate_limit.bandwidth]\nsize = -1\nrefill_time = 10\n", nil,
			"config defaults.rootfs_rate_limit.bandwidth.size (from file "},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeFile(t, tc.file), tc.env)
			if err == nil {
				t.Fatal("loaded without error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

func TestLoadReportsAllValueErrors(t *testing.T) {
	_, err := Load(writeFile(t, "version = 1\nbackend = \"xen\"\nlog_level = \"loud\"\n"), nil)
	var ve *ValueError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v, want *ValueError", err)
	}
	if !strings.Contains(err.Error(), "backend") || !strings.Contains(err.Error(), "log_level") {
		t.Fatalf("err = %v, want both keys", err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "absent.toml"), nil)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v, want ErrNotExist", err)
	}
}

func TestEnvName(t *testing.T) {
	if got := EnvName("defaults.vcpu_count"); got != "EMBER_DEFAULTS_VCPU_COUNT" {
		t.Fatalf("EnvName = %q", got)
	}
}

func FuzzLoad(f *testing.F) {
	f.Add("version = 1\n[defaults]\nvcpu_count = 2\n", "EMBER_BACKEND=qemu")
	f.Add("version = 1\n[defaults.rootfs_rate_limit.ops]\nsize = 1\n", "EMBER_DEFAULTS_VCPU_COUNT=x")
	f.Fuzz(func(t *testing.T, file, env string) {
		path := filepath.Join(t.TempDir(), "c.toml")
		if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
			t.Fatal(err)
		}
		l, err := Load(path, strings.Split(env, "\n"))
		if err != nil {
			return
		}
		if l.Config.Version != Version {
			t.Fatalf("accepted version %d", l.Config.Version)
		}
		d := l.Config.VMDefaults()
		if err := d.Validate(); err != nil {
			t.Fatalf("accepted defaults that vm rejects: %v", err)
		}
	})
}
