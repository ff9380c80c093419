package cleanup

import (
	"context"
	"errors"
	"slices"
	"testing"
)

func TestRunUndoesInReverseAndJoinsErrors(t *testing.T) {
	var s Stack
	var order []int
	errA, errB := errors.New("a"), errors.New("b")
	s.AddFunc(func() error { order = append(order, 1); return errA })
	s.Add(func(ctx context.Context) error {
		if ctx.Err() != nil {
			t.Error("undo step got a finished context")
		}
		order = append(order, 2)
		return nil
	})
	s.AddFunc(func() error { order = append(order, 3); return errB })
	err := s.Run()
	if !slices.Equal(order, []int{3, 2, 1}) {
		t.Fatalf("order = %v, want [3 2 1]", order)
	}
	if !errors.Is(err, errA) || !errors.Is(err, errB) {
		t.Fatalf("err = %v, want both errors", err)
	}
	if err := s.Run(); err != nil || len(order) != 3 {
		t.Fatalf("second Run ran steps again: %v %v", err, order)
	}
}

func TestReleaseDropsSteps(t *testing.T) {
	var s Stack
	ran := false
	s.AddFunc(func() error { ran = true; return nil })
	s.Release()
	if err := s.Run(); err != nil || ran {
		t.Fatalf("released step ran: %v", err)
	}
}
