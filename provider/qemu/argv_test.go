package qemu

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/embervm/ember/vm"
)

func TestBuildArgs(t *testing.T) {
	base := machine{VCPUCount: 2, MemSizeMiB: 128, Kernel: "/k/vmlinux", BootArgs: "console=ttyS0"}
	cases := []struct {
		name    string
		mutate  func(*machine)
		launch  launch
		want    [][]string // consecutive argument pairs that must appear
		wantNot []string   // arguments that must not appear
	}{
		{
			name:   "minimal tcg",
			launch: launch{runDir: "/r/vm1", accel: AccelTCG},
			want: [][]string{
				{"-accel", "tcg"}, {"-smp", "2"}, {"-m", "128M"}, {"-kernel", "/k/vmlinux"},
				{"-append", "console=ttyS0"}, {"-pidfile", "/r/vm1/qemu.pid"},
				{"-chardev", "socket,id=qmp,server=on,wait=off,path=/r/vm1/qmp.sock"},
				{"-chardev", "socket,id=agent,server=on,wait=off,path=/r/vm1/agent.sock"},
				{"-device", "virtserialport,bus=vser0.0,chardev=agent,name=ember.agent"},
				{"-M", "microvm,acpi=on,x-option-roms=off"},
			},
			wantNot: []string{"-initrd", "-incoming", "-cpu", "-drive", "-netdev"},
		},
		{
			name:   "kvm uses the host cpu",
			launch: launch{runDir: "/r/a", accel: AccelKVM},
			want:   [][]string{{"-accel", "kvm"}, {"-cpu", "host"}},
		},
		{
			name:   "multi-threaded tcg",
			launch: launch{runDir: "/r/a", accel: AccelTCG, tcgMultiThread: true},
			want:   [][]string{{"-accel", "tcg,thread=multi"}},
		},
		{
			name: "drives in order with read-only and throttling",
			mutate: func(m *machine) {
				m.Initrd = "/k/initrd"
				m.Drives = []machineDrive{
					{ID: "rootfs", Path: "/img/root,1.ext4", ReadOnly: true},
					{ID: "data", Path: "/img/data", RateLimiter: &vm.RateLimiter{
						Bandwidth: &vm.TokenBucket{Size: 1000, RefillTime: 100, OneTimeBurst: 5000},
					}},
				}
			},
			launch: launch{runDir: "/r/a", accel: AccelTCG},
			want: [][]string{
				{"-initrd", "/k/initrd"},
				{"-drive", "id=drive0,if=none,format=raw,file=/img/root,,1.ext4,readonly=on"},
				{"-device", "virtio-blk-device,drive=drive0"},
				{"-drive", "id=drive1,if=none,format=raw,file=/img/data,throttling.bps-total=10000,throttling.bps-total-max=15000,throttling.bps-total-max-length=1"},
				{"-device", "virtio-blk-device,drive=drive1"},
			},
		},
		{
			name: "nics with tap, mac and mtu",
			mutate: func(m *machine) {
				m.NICs = []machineNIC{
					{IfaceID: "eth0", TAP: "tap0", MAC: "06:00:00:00:00:01"},
					{IfaceID: "eth1", TAP: "tap1", MAC: "06:00:00:00:00:02", MTU: 9000},
				}
			},
			launch: launch{runDir: "/r/a", accel: AccelTCG},
			want: [][]string{
				{"-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no"},
				{"-device", "virtio-net-device,netdev=net0,mac=06:00:00:00:00:01"},
				{"-netdev", "tap,id=net1,ifname=tap1,script=no,downscript=no"},
				{"-device", "virtio-net-device,netdev=net1,mac=06:00:00:00:00:02,host_mtu=9000"},
			},
		},
		{
			name:   "vsock and incoming migration",
			mutate: func(m *machine) { m.VsockCID = 7 },
			launch: launch{runDir: "/r/a", accel: AccelTCG, incomingFD: 3},
			want:   [][]string{{"-device", "vhost-vsock-device,guest-cid=7"}, {"-incoming", "fd:3"}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := base
			if tc.mutate != nil {
				tc.mutate(&m)
			}
			args := buildArgs(&m, tc.launch)
			for _, pair := range tc.want {
				if !containsPair(args, pair[0], pair[1]) {
					t.Errorf("args lack %q %q:\n%s", pair[0], pair[1], strings.Join(args, " "))
				}
			}
			for _, flag := range tc.wantNot {
				if slices.Contains(args, flag) {
					t.Errorf("args contain %q:\n%s", flag, strings.Join(args, " "))
				}
			}
			for _, flag := range []string{"-nodefaults", "-no-user-config", "-no-reboot", "-S"} {
				if !slices.Contains(args, flag) {
					t.Errorf("args lack %s", flag)
				}
			}
		})
	}
}

func containsPair(args []string, flag, value string) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag && args[i+1] == value {
			return true
		}
	}
	return false
}

