package guest

import (
	"bufio"
	"context"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/embervm/ember/agent"
)

// TestDialThroughVsockMux runs the client against a stand-in for
// Firecracker's host-side vsock socket: it reads the CONNECT line, closes
// the first connections unanswered, as Firecracker does while nothing in
// the guest listens on the port, and then replies OK and hands the stream
// to the agent server.
func TestDialThroughVsockMux(t *testing.T) {
	srv, err := NewServer(Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	path := filepath.Join(t.TempDir(), "v.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var connects atomic.Int32
	var ports sync.Map
	var serving sync.WaitGroup
	serving.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			n := connects.Add(1)
			br := bufio.NewReader(conn)
			line, err := br.ReadString('\n')
			if err != nil {
				conn.Close()
				continue
			}
			ports.Store(line, true)
			if n < 3 {
				conn.Close()
				continue
			}
			io.WriteString(conn, "OK 1073741825\n")
			serving.Go(func() { srv.ServeConn(ctx, conn) })
		}
	})
	defer func() {
		ln.Close()
		cancel()
		serving.Wait()
	}()

	dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
	defer dcancel()
	client, err := agent.Dial(dctx, agent.VsockDialer(path, 1024), &agent.Options{RetryInterval: time.Millisecond})
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer client.Close()
	if _, err := client.Health(dctx); err != nil {
		t.Fatalf("Health: %v", err)
	}
	if got := connects.Load(); got != 3 {
		t.Errorf("connections = %d, want 3 (two refused, one served)", got)
	}
	if _, ok := ports.Load("CONNECT 1024\n"); !ok {
		t.Error("the client never sent CONNECT 1024")
	}
}
