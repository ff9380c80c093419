// Package cleanup provides a rollback stack for multi-step setups: each
// step that creates something registers how to undo it, and a failure
// undoes everything in reverse order.
package cleanup

import (
	"context"
	"errors"
	"time"
)

// Timeout bounds how long Run gives the undo steps.
const Timeout = 30 * time.Second

// Stack is a last-in, first-out list of undo steps. The zero value is an
// empty stack. It is not safe for concurrent use.
type Stack struct {
	steps []func(context.Context) error
}

// Add registers an undo step.
func (s *Stack) Add(step func(context.Context) error) {
	s.steps = append(s.steps, step)
}

// AddFunc registers an undo step that needs no context.
func (s *Stack) AddFunc(step func() error) {
	s.steps = append(s.steps, func(context.Context) error { return step() })
}

// Run undoes every step, newest first, and returns their errors joined. It
// runs on a context of its own, detached from any caller's, so a cancelled
// request still cleans up, but bounded by Timeout. The stack is empty
// afterwards.
func (s *Stack) Run() error {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	var errs []error
	for i := len(s.steps) - 1; i >= 0; i-- {
		if err := s.steps[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	s.steps = nil
	return errors.Join(errs...)
}

// Release drops every step once the setup succeeded.
func (s *Stack) Release() { s.steps = nil }
