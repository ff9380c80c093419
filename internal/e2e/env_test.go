package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/image"
	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/netns"
	"github.com/embervm/ember/network/networktest"
	"github.com/embervm/ember/network/nft"
	"github.com/embervm/ember/provider/qemu"
	"github.com/embervm/ember/vm"
)

// bundleEnv names the guest bundle directory, built by ember image build.
const bundleEnv = "EMBER_TEST_BUNDLE"

// guestMemMiB keeps guests small, because four run at once under TCG.
const guestMemMiB = 128

// agentTimeout bounds the wait for a guest's agent after Start. TCG
// guests boot slowly on a busy 2-core machine, so it is generous. It only
// stops a hung test and is not a measurement.
const agentTimeout = 2 * time.Minute

// Addresses of the test's world: the host's uplink up0 and the servers
// behind it. Only allowedAddr is in the networks' allowlist.
const (
	hostAddr    = "10.60.0.1:8080"
	allowedAddr = "10.60.0.2:8080"
	deniedAddr  = "10.60.0.3:8080"
	// bridgeGatewayAddr is a server on the bridge's own address, which is
	// the bridge-mode guests' gateway.
	bridgeGatewayAddr = "10.50.0.1:8080"
	// guestPort is where a guest's own test server listens.
	guestPort = "8080"
)

var allowWorld = []nft.Rule{{Dest: netip.MustParsePrefix("10.60.0.2/32"), Protocol: nft.ProtocolTCP, Port: 8080}}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// env is a host namespace with uplink up0 (10.60.0.1/24) to a world
// namespace that serves TCP on allowedAddr and deniedAddr, a network
// Manager whose TAPs are real and live in the host namespace or in slots,
// and a QEMU provider whose guests use them.
type env struct {
	hostName, host string
	dbPath         string
	store          *network.Store
	mgr            *network.Manager
	nets           []network.Network
	prov           *qemu.Provider
	runDir         string
	defaults       vm.Defaults
}

// requireHost skips t unless the host can run the test: root, the
// kernel's namespace and TAP support, QEMU and a guest bundle.
func requireHost(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces, TAP devices and nftables rules: run the tests as root")
	}
	networktest.RequireKernel(t)
	if _, err := exec.LookPath(qemu.DefaultBinary); err != nil {
		t.Skipf("needs %s: apt-get install qemu-system-x86", qemu.DefaultBinary)
	}
	bundle := os.Getenv(bundleEnv)
	if bundle == "" {
		t.Skipf("needs a guest bundle: build one with `ember image build --dir DIR --agent ember-agent` and set %s=DIR", bundleEnv)
	}
	return bundle
}

func newEnv(t *testing.T) *env {
	t.Helper()
	bundle := requireHost(t)
	manifest, err := image.ReadManifest(bundle)
	if err != nil {
		t.Fatalf("read the bundle in %s: %v", bundle, err)
	}
	bootArgs, ok := manifest.BootArgs[image.ModeSwitchRoot]
	if !ok {
		t.Fatalf("bundle %s has no %s boot arguments", bundle, image.ModeSwitchRoot)
	}

	networktest.CheckNoNamespaceLeaks(t, networktest.Prefix)
	e := &env{dbPath: filepath.Join(t.TempDir(), "leases.db")}
	e.hostName, e.host = networktest.NewNS(t, "host")
	_, world := networktest.NewNS(t, "world")
	networktest.DumpRuleset(t, e.hostName)

	networktest.Veth(t, e.host, "up0", world, "eth0")
	networktest.Addr(t, e.host, "up0", "10.60.0.1/24")
	networktest.Addr(t, world, "eth0", "10.60.0.2/24")
	networktest.Addr(t, world, "eth0", "10.60.0.3/24")
	networktest.DefaultRoute(t, world, "10.60.0.1")
	networktest.Serve(t, world, allowedAddr)
	networktest.Serve(t, world, deniedAddr)
	networktest.Serve(t, e.host, hostAddr)

	e.nets = []network.Network{
		{Name: "br", Subnet: netip.MustParsePrefix("10.50.0.0/24"), Uplink: "up0", ManageIPForwarding: true, Allow: allowWorld},
		{Name: "sl", Mode: network.ModeSlot, TransitRange: netip.MustParsePrefix("10.70.0.0/24"), Uplink: "up0", ManageIPForwarding: true, Allow: allowWorld},
	}
	e.open(t)
	t.Cleanup(func() { e.checkTeardown(t) })
	if _, err := e.mgr.Reconcile(context.Background()); err != nil {
		t.Fatalf("Reconcile (first start): %v", err)
	}
	// The bridge exists now, with the gateway address on it.
	networktest.Serve(t, e.host, bridgeGatewayAddr)

	e.defaults = vm.Defaults{
		Kernel:         filepath.Join(bundle, image.VmlinuxFile),
		Initrd:         filepath.Join(bundle, image.InitramfsFile),
		Rootfs:         filepath.Join(bundle, image.RootfsFile),
		RootfsReadOnly: true,
		VCPUCount:      1,
		MemSizeMiB:     guestMemMiB,
		BootArgs:       bootArgs + " ember.rootflags=ro",
	}
	// A short run directory keeps the agent socket paths within 107 bytes.
	e.runDir, err = os.MkdirTemp("/tmp", "ee")
	if err != nil {
		t.Fatal(err)
	}
	e.openProvider(t)
	t.Cleanup(func() {
		e.destroyAll(t)
		os.RemoveAll(e.runDir)
	})
	return e
}

