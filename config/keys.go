package config

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
)

// key describes one configuration key: how to show it, how to set it from
// an environment variable and how to check it.
type key struct {
	name string
	// accepted describes the valid forms, for error messages.
	accepted string
	get      func(*Config) string
	// set parses an environment value; nil means the key has no
	// environment override.
	set func(*Config, string) error
	// check validates the loaded value; nil means any value of the right
	// type is valid.
	check func(*Config) error
}

func (k key) env() string { return EnvName(k.name) }

var keys = []key{
	noEnv(intKey("version", "1", func(c *Config) *int { return &c.Version }, func(v int) bool { return v == Version })),
	pathKey("state_dir", func(c *Config) *string { return &c.StateDir }, true),
	pathKey("run_dir", func(c *Config) *string { return &c.RunDir }, true),
	enumKey("backend", func(c *Config) *string { return &c.Backend }, "qemu", "firecracker"),
	enumKey("log_level", func(c *Config) *string { return &c.LogLevel }, "debug", "info", "warn", "error"),

	pathKey("defaults.kernel", func(c *Config) *string { return &c.Defaults.Kernel }, false),
	pathKey("defaults.initrd", func(c *Config) *string { return &c.Defaults.Initrd }, false),
	pathKey("defaults.rootfs", func(c *Config) *string { return &c.Defaults.Rootfs }, false),
	boolKey("defaults.rootfs_read_only", func(c *Config) *bool { return &c.Defaults.RootfsReadOnly }),
	intKey("defaults.vcpu_count", "an integer 1–32", func(c *Config) *int { return &c.Defaults.VCPUCount }, nil),
	intKey("defaults.mem_size_mib", "an integer 1–1048576 (MiB)", func(c *Config) *int { return &c.Defaults.MemSizeMiB }, nil),
	stringKey("defaults.boot_args", func(c *Config) *string { return &c.Defaults.BootArgs }),
	boolKey("defaults.track_dirty_pages", func(c *Config) *bool { return &c.Defaults.TrackDirtyPages }),
	{
		name:     "defaults.rootfs_rate_limit",
		accepted: "a [defaults.rootfs_rate_limit] table in the file (no environment override)",
		get: func(c *Config) string {
			r := c.Defaults.RootfsRateLimit
			if r == nil {
				return "none"
			}
			return fmt.Sprintf("bandwidth=%s ops=%s", bucketString(r.Bandwidth), bucketString(r.Ops))
		},
	},

	stringKey("qemu.binary", func(c *Config) *string { return &c.QEMU.Binary }),
	enumKey("qemu.accel", func(c *Config) *string { return &c.QEMU.Accel }, "auto", "kvm", "tcg"),

	stringKey("firecracker.binary", func(c *Config) *string { return &c.Firecracker.Binary }),
	stringKey("firecracker.jailer", func(c *Config) *string { return &c.Firecracker.Jailer }),
	pathKey("firecracker.chroot_base_dir", func(c *Config) *string { return &c.Firecracker.ChrootBaseDir }, true),
	intKey("firecracker.uid", "an integer 0–4294967294", func(c *Config) *int { return &c.Firecracker.UID }, validID),
	intKey("firecracker.gid", "an integer 0–4294967294", func(c *Config) *int { return &c.Firecracker.GID }, validID),
}

// noEnv removes the environment override of k.
func noEnv(k key) key {
	k.set = nil
	return k
}

func validID(v int) bool { return v >= 0 && v < 1<<32-1 }

func bucketString(b *TokenBucket) string {
	if b == nil {
		return "none"
	}
	return fmt.Sprintf("{size:%d one_time_burst:%d refill_time:%dms}", b.Size, b.OneTimeBurst, b.RefillTime)
}

func stringKey(name string, field func(*Config) *string) key {
	return key{
		name:     name,
		accepted: "any string",
		get:      func(c *Config) string { return *field(c) },
		set:      func(c *Config, v string) error { *field(c) = v; return nil },
	}
}

// pathKey is a string key holding an absolute path; required paths may not
// be empty.
func pathKey(name string, field func(*Config) *string, required bool) key {
	k := stringKey(name, field)
	k.accepted = "an absolute path"
	if !required {
		k.accepted += ", or empty for none"
	}
	k.check = func(c *Config) error {
		v := *field(c)
		if v == "" && !required {
			return nil
		}
		if !filepath.IsAbs(v) {
			return errors.New("not an absolute path")
		}
		return nil
	}
	return k
}

func enumKey(name string, field func(*Config) *string, values ...string) key {
	k := stringKey(name, field)
	k.accepted = fmt.Sprintf("one of %q", values)
	k.check = func(c *Config) error {
		if !slices.Contains(values, *field(c)) {
			return errors.New("not an accepted value")
		}
		return nil
	}
	return k
}

func boolKey(name string, field func(*Config) *bool) key {
	return key{
		name:     name,
		accepted: "true or false",
		get:      func(c *Config) string { return strconv.FormatBool(*field(c)) },
		set: func(c *Config, v string) error {
			b, err := parseBool(v)
			if err != nil {
				return err
			}
			*field(c) = b
			return nil
		},
	}
}

// intKey is an integer key; valid, when set, checks the range. The ranges
// of VM defaults are checked by the vm package instead.
func intKey(name, accepted string, field func(*Config) *int, valid func(int) bool) key {
	k := key{
		name:     name,
		accepted: accepted,
		get:      func(c *Config) string { return strconv.Itoa(*field(c)) },
		set: func(c *Config, v string) error {
			n, err := parseInt(v)
			if err != nil {
				return err
			}
			*field(c) = n
			return nil
		},
	}
	if valid != nil {
		k.check = func(c *Config) error {
			if !valid(*field(c)) {
				return errors.New("out of range")
			}
			return nil
		}
	}
	return k
}
