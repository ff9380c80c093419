package qemu

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

// BenchmarkBootRestoreExec measures, side by side in one run:
//
//   - boot-to-marker: Create and Start of a cold boot until the test init's
//     ready marker is on the serial console;
//   - boot-to-agent: the same until the guest replies on the agent port;
//   - snapshot: Pause plus a full snapshot;
//   - restore-to-running: Create of a restore with resume_immediately, which
//     returns once QEMU has loaded the snapshot and the vCPUs run;
//   - restore-to-agent: Create of a restore with resume_immediately until
//     the restored guest replies on the agent port;
//   - exec-rtt: one request and reply on an open agent connection.
//
// The guest is the test init, not the Ember agent, so "agent" means the
// virtio-serial port replying to a ping. Each iteration runs every step once
// and the reported values are medians. Run it with
//
//	EMBER_TEST_BUNDLE=<bundle> go test -run '^$' -bench BootRestoreExec -benchtime 5x ./provider/qemu/
//
// EMBER_BENCH_VCPUS sets the guest's vCPU count (default 1), and
// EMBER_BENCH_TCG_MULTI=1 runs one host thread per vCPU under TCG.
func BenchmarkBootRestoreExec(b *testing.B) {
	vcpus := 1
	if v, err := strconv.Atoi(os.Getenv("EMBER_BENCH_VCPUS")); err == nil && v > 0 {
		vcpus = v
	}
	p := newTestProvider(b, Options{TCGMultiThread: os.Getenv("EMBER_BENCH_TCG_MULTI") == "1"})
	ctx := context.Background()
	var boot, marker, snap, restore, restoreRunning, rtt []time.Duration

	for i := 0; b.Loop(); i++ {
		id := fmt.Sprintf("bench-%d", i)
		clone := id + "-clone"

		cfg := testConfig(b, id)
		cfg.VCPUCount = vcpus
		start := time.Now()
		if _, err := p.Create(ctx, cfg); err != nil {
			b.Fatal(err)
		}
		if err := p.Start(ctx, id); err != nil {
			b.Fatal(err)
		}
		marker = append(marker, waitMarker(b, p, id).Sub(start))
		if err := pollAgent(ctx, p, id, guestBootTimeout); err != nil {
			b.Fatal(err)
		}
		boot = append(boot, time.Since(start))

		rtt = append(rtt, measureRTT(b, p, id, 20))

		snap = append(snap, benchSnapshot(b, p, id))

		start = time.Now()
		benchRestore(b, p, id, clone)
		restoreRunning = append(restoreRunning, time.Since(start))
		if err := pollAgent(ctx, p, clone, guestBootTimeout); err != nil {
			b.Fatal(err)
		}
		restore = append(restore, time.Since(start))

		benchCleanup(b, p, id, clone)
	}

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(median(marker)), "boot-to-marker-ms")
	b.ReportMetric(ms(median(boot)), "boot-to-agent-ms")
	b.ReportMetric(ms(median(snap)), "snapshot-ms")
	b.ReportMetric(ms(median(restoreRunning)), "restore-to-running-ms")
	b.ReportMetric(ms(median(restore)), "restore-to-agent-ms")
	b.ReportMetric(float64(median(rtt).Microseconds()), "exec-rtt-µs")
	b.ReportMetric(float64(median(boot))/float64(median(restore)), "boot/restore")
	b.Logf("accelerator %s (multi-threaded %v), %d vcpus, %d MiB guest, %d iterations",
		p.Accel(), p.opts.TCGMultiThread, vcpus, testMemMiB, len(boot))
}

// waitMarker polls the console until the test init's ready marker appears
// and returns the time it was seen.
func waitMarker(b *testing.B, p *Provider, id string) time.Time {
	deadline := time.Now().Add(guestBootTimeout)
	for time.Now().Before(deadline) {
		out, err := p.Console(context.Background(), id)
		if err != nil {
			b.Fatal(err)
		}
		if bytes.Contains(out, []byte("EMBER-TESTINIT-READY")) {
			return time.Now()
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatalf("no ready marker on the console of %s", id)
	return time.Time{}
}

// measureRTT returns the median time of n ping round trips on one agent
// connection.
func measureRTT(b *testing.B, p *Provider, id string, n int) time.Duration {
	conn, err := p.DialAgent(context.Background(), id)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute))
	r := bufio.NewReader(conn)
	var rtts []time.Duration
	for range n {
		start := time.Now()
		if _, err := conn.Write([]byte("ping\n")); err != nil {
			b.Fatal(err)
		}
		line, err := r.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "pong" {
			b.Fatalf("ping: %q, %v", line, err)
		}
		rtts = append(rtts, time.Since(start))
	}
	return median(rtts)
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// benchSnapshot pauses VM id, takes its snapshot "bench" and returns how
// long both steps took.
func benchSnapshot(b *testing.B, p *Provider, id string) time.Duration {
	b.Helper()
	start := time.Now()
	if err := p.Pause(b.Context(), id); err != nil {
		b.Fatal(err)
	}
	if _, err := p.Snapshot(b.Context(), id, vm.SnapshotOptions{ID: "bench"}); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

// benchRestore creates the running VM clone from the snapshot "bench" of
// VM id.
func benchRestore(b *testing.B, p *Provider, id, clone string) {
	b.Helper()
	ref := &vm.SnapshotRef{VMID: id, SnapshotID: "bench", ResumeImmediately: true}
	if _, err := p.Create(b.Context(), vm.Config{ID: clone, RestoreFrom: ref}); err != nil {
		b.Fatal(err)
	}
}

// benchCleanup destroys VM id and its clone and deletes the snapshot.
func benchCleanup(b *testing.B, p *Provider, id, clone string) {
	b.Helper()
	for _, v := range []string{id, clone} {
		if err := p.Destroy(b.Context(), v); err != nil {
			b.Fatal(err)
		}
	}
	if err := p.DeleteSnapshot(b.Context(), id, "bench"); err != nil {
		b.Fatal(err)
	}
}
