package qemu

import (
	"syscall"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
	"github.com/embervm/ember/vm/vmtest"
)

func TestConformance(t *testing.T) {
	needGuest(t)
	vmtest.Run(t, vmtest.Harness{
		New: func(t *testing.T) vm.Provider {
			return newTestProvider(t, Options{})
		},
		Config: func(t *testing.T, id string) vm.Config { return testConfig(t, id) },
		Crash: func(t *testing.T, p vm.Provider, id string) {
			info, err := p.Get(t.Context(), id)
			if err != nil {
				t.Fatalf("crash %q: %v", id, err)
			}
			if info.PID == 0 {
				t.Fatalf("crash %q: no qemu pid", id)
			}
			if err := syscall.Kill(info.PID, syscall.SIGKILL); err != nil {
				t.Fatalf("crash %q: kill %d: %v", id, info.PID, err)
			}
		},
		Leaked: func(t *testing.T, p vm.Provider, id string) error {
			return leaked(p.(*Provider), id)
		},
		Timeout: 3 * time.Minute,
		// Parallel subtests keep the suite short: most of a TCG guest's
		// time is its boot, and the guests overlap well on two cores.
		Parallel:    true,
		Concurrency: 3,
	})
}
