package image

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	debianKernelOnce sync.Once
	debianKernelDeb  string
	debianKernelErr  error
	debianKernelDir  string
)

// debianKernel downloads the current Debian cloud kernel package once per
// test binary and returns the path of the .deb, or skips the test.
func debianKernel(t *testing.T) string {
	t.Helper()
	requireTools(t, "the real-kernel tests need a Debian host with apt (apt-get update first)", "apt-get", "apt-cache")
	debianKernelOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		pkg, err := resolveDebianKernel(ctx, DefaultKernelPackage)
		if err != nil {
			debianKernelErr = err
			return
		}
		dir, err := os.MkdirTemp("", "ember-image-kernel-")
		if err != nil {
			debianKernelErr = err
			return
		}
		debianKernelDir = dir
		debianKernelDeb, debianKernelErr = downloadDebianPackage(ctx, pkg, dir, func(int64) {})
	})
	if debianKernelErr != nil {
		t.Skipf("cannot get the Debian cloud kernel with apt-get download (run apt-get update; needs the Debian archive): %v", debianKernelErr)
	}
	return debianKernelDeb
}

// realBundle is the bundle TestBuildDebianKernel built from the real
// kernel, or nil when it did not run or failed.
var realBundle *Result

var (
	sharedTempOnce sync.Once
	sharedTemp     string
)

// sharedTempDir returns a directory that lives until the test binary
// exits, for results that several tests use.
func sharedTempDir(t *testing.T) string {
	t.Helper()
	sharedTempOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ember-image-test-")
		if err != nil {
			t.Fatal(err)
		}
		sharedTemp = dir
	})
	if sharedTemp == "" {
		t.Fatal("no shared temporary directory")
	}
	return sharedTemp
}

func cleanupDebianKernel() {
	if debianKernelDir != "" {
		os.RemoveAll(debianKernelDir)
	}
	if sharedTemp != "" {
		os.RemoveAll(sharedTemp)
	}
}

// TestBuildDebianKernel builds a bundle the default way, from the real
// Debian cloud kernel package fetched with apt-get download, checks every
// file against the manifest, and rebuilds to check that unchanged inputs
// make a cached no-op.
func TestBuildDebianKernel(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a real bundle; skipped with -short")
	}
	requireTools(t, "install e2fsprogs", "mkfs.ext4", "debugfs")
	if _, err := os.Stat(DefaultBusybox); err != nil {
		t.Skipf("%s is missing: install Debian's busybox-static", DefaultBusybox)
	}
	deb := debianKernel(t)
	agent := standInAgent(t)
	dir := filepath.Join(sharedTempDir(t), "debian-bundle")

	rec := &recordingProgress{}
	opts := Options{Dir: dir, Agent: agent, Progress: rec}
	res, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if res.Cached {
		t.Fatalf("first build reported Cached")
	}
	m := res.Manifest
	t.Logf("kernel %s, modules %v, builtin %v", m.KernelRelease, m.Modules, m.BuiltinModules)

	// The vmlinux is an x86_64 ELF with the PVH note.
	f, err := os.Open(filepath.Join(dir, VmlinuxFile))
	if err != nil {
		t.Fatal(err)
	}
	info, err := VerifyVmlinux(f)
	f.Close()
	if err != nil {
		t.Fatalf("VerifyVmlinux: %v", err)
	}
	if !info.HasPVH {
		t.Errorf("vmlinux has no PVH note")
	}
	if !strings.HasPrefix(filepath.Base(deb), "linux-image-"+m.KernelRelease+"_") {
		t.Errorf("kernel release %q does not match package %s", m.KernelRelease, filepath.Base(deb))
	}
	if !strings.HasPrefix(m.KernelSource, "linux-image-"+m.KernelRelease+"=") {
		t.Errorf("kernel source %q does not name the versioned package", m.KernelSource)
	}
	if rec.advanced == 0 {
		t.Errorf("the download reported no progress")
	}

	// Every required module is loaded or built in, dependencies first.
	loaded := make(map[string]int)
	for i, n := range m.Modules {
		loaded[n] = i
	}
	for _, n := range append(DefaultModules, DefaultOptionalModules...) {
		_, isLoaded := loaded[n]
		if !isLoaded && !contains(m.BuiltinModules, n) {
			t.Errorf("module %s is neither in the initramfs nor built in", n)
		}
	}
	if loaded["virtio"] > loaded["virtio_mmio"] || loaded["vsock"] > loaded["vmw_vsock_virtio_transport"] {
		t.Errorf("modules out of dependency order: %v", m.Modules)
	}

	// The files match the manifest.
	if _, err := VerifyBundle(dir); err != nil {
		t.Fatalf("VerifyBundle: %v", err)
	}
	checkInitramfsModules(t, filepath.Join(dir, InitramfsFile), m)
	if _, err := exec.LookPath("e2fsck"); err == nil {
		out, err := exec.Command("e2fsck", "-fn", filepath.Join(dir, RootfsFile)).CombinedOutput()
		if err != nil {
			t.Errorf("e2fsck -fn rootfs: %v\n%s", err, out)
		}
	}
	if len(rec.warnings) > 0 {
		t.Errorf("unexpected warnings: %v", rec.warnings)
	}

	// A rebuild with the same inputs is a no-op.
	before := dirState(t, dir)
	rec.steps = nil
	res2, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatalf("second Build: %v", err)
	}
	if !res2.Cached {
		t.Errorf("second build not cached")
	}
	if len(rec.steps) != 1 {
		t.Errorf("cached build ran steps %v, want only the input check", rec.steps)
	}
	if res2.Manifest.InputsDigest != m.InputsDigest {
		t.Errorf("inputs digest changed: %s then %s", m.InputsDigest, res2.Manifest.InputsDigest)
	}
	if after := dirState(t, dir); after != before {
		t.Errorf("cached build changed the bundle directory:\n%s\nthen\n%s", before, after)
	}

	// A forced rebuild produces identical files.
	opts.Force = true
	res3, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatalf("forced Build: %v", err)
	}
	if res3.Cached {
		t.Errorf("forced build reported Cached")
	}
	for i, f := range res3.Manifest.Files() {
		if want := m.Files()[i]; f != want {
			t.Errorf("forced rebuild of %s: %+v, first build %+v", f.Name, f, want)
		}
	}
	assertNoScratch(t, filepath.Dir(dir))
	realBundle = res3
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// dirState returns the names, sizes and modification times of the files
// in dir, to tell whether anything was rewritten.
func dirState(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(e.Name() + " " + info.ModTime().String() + "\n")
	}
	return b.String()
}

