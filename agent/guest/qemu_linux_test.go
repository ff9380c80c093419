package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
)

// TestQEMUGuest boots a real guest whose initramfs has ember-agent as /init
// and drives it over the virtio-serial port, as the QEMU provider does. It
// needs EMBER_AGENT_TEST_KERNEL (an uncompressed PVH vmlinux) and
// EMBER_AGENT_TEST_INITRD (an initramfs with the agent at /init, the virtio
// modules listed in /etc/ember/modules, and busybox's sh, uname, cat, grep and sleep in PATH).
func TestQEMUGuest(t *testing.T) {
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
	cmd := exec.Command(qemu,
		"-M", "microvm,acpi=on", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:"+console,
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 ip=10.0.2.15::10.0.2.2:255.255.255.0:agent-guest::off",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=ember.agent",
	)
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			b, _ := os.ReadFile(console)
			t.Logf("qemu output:\n%s\nguest console:\n%s", qemuOut.String(), b)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	client, err := agent.Dial(ctx, agent.UnixDialer(sock), nil)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer client.Close()
	t.Logf("agent answered %v after qemu started", time.Since(start).Round(time.Millisecond))

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
	client2, err := agent.Dial(ctx, agent.UnixDialer(sock), nil)
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

	if err := client2.Shutdown(ctx, agent.ActionPowerOff); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("qemu exited with %v after power-off", err)
		}
	case <-ctx.Done():
		t.Fatal("guest did not power off")
	}
}
