// Package guest is the guest side of Ember's agent: a [Server] that runs the
// requests of the protocol defined in package agent, the transports it
// serves on, and the steps that the agent performs as PID 1.
//
// # Server
//
// A [Server] serves any number of connections, each a single byte stream.
// Requests on a connection run concurrently up to [Config.MaxConcurrent].
// File, secret, environment, hostname and resolver paths resolve inside
// [Config.Root] through [os.Root], so neither ".." nor a symbolic link
// leads out of it. That makes the server runnable unprivileged on a host
// with a temporary root, which is how its tests run. Operations that change
// the whole guest (hostname, clock, network, shutdown) go through the
// [System] interface: [LinuxSystem] does them with system calls and
// rtnetlink, and without a System they fail with agent.ErrUnsupported.
//
// Exec starts each process in its own process group, so a timeout or a
// cancel kills its children too. The agent reads stdout and stderr from
// pipes. After the process exits, it waits up to 2 seconds for a
// background child that still holds a pipe open, then stops reading and
// replies.
//
// Secrets are written as files of mode 0600 in a directory of mode 0700
// (default /run/ember/secrets), each through a temporary file and a rename.
// Their values never appear in logs or error messages.
//
// # Transports
//
// [ListenVsock] and [Server.ServeVsock] serve vsock, which Firecracker
// provides. [FindVirtioPort] and [Server.ServeVirtioPort] serve the
// virtio-serial port named "ember.agent", which QEMU provides. The Linux
// driver returns EOF on that port while no host is connected, so the agent
// waits with epoll for the driver's report that the host connected (or
// polls every 50 ms with [Config.PollVirtioPort]) and reads again. Each
// host connection is one session: on EOF the agent ends the session and
// reopens the port.
//
// # PID 1
//
// [MountEssentials], [UseConsole], [LoadModules], [SwitchRoot],
// [SetLinkUp], [ConfigureByName] and [Reaper] are the boot steps that
// cmd/ember-agent calls in order. They need root and a guest kernel, so
// apart from the reaper, the command line parser and rtnetlink (tested in a
// private network namespace) they are tested by booting a QEMU guest.
//
// A typical host-side test:
//
//	srv, err := guest.NewServer(guest.Config{Root: t.TempDir()})
//	if err != nil {
//		t.Fatal(err)
//	}
//	hostEnd, guestEnd := net.Pipe()
//	go srv.ServeConn(ctx, guestEnd)
//	client, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return hostEnd, nil }, nil)
package guest
