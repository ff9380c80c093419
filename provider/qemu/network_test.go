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
