package pool

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/agent/guest"
	"github.com/embervm/ember/vm"
)

// recordingSystem records the guest's privileged operations instead of
// performing them.
type recordingSystem struct {
	mu       sync.Mutex
	hostname string
	clock    time.Time
	ifaces   []agent.InterfaceConfig
}

func (s *recordingSystem) SetHostname(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hostname = name
	return nil
}

func (s *recordingSystem) SetClock(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clock = t
	return nil
}

func (s *recordingSystem) ConfigureNetwork(ctx context.Context, ifaces []agent.InterfaceConfig) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ifaces = ifaces
	return nil
}

func (s *recordingSystem) Shutdown(string) error { return nil }

// pipeDialer serves every dial with a real agent server over a pipe.
type pipeDialer struct {
	srv    *guest.Server
	ctx    context.Context
	wg     sync.WaitGroup
	dialed []string
	mu     sync.Mutex
}

func (d *pipeDialer) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	d.mu.Lock()
	d.dialed = append(d.dialed, id)
	d.mu.Unlock()
	host, guestEnd := net.Pipe()
	d.wg.Go(func() { d.srv.ServeConn(d.ctx, guestEnd) })
	return host, nil
}

// newPipeGuest starts a real guest-side agent server on a temporary root
// with a recording system, reached through a pipe dialer, and stops it when
// t ends.
func newPipeGuest(t *testing.T) (root string, sys *recordingSystem, d *pipeDialer) {
	t.Helper()
	root = t.TempDir()
	sys = &recordingSystem{}
	srv, err := guest.NewServer(guest.Config{Root: root, System: sys, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d = &pipeDialer{srv: srv, ctx: ctx}
	t.Cleanup(func() {
		cancel()
		d.wg.Wait()
		srv.Close()
	})
	return root, sys, d
}

// slowDialer delays every dial, as a guest that is still resuming does.
type slowDialer struct {
	vm.AgentDialer
	delay time.Duration
}

func (d slowDialer) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	time.Sleep(d.delay)
	return d.AgentDialer.DialAgent(ctx, id)
}

func TestAgentGuestClockCountsDialTime(t *testing.T) {
	_, sys, d := newPipeGuest(t)
	const delay = 300 * time.Millisecond
	g := AgentGuest{Dialer: slowDialer{AgentDialer: d, delay: delay}}
	clock := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	if err := g.Personalize(context.Background(), "tenant-1", Personalization{Clock: clock}); err != nil {
		t.Fatalf("personalize: %v", err)
	}
	sys.mu.Lock()
	defer sys.mu.Unlock()
	if got := sys.clock.Sub(clock); got < delay {
		t.Errorf("guest clock set %v after the requested time, want at least the %v the dial took", got, delay)
	}
}

func TestAgentGuestPersonalize(t *testing.T) {
	root, sys, d := newPipeGuest(t)
	g := AgentGuest{Dialer: d}

	if err := g.Health(context.Background(), "tenant-1"); err != nil {
		t.Fatalf("health: %v", err)
	}
	clock := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	p := Personalization{
		Hostname: "tenant-1",
		Env:      map[string]string{"TENANT": "one"},
		Clock:    clock,
		Network: GuestNetwork{
			Interfaces: []GuestInterface{{MAC: "06:00:0a:00:00:05", Address: netip.MustParsePrefix("10.0.0.5/24"), Gateway: netip.MustParseAddr("10.0.0.1")}},
			DNS:        []netip.Addr{netip.MustParseAddr("10.0.0.1")},
		},
	}
	called := time.Now()
	if err := g.Personalize(context.Background(), "tenant-1", p); err != nil {
		t.Fatalf("personalize: %v", err)
	}
	elapsed := time.Since(called)
	sys.mu.Lock()
	defer sys.mu.Unlock()
	if sys.hostname != "tenant-1" {
		t.Errorf("hostname %q, want tenant-1", sys.hostname)
	}
	// The clock moves forward by the time the call took before sending.
	if sys.clock.Before(clock) || sys.clock.After(clock.Add(elapsed)) {
		t.Errorf("clock %v, want %v plus at most %v", sys.clock, clock, elapsed)
	}
	if len(sys.ifaces) != 1 || sys.ifaces[0].MAC != "06:00:0a:00:00:05" || sys.ifaces[0].Addresses[0] != "10.0.0.5/24" ||
		sys.ifaces[0].Routes[0].Gateway != "10.0.0.1" || sys.ifaces[0].Routes[0].Destination != "default" {
		t.Errorf("interfaces = %+v", sys.ifaces)
	}
	resolv, err := os.ReadFile(filepath.Join(root, "etc", "resolv.conf"))
	if err != nil || !strings.Contains(string(resolv), "nameserver 10.0.0.1") {
		t.Errorf("resolv.conf = %q (%v)", resolv, err)
	}
	env, err := os.ReadFile(filepath.Join(root, "run", "ember", "env"))
	if err != nil || !strings.Contains(string(env), "TENANT=one") {
		t.Errorf("env file = %q (%v)", env, err)
	}
	for _, id := range d.dialed {
		if id != "tenant-1" {
			t.Errorf("dialed %q, want only tenant-1", id)
		}
	}
}

func TestAgentGuestHealthTimesOut(t *testing.T) {
	g := AgentGuest{Dialer: refusingDialer{}}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := g.Health(ctx, "nobody")
	if err == nil || !strings.Contains(err.Error(), "agent of nobody") {
		t.Fatalf("err = %v", err)
	}
}

type refusingDialer struct{}

func (refusingDialer) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	return nil, &net.OpError{Op: "dial", Net: "unix", Err: os.ErrNotExist}
}

