package qemu

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/embervm/ember/vm"
)

// testNetNS creates a network namespace with the given TAP devices and
// removes it when the test ends. Only this namespace is changed, never the
// host's own. It skips unless the test runs as root with iproute2.
func testNetNS(t *testing.T, taps ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace and TAP devices: run the tests as root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip command: apt-get install iproute2")
	}
	suffix := make([]byte, 4)
	rand.Read(suffix)
	name := "emberq-" + hex.EncodeToString(suffix)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete network namespace %s: %v: %s", name, err, out)
		}
	})
	for _, tap := range taps {
		run(t, "ip", "-n", name, "tuntap", "add", "dev", tap, "mode", "tap")
		run(t, "ip", "-n", name, "link", "set", tap, "up")
	}
	return name
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// tapAttached reports whether a process has TAP device tap in namespace ns
// open: the kernel shows NO-CARRIER on a TAP that no process has attached.
func tapAttached(t *testing.T, ns, tap string) bool {
	return !strings.Contains(run(t, "ip", "-n", ns, "link", "show", tap), "NO-CARRIER")
}

// TestNetworkTAP attaches a guest NIC to a TAP in a namespace the test
// made, then restores a clone of it onto another TAP.
func TestNetworkTAP(t *testing.T) {
	needGuest(t)
	ns := testNetNS(t, "tapq0", "tapq1")
	p := newTestProvider(t, Options{NetNS: "/run/netns/" + ns})
	ctx := t.Context()

	const mac = "06:00:ac:10:00:02"
	cfg := testConfig(t, "net")
	cfg.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tapq0", GuestMAC: mac}}
	if _, err := p.Create(ctx, cfg); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := p.Start(ctx, "net"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, p, "net")
	if got := mustAsk(t, p, "net", "nics"); got != "eth0="+mac {
		t.Errorf("guest nics = %q, want eth0=%s", got, mac)
	}
	if !tapAttached(t, ns, "tapq0") {
		t.Errorf("tapq0 is not attached to qemu")
	}
	if _, err := os.Stat("/sys/class/net/tapq0"); err == nil {
		t.Errorf("tapq0 appeared in the host's namespace")
	}

	if err := p.Pause(ctx, "net"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if _, err := p.Snapshot(ctx, "net", vm.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	ref := &vm.SnapshotRef{VMID: "net", SnapshotID: "s", ResumeImmediately: true,
		NetworkOverrides: []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: "tapq1"}}}
	info, err := p.Create(ctx, vm.Config{ID: "net-clone", RestoreFrom: ref})
	if err != nil {
		t.Fatalf("restore onto tapq1: %v", err)
	}
	if got := info.Config.NetworkInterfaces; len(got) != 1 || got[0].HostDevName != "tapq1" || got[0].GuestMAC != mac {
		t.Errorf("restored nics = %+v, want eth0 on tapq1 with %s", got, mac)
	}
	waitAgent(t, p, "net-clone")
	if got := mustAsk(t, p, "net-clone", "nics"); got != "eth0="+mac {
		t.Errorf("clone nics = %q", got)
	}
	if !tapAttached(t, ns, "tapq1") {
		t.Errorf("tapq1 is not attached to the clone")
	}

	for _, id := range []string{"net", "net-clone"} {
		if err := p.Destroy(ctx, id); err != nil {
			t.Fatalf("destroy %s: %v", id, err)
		}
	}
	for _, tap := range []string{"tapq0", "tapq1"} {
		if tapAttached(t, ns, tap) {
			t.Errorf("%s is still attached after destroy", tap)
		}
	}
}

