package qemu

import (
	"bytes"
	"io"
	"os"
	"sync"
	"time"
)

// consoleRing keeps the most recent console output, bounded both in lines
// (an incomplete last line counts as one) and in bytes. A single line longer than maxBytes keeps only its last
// maxBytes bytes. It is safe for concurrent use.
type consoleRing struct {
	maxBytes int
	maxLines int

	mu sync.Mutex
	// buf holds the retained output. Complete lines end in '\n'; the
	// last line may be incomplete.
	buf []byte
	// lines counts the '\n' bytes in buf.
	lines int
}

func newConsoleRing(maxBytes, maxLines int) *consoleRing {
	return &consoleRing{maxBytes: maxBytes, maxLines: maxLines}
}

// Write appends p and drops the oldest output beyond the bounds. It never
// fails.
func (r *consoleRing) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()

	r.buf = append(r.buf, p...)
	r.lines += bytes.Count(p, []byte{'\n'})

	// Drop whole lines from the front while over either bound. When the
	// line count is within bounds but the bytes are not, this may still
	// cut into the middle of the oldest line.
	for r.lineCountLocked() > r.maxLines {
		i := bytes.IndexByte(r.buf, '\n')
		r.buf = r.buf[i+1:]
		r.lines--
	}
	for len(r.buf) > r.maxBytes {
		i := bytes.IndexByte(r.buf, '\n')
		if i < 0 || len(r.buf)-(i+1) < r.maxBytes {
			// Dropping up to the next line break would go under the
			// byte bound, so cut at exactly maxBytes instead.
			cut := len(r.buf) - r.maxBytes
			r.lines -= bytes.Count(r.buf[:cut], []byte{'\n'})
			r.buf = r.buf[cut:]
			break
		}
		r.buf = r.buf[i+1:]
		r.lines--
	}
	// Compact when the retained data sits far into a large backing array,
	// so that memory stays proportional to the bounds.
	if cap(r.buf) > 4*r.maxBytes && len(r.buf) < cap(r.buf)/4 {
		r.buf = append([]byte(nil), r.buf...)
	}
	return len(p), nil
}

// lineCountLocked counts the retained lines, including an incomplete last
// line.
func (r *consoleRing) lineCountLocked() int {
	n := r.lines
	if len(r.buf) > 0 && r.buf[len(r.buf)-1] != '\n' {
		n++
	}
	return n
}

// Bytes returns a copy of the retained output.
func (r *consoleRing) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.buf)
}

// followInterval is how often a follower copies new console output into
// the ring. Console reads copy it on demand as well, so it only bounds how
// stale the ring is between reads.
const followInterval = 50 * time.Millisecond

// consoleFollower copies what QEMU appends to the console log file into a
// ring buffer.
type consoleFollower struct {
	ring *consoleRing
	// done is closed when run has returned and the file is closed.
	done     chan struct{}
	stopCh   chan struct{}
	stopOnce sync.Once

	mu     sync.Mutex
	f      *os.File
	buf    []byte
	closed bool
}

// newConsoleFollower opens (creating it if needed) the log at path and
// loads its last ring.maxBytes bytes into ring.
func newConsoleFollower(path string, ring *consoleRing) (*consoleFollower, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if skip := st.Size() - int64(ring.maxBytes); skip > 0 {
		if _, err := f.Seek(skip, io.SeekStart); err != nil {
			f.Close()
			return nil, err
		}
	}
	c := &consoleFollower{ring: ring, done: make(chan struct{}), stopCh: make(chan struct{}), f: f, buf: make([]byte, 32<<10)}
	c.poll()
	return c, nil
}

// poll copies everything appended since the last poll.
func (c *consoleFollower) poll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	for {
		n, err := c.f.Read(c.buf)
		if n > 0 {
			c.ring.Write(c.buf[:n])
		}
		if n == 0 || err != nil {
			return
		}
	}
}

// run polls until stop is called, then polls a last time and closes the
// file.
func (c *consoleFollower) run() {
	defer close(c.done)
	t := time.NewTicker(followInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			c.poll()
		case <-c.stopCh:
			c.poll()
			c.close()
			return
		}
	}
}

// stop makes run return and waits until it has. It is safe to call more
// than once.
func (c *consoleFollower) stop() {
	c.stopOnce.Do(func() { close(c.stopCh) })
	<-c.done
}

// close closes the file, and later polls do nothing.
func (c *consoleFollower) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		c.closed = true
		c.f.Close()
	}
}
