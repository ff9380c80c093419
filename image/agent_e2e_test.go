package image

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
)

var (
	extractedKernelOnce sync.Once
	extractedVmlinux    string
	extractedModules    string
	extractedKernelErr  error
)

// extractedDebianKernel extracts the Debian cloud kernel package once per
// test binary and returns the paths of its vmlinux and module tree.
func extractedDebianKernel(t *testing.T) (vmlinux, modules string) {
	t.Helper()
	deb := debianKernel(t)
	shared := sharedTempDir(t)
	extractedKernelOnce.Do(func() {
		scratch := filepath.Join(shared, "extracted")
		k, err := loadKernelFile(context.Background(), deb, scratch)
		if err != nil {
			extractedKernelErr = err
			return
		}
		extractedVmlinux = filepath.Join(scratch, "vmlinux")
		extractedKernelErr = os.WriteFile(extractedVmlinux, k.vmlinux, 0o644)
		extractedModules = k.moduleRoot
	})
	if extractedKernelErr != nil {
		t.Fatalf("extract %s: %v", deb, extractedKernelErr)
	}
	return extractedVmlinux, extractedModules
}

// buildRealAgent builds cmd/ember-agent as a static binary.
func buildRealAgent(t *testing.T) string {
	t.Helper()
	requireTools(t, "the agent is built with the go tool", "go")
	out := filepath.Join(t.TempDir(), "ember-agent")
	cmd := exec.Command("go", "build", "-o", out, "github.com/embervm/ember/cmd/ember-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build ember-agent: %v\n%s", err, b)
	}
	return out
}

// TestBootRealAgentQEMU builds a bundle from a bare vmlinux and a module
// tree with the real ember-agent, boots it in QEMU's microvm machine under
// TCG in both agent modes, and talks to the agent over the ember.agent
// virtio-serial port.
func TestBootRealAgentQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a real kernel; skipped with -short")
	}
	requireTools(t, "install qemu-system-x86", "qemu-system-x86_64")
	requireTools(t, "install e2fsprogs", "mkfs.ext4", "debugfs")
	if _, err := os.Stat(DefaultBusybox); err != nil {
		t.Skipf("%s is missing: install Debian's busybox-static", DefaultBusybox)
	}
	vmlinux, modules := extractedDebianKernel(t)
	agentBin := buildRealAgent(t)

	res, err := Build(context.Background(), Options{
		Dir:     filepath.Join(t.TempDir(), "bundle"),
		Kernel:  vmlinux,
		Modules: modules,
		Agent:   agentBin,
	})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	m := res.Manifest
	if m.KernelRelease != filepath.Base(modules) {
		t.Fatalf("kernel release %q from the vmlinux banner, module tree %s", m.KernelRelease, modules)
	}

	for _, mode := range []string{ModeInitramfs, ModeSwitchRoot} {
		t.Run(mode, func(t *testing.T) {
			vm := startQEMU(t, res, mode)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()

			c, err := agent.Dial(ctx, agent.UnixDialer(vm.socket), nil)
			if err != nil {
				t.Fatalf("dial agent: %v\nconsole:\n%s", err, tail(vm.console(), 40))
			}
			defer c.Close()

			var release bytes.Buffer
			if _, err := c.GetFile(ctx, "/proc/sys/kernel/osrelease", &release); err != nil {
				t.Fatalf("get osrelease: %v", err)
			}
			if got := strings.TrimSpace(release.String()); got != m.KernelRelease {
				t.Errorf("guest kernel release %q, want %q", got, m.KernelRelease)
			}

			if mode == ModeSwitchRoot {
				// The root filesystem brings busybox, so uname exists.
				var out bytes.Buffer
				r, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"uname", "-r"}}, agent.ExecIO{Stdout: &out})
				if err != nil || r.ExitCode != 0 {
					t.Fatalf("exec uname -r: %+v, %v\nconsole:\n%s", r, err, tail(vm.console(), 40))
				}
				if got := strings.TrimSpace(out.String()); got != m.KernelRelease {
					t.Errorf("uname -r = %q, want %q", got, m.KernelRelease)
				}
				var hostname bytes.Buffer
				if _, err := c.GetFile(ctx, "/etc/hostname", &hostname); err != nil || hostname.String() != "ember\n" {
					t.Errorf("/etc/hostname from the root filesystem = %q, %v", hostname.String(), err)
				}
			}

			if err := c.Shutdown(ctx, agent.ActionPowerOff); err != nil {
				t.Fatalf("shutdown: %v", err)
			}
			if err := vm.wait(2 * time.Minute); err != nil {
				t.Fatalf("qemu after power-off: %v\nconsole:\n%s", err, tail(vm.console(), 40))
			}
		})
	}
}

// qemuVM is a QEMU process started by a test.
type qemuVM struct {
	cmd    *exec.Cmd
	socket string
	mu     sync.Mutex
	out    bytes.Buffer
	// exited is closed when QEMU has exited, and waitErr is then its
	// exit status.
	exited  chan struct{}
	waitErr error
}

func (v *qemuVM) Write(p []byte) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.out.Write(p)
}

func (v *qemuVM) console() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.out.String()
}

// wait waits for QEMU to exit by itself, and kills it after timeout.
func (v *qemuVM) wait(timeout time.Duration) error {
	select {
	case <-v.exited:
		return v.waitErr
	case <-time.After(timeout):
		v.cmd.Process.Kill()
		<-v.exited
		return errors.New("qemu did not exit in time and was killed")
	}
}

// startQEMU boots the bundle with a virtio-serial port named ember.agent on
// a Unix socket that QEMU serves, and the root filesystem on virtio-blk.
// The test's cleanup kills QEMU if it is still running.
func startQEMU(t *testing.T, res *Result, mode string) *qemuVM {
	t.Helper()
	dir := t.TempDir()
	vm := &qemuVM{socket: filepath.Join(dir, "agent.sock"), exited: make(chan struct{})}
	args := []string{
		"-M", "microvm,acpi=on", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
		"-kernel", filepath.Join(res.Dir, VmlinuxFile),
		"-initrd", filepath.Join(res.Dir, InitramfsFile),
		// The drive is read-only, so that the bundle stays intact, and the
		// root must then be mounted read-only too.
		"-append", res.Manifest.BootArgs[mode] + " ember.rootflags=ro" + tcgTSCArg(t),
		"-drive", "id=root,file=" + filepath.Join(res.Dir, RootfsFile) + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=root",
		"-chardev", "socket,id=agent,path=" + vm.socket + ",server=on,wait=off",
		"-device", "virtio-serial-device",
		"-device", "virtserialport,chardev=agent,name=ember.agent",
	}
	vm.cmd = exec.Command("qemu-system-x86_64", args...)
	vm.cmd.Stdout = vm
	vm.cmd.Stderr = vm
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		vm.waitErr = vm.cmd.Wait()
		close(vm.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-vm.exited:
		default:
			vm.cmd.Process.Kill()
			<-vm.exited
		}
	})

	// QEMU creates the socket before it starts the guest.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(vm.socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu created no socket at %s:\n%s", vm.socket, vm.console())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return vm
}
