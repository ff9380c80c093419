// Command ember-agent is Ember's guest agent. In a microVM it runs as PID 1
// from the initramfs: it mounts the kernel file systems, loads the modules
// listed in /etc/ember/modules, optionally switches to a root device, brings
// up the network from the kernel's ip= parameter, reaps orphaned processes
// and serves the agent protocol over vsock and the "ember.agent"
// virtio-serial port, whichever exist. SIGTERM, SIGINT (Ctrl-Alt-Del),
// SIGPWR and the ACPI power button power the guest off after a sync.
//
// The initramfs contract: the static binary is /init. /etc/ember/modules
// lists absolute paths of uncompressed .ko files, one a line, dependencies
// first; blank lines and lines starting with '#' are skipped. The ACPI power
// button needs button.ko and evdev.ko in that list.
//
// Kernel parameters read:
//
//	ember.mode=initramfs|switchroot   default initramfs
//	ember.root=/dev/vda               root device for switchroot
//	ember.rootfstype=ext4             root file system type
//	ember.rootflags=ro|rw             mount the root read-only or read-write
//	ember.agent_port=1024             vsock port
//	ember.hostname=NAME               host name, used instead of the one in ip=
//	ember.serial_wait=epoll|poll      how to wait for the host on virtio-serial
//	ip=<client-ip>::<gw-ip>:<netmask>:<hostname>:<device>:off[:<dns0>[:<dns1>]]
//
// Outside a VM it can serve one Unix socket for manual tests:
//
//	ember-agent -listen /tmp/agent.sock -root /tmp/guest-root
//
// Log lines go to the console with the prefix "ember-agent:".
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/embervm/ember/agent/guest"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	listen := flag.String("listen", "", "serve on this Unix socket path instead of the VM transports (for tests outside a VM)")
	root := flag.String("root", "/", "directory that file, secret and config paths are resolved in")
	debugLog := flag.Bool("debug", false, "log debug records")
	flag.Parse()

	level := slog.LevelInfo
	if *debugLog {
		level = slog.LevelDebug
	}
	pid1 := os.Getpid() == 1
	if pid1 {
		boot(level)
		return // boot never returns
	}

	logger := newLogger(os.Stderr, level)
	if *listen == "" {
		logger.Error("nothing to serve: not running as PID 1 and no -listen socket given; pass -listen PATH to serve a Unix socket")
		os.Exit(2)
	}
	srv, err := guest.NewServer(guest.Config{Root: *root, Version: version, Logger: logger})
	if err != nil {
		logger.Error("agent failed to start", "err", err)
		os.Exit(1)
	}
	ln, err := net.Listen("unix", *listen)
	if err != nil {
		logger.Error("agent failed to listen", "socket", *listen, "err", err)
		os.Exit(1)
	}
	logger.Info("agent listening", "socket", *listen, "version", version)
	if err := srv.Serve(context.Background(), ln); err != nil {
		logger.Error("agent stopped", "err", err)
		os.Exit(1)
	}
}

// newLogger writes text records to w, each line prefixed with
// "ember-agent: " so the host can pick agent lines out of the console.
func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(&prefixWriter{w: w, prefix: []byte("ember-agent: ")}, &slog.HandlerOptions{Level: level}))
}

type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.w.Write(append(append([]byte{}, p.prefix...), b...)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// keepRunning calls fn again whenever it panics or returns, logging why, so
// a bug in one transport never takes down PID 1. It returns when ctx ends.
func keepRunning(ctx context.Context, logger *slog.Logger, name string, fn func(context.Context) error) {
	for ctx.Err() == nil {
		err := func() (err error) {
			defer func() {
				if p := recover(); p != nil {
					err = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
				}
			}()
			return fn(ctx)
		}()
		if ctx.Err() != nil {
			return
		}
		logger.Error("agent transport stopped; restarting", "transport", name, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func readCmdline() string {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
