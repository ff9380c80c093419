// Package firecracker runs Ember VMs on Firecracker. [Provider] implements
// [vm.Provider] and the optional console, agent, snapshot-deletion and
// version interfaces.
//
// Each VM is one Firecracker process, started directly or through the
// jailer ([JailerConfig]), with a short-named run directory under
// [Config].RunDir for its API socket, console log, Firecracker log and
// metrics file. The provider drives the process over its API socket with
// package fcapi, which checks version-gated fields before sending them, so
// a request that the running version would reject fails first with a
// [*vm.UnsupportedError]. The guest's serial console is the process's
// stdout. Firecracker's log goes to the log file, so only its stderr, such
// as a panic message, shares the console with the guest.
//
// A VM whose [vm.Config].NetNS is set runs in that network namespace, so
// its TAP devices must live there. Unjailed, Firecracker is forked from a
// thread that has entered the namespace and leaves it again before other
// goroutines can use the thread. Jailed, the jailer joins the namespace
// with --netns. API, vsock and uffd sockets are files and work across
// namespaces.
//
// Snapshots live under [Config].SnapshotDir/<vm id>/<snapshot id>/ with a
// meta.json that records the writing version and the machine shape, so a
// restore that cannot work is rejected before a process starts. A restore
// of a diff snapshot merges the chain onto its full base with package
// memfile; [memfile.Merger] offers the same merge to Ember's snapshot store.
//
// Limits: a snapshot loads only on the Firecracker minor version that wrote
// it. network_overrides needs Firecracker 1.12 and vsock_override 1.16, and
// older versions reject a restore that sets them. A failed snapshot load
// ends the process, so the provider never retries within one process.
//
//	p, err := firecracker.New(firecracker.Config{
//		Binary: "/usr/local/bin/firecracker", RunDir: "/run/ember", SnapshotDir: "/var/lib/ember/snapshots",
//	})
//	...
//	info, err := p.Create(ctx, cfg) // cfg from vm.Resolve
//	err = p.Start(ctx, info.ID)
package firecracker
