package guest

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/embervm/ember/agent"
)

// Boot modes of the ember.mode kernel parameter.
const (
	// ModeInitramfs runs everything from the initramfs.
	ModeInitramfs = "initramfs"
	// ModeSwitchRoot mounts ember.root and makes it the root file system.
	ModeSwitchRoot = "switchroot"
)

// BootConfig is the agent's configuration from the kernel command line.
type BootConfig struct {
	// Mode is ModeInitramfs or ModeSwitchRoot (ember.mode).
	Mode string
	// Root is the root device for ModeSwitchRoot (ember.root).
	Root string
	// RootFSType is the root file system type (ember.rootfstype).
	RootFSType string
	// RootFlags is "", "ro" or "rw" (ember.rootflags); empty mounts
	// read-write.
	RootFlags string
	// AgentPort is the vsock port to listen on (ember.agent_port).
	AgentPort uint32
	// Hostname is the guest's host name (ember.hostname). It takes
	// precedence over the host name field of ip=.
	Hostname string
	// PollVirtioPort is set by ember.serial_wait=poll, as described at
	// [Config.PollVirtioPort]. The default, ember.serial_wait=epoll, waits
	// for the driver's report of a host connection.
	PollVirtioPort bool
	// IP is the static configuration of the kernel's ip= parameter; nil
	// when absent or "off".
	IP *IPConfig
}

// IPConfig is the static form of the ip= kernel parameter:
// ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>.
type IPConfig struct {
	Address  netip.Prefix
	Gateway  netip.Addr
	Hostname string
	Device   string
	DNS      []netip.Addr
}

// ParseCmdline reads the ember.* keys and ip= from a kernel command line,
// applying the defaults: initramfs mode, /dev/vda, ext4, vsock port 1024.
// Unknown keys are ignored, because the command line also carries the
// kernel's own parameters.
func ParseCmdline(cmdline string) (BootConfig, error) {
	cfg := BootConfig{Mode: ModeInitramfs, Root: "/dev/vda", RootFSType: "ext4", AgentPort: agent.DefaultVsockPort}
	var errs []error
	for _, field := range splitCmdline(cmdline) {
		key, value, _ := strings.Cut(field, "=")
		switch key {
		case "ember.mode":
			if value != ModeInitramfs && value != ModeSwitchRoot {
				errs = append(errs, fmt.Errorf("ember.mode=%q: want %s or %s", value, ModeInitramfs, ModeSwitchRoot))
				continue
			}
			cfg.Mode = value
		case "ember.root":
			if err := agent.ValidateGuestPath(value); err != nil {
				errs = append(errs, fmt.Errorf("ember.root: %w", err))
				continue
			}
			cfg.Root = value
		case "ember.rootfstype":
			if value == "" || strings.ContainsAny(value, "/\x00") {
				errs = append(errs, fmt.Errorf("ember.rootfstype=%q is not a file system type", value))
				continue
			}
			cfg.RootFSType = value
		case "ember.rootflags":
			if value != "ro" && value != "rw" {
				errs = append(errs, fmt.Errorf("ember.rootflags=%q: want ro or rw", value))
				continue
			}
			cfg.RootFlags = value
		case "ember.agent_port":
			port, err := strconv.ParseUint(value, 10, 32)
			if err != nil || port == 0 {
				errs = append(errs, fmt.Errorf("ember.agent_port=%q: want a port number above 0", value))
				continue
			}
			cfg.AgentPort = uint32(port)
		case "ember.hostname":
			if err := agent.ValidateHostname(value); err != nil {
				errs = append(errs, fmt.Errorf("ember.hostname: %w", err))
				continue
			}
			cfg.Hostname = value
		case "ember.serial_wait":
			if value != "epoll" && value != "poll" {
				errs = append(errs, fmt.Errorf("ember.serial_wait=%q: want epoll or poll", value))
				continue
			}
			cfg.PollVirtioPort = value == "poll"
		case "ip":
			ip, err := parseIP(value)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			cfg.IP = ip
		}
	}
	return cfg, errors.Join(errs...)
}

// splitCmdline splits on spaces, keeping double-quoted spans together as
// the kernel does, and stops at "--", after which arguments belong to init.
func splitCmdline(s string) []string {
	var fields []string
	var cur strings.Builder
	inQuote, inField := false, false
	flush := func() bool {
		if !inField {
			return true
		}
		f := cur.String()
		cur.Reset()
		inField = false
		if f == "--" {
			return false
		}
		fields = append(fields, f)
		return true
	}
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			inField = true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			if !flush() {
				return fields
			}
		default:
			cur.WriteRune(r)
			inField = true
		}
	}
	flush()
	return fields
}

func parseIP(value string) (*IPConfig, error) {
	switch value {
	case "", "off", "none":
		return nil, nil
	case "on", "any", "dhcp", "bootp", "rarp", "both", "dhcp6", "auto6":
		return nil, fmt.Errorf("ip=%s: autoconfiguration is not supported, only a static address with autoconf off", value)
	}
	parts := strings.Split(value, ":")
	for len(parts) < 9 {
		parts = append(parts, "")
	}

	if autoconf := parts[6]; autoconf != "" && autoconf != "off" && autoconf != "none" {
		return nil, fmt.Errorf("ip=%q: autoconfiguration %q is not supported, only a static address with autoconf off", value, autoconf)
	}
	addr, err := netip.ParseAddr(parts[0])
	if err != nil || !addr.Is4() {
		return nil, fmt.Errorf("ip=%q: client address %q is not an IPv4 address", value, parts[0])
	}

	bits := 32
	if mask := parts[3]; mask != "" {
		m, err := netip.ParseAddr(mask)
		if err != nil || !m.Is4() {
			return nil, fmt.Errorf("ip=%q: invalid netmask %q", value, mask)
		}
		if bits, err = maskBits(m); err != nil {
			return nil, fmt.Errorf("ip=%q: %w", value, err)
		}
	}

	cfg := &IPConfig{Address: netip.PrefixFrom(addr, bits), Hostname: parts[4], Device: parts[5]}
	if gw := parts[2]; gw != "" {
		if cfg.Gateway, err = netip.ParseAddr(gw); err != nil || !cfg.Gateway.Is4() {
			return nil, fmt.Errorf("ip=%q: gateway %q is not an IPv4 address", value, gw)
		}
	}
	if cfg.Hostname != "" {
		if err := agent.ValidateHostname(cfg.Hostname); err != nil {
			return nil, fmt.Errorf("ip=%q: %w", value, err)
		}
	}
	if strings.ContainsAny(cfg.Device, "/ \x00") || len(cfg.Device) > 15 {
		return nil, fmt.Errorf("ip=%q: invalid device name %q", value, cfg.Device)
	}

	for _, d := range parts[7:9] {
		if d == "" {
			continue
		}
		ns, err := netip.ParseAddr(d)
		if err != nil {
			return nil, fmt.Errorf("ip=%q: invalid DNS server %q", value, d)
		}
		cfg.DNS = append(cfg.DNS, ns)
	}
	return cfg, nil
}

func maskBits(m netip.Addr) (int, error) {
	b := m.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	ones := 0
	for v&(1<<31) != 0 {
		ones++
		v <<= 1
	}
	if v != 0 {
		return 0, fmt.Errorf("netmask %s is not contiguous", m)
	}
	return ones, nil
}
