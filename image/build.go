package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultStateDir is Ember's state directory when Options.StateDir is empty.
const DefaultStateDir = "/var/lib/ember"

// builderVersion changes whenever the builder's output for the same inputs
// changes, so that bundles from an older builder are rebuilt.
const builderVersion = "1"

// Options configures [Build]. The zero value of every field but Agent is a
// documented default.
type Options struct {
	// Dir is the bundle directory. Default: StateDir/images/default. An
	// existing directory is replaced only when it is empty or holds a
	// bundle (a manifest.json).
	Dir string
	// StateDir is Ember's state directory. Default: DefaultStateDir.
	StateDir string
	// Kernel is a vmlinux, a bzImage (vmlinuz) or a Debian kernel
	// package. Default: the current package that DefaultKernelPackage
	// depends on, fetched with `apt-get download`.
	Kernel string
	// Modules is a lib/modules/<release> tree to take modules from. A
	// bare vmlinux or bzImage needs it. A .deb brings its own tree, which
	// Modules overrides. Without either, the initramfs has no modules and
	// the build reports a warning.
	Modules string
	// ModuleNames lists the modules to load with their dependencies.
	// Default: DefaultModules.
	ModuleNames []string
	// OptionalModuleNames lists modules to load with their dependencies
	// when the kernel has them. Default: DefaultOptionalModules.
	OptionalModuleNames []string
	// RootfsDir is the directory to copy into the root filesystem.
	// Default: a minimal busybox tree (see Busybox).
	RootfsDir string
	// RootfsSize is the root filesystem image size in bytes, rounded up
	// to a whole MiB. Default: twice the tree's size plus 32 MiB, at least
	// 64 MiB.
	RootfsSize int64
	// Busybox is the static busybox binary for the default root
	// filesystem. Default: DefaultBusybox.
	Busybox string
	// Agent is the static ember-agent binary. It is required, and
	// [FindAgent] locates the usual one.
	Agent string
	// Force rebuilds even when the bundle's inputs are unchanged.
	Force bool
	// Progress receives progress reports. Default: none.
	Progress Progress
	// Logger receives debug records of the commands run. Default: none.
	Logger *slog.Logger
}

// Progress receives reports from a build, so that a command line can show
// an updating display on a terminal and plain lines elsewhere. Calls come
// from one goroutine at a time.
type Progress interface {
	// Step reports that a step begins. total is the step's size in bytes
	// when the step reports bytes through Advance, and 0 otherwise.
	Step(name string, total int64)
	// Advance reports the bytes done so far in the current step.
	Advance(done int64)
	// Warn reports a problem that does not stop the build.
	Warn(msg string)
}

type nopProgress struct{}

func (nopProgress) Step(string, int64) {}
func (nopProgress) Advance(int64)      {}
func (nopProgress) Warn(string)        {}

// Result is the outcome of [Build].
type Result struct {
	// Dir is the bundle directory.
	Dir      string
	Manifest *Manifest
	// Cached reports that the bundle was already up to date and nothing
	// was built.
	Cached bool
}

// Build produces a guest bundle in opts.Dir: vmlinux, a gzip-compressed
// initramfs with the agent as /init and the needed modules, an ext4 root
// filesystem and manifest.json. When the directory already holds a bundle
// built from the same inputs with intact files, Build changes nothing and
// returns it with Cached set.
//
// Build writes the new bundle into a temporary directory next to Dir and
// renames it into place, so a failed or cancelled build leaves the old
// bundle as it was.
func Build(ctx context.Context, opts Options) (*Result, error) {
	b, err := newBuilder(opts)
	if err != nil {
		return nil, err
	}
	return b.run(ctx)
}

type builder struct {
	opts     Options
	dir      string
	progress Progress
	log      *slog.Logger
}

