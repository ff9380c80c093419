package pool_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/embervm/ember/pool"
	"github.com/embervm/ember/vm"
)

// BenchmarkWarmPool measures, side by side in one run on real QEMU guests
// restored from one golden snapshot of the bundle:
//
//   - warm: Acquire from a full bucket until the tenant is ready, which is
//     rename, resume, clock, hostname and environment set through the agent,
//     and an agent health check;
//   - restore: Acquire from an empty bucket with restore on demand, which
//     restores the snapshot as the tenant's VM, then personalizes it;
//   - cold: Acquire from an empty bucket with cold boot, which boots the
//     bundle, waits for the agent, then personalizes it;
//   - refill: the time from the end of a burst of MinDepth warm acquires
//     until the bucket has MinDepth ready entries again.
//
// Every sample starts when the warm bucket is full and no refill is in
// flight, so the paths do not compete for the CPU. The tenant is destroyed
// after each sample. Run it once with
//
//	EMBER_TEST_BUNDLE=<bundle> go test -run '^$' -bench WarmPool -benchtime 1x -timeout 30m ./pool/
//
// EMBER_BENCH_WARM sets the number of warm acquires (default 50),
// EMBER_BENCH_SLOW the number of restore and of cold acquires (default 10)
// and EMBER_BENCH_BURSTS the number of bursts (default 5).
// EMBER_BENCH_KEEP_RUNNING=1 keeps the warm entries running instead of
// paused. The benchmark logs the host's load average before and after,
// because other processes on the host change every number.
func BenchmarkWarmPool(b *testing.B) {
	nWarm := benchCount(b, "EMBER_BENCH_WARM", 50)
	nSlow := benchCount(b, "EMBER_BENCH_SLOW", 10)
	nBursts := benchCount(b, "EMBER_BENCH_BURSTS", 5)
	keepRunning := os.Getenv("EMBER_BENCH_KEEP_RUNNING") == "1"
	const depth = 4
	loadBefore := loadAverage()

	env := newRealEnv(b)
	ref := env.golden(b, goldenID, "base")
	// The golden VM is not needed once its snapshot exists.
	if err := env.prov.Destroy(context.Background(), goldenID); err != nil {
		b.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	guest := &timedGuest{AgentGuest: pool.AgentGuest{Dialer: env.prov}, personalize: map[string]time.Duration{}}
	p := env.newPool(b, func(o *pool.Options) {
		o.Registerer = reg
		o.Guest = guest
	})

	warmKey := realKey
	restoreKey := pool.Key{Stack: "bundle-restore", Version: "1", VCPUCount: 1, MemSizeMiB: guestMemMiB}
	coldKey := pool.Key{Stack: "bundle-cold", Version: "1", VCPUCount: 1, MemSizeMiB: guestMemMiB}
	configs := []pool.BucketConfig{
		{Key: warmKey, Snapshot: ref, MinDepth: depth, RefillConcurrency: 2, KeepRunning: keepRunning},
		{Key: restoreKey, Snapshot: ref, RestoreOnDemand: true},
		{Key: coldKey, Snapshot: ref, ColdBoot: func(id string, _ pool.Attachment) (vm.Config, error) {
			return env.bootConfig(id)
		}},
	}
	for _, cfg := range configs {
		if err := p.Register(cfg); err != nil {
			b.Fatal(err)
		}
	}

	var warm, restore, cold, refill, warmPersonalize []time.Duration
	seq := 0
	acquire := func(key pool.Key, want pool.Path) time.Duration {
		waitFull(b, p, warmKey, depth)
		seq++
		tenant := pool.Tenant{ID: fmt.Sprintf("tenant-%d", seq), Env: map[string]string{"EMBER_TENANT": strconv.Itoa(seq)}}
		res, err := p.Acquire(context.Background(), key, tenant)
		if err != nil {
			b.Fatal(err)
		}
		if res.Path != want {
			b.Fatalf("acquire for %s from %s: path %s, want %s", tenant.ID, key, res.Path, want)
		}
		if err := env.prov.Destroy(context.Background(), tenant.ID); err != nil {
			b.Fatal(err)
		}
		return res.Duration
	}

	// The slow paths are spread over the warm samples so that a change in
	// the host's load during the run affects every path alike.
	every := max(nWarm/max(nSlow, 1), 1)
	for i := range nWarm {
		warm = append(warm, acquire(warmKey, pool.PathWarm))
		warmPersonalize = append(warmPersonalize, guest.personalizeTime(fmt.Sprintf("tenant-%d", seq)))
		if i%every == 0 && len(restore) < nSlow {
			restore = append(restore, acquire(restoreKey, pool.PathRestore))
			cold = append(cold, acquire(coldKey, pool.PathCold))
		}
	}
	for range nBursts {
		refill = append(refill, measureBurst(b, env, p, warmKey, depth, &seq))
	}
	b.StopTimer()

	checkPathCounts(b, reg, map[pool.Path]int{
		pool.PathWarm:    len(warm) + nBursts*depth,
		pool.PathRestore: len(restore),
		pool.PathCold:    len(cold),
	})
	notes := []string{
		fmt.Sprintf("of a warm acquire, personalization and health check through the agent took p50 %s, p99 %s",
			percentile(warmPersonalize, 50).Round(100*time.Microsecond), percentile(warmPersonalize, 99).Round(100*time.Microsecond)),
		fmt.Sprintf("warm entries kept running: %v", keepRunning),
		fmt.Sprintf("load average before %s, after %s", loadBefore, loadAverage()),
	}
	reportBench(b, warm, restore, cold, refill, depth, notes)
}

// timedGuest records how long each VM's personalization took, including
// the health check when the guest does both in one step.
type timedGuest struct {
	pool.AgentGuest
	mu          sync.Mutex
	personalize map[string]time.Duration
}

func (g *timedGuest) PersonalizeAndCheck(ctx context.Context, id string, p pool.Personalization) error {
	start := time.Now()
	err := g.AgentGuest.PersonalizeAndCheck(ctx, id, p)
	g.mu.Lock()
	g.personalize[id] = time.Since(start)
	g.mu.Unlock()
	return err
}

func (g *timedGuest) personalizeTime(id string) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.personalize[id]
}

