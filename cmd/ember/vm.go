package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/image"
	"github.com/embervm/ember/pool"
	"github.com/embervm/ember/snapshot"
	"github.com/embervm/ember/vm"
)

// vmFlags are the flags every `ember vm` command shares.
type vmFlags struct {
	backend string
}

// specFlags are the per-VM overrides of `ember vm create`.
type specFlags struct {
	spec      string
	kernel    string
	initrd    string
	rootfs    string
	rootfsRO  bool
	vcpus     int
	mem       int
	bootArgs  string
	dirty     bool
	netns     string
	nics      []string
	bundleDir string
}

func (a *app) vmCommand() *cobra.Command {
	var f vmFlags
	cmd := group(&cobra.Command{
		Use:   "vm",
		Short: "Create, control, snapshot and restore single VMs",
		Long: `Create, control, snapshot and restore single VMs. VMs keep running between
ember invocations on backends that support it (qemu); their run-time files
live under <run_dir>/<backend>.`,
	})
	addBackendFlag(cmd.PersistentFlags(), &f.backend)

	simple := func(use, short string, op func(vm.Provider, context.Context, string) error, done string) *cobra.Command {
		return &cobra.Command{
			Use:   use + " ID",
			Short: short,
			Args:  exactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return a.withProvider(cmd.Context(), f, func(p vm.Provider) error {
					if err := op(p, cmd.Context(), args[0]); err != nil {
						return err
					}
					return a.printVM(cmd.Context(), p, args[0], done)
				})
			},
		}
	}
	var grace time.Duration
	shutdown := simple("shutdown", "Ask the guest to power off, then stop the VMM after --grace", func(p vm.Provider, ctx context.Context, id string) error {
		return p.Shutdown(ctx, id, grace)
	}, "shut down")
	shutdown.Flags().DurationVar(&grace, "grace", 10*time.Second, "how long the guest gets to power off before the VMM is stopped")

	cmd.AddCommand(
		a.vmCreateCommand(&f),
		simple("start", "Boot a created VM", vm.Provider.Start, "started"),
		simple("pause", "Pause a running VM", vm.Provider.Pause, "paused"),
		a.vmResumeCommand(&f),
		shutdown,
		a.vmSnapshotCommand(&f),
		a.vmRestoreCommand(&f),
		a.vmRenameCommand(&f),
		a.vmRemoveCommand(&f),
		a.vmListCommand(&f),
		a.vmInspectCommand(&f),
		a.vmConsoleCommand(&f),
		a.vmExecCommand(&f),
	)
	return cmd
}

// withProvider builds the backend's provider, which adopts the VMs earlier
// invocations left running, runs fn and detaches again so the VMs keep
// running after ember exits.
func (a *app) withProvider(ctx context.Context, f vmFlags, fn func(vm.Provider) error) error {
	l, err := a.config()
	if err != nil {
		return err
	}
	backend, err := backendName(f.backend, l.Config)
	if err != nil {
		return err
	}
	p, err := newProvider(ctx, backend, l.Config, a.logger())
	if err != nil {
		return err
	}
	d, persistent := p.(vm.Detacher)
	if !persistent {
		return fmt.Errorf("backend %s cannot keep VMs running between ember invocations; use ember run or the Go library", backend)
	}
	return errors.Join(fn(p), d.Close())
}