// The personalization steps run concurrently, so a failing step must not
// stop the others, and its error must name the step and the VM.
func TestAgentGuestPersonalizeStepFails(t *testing.T) {
	root, _, d := newPipeGuest(t)
	g := AgentGuest{Dialer: d}

	p := Personalization{Hostname: "-invalid-", Env: map[string]string{"TENANT": "two"}}
	err := g.Personalize(context.Background(), "tenant-2", p)
	var agentErr *agent.Error
	if !errors.As(err, &agentErr) || agentErr.Code != agent.CodeInvalidArgument {
		t.Fatalf("personalize with an invalid hostname: error %v, want an agent error with code %s", err, agent.CodeInvalidArgument)
	}
	if !strings.Contains(err.Error(), "set hostname of tenant-2") {
		t.Errorf("error %q does not name the step and the vm", err)
	}
	env, err := os.ReadFile(filepath.Join(root, "run", "ember", "env"))
	if err != nil || !strings.Contains(string(env), "TENANT=two") {
		t.Errorf("env file = %q (%v), want the environment set despite the failed hostname", env, err)
	}
}

// PersonalizeAndCheck uses one connection for the personalization and the
// health check, and reports a failed step like Personalize.
func TestAgentGuestPersonalizeAndCheck(t *testing.T) {
	_, sys, d := newPipeGuest(t)
	g := AgentGuest{Dialer: d}

	if err := g.PersonalizeAndCheck(context.Background(), "tenant-3", Personalization{Hostname: "tenant-3"}); err != nil {
		t.Fatalf("personalize and check: %v", err)
	}
	d.mu.Lock()
	dials := len(d.dialed)
	d.mu.Unlock()
	if dials != 1 {
		t.Errorf("dials: %d, want 1", dials)
	}
	sys.mu.Lock()
	hostname := sys.hostname
	sys.mu.Unlock()
	if hostname != "tenant-3" {
		t.Errorf("hostname %q, want tenant-3", hostname)
	}

	err := g.PersonalizeAndCheck(context.Background(), "tenant-3", Personalization{Hostname: "-invalid-"})
	var agentErr *agent.Error
	if !errors.As(err, &agentErr) || agentErr.Code != agent.CodeInvalidArgument {
		t.Fatalf("personalize and check with an invalid hostname: error %v, want an agent error with code %s", err, agent.CodeInvalidArgument)
	}
}

// Warm runs the personalization code with values a hand-off overwrites and
// leaves the environment as it was.
func TestAgentGuestWarm(t *testing.T) {
	root, sys, d := newPipeGuest(t)
	g := AgentGuest{Dialer: d}

	if err := g.Warm(context.Background(), "pool-1"); err != nil {
		t.Fatalf("warm: %v", err)
	}
	sys.mu.Lock()
	hostname, clock := sys.hostname, sys.clock
	sys.mu.Unlock()
	if hostname != "pool-1" {
		t.Errorf("hostname %q, want pool-1", hostname)
	}
	if clock.IsZero() {
		t.Error("clock not set")
	}
	env, err := os.ReadFile(filepath.Join(root, "run", "ember", "env"))
	if err == nil && strings.Contains(string(env), warmEnvName) {
		t.Errorf("env file = %q, want no %s", env, warmEnvName)
	}
	d.mu.Lock()
	dials := len(d.dialed)
	d.mu.Unlock()
	if dials != 1 {
		t.Errorf("dials: %d, want 1", dials)
	}
}
