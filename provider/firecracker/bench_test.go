package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

// BenchmarkRealColdBoot measures Ember's create, start and wait for
// GUEST-READY on a real Firecracker with the fcprobe guest.
func BenchmarkRealColdBoot(b *testing.B) {
	bin := os.Getenv("EMBER_FIRECRACKER_BIN")
	kernel := findProbeKernel()
	if bin == "" || kernel == "" {
		b.Skip("set EMBER_FIRECRACKER_BIN and place shared/testdata/fcprobe beside the repository")
	}
	run, _ := os.MkdirTemp("", "fcb")
	defer os.RemoveAll(run)
	rootfs := filepath.Join(run, "root.img")
	os.WriteFile(rootfs, make([]byte, 1<<20), 0o600)
	cfg := func(id string) vm.Config {
		return vm.Config{ID: id, Kernel: kernel, Rootfs: rootfs, RootfsReadOnly: true, VCPUCount: 1, MemSizeMiB: 64, BootArgs: "console=ttyS0 reboot=k panic=1"}
	}

	b.Run("ember", func(b *testing.B) {
		p, err := New(Config{Binary: bin, RunDir: filepath.Join(run, "r"), SnapshotDir: filepath.Join(run, "s")})
		if err != nil {
			b.Fatal(err)
		}
		ctx := context.Background()
		for i := 0; b.Loop(); i++ {
			id := "b" + strings.Repeat("x", i%3)
			if _, err := p.Create(ctx, cfg(id)); err != nil {
				b.Fatal(err)
			}
			if err := p.Start(ctx, id); err != nil {
				b.Fatal(err)
			}
			for {
				out, _ := p.Console(ctx, id)
				if strings.Contains(string(out), "GUEST-READY") {
					break
				}
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			p.Destroy(ctx, id)
			b.StartTimer()
		}
	})

	// TODO: the side-by-side hand-written sequence of the same API calls
	// hung on its first iteration and was removed; the provider overhead
	// ratio is not measured yet.
}
