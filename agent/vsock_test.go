package agent

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// fakeVsockMux serves one connection of Firecracker's host-side vsock
// protocol: it reads the CONNECT line and writes reply.
func fakeVsockMux(t *testing.T, reply string) (path string, gotLine <-chan string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "v.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	lines := make(chan string, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		line, _ := bufio.NewReader(conn).ReadString('\n')
		lines <- line
		if reply != "" {
			io.WriteString(conn, reply)
		}
		// Keep the connection open until the client closes it.
		io.Copy(io.Discard, conn)
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return path, lines
}

func TestDialVsock(t *testing.T) {
	tests := []struct {
		name    string
		reply   string
		wantErr error
	}{
		{name: "ok", reply: "OK 1073741824\nguest-bytes"},
		{name: "closed without reply", reply: "", wantErr: ErrVsockRejected},
		{name: "garbage reply", reply: "NO\n", wantErr: ErrVsockRejected},
		{name: "ok without port", reply: "OK x\n", wantErr: ErrVsockRejected},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, lines := fakeVsockMux(t, tt.reply)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if tt.reply == "" {
				// The fake closes only when the client does, so end the
				// attempt through the context as a real dead port would.
				cancel()
			}
			conn, err := DialVsock(ctx, path, 1024)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("DialVsock: %v", err)
				}
				defer conn.Close()
				if got := <-lines; got != "CONNECT 1024\n" {
					t.Errorf("CONNECT line = %q", got)
				}
				buf := make([]byte, len("guest-bytes"))
				if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "guest-bytes" {
					t.Errorf("bytes after the reply = %q, %v; want them kept", buf, err)
				}
				return
			}
			if err == nil {
				conn.Close()
				t.Fatal("DialVsock succeeded, want an error")
			}
			if tt.reply == "" {
				if !errors.Is(err, context.Canceled) {
					t.Errorf("DialVsock = %v, want context.Canceled", err)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("DialVsock = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestDialVsockNoSocket(t *testing.T) {
	_, err := DialVsock(context.Background(), filepath.Join(t.TempDir(), "missing.sock"), 1024)
	if err == nil {
		t.Fatal("DialVsock to a missing socket succeeded")
	}
}
