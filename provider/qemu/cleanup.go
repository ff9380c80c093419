package qemu

import "errors"

// rollback is a stack of undo steps for a multi-step setup. Run executes
// them last in, first out, and joins their errors.
type rollback struct {
	steps []func() error
}

func (r *rollback) add(step func() error) { r.steps = append(r.steps, step) }

func (r *rollback) run() error {
	var errs []error
	for i := len(r.steps) - 1; i >= 0; i-- {
		errs = append(errs, r.steps[i]())
	}
	r.steps = nil
	return errors.Join(errs...)
}
