package qemu

import (
	"bytes"
	"sync"
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
