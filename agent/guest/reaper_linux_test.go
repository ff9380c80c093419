package guest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReaper runs the reaper in a child process that is a child subreaper,
// which makes it receive orphans as PID 1 does, without disturbing the test
// binary's own children.
func TestReaper(t *testing.T) {
	if os.Getenv("EMBER_REAPER_HELPER") == "1" {
		reaperHelper()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestReaper$")
	cmd.Env = append(os.Environ(), "EMBER_REAPER_HELPER=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "reaper helper ok") {
		t.Fatalf("reaper helper: %v\n%s", err, out)
	}
}

func reaperHelper() {
	fail := func(format string, args ...any) {
		fmt.Printf("reaper helper failed: "+format+"\n", args...)
		os.Exit(1)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fail("prctl: %v", err)
	}
	r := NewReaper(slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()

	// Tracked processes keep their exit status even while the reaper runs.
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Go(func() {
			cmd := exec.Command("sh", "-c", "exit "+strconv.Itoa(i))
			if err := r.Start(cmd); err != nil {
				errs <- err
				return
			}
			err := cmd.Wait()
			r.Done(cmd.Process.Pid)
			var exitErr *exec.ExitError
			switch {
			case i == 0 && err != nil:
				errs <- fmt.Errorf("exit 0: %v", err)
			case i > 0 && (!errors.As(err, &exitErr) || exitErr.ExitCode() != i):
				errs <- fmt.Errorf("exit %d: wait returned %v", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail("%v", err)
	}

	// A tracked child that is already a zombie when a pass runs must be left
	// for its Wait.
	zombie := exec.Command("sh", "-c", "exit 3")
	if err := r.Start(zombie); err != nil {
		fail("start: %v", err)
	}
	for !isZombie(zombie.Process.Pid) {
		time.Sleep(time.Millisecond)
	}
	r.reapPass()
	var exitErr *exec.ExitError
	if err := zombie.Wait(); !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
		fail("tracked zombie: wait returned %v, want exit status 3", err)
	}
	r.Done(zombie.Process.Pid)

	// An orphan: the shell exits and leaves its background child to us.
	cmd := exec.Command("sh", "-c", "sleep 0.1 & echo $!")
	var out strings.Builder
	cmd.Stdout = &out
	if err := r.Start(cmd); err != nil {
		fail("start: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		fail("wait: %v", err)
	}
	r.Done(cmd.Process.Pid)
	orphan, err := strconv.Atoi(strings.TrimSpace(out.String()))
	if err != nil {
		fail("orphan pid %q", out.String())
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat("/proc/" + strconv.Itoa(orphan)); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			stat, _ := os.ReadFile("/proc/" + strconv.Itoa(orphan) + "/stat")
			fail("orphan %d not reaped: %s", orphan, stat)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	fmt.Println("reaper helper ok")
	os.Exit(0)
}

func isZombie(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(stat), ") ")
	return strings.HasPrefix(rest, "Z")
}
