package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

// TestAdoptAfterClose closes a provider with VMs in every live state and
// checks that a new provider on the same run directory takes them over.
// States, pids, consoles, agent ports and control carry over. A crash of
// an adopted QEMU is noticed, and a QEMU that died while no provider
// watched it shows up as failed.
func TestAdoptAfterClose(t *testing.T) {
	needGuest(t)
	dir, err := os.MkdirTemp("/tmp", "eq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx := t.Context()

	first, err := New(ctx, Options{RunDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"runner", "sleeper", "fresh"} {
		if _, err := first.Create(ctx, testConfig(t, id)); err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
	}
	for _, id := range []string{"runner", "sleeper"} {
		if err := first.Start(ctx, id); err != nil {
			t.Fatalf("start %s: %v", id, err)
		}
		waitAgent(t, first, id)
	}
	if err := first.Pause(ctx, "sleeper"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if err := first.Rename(ctx, "runner", "mover"); err != nil {
		t.Fatalf("rename: %v", err)
	}
	pids := map[string]int{}
	for _, id := range []string{"mover", "sleeper", "fresh"} {
		pids[id] = mustGet(t, first, id).PID
	}
	if err := first.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}

	second, err := New(ctx, Options{RunDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, second) })
	want := map[string]vm.State{"mover": vm.StateRunning, "sleeper": vm.StatePaused, "fresh": vm.StateCreated}
	for id, state := range want {
		info := mustGet(t, second, id)
		if info.State != state || info.PID != pids[id] {
			t.Errorf("adopted %s: state %s pid %d, want %s pid %d", id, info.State, info.PID, state, pids[id])
		}
	}
	if got := mustAsk(t, second, "mover", "ping"); got != "pong" {
		t.Errorf("adopted vm replied %q to ping", got)
	}
	console, err := second.Console(ctx, "mover")
	if err != nil || !bytes.Contains(console, []byte("EMBER-TESTINIT-READY")) {
		t.Errorf("adopted console: err %v, marker missing", err)
	}
	if err := second.Resume(ctx, "sleeper"); err != nil {
		t.Errorf("resume adopted vm: %v", err)
	}
	if err := second.Start(ctx, "fresh"); err != nil {
		t.Errorf("start adopted vm: %v", err)
	}
	waitAgent(t, second, "fresh")

	// A crash of an adopted QEMU, which is not this process's child.
	if err := syscall.Kill(pids["mover"], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	info := waitFor(t, second, "mover", vm.StateFailed)
	if !strings.Contains(info.Reason, "exit status unknown") {
		t.Errorf("crashed adopted vm: reason %q", info.Reason)
	}

	// A QEMU that dies while no provider watches it.
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pids["sleeper"], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pids["sleeper"])
	third, err := New(ctx, Options{RunDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, third) })
	if info := mustGet(t, third, "sleeper"); info.State != vm.StateFailed || info.PID != 0 {
		t.Errorf("vm that died unwatched: state %s pid %d, want failed without a pid", info.State, info.PID)
	}
	if info := mustGet(t, third, "fresh"); info.State != vm.StateRunning {
		t.Errorf("fresh after a second adoption: %s, want running", info.State)
	}
	for _, id := range []string{"mover", "sleeper", "fresh"} {
		if err := third.Destroy(ctx, id); err != nil {
			t.Errorf("destroy %s: %v", id, err)
		}
		if err := leaked(third, id); err != nil {
			t.Error(err)
		}
	}
}

func destroyAll(t *testing.T, p *Provider) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	infos, _ := p.List(ctx)
	for _, info := range infos {
		if err := p.Destroy(ctx, info.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("cleanup: destroy %s: %v", info.ID, err)
		}
	}
	p.Close()
}

// waitGone waits until process pid no longer exists, reaped by whichever
// goroutine of this test process started it.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("process %d still exists", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