func newBuilder(opts Options) (*builder, error) {
	if opts.Agent == "" {
		return nil, fmt.Errorf("build image: no agent binary given: %w", ErrAgentNotFound)
	}
	if opts.RootfsSize < 0 {
		return nil, fmt.Errorf("build image: rootfs size %d is negative", opts.RootfsSize)
	}

	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	if opts.Dir == "" {
		opts.Dir = filepath.Join(opts.StateDir, "images", "default")
	}
	if len(opts.ModuleNames) == 0 {
		opts.ModuleNames = DefaultModules
	}
	if opts.OptionalModuleNames == nil {
		opts.OptionalModuleNames = DefaultOptionalModules
	}
	if opts.Busybox == "" {
		opts.Busybox = DefaultBusybox
	}

	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}

	b := &builder{opts: opts, dir: dir, progress: opts.Progress, log: opts.Logger}
	if b.progress == nil {
		b.progress = nopProgress{}
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	return b, nil
}

// inputs are the build's inputs with their digests.
type inputs struct {
	digests map[string]string
	// debPackage is the Debian package to download, for the default kernel.
	debPackage   *debPackage
	kernelSource string
}

func (b *builder) run(ctx context.Context) (*Result, error) {
	b.progress.Step("check inputs", 0)
	in, err := b.digestInputs(ctx)
	if err != nil {
		return nil, err
	}
	digest := digestInputs(in.digests)

	parent := filepath.Dir(b.dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	unlock, err := lockBundle(ctx, b.dir)
	if err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	defer unlock()

	if !b.opts.Force {
		if m, err := VerifyBundle(b.dir); err == nil && m.InputsDigest == digest {
			b.log.Debug("bundle up to date", "dir", b.dir, "inputs_digest", digest)
			return &Result{Dir: b.dir, Manifest: m, Cached: true}, nil
		}
	}
	if err := checkReplaceable(b.dir); err != nil {
		return nil, err
	}

	scratch, err := os.MkdirTemp(parent, "."+filepath.Base(b.dir)+".build-")
	if err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	defer os.RemoveAll(scratch)

	staging := filepath.Join(scratch, "bundle")
	if err := os.Mkdir(staging, 0o755); err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	m, err := b.buildInto(ctx, in, staging, scratch)
	if err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	m.Inputs = in.digests
	m.InputsDigest = digest
	if err := writeManifest(staging, m); err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	if err := replaceDir(staging, b.dir, filepath.Join(scratch, "old")); err != nil {
		return nil, fmt.Errorf("build image in %s: %w", b.dir, err)
	}
	return &Result{Dir: b.dir, Manifest: m}, nil
}

// digestInputs computes the digest of every input without building
// anything. For the default kernel it reads the package's digest from the
// apt cache instead of downloading the package.
func (b *builder) digestInputs(ctx context.Context) (*inputs, error) {
	in := &inputs{digests: make(map[string]string)}
	add := func(key, p string, digest func(string) (string, error)) error {
		sum, err := digest(p)
		if err != nil {
			return fmt.Errorf("build image: digest %s %s: %w", key, p, err)
		}
		in.digests[key] = sum
		return nil
	}

	if err := add("agent", b.opts.Agent, fileSHA256); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("build image: agent %s: %w", b.opts.Agent, ErrAgentNotFound)
		}
		return nil, err
	}
	if b.opts.Kernel != "" {
		if err := add("kernel", b.opts.Kernel, fileSHA256); err != nil {
			return nil, err
		}
		abs, err := filepath.Abs(b.opts.Kernel)
		if err != nil {
			return nil, fmt.Errorf("build image: %w", err)
		}
		in.kernelSource = abs
	} else {
		pkg, err := resolveDebianKernel(ctx, DefaultKernelPackage)
		if err != nil {
			return nil, fmt.Errorf("build image: %w", err)
		}
		in.debPackage = pkg
		in.kernelSource = pkg.Name + "=" + pkg.Version
		in.digests["kernel"] = pkg.SHA256
		if pkg.SHA256 == "" {
			in.digests["kernel"] = in.kernelSource
		}
	}
	if b.opts.Modules != "" {
		if err := add("modules", b.opts.Modules, digestTree); err != nil {
			return nil, err
		}
	}
	if b.opts.RootfsDir != "" {
		if err := add("rootfs", b.opts.RootfsDir, digestTree); err != nil {
			return nil, err
		}
	} else if err := add("busybox", b.opts.Busybox, fileSHA256); err != nil {
		return nil, fmt.Errorf("%w (install Debian's busybox-static, or pass a rootfs directory)", err)
	}
	in.digests["options"] = fmt.Sprintf("builder=%s modules=%s optional_modules=%s rootfs_size=%d",
		builderVersion, strings.Join(b.opts.ModuleNames, ","), strings.Join(b.opts.OptionalModuleNames, ","), b.opts.RootfsSize)
	return in, nil
}

