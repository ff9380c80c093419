package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/vm"
)

// termGrace is how long Shutdown waits after SIGTERM before SIGKILL.
const termGrace = 2 * time.Second

// Shutdown requests a guest power-off with SendCtrlAltDel (x86) and waits
// up to grace for Firecracker to exit, then sends SIGTERM, then SIGKILL. A
// cancelled ctx skips to the forced stop. The VM ends stopped.
func (p *Provider) Shutdown(ctx context.Context, id string, grace time.Duration) error {
	m, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	if _, err := vm.Transition(m.id, m.state, vm.OpShutdown); err != nil {
		m.mu.Unlock()
		return err
	}
	wasRunning := m.state == vm.StateRunning
	m.stopping = true
	m.mu.Unlock()

	exited := false
	if wasRunning && m.vmmAlive() {
		if err := m.client.Action(ctx, fcapi.ActionSendCtrlAltDel); err != nil {
			p.log.Warn("send ctrl-alt-del failed, stopping by signal", "vm", id, "err", err)
		} else {
			t := time.NewTimer(grace)
			select {
			case <-m.vmmExited():
				exited = true
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
	}
	if !exited {
		p.stopProcess(m)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopping = false
	if m.state == vm.StateStopped {
		return nil // the guest powered off and the watcher saw it
	}
	if err := m.transitionLocked(vm.OpShutdown); err != nil {
		return err
	}
	m.reason = "shut down: " + m.proc.exitDescription()
	p.log.Info("vm shut down", "vm", m.id, "status", m.proc.exitDescription())
	return nil
}

// stopProcess sends SIGTERM, waits termGrace, then SIGKILL, and reaps.
func (p *Provider) stopProcess(m *machine) {
	if m.jail != nil && m.jail.firecrackerPID > 0 {
		m.jail.signalFirecracker(syscall.SIGTERM)
		if !m.jail.waitFirecrackerExit(termGrace) {
			m.jail.signalFirecracker(syscall.SIGKILL)
			m.jail.waitFirecrackerExit(termGrace)
		}
	}
	m.proc.signal(syscall.SIGTERM)
	if !m.proc.wait(termGrace) {
		m.proc.kill()
	}
}

// Destroy kills the VMM, reaps it, stops the uffd handler and removes the
// run directory and the jail. Snapshots stay.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	m, err := p.lookup(id)
	if err != nil {
		return fmt.Errorf("destroy: %w", err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	if _, err := vm.Transition(m.id, m.state, vm.OpDestroy); err != nil {
		m.mu.Unlock()
		return err
	}
	m.stopping = true
	vsock := m.cfg.Vsock
	m.mu.Unlock()

	if m.jail != nil && m.jail.firecrackerPID > 0 {
		m.jail.signalFirecracker(syscall.SIGKILL)
		m.jail.waitFirecrackerExit(termGrace)
	}
	m.proc.kill()
	m.client.Close()

	var errs []error
	if m.uffd != nil {
		if err := m.uffd.Close(); err != nil {
			p.log.Warn("uffd handler ended with an error", "vm", id, "err", err)
		}
	}
	if vsock != nil {
		// Firecracker does not remove its vsock socket file when killed.
		if err := os.Remove(vsock.UDSPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if m.jail != nil {
		if err := m.jail.teardown(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(m.runDir); err != nil {
		errs = append(errs, err)
	}

	m.mu.Lock()
	m.transitionLocked(vm.OpDestroy)
	m.mu.Unlock()
	p.mu.Lock()
	if p.vms[id] == m {
		delete(p.vms, id)
	}
	p.mu.Unlock()
	p.log.Info("vm destroyed", "vm", id)
	if len(errs) > 0 {
		return fmt.Errorf("destroy vm %q: cleanup: %w", id, errors.Join(errs...))
	}
	return nil
}

// DialAgent connects to the guest agent over vsock: it dials the VM's
// vsock Unix socket and performs Firecracker's "CONNECT <port>" handshake
// for Config.AgentPort.
func (p *Provider) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	m, err := p.lookup(id)
	if err != nil {
		return nil, fmt.Errorf("dial agent: %w", err)
	}
	m.mu.Lock()
	vsock := m.cfg.Vsock
	state := m.state
	m.mu.Unlock()
	if vsock == nil {
		return nil, fmt.Errorf("dial agent of vm %q: the vm has no vsock device: %w", id, vm.ErrUnsupported)
	}
	if state != vm.StateRunning {
		return nil, fmt.Errorf("dial agent of vm %q: vm is %s, not running: %w", id, state, vm.ErrInvalidTransition)
	}
	return dialVsock(ctx, vsock.UDSPath, p.cfg.AgentPort)
}

// dialVsock connects to guest port through Firecracker's vsock socket.
func dialVsock(ctx context.Context, path string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("dial vsock %s: %w", path, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(5 * time.Second)
	}
	conn.SetDeadline(deadline)
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial vsock %s port %d: %w", path, port, err)
	}
	// Read the reply a byte at a time so no guest data after it is
	// consumed.
	line := make([]byte, 0, 32)
	buf := make([]byte, 1)
	for len(line) < 64 {
		if _, err := conn.Read(buf); err != nil {
			conn.Close()
			return nil, fmt.Errorf("dial vsock %s port %d: read handshake: %w", path, port, err)
		}
		if buf[0] == '\n' {
			break
		}
		line = append(line, buf[0])
	}
	if !strings.HasPrefix(string(line), "OK ") {
		conn.Close()
		return nil, fmt.Errorf("dial vsock %s port %d: handshake reply %q, want \"OK <port>\"", path, port, line)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}
