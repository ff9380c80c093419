package guest

// This file holds the steps that only PID 1 in a guest performs: mounting
// the kernel file systems, loading modules and switching the root. Each is a
// small function, so cmd/ember-agent stays a list of calls. None of them can
// run unprivileged, so only booting the agent in a VM exercises them.

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// essentialMount is one file system that the agent mounts at boot.
type essentialMount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	mode                   os.FileMode
}

var essentialMounts = []essentialMount{
	{"proc", "proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"sysfs", "sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"devtmpfs", "dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", 0o755},
	{"devpts", "dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666", 0o755},
	{"tmpfs", "dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"tmpfs", "tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"tmpfs", "run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
}

// MountEssentials mounts proc, sysfs, devtmpfs, devpts, /dev/shm, /tmp and
// /run under root. A target that is already a mount point (EBUSY) is left
// as it is. It returns every failure joined and mounts what it can.
func MountEssentials(root string) error {
	var errs []error
	for _, m := range essentialMounts {
		target := filepath.Join(root, m.target)
		if err := os.MkdirAll(target, m.mode); err != nil {
			errs = append(errs, fmt.Errorf("mount %s: %w", target, err))
			continue
		}
		err := unix.Mount(m.source, target, m.fstype, m.flags, m.data)
		if err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mount %s on %s: %w", m.fstype, target, err))
		}
	}
	return errors.Join(errs...)
}

// UseConsole points stdin, stdout and stderr at /dev/console, for a PID 1
// that the kernel started without them (no /dev/console in the initramfs).
func UseConsole() error {
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return fmt.Errorf("open /dev/console: %w", err)
	}
	for _, target := range []int{0, 1, 2} {
		if err := unix.Dup3(fd, target, 0); err != nil {
			return fmt.Errorf("dup /dev/console to fd %d: %w", target, err)
		}
	}
	if fd > 2 {
		unix.Close(fd)
	}
	return nil
}

// LoadModules loads the kernel modules listed in listPath, one absolute path
// a line in load order, with finit_module(2). A missing list is not an
// error. A module that is already loaded (EEXIST) is fine. Other failures
// are logged and the rest still load, because one missing driver should not
// keep the agent from serving over the others.
func LoadModules(listPath string, logger *slog.Logger) (loaded int, err error) {
	f, err := os.Open(listPath)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("load modules: %w", err)
	}
	defer f.Close()
	var errs []error
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		path := strings.TrimSpace(sc.Text())
		if path == "" || strings.HasPrefix(path, "#") {
			continue
		}
		if err := loadModule(path); err != nil {
			logger.Warn("module failed to load", "module", path, "err", err)
			errs = append(errs, err)
			continue
		}
		loaded++
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("read %s: %w", listPath, err))
	}
	return loaded, errors.Join(errs...)
}

func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("load module %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", path, err)
	}
	return nil
}

// SwitchRoot mounts cfg.Root on /newroot, moves it over / and chroots into
// it, so the agent keeps running as PID 1 from the new root without a
// re-exec. The kernel file systems of the initramfs are detached first and
// must be mounted again inside the new root with [MountEssentials].
//
// NOTE: the initramfs files stay in memory after the switch, because nothing
// deletes them. For an initramfs of the agent and a few modules that is a
// few MiB.
func SwitchRoot(cfg BootConfig) error {
	const newRoot = "/newroot"
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("switch root: %w", err)
	}
	var flags uintptr
	if cfg.RootFlags == "ro" {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(cfg.Root, newRoot, cfg.RootFSType, flags, ""); err != nil {
		return fmt.Errorf("switch root: mount %s (%s) on %s: %w", cfg.Root, cfg.RootFSType, newRoot, err)
	}
	// Detach in reverse mount order; an unmounted one is fine.
	for i := len(essentialMounts) - 1; i >= 0; i-- {
		unix.Unmount("/"+essentialMounts[i].target, unix.MNT_DETACH)
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("switch root: chdir %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("switch root: move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("switch root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("switch root: chdir /: %w", err)
	}
	return nil
}