// buildInto writes the bundle's files into staging, using scratch for
// intermediate files.
func (b *builder) buildInto(ctx context.Context, in *inputs, staging, scratch string) (*Manifest, error) {
	k, err := b.loadKernel(ctx, in, scratch)
	if err != nil {
		return nil, err
	}
	m := &Manifest{
		SchemaVersion: ManifestSchemaVersion,
		KernelRelease: k.release,
		KernelSource:  in.kernelSource,
		BootArgs:      bootArgs(),
		Modules:       []string{},
	}
	if k.info.HasPVH {
		m.PVHEntry = fmt.Sprintf("0x%x", k.info.PVHEntry)
	} else {
		b.progress.Warn("the kernel has no PVH entry note: Firecracker can boot it, QEMU microvm cannot")
	}

	if err := b.step(ctx, "write vmlinux"); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(staging, VmlinuxFile), k.vmlinux, 0o644); err != nil {
		return nil, err
	}

	if err := b.step(ctx, "resolve modules"); err != nil {
		return nil, err
	}
	modules, err := b.resolveModules(k, m)
	if err != nil {
		return nil, err
	}

	if err := b.step(ctx, "write initramfs"); err != nil {
		return nil, err
	}
	if err := b.writeInitramfs(staging, k.release, modules); err != nil {
		return nil, err
	}

	if err := b.step(ctx, "write rootfs"); err != nil {
		return nil, err
	}
	if err := b.writeRootfs(ctx, staging, scratch); err != nil {
		return nil, err
	}

	for _, f := range []struct {
		name string
		dst  *FileInfo
	}{{VmlinuxFile, &m.Kernel}, {InitramfsFile, &m.Initramfs}, {RootfsFile, &m.Rootfs}} {
		info, err := describeFile(staging, f.name)
		if err != nil {
			return nil, err
		}
		*f.dst = info
	}
	return m, nil
}

// step reports the start of a step unless ctx is done.
func (b *builder) step(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.progress.Step(name, 0)
	return nil
}

func (b *builder) loadKernel(ctx context.Context, in *inputs, scratch string) (*kernel, error) {
	kernelPath := b.opts.Kernel
	if in.debPackage != nil {
		dl := filepath.Join(scratch, "download")
		if err := os.Mkdir(dl, 0o755); err != nil {
			return nil, err
		}
		b.progress.Step("download "+in.debPackage.Name, in.debPackage.Size)
		b.log.Debug("downloading kernel package", "package", in.debPackage.Name, "version", in.debPackage.Version)
		p, err := downloadDebianPackage(ctx, in.debPackage, dl, b.progress.Advance)
		if err != nil {
			return nil, err
		}
		kernelPath = p
	}
	if err := b.step(ctx, "extract kernel"); err != nil {
		return nil, err
	}
	return loadKernelFile(ctx, kernelPath, scratch)
}

// resolveModules returns the modules to put into the initramfs, in load
// order, and records their names in m.
func (b *builder) resolveModules(k *kernel, m *Manifest) ([]InitramfsModule, error) {
	root := k.moduleRoot
	if b.opts.Modules != "" {
		root = b.opts.Modules
		if base := filepath.Base(filepath.Clean(root)); k.release != "" && base != k.release {
			b.progress.Warn(fmt.Sprintf("module directory %s is named %q but the kernel release is %q; modules built for another kernel fail to load",
				root, base, k.release))
		}
	}
	if root == "" {
		b.progress.Warn("no kernel modules (pass --modules with a lib/modules/<release> tree): the guest has only built-in drivers")
		return nil, nil
	}
	if k.release == "" {
		return nil, fmt.Errorf("kernel release unknown: the image has no version string, so the module directory cannot be named")
	}

	ix, err := LoadModuleIndex(root)
	if err != nil {
		return nil, err
	}
	res, err := ix.Closure(b.opts.ModuleNames, b.opts.OptionalModuleNames)
	if err != nil {
		return nil, err
	}
	modules := make([]InitramfsModule, 0, len(res.Load))
	for _, mod := range res.Load {
		data, err := readModuleFile(filepath.Join(root, filepath.FromSlash(mod.Path)))
		if err != nil {
			return nil, err
		}
		modules = append(modules, InitramfsModule{Path: uncompressedModulePath(mod.Path), Data: data})
		m.Modules = append(m.Modules, mod.Name)
	}
	m.BuiltinModules = res.Builtin
	return modules, nil
}