// TestNetworkPerVMNetNS runs VMs in a network namespace of their own that
// differs from the provider's, on cold boot, on restore and across an
// adoption by a new provider.
func TestNetworkPerVMNetNS(t *testing.T) {
	needGuest(t)
	providerNS := testNetNS(t)
	vmNS := testNetNS(t, "tapv0", "tapv1")
	vmNSPath := "/run/netns/" + vmNS
	dir, err := os.MkdirTemp("/tmp", "eq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx := t.Context()

	first, err := New(ctx, Options{RunDir: dir, NetNS: "/run/netns/" + providerNS})
	if err != nil {
		t.Fatal(err)
	}
	// After Close, first has no VMs left, so this cleans up only when the
	// test stops before the adoption.
	t.Cleanup(func() { destroyAll(t, first) })
	const mac = "06:00:ac:10:00:03"
	cfg := testConfig(t, "own-ns")
	cfg.NetNS = vmNSPath
	cfg.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tapv0", GuestMAC: mac}}
	info, err := first.Create(ctx, cfg)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if info.Config.NetNS != vmNSPath {
		t.Errorf("created config netns = %q, want %q", info.Config.NetNS, vmNSPath)
	}
	if err := first.Start(ctx, "own-ns"); err != nil {
		t.Fatalf("start: %v", err)
	}
	waitAgent(t, first, "own-ns")
	if got := mustAsk(t, first, "own-ns", "nics"); got != "eth0="+mac {
		t.Errorf("guest nics = %q, want eth0=%s", got, mac)
	}
	if !tapAttached(t, vmNS, "tapv0") {
		t.Errorf("tapv0 in the vm's namespace is not attached to qemu")
	}
	// QEMU creates a TAP that does not exist, so a QEMU started in the
	// provider's namespace would have made tapv0 there.
	if out := run(t, "ip", "-n", providerNS, "-o", "link", "show"); strings.Contains(out, "tapv0") {
		t.Errorf("tapv0 appeared in the provider's namespace: %s", out)
	}

	if err := first.Pause(ctx, "own-ns"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if _, err := first.Snapshot(ctx, "own-ns", vm.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	ref := &vm.SnapshotRef{VMID: "own-ns", SnapshotID: "s", ResumeImmediately: true,
		NetworkOverrides: []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: "tapv1"}}}
	info, err = first.Create(ctx, vm.Config{ID: "own-ns-clone", NetNS: vmNSPath, RestoreFrom: ref})
	if err != nil {
		t.Fatalf("restore into the vm's namespace: %v", err)
	}
	if info.Config.NetNS != vmNSPath {
		t.Errorf("restored config netns = %q, want %q", info.Config.NetNS, vmNSPath)
	}
	waitAgent(t, first, "own-ns-clone")
	if !tapAttached(t, vmNS, "tapv1") {
		t.Errorf("tapv1 in the vm's namespace is not attached to the clone")
	}
	if out := run(t, "ip", "-n", providerNS, "-o", "link", "show"); strings.Contains(out, "tapv1") {
		t.Errorf("tapv1 appeared in the provider's namespace: %s", out)
	}
	if err := first.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}

	second, err := New(ctx, Options{RunDir: dir, NetNS: "/run/netns/" + providerNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, second) })
	for _, id := range []string{"own-ns", "own-ns-clone"} {
		if got := mustGet(t, second, id).Config.NetNS; got != vmNSPath {
			t.Errorf("adopted %s: config netns = %q, want %q", id, got, vmNSPath)
		}
	}
	// A ping shows that the adopted clone runs. Its "nics" reply is not
	// checked, because a restored guest can still send the reply to a
	// ping that waitAgent gave up on, which the next request then reads.
	waitAgent(t, second, "own-ns-clone")
	if !tapAttached(t, vmNS, "tapv1") {
		t.Errorf("tapv1 is not attached after adoption")
	}
	destroyAll(t, second)
	for _, tap := range []string{"tapv0", "tapv1"} {
		if tapAttached(t, vmNS, tap) {
			t.Errorf("%s is still attached after destroy", tap)
		}
	}
	if pids := qemuPIDsUnder(dir); len(pids) > 0 {
		t.Errorf("qemu processes left running: %v", pids)
	}
}
