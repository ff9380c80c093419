package agent

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"testing"
)

// TestStreamWindow pipes 1 MiB through an OutStream and InStream pair with a
// 1 KiB window and checks that the sender never exceeds it.
func TestStreamWindow(t *testing.T) {
	const window = 1024
	var in *InStream
	var out *OutStream
	in = NewInStream(window, func(n int) { out.Grant(n) })
	out = NewOutStream(window, 300, func(p []byte, eof bool) error {
		return in.Push(append([]byte(nil), p...), eof)
	})
	want := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	var wg sync.WaitGroup
	var writeErr error
	wg.Go(func() {
		if _, writeErr = out.Write(want); writeErr == nil {
			writeErr = out.Close()
		}
	})
	got, err := io.ReadAll(in)
	wg.Wait()
	if err != nil || writeErr != nil {
		t.Fatalf("read error %v, write error %v", err, writeErr)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("received %d bytes, want %d identical bytes", len(got), len(want))
	}
}

func TestInStreamRejectsWindowOverrun(t *testing.T) {
	in := NewInStream(4, nil)
	if err := in.Push([]byte("abcd"), false); err != nil {
		t.Fatalf("Push within window: %v", err)
	}
	if err := in.Push([]byte("e"), false); !errors.Is(err, ErrWindowExceeded) {
		t.Fatalf("Push beyond window = %v, want ErrWindowExceeded", err)
	}
}

func TestStreamAbortUnblocks(t *testing.T) {
	in := NewInStream(4, nil)
	out := NewOutStream(0, 4, func([]byte, bool) error { return nil })
	boom := errors.New("boom")
	var wg sync.WaitGroup
	var readErr, writeErr error
	wg.Go(func() { _, readErr = in.Read(make([]byte, 1)) })
	wg.Go(func() { _, writeErr = out.Write([]byte("x")) })
	in.Abort(boom)
	out.Abort(boom)
	wg.Wait()
	if !errors.Is(readErr, boom) || !errors.Is(writeErr, boom) {
		t.Fatalf("read error %v, write error %v; want boom for both", readErr, writeErr)
	}
}
