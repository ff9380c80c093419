// Package config loads Ember's workspace configuration: the VM defaults,
// the state and run directories, and the backend settings.
//
// The configuration is one TOML file with a schema version:
//
//	version = 1
//	backend = "qemu"
//
//	[defaults]
//	kernel = "/var/lib/ember/images/default/vmlinux"
//	vcpu_count = 2
//	mem_size_mib = 256
//
//	[defaults.rootfs_rate_limit.bandwidth]
//	size = 10485760
//	refill_time = 1000
//
// Every scalar key can be overridden by an environment variable named
// EMBER_ followed by the key's path in upper case with dots and dashes
// turned into underscores: defaults.vcpu_count is
// EMBER_DEFAULTS_VCPU_COUNT. Precedence, lowest first: built-in default,
// file, environment. [Load] records where each value came from.
//
// Loading fails on an unknown key, a value of the wrong type or out of range,
// or an unsupported version, and the error names the key, the value, where it
// came from and the accepted forms. Nothing falls back silently.
package config

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/embervm/ember/vm"
)

// Version is the configuration schema this package reads.
const Version = 1

// DefaultPath is where the CLI looks for a configuration file when neither
// --config nor EMBER_CONFIG names one.
const DefaultPath = "/etc/ember/config.toml"

// Config is the workspace configuration. Its zero value is not meaningful;
// use [Default] or [Load].
type Config struct {
	Version int `toml:"version"`
	// StateDir holds persistent data: images, snapshots, VM records.
	StateDir string `toml:"state_dir"`
	// RunDir holds per-VM run-time files: sockets, logs, pid files.
	RunDir string `toml:"run_dir"`
	// Backend is the default backend for new VMs: "qemu" or "firecracker".
	Backend string `toml:"backend"`
	// LogLevel is "debug", "info", "warn" or "error".
	LogLevel string `toml:"log_level"`

	Defaults    Defaults    `toml:"defaults"`
	QEMU        QEMU        `toml:"qemu"`
	Firecracker Firecracker `toml:"firecracker"`
}

// Defaults are the VM defaults; see [vm.Defaults] for each field.
type Defaults struct {
	Kernel          string       `toml:"kernel"`
	Initrd          string       `toml:"initrd"`
	Rootfs          string       `toml:"rootfs"`
	RootfsReadOnly  bool         `toml:"rootfs_read_only"`
	VCPUCount       int          `toml:"vcpu_count"`
	MemSizeMiB      int          `toml:"mem_size_mib"`
	BootArgs        string       `toml:"boot_args"`
	TrackDirtyPages bool         `toml:"track_dirty_pages"`
	RootfsRateLimit *RateLimiter `toml:"rootfs_rate_limit"`
}

// RateLimiter mirrors [vm.RateLimiter] in TOML form.
type RateLimiter struct {
	Bandwidth *TokenBucket `toml:"bandwidth"`
	Ops       *TokenBucket `toml:"ops"`
}

// TokenBucket mirrors [vm.TokenBucket]; refill_time is in milliseconds.
type TokenBucket struct {
	Size         int64 `toml:"size"`
	OneTimeBurst int64 `toml:"one_time_burst"`
	RefillTime   int64 `toml:"refill_time"`
}

// QEMU configures the QEMU microvm backend.
type QEMU struct {
	// Binary is the qemu-system-x86_64 executable, by path or name.
	Binary string `toml:"binary"`
	// Accel is "auto", "kvm" or "tcg".
	Accel string `toml:"accel"`
}

// Firecracker configures the Firecracker backend.
type Firecracker struct {
	// Binary is the firecracker executable, by path or name.
	Binary string `toml:"binary"`
	// Jailer is the jailer executable; empty runs Firecracker unjailed.
	Jailer string `toml:"jailer"`
	// ChrootBaseDir is the jailer's --chroot-base-dir.
	ChrootBaseDir string `toml:"chroot_base_dir"`
	// UID and GID are the unprivileged ids the jailer drops to.
	UID int `toml:"uid"`
	GID int `toml:"gid"`
}

// Default returns the built-in configuration.
func Default() *Config {
	return &Config{
		Version:  Version,
		StateDir: "/var/lib/ember",
		RunDir:   "/run/ember",
		Backend:  "qemu",
		LogLevel: "info",
		Defaults: Defaults{
			VCPUCount:       vm.DefaultVCPUCount,
			MemSizeMiB:      vm.DefaultMemSizeMiB,
			BootArgs:        vm.DefaultBootArgs,
			TrackDirtyPages: true,
		},
		QEMU:        QEMU{Binary: "qemu-system-x86_64", Accel: "auto"},
		Firecracker: Firecracker{Binary: "firecracker", ChrootBaseDir: "/srv/jailer", UID: 65534, GID: 65534},
	}
}

