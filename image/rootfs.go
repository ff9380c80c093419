package image

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	// DefaultBusybox is where Debian's busybox-static package installs
	// its binary.
	DefaultBusybox = "/bin/busybox"

	// rootfsUUID is both the filesystem UUID and the directory hash seed,
	// fixed so that the same input directory gives the same image.
	rootfsUUID = "6d3c1e2a-8f1b-4c5d-9e7f-0a1b2c3d4e5f"
	// rootfsLabel is the ext4 volume label.
	rootfsLabel = "ember-root"
	// rootfsTime is the Unix time written into every timestamp that
	// mkfs.ext4 would otherwise take from the clock.
	rootfsTime = 1000000
	// minRootfsSize is the smallest root filesystem the builder makes.
	minRootfsSize = 64 << 20
)

// writeDefaultRootfs fills dir with a minimal root filesystem: the static
// busybox binary at /bin/busybox, a symbolic link for each of its applets,
// root's entries in /etc/passwd and /etc/group, /etc/hostname and the
// usual empty directories. All modification times are set to 0.
func writeDefaultRootfs(ctx context.Context, dir, busybox string) error {
	data, err := os.ReadFile(busybox)
	if err != nil {
		return fmt.Errorf("default rootfs: read busybox: %w (install Debian's busybox-static, or pass a rootfs directory)", err)
	}
	out, err := runCommand(ctx, "", busybox, "--list-full")
	if err != nil {
		return fmt.Errorf("default rootfs: list busybox applets: %w", err)
	}

	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "var", "mnt"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return fmt.Errorf("default rootfs: %w", err)
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return fmt.Errorf("default rootfs: %w", err)
	}
	if err := os.Chmod(filepath.Join(dir, "root"), 0o700); err != nil {
		return fmt.Errorf("default rootfs: %w", err)
	}

	files := map[string]string{
		"etc/passwd":   "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":    "root:x:0:\n",
		"etc/hostname": "ember\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("default rootfs: %w", err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "bin/busybox"), data, 0o755); err != nil {
		return fmt.Errorf("default rootfs: %w", err)
	}

	for _, applet := range strings.Fields(string(out)) {
		applet = strings.TrimPrefix(filepath.Clean("/"+applet), "/")
		if applet == "bin/busybox" || !filepath.IsLocal(applet) {
			continue
		}
		link := filepath.Join(dir, applet)
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			return fmt.Errorf("default rootfs: %w", err)
		}
		if err := os.Symlink("/bin/busybox", link); err != nil && !os.IsExist(err) {
			return fmt.Errorf("default rootfs: %w", err)
		}
	}
	return zeroTimes(dir)
}

// zeroTimes sets the access and modification times of everything under
// dir, symbolic links included, to the Unix epoch.
func zeroTimes(dir string) error {
	ts := []unix.Timespec{{}, {}}
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("set times of %s: %w", p, err)
		}
		return nil
	})
}

// rootfsSize returns an image size for the tree at dir: twice its data plus
// 32 MiB for metadata and the journal, at least minRootfsSize, in whole MiB.
func rootfsSize(dir string) (int64, error) {
	var used int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		// Count every inode as at least one 4 KiB block.
		used += max((info.Size()+4095)&^4095, 4096)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("measure rootfs %s: %w", dir, err)
	}
	size := max(2*used+32<<20, minRootfsSize)
	return (size + 1<<20 - 1) &^ (1<<20 - 1), nil
}

// makeExt4 writes an ext4 image of size bytes at out with the contents of
// srcDir, without root privileges or loop mounts: `mkfs.ext4 -d` copies
// the tree into the new filesystem. Every file is owned by root.
//
// The image is reproducible for the same tree contents, names, modes and
// modification times, because every other input is fixed. The UUID and
// hash seed are constants. E2FSPROGS_FAKE_TIME fixes the times mkfs takes
// from the clock (checked with e2fsprogs 1.47.0, which ignores
// SOURCE_DATE_EPOCH; that is set too, for releases that read it). debugfs
// then resets each inode's change and access times, which `mkfs.ext4 -d`
// copies from the source tree.
func makeExt4(ctx context.Context, srcDir, out string, size int64) error {
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}

	env := []string{
		"E2FSPROGS_FAKE_TIME=" + strconv.Itoa(rootfsTime),
		"SOURCE_DATE_EPOCH=" + strconv.Itoa(rootfsTime),
	}
	args := []string{
		"-q", "-F", "-t", "ext4",
		"-d", srcDir,
		"-U", rootfsUUID,
		"-E", "root_owner=0:0,hash_seed=" + rootfsUUID + ",nodiscard",
		"-L", rootfsLabel,
		"-m", "0",
		out,
	}
	if _, err := runCommandEnv(ctx, env, "mkfs.ext4", args...); err != nil {
		return fmt.Errorf("make ext4 %s: %w (install e2fsprogs 1.43 or later)", out, err)
	}

	cmds, err := ctimeCommands(srcDir)
	if err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	cmdFile := out + ".debugfs"
	if err := os.WriteFile(cmdFile, []byte(cmds), 0o600); err != nil {
		return fmt.Errorf("make ext4 %s: %w", out, err)
	}
	defer os.Remove(cmdFile)
	if _, err := runCommandEnv(ctx, env, "debugfs", "-w", "-f", cmdFile, out); err != nil {
		return fmt.Errorf("make ext4 %s: reset change times: %w", out, err)
	}
	return nil
}

// ctimeCommands returns debugfs commands that set the change and access
// times of every inode copied from srcDir to rootfsTime. The access time
// needs it too, because reading the source files during the build may
// update their access times.
func ctimeCommands(srcDir string) (string, error) {
	var b strings.Builder
	err := filepath.WalkDir(srcDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(srcDir, p)
		if err != nil {
			return err
		}
		name := "/" + filepath.ToSlash(rel)
		if rel == "." {
			name = "/"
		}
		// NOTE: debugfs has no escape for these characters, so such
		// files keep the change time of the source tree and the image is
		// not reproducible.
		if strings.ContainsAny(name, "\"\n") {
			return nil
		}
		for _, field := range []string{"ctime", "atime"} {
			fmt.Fprintf(&b, "sif \"%s\" %s @%d\nsif \"%s\" %s_extra 0\n", name, field, rootfsTime, name, field)
		}
		return nil
	})
	return b.String(), err
}

// runCommandEnv is runCommand with extra environment variables.
func runCommandEnv(ctx context.Context, env []string, name string, args ...string) ([]byte, error) {
	return runCommandWith(ctx, "", env, name, args...)
}