// open opens the lease store and a Manager, as an Ember process start
// does.
func (e *env) open(t *testing.T) {
	t.Helper()
	e.store, e.mgr = networktest.OpenManager(t, e.dbPath, e.nets, e.host, network.NewKernel(e.host))
}

// openProvider starts a QEMU provider on the run directory, which adopts
// the VMs that an earlier one left running.
func (e *env) openProvider(t *testing.T) {
	t.Helper()
	p, err := qemu.New(context.Background(), qemu.Options{RunDir: e.runDir, Logger: quiet})
	if err != nil {
		t.Fatalf("new qemu provider: %v", err)
	}
	e.prov = p
}

// destroyAll destroys every VM of the provider and closes it.
func (e *env) destroyAll(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	infos, err := e.prov.List(ctx)
	if err != nil {
		t.Errorf("list vms: %v", err)
	}
	for _, info := range infos {
		if err := e.prov.Destroy(ctx, info.ID); err != nil {
			t.Errorf("destroy vm %s: %v", info.ID, err)
		}
	}
	e.prov.Close()
	if pids := qemuPIDsUnder(e.runDir); len(pids) != 0 {
		t.Errorf("qemu processes left running: %v", pids)
	}
}

// checkTeardown removes every lease and network, and checks that the host
// namespace is back to lo and up0 with no nftables tables and no slots.
func (e *env) checkTeardown(t *testing.T) {
	if err := e.mgr.Teardown(context.Background()); err != nil {
		t.Errorf("Teardown: %v", err)
	}
	e.store.Close()
	if got := networktest.LinkNames(t, e.host); !slices.Equal(got, []string{"lo", "up0"}) {
		t.Errorf("host links after Teardown = %v, want [lo up0]", got)
	}
	if got := networktest.RulesetSummary(t, e.host); len(got) != 0 {
		t.Errorf("nft chains after Teardown: %v", got)
	}
	if slots, err := netns.List(networktest.Prefix + "slot-"); err != nil || len(slots) != 0 {
		t.Errorf("slot namespaces after Teardown: %v (err %v)", slots, err)
	}
}

// guest is a running VM with its network attachment and agent client.
type guest struct {
	id     string
	att    network.Attachment
	client *agent.Client
}

// attach leases a network identity for VM id and creates the VM from it:
// the attachment's interface, its ip= argument, and the namespace that
// contains its TAP. It does not start the VM.
func (e *env) attach(t *testing.T, id, net string) *guest {
	t.Helper()
	att, err := e.mgr.Attach(context.Background(), id, net, network.AttachOptions{})
	if err != nil {
		t.Fatalf("attach %s to %s: %v", id, net, err)
	}
	// In bridge mode the TAP is in the host namespace, and in slot mode
	// in the VM's slot.
	ns := e.host
	if att.NetNSPath != "" {
		ns = att.NetNSPath
	}
	bootArgs := e.defaults.BootArgs + " " + att.Addressing.KernelArg()
	spec := vm.Spec{
		NetworkInterfaces: []vm.NetworkInterface{att.NetworkInterface("eth0")},
		BootArgs:          &bootArgs,
		NetNS:             &ns,
	}
	cfg, err := vm.Resolve(id, e.defaults, spec)
	if err != nil {
		t.Fatalf("resolve vm %s: %v", id, err)
	}
	if _, err := e.prov.Create(context.Background(), cfg); err != nil {
		t.Fatalf("create vm %s: %v", id, err)
	}
	return &guest{id: id, att: att}
}

// restore leases a network identity for VM id and restores it, running,
// from snapshot snapID of VM srcID, with the snapshot's interface pointed
// at the new TAP.
func (e *env) restore(t *testing.T, id, net, srcID, snapID string) *guest {
	t.Helper()
	att, err := e.mgr.Attach(context.Background(), id, net, network.AttachOptions{})
	if err != nil {
		t.Fatalf("attach %s to %s: %v", id, net, err)
	}
	ns := e.host
	if att.NetNSPath != "" {
		ns = att.NetNSPath
	}
	spec := vm.Spec{
		NetNS: &ns,
		RestoreFrom: &vm.SnapshotRef{
			VMID: srcID, SnapshotID: snapID, ResumeImmediately: true,
			NetworkOverrides: []vm.NetworkOverride{att.NetworkOverride("eth0")},
		},
	}
	cfg, err := vm.Resolve(id, e.defaults, spec)
	if err != nil {
		t.Fatalf("resolve vm %s: %v", id, err)
	}
	if _, err := e.prov.Create(context.Background(), cfg); err != nil {
		t.Fatalf("restore vm %s from %s/%s: %v", id, srcID, snapID, err)
	}
	return &guest{id: id, att: att}
}

