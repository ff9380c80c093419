package agent

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	frames := []Frame{
		{Type: FrameHello, ID: 7, Payload: []byte(`{"versions":[1]}`)},
		{Type: FrameData, Stream: StreamStdout, Flags: FlagEOF, ID: 1<<32 - 1},
		{Type: FrameData, Stream: StreamStdin, ID: 3, Payload: bytes.Repeat([]byte{0xAB}, 1000)},
	}
	var buf bytes.Buffer
	fw := NewFrameWriter(&buf, 0)
	for _, f := range frames {
		if err := fw.WriteFrame(f); err != nil {
			t.Fatalf("WriteFrame: %v", err)
		}
	}
	fr := NewFrameReader(&buf, 0)
	for i, want := range frames {
		got, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got.Type != want.Type || got.Stream != want.Stream || got.Flags != want.Flags || got.ID != want.ID || !bytes.Equal(got.Payload, want.Payload) {
			t.Errorf("frame %d = %+v, want %+v", i, got, want)
		}
	}
	if _, err := fr.ReadFrame(); err != io.EOF {
		t.Errorf("read after last frame: %v, want io.EOF", err)
	}
}

func TestFrameReaderErrors(t *testing.T) {
	small := AppendFrame(nil, Frame{Type: FrameRequest, ID: 1, Payload: make([]byte, 100)})
	next := AppendFrame(nil, Frame{Type: FrameCancel, ID: 2})
	huge := AppendFrame(nil, Frame{Type: FrameRequest, ID: 9})
	huge[0], huge[1], huge[2], huge[3] = 0x7f, 0xff, 0xff, 0xff

	tests := []struct {
		name        string
		input       []byte
		max         uint32
		wantErr     error
		wantCorrupt bool
		wantNextID  uint32
	}{
		{name: "truncated header", input: small[:5], wantErr: io.ErrUnexpectedEOF},
		{name: "truncated payload", input: small[:50], wantErr: io.ErrUnexpectedEOF},
		{name: "oversized is skipped", input: append(append([]byte{}, small...), next...), max: 10, wantErr: ErrFrameTooLarge, wantNextID: 2},
		{name: "oversized truncated", input: small[:60], max: 10, wantErr: io.ErrUnexpectedEOF},
		{name: "huge claimed size", input: huge, wantErr: ErrFrameTooLarge, wantCorrupt: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fr := NewFrameReader(bytes.NewReader(tt.input), tt.max)
			_, err := fr.ReadFrame()
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("ReadFrame error = %v, want %v", err, tt.wantErr)
			}
			if got := errors.Is(err, ErrCorruptStream); got != tt.wantCorrupt {
				t.Errorf("errors.Is(err, ErrCorruptStream) = %v, want %v", got, tt.wantCorrupt)
			}
			var tooLarge *FrameTooLargeError
			if errors.As(err, &tooLarge) && tooLarge.ID != 1 && tooLarge.ID != 9 {
				t.Errorf("FrameTooLargeError.ID = %d", tooLarge.ID)
			}
			if tt.wantNextID != 0 {
				f, err := fr.ReadFrame()
				if err != nil || f.ID != tt.wantNextID {
					t.Errorf("frame after skipped one = %+v, %v; want id %d", f, err, tt.wantNextID)
				}
			}
		})
	}
}

func TestFrameWriterRejectsOversized(t *testing.T) {
	fw := NewFrameWriter(io.Discard, 8)
	err := fw.WriteFrame(Frame{Type: FrameData, ID: 1, Payload: make([]byte, 9)})
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("WriteFrame = %v, want ErrFrameTooLarge", err)
	}
}

func FuzzFrameReader(f *testing.F) {
	f.Add(AppendFrame(nil, Frame{Type: FrameRequest, ID: 1, Payload: []byte(`{"op":"health"}`)}))
	f.Add(AppendFrame(AppendFrame(nil, Frame{Type: FrameData, Stream: StreamStdin, ID: 2, Payload: []byte("abc")}), Frame{Type: FrameCancel, ID: 2}))
	f.Add([]byte{0, 0, 0, 200, 1, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewFrameReader(bytes.NewReader(data), 64)
		var out []byte
		for range 100 {
			fm, err := fr.ReadFrame()
			if err != nil {
				if errors.Is(err, ErrFrameTooLarge) && !errors.Is(err, ErrCorruptStream) {
					continue
				}
				break
			}
			if len(fm.Payload) > 64 {
				t.Fatalf("payload of %d bytes passed a 64-byte limit", len(fm.Payload))
			}
			out = AppendFrame(out, fm)
		}
		// Every frame that decoded must encode back to a prefix-free
		// sequence that decodes to the same frames.
		fr2 := NewFrameReader(bytes.NewReader(out), 64)
		var again []byte
		for {
			fm, err := fr2.ReadFrame()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("re-read of encoded frames: %v", err)
			}
			again = AppendFrame(again, fm)
		}
		if !bytes.Equal(out, again) {
			t.Fatal("frames changed after a round trip")
		}
	})
}
