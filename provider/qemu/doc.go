// Package qemu is the [vm.Provider] that runs each VM as a QEMU process
// with the microvm machine type. It boots real Linux guests under KVM
// where KVM can run them, and under TCG software emulation everywhere
// else, which is how Ember runs a real guest on hosts whose /dev/kvm cannot.
//
// # Model
//
// Every VM is one qemu-system-x86_64 process, started without a shell from
// an argument list built from the resolved [vm.Config]: -M microvm with
// ACPI, no default devices, PVH boot of an uncompressed vmlinux plus an
// optional initramfs. QEMU starts with its vCPUs stopped (-S), so a created
// VM is configured but has not run, as in Firecracker's pre-boot phase.
// Start, Pause and Resume are the QMP commands cont, stop and cont. The
// provider keeps one QMP connection per VM, drains its events all the time
// and follows STOP, RESUME and SHUTDOWN events, so a stop it did not ask
// for still shows as paused. A goroutine waits on the process. When QEMU
// exits after the guest powered off or rebooted (-no-reboot turns a reboot
// into an exit), the VM is stopped. When QEMU dies otherwise, the VM is
// failed, with the exit status and QEMU's last stderr lines as the reason.
//
// Each VM has a run directory <RunDir>/<id> with qmp.sock, agent.sock,
// serial.log (the whole console, written by QEMU), qemu.log (QEMU's
// stderr), qemu.pid and vm.json (the VM's configuration, machine and pid).
// The provider follows serial.log into a ring buffer bounded in lines and
// bytes. Destroy removes the directory. Rename renames it while QEMU keeps
// running, because open files and bound sockets move with the directory.
//
// QEMU outlives the provider that started it. [Provider.Close] detaches
// from every VM, and [New] adopts the VMs it finds in RunDir: it reconnects
// to QMP, reads the state back with query-status and follows the process
// with a pidfd. A VM whose QEMU exited while no provider watched it is
// adopted as failed, so that its console stays readable until Destroy.
//
// # Devices
//
//   - Drives are virtio-blk-device in attach order, root drive first, so the
//     guest names them vda, vdb and so on. Read-only drives are opened read-only.
//     Token buckets become QEMU's throttling options: Size per RefillTime
//     becomes the average bps-total or iops-total, and OneTimeBurst becomes
//     a one-second burst above it (the *-max options). QEMU refills that
//     burst while the device is idle, unlike Firecracker's one-time credit;
//     throttleOptions documents the mapping.
//   - NICs are tap netdevs with the given TAP name and a virtio-net-device
//     with the given MAC, or one derived from the VM and interface ids.
//     QEMU runs, and opens its TAPs, in the network namespace named by the
//     VM's [vm.Config].NetNS, or by [Options.NetNS] when the VM names none.
//     Create rejects a path that is not a network namespace with a
//     [vm.ValidationError] on field "netns" before it starts anything.
//     A restore runs in the namespace of the restore's configuration, not
//     that of the snapshot's source. NIC rate limiters are rejected with
//     [vm.UnsupportedError].
//   - The agent channel is the virtio-serial port named [AgentPortName],
//     whose host side is agent.sock with QEMU as the server. DialAgent
//     connects to it; QEMU serves one connection at a time.
//   - A vsock device needs vhost-vsock, so it is rejected with
//     [vm.UnsupportedError] on hosts without /dev/vhost-vsock.
//
// # Accelerator
//
// [AccelAuto] uses KVM only when kvm_intel or kvm_amd is loaded and a probe
// guest (the VM's kernel, booted without a root file system) reaches its
// root-mount panic within [Options.ProbeTimeout]. Otherwise it uses TCG,
// and it logs which and why. Under TCG the provider appends tsc_early_khz
// to the kernel command line (see [Options.TSCKHz]): microvm has no HPET
// or ACPI PM timer, and a guest that cannot calibrate its TSC against the
// PIT on a busy host hangs during boot.
//
// # Snapshots
//
// A snapshot is a full snapshot of a paused VM in
// <SnapshotDir>/<vm id>/<snapshot id>/: "state" is QEMU's migration stream
// (QEMU 7.2 has no file: migration, so the file's descriptor is passed
// over QMP with getfd and the migration goes to fd:), and machine.json
// records the machine shape, the device list and the file sizes. A restore
// starts QEMU with the same machine and -incoming, so the restored VM comes
// up paused, or running when the reference asks to resume immediately.
// Network overrides attach interfaces to other TAP devices, and every
// restored VM gets its own agent socket in its own run directory.
//
// Drive rule: a writable drive is copied into the snapshot (sharing blocks
// with FICLONE where the file system can, otherwise keeping holes), and each
// restore runs on its own copy of that, in its run directory. A read-only
// drive is referenced at its original path, and a restore fails with
// [vm.ErrSnapshotIncompatible] when its size or modification time changed.
//
// A restore also fails with [vm.ErrSnapshotIncompatible] when another QEMU
// version wrote the snapshot (microvm has no versioned machine types), when
// the spec expects another vCPU count or memory size, or when QEMU cannot
// load the stream. It fails with [ErrSnapshotCorrupt] when a file is
// missing or has another size than recorded. Diff snapshots are not
// supported and return [vm.UnsupportedError].
//
// # Limits
//
// QEMU refuses to migrate a VM again until it has run. A second snapshot of
// a VM that stayed paused therefore copies the state file of the first.
// An adopted VM that is paused after a snapshot has lost that record, so
// it must run before its next snapshot. The exit status of an adopted
// QEMU is not known, because it belongs to the process that started it.
// Two providers must not share a RunDir at the same time.
//
// A typical use:
//
//	p, err := qemu.New(ctx, qemu.Options{RunDir: "/run/ember"})
//	if err != nil {
//		return err
//	}
//	cfg, err := vm.Resolve("web-1", defaults, spec)
//	if err != nil {
//		return err
//	}
//	if _, err := p.Create(ctx, cfg); err != nil {
//		return err
//	}
//	if err := p.Start(ctx, "web-1"); err != nil {
//		return err
//	}
//	conn, err := p.DialAgent(ctx, "web-1")
package qemu
