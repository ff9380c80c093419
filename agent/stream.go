package agent

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// ErrWindowExceeded means a peer sent more stream data than it was granted.
var ErrWindowExceeded = errors.New("stream window exceeded")

// InStream buffers the data frames of one incoming stream for a reader and
// grants the sender more window as the reader consumes bytes. Push never
// blocks, so the goroutine that reads frames never waits on a slow consumer.
type InStream struct {
	grant  func(n int)
	window int

	mu       sync.Mutex
	cond     sync.Cond
	chunks   [][]byte
	buffered int
	// consumed counts bytes read but not yet granted back.
	consumed int
	eof      bool
	err      error
}

// NewInStream returns a stream that allows window unread bytes and calls
// grant, outside its lock, to return consumed bytes to the sender.
func NewInStream(window int, grant func(n int)) *InStream {
	s := &InStream{grant: grant, window: window}
	s.cond.L = &s.mu
	return s
}

// Push adds the payload of a data frame; eof marks the end of the stream.
// It returns [ErrWindowExceeded] when the sender ignored its window, and an
// error for data after the end of the stream.
func (s *InStream) Push(p []byte, eof bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.eof {
		return errors.New("stream data after end of stream")
	}
	if s.buffered+s.consumed+len(p) > s.window {
		return fmt.Errorf("%w: %d unacknowledged bytes, window %d", ErrWindowExceeded, s.buffered+s.consumed+len(p), s.window)
	}
	if len(p) > 0 {
		s.chunks = append(s.chunks, p)
		s.buffered += len(p)
	}
	s.eof = eof
	s.cond.Broadcast()
	return nil
}

// Read implements [io.Reader]. It returns io.EOF after the last pushed byte
// of a stream that ended, and the abort error after [InStream.Abort].
func (s *InStream) Read(p []byte) (int, error) {
	s.mu.Lock()
	for len(s.chunks) == 0 && !s.eof && s.err == nil {
		s.cond.Wait()
	}
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return 0, err
	}
	if len(s.chunks) == 0 {
		s.mu.Unlock()
		return 0, io.EOF
	}
	n := copy(p, s.chunks[0])
	if n == len(s.chunks[0]) {
		s.chunks[0] = nil
		s.chunks = s.chunks[1:]
	} else {
		s.chunks[0] = s.chunks[0][n:]
	}
	s.buffered -= n
	s.consumed += n
	grant := 0
	// Granting in batches of a quarter window keeps window frames rare while
	// the sender always has at least three quarters of its window.
	if s.consumed >= s.window/4 || (s.buffered == 0 && !s.eof && s.consumed > 0) {
		grant = s.consumed
		s.consumed = 0
	}
	s.mu.Unlock()
	if grant > 0 && s.grant != nil {
		s.grant(grant)
	}
	return n, nil
}

// Abort makes pending and later reads return err and drops buffered data.
func (s *InStream) Abort(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
		s.chunks = nil
	}
	s.cond.Broadcast()
	s.mu.Unlock()
}

// OutStream sends bytes as data frames, never more than the receiver has
// granted. Write blocks while the window is used up.
type OutStream struct {
	send     func(p []byte, eof bool) error
	maxChunk int

	mu     sync.Mutex
	cond   sync.Cond
	credit int
	closed bool
	err    error
}

// NewOutStream returns a stream with window bytes of initial credit that
// sends chunks of at most maxChunk bytes through send.
func NewOutStream(window, maxChunk int, send func(p []byte, eof bool) error) *OutStream {
	s := &OutStream{send: send, maxChunk: maxChunk, credit: window}
	s.cond.L = &s.mu
	return s
}

// Write implements [io.Writer]. It is not safe for concurrent use with
// itself or Close.
func (s *OutStream) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		s.mu.Lock()
		for s.credit == 0 && s.err == nil {
			s.cond.Wait()
		}
		if s.err != nil {
			err := s.err
			s.mu.Unlock()
			return written, err
		}
		if s.closed {
			s.mu.Unlock()
			return written, errors.New("write to closed stream")
		}
		n := min(len(p), s.credit, s.maxChunk)
		s.credit -= n
		s.mu.Unlock()

		if err := s.send(p[:n], false); err != nil {
			s.Abort(err)
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// Close sends the end of the stream. Closing twice sends it once.
func (s *OutStream) Close() error {
	s.mu.Lock()
	if s.closed || s.err != nil {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	return s.send(nil, true)
}

// Grant adds n bytes of credit, from a FrameWindow.
func (s *OutStream) Grant(n int) {
	s.mu.Lock()
	s.credit += n
	s.cond.Broadcast()
	s.mu.Unlock()
}

// Abort makes pending and later writes fail with err.
func (s *OutStream) Abort(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.cond.Broadcast()
	s.mu.Unlock()
}
