package vm

import (
	"errors"
	"testing"
)

func TestTransitionTable(t *testing.T) {
	type key struct {
		from State
		op   Op
	}
	legal := map[key]State{
		{StateCreated, OpStart}:     StateRunning,
		{StateRunning, OpPause}:     StatePaused,
		{StatePaused, OpResume}:     StateRunning,
		{StatePaused, OpSnapshot}:   StatePaused,
		{StateCreated, OpShutdown}:  StateStopped,
		{StateRunning, OpShutdown}:  StateStopped,
		{StatePaused, OpShutdown}:   StateStopped,
		{StateRunning, OpGuestExit}: StateStopped,
		{StateCreated, OpFail}:      StateFailed,
		{StateRunning, OpFail}:      StateFailed,
		{StatePaused, OpFail}:       StateFailed,
	}
	for _, s := range []State{StateCreated, StateRunning, StatePaused, StateStopped, StateFailed} {
		legal[key{s, OpDestroy}] = StateDestroyed
		legal[key{s, OpRename}] = s
	}
	for _, from := range States() {
		for _, op := range Ops() {
			to, err := Transition("v", from, op)
			want, ok := legal[key{from, op}]
			if ok {
				if err != nil || to != want {
					t.Errorf("%s from %s = (%s, %v), want (%s, nil)", op, from, to, err, want)
				}
				continue
			}
			var te *TransitionError
			if !errors.As(err, &te) || !errors.Is(err, ErrInvalidTransition) {
				t.Errorf("%s from %s: err = %v, want *TransitionError", op, from, err)
				continue
			}
			if to != from || te.From != from || te.Op != op || te.ID != "v" {
				t.Errorf("%s from %s: got state %s, error %+v", op, from, to, te)
			}
		}
	}
}

func TestTransitionErrorMessage(t *testing.T) {
	_, err := Transition("web-1", StateRunning, OpSnapshot)
	want := `snapshot vm "web-1": cannot go from running to running (allowed from: paused)`
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v, want %q", err, want)
	}
	_, err = Transition("web-1", StateStopped, OpStart)
	want = `start vm "web-1": cannot go from stopped to running (allowed from: created)`
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v, want %q", err, want)
	}
}

func TestUnknownOpIsInvalid(t *testing.T) {
	if _, err := Transition("v", StateRunning, Op("reboot")); !errors.Is(err, ErrInvalidTransition) {
		t.Fatalf("unknown op: err = %v, want ErrInvalidTransition", err)
	}
}

func TestTypedErrors(t *testing.T) {
	ue := &UnsupportedError{Feature: "network_overrides", Backend: "firecracker", Version: "1.10.1", MinVersion: "1.12.0"}
	if !errors.Is(ue, ErrUnsupported) {
		t.Error("UnsupportedError does not match ErrUnsupported")
	}
	if got, want := ue.Error(), "network_overrides: not supported by firecracker 1.10.1 (needs 1.12.0 or later)"; got != want {
		t.Errorf("UnsupportedError = %q, want %q", got, want)
	}
	ae := &APIError{Method: "PUT", Path: "/snapshot/load", StatusCode: 400, FaultMessage: "unknown field `x`"}
	if got, want := ae.Error(), "vmm api PUT /snapshot/load: status 400: unknown field `x`"; got != want {
		t.Errorf("APIError = %q, want %q", got, want)
	}
}
