package vm

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors for kinds of failure. Providers wrap them with the id
// involved; callers test with [errors.Is].
var (
	ErrNotFound          = errors.New("vm not found")
	ErrAlreadyExists     = errors.New("vm already exists")
	ErrSnapshotNotFound  = errors.New("snapshot not found")
	ErrSnapshotExists    = errors.New("snapshot already exists")
	ErrInvalidTransition = errors.New("invalid state transition")
	ErrUnsupported       = errors.New("unsupported")
	// ErrSnapshotIncompatible means a snapshot cannot be restored as
	// requested: another backend or VMM version wrote it, or its machine
	// shape differs from the one the caller expects.
	ErrSnapshotIncompatible = errors.New("snapshot incompatible")
	// ErrInvalid matches every [*ValidationError].
	ErrInvalid = errors.New("invalid configuration")
)

// TransitionError reports an operation that the VM's current state does not
// allow. It matches [ErrInvalidTransition].
type TransitionError struct {
	ID   string
	Op   Op
	From State
	To   State
}

func (e *TransitionError) Error() string {
	allowed := make([]string, 0, 4)
	for _, s := range opRules[e.Op].from {
		allowed = append(allowed, string(s))
	}
	return fmt.Sprintf("%s vm %q: cannot go from %s to %s (allowed from: %s)",
		e.Op, e.ID, e.From, e.To, strings.Join(allowed, ", "))
}

func (e *TransitionError) Is(target error) bool { return target == ErrInvalidTransition }

// UnsupportedError reports a feature that a backend, or the running version
// of it, does not support. It matches [ErrUnsupported].
type UnsupportedError struct {
	// Feature names the field or operation, such as "network_overrides".
	Feature string
	Backend string
	// Version is the running VMM version, when known.
	Version string
	// MinVersion is the first version that supports Feature; empty when no
	// version of Backend does.
	MinVersion string
}

func (e *UnsupportedError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: not supported by %s", e.Feature, e.Backend)
	if e.Version != "" {
		fmt.Fprintf(&b, " %s", e.Version)
	}
	if e.MinVersion != "" {
		fmt.Fprintf(&b, " (needs %s or later)", e.MinVersion)
	}
	return b.String()
}

func (e *UnsupportedError) Is(target error) bool { return target == ErrUnsupported }

// APIError is a non-2xx reply from a VMM's control API.
type APIError struct {
	Method     string
	Path       string
	StatusCode int
	// FaultMessage is the VMM's own explanation (Firecracker's
	// fault_message, QEMU's error description).
	FaultMessage string
}

func (e *APIError) Error() string {
	if e.Method == "" {
		return fmt.Sprintf("vmm api: status %d: %s", e.StatusCode, e.FaultMessage)
	}
	return fmt.Sprintf("vmm api %s %s: status %d: %s", e.Method, e.Path, e.StatusCode, e.FaultMessage)
}

// FieldError is one validation problem: the field path in the spec's JSON
// form and the rule it breaks.
type FieldError struct {
	Field   string `json:"field"`
	Problem string `json:"problem"`
}

func (e FieldError) String() string { return e.Field + ": " + e.Problem }

// ValidationError lists every problem found in a spec or configuration. It
// matches [ErrInvalid].
type ValidationError struct {
	Problems []FieldError
}

func (e *ValidationError) Error() string {
	if len(e.Problems) == 1 {
		return "invalid configuration: " + e.Problems[0].String()
	}
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return fmt.Sprintf("invalid configuration, %d problems:\n  %s", len(e.Problems), strings.Join(lines, "\n  "))
}

func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// JoinProblems returns one [*ValidationError] with the problems of every
// *ValidationError in errs, in order, or nil when errs holds only nils.
// Any other error is returned joined with it.
func JoinProblems(errs ...error) error {
	var problems []FieldError
	var others []error
	for _, err := range errs {
		var ve *ValidationError
		switch {
		case err == nil:
		case errors.As(err, &ve):
			problems = append(problems, ve.Problems...)
		default:
			others = append(others, err)
		}
	}
	if len(problems) == 0 {
		return errors.Join(others...)
	}
	ve := &ValidationError{Problems: problems}
	if len(others) == 0 {
		return ve
	}
	return errors.Join(append(others, ve)...)
}
