package guest

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/agent"
)

// TestVsockListenerClose checks that Close interrupts a pending Accept,
// which needs the listener to run through the runtime's poller. Connecting
// needs a vsock transport that hosts without VMs lack, so it is left to the
// guest tests.
func TestVsockListenerClose(t *testing.T) {
	l, err := ListenVsock(40123)
	if errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.ENODEV) {
		t.Skipf("no AF_VSOCK on this host (%v); load the vsock module to run this test", err)
	}
	if err != nil {
		t.Fatalf("ListenVsock: %v", err)
	}
	accepted := make(chan error, 1)
	go func() {
		_, err := l.Accept()
		accepted <- err
	}()
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-accepted; err == nil {
		t.Fatal("Accept after Close succeeded")
	}
}

// TestHandlerPanicKeepsServing registers an operation that panics and
// checks that the caller gets an internal error and the connection keeps
// serving.
func TestHandlerPanicKeepsServing(t *testing.T) {
	operations["test_panic"] = operation{handle: func(*Server, *request, json.RawMessage) (any, error) {
		panic("deliberate test panic")
	}}
	t.Cleanup(func() { delete(operations, "test_panic") })
	h := newHarness(t, nil)
	ctx := context.Background()
	if err := h.client.Call(ctx, "test_panic", struct{}{}, nil); !errors.Is(err, agent.ErrInternal) {
		t.Fatalf("Call(test_panic) = %v, want ErrInternal", err)
	}
	if _, err := h.client.Health(ctx); err != nil {
		t.Fatalf("Health after a panic: %v", err)
	}
}
