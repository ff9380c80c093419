package guest

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/agent"
)

// LinuxSystem performs guest-wide operations with Linux system calls. It
// needs CAP_SYS_ADMIN, CAP_SYS_TIME, CAP_NET_ADMIN and CAP_SYS_BOOT, as PID 1
// in a guest has.
type LinuxSystem struct {
	Logger *slog.Logger
	// KillGrace is how long Shutdown waits after SIGTERM before SIGKILL;
	// zero means 2 seconds.
	KillGrace time.Duration
}

var _ System = (*LinuxSystem)(nil)

// SetHostname calls sethostname(2).
func (s *LinuxSystem) SetHostname(name string) error {
	return unix.Sethostname([]byte(name))
}

// SetClock sets CLOCK_REALTIME.
func (s *LinuxSystem) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}

// ConfigureNetwork configures each interface found by its MAC address: link
// up, MTU, addresses replaced, routes added or replaced.
func (s *LinuxSystem) ConfigureNetwork(ctx context.Context, ifaces []agent.InterfaceConfig) error {
	links, err := net.Interfaces()
	if err != nil {
		return fmt.Errorf("list interfaces: %w", err)
	}
	nl, err := openRtnetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	for _, cfg := range ifaces {
		if err := ctx.Err(); err != nil {
			return err
		}
		mac, _ := net.ParseMAC(cfg.MAC)
		var link *net.Interface
		for i := range links {
			if links[i].HardwareAddr.String() == mac.String() {
				link = &links[i]
				break
			}
		}
		if link == nil {
			return agent.Errorf(agent.CodeNotFound, "no interface with mac %s", mac)
		}
		if err := configureLink(nl, link, cfg); err != nil {
			return err
		}
	}
	return nil
}

func configureLink(nl *rtnetlink, link *net.Interface, cfg agent.InterfaceConfig) error {
	if err := nl.setLink(link.Index, cfg.MTU); err != nil {
		return fmt.Errorf("set link %s up: %w", link.Name, err)
	}
	want := make([]netip.Prefix, 0, len(cfg.Addresses))
	for _, a := range cfg.Addresses {
		want = append(want, netip.MustParsePrefix(a))
	}
	if err := nl.replaceAddrs(link, want); err != nil {
		return err
	}
	for _, r := range cfg.Routes {
		dst, _ := r.Prefix()
		var gw netip.Addr
		if r.Gateway != "" {
			gw = netip.MustParseAddr(r.Gateway)
		}
		if err := nl.addRoute(link.Index, dst, gw); err != nil {
			return fmt.Errorf("add route %s via %q on %s: %w", dst, r.Gateway, link.Name, err)
		}
	}
	return nil
}

// ConfigureByName applies a configuration to the interface with the given
// name, for the kernel's ip= parameter, which names a device rather than a
// MAC. An empty name picks the first interface that is not loopback.
func ConfigureByName(name string, cfg agent.InterfaceConfig) error {
	links, err := net.Interfaces()
	if err != nil {
		return fmt.Errorf("list interfaces: %w", err)
	}
	var link *net.Interface
	for i := range links {
		if (name == "" && links[i].Flags&net.FlagLoopback == 0) || links[i].Name == name {
			link = &links[i]
			break
		}
	}
	if link == nil {
		return fmt.Errorf("configure interface %q: not found", name)
	}
	nl, err := openRtnetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	return configureLink(nl, link, cfg)
}

// SetLinkUp brings an interface up by name, such as "lo".
func SetLinkUp(name string) error {
	link, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("set link %s up: %w", name, err)
	}
	nl, err := openRtnetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	if err := nl.setLink(link.Index, 0); err != nil {
		return fmt.Errorf("set link %s up: %w", name, err)
	}
	return nil
}

// Shutdown sends SIGTERM and then SIGKILL to every other process, syncs file
// systems and powers off or reboots. Only PID 1 should call it: kill(-1) reaches every process
// the caller may signal.
func (s *LinuxSystem) Shutdown(action string) error {
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if action == agent.ActionReboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	grace := s.KillGrace
	if grace == 0 {
		grace = 2 * time.Second
	}
	unix.Kill(-1, unix.SIGTERM)
	time.Sleep(grace)
	unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	if err := unix.Reboot(cmd); err != nil {
		return fmt.Errorf("%s: reboot(2): %w", strings.ToLower(action), err)
	}
	return nil
}
