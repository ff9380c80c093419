package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/vm"
)

// JailerConfig runs each VM through Firecracker's jailer, which chroots,
// drops privileges, applies cgroup limits and then runs Firecracker.
//
// The jail of a VM is ChrootBaseDir/<firecracker binary name>/<jail id>/root,
// where the jail id is the VM's short run-directory name. Ember stages the
// kernel, drives and snapshot files into it: a hard link when the jailed
// user can already use the file, otherwise a copy owned by that user. A
// shared original is never chowned. The jailer itself creates the /dev/kvm,
// /dev/net/tun and /dev/userfaultfd nodes in the jail.
type JailerConfig struct {
	// Binary is the path of the jailer executable.
	Binary string
	// ChrootBaseDir contains the jails; "" means /srv/jailer.
	ChrootBaseDir string
	// UID and GID are the user and group Firecracker runs as.
	UID, GID int
	// CgroupVersion is 1 or 2; 0 means 2.
	CgroupVersion int
	// ParentCgroup is the cgroup the VM's cgroup is placed in; "" means
	// the jailer's default, "firecracker".
	ParentCgroup string
	// CPUQuotaUS and CPUPeriodUS limit CPU time: CPUQuotaUS microseconds
	// in every CPUPeriodUS; 0 means no limit.
	CPUQuotaUS, CPUPeriodUS int64
	// MemoryMaxBytes limits the cgroup's memory; 0 means no limit.
	MemoryMaxBytes int64
	// PidsMax limits the number of tasks; 0 means no limit.
	PidsMax int64
	// NewPIDNamespace runs Firecracker in a new PID namespace.
	NewPIDNamespace bool
	// NetNS is the path of a network namespace to join, such as
	// /var/run/netns/ember-1, for VMs whose vm.Config.NetNS is empty; ""
	// stays in the jailer's namespace. A VM's own NetNS takes precedence.
	NetNS string
}

// jail is one VM's chroot and cgroup.
type jail struct {
	cfg      JailerConfig
	id       string
	execName string
	// root is the chroot directory on the host.
	root string
	// firecrackerPID is the real Firecracker's PID, read from the jail's
	// pid file; the jailer process itself is not Firecracker.
	firecrackerPID int
	pidfd          int
	// exited is closed when the jailed Firecracker exits; nil when the
	// spawned child is Firecracker itself.
	exited chan struct{}
	staged map[string]string
}

func (p *Provider) newJail(cfg vm.Config, runDir string) (*jail, error) {
	jc := *p.cfg.Jailer
	if jc.Binary == "" {
		return nil, fmt.Errorf("jailer: binary is not set: %w", vm.ErrInvalid)
	}
	if jc.ChrootBaseDir == "" {
		jc.ChrootBaseDir = "/srv/jailer"
	}
	if jc.CgroupVersion == 0 {
		jc.CgroupVersion = 2
	}
	if cfg.NetNS != "" {
		jc.NetNS = cfg.NetNS
	}
	if jc.CgroupVersion != 1 && jc.CgroupVersion != 2 {
		return nil, fmt.Errorf("jailer: cgroup version %d is invalid, want 1 or 2: %w", jc.CgroupVersion, vm.ErrInvalid)
	}
	j := &jail{
		cfg: jc, id: filepath.Base(runDir), execName: filepath.Base(p.cfg.Binary),
		pidfd: -1, staged: map[string]string{},
	}
	j.root = filepath.Join(jc.ChrootBaseDir, j.execName, j.id, "root")
	if err := os.MkdirAll(j.root, 0o755); err != nil {
		return nil, fmt.Errorf("jailer: create chroot: %w", err)
	}
	for _, dir := range []string{"run", "snapshot"} {
		if err := os.MkdirAll(filepath.Join(j.root, dir), 0o755); err != nil {
			return nil, fmt.Errorf("jailer: create chroot: %w", err)
		}
		if err := os.Chown(filepath.Join(j.root, dir), jc.UID, jc.GID); err != nil {
			return nil, fmt.Errorf("jailer: chown chroot: %w", err)
		}
	}
	return j, nil
}

