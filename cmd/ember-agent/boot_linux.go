package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"time"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/agent/guest"
)

const (
	modulesList = "/etc/ember/modules"
	defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	// portWait bounds how long boot looks for the virtio-serial port, whose
	// driver may finish probing after its module loaded.
	portWait = 5 * time.Second
)

// boot runs the PID 1 duties and then serves forever. It never returns: PID
// 1 exiting panics the kernel.
func boot(level slog.Level) {
	defer func() {
		// A panic in a boot step must not end PID 1, which would panic the
		// kernel. Log it and keep handling power-off signals.
		if p := recover(); p != nil {
			logger := newLogger(os.Stdout, level)
			logger.Error("agent boot panicked; serving stopped, waiting for power-off", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			waitForPowerOff(logger, &guest.LinuxSystem{Logger: logger})
		}
	}()
	if os.Getenv("PATH") == "" {
		os.Setenv("PATH", defaultPath)
	}
	mountErr := guest.MountEssentials("/")
	consoleErr := guest.UseConsole()
	logger := newLogger(os.Stdout, level)
	logger.Info("agent starting as PID 1", "version", version)
	if mountErr != nil {
		logger.Error("mounting kernel file systems failed", "err", mountErr)
	}
	if consoleErr != nil {
		logger.Warn("console not available", "err", consoleErr)
	}
	// With Ctrl-Alt-Del handling off, the kernel sends SIGINT to PID 1
	// instead of rebooting at once; Firecracker's SendCtrlAltDel relies on it.
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
		logger.Warn("disabling Ctrl-Alt-Del reboot failed", "err", err)
	}

	cfg, err := guest.ParseCmdline(readCmdline())
	if err != nil {
		logger.Error("invalid ember settings on the kernel command line; using defaults for them", "err", err)
	}
	start := time.Now()
	n, err := guest.LoadModules(modulesList, logger)
	if err != nil {
		logger.Error("some kernel modules failed to load", "err", err)
	}
	logger.Info("kernel modules loaded", "count", n, "duration", time.Since(start).Round(time.Millisecond).String())

	if cfg.Mode == guest.ModeSwitchRoot {
		if err := guest.SwitchRoot(cfg); err != nil {
			logger.Error("switching root failed; staying in the initramfs", "root", cfg.Root, "err", err)
		} else {
			if err := guest.MountEssentials("/"); err != nil {
				logger.Error("mounting kernel file systems in the new root failed", "err", err)
			}
			logger.Info("switched root", "root", cfg.Root, "fstype", cfg.RootFSType)
		}
	}

	if err := guest.SetLinkUp("lo"); err != nil {
		logger.Error("bringing up lo failed", "err", err)
	}
	sys := &guest.LinuxSystem{Logger: logger}
	hostname := cfg.Hostname
	if cfg.IP != nil {
		applyIP(logger, cfg.IP)
		if hostname == "" {
			hostname = cfg.IP.Hostname
		}
	}
	if hostname != "" {
		if err := sys.SetHostname(hostname); err != nil {
			logger.Error("setting the hostname from the kernel command line failed", "hostname", hostname, "err", err)
		}
	}

	ctx := context.Background()
	reaper := guest.NewReaper(logger)
	go reaper.Run(ctx)

	srv, err := guest.NewServer(guest.Config{
		System: sys, Processes: reaper, Version: version, Logger: logger,
		PollVirtioPort: cfg.PollVirtioPort,
	})
	if err != nil {
		// Only an unopenable "/" gets here; keep reaping and wait for a
		// power-off signal rather than panicking the kernel.
		logger.Error("agent server failed to start", "err", err)
	} else {
		startTransports(ctx, logger, srv, cfg)
	}
	go watchPowerButton(logger, sys)
	waitForPowerOff(logger, sys)
}

