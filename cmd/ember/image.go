package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/embervm/ember/image"
)

// newImageCommand returns `ember image` and its subcommands.
func newImageCommand(a *app) *cobra.Command {
	cmd := group(&cobra.Command{
		Use:   "image",
		Short: "Build guest images: kernel, initramfs with the agent, root filesystem",
	})
	cmd.AddCommand(newImageBuildCommand(a))
	return cmd
}

type imageBuildFlags struct {
	dir       string
	kernel    string
	modules   string
	rootfsDir string
	agent     string
	force     bool
}

func newImageBuildCommand(a *app) *cobra.Command {
	var f imageBuildFlags
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Build a guest bundle (vmlinux, initramfs, rootfs.ext4, manifest.json)",
		Long: `Build a guest bundle: an uncompressed vmlinux, an initramfs with ember-agent
as /init and the kernel modules the guest needs, an ext4 root filesystem, and
manifest.json with sizes, SHA-256 digests and recommended kernel command lines.

By default the kernel is Debian's current linux-image-cloud-amd64, fetched
with apt-get download, and the root filesystem is a busybox tree. Rebuilding
with unchanged inputs does nothing and prints where the bundle is.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.runImageBuild(cmd, f)
		},
	}
	flags := cmd.Flags()
	flags.StringVar(&f.dir, "dir", "", "bundle directory (default: <state_dir>/images/default)")
	flags.StringVar(&f.kernel, "kernel", "", "kernel: a vmlinux, a bzImage/vmlinuz or a Debian kernel .deb (default: apt-get download of "+image.DefaultKernelPackage+")")
	flags.StringVar(&f.modules, "modules", "", "lib/modules/<release> directory to take modules from (needed with a bare vmlinux or bzImage)")
	flags.StringVar(&f.rootfsDir, "rootfs-dir", "", "directory to copy into the root filesystem (default: a busybox tree from "+image.DefaultBusybox+")")
	flags.StringVar(&f.agent, "agent", "", "static ember-agent binary (default: ember-agent next to this executable, then $PATH)")
	flags.BoolVar(&f.force, "force", false, "rebuild even when the inputs are unchanged")
	return cmd
}

// imageBuildReport is the JSON output of `ember image build`.
type imageBuildReport struct {
	Dir      string          `json:"dir"`
	Cached   bool            `json:"cached"`
	Manifest *image.Manifest `json:"manifest"`
}

func (a *app) runImageBuild(cmd *cobra.Command, f imageBuildFlags) error {
	cfg, err := a.config()
	if err != nil {
		return err
	}
	agent := f.agent
	if agent == "" {
		if agent, err = image.FindAgent(); err != nil {
			return err
		}
	}

	progress := a.newProgress()
	res, err := image.Build(cmd.Context(), image.Options{
		Dir:       f.dir,
		StateDir:  cfg.Config.StateDir,
		Kernel:    f.kernel,
		Modules:   f.modules,
		RootfsDir: f.rootfsDir,
		Agent:     agent,
		Force:     f.force,
		Progress:  progress,
	})
	progress.finish()
	if err != nil {
		return err
	}

	if a.jsonOutput() {
		return a.writeJSON(imageBuildReport{Dir: res.Dir, Cached: res.Cached, Manifest: res.Manifest})
	}
	m := res.Manifest
	if res.Cached {
		fmt.Fprintf(a.stdout, "bundle %s is up to date\n", res.Dir)
	} else {
		fmt.Fprintf(a.stdout, "built bundle %s\n", res.Dir)
	}
	fmt.Fprintf(a.stdout, "kernel    %s (%s)\n", m.KernelRelease, m.KernelSource)
	for _, file := range m.Files() {
		fmt.Fprintf(a.stdout, "%-18s %10d bytes  sha256 %s\n", file.Name, file.Size, file.SHA256)
	}
	if len(m.Modules) > 0 {
		fmt.Fprintf(a.stdout, "modules   %s\n", strings.Join(m.Modules, " "))
	}
	for _, mode := range []string{image.ModeInitramfs, image.ModeSwitchRoot} {
		fmt.Fprintf(a.stdout, "boot args (%s): %s\n", mode, m.BootArgs[mode])
	}
	return nil
}

// buildProgress shows build progress: one updating line when stdout is a
// terminal and the output is text, else one line per step on stderr.
// Warnings always go to stderr.
type buildProgress struct {
	out    io.Writer
	warn   io.Writer
	tty    bool
	quiet  bool
	step   string
	total  int64
	drawn  bool
	lastPC int64
}

func (a *app) newProgress() *buildProgress {
	p := &buildProgress{out: a.stderr, warn: a.stderr}
	if f, ok := a.stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) && !a.jsonOutput() {
		p.out = a.stdout
		p.tty = true
	}
	// JSON output stays machine-readable: steps are not printed at all.
	p.quiet = a.jsonOutput()
	return p
}

func (p *buildProgress) Step(name string, total int64) {
	p.step, p.total, p.lastPC = name, total, -1
	switch {
	case p.quiet:
	case p.tty:
		p.draw(name + "...")
	default:
		fmt.Fprintf(p.out, "image: %s\n", name)
	}
}

func (p *buildProgress) Advance(done int64) {
	if p.quiet || p.total <= 0 {
		return
	}
	pc := min(done*100/p.total, 100)
	if pc == p.lastPC {
		return
	}
	p.lastPC = pc
	if p.tty {
		p.draw(fmt.Sprintf("%s %3d%% (%.1f of %.1f MiB)", p.step, pc, float64(done)/(1<<20), float64(p.total)/(1<<20)))
		return
	}
	// A line per quarter keeps logs short.
	if pc%25 == 0 {
		fmt.Fprintf(p.out, "image: %s %d%%\n", p.step, pc)
	}
}

func (p *buildProgress) Warn(msg string) {
	if p.drawn {
		fmt.Fprint(p.out, "\r\033[K")
		p.drawn = false
	}
	fmt.Fprintf(p.warn, "warning: %s\n", msg)
}

// draw replaces the terminal's current line with s.
func (p *buildProgress) draw(s string) {
	fmt.Fprintf(p.out, "\r\033[K%s", s)
	p.drawn = true
}

// finish clears the progress line before the result is printed.
func (p *buildProgress) finish() {
	if p.drawn {
		fmt.Fprint(p.out, "\r\033[K")
		p.drawn = false
	}
}
