package firecracker

import (
	"context"
	"errors"
	"time"
)

// rollback is a stack of undo steps for a multi-step setup. Run undoes them
// in reverse order and joins their errors; Release drops them once the
// setup succeeded.
type rollback struct {
	steps []func(context.Context) error
}

func (r *rollback) add(step func(context.Context) error) {
	r.steps = append(r.steps, step)
}

// run undoes every step, newest first, on a context detached from the
// caller's, so a cancelled request still cleans up.
func (r *rollback) run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var errs []error
	for i := len(r.steps) - 1; i >= 0; i-- {
		if err := r.steps[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	r.steps = nil
	return errors.Join(errs...)
}

func (r *rollback) release() { r.steps = nil }
