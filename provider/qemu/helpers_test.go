package qemu

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"github.com/embervm/ember/image"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/embervm/ember/vm"
)

// The integration tests boot real guests. They need QEMU and a guest
// bundle from `ember image build`: a directory with a PVH vmlinux and an
// initramfs (a newc cpio archive) that contains the virtio kernel modules
// under /lib/modules. The tests append their own /init (internal/testinit) to the
// bundle's initramfs, so the bundle's own init does not run.
const bundleEnv = "EMBER_TEST_BUNDLE"

// testMemMiB keeps guests small: several run at once on a 2-core machine.
const testMemMiB = 128

// guestBootTimeout bounds the wait for a guest to reply on its agent port.
// TCG guests share two cores with other test processes, so it is generous.
// It only stops a hung test and is not a measurement.
const guestBootTimeout = 20 * time.Second

type testGuest struct {
	kernel string
	initrd string
}

var (
	guestOnce sync.Once
	guest     testGuest
	guestErr  string
	// workDir contains files shared by all tests of this run, such as
	// the built test initramfs; TestMain removes it.
	workDir string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ember-qemu-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	workDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	// Every VM's reaper, event and console goroutines must be gone once
	// the tests have destroyed their VMs.
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines leaked:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// needGuest returns the test guest or skips the test, saying what is
// missing.
func needGuest(t testing.TB) testGuest {
	t.Helper()
	guestOnce.Do(func() { guest, guestErr = buildGuest() })
	if guestErr != "" {
		t.Skip(guestErr)
	}
	return guest
}

func buildGuest() (testGuest, string) {
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		return testGuest{}, DefaultBinary + " not found: install it with `apt-get install qemu-system-x86`"
	}
	bundle := os.Getenv(bundleEnv)
	if bundle == "" {
		return testGuest{}, bundleEnv + " is not set: point it at a guest bundle directory containing vmlinux and initramfs (see `ember image build`)"
	}
	kernel := filepath.Join(bundle, image.VmlinuxFile)
	baseInitrd := filepath.Join(bundle, image.InitramfsFile)
	for _, f := range []string{kernel, baseInitrd} {
		if _, err := os.Stat(f); err != nil {
			return testGuest{}, fmt.Sprintf("%s=%s: %v", bundleEnv, bundle, err)
		}
	}

	goBin, err := exec.LookPath("go")
	if err != nil {
		return testGuest{}, "the go command is not in PATH; it builds the test guest's init"
	}
	initBin := filepath.Join(workDir, "init")
	build := exec.Command(goBin, "build", "-o", initBin, "./internal/testinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		return testGuest{}, fmt.Sprintf("build the test init: %v\n%s", err, out)
	}

	initrd := filepath.Join(workDir, "initramfs")
	if err := appendInit(initrd, baseInitrd, initBin); err != nil {
		return testGuest{}, fmt.Sprintf("build the test initramfs: %v", err)
	}
	return testGuest{kernel: kernel, initrd: initrd}, ""
}

// appendInit writes base followed by an uncompressed newc archive that
// contains only /init. The kernel unpacks concatenated archives in order,
// so this /init replaces the bundle's. Each archive must start at a 4-byte
// aligned offset.
func appendInit(dst, base, initBin string) error {
	b, err := os.ReadFile(base)
	if err != nil {
		return err
	}
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	initData, err := os.ReadFile(initBin)
	if err != nil {
		return err
	}
	var cpio bytes.Buffer
	writeNewc(&cpio, 1, "init", 0o100755, initData)
	writeNewc(&cpio, 2, "TRAILER!!!", 0, nil)
	return os.WriteFile(dst, append(b, cpio.Bytes()...), 0o600)
}

