package qemu

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/image"
	"github.com/embervm/ember/vm"
)

// The tests in this file boot the bundle's own initramfs, whose /init is
// the Ember guest agent, and drive it with the agent's host client over
// the provider's DialAgent. They need a bundle built for the agent: its
// initramfs runs ember-agent as PID 1 and lists its kernel modules in
// /etc/ember/modules. The guest runs "uname" and "true" from PATH, which
// the initramfs provides, or the root file system when
// EMBER_TEST_AGENT_BOOT_ARGS selects ember.mode=switchroot.
const agentBootArgsEnv = "EMBER_TEST_AGENT_BOOT_ARGS"

// agentConfig returns a cold-boot configuration of the bundle's own guest.
// With ember.mode=switchroot in EMBER_TEST_AGENT_BOOT_ARGS, the bundle's
// rootfs.ext4 is attached read-only as the root drive.
func agentConfig(t testing.TB, id string) vm.Config {
	needGuest(t)
	bundle := os.Getenv(bundleEnv)
	cfg := vm.Config{
		ID:              id,
		Kernel:          filepath.Join(bundle, image.VmlinuxFile),
		Initrd:          filepath.Join(bundle, image.InitramfsFile),
		VCPUCount:       1,
		MemSizeMiB:      testMemMiB,
		BootArgs:        vm.DefaultBootArgs,
		TrackDirtyPages: true,
	}
	if extra := os.Getenv(agentBootArgsEnv); extra != "" {
		cfg.BootArgs += " " + extra
		if strings.Contains(extra, "ember.mode=switchroot") {
			cfg.Rootfs = filepath.Join(bundle, image.RootfsFile)
			cfg.RootfsReadOnly = true
		}
	}
	return cfg
}

