// Package vmtest is the conformance suite for [vm.Provider] implementations.
// Every backend runs it with one call from its own tests:
//
//	func TestConformance(t *testing.T) {
//		vmtest.Run(t, vmtest.Harness{
//			New:    func(t *testing.T) vm.Provider { return newTestProvider(t) },
//			Config: func(t *testing.T, id string) vm.Config { return testConfig(t, id) },
//		})
//	}
//
// The suite covers every legal transition and every illegal one, duplicate
// and unknown ids, invalid configurations, full and diff snapshots, restore
// with its compatibility checks, rename, concurrent operations on different
// VMs and on one VM, crash detection and cleanup after destroy. Run it under
// -race. Each subtest gets a fresh provider from [Harness.New].
package vmtest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

// Harness adapts a provider to the suite.
type Harness struct {
	// New returns a fresh provider for one subtest and registers its own
	// cleanup with t.Cleanup. Required.
	New func(t *testing.T) vm.Provider
	// Config returns a valid cold-boot configuration for a VM with the
	// given id: kernel, initramfs and root filesystem the backend can boot.
	// Required.
	Config func(t *testing.T, id string) vm.Config
	// RestoreConfig returns the configuration that restores ref into VM id.
	// Nil uses a Config with only ID, RestoreFrom and TrackDirtyPages set.
	RestoreConfig func(t *testing.T, id string, ref vm.SnapshotRef) vm.Config
	// Crash makes the VMM of VM id die, as a real crash would (kill the
	// process). Nil skips the crash tests.
	Crash func(t *testing.T, p vm.Provider, id string)
	// Leaked returns an error describing what VM id left behind after it was
	// destroyed: processes, sockets, run directories. Nil skips the check.
	Leaked func(t *testing.T, p vm.Provider, id string) error
	// Timeout bounds each wait for an asynchronous change, such as the
	// provider noticing a crash, and each provider call. Zero means 30
	// seconds.
	Timeout time.Duration
	// ShutdownGrace is passed to Shutdown. Zero means 10 seconds.
	ShutdownGrace time.Duration
	// Parallel runs the subtests in parallel.
	Parallel bool
	// Concurrency is the number of VMs the concurrency test drives at
	// once. Zero means 4.
	Concurrency int
}

// Run runs the conformance suite against the provider h describes.
func Run(t *testing.T, h Harness) {
	t.Helper()
	if h.New == nil || h.Config == nil {
		t.Fatal("vmtest: Harness.New and Harness.Config are required")
	}
	s := &suite{h: h}
	tests := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"Lifecycle", s.testLifecycle},
		{"InvalidTransitions", s.testInvalidTransitions},
		{"DuplicateID", s.testDuplicateID},
		{"UnknownID", s.testUnknownID},
		{"InvalidConfig", s.testInvalidConfig},
		{"ShutdownFromPaused", s.testShutdownFromPaused},
		{"SnapshotAndRestore", s.testSnapshotAndRestore},
		{"SnapshotRules", s.testSnapshotRules},
		{"RestoreErrors", s.testRestoreErrors},
		{"DiffSnapshot", s.testDiffSnapshot},
		{"SnapshotOutlivesVM", s.testSnapshotOutlivesVM},
		{"Rename", s.testRename},
		{"ConcurrentVMs", s.testConcurrentVMs},
		{"ConcurrentSameVM", s.testConcurrentSameVM},
		{"Crash", s.testCrash},
		{"DestroyCleanup", s.testDestroyCleanup},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if h.Parallel {
				t.Parallel()
			}
			tc.fn(t)
		})
	}
}

type suite struct {
	h Harness
}

func (s *suite) timeout() time.Duration {
	if s.h.Timeout > 0 {
		return s.h.Timeout
	}
	return 30 * time.Second
}

func (s *suite) grace() time.Duration {
	if s.h.ShutdownGrace > 0 {
		return s.h.ShutdownGrace
	}
	return 10 * time.Second
}

func (s *suite) ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout())
	t.Cleanup(cancel)
	return ctx
}

// newProvider returns a fresh provider that destroys every VM left at the
// end of the test, before the harness's own cleanup runs.
func (s *suite) newProvider(t *testing.T) vm.Provider {
	p := s.h.New(t)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout())
		defer cancel()
		infos, err := p.List(ctx)
		if err != nil {
			t.Errorf("cleanup: list: %v", err)
			return
		}
		for _, info := range infos {
			if err := p.Destroy(ctx, info.ID); err != nil {
				t.Errorf("cleanup: destroy %q: %v", info.ID, err)
			}
		}
	})
	return p
}

func (s *suite) restoreConfig(t *testing.T, id string, ref vm.SnapshotRef) vm.Config {
	if s.h.RestoreConfig != nil {
		return s.h.RestoreConfig(t, id, ref)
	}
	return vm.Config{ID: id, RestoreFrom: &ref, TrackDirtyPages: true}
}

