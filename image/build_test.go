package image

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// buildFixture is a set of generated inputs for Build that needs no
// network: a bzImage, a module tree, a stand-in agent file and a rootfs
// directory.
type buildFixture struct {
	kernel, modules, agent, rootfs string
}

func newBuildFixture(t *testing.T) buildFixture {
	t.Helper()
	requireTools(t, "install e2fsprogs", "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	f := buildFixture{
		kernel:  filepath.Join(dir, "vmlinuz-6.1.0-fixture"),
		modules: filepath.Join(dir, "lib/modules/6.1.0-fixture"),
		agent:   filepath.Join(dir, "agent-standin"),
		rootfs:  filepath.Join(dir, "rootfs"),
	}
	vmlinux := testVmlinux("6.1.0-fixture")
	bz := makeBzImage(compressors[CompressionLZ4Legacy](t, vmlinux), "6.1.0-fixture (t@h) #1 SMP", 4, 0x100)
	writeTree(t, dir, map[string][]byte{
		"vmlinuz-6.1.0-fixture": bz,
		// Nothing boots this bundle, so any bytes stand in for the agent.
		"agent-standin":       []byte("agent v1"),
		"rootfs/etc/hostname": []byte("fixture\n"),
		"rootfs/bin/tool":     []byte("#!/bin/sh\n"),
	})
	writeTree(t, f.modules, map[string][]byte{
		"kernel/drivers/virtio/virtio.ko":                    testModule("virtio", "", ""),
		"kernel/drivers/virtio/virtio_ring.ko":               testModule("virtio_ring", "", ""),
		"kernel/drivers/virtio/virtio_mmio.ko":               testModule("virtio_mmio", "virtio,virtio_ring", ""),
		"kernel/drivers/block/virtio_blk.ko":                 testModule("virtio_blk", "virtio,virtio_ring", ""),
		"kernel/drivers/net/virtio_net.ko":                   testModule("virtio_net", "virtio,virtio_ring", ""),
		"kernel/drivers/char/virtio_console.ko":              testModule("virtio_console", "virtio,virtio_ring", ""),
		"kernel/net/vmw_vsock/vsock.ko":                      testModule("vsock", "", ""),
		"kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": testModule("vmw_vsock_virtio_transport", "vsock,virtio", ""),
		"modules.builtin":                                    []byte("kernel/fs/ext4/ext4.ko\n"),
	})
	return f
}

func (f buildFixture) options(dir string) Options {
	return Options{Dir: dir, Kernel: f.kernel, Modules: f.modules, Agent: f.agent, RootfsDir: f.rootfs}
}

func TestBuildFixtureAndCache(t *testing.T) {
	f := newBuildFixture(t)
	dir := filepath.Join(t.TempDir(), "bundle")
	rec := &recordingProgress{}
	opts := f.options(dir)
	opts.Progress = rec

	res, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	m := res.Manifest
	if res.Cached || m.KernelRelease != "6.1.0-fixture" || m.PVHEntry != "0x1000120" {
		t.Fatalf("result = %+v, manifest %+v", res, m)
	}
	if len(m.Modules) != 8 || !contains(m.BuiltinModules, "ext4") {
		t.Errorf("modules %v, builtin %v", m.Modules, m.BuiltinModules)
	}
	if len(rec.warnings) != 0 {
		t.Errorf("warnings: %v", rec.warnings)
	}
	if _, err := VerifyBundle(dir); err != nil {
		t.Fatalf("VerifyBundle: %v", err)
	}
	checkInitramfsModules(t, filepath.Join(dir, InitramfsFile), m)

	// Unchanged inputs: cached.
	res, err = Build(context.Background(), opts)
	if err != nil || !res.Cached {
		t.Fatalf("rebuild: cached %v, error %v", res != nil && res.Cached, err)
	}

	// Each changed input forces a rebuild.
	changes := map[string]func(){
		"agent":  func() { writeTree(t, filepath.Dir(f.agent), map[string][]byte{"agent-standin": []byte("agent v2")}) },
		"rootfs": func() { writeTree(t, f.rootfs, map[string][]byte{"etc/motd": []byte("hi\n")}) },
		"module": func() {
			writeTree(t, f.modules, map[string][]byte{"kernel/net/vmw_vsock/vsock.ko": testModule("vsock", "", "pre: nothing")})
		},
	}
	for _, name := range []string{"agent", "rootfs", "module"} {
		changes[name]()
		res, err := Build(context.Background(), opts)
		if err != nil {
			t.Fatalf("rebuild after changing the %s: %v", name, err)
		}
		if res.Cached {
			t.Errorf("changing the %s did not force a rebuild", name)
		}
	}

	// A damaged bundle file is rebuilt too.
	if err := os.WriteFile(filepath.Join(dir, RootfsFile), []byte("damaged"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyBundle(dir); !errors.Is(err, errBundleChanged) {
		t.Fatalf("VerifyBundle of a damaged bundle: %v, want errBundleChanged", err)
	}
	res, err = Build(context.Background(), opts)
	if err != nil || res.Cached {
		t.Fatalf("rebuild of a damaged bundle: cached %v, error %v", res != nil && res.Cached, err)
	}
	assertNoScratch(t, filepath.Dir(dir))
}

func TestBuildFailureKeepsOldBundle(t *testing.T) {
	f := newBuildFixture(t)
	dir := filepath.Join(t.TempDir(), "bundle")
	if _, err := Build(context.Background(), f.options(dir)); err != nil {
		t.Fatalf("Build: %v", err)
	}
	before := dirState(t, dir)

	tests := []struct {
		name   string
		change func(o *Options)
		want   error
	}{
		{"missing module", func(o *Options) { o.ModuleNames = []string{"virtio_mmio", "no_such_module"} }, ErrModuleNotFound},
		{"garbage kernel", func(o *Options) { o.Kernel = f.agent }, ErrNotVmlinux},
		{"missing agent", func(o *Options) { o.Agent = filepath.Join(t.TempDir(), "none") }, ErrAgentNotFound},
		{"no agent", func(o *Options) { o.Agent = "" }, ErrAgentNotFound},
		{"cancelled", func(o *Options) {}, context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := f.options(dir)
			opts.Force = true
			tt.change(&opts)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.want == context.Canceled {
				cancel()
			}
			_, err := Build(ctx, opts)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Build error = %v, want %v", err, tt.want)
			}
			if after := dirState(t, dir); after != before {
				t.Errorf("failed build changed the old bundle:\n%s\nthen\n%s", before, after)
			}
			if _, err := VerifyBundle(dir); err != nil {
				t.Errorf("old bundle damaged: %v", err)
			}
			assertNoScratch(t, filepath.Dir(dir))
		})
	}
}

