package qemu

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/embervm/ember/vm"
)

// Names of the files in a VM's run directory.
const (
	qmpSocketName   = "qmp.sock"
	agentSocketName = "agent.sock"
	serialLogName   = "serial.log"
	stderrLogName   = "qemu.log"
	pidFileName     = "qemu.pid"
	// driveCopyDir contains the private copies of writable drives that a
	// restored VM runs on.
	driveCopyDir = "drives"
)

// AgentPortName is the name of the virtio-serial port that carries the
// guest agent's byte stream. The guest finds the port under this name in
// /sys/class/virtio-ports/*/name (or /dev/virtio-ports/ with udev).
const AgentPortName = "ember.agent"

// launch holds the per-process inputs of the command line that are not
// part of the machine: where the sockets go and how the guest starts.
type launch struct {
	runDir string
	accel  Accel
	// tcgMultiThread selects one host thread per vCPU under TCG.
	tcgMultiThread bool
	// incomingFD, when nonzero, is the inherited descriptor from which
	// QEMU loads a migration stream instead of booting.
	incomingFD int
}

// buildArgs returns QEMU's argv (without the program name) for machine m.
// Every value reaches QEMU as its own argument and no shell is involved.
// QEMU's option syntax still splits values on commas, so paths are escaped
// by doubling their commas.
func buildArgs(m *machine, l launch) []string {
	args := []string{
		"-nodefaults", "-no-user-config",
		"-display", "none",
		// A guest reboot makes QEMU exit, so a guest reboot or panic ends
		// the VM instead of restarting it behind the provider's back.
		"-no-reboot",
		// Start with the vCPUs stopped: a cold-booted VM waits for Start,
		// and a restored VM waits until the caller resumes it.
		"-S",
		"-M", "microvm,acpi=on,x-option-roms=off",
		"-smp", strconv.Itoa(m.VCPUCount),
		"-m", strconv.Itoa(m.MemSizeMiB) + "M",
		"-kernel", m.Kernel,
		"-append", m.BootArgs,
		"-pidfile", filepath.Join(l.runDir, pidFileName),
		"-chardev", "socket,id=qmp,server=on,wait=off,path=" + escapeOpt(filepath.Join(l.runDir, qmpSocketName)),
		"-mon", "chardev=qmp,mode=control",
		// The serial console goes to a file that QEMU writes itself, so
		// that it keeps being captured after the provider that started
		// QEMU has gone. The provider follows the file into its ring
		// buffer.
		"-chardev", "file,id=serial0,append=on,path=" + escapeOpt(filepath.Join(l.runDir, serialLogName)),
		"-serial", "chardev:serial0",
		"-chardev", "socket,id=agent,server=on,wait=off,path=" + escapeOpt(filepath.Join(l.runDir, agentSocketName)),
		"-device", "virtio-serial-device,id=vser0",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=" + AgentPortName,
	}
	switch l.accel {
	case AccelKVM:
		args = append(args, "-accel", "kvm", "-cpu", "host")
	default:
		accel := "tcg"
		if l.tcgMultiThread {
			accel += ",thread=multi"
		}
		args = append(args, "-accel", accel)
	}
	if m.Initrd != "" {
		args = append(args, "-initrd", m.Initrd)
	}
	for i, d := range m.Drives {
		args = append(args,
			"-drive", driveOption(i, d),
			"-device", fmt.Sprintf("virtio-blk-device,drive=drive%d", i))
	}
	for i, n := range m.NICs {
		netdev := fmt.Sprintf("tap,id=net%d,ifname=%s,script=no,downscript=no", i, escapeOpt(n.TAP))
		dev := fmt.Sprintf("virtio-net-device,netdev=net%d,mac=%s", i, n.MAC)
		if n.MTU != 0 {
			dev += ",host_mtu=" + strconv.Itoa(n.MTU)
		}
		args = append(args, "-netdev", netdev, "-device", dev)
	}
	if m.VsockCID != 0 {
		args = append(args, "-device", fmt.Sprintf("vhost-vsock-device,guest-cid=%d", m.VsockCID))
	}
	if l.incomingFD != 0 {
		args = append(args, "-incoming", "fd:"+strconv.Itoa(l.incomingFD))
	}
	return args
}

// driveOption returns the -drive value for drive d at index i. Drives get
// positional ids (drive0, drive1, ...) so that ids from the spec never need
// escaping and a restore lines up devices by position.
func driveOption(i int, d machineDrive) string {
	var b strings.Builder
	fmt.Fprintf(&b, "id=drive%d,if=none,format=raw,file=%s", i, escapeOpt(d.Path))
	if d.ReadOnly {
		b.WriteString(",readonly=on")
	}
	for _, kv := range throttleOptions(d.RateLimiter) {
		b.WriteString(",throttling.")
		b.WriteString(kv)
	}
	return b.String()
}

// throttleOptions maps Firecracker-style token buckets onto QEMU's block
// throttling options, as "key=value" strings without the "throttling."
// prefix.
//
// A bucket of Size tokens refilled every RefillTime ms becomes the average
// rate Size*1000/RefillTime per second: bps-total for Bandwidth, iops-total
// for Ops. Both directions share the limit, as in Firecracker.
//
// OneTimeBurst has no exact QEMU counterpart. It becomes a burst rate of
// average+OneTimeBurst per second allowed for one second (bps-total-max and
// bps-total-max-length=1), so the guest can move about OneTimeBurst extra
// units at the start. Unlike Firecracker's credit, QEMU refills that burst
// allowance while the device is idle, so a guest that pauses its I/O gets
// the burst again.
//
// Without OneTimeBurst, QEMU lets a bucket fill to one tenth of a second of
// average rate, a smaller initial burst than Firecracker's full bucket of
// Size tokens.
func throttleOptions(r *vm.RateLimiter) []string {
	if r == nil {
		return nil
	}
	var out []string
	add := func(key string, b *vm.TokenBucket) {
		if !b.Enabled() {
			return
		}
		rate := max(b.Size*1000/b.RefillTime, 1)
		out = append(out, fmt.Sprintf("%s-total=%d", key, rate))
		if b.OneTimeBurst > 0 {
			out = append(out,
				fmt.Sprintf("%s-total-max=%d", key, rate+b.OneTimeBurst),
				fmt.Sprintf("%s-total-max-length=1", key))
		}
	}
	add("bps", r.Bandwidth)
	add("iops", r.Ops)
	return out
}

// escapeOpt escapes a value for QEMU's key=value,... option syntax, in
// which a literal comma is written as two.
func escapeOpt(s string) string {
	return strings.ReplaceAll(s, ",", ",,")
}
