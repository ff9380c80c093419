package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/image"
	"github.com/embervm/ember/provider/qemu"
	"github.com/embervm/ember/vm"
)

type runFlags struct {
	backend string
	bundle  string
	clones  int
	memMiB  int
}

func (a *app) runCommand() *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Boot, snapshot and clone a demo VM end to end, then print timings",
		Long: `Run the whole main job once on the workspace defaults: build or reuse the
guest image, cold-boot a VM, run uname -a and a small workload in it through
the agent, snapshot it, restore clones that each get their own hostname, run
a command in every clone, tear everything down and print a timing table.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error { return a.runDemo(cmd.Context(), f) },
	}
	flags := cmd.Flags()
	addBackendFlag(flags, &f.backend)
	flags.StringVar(&f.bundle, "bundle", "", "guest bundle directory (default: <state_dir>/images/default, built when missing)")
	flags.IntVar(&f.clones, "clones", 3, "number of clones restored from the snapshot")
	flags.IntVar(&f.memMiB, "mem", 0, "guest memory in MiB (default: the configured default)")
	return cmd
}

// demoTimings are the measured durations of one `ember run`.
type demoTimings struct {
	Backend       string          `json:"backend"`
	Accel         string          `json:"accel,omitempty"`
	VMMVersion    string          `json:"vmm_version"`
	ColdBoot      time.Duration   `json:"cold_boot_to_agent_ns"`
	Snapshot      time.Duration   `json:"snapshot_ns"`
	Restores      []time.Duration `json:"restore_to_agent_ns"`
	ExecRoundTrip time.Duration   `json:"exec_round_trip_ns"`
	Uname         string          `json:"uname"`
	Clones        []cloneReport   `json:"clones"`
}

type cloneReport struct {
	ID       string `json:"id"`
	Hostname string `json:"hostname"`
	State    string `json:"state_file"`
}

// demoRun tracks what the demo created so every exit path removes it.
type demoRun struct {
	a        *app
	p        vm.Provider
	vms      []string
	snapshot *vm.SnapshotInfo
}

func (a *app) runDemo(ctx context.Context, f runFlags) (err error) {
	l, err := a.config()
	if err != nil {
		return err
	}
	cfg := l.Config
	backend, err := backendName(f.backend, cfg)
	if err != nil {
		return err
	}
	if f.clones < 1 || f.clones > 16 {
		return usageError{fmt.Errorf("--clones %d is invalid, must be 1–16", f.clones)}
	}

	dir := f.bundle
	var manifest *image.Manifest
	if dir == "" {
		dir = defaultBundleDir(cfg)
		a.progressf("image: building or reusing the guest bundle in %s\n", dir)
		agentBin, err := image.FindAgent()
		if err != nil {
			return err
		}
		res, err := image.Build(ctx, image.Options{Dir: dir, StateDir: cfg.StateDir, Agent: agentBin, Progress: a.newProgress()})
		if err != nil {
			return err
		}
		manifest = res.Manifest
	} else if manifest, err = image.VerifyBundle(dir); err != nil {
		return err
	}

	log := a.logger()
	p, err := newProvider(ctx, backend, cfg, log)
	if err != nil {
		return err
	}
	dialer, ok := p.(vm.AgentDialer)
	if !ok {
		return fmt.Errorf("backend %s cannot reach the guest agent", backend)
	}
	d := &demoRun{a: a, p: p}
	defer func() { err = errors.Join(err, d.teardown()) }()

	t := demoTimings{Backend: backend}
	if v, ok := p.(vm.VersionReporter); ok {
		t.VMMVersion, _ = v.VMMVersion(ctx)
	}

	spec := vm.Spec{}
	if f.memMiB != 0 {
		spec.MemSizeMiB = &f.memMiB
	}
	suffix := fmt.Sprintf("%04x", rand.IntN(1<<16))
	source := "demo-" + suffix
	vmCfg, err := vm.Resolve(source, nameGuest(bundleDefaults(cfg, dir, manifest), source), spec)
	if err != nil {
		return err
	}

	a.progressf("vm %s: cold boot\n", source)
	start := time.Now()
	if _, err := p.Create(ctx, vmCfg); err != nil {
		return err
	}
	d.vms = append(d.vms, source)
	if err := p.Start(ctx, source); err != nil {
		return err
	}
	client, err := connectAgent(ctx, dialer, source, 3*time.Minute)
	if err != nil {
		return err
	}
	t.ColdBoot = time.Since(start)
	if q, ok := p.(*qemu.Provider); ok {
		t.Accel = string(q.Accel())
	}

	uname, err := execOutput(ctx, client, "uname", "-a")
	if err != nil {
		client.Close()
		return err
	}
	t.Uname = strings.TrimSpace(uname)
	a.progressf("vm %s: %s\n", source, t.Uname)
	workload := `i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo "counted to $i before the snapshot" > /tmp/ember-demo; cat /tmp/ember-demo`
	out, err := execOutput(ctx, client, "sh", "-c", workload)
	client.Close()
	if err != nil {
		return err
	}
	a.progressf("vm %s: %s", source, out)

	if err := p.Pause(ctx, source); err != nil {
		return err
	}
	start = time.Now()
	snap, err := p.Snapshot(ctx, source, vm.SnapshotOptions{ID: "demo"})
	if err != nil {
		return err
	}
	t.Snapshot = time.Since(start)
	d.snapshot = &snap
	a.progressf("vm %s: snapshot %s taken\n", source, snap.ID)

	for i := range f.clones {
		id := fmt.Sprintf("clone-%s-%d", suffix, i+1)
		report, restore, err := d.restoreClone(ctx, dialer, id, snap)
		if err != nil {
			return err
		}
		t.Restores = append(t.Restores, restore)
		t.Clones = append(t.Clones, report)
		a.progressf("vm %s: hostname %s, %s\n", id, report.Hostname, report.State)
	}

	client, err = connectAgent(ctx, dialer, d.vms[len(d.vms)-1], time.Minute)
	if err != nil {
		return err
	}
	t.ExecRoundTrip, err = medianExec(ctx, client, 9)
	client.Close()
	if err != nil {
		return err
	}
	return a.printDemo(t)
}

// restoreClone restores snap as VM id, gives it its own hostname and reads
// the hostname and the file the workload wrote back through the agent.
func (d *demoRun) restoreClone(ctx context.Context, dialer vm.AgentDialer, id string, snap vm.SnapshotInfo) (cloneReport, time.Duration, error) {
	start := time.Now()
	cfg := vm.Config{ID: id, RestoreFrom: &vm.SnapshotRef{VMID: snap.VMID, SnapshotID: snap.ID, ResumeImmediately: true}}
	if _, err := d.p.Create(ctx, cfg); err != nil {
		return cloneReport{}, 0, err
	}
	d.vms = append(d.vms, id)
	client, err := connectAgent(ctx, dialer, id, time.Minute)
	if err != nil {
		return cloneReport{}, 0, err
	}
	elapsed := time.Since(start)
	defer client.Close()

	if err := client.SyncClock(ctx, time.Now()); err != nil {
		return cloneReport{}, 0, fmt.Errorf("vm %s: %w", id, err)
	}
	if err := client.SetHostname(ctx, id); err != nil {
		return cloneReport{}, 0, fmt.Errorf("vm %s: %w", id, err)
	}
	out, err := execOutput(ctx, client, "sh", "-c", "hostname; cat /tmp/ember-demo")
	if err != nil {
		return cloneReport{}, 0, fmt.Errorf("vm %s: %w", id, err)
	}
	lines := strings.SplitN(strings.TrimSpace(out), "\n", 2)
	if len(lines) != 2 || lines[0] != id {
		return cloneReport{}, 0, fmt.Errorf("vm %s returned %q, expected its own hostname and the workload's file", id, out)
	}
	return cloneReport{ID: id, Hostname: lines[0], State: lines[1]}, elapsed, nil
}

// teardown destroys every VM the demo made and deletes its snapshot, on a
// context of its own so an interrupted run still cleans up.
func (d *demoRun) teardown() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var errs []error
	for _, id := range slices.Backward(d.vms) {
		if err := d.p.Destroy(ctx, id); err != nil && !errors.Is(err, vm.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if d.snapshot != nil {
		if del, ok := d.p.(vm.SnapshotDeleter); ok {
			if err := del.DeleteSnapshot(ctx, d.snapshot.VMID, d.snapshot.ID); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(d.vms) > 0 {
		d.a.progressf("teardown: destroyed %d VMs\n", len(d.vms))
	}
	return errors.Join(errs...)
}

// connectAgent dials the agent of VM id, retrying while the guest boots,
// and checks its health.
func connectAgent(ctx context.Context, dialer vm.AgentDialer, id string, timeout time.Duration) (*agent.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	dial := func(ctx context.Context) (net.Conn, error) { return dialer.DialAgent(ctx, id) }
	c, err := agent.Dial(ctx, dial, nil)
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", id, err)
	}
	if _, err := c.Health(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("vm %s: agent health: %w", id, err)
	}
	return c, nil
}

// execOutput runs argv in the guest and returns its standard output; a
// non-zero exit is an error that includes standard error.
func execOutput(ctx context.Context, c *agent.Client, argv ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	res, err := c.Exec(ctx, agent.ExecRequest{Argv: argv, Timeout: time.Minute}, agent.ExecIO{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return "", fmt.Errorf("exec %q: %w", argv, err)
	}
	if res.ExitCode != 0 {
		return "", fmt.Errorf("exec %q: exit code %d: %s", argv, res.ExitCode, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// medianExec times n runs of `true` in the guest and returns the median.
func medianExec(ctx context.Context, c *agent.Client, n int) (time.Duration, error) {
	samples := make([]time.Duration, 0, n)
	for range n {
		start := time.Now()
		if _, err := execOutput(ctx, c, "true"); err != nil {
			return 0, err
		}
		samples = append(samples, time.Since(start))
	}
	slices.Sort(samples)
	return samples[n/2], nil
}

func (a *app) printDemo(t demoTimings) error {
	if a.jsonOutput() {
		return a.writeJSON(t)
	}
	fmt.Fprintf(a.stdout, "\n%s %s", t.Backend, t.VMMVersion)
	if t.Accel != "" {
		fmt.Fprintf(a.stdout, " (accelerator %s)", t.Accel)
	}
	fmt.Fprintln(a.stdout)
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tTIME")
	fmt.Fprintf(tw, "cold boot → agent ready\t%s\n", roundDuration(t.ColdBoot))
	fmt.Fprintf(tw, "snapshot (paused, full)\t%s\n", roundDuration(t.Snapshot))
	for i, r := range t.Restores {
		fmt.Fprintf(tw, "restore clone %d → agent ready\t%s\n", i+1, roundDuration(r))
	}
	fmt.Fprintf(tw, "exec round trip (median of 9)\t%s\n", roundDuration(t.ExecRoundTrip))
	return tw.Flush()
}

func roundDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(time.Microsecond).String()
}
