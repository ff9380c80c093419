// Package vm defines Ember's model of a microVM and the contract that every
// backend (Firecracker, QEMU microvm, the in-memory test provider) implements.
//
// A VM is described in two layers. [Defaults] holds the workspace defaults:
// kernel, initramfs, root filesystem, machine shape and kernel command line.
// [Spec] holds per-VM overrides in which every field is optional, and an unset
// field means "use the workspace default". [Resolve] merges the two into a
// [Config], validates the result and returns every problem it finds at once
// as a [*ValidationError]. Providers execute only a resolved Config, so a bad
// spec never starts a process.
//
// A restore is a create whose Config has RestoreFrom set. The snapshot carries
// its own machine configuration, so on restore the cold-boot fields of the
// spec and of the defaults are ignored. Only the overrides apply: a new host
// TAP per network interface, a new vsock socket path, and dirty-page tracking,
// which a snapshot does not store. An explicit vcpu_count or mem_size_mib in a
// restore spec is kept as an expectation, and a provider rejects the restore
// with [ErrSnapshotIncompatible] when the snapshot's shape differs.
//
// The life cycle of a VM is a small state machine owned by [Transition]:
//
//	created --start--> running --pause--> paused --resume--> running
//	created|running|paused --shutdown--> stopped
//	running --guest power-off--> stopped
//	created|running|paused --VMM died--> failed
//	any state --destroy--> destroyed
//
// Snapshots are taken while a VM is paused and outlive the VM that made them.
//
// A typical use:
//
//	cfg, err := vm.Resolve("web-1", defaults, spec)
//	if err != nil {
//		return err // *vm.ValidationError listing every problem
//	}
//	if _, err := p.Create(ctx, cfg); err != nil {
//		return err
//	}
//	if err := p.Start(ctx, "web-1"); err != nil {
//		return err
//	}
//
// Backends add capabilities beyond [Provider] as small interfaces, such as
// [ConsoleReader] and [AgentDialer], that a caller discovers with a type
// assertion.
package vm
