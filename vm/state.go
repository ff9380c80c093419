package vm

import "slices"

// State is the life-cycle state of a VM.
type State string

const (
	// StateCreated: the VMM process exists and is configured, the guest has
	// not run yet.
	StateCreated State = "created"
	StateRunning State = "running"
	StatePaused  State = "paused"
	// StateStopped: the guest shut down; the VM can only be destroyed.
	StateStopped State = "stopped"
	// StateFailed: the VMM process died or could not be controlled.
	StateFailed    State = "failed"
	StateDestroyed State = "destroyed"
)

// Op is an operation or event that changes, or requires, a VM state.
type Op string

const (
	OpStart    Op = "start"
	OpPause    Op = "pause"
	OpResume   Op = "resume"
	OpSnapshot Op = "snapshot"
	OpShutdown Op = "shutdown"
	OpRename   Op = "rename"
	OpDestroy  Op = "destroy"
	// OpGuestExit is the event of the guest powering itself off.
	OpGuestExit Op = "guest-exit"
	// OpFail is the event of the VMM dying or becoming unreachable.
	OpFail Op = "fail"
)

type opRule struct {
	from []State
	// to is the resulting state; empty keeps the current one.
	to State
}

// opRules is the one table of legal transitions.
var opRules = map[Op]opRule{
	OpStart:     {from: []State{StateCreated}, to: StateRunning},
	OpPause:     {from: []State{StateRunning}, to: StatePaused},
	OpResume:    {from: []State{StatePaused}, to: StateRunning},
	OpSnapshot:  {from: []State{StatePaused}},
	OpShutdown:  {from: []State{StateCreated, StateRunning, StatePaused}, to: StateStopped},
	OpRename:    {from: []State{StateCreated, StateRunning, StatePaused, StateStopped, StateFailed}},
	OpDestroy:   {from: []State{StateCreated, StateRunning, StatePaused, StateStopped, StateFailed}, to: StateDestroyed},
	OpGuestExit: {from: []State{StateRunning}, to: StateStopped},
	OpFail:      {from: []State{StateCreated, StateRunning, StatePaused}, to: StateFailed},
}

// Transition returns the state that op moves VM id to from state from, or a
// [*TransitionError] when from does not allow op. Every provider routes its
// state changes through it.
func Transition(id string, from State, op Op) (State, error) {
	rule, ok := opRules[op]
	if !ok {
		return from, &TransitionError{ID: id, Op: op, From: from, To: from}
	}
	to := rule.to
	if to == "" {
		to = from
	}
	if !slices.Contains(rule.from, from) {
		return from, &TransitionError{ID: id, Op: op, From: from, To: to}
	}
	return to, nil
}

// Allowed reports whether op is legal in state s.
func Allowed(s State, op Op) bool {
	_, err := Transition("", s, op)
	return err == nil
}

// Ops lists every operation and event in the transition table.
func Ops() []Op {
	return []Op{OpStart, OpPause, OpResume, OpSnapshot, OpShutdown, OpRename, OpDestroy, OpGuestExit, OpFail}
}

// States lists every state.
func States() []State {
	return []State{StateCreated, StateRunning, StatePaused, StateStopped, StateFailed, StateDestroyed}
}
