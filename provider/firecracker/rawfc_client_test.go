package firecracker

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// serveKeptAlive sends reply to every request on one connection and never
// closes the connection, as Firecracker does.
func serveKeptAlive(t *testing.T, reply string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	go func() {
		defer close(done)
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		r := bufio.NewReader(conn)
		for {
			length := 0
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if line == "\r\n" {
					break
				}
				if v, ok := strings.CutPrefix(line, "Content-Length: "); ok {
					for _, c := range strings.TrimSpace(v) {
						length = length*10 + int(c-'0')
					}
				}
			}
			if _, err := io.CopyN(io.Discard, r, int64(length)); err != nil {
				return
			}
			if _, err := io.WriteString(conn, reply); err != nil {
				return
			}
		}
	}()
	return sock
}

// withBody returns a reply with the given status and JSON body.
func withBody(status, body string) string {
	return fmt.Sprintf("HTTP/1.1 %s \r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", status, len(body), body)
}

func TestRawClientKeptAlive(t *testing.T) {
	tests := []struct {
		name, reply string
		status      int
		body        string
		errPart     string
	}{
		{"no content", "HTTP/1.1 204 \r\n\r\n", 204, "", ""},
		{"json body", withBody("200", `{"state":"Ok"}`), 200, `{"state":"Ok"}`, ""},
		{"fault", withBody("400", `{"fault_message":"x"}`), 400, "", `status 400: {"fault_message":"x"}`},
		{"bad status line", "HTTX 200\r\n\r\n", 0, "", "invalid status line"},
		{"bad length", "HTTP/1.1 200 \r\nContent-Length: -1\r\n\r\n", 0, "", "invalid Content-Length"},
		{"leading space", " HTTP/1.1 200 \r\n\r\n", 0, "", "invalid status line"},
		{"space in version", "HTTP/1. 0\r\n\r\n", 0, "", "invalid status line"},
		{"short code", "HTTP/1.1 20 \r\n\r\n", 0, "", "invalid status line"},
		{"code out of range", "HTTP/1.1 999 \r\n\r\n", 0, "", "invalid status line"},
		{"signed code", "HTTP/1.1 +20 \r\n\r\n", 0, "", "invalid status line"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			api, err := dialRawAPI(serveKeptAlive(t, tt.reply))
			if err != nil {
				t.Fatal(err)
			}
			defer api.Close()
			// Two calls on one connection prove that the first reply was
			// read by its length: reading to EOF would block until the
			// 10-second deadline and fail.
			for i := range 2 {
				status, body, err := api.call("PUT", "/actions", `{"action_type":"FlushMetrics"}`)
				if tt.errPart != "" {
					if err == nil || !strings.Contains(err.Error(), tt.errPart) {
						t.Fatalf("call %d error = %v, want one containing %q", i, err, tt.errPart)
					}
					return
				}
				if err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				if status != tt.status {
					t.Errorf("call %d status = %d, want %d", i, status, tt.status)
				}
				if body != tt.body {
					t.Errorf("call %d body = %q, want %q", i, body, tt.body)
				}
			}
		})
	}
}

func FuzzRawReplyHead(f *testing.F) {
	f.Add([]byte("HTTP/1.1 204 \r\n\r\n"))
	f.Add([]byte(withBody("200", `{"state":"Ok"}`)))
	f.Add([]byte("HTTP/1.1 400 \r\nContent-Length: 99999999\r\n\r\n"))
	f.Add([]byte("HTTP/1.0 200\r\nX\r\n\r\n"))
	f.Add([]byte(" HTTP/1. 0\n\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		api := &rawAPI{r: bufio.NewReader(bytes.NewReader(data))}
		status, length, err := api.readHead()
		if err != nil {
			return
		}
		if length < 0 || length > 1<<20 {
			t.Errorf("readHead accepted Content-Length %d", length)
		}
		if !bytes.HasPrefix(data, []byte("HTTP/1.")) {
			t.Errorf("readHead accepted %q without an HTTP/1.x status line (status %d)", data, status)
		}
		if status < 100 || status > 599 {
			t.Errorf("readHead accepted status %d from %q", status, data)
		}
		if want := fmt.Sprintf("%d", status); !bytes.HasPrefix(data[len("HTTP/1.x "):], []byte(want)) {
			t.Errorf("readHead returned status %d for %q", status, data)
		}
	})
}