func TestThrottleOptions(t *testing.T) {
	cases := []struct {
		name string
		rl   *vm.RateLimiter
		want []string
	}{
		{"nil", nil, nil},
		{"disabled buckets", &vm.RateLimiter{Bandwidth: &vm.TokenBucket{Size: 0, RefillTime: 100}, Ops: &vm.TokenBucket{Size: 10}}, nil},
		{"bandwidth per 100 ms", &vm.RateLimiter{Bandwidth: &vm.TokenBucket{Size: 1 << 20, RefillTime: 100}},
			[]string{"bps-total=10485760"}},
		{"ops with burst", &vm.RateLimiter{Ops: &vm.TokenBucket{Size: 100, RefillTime: 1000, OneTimeBurst: 50}},
			[]string{"iops-total=100", "iops-total-max=150", "iops-total-max-length=1"}},
		{"rate rounds up to 1", &vm.RateLimiter{Ops: &vm.TokenBucket{Size: 1, RefillTime: 5000}},
			[]string{"iops-total=1"}},
		{"both", &vm.RateLimiter{
			Bandwidth: &vm.TokenBucket{Size: 4096, RefillTime: 1000},
			Ops:       &vm.TokenBucket{Size: 10, RefillTime: 1000},
		}, []string{"bps-total=4096", "iops-total=10"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := throttleOptions(tc.rl); !slices.Equal(got, tc.want) {
				t.Errorf("throttleOptions = %v, want %v", got, tc.want)
			}
		})
	}
}

// splitOpts splits a QEMU option string the way QEMU's parser does: a
// comma separates options and a doubled comma is a literal comma.
func splitOpts(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			out = append(out, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(out, cur.String())
}

func FuzzEscapeOpt(f *testing.F) {
	for _, s := range []string{"/a/b", "/a,b", ",,", "/x,", ",/y", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, path string) {
		opt := "id=drive0,file=" + escapeOpt(path) + ",readonly=on"
		parts := splitOpts(opt)
		if len(parts) != 3 || parts[1] != "file="+path || parts[2] != "readonly=on" {
			t.Fatalf("option %q splits into %q, want the path %q intact", opt, parts, path)
		}
	})
}

func FuzzThrottleOptions(f *testing.F) {
	f.Add(int64(1000), int64(100), int64(0))
	f.Add(int64(1), int64(1<<40), int64(5))
	f.Fuzz(func(t *testing.T, size, refill, burst int64) {
		b := &vm.TokenBucket{Size: size, RefillTime: refill, OneTimeBurst: burst}
		rl := &vm.RateLimiter{Bandwidth: b}
		if err := (&vm.Config{ID: "f", Kernel: "/k", VCPUCount: 1, MemSizeMiB: 1, RootfsRateLimit: rl}).Validate(); err != nil {
			return // Resolve rejects it before it reaches a provider
		}
		opts := throttleOptions(rl)
		if !b.Enabled() {
			if len(opts) != 0 {
				t.Fatalf("disabled bucket gave %v", opts)
			}
			return
		}
		if len(opts) == 0 || !strings.HasPrefix(opts[0], "bps-total=") || strings.HasPrefix(opts[0], "bps-total=0") || strings.HasPrefix(opts[0], "bps-total=-") {
			t.Fatalf("bucket %+v gave %v, want a positive bps-total first", b, opts)
		}
	})
}

func TestMachineFromConfig(t *testing.T) {
	cfg := vm.Config{
		ID: "m1", Kernel: "/k", VCPUCount: 1, MemSizeMiB: 64, BootArgs: "x",
		Rootfs: "/root.img", RootfsReadOnly: true,
		ExtraDrives:       []vm.Drive{{ID: "data", PathOnHost: "/data.img"}},
		NetworkInterfaces: []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap0"}, {IfaceID: "eth1", HostDevName: "tap1", GuestMAC: "06:00:00:00:00:09"}},
	}
	m, err := machineFromConfig(&cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.driveIDs(); !slices.Equal(got, []string{"rootfs", "data"}) {
		t.Errorf("drive order = %v", got)
	}
	mac := m.NICs[0].MAC
	if mac != derivedMAC("m1", "eth0") || mac == derivedMAC("m2", "eth0") {
		t.Errorf("derived mac %s is not stable per vm and interface", mac)
	}
	if cfgErr := (&vm.Config{ID: "x", Kernel: "/k", VCPUCount: 1, MemSizeMiB: 1,
		NetworkInterfaces: []vm.NetworkInterface{{IfaceID: "e", HostDevName: "t", GuestMAC: mac}}}).Validate(); cfgErr != nil {
		t.Errorf("derived mac %s fails validation: %v", mac, cfgErr)
	}
	if m.NICs[1].MAC != "06:00:00:00:00:09" {
		t.Errorf("explicit mac replaced: %s", m.NICs[1].MAC)
	}
	back := m.config("m1")
	if back.Rootfs != "/root.img" || !back.RootfsReadOnly || len(back.ExtraDrives) != 1 || len(back.NetworkInterfaces) != 2 {
		t.Errorf("config from machine = %+v", back)
	}

	cfg.Vsock = &vm.Vsock{GuestCID: 3, UDSPath: "/v.sock"}
	if _, err := machineFromConfig(&cfg, false); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("vsock without vhost-vsock: err = %v, want ErrUnsupported", err)
	}
	if m, err := machineFromConfig(&cfg, true); err != nil || m.VsockCID != 3 {
		t.Errorf("vsock with vhost-vsock: cid %d err %v", m.VsockCID, err)
	}
	cfg.Vsock = nil
	cfg.NetworkInterfaces[0].RxRateLimiter = &vm.RateLimiter{Ops: &vm.TokenBucket{Size: 1, RefillTime: 1}}
	var ue *vm.UnsupportedError
	if _, err := machineFromConfig(&cfg, false); !errors.As(err, &ue) || ue.Backend != "qemu" {
		t.Errorf("nic rate limiter: err = %v, want *vm.UnsupportedError from qemu", err)
	}
}
