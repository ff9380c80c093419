package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/config"
	"github.com/embervm/ember/image"
	"github.com/embervm/ember/provider/firecracker"
	"github.com/embervm/ember/provider/qemu"
	"github.com/embervm/ember/vm"
)

// backendFlag validates a --backend value; empty means the configured
// default.
func backendName(flag string, cfg *config.Config) (string, error) {
	name := flag
	if name == "" {
		name = cfg.Backend
	}
	switch name {
	case "qemu", "firecracker":
		return name, nil
	}
	return "", usageError{fmt.Errorf("--backend %q is invalid, use \"qemu\" or \"firecracker\"", name)}
}

// newProvider builds the provider for a backend from the configuration.
// Run-time files go under <run_dir>/<backend>, snapshots under
// <state_dir>/<backend>-snapshots.
func newProvider(ctx context.Context, backend string, cfg *config.Config, log *slog.Logger) (vm.Provider, error) {
	switch backend {
	case "qemu":
		return qemu.New(ctx, qemu.Options{
			Binary:      cfg.QEMU.Binary,
			RunDir:      filepath.Join(cfg.RunDir, "qemu"),
			SnapshotDir: backendSnapshotDir(cfg, "qemu"),
			Accel:       qemu.Accel(cfg.QEMU.Accel),
			Logger:      log,
		})
	case "firecracker":
		bin, err := exec.LookPath(cfg.Firecracker.Binary)
		if err != nil {
			return nil, fmt.Errorf("find firecracker binary %q: %w (set firecracker.binary or EMBER_FIRECRACKER_BINARY)", cfg.Firecracker.Binary, err)
		}
		return firecracker.New(firecrackerConfig(cfg, bin, log))
	}
	return nil, fmt.Errorf("unknown backend %q", backend)
}

// backendSnapshotDir returns the directory where a backend's provider
// keeps its snapshots.
func backendSnapshotDir(cfg *config.Config, backend string) string {
	return filepath.Join(cfg.StateDir, backend+"-snapshots")
}

// firecrackerConfig returns the Firecracker provider's configuration for
// the firecracker binary bin.
func firecrackerConfig(cfg *config.Config, bin string, log *slog.Logger) firecracker.Config {
	fc := firecracker.Config{
		Binary: bin,
		// Ember's guest bundles use Debian's cloud kernel, which finds
		// virtio devices only through ACPI.
		KernelNeedsACPI: true,
		RunDir:          filepath.Join(cfg.RunDir, "firecracker"),
		SnapshotDir:     backendSnapshotDir(cfg, "firecracker"),
		Logger:          log,
	}
	if cfg.Firecracker.Jailer != "" {
		fc.Jailer = &firecracker.JailerConfig{
			Binary:        cfg.Firecracker.Jailer,
			ChrootBaseDir: cfg.Firecracker.ChrootBaseDir,
			UID:           cfg.Firecracker.UID,
			GID:           cfg.Firecracker.GID,
		}
	}
	return fc
}

// backendDeleters deletes backends' own copies of snapshots: their
// records and the files the snapshot store does not list. It builds each
// backend's provider once, when a snapshot of that backend first needs
// it, and Close detaches them. Deleting starts no VMM, so the Firecracker
// backend works without its binary.
type backendDeleters struct {
	cfg       *config.Config
	log       *slog.Logger
	providers map[string]vm.Provider
}

// delete deletes the backend's copy of snapshot vmID/id. A snapshot the
// backend does not have, such as one made by ember snapshot flatten, is
// not an error.
func (b *backendDeleters) delete(ctx context.Context, backend, vmID, id string) error {
	// Both backends keep a snapshot in <snapshot dir>/<vm>/<snapshot>.
	// Without that directory there is nothing to delete, and no reason to
	// start a provider, which would create its directories.
	if _, err := os.Lstat(filepath.Join(backendSnapshotDir(b.cfg, backend), vmID, id)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	p, ok := b.providers[backend]
	if !ok {
		var err error
		switch backend {
		case "firecracker":
			p, err = firecracker.New(firecrackerConfig(b.cfg, b.cfg.Firecracker.Binary, b.log))
		default:
			p, err = newProvider(ctx, backend, b.cfg, b.log)
		}
		if err != nil {
			return err
		}
		if b.providers == nil {
			b.providers = map[string]vm.Provider{}
		}
		b.providers[backend] = p
	}
	del, ok := p.(vm.SnapshotDeleter)
	if !ok {
		return nil
	}
	if err := del.DeleteSnapshot(ctx, vmID, id); err != nil && !errors.Is(err, vm.ErrSnapshotNotFound) {
		return err
	}
	return nil
}

// Close detaches the providers that delete built, which keeps the VMs they
// adopted running.
func (b *backendDeleters) Close() error {
	var errs []error
	for _, p := range b.providers {
		if d, ok := p.(vm.Detacher); ok {
			errs = append(errs, d.Close())
		}
	}
	return errors.Join(errs...)
}

// bundleDefaults returns the workspace defaults with unset kernel, initrd
// and rootfs taken from the guest bundle in dir, and the bundle's
// recommended command line when the configuration keeps the built-in one.
func bundleDefaults(cfg *config.Config, dir string, m *image.Manifest) vm.Defaults {
	d := cfg.VMDefaults()
	if d.Kernel == "" {
		d.Kernel = filepath.Join(dir, image.VmlinuxFile)
		if d.Initrd == "" {
			d.Initrd = filepath.Join(dir, image.InitramfsFile)
		}
	}
	bundleRootfs := d.Rootfs == ""
	if bundleRootfs {
		// The bundle's root filesystem is shared by every VM and by the
		// clones of every snapshot, so no guest may write to it.
		d.Rootfs = filepath.Join(dir, image.RootfsFile)
		d.RootfsReadOnly = true
	}
	if d.BootArgs == vm.DefaultBootArgs {
		if args, ok := m.BootArgs[image.ModeSwitchRoot]; ok {
			d.BootArgs = args
			if d.RootfsReadOnly {
				d.BootArgs += " ember.rootflags=ro"
			}
		}
	}
	return d
}

// nameGuest returns d with the kernel parameter that makes the bundle's
// agent name the guest after VM id, when the id is a valid host name.
func nameGuest(d vm.Defaults, id string) vm.Defaults {
	if name := guestHostname(id); name != "" {
		d.BootArgs += " ember.hostname=" + name
	}
	return d
}

// guestHostname returns the host name a guest gets for VM id: the id
// itself, or "" for an id that is not a valid host name (one longer than
// 63 bytes), which leaves the guest's name as it is.
func guestHostname(id string) string {
	if agent.ValidateHostname(id) != nil {
		return ""
	}
	return id
}

// defaultBundleDir returns where `ember image build` puts the default
// bundle.
func defaultBundleDir(cfg *config.Config) string {
	return filepath.Join(cfg.StateDir, "images", "default")
}

// logger returns the CLI's logger: warnings and errors on stderr, or debug
// records too when EMBER_DEBUG is set.
func (a *app) logger() *slog.Logger {
	level := slog.LevelWarn
	if a.getenv("EMBER_DEBUG") != "" {
		level = slog.LevelDebug
	}
	w := a.stderr
	if w == nil {
		w = os.Stderr
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}
