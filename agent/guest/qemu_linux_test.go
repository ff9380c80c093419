package guest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
)

// qemuGuest is a running QEMU guest and an agent client connected to it.
type qemuGuest struct {
	client  *agent.Client
	sock    string
	monitor string
	exited  chan error
}

// bootQEMUGuest boots kernel and initrd from the environment with extra
// QEMU arguments and kernel parameters, and connects to the agent over the
// virtio-serial port. QEMU is killed in t.Cleanup.
func bootQEMUGuest(t *testing.T, ctx context.Context, extraArgs []string, params string) *qemuGuest {
	t.Helper()
	kernel, initrd := os.Getenv("EMBER_AGENT_TEST_KERNEL"), os.Getenv("EMBER_AGENT_TEST_INITRD")
	if kernel == "" || initrd == "" {
		t.Skip("set EMBER_AGENT_TEST_KERNEL to a PVH vmlinux and EMBER_AGENT_TEST_INITRD to an initramfs with ember-agent as /init to boot a guest")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not found; install the qemu-system-x86 package")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	console := filepath.Join(dir, "console.log")
	monitor := filepath.Join(dir, "monitor.sock")
	args := []string{
		"-M", "microvm,acpi=on", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:" + console,
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 " + tscParam() + params,
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=ember.agent",
		"-monitor", "unix:" + monitor + ",server=on,wait=off",
	}
	cmd := exec.Command(qemu, append(args, extraArgs...)...)
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	g := &qemuGuest{sock: sock, monitor: monitor, exited: make(chan error, 1)}
	go func() { g.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		err := <-g.exited
		g.exited <- err
		if t.Failed() {
			b, _ := os.ReadFile(console)
			t.Logf("qemu output:\n%s\nguest console:\n%s", qemuOut.String(), b)
		}
	})

	start := time.Now()
	client, err := agent.Dial(ctx, agent.UnixDialer(sock), nil)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { client.Close() })
	t.Logf("agent answered %v after qemu started", time.Since(start).Round(time.Millisecond))
	g.client = client
	return g
}

// powerOff shuts the guest down through the agent and waits for QEMU to
// exit.
func (g *qemuGuest) powerOff(t *testing.T, ctx context.Context, client *agent.Client) {
	t.Helper()
	if err := client.Shutdown(ctx, agent.ActionPowerOff); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	g.waitExit(t, ctx)
}

// pressPowerButton sends an ACPI power button press through the QEMU
// monitor and waits for the guest to power off.
func (g *qemuGuest) pressPowerButton(t *testing.T, ctx context.Context) {
	t.Helper()
	conn, err := net.Dial("unix", g.monitor)
	if err != nil {
		t.Fatalf("dial qemu monitor: %v", err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "system_powerdown\n"); err != nil {
		t.Fatalf("send system_powerdown: %v", err)
	}
	g.waitExit(t, ctx)
}

func (g *qemuGuest) waitExit(t *testing.T, ctx context.Context) {
	t.Helper()
	select {
	case err := <-g.exited:
		g.exited <- err
		if err != nil {
			t.Errorf("qemu exited with %v after power-off", err)
		}
	case <-ctx.Done():
		t.Fatal("guest did not power off")
	}
}

// TestQEMUGuest boots a real guest whose initramfs has ember-agent as /init
// and drives it over the virtio-serial port, as the QEMU provider does. It
// needs EMBER_AGENT_TEST_KERNEL (an uncompressed PVH vmlinux) and
// EMBER_AGENT_TEST_INITRD (an initramfs with the agent at /init, the virtio
// modules listed in /etc/ember/modules, and busybox's sh, uname, cat, grep
// and sleep in PATH).
func TestQEMUGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootQEMUGuest(t, ctx, nil, "ip=10.0.2.15::10.0.2.2:255.255.255.0:agent-guest::off")
	client := g.client

	health, err := client.Health(ctx)
	if err != nil {
		t.Fatalf("Health: %v", err)
	}
	if health.BootID == "" || health.Hostname != "agent-guest" {
		t.Errorf("Health = %+v, want a boot id and the hostname from ip=", health)
	}

	var out bytes.Buffer
	res, err := client.Exec(ctx, agent.ExecRequest{Argv: []string{"uname", "-r"}}, agent.ExecIO{Stdout: &out})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec uname -r = %+v, %v", res, err)
	}
	release := strings.TrimSpace(out.String())
	t.Logf("guest kernel release: %s", release)
	if release == "" {
		t.Error("uname -r printed nothing")
	}

	if _, err := client.PutFile(ctx, agent.FilePutRequest{Path: "/tmp/hello", Mode: 0o600}, strings.NewReader("hi\n")); err != nil {
		t.Fatalf("PutFile: %v", err)
	}
	out.Reset()
	if _, err := client.Exec(ctx, agent.ExecRequest{Argv: []string{"cat", "/tmp/hello"}}, agent.ExecIO{Stdout: &out}); err != nil || out.String() != "hi\n" {
		t.Fatalf("cat /tmp/hello = %q, %v", out.String(), err)
	}
	// An orphan: the shell exits at once and its background child is
	// reparented to the agent, which must reap it.
	if _, err := client.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "sleep 0.2 &"}}, agent.ExecIO{}); err != nil {
		t.Fatalf("exec orphan: %v", err)
	}
	if err := client.SyncClock(ctx, time.Now()); err != nil {
		t.Errorf("SyncClock: %v", err)
	}
	if err := client.SetSecrets(ctx, map[string][]byte{"token": []byte("x")}); err != nil {
		t.Errorf("SetSecrets: %v", err)
	}

	// A second connection after the first closes: the port must serve the
	// host again.
	client.Close()
	client2, err := agent.Dial(ctx, agent.UnixDialer(g.sock), nil)
	if err != nil {
		t.Fatalf("Dial again: %v", err)
	}
	defer client2.Close()
	out.Reset()
	if _, err := client2.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "sleep 1; cat /proc/[0-9]*/stat | grep -c ') Z ' || true"}}, agent.ExecIO{Stdout: &out}); err != nil {
		t.Fatalf("count zombies: %v", err)
	}
	if got := strings.TrimSpace(out.String()); got != "0" {
		t.Errorf("zombie processes in the guest: %s", got)
	}

	g.powerOff(t, ctx, client2)
}

