package agent

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// HeaderSize is the size in bytes of a frame header.
const HeaderSize = 12

// DefaultMaxFrameSize is the largest frame payload, in bytes, that either
// side accepts unless both agree on another value in the handshake.
const DefaultMaxFrameSize = 1 << 20

// maxDiscard is the largest oversized payload that a reader skips to stay in
// step with the stream. A frame that claims more is treated as a corrupt
// stream, because skipping it could take gigabytes of reads.
const maxDiscard = 64 << 20

// FrameType tells what a frame's payload contains.
type FrameType uint8

// Frame types. A frame's ID is the request id, except for FrameHello, whose
// ID is a nonce that the reply repeats.
const (
	// FrameHello opens a session: a [Hello] from the client, a [HelloReply]
	// from the agent.
	FrameHello FrameType = 1
	// FrameRequest starts request ID with a [Request].
	FrameRequest FrameType = 2
	// FrameData carries raw bytes of one stream of request ID. FlagEOF
	// closes that stream.
	FrameData FrameType = 3
	// FrameWindow grants the sender of stream Stream of request ID more
	// bytes to send; the payload is a 4-byte big-endian increment.
	FrameWindow FrameType = 4
	// FrameCancel asks the agent to stop request ID. It has no payload.
	FrameCancel FrameType = 5
	// FrameResponse ends request ID with a [Response].
	FrameResponse FrameType = 6
)

func (t FrameType) String() string {
	switch t {
	case FrameHello:
		return "hello"
	case FrameRequest:
		return "request"
	case FrameData:
		return "data"
	case FrameWindow:
		return "window"
	case FrameCancel:
		return "cancel"
	case FrameResponse:
		return "response"
	}
	return fmt.Sprintf("frame type %d", uint8(t))
}

// Stream numbers a byte stream within one request.
type Stream uint8

// Streams of an exec request; file transfers use StreamStdin for uploads and
// StreamStdout for downloads.
const (
	StreamNone   Stream = 0
	StreamStdin  Stream = 1
	StreamStdout Stream = 2
	StreamStderr Stream = 3
)

// FlagEOF marks the last data frame of a stream.
const FlagEOF uint16 = 1

// Frame is one unit of the wire protocol. On the wire a frame is a 12-byte
// big-endian header followed by Length payload bytes:
//
//	offset 0  uint32  payload length
//	offset 4  uint8   type
//	offset 5  uint8   stream
//	offset 6  uint16  flags
//	offset 8  uint32  id
type Frame struct {
	Type    FrameType
	Stream  Stream
	Flags   uint16
	ID      uint32
	Payload []byte
}

// ErrFrameTooLarge matches a [*FrameTooLargeError].
var ErrFrameTooLarge = errors.New("frame too large")

// ErrCorruptStream means the byte stream cannot be split into frames any
// more; the connection must be closed.
var ErrCorruptStream = errors.New("corrupt frame stream")

// FrameTooLargeError reports a frame whose payload exceeds the maximum. When
// Skipped is true the reader has discarded the payload and the next read
// returns the next frame; otherwise the error also matches
// [ErrCorruptStream].
type FrameTooLargeError struct {
	Type    FrameType
	ID      uint32
	Size    uint32
	Max     uint32
	Skipped bool
}

func (e *FrameTooLargeError) Error() string {
	return fmt.Sprintf("%s frame %d: payload of %d bytes exceeds the maximum of %d", e.Type, e.ID, e.Size, e.Max)
}

func (e *FrameTooLargeError) Is(target error) bool {
	return target == ErrFrameTooLarge || (target == ErrCorruptStream && !e.Skipped)
}

// FrameReader splits a byte stream into frames. It is not safe for
// concurrent use.
type FrameReader struct {
	r   *bufio.Reader
	max uint32
	hdr [HeaderSize]byte
}

// NewFrameReader returns a reader that accepts payloads of at most max bytes;
// max 0 means [DefaultMaxFrameSize].
func NewFrameReader(r io.Reader, max uint32) *FrameReader {
	if max == 0 {
		max = DefaultMaxFrameSize
	}
	return &FrameReader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// SetMax changes the maximum payload size, as agreed in the handshake.
func (fr *FrameReader) SetMax(max uint32) { fr.max = max }

// ReadFrame returns the next frame. It returns io.EOF only when the stream
// ends on a frame boundary, and io.ErrUnexpectedEOF when it ends inside one.
// An oversized payload of at most 64 MiB is skipped and reported as a
// [*FrameTooLargeError] with Skipped set, so the caller can reply with an
// error and keep reading.
func (fr *FrameReader) ReadFrame() (Frame, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return Frame{}, err
	}
	size := binary.BigEndian.Uint32(fr.hdr[0:4])
	f := Frame{
		Type:   FrameType(fr.hdr[4]),
		Stream: Stream(fr.hdr[5]),
		Flags:  binary.BigEndian.Uint16(fr.hdr[6:8]),
		ID:     binary.BigEndian.Uint32(fr.hdr[8:12]),
	}
	if size > fr.max {
		tooLarge := &FrameTooLargeError{Type: f.Type, ID: f.ID, Size: size, Max: fr.max}
		if size > maxDiscard {
			return f, tooLarge
		}
		if _, err := io.CopyN(io.Discard, fr.r, int64(size)); err != nil {
			return f, fmt.Errorf("skip oversized frame: %w", unexpected(err))
		}
		tooLarge.Skipped = true
		return f, tooLarge
	}
	if size > 0 {
		f.Payload = make([]byte, size)
		if _, err := io.ReadFull(fr.r, f.Payload); err != nil {
			return f, unexpected(err)
		}
	}
	return f, nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// FrameWriter writes whole frames; it is safe for concurrent use, and frames
// from different goroutines never interleave.
type FrameWriter struct {
	mu  sync.Mutex
	w   io.Writer
	max uint32
	buf []byte
}

// NewFrameWriter returns a writer that rejects payloads larger than max; max
// 0 means [DefaultMaxFrameSize].
func NewFrameWriter(w io.Writer, max uint32) *FrameWriter {
	if max == 0 {
		max = DefaultMaxFrameSize
	}
	return &FrameWriter{w: w, max: max}
}

// SetMax changes the maximum payload size, as agreed in the handshake.
func (fw *FrameWriter) SetMax(max uint32) {
	fw.mu.Lock()
	fw.max = max
	fw.mu.Unlock()
}

// Max returns the maximum payload size.
func (fw *FrameWriter) Max() uint32 {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.max
}

// WriteFrame writes f as one write call, so a frame is never split between
// writers.
func (fw *FrameWriter) WriteFrame(f Frame) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if uint64(len(f.Payload)) > uint64(fw.max) {
		return &FrameTooLargeError{Type: f.Type, ID: f.ID, Size: uint32(min(len(f.Payload), 1<<32-1)), Max: fw.max, Skipped: true}
	}
	fw.buf = AppendFrame(fw.buf[:0], f)
	_, err := fw.w.Write(fw.buf)
	return err
}

// AppendFrame appends the wire form of f to b. It does not check the size
// limit.
func AppendFrame(b []byte, f Frame) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.Payload)))
	b = append(b, byte(f.Type), byte(f.Stream))
	b = binary.BigEndian.AppendUint16(b, f.Flags)
	b = binary.BigEndian.AppendUint32(b, f.ID)
	return append(b, f.Payload...)
}