// cgroupArgs returns the --cgroup values for the configured limits.
func (j *jail) cgroupArgs() []string {
	var out []string
	c := j.cfg
	if c.CPUQuotaUS > 0 {
		period := c.CPUPeriodUS
		if period <= 0 {
			period = 100000
		}
		if c.CgroupVersion == 2 {
			out = append(out, fmt.Sprintf("cpu.max=%d %d", c.CPUQuotaUS, period))
		} else {
			out = append(out, fmt.Sprintf("cpu.cfs_quota_us=%d", c.CPUQuotaUS), fmt.Sprintf("cpu.cfs_period_us=%d", period))
		}
	}
	if c.MemoryMaxBytes > 0 {
		if c.CgroupVersion == 2 {
			out = append(out, fmt.Sprintf("memory.max=%d", c.MemoryMaxBytes))
		} else {
			out = append(out, fmt.Sprintf("memory.limit_in_bytes=%d", c.MemoryMaxBytes))
		}
	}
	if c.PidsMax > 0 {
		out = append(out, fmt.Sprintf("pids.max=%d", c.PidsMax))
	}
	return out
}

// jailerArgs builds the jailer command line around Firecracker's own
// arguments, which follow "--" and use paths inside the chroot.
func (j *jail) jailerArgs(firecrackerBinary string, noFile uint64, fcArgs []string) []string {
	args := []string{
		"--id", j.id,
		"--exec-file", firecrackerBinary,
		"--uid", strconv.Itoa(j.cfg.UID),
		"--gid", strconv.Itoa(j.cfg.GID),
		"--chroot-base-dir", j.cfg.ChrootBaseDir,
		"--cgroup-version", strconv.Itoa(j.cfg.CgroupVersion),
		"--resource-limit", fmt.Sprintf("no-file=%d", noFile),
	}
	if j.cfg.ParentCgroup != "" {
		args = append(args, "--parent-cgroup", j.cfg.ParentCgroup)
	}
	for _, c := range j.cgroupArgs() {
		args = append(args, "--cgroup", c)
	}
	if j.cfg.NewPIDNamespace {
		args = append(args, "--new-pid-ns")
	}
	if j.cfg.NetNS != "" {
		args = append(args, "--netns", j.cfg.NetNS)
	}
	return append(append(args, "--"), fcArgs...)
}

// spawnOptions turns direct-spawn options into jailer options. Firecracker
// inside the jail writes its API socket, log and metrics under /run of the
// chroot; the returned paths are their host paths.
func (j *jail) spawnOptions(direct spawnOptions) (spawnOptions, string, string, error) {
	for _, name := range []string{vmmLogName, metricsName} {
		path := filepath.Join(j.root, "run", name)
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			return spawnOptions{}, "", "", fmt.Errorf("jailer: %w", err)
		}
		if err := os.Chown(path, j.cfg.UID, j.cfg.GID); err != nil {
			return spawnOptions{}, "", "", fmt.Errorf("jailer: %w", err)
		}
	}
	// The jailer passes --id itself, and Firecracker rejects a second one.
	fcArgs := []string{
		"--api-sock", "/run/" + apiSocketName,
		"--log-path", "/run/" + vmmLogName, "--metrics-path", "/run/" + metricsName,
	}
	out := direct
	// The jailer joins the namespace itself with --netns.
	out.netns = ""
	out.path = j.cfg.Binary
	out.args = j.jailerArgs(direct.path, direct.noFileLimit, fcArgs)
	return out, j.hostPath("/run/" + apiSocketName), j.hostPath("/run/" + metricsName), nil
}