// TestQEMUGuestSwitchRoot boots with ember.mode=switchroot and an ext4 root
// disk that the test builds with mkfs.ext4 -d, and checks that the agent
// serves from the new root.
func TestQEMUGuestSwitchRoot(t *testing.T) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skip("mkfs.ext4 not found; install the e2fsprogs package")
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox not found; install the busybox-static package")
	}
	tree := t.TempDir()
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "tmp", "run"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "bin/busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"sh", "cat", "uname"} {
		if err := os.Symlink("busybox", filepath.Join(tree, "bin", name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(tree, "etc/ember-root"), []byte("from the root disk\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "root.ext4")
	if out, err := exec.Command(mkfs, "-q", "-F", "-d", tree, img, "16M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootQEMUGuest(t, ctx, []string{
		"-drive", "file=" + img + ",if=none,id=root,format=raw",
		"-device", "virtio-blk-device,drive=root",
	}, "ember.mode=switchroot ember.root=/dev/vda ember.rootfstype=ext4")

	var out bytes.Buffer
	if _, err := g.client.Exec(ctx, agent.ExecRequest{Argv: []string{"cat", "/etc/ember-root"}}, agent.ExecIO{Stdout: &out}); err != nil {
		t.Fatalf("cat /etc/ember-root: %v", err)
	}
	if out.String() != "from the root disk\n" {
		t.Errorf("/etc/ember-root = %q, want the root disk's marker", out.String())
	}
	out.Reset()
	if _, err := g.client.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "test -e /init && echo initramfs || echo root-disk; cat /proc/1/comm"}}, agent.ExecIO{Stdout: &out}); err != nil {
		t.Fatalf("check root: %v", err)
	}
	if got := out.String(); !strings.HasPrefix(got, "root-disk\n") {
		t.Errorf("root check printed %q, want the root disk without /init", got)
	}
	g.pressPowerButton(t, ctx)
}

// tscParam returns a tsc_early_khz= kernel parameter with the host's CPU
// frequency, or "" when /proc/cpuinfo has none. Under TCG the guest reads
// the host's TSC, and on a loaded host the kernel's PIT calibration of it
// fails; the kernel then hangs calibrating its delay loop, right after
// "tsc: Marking TSC unstable due to could not calculate TSC khz". That
// happened in 3 of 3 concurrent boots of Debian's 6.1 cloud kernel on a
// 2-core host, and none hung with the parameter.
func tscParam() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(b)) {
		key, value, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(key) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil || mhz <= 0 {
			return ""
		}
		return fmt.Sprintf("tsc_early_khz=%d ", int(mhz*1000))
	}
	return ""
}
