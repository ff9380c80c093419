package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/vm"
)

// fullVMConfig is the part of Firecracker's GET /vm/config reply that the
// tests read.
type fullVMConfig struct {
	Drives            []fcapi.Drive            `json:"drives"`
	NetworkInterfaces []fcapi.NetworkInterface `json:"network-interfaces"`
}

// tapsOpenedBy returns the names of the TAP devices that process pid holds
// open, from the "iff:" line the kernel prints in /proc/PID/fdinfo for a
// tun file.
func tapsOpenedBy(t *testing.T, pid int) []string {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/fdinfo"
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(data), "\n") {
			if name, ok := strings.CutPrefix(line, "iff:"); ok {
				out = append(out, strings.TrimSpace(name))
			}
		}
	}
	return out
}

// childFirecrackers returns the PIDs of this process's children whose
// command name starts with "firecracker".
func childFirecrackers(t *testing.T) []int {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []int
	for _, path := range procs {
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(data)
		nameStart, nameEnd := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if nameStart < 0 || nameEnd < nameStart {
			continue
		}
		fields := strings.Fields(s[nameEnd+1:])
		if len(fields) < 2 || fields[1] != strconv.Itoa(os.Getpid()) {
			continue
		}
		if strings.HasPrefix(s[nameStart+1:nameEnd], "firecracker") {
			pid, _ := strconv.Atoi(strings.Fields(s)[0])
			out = append(out, pid)
		}
	}
	return out
}