// hostPath returns the host path of a path inside the chroot.
func (j *jail) hostPath(inJail string) string {
	return filepath.Join(j.root, inJail)
}

// waitFirecracker reads the real Firecracker PID from the jail's pid file
// and opens a pidfd for it, so its exit can be watched although the jailer
// (the spawned child) is not Firecracker.
func (j *jail) waitFirecracker(ctx context.Context, proc *process, timeout time.Duration) error {
	pidFile := j.hostPath("/" + j.execName + ".pid")
	deadline := time.Now().Add(timeout)
	delay := time.Millisecond
	for {
		data, err := os.ReadFile(pidFile)
		if err == nil {
			pid, perr := strconv.Atoi(strings.TrimSpace(string(data)))
			if perr == nil && pid > 0 {
				j.firecrackerPID = pid
				fd, err := unix.PidfdOpen(pid, 0)
				if err != nil {
					return fmt.Errorf("jailer: open pidfd of firecracker %d: %w", pid, err)
				}
				j.pidfd = fd
				if pid != proc.pid() {
					// The jailer forked into a new PID namespace, so watch
					// the real Firecracker through its pidfd.
					j.exited = make(chan struct{})
					go func() {
						defer close(j.exited)
						for !j.waitFirecrackerExit(time.Hour) {
						}
					}()
				}
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("jailer: wait for pid file %s: timed out after %s", pidFile, timeout)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("jailer: wait for pid file %s: %w", pidFile, ctx.Err())
		case <-time.After(delay):
		}
		if !proc.alive() && !proc.state.Success() {
			return fmt.Errorf("jailer: %w before writing its pid file (%s)", errProcessExited, proc.exitDescription())
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

func (j *jail) signalFirecracker(sig syscall.Signal) {
	if j.pidfd >= 0 {
		unix.PidfdSendSignal(j.pidfd, sig, nil, 0)
	}
}

// waitFirecrackerExit polls the pidfd until Firecracker exits or d passes.
func (j *jail) waitFirecrackerExit(d time.Duration) bool {
	if j.pidfd < 0 {
		return true
	}
	fds := []unix.PollFd{{Fd: int32(j.pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, int(d.Milliseconds()))
	return err == nil && n > 0
}

// stage makes a host file visible inside the jail at /name and returns
// that path. Names are fixed per role (kernel, drive id), so a snapshot
// taken in one jail finds its drives at the same paths in the next.
func (j *jail) stage(hostPath, name string, writable bool) (string, error) {
	inJail := "/" + name
	if p, ok := j.staged[hostPath]; ok && p == inJail {
		return p, nil
	}
	dst := j.hostPath(inJail)
	if err := linkOrCopy(hostPath, dst, j.cfg.UID, j.cfg.GID, writable); err != nil {
		return "", fmt.Errorf("jailer: stage %s: %w", hostPath, err)
	}
	j.staged[hostPath] = inJail
	return inJail, nil
}

// linkOrCopy hard-links src to dst when the user uid:gid can already use
// src with the needed access, because a link shares the inode and its
// owner. Otherwise, or across filesystems, it copies src and gives the copy
// to uid:gid.
func linkOrCopy(src, dst string, uid, gid int, writable bool) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if canAccess(fi, uid, gid, writable) {
		err := os.Link(src, dst)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) {
			return err
		}
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(dst)
		return err
	}
	if err := out.Close(); err != nil {
		os.Remove(dst)
		return err
	}
	// The copy belongs to the jail alone, so changing its owner is safe.
	return os.Chown(dst, uid, gid)
}

// canAccess reports whether uid:gid may read (and write, when writable) the
// file by its permission bits.
func canAccess(fi os.FileInfo, uid, gid int, writable bool) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	if uid == 0 {
		return true
	}
	mode := fi.Mode().Perm()
	need := os.FileMode(4)
	if writable {
		need = 6
	}
	switch {
	case int(st.Uid) == uid:
		return (mode>>6)&need == need
	case int(st.Gid) == gid:
		return (mode>>3)&need == need
	default:
		return mode&need == need
	}
}

// snapshotPaths returns where Firecracker writes a snapshot inside the jail.
func (j *jail) snapshotPaths() (string, string, error) {
	for _, name := range []string{snapStateName, snapMemoryName} {
		os.Remove(j.hostPath("/snapshot/" + name))
	}
	return "/snapshot/" + snapStateName, "/snapshot/" + snapMemoryName, nil
}

// collectSnapshot moves a snapshot written in the jail to the snapshot
// directory, so the files outlive the jail.
func (j *jail) collectSnapshot(statePath, memPath string) error {
	for src, dst := range map[string]string{
		j.hostPath("/snapshot/" + snapStateName):  statePath,
		j.hostPath("/snapshot/" + snapMemoryName): memPath,
	} {
		if err := os.Rename(src, dst); err != nil {
			if !errors.Is(err, syscall.EXDEV) {
				return fmt.Errorf("jailer: collect snapshot: %w", err)
			}
			if err := linkOrCopy(src, dst, os.Getuid(), os.Getgid(), false); err != nil {
				return fmt.Errorf("jailer: collect snapshot: %w", err)
			}
			os.Remove(src)
		}
	}
	return nil
}

// stageSnapshot stages a snapshot's files for a load inside the jail.
func (j *jail) stageSnapshot(statePath, memPath string) (string, string, error) {
	s, err := j.stage(statePath, "snapshot-"+snapStateName, false)
	if err != nil {
		return "", "", err
	}
	mem, err := j.stage(memPath, "snapshot-"+snapMemoryName, false)
	if err != nil {
		return "", "", err
	}
	return s, mem, nil
}

// teardown removes the chroot and the VM's cgroups.
func (j *jail) teardown() error {
	if j.exited != nil {
		select {
		case <-j.exited:
		case <-time.After(termGrace):
		}
	}
	if j.pidfd >= 0 {
		unix.Close(j.pidfd)
		j.pidfd = -1
	}
	var errs []error
	if err := os.RemoveAll(filepath.Dir(j.root)); err != nil {
		errs = append(errs, err)
	}
	parent := j.cfg.ParentCgroup
	if parent == "" {
		parent = j.execName
	}
	var dirs []string
	if j.cfg.CgroupVersion == 2 {
		dirs = []string{filepath.Join("/sys/fs/cgroup", parent, j.id)}
	} else {
		for _, c := range []string{"cpu", "cpuacct", "cpuset", "memory", "pids"} {
			dirs = append(dirs, filepath.Join("/sys/fs/cgroup", c, parent, j.id))
		}
	}
	for _, d := range dirs {
		if err := unix.Rmdir(d); err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// pathMapper returns the function that turns a host path into the path
// Firecracker should open: the path itself, or its copy staged in the jail
// under name.
func (m *machine) pathMapper() func(path, name string, writable bool) (string, error) {
	if m.jail == nil {
		return func(p, _ string, _ bool) (string, error) { return p, nil }
	}
	return m.jail.stage
}

// driveName is the name under which a drive is staged in a jail.
func driveName(id string) string { return "drive-" + id }

// socketPathInJail returns the path Firecracker should use for a Unix
// socket whose host path is hostPath. In a jail the socket lives in the
// chroot and hostPath becomes a symbolic link to it.
func (m *machine) socketPathInJail(hostPath string) (string, error) {
	if m.jail == nil {
		return hostPath, nil
	}
	inJail := "/run/" + filepath.Base(hostPath)
	target := m.jail.hostPath(inJail)
	if target == hostPath {
		return inJail, nil
	}
	os.Remove(hostPath)
	if err := os.Symlink(target, hostPath); err != nil {
		return "", fmt.Errorf("jailer: link socket %s: %w", hostPath, err)
	}
	return inJail, nil
}