// assertNoScratch fails when the build left temporary directories in dir.
func assertNoScratch(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.Contains(e.Name(), ".build-") {
			t.Errorf("build left scratch directory %s", e.Name())
		}
	}
}

type recordingProgress struct {
	steps    []string
	warnings []string
	advanced int64
}

func (r *recordingProgress) Step(name string, total int64) { r.steps = append(r.steps, name) }
func (r *recordingProgress) Advance(done int64)            { r.advanced = done }
func (r *recordingProgress) Warn(msg string)               { r.warnings = append(r.warnings, msg) }

// TestBootBundleQEMU boots a bundle from the real Debian kernel in QEMU's
// microvm machine under TCG with the root filesystem on a virtio-blk
// device. It checks that the kernel runs /init as PID 1, that every listed
// module loads in the listed order, and that the root filesystem mounts.
func TestBootBundleQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a real kernel; skipped with -short")
	}
	requireTools(t, "install qemu-system-x86", "qemu-system-x86_64")
	requireTools(t, "install e2fsprogs", "mkfs.ext4", "debugfs")
	if _, err := os.Stat(DefaultBusybox); err != nil {
		t.Skipf("%s is missing: install Debian's busybox-static", DefaultBusybox)
	}
	// Reuse the bundle TestBuildDebianKernel built, because extracting
	// the kernel package takes minutes under the race detector.
	res := realBundle
	if res == nil {
		deb := debianKernel(t)
		agent := standInAgent(t)
		var err error
		res, err = Build(context.Background(), Options{Dir: filepath.Join(t.TempDir(), "bundle"), Kernel: deb, Agent: agent})
		if err != nil {
			t.Fatalf("Build: %v", err)
		}
	}
	dir := res.Dir

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args := []string{
		"-M", "microvm,acpi=on", "-accel", "tcg", "-m", "128", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
		"-kernel", filepath.Join(dir, VmlinuxFile),
		"-initrd", filepath.Join(dir, InitramfsFile),
		"-append", res.Manifest.BootArgs[ModeSwitchRoot] + tcgTSCArg(t),
		"-drive", "id=root,file=" + filepath.Join(dir, RootfsFile) + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=root",
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	console := out.String()
	if ctx.Err() != nil {
		t.Fatalf("qemu did not power off within the time limit; console:\n%s", tail(console, 60))
	}
	if err != nil {
		t.Fatalf("qemu: %v; console:\n%s", err, tail(console, 60))
	}
	if !strings.Contains(console, "EMBER-STANDIN-INIT pid 1") {
		t.Fatalf("console has no line from /init as pid 1:\n%s", tail(console, 60))
	}
	for _, line := range strings.Split(console, "\n") {
		if strings.HasPrefix(line, "EMBER-") {
			t.Log(strings.TrimSpace(line))
		}
	}
	want := fmt.Sprintf("EMBER-STANDIN-MODULES loaded %d of %d", len(res.Manifest.Modules), len(res.Manifest.Modules))
	if !strings.Contains(console, want) {
		t.Errorf("console lacks %q:\n%s", want, tail(console, 40))
	}
	if !strings.Contains(console, "EMBER-STANDIN-ROOTFS hostname ember") {
		t.Errorf("/init could not mount the root filesystem from /dev/vda:\n%s", tail(console, 40))
	}
}

// tcgTSCArg returns " tsc_early_khz=N" with the host's clock rate from
// /proc/cpuinfo, or "" when it has none. Under TCG the guest's TSC is the
// host's, and on a loaded host the kernel's PIT calibration of it fails
// ("tsc: Unable to calibrate against PIT"). The Debian 6.1 cloud kernel
// then hangs early in boot, because microvm has no HPET or ACPI PM timer
// to fall back on. Passing the rate skips the calibration.
func tcgTSCArg(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 {
			return ""
		}
		return fmt.Sprintf(" tsc_early_khz=%d", int64(mhz*1000))
	}
	return ""
}

func tail(s string, lines int) string {
	var all []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		all = append(all, sc.Text())
	}
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