// VMDefaults converts the defaults section for [vm.Resolve].
func (c *Config) VMDefaults() vm.Defaults {
	d := c.Defaults
	track := d.TrackDirtyPages
	return vm.Defaults{
		Kernel:          d.Kernel,
		Initrd:          d.Initrd,
		Rootfs:          d.Rootfs,
		RootfsReadOnly:  d.RootfsReadOnly,
		VCPUCount:       d.VCPUCount,
		MemSizeMiB:      d.MemSizeMiB,
		BootArgs:        d.BootArgs,
		TrackDirtyPages: &track,
		RootfsRateLimit: d.RootfsRateLimit.toVM(),
	}
}

func (r *RateLimiter) toVM() *vm.RateLimiter {
	if r == nil {
		return nil
	}
	bucket := func(b *TokenBucket) *vm.TokenBucket {
		if b == nil {
			return nil
		}
		return &vm.TokenBucket{Size: b.Size, OneTimeBurst: b.OneTimeBurst, RefillTime: b.RefillTime}
	}
	return &vm.RateLimiter{Bandwidth: bucket(r.Bandwidth), Ops: bucket(r.Ops)}
}

// Source is the origin of a value: default, file or environment.
type Source struct {
	// Kind is "default", "file" or "env". The ember CLI also shows
	// "bundle" for a VM default taken from the default guest bundle.
	Kind string `json:"kind"`
	// Detail is the file path or the environment variable.
	Detail string `json:"detail,omitempty"`
}

func (s Source) String() string {
	if s.Detail == "" {
		return s.Kind
	}
	return s.Kind + " " + s.Detail
}

// Loaded is a configuration with the source of each key.
type Loaded struct {
	Config *Config
	// Sources maps each key in [Keys] to where its value came from.
	Sources map[string]Source
	// Path is the file that was read; empty when none was.
	Path string
}

// Load reads the file at path (skipped when path is empty) and applies the
// EMBER_* variables found in environ, which has the form of [os.Environ].
// The library never reads the process environment itself.
func Load(path string, environ []string) (*Loaded, error) {
	l := &Loaded{Config: Default(), Sources: map[string]Source{}, Path: path}
	for _, k := range keys {
		l.Sources[k.name] = Source{Kind: "default"}
	}
	// Unknown keys do not stop loading, so that one error lists them
	// together with the problems of the known keys.
	var unknown error
	if path != "" {
		if err := l.loadFile(path); errors.As(err, new(*UnknownKeysError)) {
			unknown = err
		} else if err != nil {
			return nil, err
		}
	}
	if err := l.applyEnv(environ); err != nil {
		return nil, errors.Join(unknown, err)
	}
	if err := errors.Join(unknown, l.validate()); err != nil {
		return nil, err
	}
	return l, nil
}

// UnknownKeysError lists the keys of a configuration file that this
// version does not know, each with the known key it most likely meant.
type UnknownKeysError struct {
	Path string
	// Keys are the unknown keys, and Suggestions the known key for each,
	// or "" where none is close.
	Keys        []string
	Suggestions []string
}

func (e *UnknownKeysError) Error() string {
	parts := make([]string, len(e.Keys))
	for i, k := range e.Keys {
		parts[i] = k
		if s := e.Suggestions[i]; s != "" {
			parts[i] += fmt.Sprintf(" (did you mean %s?)", s)
		}
	}
	return fmt.Sprintf("load config %s: unknown keys: %s", e.Path, strings.Join(parts, ", "))
}

// suggestKey returns the known key that the unknown key most likely meant:
// a key of the same table with a similar last part.
func suggestKey(unknown string) string {
	table, leaf := "", unknown
	if i := strings.LastIndex(unknown, "."); i >= 0 {
		table, leaf = unknown[:i+1], unknown[i+1:]
	}
	var leaves []string
	for _, k := range keys {
		if rest, ok := strings.CutPrefix(k.name, table); ok && !strings.Contains(rest, ".") {
			leaves = append(leaves, rest)
		}
	}
	if s := vm.SuggestName(leaf, leaves); s != "" {
		return table + s
	}
	return ""
}