// dialAgent connects the agent client to VM id, retrying until the agent
// completes the handshake or timeout passes.
func dialAgent(ctx context.Context, p *Provider, id string, timeout time.Duration) (*agent.Client, error) {
	dialer := func(ctx context.Context) (net.Conn, error) { return p.DialAgent(ctx, id) }
	deadline := time.Now().Add(timeout)
	for {
		tryCtx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := agent.Dial(tryCtx, dialer, nil)
		cancel()
		if err == nil {
			return c, nil
		}
		if info, gerr := p.Get(ctx, id); gerr != nil || info.State == vm.StateFailed || info.State == vm.StateStopped {
			return nil, fmt.Errorf("vm is %s (%s): %w", info.State, info.Reason, err)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("agent handshake timed out after %s: %w", timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func mustDialAgent(t testing.TB, p *Provider, id string) *agent.Client {
	t.Helper()
	c, err := dialAgent(context.Background(), p, id, guestBootTimeout)
	if err != nil {
		console, _ := p.Console(context.Background(), id)
		t.Fatalf("agent of %q: %v\nconsole:\n%s", id, err, tail(console, 3000))
	}
	return c
}

func execOutput(ctx context.Context, c *agent.Client, argv ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	res, err := c.Exec(ctx, agent.ExecRequest{Argv: argv, Timeout: 30 * time.Second}, agent.ExecIO{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return "", err
	}
	if res.ExitCode != 0 {
		return "", fmt.Errorf("%v exited with %d: %s", argv, res.ExitCode, stderr.String())
	}
	return strings.TrimSpace(stdout.String()), nil
}

// TestAgentClones is the provider's part of Ember's main job on a real
// guest agent: boot, run commands, snapshot, restore three clones that
// each take their own hostname, and tear everything down.
func TestAgentClones(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()

	if _, err := p.Create(ctx, agentConfig(t, "base")); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "base"); err != nil {
		t.Fatalf("start: %v", err)
	}
	c := mustDialAgent(t, p, "base")
	uname, err := execOutput(ctx, c, "uname", "-a")
	if err != nil {
		t.Fatalf("exec uname: %v", err)
	}
	if !strings.Contains(uname, "Linux") {
		t.Errorf("uname -a = %q, want a Linux kernel", uname)
	}
	health, err := c.Health(ctx)
	if err != nil {
		t.Fatalf("health: %v", err)
	}
	c.Close()

	if err := p.Pause(ctx, "base"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if _, err := p.Snapshot(ctx, "base", vm.SnapshotOptions{ID: "golden"}); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	clones := []string{"clone-a", "clone-b", "clone-c"}
	for _, id := range clones {
		ref := &vm.SnapshotRef{VMID: "base", SnapshotID: "golden", ResumeImmediately: true}
		if _, err := p.Create(ctx, vm.Config{ID: id, RestoreFrom: ref}); err != nil {
			t.Fatalf("restore %s: %v", id, err)
		}
	}
	for _, id := range clones {
		c := mustDialAgent(t, p, id)
		h, err := c.Health(ctx)
		if err != nil {
			t.Fatalf("%s: health: %v", id, err)
		}
		if h.BootID != health.BootID {
			t.Errorf("%s: boot id %q, want the snapshot's %q", id, h.BootID, health.BootID)
		}
		if err := c.SetHostname(ctx, id); err != nil {
			t.Fatalf("%s: set hostname: %v", id, err)
		}
		c.Close()
	}
	for _, id := range clones {
		c := mustDialAgent(t, p, id)
		got, err := execOutput(ctx, c, "uname", "-n")
		c.Close()
		if err != nil {
			t.Fatalf("%s: exec uname -n: %v", id, err)
		}
		if got != id {
			t.Errorf("%s: uname -n = %q, want its own hostname", id, got)
		}
	}

	for _, id := range append(clones, "base") {
		if err := p.Destroy(ctx, id); err != nil {
			t.Errorf("destroy %s: %v", id, err)
		}
		if err := leaked(p, id); err != nil {
			t.Error(err)
		}
	}
}

// TestAgentShutdown checks that Shutdown powers the agent's guest off
// through the ACPI power button within the grace period.
func TestAgentShutdown(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	if _, err := p.Create(ctx, agentConfig(t, "graceful")); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "graceful"); err != nil {
		t.Fatalf("start: %v", err)
	}
	mustDialAgent(t, p, "graceful").Close()
	if err := p.Shutdown(ctx, "graceful", time.Minute); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if info := mustGet(t, p, "graceful"); info.State != vm.StateStopped || info.Reason != "guest powered off" {
		t.Errorf("after shutdown: %s (%s), want stopped after the guest powered off", info.State, info.Reason)
	}
}

// BenchmarkAgent measures, side by side in one run with the real agent:
// cold boot to the agent's handshake, the exec round trip of "true", a
// snapshot, and restore to the agent's handshake. Values are medians.
//
//	EMBER_TEST_BUNDLE=<bundle> go test -run '^$' -bench Agent -benchtime 5x ./provider/qemu/
func BenchmarkAgent(b *testing.B) {
	p := newTestProvider(b, Options{})
	ctx := context.Background()
	var boot, snap, restore, execRTT []time.Duration

	for i := 0; b.Loop(); i++ {
		id := fmt.Sprintf("agent-%d", i)
		clone := id + "-clone"

		start := time.Now()
		if _, err := p.Create(ctx, agentConfig(b, id)); err != nil {
			b.Fatal(err)
		}
		if err := p.Start(ctx, id); err != nil {
			b.Fatal(err)
		}
		c := mustDialAgent(b, p, id)
		boot = append(boot, time.Since(start))

		var rtts []time.Duration
		for range 10 {
			start := time.Now()
			if _, err := execOutput(ctx, c, "true"); err != nil {
				b.Fatal(err)
			}
			rtts = append(rtts, time.Since(start))
		}
		execRTT = append(execRTT, median(rtts))
		c.Close()

		snap = append(snap, benchSnapshot(b, p, id))

		start = time.Now()
		benchRestore(b, p, id, clone)
		mustDialAgent(b, p, clone).Close()
		restore = append(restore, time.Since(start))

		benchCleanup(b, p, id, clone)
	}

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(median(boot)), "boot-to-agent-ms")
	b.ReportMetric(ms(median(snap)), "snapshot-ms")
	b.ReportMetric(ms(median(restore)), "restore-to-agent-ms")
	b.ReportMetric(ms(median(execRTT)), "exec-rtt-ms")
	b.ReportMetric(float64(median(boot))/float64(median(restore)), "boot/restore")
	b.Logf("accelerator %s, %d MiB guest, %d iterations", p.Accel(), testMemMiB, len(boot))
}

// BenchmarkAgentReconnect measures, side by side in one run, how long a new
// agent connection takes to complete the handshake and a health request
// when the agent waits for the host with epoll (the default) and when it
// polls the virtio-serial port every 50 ms (ember.serial_wait=poll). The
// connections arrive at pseudo-random times, as new tenants do, so the
// poll's phase is spread evenly.
//
//	EMBER_TEST_BUNDLE=<bundle> go test -run '^$' -bench AgentReconnect -benchtime 40x ./provider/qemu/
func BenchmarkAgentReconnect(b *testing.B) {
	p := newTestProvider(b, Options{})
	ctx := context.Background()
	modes := []struct{ id, args string }{{"rc-epoll", ""}, {"rc-poll", " ember.serial_wait=poll"}}
	for _, m := range modes {
		cfg := agentConfig(b, m.id)
		cfg.BootArgs += m.args
		if _, err := p.Create(ctx, cfg); err != nil {
			b.Fatal(err)
		}
		if err := p.Start(ctx, m.id); err != nil {
			b.Fatal(err)
		}
		mustDialAgent(b, p, m.id).Close()
	}
	opts := &agent.Options{RetryInterval: time.Millisecond, HelloInterval: 100 * time.Millisecond}
	gaps := rand.New(rand.NewPCG(1, 2))
	times := make([][]time.Duration, len(modes))
	for b.Loop() {
		for i, m := range modes {
			time.Sleep(time.Duration(gaps.Int64N(int64(100 * time.Millisecond))))
			start := time.Now()
			dial := func(ctx context.Context) (net.Conn, error) { return p.DialAgent(ctx, m.id) }
			c, err := agent.Dial(ctx, dial, opts)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Health(ctx); err != nil {
				b.Fatal(err)
			}
			times[i] = append(times[i], time.Since(start))
			c.Close()
		}
	}
	b.ReportMetric(0, "ns/op")
	for i, m := range modes {
		slices.Sort(times[i])
		b.ReportMetric(ms(median(times[i])), strings.TrimPrefix(m.id, "rc-")+"-p50-ms")
		b.ReportMetric(ms(times[i][len(times[i])*9/10]), strings.TrimPrefix(m.id, "rc-")+"-p90-ms")
	}
	b.ReportMetric(float64(median(times[1]))/float64(median(times[0])), "poll/epoll-p50")
}
