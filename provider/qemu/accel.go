package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"time"
)

// Accel is a QEMU accelerator choice.
type Accel string

const (
	// AccelAuto uses KVM when a hardware KVM module is loaded and a probe
	// guest boots under it, and TCG otherwise.
	AccelAuto Accel = "auto"
	// AccelKVM requires KVM.
	AccelKVM Accel = "kvm"
	// AccelTCG uses QEMU's software emulation, which runs anywhere but is
	// much slower.
	AccelTCG Accel = "tcg"
)

// hardwareKVMModules are the kernel modules that back /dev/kvm with
// hardware virtualization. Other providers of /dev/kvm, such as the
// kvm_pvm module for nested use, cannot run an unmodified Linux guest.
var hardwareKVMModules = []string{"kvm_intel", "kvm_amd"}

// probeMarker is the message the probe kernel prints once it has run all
// of its initialization and looks for a root file system. The probe boots
// without one on purpose, so reaching this panic proves that the guest
// kernel runs under the accelerator.
var probeMarker = []byte("VFS: Unable to mount root fs")

// acceleratorFor returns the accelerator for the provider, choosing it on
// the first call. kernel is the guest kernel used for the KVM probe.
func (p *Provider) acceleratorFor(ctx context.Context, kernel string) Accel {
	p.accelOnce.Do(func() {
		accel, reason := p.chooseAccel(ctx, kernel)
		p.mu.Lock()
		p.accel = accel
		p.mu.Unlock()
		p.log.Info("accelerator selected", "accel", accel, "reason", reason)
	})
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accel
}

func (p *Provider) chooseAccel(ctx context.Context, kernel string) (Accel, string) {
	module := ""
	for _, m := range hardwareKVMModules {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			module = m
			break
		}
	}
	if module == "" {
		return AccelTCG, "no hardware kvm module (kvm_intel or kvm_amd) is loaded"
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		return AccelTCG, "cannot open /dev/kvm: " + err.Error()
	} else {
		f.Close()
	}
	if err := p.probeKVM(ctx, kernel); err != nil {
		return AccelTCG, "kvm probe guest failed: " + err.Error()
	}
	return AccelKVM, "probe guest booted under kvm (module " + module + ")"
}

// probeKVM boots kernel under KVM with no root file system and waits up to
// ProbeTimeout for it to reach the root mount panic.
//
// NOTE: this path runs only on hosts with kvm_intel or kvm_amd loaded. The
// project's own machines have neither, so it has not been run there.
func (p *Provider) probeKVM(ctx context.Context, kernel string) error {
	ctx, cancel := context.WithTimeout(ctx, p.opts.ProbeTimeout)
	defer cancel()

	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, p.binary,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-M", "microvm,acpi=on,x-option-roms=off",
		"-accel", "kvm", "-cpu", "host", "-m", "128M",
		"-kernel", kernel,
		"-append", "console=ttyS0 panic=-1",
		"-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0")
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if bytes.Contains(out.Bytes(), probeMarker) {
		return nil
	}
	if ctx.Err() != nil {
		return errors.New("guest did not boot before the deadline")
	}
	if err != nil {
		return err
	}
	return errors.New("guest exited before it finished booting")
}
