package guest

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		name    string
		cmdline string
		want    BootConfig
		wantErr string
	}{
		{
			name:    "defaults",
			cmdline: "console=ttyS0 quiet",
			want:    BootConfig{Mode: ModeInitramfs, Root: "/dev/vda", RootFSType: "ext4", AgentPort: 1024},
		},
		{
			name:    "switchroot",
			cmdline: "ember.mode=switchroot ember.root=/dev/vdb ember.rootfstype=xfs ember.rootflags=ro ember.agent_port=5000",
			want:    BootConfig{Mode: ModeSwitchRoot, Root: "/dev/vdb", RootFSType: "xfs", RootFlags: "ro", AgentPort: 5000},
		},
		{
			name:    "ip",
			cmdline: "ip=172.16.0.2::172.16.0.1:255.255.255.0:web-1:eth0:off:1.1.1.1",
			want: BootConfig{Mode: ModeInitramfs, Root: "/dev/vda", RootFSType: "ext4", AgentPort: 1024, IP: &IPConfig{
				Address: netip.MustParsePrefix("172.16.0.2/24"), Gateway: netip.MustParseAddr("172.16.0.1"),
				Hostname: "web-1", Device: "eth0", DNS: []netip.Addr{netip.MustParseAddr("1.1.1.1")},
			}},
		},
		{
			name:    "quoted values and init arguments",
			cmdline: `foo="a b" ember.mode=switchroot -- ember.mode=initramfs`,
			want:    BootConfig{Mode: ModeSwitchRoot, Root: "/dev/vda", RootFSType: "ext4", AgentPort: 1024},
		},
		{
			name:    "hostname",
			cmdline: "ember.hostname=web-1.example ip=10.0.0.2::::other:eth0:off",
			want: BootConfig{Mode: ModeInitramfs, Root: "/dev/vda", RootFSType: "ext4", AgentPort: 1024, Hostname: "web-1.example", IP: &IPConfig{
				Address: netip.MustParsePrefix("10.0.0.2/32"), Hostname: "other", Device: "eth0",
			}},
		},
		{
			name:    "serial wait",
			cmdline: "ember.serial_wait=poll",
			want:    BootConfig{Mode: ModeInitramfs, Root: "/dev/vda", RootFSType: "ext4", AgentPort: 1024, PollVirtioPort: true},
		},
		{name: "bad serial wait", cmdline: "ember.serial_wait=busy", wantErr: "ember.serial_wait"},
		{name: "bad ember.hostname", cmdline: "ember.hostname=web_1", wantErr: "ember.hostname"},
		{name: "empty ember.hostname", cmdline: "ember.hostname=", wantErr: "ember.hostname"},
		{name: "ip off", cmdline: "ip=off", want: BootConfig{Mode: ModeInitramfs, Root: "/dev/vda", RootFSType: "ext4", AgentPort: 1024}},
		{name: "bad mode", cmdline: "ember.mode=live", wantErr: "ember.mode"},
		{name: "bad port", cmdline: "ember.agent_port=0", wantErr: "ember.agent_port"},
		{name: "bad root", cmdline: "ember.root=vda", wantErr: "ember.root"},
		{name: "bad rootflags", cmdline: "ember.rootflags=noexec", wantErr: "ember.rootflags"},
		{name: "dhcp", cmdline: "ip=dhcp", wantErr: "autoconfiguration"},
		{name: "bad client address", cmdline: "ip=10.0.0.300::::::off", wantErr: "not an IPv4 address"},
		{name: "autoconf dhcp", cmdline: "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:dhcp", wantErr: "autoconfiguration"},
		{name: "holey netmask", cmdline: "ip=10.0.0.2::10.0.0.1:255.0.255.0::eth0:off", wantErr: "not contiguous"},
		{name: "bad hostname", cmdline: "ip=10.0.0.2::::bad_host:eth0:off", wantErr: "hostname"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCmdline(tt.cmdline)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseCmdline error = %v, want one containing %q", err, tt.wantErr)
				}
				// Defaults still hold for everything that did not parse.
				if got.Mode == "" || got.AgentPort == 0 {
					t.Errorf("config after an error = %+v, want defaults kept", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseCmdline: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ParseCmdline = %+v (ip %+v), want %+v (ip %+v)", got, got.IP, tt.want, tt.want.IP)
			}
		})
	}
}

func FuzzParseCmdline(f *testing.F) {
	f.Add("console=ttyS0 ember.mode=switchroot ip=10.0.0.2::10.0.0.1:255.255.255.0:h:eth0:off")
	f.Add(`a="b c" -- d`)
	f.Add("ip=1.2.3.4:::255.255.255.255:::none:8.8.8.8:1.1.1.1")
	f.Fuzz(func(t *testing.T, cmdline string) {
		cfg, _ := ParseCmdline(cmdline)
		if cfg.Mode != ModeInitramfs && cfg.Mode != ModeSwitchRoot {
			t.Fatalf("mode %q", cfg.Mode)
		}
		if cfg.AgentPort == 0 {
			t.Fatal("agent port 0")
		}
		if ip := cfg.IP; ip != nil {
			if !ip.Address.IsValid() || !ip.Address.Addr().Is4() {
				t.Fatalf("ip address %v", ip.Address)
			}
			if strings.ContainsAny(ip.Device, "/ \x00") {
				t.Fatalf("device %q", ip.Device)
			}
		}
	})
}

func TestFindVirtioPort(t *testing.T) {
	sysfs := t.TempDir()
	for dev, name := range map[string]string{"vport0p0": "org.qemu.guest_agent.0", "vport1p1": "ember.agent"} {
		dir := filepath.Join(sysfs, "class/virtio-ports", dev)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "name"), []byte(name+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := FindVirtioPort(sysfs, VirtioPortName)
	if err != nil || got != "/dev/vport1p1" {
		t.Fatalf("FindVirtioPort = %q, %v; want /dev/vport1p1", got, err)
	}
	if _, err := FindVirtioPort(sysfs, "missing"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("FindVirtioPort(missing) = %v, want os.ErrNotExist", err)
	}
}