func (b *builder) writeInitramfs(staging, release string, modules []InitramfsModule) error {
	agent, err := os.ReadFile(b.opts.Agent)
	if err != nil {
		return fmt.Errorf("read agent: %w", err)
	}
	f, err := os.Create(filepath.Join(staging, InitramfsFile))
	if err != nil {
		return err
	}
	err = WriteInitramfs(f, InitramfsContents{Agent: agent, KernelRelease: release, Modules: modules})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (b *builder) writeRootfs(ctx context.Context, staging, scratch string) error {
	src := b.opts.RootfsDir
	if src == "" {
		src = filepath.Join(scratch, "rootfs")
		if err := os.Mkdir(src, 0o755); err != nil {
			return err
		}
		if err := writeDefaultRootfs(ctx, src, b.opts.Busybox); err != nil {
			return err
		}
	}
	size := b.opts.RootfsSize
	if size == 0 {
		var err error
		if size, err = rootfsSize(src); err != nil {
			return err
		}
	}
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	return makeExt4(ctx, src, filepath.Join(staging, RootfsFile), size)
}

// lockBundle takes an exclusive lock on the bundle directory, so that
// concurrent builds of one bundle run one after another and none reads the
// directory between the two renames of replaceDir. The lock is flock(2) on the
// file .<name>.lock next to the directory, which stays in place. It waits
// until the lock is free or ctx ends.
func lockBundle(ctx context.Context, dir string) (unlock func(), err error) {
	p := filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock bundle: %w", err)
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock bundle %s: %w", p, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock bundle %s: %w", p, ctx.Err())
		case <-t.C:
		}
	}
}

// checkReplaceable refuses to replace a directory that is neither missing,
// empty, nor a bundle, so a mistyped --dir cannot delete unrelated files.
func checkReplaceable(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(entries) == 0) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("build image in %s: %w", dir, err)
	}
	if _, err := os.Stat(filepath.Join(dir, ManifestFile)); err != nil {
		return fmt.Errorf("build image in %s: directory is not empty and has no %s, so it is not a bundle: choose another directory", dir, ManifestFile)
	}
	return nil
}

// replaceDir moves staging to dir. An existing dir is first moved to old,
// and moved back when the second rename fails.
func replaceDir(staging, dir, old string) error {
	hadOld := true
	if err := os.Rename(dir, old); err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		hadOld = false
	}
	if err := os.Rename(staging, dir); err != nil {
		if hadOld {
			if rerr := os.Rename(old, dir); rerr != nil {
				return errors.Join(err, fmt.Errorf("restore old bundle from %s: %w", old, rerr))
			}
		}
		return err
	}
	return nil
}

// FindAgent returns the ember-agent binary next to the running executable,
// or else the one found in $PATH.
func FindAgent() (string, error) {
	var tried []string
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "ember-agent")
		if info, err := os.Stat(p); err == nil && info.Mode().IsRegular() {
			return p, nil
		}
		tried = append(tried, p)
	}
	if p, err := exec.LookPath("ember-agent"); err == nil {
		return p, nil
	}
	tried = append(tried, "$PATH")
	return "", fmt.Errorf("find agent: looked in %s (build cmd/ember-agent with CGO_ENABLED=0, or pass --agent): %w",
		strings.Join(tried, " and "), ErrAgentNotFound)
}