// TestRealNetworkInNetNS boots the fcprobe guest on real Firecracker in a
// network namespace the test creates, with a TAP from that namespace as a
// rate-limited NIC and a rate-limited extra drive, then restores it onto a
// second TAP with network_overrides. Versions without network_overrides
// must reject the restore before starting a process.
func TestRealNetworkInNetNS(t *testing.T) {
	env := newRealEnv(t)
	nsName, nsPath := newTestNetNS(t)
	for _, tap := range []string{"emtap0", "emtap1"} {
		runIP(t, "-n", nsName, "tuntap", "add", "dev", tap, "mode", "tap")
		runIP(t, "-n", nsName, "link", "set", tap, "up")
	}
	data := filepath.Join(env.emu.files, "data.img")
	if err := os.WriteFile(data, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	p := env.provider(t)
	ctx := context.Background()
	version, err := p.binaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}

	rx := &vm.RateLimiter{Bandwidth: &vm.TokenBucket{Size: 1 << 20, RefillTime: 100}}
	tx := &vm.RateLimiter{Ops: &vm.TokenBucket{Size: 1000, OneTimeBurst: 50, RefillTime: 1000}}
	diskLimit := &vm.RateLimiter{
		Bandwidth: &vm.TokenBucket{Size: 64 << 10, RefillTime: 100},
		Ops:       &vm.TokenBucket{Size: 100, RefillTime: 1000},
	}
	const mac = "06:00:ac:10:00:02"
	cfg := env.config("netvm")
	cfg.NetNS = nsPath
	cfg.NetworkInterfaces = []vm.NetworkInterface{{
		IfaceID: "eth0", HostDevName: "emtap0", GuestMAC: mac, RxRateLimiter: rx, TxRateLimiter: tx,
	}}
	cfg.ExtraDrives = []vm.Drive{{ID: "data", PathOnHost: data, IsReadOnly: true, RateLimiter: diskLimit}}
	bootEmulated(t, p, cfg)

	out := waitConsole(t, p, "netvm", "SCAN-DONE")
	// Firecracker's own log lines start with "[<id>:"; they go to the log
	// file, never into the guest console.
	if strings.Contains(out, "[netvm:") {
		t.Errorf("console contains Firecracker's own log: %q", out)
	}
	if !strings.Contains(out, " id=1") {
		t.Errorf("guest found no virtio-net device (id=1): %q", out)
	}
	if n := strings.Count(out, " id=2"); n != 2 {
		t.Errorf("guest found %d block devices, want 2 (root and data): %q", n, out)
	}

	m, err := p.lookup("netvm")
	if err != nil {
		t.Fatal(err)
	}
	info := m.info()
	if got, want := nsInode(t, "/proc/"+strconv.Itoa(info.PID)+"/ns/net"), nsInode(t, nsPath); got != want {
		t.Errorf("firecracker runs in namespace inode %d, want %d", got, want)
	}
	if taps := tapsOpenedBy(t, info.PID); len(taps) != 1 || taps[0] != "emtap0" {
		t.Errorf("firecracker has TAPs %v, want [emtap0]", taps)
	}

	var full fullVMConfig
	if err := m.client.Do(ctx, http.MethodGet, "/vm/config", nil, &full); err != nil {
		t.Fatalf("GET /vm/config: %v", err)
	}
	checkAcceptedDevices(t, full, mac, rx, tx, diskLimit)
	t.Logf("firecracker %s in %s: TAPs %v, rx %s, tx %s", version, nsName, tapsOpenedBy(t, info.PID),
		limiterString(full.NetworkInterfaces[0].RxRateLimiter), limiterString(full.NetworkInterfaces[0].TxRateLimiter))

	waitConsole(t, p, "netvm", "TICK 2")
	if err := p.Pause(ctx, "netvm"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(ctx, "netvm", vm.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	raw, _ := p.Console(ctx, "netvm")
	atSnapshot := lastTick(string(raw))
	if err := p.Destroy(ctx, "netvm"); err != nil {
		t.Fatal(err)
	}

	ref := vm.SnapshotRef{
		VMID: "netvm", SnapshotID: "s", ResumeImmediately: true,
		NetworkOverrides: []vm.NetworkOverride{{IfaceID: "eth0", HostDevName: "emtap1"}},
	}
	restore := vm.Config{ID: "moved", RestoreFrom: &ref, NetNS: nsPath, TrackDirtyPages: true}

	if !fcapi.Supports(version, fcapi.FeatureNetworkOverrides) {
		// A binary that does not exist proves that the check runs before
		// any process starts.
		p.cfg.Binary = "/nonexistent/firecracker"
		_, err := p.Create(ctx, restore)
		var ue *vm.UnsupportedError
		if !errors.As(err, &ue) || ue.Feature != string(fcapi.FeatureNetworkOverrides) || ue.Version != version.String() {
			t.Fatalf("restore with network_overrides on %s = %v, want an unsupported error for %s", version, err, fcapi.FeatureNetworkOverrides)
		}
		if !errors.Is(err, vm.ErrUnsupported) {
			t.Errorf("restore error %v does not match vm.ErrUnsupported", err)
		}
		if strings.Contains(err.Error(), "/nonexistent/firecracker") {
			t.Errorf("restore started a process: %v", err)
		}
		if pids := childFirecrackers(t); len(pids) > 0 {
			t.Errorf("firecracker processes left: %v", pids)
		}
		if err := leaked(env.emu); err != nil {
			t.Error(err)
		}
		t.Logf("restore rejected before any process started: %v", err)
		return
	}

	info, err = p.Create(ctx, restore)
	if err != nil {
		t.Fatalf("restore with network_overrides on %s: %v", version, err)
	}
	t.Cleanup(func() { p.Destroy(context.Background(), "moved") })
	waitConsole(t, p, "moved", fmt.Sprintf("TICK %d", atSnapshot+1))
	taps := tapsOpenedBy(t, info.PID)
	if len(taps) != 1 || taps[0] != "emtap1" {
		t.Errorf("restored firecracker has TAPs %v, want [emtap1]", taps)
	}
	t.Logf("restored with network_overrides: TAPs %v", taps)
	if got := info.Config.NetworkInterfaces; len(got) != 1 || got[0].HostDevName != "emtap1" || got[0].GuestMAC != mac {
		t.Errorf("restored Info.Config.NetworkInterfaces = %+v, want eth0 on emtap1 with MAC %s", got, mac)
	}
	m, err = p.lookup("moved")
	if err != nil {
		t.Fatal(err)
	}
	full = fullVMConfig{}
	if err := m.client.Do(ctx, http.MethodGet, "/vm/config", nil, &full); err != nil {
		t.Fatalf("GET /vm/config after restore: %v", err)
	}
	if len(full.NetworkInterfaces) != 1 || full.NetworkInterfaces[0].HostDevName != "emtap1" {
		t.Errorf("restored network interfaces = %+v, want eth0 on emtap1", full.NetworkInterfaces)
	}
	if err := p.Destroy(ctx, "moved"); err != nil {
		t.Fatal(err)
	}
	if pids := childFirecrackers(t); len(pids) > 0 {
		t.Errorf("firecracker processes left: %v", pids)
	}
	if err := leaked(env.emu); err != nil {
		t.Error(err)
	}
}

// checkAcceptedDevices compares the devices Firecracker reports with the
// ones configured.
func checkAcceptedDevices(t *testing.T, full fullVMConfig, mac string, rx, tx, disk *vm.RateLimiter) {
	t.Helper()
	if len(full.NetworkInterfaces) != 1 {
		t.Fatalf("firecracker reports %d network interfaces, want 1: %+v", len(full.NetworkInterfaces), full.NetworkInterfaces)
	}
	nic := full.NetworkInterfaces[0]
	if nic.HostDevName != "emtap0" || nic.GuestMAC != mac {
		t.Errorf("network interface = %s with MAC %s, want emtap0 with %s", nic.HostDevName, nic.GuestMAC, mac)
	}
	if !sameLimiter(nic.RxRateLimiter, rx) {
		t.Errorf("rx rate limiter = %s, want %s", limiterString(nic.RxRateLimiter), limiterString(rateLimiter(rx)))
	}
	if !sameLimiter(nic.TxRateLimiter, tx) {
		t.Errorf("tx rate limiter = %s, want %s", limiterString(nic.TxRateLimiter), limiterString(rateLimiter(tx)))
	}
	var found bool
	for _, d := range full.Drives {
		if d.DriveID != "data" {
			continue
		}
		found = true
		if !sameLimiter(d.RateLimiter, disk) {
			t.Errorf("drive rate limiter = %s, want %s", limiterString(d.RateLimiter), limiterString(rateLimiter(disk)))
		}
	}
	if !found {
		t.Errorf("firecracker reports no drive \"data\": %+v", full.Drives)
	}
}

// sameLimiter reports whether Firecracker's limiter got has the enabled
// buckets of want. Firecracker reports a bucket it does not use as absent
// or as all zero, depending on the version.
func sameLimiter(got *fcapi.RateLimiter, want *vm.RateLimiter) bool {
	w := rateLimiter(want)
	if got == nil || w == nil {
		return got == nil && w == nil
	}
	return sameBucket(got.Bandwidth, w.Bandwidth) && sameBucket(got.Ops, w.Ops)
}

func sameBucket(got, want *fcapi.TokenBucket) bool {
	if want == nil {
		return got == nil || (got.Size == 0 && got.RefillTime == 0)
	}
	return got != nil && *got == *want
}

func limiterString(r *fcapi.RateLimiter) string {
	if r == nil {
		return "none"
	}
	bucket := func(b *fcapi.TokenBucket) string {
		if b == nil {
			return "none"
		}
		return fmt.Sprintf("{size %d burst %d refill %dms}", b.Size, b.OneTimeBurst, b.RefillTime)
	}
	return "bandwidth " + bucket(r.Bandwidth) + " ops " + bucket(r.Ops)
}