// writeNewc writes one entry of a "newc" (SVR4, no checksum) cpio archive.
func writeNewc(w *bytes.Buffer, ino int, name string, mode uint32, data []byte) {
	fmt.Fprintf(w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	w.WriteString(name)
	w.WriteByte(0)
	for w.Len()%4 != 0 {
		w.WriteByte(0)
	}
	w.Write(data)
	for w.Len()%4 != 0 {
		w.WriteByte(0)
	}
}

// newTestProvider returns a provider whose run and snapshot directories
// are private to t. Its cleanup destroys every VM and checks that no QEMU
// process of this provider survives.
func newTestProvider(t testing.TB, opts Options) *Provider {
	t.Helper()
	// A short directory under /tmp keeps socket paths well under 107
	// bytes even with 64-character VM ids.
	dir, err := os.MkdirTemp("/tmp", "eq")
	if err != nil {
		t.Fatal(err)
	}
	opts.RunDir = dir
	if opts.Accel == "" {
		opts.Accel = AccelAuto
	}
	p, err := New(context.Background(), opts)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatalf("new provider: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		infos, _ := p.List(ctx)
		for _, info := range infos {
			if err := p.Destroy(ctx, info.ID); err != nil {
				t.Errorf("cleanup: destroy %q: %v", info.ID, err)
			}
		}
		if pids := qemuPIDsUnder(dir); len(pids) > 0 {
			t.Errorf("qemu processes left running: %v", pids)
		}
		os.RemoveAll(dir)
	})
	return p
}

// testConfig returns a cold-boot configuration of the test guest.
func testConfig(t testing.TB, id string) vm.Config {
	g := needGuest(t)
	return vm.Config{
		ID:              id,
		Kernel:          g.kernel,
		Initrd:          g.initrd,
		VCPUCount:       1,
		MemSizeMiB:      testMemMiB,
		BootArgs:        "console=ttyS0 reboot=k panic=1",
		TrackDirtyPages: true,
	}
}

// qemuPIDsUnder returns the ids of processes whose command line mentions
// dir, which every QEMU started by a provider with that run directory does.
func qemuPIDsUnder(dir string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(cmdline, []byte(dir+"/")) && bytes.Contains(cmdline, []byte("qemu")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// leaked reports what VM id left behind in p: its run directory or a QEMU
// process.
func leaked(p *Provider, id string) error {
	dir := filepath.Join(p.runDir, id)
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("run directory %s still exists", dir)
	}
	if pids := qemuPIDsUnder(dir); len(pids) > 0 {
		return fmt.Errorf("qemu processes %v still run", pids)
	}
	return nil
}

// ask sends one request line to the test init over the agent port and
// returns the reply line.
func ask(ctx context.Context, p *Provider, id, req string) (string, error) {
	conn, err := p.DialAgent(ctx, id)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	if _, err := conn.Write([]byte(req + "\n")); err != nil {
		return "", err
	}
	// A virtio-serial port keeps bytes across host reconnects, so the reply
	// to a ping that pollAgent gave up on can arrive on this connection
	// first. Only pings are retried that way, so skip stale pongs.
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return "", err
		}
		if reply := strings.TrimSpace(line); reply != "pong" || req == "ping" {
			return reply, nil
		}
	}
}

// waitAgent waits until the guest replies to a ping on the agent port.
func waitAgent(t testing.TB, p *Provider, id string) {
	t.Helper()
	if err := pollAgent(context.Background(), p, id, guestBootTimeout); err != nil {
		console, _ := p.Console(context.Background(), id)
		t.Fatalf("guest %q did not reply on the agent port: %v\nconsole:\n%s", id, err, tail(console, 2000))
	}
}

// pollAgent pings the guest until it replies or timeout passes. Each try
// has a short deadline because a guest that is still booting does not
// read the port, and the request then waits without a reply.
func pollAgent(ctx context.Context, p *Provider, id string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		tryCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		reply, err := ask(tryCtx, p, id, "ping")
		cancel()
		if err == nil && reply == "pong" {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("reply %q", reply)
		}
		lastErr = err
		if info, gerr := p.Get(ctx, id); gerr != nil || info.State == vm.StateFailed || info.State == vm.StateStopped {
			return fmt.Errorf("vm is %s (%s): %w", info.State, info.Reason, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("timed out after %s: %w", timeout, lastErr)
}

func mustAsk(t testing.TB, p *Provider, id, req string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	reply, err := ask(ctx, p, id, req)
	if err != nil {
		t.Fatalf("ask vm %q %q: %v", id, req, err)
	}
	return reply
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// sparseFile creates a sparse file of size bytes in dir.
func sparseFile(t testing.TB, dir, name string, size int64) string {
	t.Helper()
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return path
}

// readHeader returns the first n bytes of the file at path.
func readHeader(t testing.TB, path string, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}