func (s *suite) create(t *testing.T, p vm.Provider, id string) vm.Info {
	t.Helper()
	info, err := p.Create(s.ctx(t), s.h.Config(t, id))
	if err != nil {
		t.Fatalf("create %q: %v", id, err)
	}
	if info.ID != id {
		t.Fatalf("create %q: info.ID = %q", id, info.ID)
	}
	return info
}

// bring creates VM id and drives it to state want (created, running or
// paused).
func (s *suite) bring(t *testing.T, p vm.Provider, id string, want vm.State) {
	t.Helper()
	s.create(t, p, id)
	ctx := s.ctx(t)
	if want == vm.StateCreated {
		return
	}
	must(t, p.Start(ctx, id), "start %q", id)
	switch want {
	case vm.StateRunning:
	case vm.StatePaused:
		must(t, p.Pause(ctx, id), "pause %q", id)
	case vm.StateStopped:
		must(t, p.Shutdown(ctx, id, s.grace()), "shutdown %q", id)
	default:
		t.Fatalf("bring: unsupported target state %s", want)
	}
	s.expectState(t, p, id, want)
}

func (s *suite) expectState(t *testing.T, p vm.Provider, id string, want vm.State) {
	t.Helper()
	info, err := p.Get(s.ctx(t), id)
	if err != nil {
		t.Fatalf("get %q: %v", id, err)
	}
	if info.State != want {
		t.Fatalf("vm %q state = %s, want %s", id, info.State, want)
	}
}

// waitState polls until VM id reaches want or the suite timeout passes.
func (s *suite) waitState(t *testing.T, p vm.Provider, id string, want vm.State) {
	t.Helper()
	deadline := time.Now().Add(s.timeout())
	var last vm.State
	for time.Now().Before(deadline) {
		info, err := p.Get(s.ctx(t), id)
		if err != nil {
			t.Fatalf("get %q: %v", id, err)
		}
		if info.State == want {
			return
		}
		last = info.State
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("vm %q did not reach state %s within %v (last %s)", id, want, s.timeout(), last)
}

func (s *suite) expectGone(t *testing.T, p vm.Provider, id string) {
	t.Helper()
	ctx := s.ctx(t)
	if _, err := p.Get(ctx, id); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("get %q after destroy: err = %v, want ErrNotFound", id, err)
	}
	infos, err := p.List(ctx)
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	for _, info := range infos {
		if info.ID == id {
			t.Fatalf("list still contains destroyed vm %q", id)
		}
	}
	if s.h.Leaked != nil {
		if err := s.h.Leaked(t, p, id); err != nil {
			t.Fatalf("vm %q leaked resources after destroy: %v", id, err)
		}
	}
}

func must(t *testing.T, err error, format string, args ...any) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", fmt.Sprintf(format, args...), err)
	}
}

// expectTransitionError checks that err is a *vm.TransitionError for op on
// VM id from state from.
func expectTransitionError(t *testing.T, err error, id string, op vm.Op, from vm.State) {
	t.Helper()
	if !errors.Is(err, vm.ErrInvalidTransition) {
		t.Fatalf("%s in state %s: err = %v, want ErrInvalidTransition", op, from, err)
	}
	var te *vm.TransitionError
	if !errors.As(err, &te) {
		t.Fatalf("%s in state %s: err = %T, want *vm.TransitionError", op, from, err)
	}
	if te.ID != id || te.Op != op || te.From != from {
		t.Fatalf("%s in state %s: TransitionError = {ID:%q Op:%s From:%s}, want {ID:%q Op:%s From:%s}",
			op, from, te.ID, te.Op, te.From, id, op, from)
	}
}

// call runs op against VM id; snapshot ids are derived from the op.
func (s *suite) call(ctx context.Context, p vm.Provider, id string, op vm.Op) error {
	switch op {
	case vm.OpStart:
		return p.Start(ctx, id)
	case vm.OpPause:
		return p.Pause(ctx, id)
	case vm.OpResume:
		return p.Resume(ctx, id)
	case vm.OpShutdown:
		return p.Shutdown(ctx, id, s.grace())
	case vm.OpSnapshot:
		_, err := p.Snapshot(ctx, id, vm.SnapshotOptions{ID: "probe"})
		return err
	case vm.OpDestroy:
		return p.Destroy(ctx, id)
	case vm.OpRename:
		return p.Rename(ctx, id, id+"-renamed")
	}
	return fmt.Errorf("vmtest: no call for op %s", op)
}

// callerOps are the operations a caller can request directly; guest-exit
// and fail are events a provider observes.
var callerOps = []vm.Op{vm.OpStart, vm.OpPause, vm.OpResume, vm.OpSnapshot, vm.OpShutdown}

func sortedIDs(infos []vm.Info) []string {
	ids := make([]string, len(infos))
	for i, info := range infos {
		ids[i] = info.ID
	}
	slices.Sort(ids)
	return ids
}

// parallel runs fn(i) for i in [0, n) concurrently and returns the errors.
func parallel(n int, fn func(i int) error) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = fn(i) })
	}
	wg.Wait()
	return errs
}