// applyIP configures the interface named by the ip= parameter.
func applyIP(logger *slog.Logger, ip *guest.IPConfig) {
	iface := agent.InterfaceConfig{Addresses: []string{ip.Address.String()}}
	if ip.Gateway.IsValid() {
		iface.Routes = []agent.Route{{Destination: "default", Gateway: ip.Gateway.String()}}
	}
	if err := guest.ConfigureByName(ip.Device, iface); err != nil {
		logger.Error("applying ip= failed", "device", ip.Device, "address", ip.Address.String(), "err", err)
	} else {
		logger.Info("network configured from ip=", "device", ip.Device, "address", ip.Address.String(), "gateway", ip.Gateway.String())
	}
	if len(ip.DNS) > 0 {
		content := "# Written by ember-agent from ip=.\n"
		for _, ns := range ip.DNS {
			content += "nameserver " + ns.String() + "\n"
		}
		if err := os.WriteFile("/etc/resolv.conf", []byte(content), 0o644); err != nil {
			logger.Error("writing /etc/resolv.conf failed", "err", err)
		}
	}
}

func startTransports(ctx context.Context, logger *slog.Logger, srv *guest.Server, cfg guest.BootConfig) {
	if ln, err := guest.ListenVsock(cfg.AgentPort); err != nil {
		logger.Info("no vsock transport", "port", cfg.AgentPort, "err", err)
	} else {
		logger.Info("agent listening on vsock", "port", cfg.AgentPort)
		go keepRunning(ctx, logger, "vsock", func(ctx context.Context) error {
			return srv.ServeVsock(ctx, ln)
		})
	}

	go func() {
		deadline := time.Now().Add(portWait)
		for {
			path, err := guest.FindVirtioPort("/sys", guest.VirtioPortName)
			if err == nil {
				logger.Info("agent serving on virtio-serial", "port", path)
				keepRunning(ctx, logger, "virtio-serial", func(ctx context.Context) error {
					return srv.ServeVirtioPort(ctx, path)
				})
				return
			}
			if time.Now().After(deadline) {
				logger.Info("no virtio-serial transport", "name", guest.VirtioPortName, "err", err)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
}

// waitForPowerOff blocks until SIGTERM, SIGINT or SIGPWR, then powers off.
func waitForPowerOff(logger *slog.Logger, sys *guest.LinuxSystem) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGPWR)
	for sig := range sigs {
		logger.Info("powering off on signal", "signal", sig.String())
		if err := sys.Shutdown(agent.ActionPowerOff); err != nil {
			logger.Error("power-off failed", "err", err)
		}
	}
}

// inputEventSize is sizeof(struct input_event) on 64-bit Linux: a 16-byte
// timeval, then type and code (uint16) and value (int32).
const inputEventSize = 24

const (
	evKey    = 1
	keyPower = 116
)

// watchPowerButton powers off when an input device reports KEY_POWER, which
// is how an ACPI power button press (QEMU's system_powerdown) reaches user
// space. It needs the button and evdev modules; without them there is no
// event device and it returns.
func watchPowerButton(logger *slog.Logger, sys *guest.LinuxSystem) {
	devices, _ := filepath.Glob("/dev/input/event*")
	if len(devices) == 0 {
		logger.Info("no input event devices; ACPI power button not watched")
		return
	}
	pressed := make(chan string, 1)
	for _, dev := range devices {
		go func() {
			f, err := os.Open(dev)
			if err != nil {
				logger.Warn("open input device failed", "device", dev, "err", err)
				return
			}
			defer f.Close()
			buf := make([]byte, inputEventSize)
			for {
				if _, err := io.ReadFull(f, buf); err != nil {
					if !errors.Is(err, io.EOF) {
						logger.Warn("read input device failed", "device", dev, "err", err)
					}
					return
				}
				typ := binary.NativeEndian.Uint16(buf[16:18])
				code := binary.NativeEndian.Uint16(buf[18:20])
				value := int32(binary.NativeEndian.Uint32(buf[20:24]))
				if typ == evKey && code == keyPower && value == 1 {
					select {
					case pressed <- dev:
					default:
					}
				}
			}
		}()
	}
	dev := <-pressed
	logger.Info("powering off on power button", "device", dev)
	if err := sys.Shutdown(agent.ActionPowerOff); err != nil {
		logger.Error("power-off failed", "err", err)
	}
}