func (a *app) vmCreateCommand(f *vmFlags) *cobra.Command {
	var s specFlags
	cmd := &cobra.Command{
		Use:   "create ID",
		Short: "Create a VM from the workspace defaults, a spec file and override flags",
		Long: `Create a VM from the workspace defaults, then a spec file (--spec), then the
override flags, each overriding the one before. The VM is configured but
does not run until 'ember vm start'. Without a kernel in the configuration,
the default guest bundle (ember image build) provides kernel, initramfs and
a read-only root filesystem, and its agent sets the guest's host name to
the VM id.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := a.resolveCreate(cmd, args[0], s)
			if err != nil {
				return err
			}
			return a.withProvider(cmd.Context(), *f, func(p vm.Provider) error {
				if _, err := p.Create(cmd.Context(), cfg); err != nil {
					return err
				}
				return a.printVM(cmd.Context(), p, cfg.ID, "created")
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&s.spec, "spec", "", "VM spec file (JSON or YAML); see docs/configuration.md")
	fl.StringVar(&s.kernel, "kernel", "", "kernel: an uncompressed vmlinux")
	fl.StringVar(&s.initrd, "initrd", "", "initramfs")
	fl.StringVar(&s.rootfs, "rootfs", "", "root filesystem image")
	fl.BoolVar(&s.rootfsRO, "rootfs-read-only", false, "attach the root filesystem read-only")
	fl.IntVar(&s.vcpus, "vcpus", 0, "vCPU count, 1–32")
	fl.IntVar(&s.mem, "mem", 0, "memory in MiB")
	fl.StringVar(&s.bootArgs, "boot-args", "", "kernel command line (replaces the default)")
	fl.BoolVar(&s.dirty, "track-dirty-pages", true, "enable dirty-page tracking (needed for diff snapshots)")
	fl.StringVar(&s.netns, "netns", "", "network namespace path the VMM runs in, such as /run/netns/NAME")
	fl.StringArrayVar(&s.nics, "nic", nil, "network interface IFACE=TAP[,mac=MAC] (repeatable)")
	fl.StringVar(&s.bundleDir, "bundle", "", "guest bundle providing defaults (default: <state_dir>/images/default when it exists)")
	return cmd
}

// resolveCreate merges defaults, the spec file and the flags that were set.
func (a *app) resolveCreate(cmd *cobra.Command, id string, s specFlags) (vm.Config, error) {
	l, err := a.config()
	if err != nil {
		return vm.Config{}, err
	}
	defaults := l.Config.VMDefaults()
	bundle := s.bundleDir
	if bundle == "" && defaults.Kernel == "" {
		bundle = defaultBundleDir(l.Config)
	}
	if bundle != "" {
		m, err := image.ReadManifest(bundle)
		if err != nil {
			return vm.Config{}, fmt.Errorf("guest bundle: %w (build one with 'ember image build' or set defaults.kernel)", err)
		}
		defaults = nameGuest(bundleDefaults(l.Config, bundle, m), id)
	}

	var spec vm.Spec
	if s.spec != "" {
		if spec, err = loadSpec(s.spec); err != nil {
			return vm.Config{}, a.reportSpec(s.spec, err)
		}
	}
	changed := cmd.Flags().Changed
	set := func(name string, dst **string, v string) {
		if changed(name) {
			*dst = &v
		}
	}
	set("kernel", &spec.Kernel, absPath(s.kernel))
	set("initrd", &spec.Initrd, absPath(s.initrd))
	set("rootfs", &spec.Rootfs, absPath(s.rootfs))
	set("boot-args", &spec.BootArgs, s.bootArgs)
	set("netns", &spec.NetNS, s.netns)
	if changed("rootfs-read-only") {
		spec.RootfsReadOnly = &s.rootfsRO
	}
	if changed("vcpus") {
		spec.VCPUCount = &s.vcpus
	}
	if changed("mem") {
		spec.MemSizeMiB = &s.mem
	}
	if changed("track-dirty-pages") {
		spec.TrackDirtyPages = &s.dirty
	}
	for _, n := range s.nics {
		nic, err := parseNIC(n)
		if err != nil {
			return vm.Config{}, usageError{err}
		}
		spec.NetworkInterfaces = append(spec.NetworkInterfaces, nic)
	}
	return vm.Resolve(id, defaults, spec)
}

// parseNIC parses IFACE=TAP[,mac=MAC].
func parseNIC(s string) (vm.NetworkInterface, error) {
	head, opts, _ := strings.Cut(s, ",")
	iface, tap, ok := strings.Cut(head, "=")
	if !ok || iface == "" || tap == "" {
		return vm.NetworkInterface{}, fmt.Errorf("--nic %q is invalid, use IFACE=TAP[,mac=MAC]", s)
	}
	nic := vm.NetworkInterface{IfaceID: iface, HostDevName: tap}
	if opts != "" {
		k, v, ok := strings.Cut(opts, "=")
		if !ok || k != "mac" {
			return vm.NetworkInterface{}, fmt.Errorf("--nic %q: unknown option %q, only mac=MAC is accepted", s, opts)
		}
		nic.GuestMAC = v
	}
	return nic, nil
}

func absPath(p string) string {
	if p == "" {
		return p
	}
	if abs, err := os.Getwd(); err == nil && !strings.HasPrefix(p, "/") {
		return abs + "/" + p
	}
	return p
}

func (a *app) vmSnapshotCommand(f *vmFlags) *cobra.Command {
	var diff, leavePaused bool
	var sync guestSync
	cmd := &cobra.Command{
		Use:   "snapshot ID SNAPSHOT-ID",
		Short: "Pause a VM, snapshot it and record the snapshot in the store",
		Args:  exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			return a.withProvider(ctx, *f, func(p vm.Provider) error {
				info, err := p.Get(ctx, args[0])
				if err != nil {
					return err
				}
				paused := false
				if info.State == vm.StateRunning {
					if err := p.Pause(ctx, args[0]); err != nil {
						return err
					}
					paused = true
				}
				// A VM this command paused runs again on every path, and
				// stays paused only after a snapshot with --leave-paused.
				resume := func() error {
					if err := p.Resume(ctx, args[0]); err != nil {
						return err
					}
					a.syncGuest(ctx, p, args[0], "", sync)
					return nil
				}
				opts := vm.SnapshotOptions{ID: args[1], Type: vm.SnapshotFull}
				if diff {
					opts.Type = vm.SnapshotDiff
				}
				snap, err := p.Snapshot(ctx, args[0], opts)
				if err != nil {
					if paused {
						err = errors.Join(err, resume())
					}
					return err
				}
				m, err := a.recordSnapshot(ctx, p, snap, info.Config)
				if paused && !leavePaused {
					if rerr := resume(); rerr != nil {
						return errors.Join(err, rerr)
					}
				}
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.writeJSON(m)
				}
				fmt.Fprintf(a.stdout, "snapshot %s/%s taken (%s, %s %s)\n", m.VMID, m.ID, m.Type, m.Backend, m.VMMVersion)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&diff, "diff", false, "take a diff snapshot of the pages written since the previous snapshot")
	cmd.Flags().BoolVar(&leavePaused, "leave-paused", false, "keep a running VM paused after the snapshot")
	sync.addFlags(cmd, "after resuming, set the guest clock through the guest agent")
	return cmd
}

// recordSnapshot records a provider's snapshot in the snapshot store.
func (a *app) recordSnapshot(ctx context.Context, p vm.Provider, snap vm.SnapshotInfo, cfg vm.Config) (snapshot.Manifest, error) {
	version := snap.VMMVersion
	if v, ok := p.(vm.VersionReporter); ok && version == "" {
		version, _ = v.VMMVersion(ctx)
	}
	var m snapshot.Manifest
	err := a.withStore(func(s *snapshot.Store) error {
		var err error
		m, err = s.Record(ctx, snap, version, snapshot.Inputs{Kernel: cfg.Kernel, Rootfs: cfg.Rootfs})
		return err
	})
	return m, err
}

func (a *app) vmRestoreCommand(f *vmFlags) *cobra.Command {
	var resume bool
	var overrides []string
	var vsock string
	var sync guestSync
	cmd := &cobra.Command{
		Use:   "restore VM/SNAPSHOT NEW-ID",
		Short: "Restore a snapshot into a new VM, checking compatibility first",
		Args:  exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			srcVM, snapID, err := parseSnapshotRef(args[0])
			if err != nil {
				return err
			}
			ref := &vm.SnapshotRef{VMID: srcVM, SnapshotID: snapID, ResumeImmediately: resume}
			for _, o := range overrides {
				iface, tap, ok := strings.Cut(o, "=")
				if !ok {
					return usageError{fmt.Errorf("--tap %q is invalid, use IFACE=TAP", o)}
				}
				ref.NetworkOverrides = append(ref.NetworkOverrides, vm.NetworkOverride{IfaceID: iface, HostDevName: tap})
			}
			if vsock != "" {
				ref.VsockOverride = &vm.VsockOverride{UDSPath: absPath(vsock)}
			}
			cfg, err := vm.Resolve(args[1], vm.Defaults{}, vm.Spec{RestoreFrom: ref})
			if err != nil {
				return err
			}
			return a.withProvider(ctx, *f, func(p vm.Provider) error {
				if err := a.checkRestore(ctx, p, srcVM, snapID); err != nil {
					return err
				}
				if _, err := p.Create(ctx, cfg); err != nil {
					return err
				}
				if resume {
					a.syncGuest(ctx, p, cfg.ID, guestHostname(cfg.ID), sync)
				}
				return a.printVM(ctx, p, cfg.ID, "restored")
			})
		},
	}
	cmd.Flags().BoolVar(&resume, "resume", false, "resume the restored VM at once instead of leaving it paused")
	cmd.Flags().StringArrayVar(&overrides, "tap", nil, "network override IFACE=TAP (repeatable)")
	cmd.Flags().StringVar(&vsock, "vsock", "", "new host socket path for the snapshot's vsock device")
	sync.addFlags(cmd, "with --resume, set the guest clock and the hostname (NEW-ID) through the guest agent")
	return cmd
}

func (a *app) vmResumeCommand(f *vmFlags) *cobra.Command {
	var sync guestSync
	cmd := &cobra.Command{
		Use:   "resume ID",
		Short: "Resume a paused VM and set its clock through the guest agent",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			return a.withProvider(ctx, *f, func(p vm.Provider) error {
				if err := p.Resume(ctx, args[0]); err != nil {
					return err
				}
				a.syncGuest(ctx, p, args[0], "", sync)
				return a.printVM(ctx, p, args[0], "resumed")
			})
		},
	}
	sync.addFlags(cmd, "set the guest clock through the guest agent, which a pause leaves behind")
	return cmd
}

// guestSync is the set of flags of the commands that let a guest run
// again after it was stopped in time. A guest's clock does not move while its VM is
// paused, and a restored guest's clock starts at the snapshot's time.
type guestSync struct {
	enabled bool
	timeout time.Duration
}

func (g *guestSync) addFlags(cmd *cobra.Command, usage string) {
	cmd.Flags().BoolVar(&g.enabled, "sync-clock", true, usage)
	cmd.Flags().DurationVar(&g.timeout, "agent-timeout", 30*time.Second, "how long to wait for the guest agent with --sync-clock")
}

// syncGuest sets the clock of running VM id, and its hostname when not
// empty, through the guest agent. A failure is a warning on stderr: the VM
// runs and only its clock or hostname is off, so the command still
// succeeds.
func (a *app) syncGuest(ctx context.Context, p vm.Provider, id, hostname string, g guestSync) {
	if !g.enabled {
		return
	}
	dialer, ok := p.(vm.AgentDialer)
	if !ok {
		fmt.Fprintf(a.stderr, "ember: warning: backend %s cannot reach the guest agent, so the clock of %s was not set\n", p.Backend(), id)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	err := pool.AgentGuest{Dialer: dialer}.Personalize(ctx, id, pool.Personalization{Clock: time.Now(), Hostname: hostname})
	if err != nil {
		fmt.Fprintf(a.stderr, "ember: warning: %s runs, but its clock was not set: %v (for a guest without Ember's agent, pass --sync-clock=false)\n", id, err)
	}
}

// checkRestore verifies, when the store has a manifest for the snapshot,
// that the running backend can load it and its files are intact.
func (a *app) checkRestore(ctx context.Context, p vm.Provider, vmID, id string) error {
	target := snapshot.Target{Backend: p.Backend()}
	if v, ok := p.(vm.VersionReporter); ok {
		target.VMMVersion, _ = v.VMMVersion(ctx)
	}
	return a.withStore(func(s *snapshot.Store) error {
		_, err := s.Check(ctx, vmID, id, target)
		if errors.Is(err, vm.ErrSnapshotNotFound) {
			// Not recorded in the store: the provider checks its own files.
			return nil
		}
		return err
	})
}

func (a *app) vmRenameCommand(f *vmFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "rename ID NEW-ID",
		Short: "Rename a VM without disturbing the guest",
		Args:  exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withProvider(cmd.Context(), *f, func(p vm.Provider) error {
				if err := p.Rename(cmd.Context(), args[0], args[1]); err != nil {
					return err
				}
				return a.printVM(cmd.Context(), p, args[1], "renamed")
			})
		},
	}
}

func (a *app) vmRemoveCommand(f *vmFlags) *cobra.Command {
	var withSnapshots bool
	cmd := &cobra.Command{
		Use:   "rm ID...",
		Short: "Destroy VMs: stop the VMM and remove run-time files (snapshots stay unless --with-snapshots)",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{errors.New("rm needs at least one VM id")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withProvider(cmd.Context(), *f, func(p vm.Provider) error {
				var errs []error
				for _, id := range args {
					if err := p.Destroy(cmd.Context(), id); err != nil {
						errs = append(errs, err)
						continue
					}
					if !a.jsonOutput() {
						fmt.Fprintf(a.stdout, "%s destroyed\n", id)
					}
					if withSnapshots {
						errs = append(errs, a.deleteSnapshotsOf(cmd.Context(), p, id))
					}
				}
				return errors.Join(errs...)
			})
		},
	}
	cmd.Flags().BoolVar(&withSnapshots, "with-snapshots", false, "also delete the VM's snapshots, newest first")
	return cmd
}

// deleteSnapshotsOf deletes every snapshot of VM id, newest first so that
// diff snapshots go before their parents: the store's manifests and the
// provider's files.
func (a *app) deleteSnapshotsOf(ctx context.Context, p vm.Provider, id string) error {
	var errs []error
	errs = append(errs, a.withStore(func(s *snapshot.Store) error {
		list, err := s.List(id)
		if err != nil {
			return err
		}
		var errs []error
		for _, m := range slices.Backward(list) {
			errs = append(errs, s.Delete(m.VMID, m.ID))
		}
		return errors.Join(errs...)
	}))
	if del, ok := p.(vm.SnapshotDeleter); ok {
		snaps, err := p.ListSnapshots(ctx, id)
		errs = append(errs, err)
		slices.SortFunc(snaps, func(x, y vm.SnapshotInfo) int { return y.CreatedAt.Compare(x.CreatedAt) })
		for _, s := range snaps {
			if err := del.DeleteSnapshot(ctx, s.VMID, s.ID); err != nil && !errors.Is(err, vm.ErrSnapshotNotFound) {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete snapshots of %s: %w", id, err)
	}
	if !a.jsonOutput() {
		fmt.Fprintf(a.stdout, "%s: snapshots deleted\n", id)
	}
	return nil
}

func (a *app) vmListCommand(f *vmFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List VMs",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withProvider(cmd.Context(), *f, func(p vm.Provider) error {
				infos, err := p.List(cmd.Context())
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.writeJSON(infos)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tSTATE\tBACKEND\tSHAPE\tPID\tCREATED")
				for _, i := range infos {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%dc/%dMiB\t%d\t%s\n", i.ID, i.State, i.Backend,
						i.Config.VCPUCount, i.Config.MemSizeMiB, i.PID, i.CreatedAt.Local().Format(time.DateTime))
				}
				return tw.Flush()
			})
		},
	}
}

func (a *app) vmInspectCommand(f *vmFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect ID",
		Short: "Print a VM's state and full configuration as JSON",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withProvider(cmd.Context(), *f, func(p vm.Provider) error {
				info, err := p.Get(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				return a.writeJSON(info)
			})
		},
	}
}

func (a *app) vmConsoleCommand(f *vmFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "console ID",
		Short: "Print the recent serial console output of a VM",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withProvider(cmd.Context(), *f, func(p vm.Provider) error {
				c, ok := p.(vm.ConsoleReader)
				if !ok {
					return fmt.Errorf("backend %s does not capture the console", p.Backend())
				}
				out, err := c.Console(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				_, err = a.stdout.Write(out)
				return err
			})
		},
	}
}

func (a *app) vmExecCommand(f *vmFlags) *cobra.Command {
	var timeout time.Duration
	var env []string
	cmd := &cobra.Command{
		Use:   "exec ID -- COMMAND [ARG...]",
		Short: "Run a command in the guest through the agent; exits with its status",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageError{errors.New("exec needs a VM id and a command")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			return a.withProvider(ctx, *f, func(p vm.Provider) error {
				dialer, ok := p.(vm.AgentDialer)
				if !ok {
					return fmt.Errorf("backend %s cannot reach the guest agent", p.Backend())
				}
				// Fail at once on a VM that does not exist or does not run;
				// the agent dial below waits for a guest that is booting.
				info, err := p.Get(ctx, args[0])
				if err != nil {
					return err
				}
				if info.State != vm.StateRunning {
					return fmt.Errorf("exec in vm %q: the vm is %s, start or resume it first", args[0], info.State)
				}
				c, err := connectAgent(ctx, dialer, args[0], time.Minute)
				if err != nil {
					return err
				}
				defer c.Close()
				res, err := c.Exec(ctx, agent.ExecRequest{Argv: args[1:], Env: env, Timeout: timeout},
					agent.ExecIO{Stdout: a.stdout, Stderr: a.stderr})
				if err != nil {
					return err
				}
				if res.ExitCode != 0 {
					return exitStatus{code: res.ExitCode, signal: res.Signal}
				}
				return nil
			})
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "kill the command after this long (0: no limit)")
	cmd.Flags().StringArrayVar(&env, "env", nil, "environment variable KEY=VALUE (repeatable)")
	return cmd
}

// exitStatus carries a guest command's non-zero exit to ember's own.
type exitStatus struct {
	code   int
	signal string
}

func (e exitStatus) Error() string {
	if e.signal != "" {
		return "command ended by signal " + e.signal
	}
	return fmt.Sprintf("command exited with status %d", e.code)
}

// printVM reports a VM after an operation: its id and state, or the full
// info as JSON.
func (a *app) printVM(ctx context.Context, p vm.Provider, id, done string) error {
	info, err := p.Get(ctx, id)
	if err != nil {
		return err
	}
	if a.jsonOutput() {
		return a.writeJSON(info)
	}
	fmt.Fprintf(a.stdout, "%s %s (state %s)\n", id, done, info.State)
	return nil
}