// Validate reads the file at path alone, without environment overrides,
// and reports whether it is a valid configuration.
func Validate(path string) error {
	_, err := Load(path, nil)
	return err
}

func (l *Loaded) loadFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("load config: %w", err)
	}
	meta, err := toml.Decode(string(data), l.Config)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			return fmt.Errorf("load config %s: line %d: %s", path, perr.Position.Line, perr.Message)
		}
		return fmt.Errorf("load config %s: %w", path, err)
	}
	if !meta.IsDefined("version") {
		return fmt.Errorf("load config %s: version: missing, add `version = %d` as the first line", path, Version)
	}
	for _, k := range meta.Keys() {
		if _, ok := l.Sources[k.String()]; ok {
			l.Sources[k.String()] = Source{Kind: "file", Detail: path}
		}
	}
	// Nested tables have no entry of their own in keys; record them too.
	for _, k := range meta.Keys() {
		if strings.HasPrefix(k.String(), "defaults.rootfs_rate_limit") {
			l.Sources["defaults.rootfs_rate_limit"] = Source{Kind: "file", Detail: path}
		}
	}
	if undecoded := meta.Undecoded(); len(undecoded) > 0 {
		e := &UnknownKeysError{Path: path}
		for _, k := range undecoded {
			e.Keys = append(e.Keys, k.String())
			e.Suggestions = append(e.Suggestions, suggestKey(k.String()))
		}
		return e
	}
	return nil
}

func (l *Loaded) applyEnv(environ []string) error {
	env := map[string]string{}
	for _, kv := range environ {
		if name, value, ok := strings.Cut(kv, "="); ok {
			env[name] = value
		}
	}
	for _, k := range keys {
		if k.set == nil {
			continue
		}
		value, ok := env[k.env()]
		if !ok {
			continue
		}
		src := Source{Kind: "env", Detail: k.env()}
		if err := k.set(l.Config, value); err != nil {
			return &ValueError{Key: k.name, Value: value, Source: src, Accepted: k.accepted}
		}
		l.Sources[k.name] = src
	}
	return nil
}

// ValueError is a configuration value that cannot be used.
type ValueError struct {
	Key      string
	Value    string
	Source   Source
	Accepted string
}

func (e *ValueError) Error() string {
	return fmt.Sprintf("config %s = %q (from %s) is invalid: accepted: %s", e.Key, e.Value, e.Source, e.Accepted)
}

func (l *Loaded) validate() error {
	var errs []error
	for _, k := range keys {
		if k.check == nil {
			continue
		}
		if err := k.check(l.Config); err != nil {
			errs = append(errs, &ValueError{
				Key: k.name, Value: k.get(l.Config), Source: l.Sources[k.name], Accepted: k.accepted,
			})
		}
	}
	d := l.Config.VMDefaults()
	if err := d.Validate(); err != nil {
		var ve *vm.ValidationError
		if errors.As(err, &ve) {
			for _, p := range ve.Problems {
				key := "defaults." + p.Field
				errs = append(errs, fmt.Errorf("config %s (from %s) is invalid: %s", key, l.sourceOf(key), p.Problem))
			}
		} else {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// sourceOf returns the source of key or of its nearest recorded parent.
func (l *Loaded) sourceOf(key string) Source {
	for k := key; k != ""; {
		if s, ok := l.Sources[k]; ok {
			return s
		}
		i := strings.LastIndex(k, ".")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return Source{Kind: "default"}
}

// Value returns the effective value of key as text.
func (l *Loaded) Value(key string) (string, bool) {
	for _, k := range keys {
		if k.name == key {
			return k.get(l.Config), true
		}
	}
	return "", false
}

// Keys returns every configuration key in display order.
func Keys() []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.name
	}
	return out
}

// EnvOverride returns the environment variable that overrides key, and
// false for a key without one, such as version.
func EnvOverride(key string) (string, bool) {
	for _, k := range keys {
		if k.name == key && k.set != nil {
			return k.env(), true
		}
	}
	return "", false
}

// EnvName returns the environment variable that overrides key.
func EnvName(key string) string {
	r := strings.NewReplacer(".", "_", "-", "_")
	return "EMBER_" + strings.ToUpper(r.Replace(key))
}

func parseBool(s string) (bool, error) { return strconv.ParseBool(strings.TrimSpace(s)) }

func parseInt(s string) (int, error) { return strconv.Atoi(strings.TrimSpace(s)) }