func TestBuildRefusesForeignDirectory(t *testing.T) {
	f := newBuildFixture(t)
	dir := t.TempDir()
	precious := filepath.Join(dir, "precious.txt")
	if err := os.WriteFile(precious, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Build(context.Background(), f.options(dir))
	if err == nil || !strings.Contains(err.Error(), "not empty and has no manifest.json") {
		t.Fatalf("Build into a foreign directory: error %v", err)
	}
	if b, err := os.ReadFile(precious); err != nil || string(b) != "keep me" {
		t.Fatalf("foreign file changed: %q, %v", b, err)
	}
}

func TestBuildWithoutModulesWarns(t *testing.T) {
	f := newBuildFixture(t)
	rec := &recordingProgress{}
	opts := f.options(filepath.Join(t.TempDir(), "bundle"))
	opts.Modules = ""
	opts.Progress = rec
	res, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if len(res.Manifest.Modules) != 0 {
		t.Errorf("modules = %v, want none", res.Manifest.Modules)
	}
	if len(rec.warnings) != 1 || !strings.Contains(rec.warnings[0], "no kernel modules") {
		t.Errorf("warnings = %v", rec.warnings)
	}
}

func TestDefaultRootfsAndDir(t *testing.T) {
	if _, err := os.Stat(DefaultBusybox); err != nil {
		t.Skipf("%s is missing: install Debian's busybox-static", DefaultBusybox)
	}
	f := newBuildFixture(t)
	state := t.TempDir()
	opts := f.options("")
	opts.StateDir = state
	opts.RootfsDir = ""
	res, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if want := filepath.Join(state, "images", "default"); res.Dir != want {
		t.Errorf("Dir = %s, want %s", res.Dir, want)
	}
	if res.Manifest.Inputs["busybox"] == "" {
		t.Errorf("inputs lack the busybox digest: %v", res.Manifest.Inputs)
	}
	// The image holds busybox and its applet links.
	for _, p := range []string{"/bin/busybox", "/bin/sh", "/etc/passwd"} {
		out, err := runCommand(context.Background(), "", "debugfs", "-R", "stat "+p, filepath.Join(res.Dir, RootfsFile))
		if err != nil || !strings.Contains(string(out), "Inode:") {
			t.Errorf("rootfs lacks %s: %v %s", p, err, out)
		}
	}
}

func TestBuildConcurrentSameDir(t *testing.T) {
	f := newBuildFixture(t)
	dir := filepath.Join(t.TempDir(), "bundle")
	const builds = 3
	errs := make(chan error, builds)
	cached := make(chan bool, builds)
	for range builds {
		go func() {
			res, err := Build(context.Background(), f.options(dir))
			errs <- err
			cached <- err == nil && res.Cached
		}()
	}
	nCached := 0
	for range builds {
		if err := <-errs; err != nil {
			t.Errorf("concurrent Build: %v", err)
		}
		if <-cached {
			nCached++
		}
	}
	// The lock makes one build do the work and the others find it done.
	if nCached != builds-1 {
		t.Errorf("%d of %d concurrent builds were cached, want %d", nCached, builds, builds-1)
	}
	if _, err := VerifyBundle(dir); err != nil {
		t.Fatalf("VerifyBundle: %v", err)
	}
	assertNoScratch(t, filepath.Dir(dir))
}

func TestBuildLockWaitCancelled(t *testing.T) {
	f := newBuildFixture(t)
	dir := filepath.Join(t.TempDir(), "bundle")
	unlock, err := lockBundle(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = Build(ctx, f.options(dir))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Build while another holds the lock: error %v, want context.DeadlineExceeded", err)
	}
	if !strings.Contains(err.Error(), "lock bundle") {
		t.Errorf("error %q does not come from waiting for the lock", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the bundle directory was created: %v", err)
	}
}