// measureBurst waits for a full bucket, acquires depth tenants one after
// the other and returns the time from the last acquire until the bucket
// has depth ready entries again. It destroys the tenants afterwards.
func measureBurst(b *testing.B, env *realEnv, p *pool.Pool, key pool.Key, depth int, seq *int) time.Duration {
	waitFull(b, p, key, depth)
	var tenants []string
	for range depth {
		*seq++
		id := fmt.Sprintf("tenant-%d", *seq)
		res, err := p.Acquire(context.Background(), key, pool.Tenant{ID: id})
		if err != nil {
			b.Fatal(err)
		}
		if res.Path != pool.PathWarm {
			b.Fatalf("burst acquire for %s: path %s, want %s", id, res.Path, pool.PathWarm)
		}
		tenants = append(tenants, id)
	}
	end := time.Now()
	waitFull(b, p, key, depth)
	elapsed := time.Since(end)
	for _, id := range tenants {
		if err := env.prov.Destroy(context.Background(), id); err != nil {
			b.Fatal(err)
		}
	}
	return elapsed
}

// waitFull polls until the bucket with key has depth ready entries and no
// refill in flight.
func waitFull(b *testing.B, p *pool.Pool, key pool.Key, depth int) {
	b.Helper()
	deadline := time.Now().Add(guestTimeout)
	for {
		for _, s := range p.Status() {
			if s.Key == key && s.Ready == depth && s.InFlight == 0 {
				return
			}
			if s.Key == key && !s.Healthy {
				b.Fatalf("bucket %s is unhealthy: %s", key, s.LastError)
			}
		}
		if time.Now().After(deadline) {
			b.Fatalf("timed out waiting for bucket %s to fill; status %+v", key, p.Status())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// checkPathCounts checks that the acquire histogram counted every sample
// under its path.
func checkPathCounts(b *testing.B, reg *prometheus.Registry, want map[pool.Path]int) {
	b.Helper()
	families, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	got := map[pool.Path]int{}
	for _, f := range families {
		if f.GetName() != "ember_pool_acquire_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			got[pool.Path(labelValue(m, "path"))] += int(m.GetHistogram().GetSampleCount())
		}
	}
	for path, n := range want {
		if got[path] != n {
			b.Errorf("acquire histogram, path %s: %d samples, want %d", path, got[path], n)
		}
	}
}

func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// reportBench reports percentiles and ratios as benchmark metrics and logs
// a table followed by notes, in one log entry because the testing package
// shortens a benchmark's log to ten lines.
func reportBench(b *testing.B, warm, restore, cold, refill []time.Duration, depth int, notes []string) {
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	warmP50, warmP99 := percentile(warm, 50), percentile(warm, 99)
	restoreP50, restoreP99 := percentile(restore, 50), percentile(restore, 99)
	coldP50, coldP99 := percentile(cold, 50), percentile(cold, 99)
	refillP50, refillMax := percentile(refill, 50), percentile(refill, 100)

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(warmP50), "warm-p50-ms")
	b.ReportMetric(ms(warmP99), "warm-p99-ms")
	b.ReportMetric(ms(restoreP50), "restore-p50-ms")
	b.ReportMetric(ms(coldP50), "cold-p50-ms")
	b.ReportMetric(ms(refillP50), "refill-p50-ms")
	b.ReportMetric(float64(coldP50)/float64(warmP50), "cold/warm-p50")
	b.ReportMetric(float64(restoreP50)/float64(warmP50), "restore/warm-p50")

	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-28s %8s %10s %10s %10s\n", "PATH", "SAMPLES", "P50", "P99", "MAX")
	row := func(name string, s []time.Duration, p50, p99 time.Duration) {
		fmt.Fprintf(&sb, "%-28s %8d %10s %10s %10s\n", name, len(s), p50.Round(100*time.Microsecond), p99.Round(100*time.Microsecond), percentile(s, 100).Round(100*time.Microsecond))
	}
	row("warm acquire → ready", warm, warmP50, warmP99)
	row("restore on demand → ready", restore, restoreP50, restoreP99)
	row("cold boot → ready", cold, coldP50, coldP99)
	row(fmt.Sprintf("refill after burst of %d", depth), refill, refillP50, percentile(refill, 99))
	fmt.Fprintf(&sb, "cold/warm p50 %.1fx, restore/warm p50 %.1fx, refill max %s\n",
		float64(coldP50)/float64(warmP50), float64(restoreP50)/float64(warmP50), refillMax.Round(time.Millisecond))
	for _, note := range notes {
		sb.WriteString(note + "\n")
	}
	b.Log(sb.String())
}

// percentile returns the nearest-rank p-th percentile of samples.
func percentile(samples []time.Duration, p int) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	rank := (p*len(s) + 99) / 100 // ceil(p/100 * n)
	return s[max(rank, 1)-1]
}

// benchCount reads a positive sample count from environment variable name.
func benchCount(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q is invalid, must be a positive integer", name, v)
	}
	return n
}

// loadAverage returns the first three fields of /proc/loadavg.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	fields := strings.Fields(string(data))
	return strings.Join(fields[:min(3, len(fields))], " ")
}
