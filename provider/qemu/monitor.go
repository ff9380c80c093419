package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/embervm/ember/vm"
)

// qmpHandshakeTimeout bounds the wait for QEMU's QMP greeting. QEMU 7.2
// does not serve its monitor while it loads a snapshot from a file, so the
// bound must cover the load of a large snapshot.
const qmpHandshakeTimeout = 2 * time.Minute

// monitor is a QMP connection to one QEMU process. Commands run one at a
// time. Events go to the handler given to dialMonitor, from a goroutine that
// drains them all the time: the QMP library delivers events and command
// replies from one reader, so an undrained event would stall the next reply.
type monitor struct {
	mon *qmp.SocketMonitor
	// eventsDone is closed when the event channel closes, which happens
	// when the connection ends.
	eventsDone chan struct{}
}

// dialMonitor connects to the QMP socket at path, retrying until QEMU has
// created it, the deadline passes or exited is closed. It completes the
// capability negotiation and starts draining events into handle.
func dialMonitor(ctx context.Context, path string, exited <-chan struct{}, handle func(qmp.Event)) (*monitor, error) {
	mon, err := dialQMPSocket(ctx, path, exited)
	if err != nil {
		return nil, err
	}
	if err := handshake(ctx, mon, path, exited); err != nil {
		return nil, err
	}

	events, err := mon.Events(context.Background())
	if err != nil {
		mon.Disconnect()
		return nil, fmt.Errorf("subscribe to qmp events on %s: %w", path, err)
	}
	m := &monitor{mon: mon, eventsDone: make(chan struct{})}
	go func() {
		defer close(m.eventsDone)
		for ev := range events {
			handle(ev)
		}
	}()
	return m, nil
}

// dialQMPSocket connects to path, retrying while QEMU has not created the
// socket yet.
func dialQMPSocket(ctx context.Context, path string, exited <-chan struct{}) (*qmp.SocketMonitor, error) {
	deadline := time.Now().Add(defaultQMPDialTimeout)
	for {
		mon, err := qmp.NewSocketMonitor("unix", path, time.Second)
		if err == nil {
			return mon, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect to qmp socket %s: %w", path, err)
		}
		select {
		case <-exited:
			return nil, errors.New("qemu exited before its qmp socket accepted a connection")
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// handshake reads QEMU's greeting and negotiates capabilities. QEMU greets
// only one client at a time and not while it loads a migration stream, so
// the handshake has its own bound. Disconnecting makes a blocked Connect
// return. On failure mon is disconnected.
func handshake(ctx context.Context, mon *qmp.SocketMonitor, path string, exited <-chan struct{}) error {
	connected := make(chan error, 1)
	go func() { connected <- mon.Connect() }()

	var err error
	select {
	case err = <-connected:
		if err == nil {
			return nil
		}
		mon.Disconnect()
		return fmt.Errorf("qmp handshake on %s: %w", path, err)
	case <-exited:
		err = errors.New("qemu exited during the qmp handshake")
	case <-ctx.Done():
		err = ctx.Err()
	case <-time.After(qmpHandshakeTimeout):
		err = fmt.Errorf("timed out after %s, another client may hold the monitor", qmpHandshakeTimeout)
	}
	// Connect is still running: end it and wait for it.
	mon.Disconnect()
	<-connected
	return fmt.Errorf("qmp handshake on %s: %w", path, err)
}

// run executes a QMP command and decodes its "return" value into out when
// out is not nil. A QMP error becomes a *vm.APIError. When ctx ends first,
// run returns ctx.Err() and the command still completes in the background.
func (m *monitor) run(ctx context.Context, command string, args any, out any) error {
	return m.runWithFile(ctx, command, args, nil, out)
}

// runWithFile is run that also passes file to QEMU as SCM_RIGHTS ancillary
// data, which is how the getfd command receives a descriptor.
func (m *monitor) runWithFile(ctx context.Context, command string, args any, file *os.File, out any) error {
	req, err := json.Marshal(qmp.Command{Execute: command, Args: args})
	if err != nil {
		return fmt.Errorf("encode qmp %s: %w", command, err)
	}
	type result struct {
		raw []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		raw, err := m.mon.RunWithFile(req, file)
		done <- result{raw, err}
	}()

	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
	if res.err != nil {
		if res.raw == nil && isQMPReply(res.err) {
			return &vm.APIError{Method: "QMP", Path: command, FaultMessage: res.err.Error()}
		}
		return fmt.Errorf("qmp %s: %w", command, res.err)
	}
	if out == nil {
		return nil
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(res.raw, &reply); err != nil {
		return fmt.Errorf("decode qmp %s reply: %w", command, err)
	}
	if err := json.Unmarshal(reply.Return, out); err != nil {
		return fmt.Errorf("decode qmp %s reply: %w", command, err)
	}
	return nil
}

// isQMPReply reports whether err is QEMU's own error reply. The QMP library
// returns those as plain errors built from the reply's "desc", while
// connection and decoding failures come from the net and json packages.
func isQMPReply(err error) bool {
	var jsonErr *json.SyntaxError
	var netErr interface{ Timeout() bool }
	return !errors.As(err, &jsonErr) && !errors.As(err, &netErr)
}

// close ends the connection and waits for the event goroutine to finish.
func (m *monitor) close() {
	m.mon.Disconnect()
	<-m.eventsDone
}