// startAll starts the guests and waits for their agents, all at once so
// that the boots overlap.
func (e *env) startAll(t *testing.T, guests ...*guest) {
	t.Helper()
	for _, g := range guests {
		if err := e.prov.Start(context.Background(), g.id); err != nil {
			t.Fatalf("start vm %s: %v", g.id, err)
		}
	}
	e.dialAll(t, guests...)
}

// dialAll connects to the agents of the guests, waiting for each up to
// agentTimeout, and closes the clients when t ends.
func (e *env) dialAll(t *testing.T, guests ...*guest) {
	t.Helper()
	errs := make([]error, len(guests))
	var wg sync.WaitGroup
	for i, g := range guests {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), agentTimeout)
			defer cancel()
			dial := func(ctx context.Context) (net.Conn, error) { return e.prov.DialAgent(ctx, g.id) }
			c, err := agent.Dial(ctx, dial, nil)
			if err != nil {
				errs[i] = err
				return
			}
			g.client = c
			t.Cleanup(func() { c.Close() })
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			console, _ := e.prov.Console(context.Background(), guests[i].id)
			t.Fatalf("agent of vm %s: %v\nconsole:\n%s", guests[i].id, err, tail(console, 3000))
		}
	}
}

// probeResult is the outcome of one TCP connection attempt from a guest.
type probeResult struct {
	stdout, stderr string
	exitCode       int
}

// probeTimeout is the connect timeout of busybox nc in the guest, in
// seconds. A dropped connection attempt takes this long to fail.
const probeTimeout = "3"

// probe connects from guest g to addr with busybox nc and returns what it
// printed and its exit status.
func probe(ctx context.Context, g *guest, addr string) (probeResult, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return probeResult{}, err
	}
	var stdout, stderr bytes.Buffer
	req := agent.ExecRequest{Argv: []string{"nc", "-w", probeTimeout, host, port}, Timeout: 30 * time.Second}
	res, err := g.client.Exec(ctx, req, agent.ExecIO{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return probeResult{}, fmt.Errorf("exec nc in vm %s: %w", g.id, err)
	}
	if res.TimedOut {
		return probeResult{}, fmt.Errorf("nc in vm %s to %s ran past its exec timeout", g.id, addr)
	}
	return probeResult{stdout: strings.TrimSpace(stdout.String()), stderr: strings.TrimSpace(stderr.String()), exitCode: res.ExitCode}, nil
}

// expectation is a destination that a guest must reach or must not.
type expectation struct {
	g     *guest
	addr  string
	reach bool
	// reply is the line the server sends, for reachable destinations.
	reply string
}

// checkReach runs every expectation at once, because each blocked one
// waits for nc's connect timeout, and reports each mismatch.
func checkReach(t *testing.T, exps []expectation) {
	t.Helper()
	results := make([]probeResult, len(exps))
	errs := make([]error, len(exps))
	var wg sync.WaitGroup
	for i, x := range exps {
		wg.Go(func() { results[i], errs[i] = probe(t.Context(), x.g, x.addr) })
	}
	wg.Wait()
	for i, x := range exps {
		r := results[i]
		switch {
		case errs[i] != nil:
			t.Errorf("%s -> %s: %v", x.g.id, x.addr, errs[i])
		case x.reach && (r.exitCode != 0 || r.stdout != x.reply):
			t.Errorf("%s -> %s: exit %d, output %q, stderr %q; want the reply %q", x.g.id, x.addr, r.exitCode, r.stdout, r.stderr, x.reply)
		case !x.reach && (r.exitCode == 0 || r.stdout != "" || !strings.Contains(r.stderr, "timed out")):
			// A refused connection would mean the packets got through.
			t.Errorf("%s -> %s: exit %d, output %q, stderr %q; want a connect timeout", x.g.id, x.addr, r.exitCode, r.stdout, r.stderr)
		}
	}
}

// serveInGuest runs a busybox nc server on guestPort in guest g that
// sends "hello from <vm id>" on every connection, until the VM is
// destroyed. It checks that the server replies inside the guest.
func serveInGuest(t *testing.T, g *guest) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The exec ends with an error when the VM is destroyed.
		g.client.Exec(context.Background(), agent.ExecRequest{
			Argv: []string{"nc", "-ll", "-p", guestPort, "-e", "echo", "hello from " + g.id},
		}, agent.ExecIO{})
	}()
	t.Cleanup(func() {
		g.client.Close()
		<-done
	})
	// The server listens soon after the exec starts, so the first
	// connections may be refused.
	deadline := time.Now().Add(30 * time.Second)
	for {
		r, err := probe(t.Context(), g, "127.0.0.1:"+guestPort)
		if err == nil && r.stdout == "hello from "+g.id {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("server in vm %s does not reply on 127.0.0.1:%s: %+v, %v", g.id, guestPort, r, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// qemuPIDsUnder returns the ids of QEMU processes whose command line
// mentions dir, which every QEMU of a provider with run directory dir does.
func qemuPIDsUnder(dir string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, entry := range entries {
		pid, err := strconv.Atoi(entry.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", entry.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(cmdline, []byte(dir+"/")) && bytes.Contains(cmdline, []byte("qemu")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
