package guest

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/embervm/ember/agent"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeSystem records the guest-wide operations instead of performing them.
type fakeSystem struct {
	mu        sync.Mutex
	hostname  string
	clock     time.Time
	ifaces    []agent.InterfaceConfig
	shutdowns []string
}

func (f *fakeSystem) SetHostname(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hostname = name
	return nil
}

func (f *fakeSystem) SetClock(t time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clock = t
	return nil
}

func (f *fakeSystem) ConfigureNetwork(_ context.Context, ifaces []agent.InterfaceConfig) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ifaces = ifaces
	return nil
}

func (f *fakeSystem) Shutdown(action string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.shutdowns = append(f.shutdowns, action)
	return nil
}

// lockedBuffer collects log output from concurrent handlers.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type harness struct {
	root   string
	srv    *Server
	sys    *fakeSystem
	logs   *lockedBuffer
	client *agent.Client
}

// newHarness starts a server on a temporary root and connects a client to it
// over an in-process pipe. Everything stops in t.Cleanup.
func newHarness(t *testing.T, mutate func(*Config)) *harness {
	t.Helper()
	h := &harness{root: t.TempDir(), sys: &fakeSystem{}, logs: &lockedBuffer{}}
	cfg := Config{
		Root:    h.root,
		System:  h.sys,
		Version: "test",
		BaseEnv: []string{"PATH=" + os.Getenv("PATH")},
		Logger:  slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	h.srv = srv
	ctx, cancel := context.WithCancel(context.Background())
	var serving sync.WaitGroup
	dial := func(context.Context) (net.Conn, error) {
		hostEnd, guestEnd := net.Pipe()
		serving.Go(func() { srv.ServeConn(ctx, guestEnd) })
		return hostEnd, nil
	}
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	defer dcancel()
	client, err := agent.Dial(dctx, dial, nil)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	h.client = client
	t.Cleanup(func() {
		client.Close()
		cancel()
		serving.Wait()
		srv.Close()
	})
	return h
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestHealth(t *testing.T) {
	h := newHarness(t, nil)
	res, err := h.client.Health(ctxT(t))
	if err != nil {
		t.Fatalf("Health: %v", err)
	}
	if res.AgentVersion != "test" || res.ProtocolVersion != agent.ProtocolVersion || res.Uptime <= 0 {
		t.Errorf("Health = %+v", res)
	}
	if h.client.AgentVersion() != "test" || h.client.MaxConcurrent() != agent.DefaultMaxConcurrent {
		t.Errorf("handshake reported version %q, max concurrent %d", h.client.AgentVersion(), h.client.MaxConcurrent())
	}
}

func TestExec(t *testing.T) {
	h := newHarness(t, nil)
	if err := os.Mkdir(filepath.Join(h.root, "work"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(h.root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(h.root, "bin/ember-hello"), []byte("#!/bin/sh\necho hello from PATH\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		req        agent.ExecRequest
		stdin      string
		wantStdout string
		wantStderr string
		wantResult agent.ExecResult
	}{
		{
			name:       "stdout and stderr",
			req:        agent.ExecRequest{Argv: []string{"sh", "-c", "echo out; echo err >&2"}},
			wantStdout: "out\n", wantStderr: "err\n",
		},
		{
			name:       "exit code",
			req:        agent.ExecRequest{Argv: []string{"sh", "-c", "exit 3"}},
			wantResult: agent.ExecResult{ExitCode: 3},
		},
		{
			name:       "signal",
			req:        agent.ExecRequest{Argv: []string{"sh", "-c", "kill -TERM $$"}},
			wantResult: agent.ExecResult{ExitCode: -1, Signal: "terminated"},
		},
		{
			name:       "env and dir",
			req:        agent.ExecRequest{Argv: []string{"sh", "-c", "echo $GREETING; pwd"}, Env: []string{"GREETING=hi"}, Dir: "/work"},
			wantStdout: "hi\n" + filepath.Join(h.root, "work") + "\n",
		},
		{
			name:       "request PATH",
			req:        agent.ExecRequest{Argv: []string{"ember-hello"}, Env: []string{"PATH=" + filepath.Join(h.root, "bin") + ":/usr/bin:/bin"}},
			wantStdout: "hello from PATH\n",
		},
		{
			name:       "stdin",
			req:        agent.ExecRequest{Argv: []string{"tr", "a-z", "A-Z"}},
			stdin:      "hello\n",
			wantStdout: "HELLO\n",
		},
		{
			name:       "timeout",
			req:        agent.ExecRequest{Argv: []string{"sleep", "60"}, Timeout: 100 * time.Millisecond},
			wantResult: agent.ExecResult{ExitCode: -1, Signal: "killed", TimedOut: true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			stdio := agent.ExecIO{Stdout: &stdout, Stderr: &stderr}
			if tt.stdin != "" {
				stdio.Stdin = strings.NewReader(tt.stdin)
			}
			res, err := h.client.Exec(ctxT(t), tt.req, stdio)
			if err != nil {
				t.Fatalf("Exec: %v", err)
			}
			if res != tt.wantResult {
				t.Errorf("result = %+v, want %+v", res, tt.wantResult)
			}
			if stdout.String() != tt.wantStdout {
				t.Errorf("stdout = %q, want %q", stdout.String(), tt.wantStdout)
			}
			if stderr.String() != tt.wantStderr {
				t.Errorf("stderr = %q, want %q", stderr.String(), tt.wantStderr)
			}
		})
	}
}

// TestExecLargeStreams sends and receives several windows' worth of data
// through one process, which needs working flow control in both directions.
func TestExecLargeStreams(t *testing.T) {
	h := newHarness(t, nil)
	input := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB
	var stdout bytes.Buffer
	res, err := h.client.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"cat"}}, agent.ExecIO{Stdin: bytes.NewReader(input), Stdout: &stdout})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("Exec cat = %+v, %v", res, err)
	}
	if !bytes.Equal(stdout.Bytes(), input) {
		t.Fatalf("cat returned %d bytes, want the %d bytes sent", stdout.Len(), len(input))
	}
}

func TestExecConcurrent(t *testing.T) {
	h := newHarness(t, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			var out bytes.Buffer
			want := strconv.Itoa(i)
			_, err := h.client.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"echo", want}}, agent.ExecIO{Stdout: &out})
			if err == nil && out.String() != want+"\n" {
				err = errors.New("exec " + want + " printed " + out.String())
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestExecCancelKillsProcess(t *testing.T) {
	h := newHarness(t, nil)
	ctx, cancel := context.WithCancel(ctxT(t))
	pidCh := make(chan int, 1)
	pr, pw := io.Pipe()
	go func() {
		line, _ := readLine(pr)
		pid, _ := strconv.Atoi(line)
		pidCh <- pid
		io.Copy(io.Discard, pr)
	}()
	done := make(chan error, 1)
	go func() {
		_, err := h.client.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "echo $$; exec sleep 60"}}, agent.ExecIO{Stdout: pw})
		pw.Close()
		done <- err
	}()
	pid := <-pidCh
	if pid <= 0 {
		t.Fatal("no pid printed")
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Exec after cancel = %v, want context.Canceled", err)
	}
	// The server kills and reaps the process; poll until it is gone.
	deadline := time.Now().Add(10 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("process %d still exists after cancel", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The connection keeps serving.
	if _, err := h.client.Health(ctxT(t)); err != nil {
		t.Fatalf("Health after cancel: %v", err)
	}
}

func readLine(r io.Reader) (string, error) {
	var b [1]byte
	var line []byte
	for {
		if _, err := r.Read(b[:]); err != nil {
			return string(line), err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
}

func TestExecBadInput(t *testing.T) {
	h := newHarness(t, nil)
	tests := []struct {
		name string
		req  agent.ExecRequest
		want error
	}{
		{"empty argv", agent.ExecRequest{}, agent.ErrInvalidArgument},
		{"invalid env key", agent.ExecRequest{Argv: []string{"true"}, Env: []string{"BAD-KEY=1"}}, agent.ErrInvalidArgument},
		{"env without equals", agent.ExecRequest{Argv: []string{"true"}, Env: []string{"NOVALUE"}}, agent.ErrInvalidArgument},
		{"dir traversal", agent.ExecRequest{Argv: []string{"true"}, Dir: "/../.."}, agent.ErrInvalidArgument},
		{"missing program", agent.ExecRequest{Argv: []string{"/nonexistent/program"}}, agent.ErrNotFound},
		{"program not in PATH", agent.ExecRequest{Argv: []string{"ember-no-such-program"}}, agent.ErrNotFound},
		{"empty PATH", agent.ExecRequest{Argv: []string{"true"}, Env: []string{"PATH=/nonexistent"}}, agent.ErrNotFound},
		{"negative timeout", agent.ExecRequest{Argv: []string{"true"}, Timeout: -1}, agent.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := h.client.Exec(ctxT(t), tt.req, agent.ExecIO{})
			if !errors.Is(err, tt.want) {
				t.Fatalf("Exec = %v, want %v", err, tt.want)
			}
		})
	}
	if _, err := h.client.Health(ctxT(t)); err != nil {
		t.Fatalf("Health after bad input: %v", err)
	}
}

func TestFilePutGet(t *testing.T) {
	h := newHarness(t, nil)
	ctx := ctxT(t)
	content := bytes.Repeat([]byte("file content\n"), 200_000) // 2.6 MB, several windows
	n, err := h.client.PutFile(ctx, agent.FilePutRequest{Path: "/etc/app/config", Mode: 0o640}, bytes.NewReader(content))
	if !errors.Is(err, agent.ErrNotFound) {
		t.Fatalf("PutFile without parent = %d, %v; want ErrNotFound", n, err)
	}
	if err := os.MkdirAll(filepath.Join(h.root, "etc/app"), 0o755); err != nil {
		t.Fatal(err)
	}
	if n, err = h.client.PutFile(ctx, agent.FilePutRequest{Path: "/etc/app/config", Mode: 0o640}, bytes.NewReader(content)); err != nil || n != int64(len(content)) {
		t.Fatalf("PutFile = %d, %v", n, err)
	}
	fi, err := os.Stat(filepath.Join(h.root, "etc/app/config"))
	if err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("stat after put = %v, %v; want mode 0640", fi, err)
	}

	// Atomic replace: a reader that opened the old file keeps reading it.
	old, err := os.Open(filepath.Join(h.root, "etc/app/config"))
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if _, err := h.client.PutFile(ctx, agent.FilePutRequest{Path: "/etc/app/config", Mode: 0o600}, strings.NewReader("new")); err != nil {
		t.Fatalf("PutFile replace: %v", err)
	}
	oldHead := make([]byte, 12)
	if _, err := io.ReadFull(old, oldHead); err != nil || string(oldHead) != "file content" {
		t.Errorf("old file handle reads %q, %v; want the old content", oldHead, err)
	}

	var got bytes.Buffer
	info, err := h.client.GetFile(ctx, "/etc/app/config", &got)
	if err != nil || got.String() != "new" || info.Mode != 0o600 || info.Size != 3 {
		t.Fatalf("GetFile = %+v, %q, %v", info, got.String(), err)
	}
	entries, _ := os.ReadDir(filepath.Join(h.root, "etc/app"))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries after puts, want 1 (no temporary files)", len(entries))
	}

	big := bytes.Repeat([]byte{7}, 3<<20)
	if err := os.WriteFile(filepath.Join(h.root, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	got.Reset()
	if _, err := h.client.GetFile(ctx, "/big", &got); err != nil || !bytes.Equal(got.Bytes(), big) {
		t.Fatalf("GetFile big = %d bytes, %v", got.Len(), err)
	}
}

func TestFileMakeParents(t *testing.T) {
	h := newHarness(t, nil)
	ctx := ctxT(t)
	if _, err := h.client.PutFile(ctx, agent.FilePutRequest{Path: "/a/b/c/file"}, strings.NewReader("x")); !errors.Is(err, agent.ErrNotFound) {
		t.Fatalf("PutFile without parents = %v, want ErrNotFound", err)
	}
	if _, err := h.client.PutFile(ctx, agent.FilePutRequest{Path: "/a/b/c/file", MakeParents: true}, strings.NewReader("x")); err != nil {
		t.Fatalf("PutFile with MakeParents: %v", err)
	}
	fi, err := os.Stat(filepath.Join(h.root, "a/b/c/file"))
	if err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("stat = %v, %v; want the default mode 0644", fi, err)
	}
}

func TestFileBadPaths(t *testing.T) {
	h := newHarness(t, nil)
	ctx := ctxT(t)
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(h.root, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(h.root, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		want error
	}{
		{"dot dot", "/../etc/passwd", agent.ErrInvalidArgument},
		{"inner dot dot", "/dir/../../x", agent.ErrInvalidArgument},
		{"relative", "etc/passwd", agent.ErrInvalidArgument},
		{"root itself", "/", agent.ErrInvalidArgument},
		{"nul byte", "/a\x00b", agent.ErrInvalidArgument},
		{"directory", "/dir", agent.ErrInvalidArgument},
		{"symlink out of root", "/escape/secret", agent.ErrFailed},
		{"missing", "/nope", agent.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if _, err := h.client.GetFile(ctx, tt.path, &out); !errors.Is(err, tt.want) {
				t.Errorf("GetFile(%q) = %v, want %v", tt.path, err, tt.want)
			}
			if out.Len() != 0 {
				t.Errorf("GetFile(%q) returned content %q", tt.path, out.String())
			}
			if tt.name == "missing" {
				return
			}
			if _, err := h.client.PutFile(ctx, agent.FilePutRequest{Path: tt.path}, strings.NewReader("pwned")); !errors.Is(err, tt.want) {
				t.Errorf("PutFile(%q) = %v, want %v", tt.path, err, tt.want)
			}
		})
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "secret")); string(b) != "outside" {
		t.Errorf("file outside the root changed to %q", b)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 1 {
		t.Errorf("directory outside the root holds %d entries, want 1", len(entries))
	}
}

func TestSetSecrets(t *testing.T) {
	h := newHarness(t, nil)
	ctx := ctxT(t)
	const value = "s3cr3t-value-do-not-log"
	if err := h.client.SetSecrets(ctx, map[string][]byte{"db-password": []byte(value), "api.key": []byte("k")}); err != nil {
		t.Fatalf("SetSecrets: %v", err)
	}
	dir := filepath.Join(h.root, "run/ember/secrets")
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("secrets dir = %v, %v; want mode 0700", fi, err)
	}
	for name, want := range map[string]string{"db-password": value, "api.key": "k"} {
		p := filepath.Join(dir, name)
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("secret %s = %v, %v; want mode 0600", name, fi, err)
		}
		if b, _ := os.ReadFile(p); string(b) != want {
			t.Errorf("secret %s = %q", name, b)
		}
	}
	for _, bad := range []string{"../escape", "a/b", "", ".."} {
		err := h.client.SetSecrets(ctx, map[string][]byte{bad: []byte(value)})
		if !errors.Is(err, agent.ErrInvalidArgument) {
			t.Errorf("SetSecrets(%q) = %v, want ErrInvalidArgument", bad, err)
		}
		if err != nil && strings.Contains(err.Error(), value) {
			t.Errorf("error for %q contains the secret value", bad)
		}
	}
	if _, err := os.Stat(filepath.Join(h.root, "run/ember/escape")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("secret escaped its directory: %v", err)
	}
	if strings.Contains(h.logs.String(), value) {
		t.Error("a secret value appears in the agent's log")
	}
}

func TestSetEnv(t *testing.T) {
	h := newHarness(t, nil)
	ctx := ctxT(t)
	if err := h.client.SetEnv(ctx, map[string]string{"APP_MODE": "prod", "TOKEN": "abc"}); err != nil {
		t.Fatalf("SetEnv: %v", err)
	}
	if err := h.client.SetEnv(ctx, nil, "TOKEN"); err != nil {
		t.Fatalf("SetEnv unset: %v", err)
	}
	var out bytes.Buffer
	if _, err := h.client.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "echo $APP_MODE-${TOKEN:-unset}"}}, agent.ExecIO{Stdout: &out}); err != nil {
		t.Fatal(err)
	}
	if out.String() != "prod-unset\n" {
		t.Errorf("exec saw %q, want prod-unset", out.String())
	}
	fi, err := os.Stat(filepath.Join(h.root, "run/ember/env"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("env file = %v, %v; want mode 0600", fi, err)
	}
	if b, _ := os.ReadFile(filepath.Join(h.root, "run/ember/env")); string(b) != "APP_MODE=prod\x00" {
		t.Errorf("env file = %q", b)
	}
	for _, bad := range []map[string]string{{"1BAD": "x"}, {"A-B": "x"}, {"A": "nul\x00"}} {
		if err := h.client.SetEnv(ctx, bad); !errors.Is(err, agent.ErrInvalidArgument) {
			t.Errorf("SetEnv(%q) = %v, want ErrInvalidArgument", bad, err)
		}
	}
}

func TestSystemOperations(t *testing.T) {
	h := newHarness(t, nil)
	ctx := ctxT(t)
	if err := h.client.SetHostname(ctx, "web-1"); err != nil {
		t.Fatalf("SetHostname: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(h.root, "etc/hostname")); string(b) != "web-1\n" || h.sys.hostname != "web-1" {
		t.Errorf("hostname = %q, /etc/hostname = %q", h.sys.hostname, b)
	}
	if err := h.client.SetHostname(ctx, "bad_name"); !errors.Is(err, agent.ErrInvalidArgument) {
		t.Errorf("SetHostname(bad_name) = %v, want ErrInvalidArgument", err)
	}

	now := time.Unix(1_900_000_000, 123)
	if err := h.client.SyncClock(ctx, now); err != nil || !h.sys.clock.Equal(now) {
		t.Errorf("SyncClock = %v, clock set to %v", err, h.sys.clock)
	}
	if err := h.client.SyncClock(ctx, time.Unix(0, 0)); !errors.Is(err, agent.ErrInvalidArgument) {
		t.Errorf("SyncClock(1970) = %v, want ErrInvalidArgument", err)
	}

	netCfg := agent.NetworkConfig{
		Interfaces: []agent.InterfaceConfig{{MAC: "06:00:ac:10:00:02", Addresses: []string{"172.16.0.2/24"}, Routes: []agent.Route{{Destination: "default", Gateway: "172.16.0.1"}}}},
		DNS:        &agent.DNSConfig{Nameservers: []string{"172.16.0.1"}, Search: []string{"internal"}},
	}
	if err := h.client.ConfigureNetwork(ctx, netCfg); err != nil {
		t.Fatalf("ConfigureNetwork: %v", err)
	}
	if len(h.sys.ifaces) != 1 || h.sys.ifaces[0].MAC != "06:00:ac:10:00:02" {
		t.Errorf("interfaces configured = %+v", h.sys.ifaces)
	}
	resolv, _ := os.ReadFile(filepath.Join(h.root, "etc/resolv.conf"))
	if !strings.Contains(string(resolv), "nameserver 172.16.0.1\n") || !strings.Contains(string(resolv), "search internal\n") {
		t.Errorf("resolv.conf = %q", resolv)
	}
	bad := agent.NetworkConfig{Interfaces: []agent.InterfaceConfig{{MAC: "nope"}}}
	if err := h.client.ConfigureNetwork(ctx, bad); !errors.Is(err, agent.ErrInvalidArgument) {
		t.Errorf("ConfigureNetwork(bad mac) = %v, want ErrInvalidArgument", err)
	}

	if err := h.client.Shutdown(ctx, "halt-and-catch-fire"); !errors.Is(err, agent.ErrInvalidArgument) {
		t.Errorf("Shutdown(bad action) = %v, want ErrInvalidArgument", err)
	}
	if err := h.client.Shutdown(ctx, agent.ActionReboot); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// The shutdown runs after the reply was written, so wait for it.
	for ctx.Err() == nil {
		h.sys.mu.Lock()
		shutdowns := append([]string(nil), h.sys.shutdowns...)
		h.sys.mu.Unlock()
		if len(shutdowns) > 0 {
			if len(shutdowns) != 1 || shutdowns[0] != agent.ActionReboot {
				t.Errorf("shutdowns = %v, want [reboot]", shutdowns)
			}
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Error("shutdown never reached the system")
}

func TestSystemUnsupportedWithoutSystem(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.System = nil })
	if err := h.client.SetHostname(ctxT(t), "web-1"); !errors.Is(err, agent.ErrUnsupported) {
		t.Fatalf("SetHostname without System = %v, want ErrUnsupported", err)
	}
}

func TestUnknownOperation(t *testing.T) {
	h := newHarness(t, nil)
	err := h.client.Call(ctxT(t), "format_disk", struct{}{}, nil)
	if !errors.Is(err, agent.ErrUnknownOp) {
		t.Fatalf("Call(format_disk) = %v, want ErrUnknownOp", err)
	}
	err = h.client.Call(ctxT(t), agent.OpHealth, map[string]int{"surprise": 1}, nil)
	if !errors.Is(err, agent.ErrInvalidArgument) {
		t.Fatalf("Call(health, unknown field) = %v, want ErrInvalidArgument", err)
	}
	if _, err := h.client.Health(ctxT(t)); err != nil {
		t.Fatalf("Health after unknown op: %v", err)
	}
}

func TestTooManyConcurrentRequests(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxConcurrent = 2 })
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	started := make(chan struct{}, 2)
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			pr, pw := io.Pipe()
			go func() {
				readLine(pr)
				started <- struct{}{}
				io.Copy(io.Discard, pr)
			}()
			h.client.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "echo up; exec sleep 60"}}, agent.ExecIO{Stdout: pw})
			pw.Close()
		})
	}
	<-started
	<-started
	_, err := h.client.Health(ctxT(t))
	if !errors.Is(err, agent.ErrBusy) {
		t.Errorf("third request = %v, want ErrBusy", err)
	}
	cancel()
	wg.Wait()
	// The busy requests ended; the agent serves again. The server may not
	// have removed the cancelled requests yet, so retry while busy.
	for {
		_, err := h.client.Health(ctxT(t))
		if err == nil {
			break
		}
		if !errors.Is(err, agent.ErrBusy) {
			t.Fatalf("Health after cancel: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawSession connects to a server with a bare frame reader and writer, to
// send what a well-behaved client never would.
func rawSession(t *testing.T, maxFrame uint32) (*agent.FrameReader, *agent.FrameWriter) {
	fr, fw, _ := rawSessionConn(t, maxFrame)
	return fr, fw
}

func rawSessionConn(t *testing.T, maxFrame uint32) (*agent.FrameReader, *agent.FrameWriter, net.Conn) {
	t.Helper()
	srv, err := NewServer(Config{Root: t.TempDir(), MaxFrameSize: maxFrame})
	if err != nil {
		t.Fatal(err)
	}
	hostEnd, guestEnd := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), guestEnd) }()
	t.Cleanup(func() {
		hostEnd.Close()
		<-done
		srv.Close()
	})
	hostEnd.SetDeadline(time.Now().Add(30 * time.Second))
	return agent.NewFrameReader(hostEnd, 0), agent.NewFrameWriter(hostEnd, 1<<30), hostEnd
}

func readResponse(t *testing.T, fr *agent.FrameReader, id uint32) agent.Response {
	t.Helper()
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("read response %d: %v", id, err)
		}
		if f.Type != agent.FrameResponse || f.ID != id {
			continue
		}
		var resp agent.Response
		if err := json.Unmarshal(f.Payload, &resp); err != nil {
			t.Fatalf("decode response: %v", err)
		}
		return resp
	}
}

func sendHello(t *testing.T, fr *agent.FrameReader, fw *agent.FrameWriter, versions []int) agent.HelloReply {
	t.Helper()
	payload, _ := json.Marshal(agent.Hello{Versions: versions})
	if err := fw.WriteFrame(agent.Frame{Type: agent.FrameHello, ID: 42, Payload: payload}); err != nil {
		t.Fatal(err)
	}
	f, err := fr.ReadFrame()
	if err != nil || f.Type != agent.FrameHello || f.ID != 42 {
		t.Fatalf("hello reply = %+v, %v", f, err)
	}
	var reply agent.HelloReply
	json.Unmarshal(f.Payload, &reply)
	return reply
}

func healthRequest(id uint32) agent.Frame {
	return agent.Frame{Type: agent.FrameRequest, ID: id, Payload: []byte(`{"op":"health"}`)}
}

func TestRawBadFrames(t *testing.T) {
	fr, fw := rawSession(t, 1024)

	// A request before the handshake.
	fw.WriteFrame(healthRequest(1))
	if resp := readResponse(t, fr, 1); !errors.Is(resp.Error, agent.ErrBadRequest) {
		t.Fatalf("request before hello = %+v, want bad_request", resp.Error)
	}
	if reply := sendHello(t, fr, fw, []int{99}); !errors.Is(reply.Error, agent.ErrUnsupportedVersion) {
		t.Fatalf("hello with version 99 = %+v, want unsupported_version", reply.Error)
	}
	if reply := sendHello(t, fr, fw, []int{1}); reply.Error != nil || reply.MaxFrameSize != 1024 {
		t.Fatalf("hello = %+v", reply)
	}

	tests := []struct {
		name  string
		frame agent.Frame
		want  error
	}{
		{"oversized frame", agent.Frame{Type: agent.FrameRequest, ID: 2, Payload: bytes.Repeat([]byte("x"), 5000)}, agent.ErrFrameTooLarge},
		{"invalid json", agent.Frame{Type: agent.FrameRequest, ID: 3, Payload: []byte("{")}, agent.ErrBadRequest},
		{"unknown op", agent.Frame{Type: agent.FrameRequest, ID: 4, Payload: []byte(`{"op":"nope"}`)}, agent.ErrUnknownOp},
		{"unknown frame type", agent.Frame{Type: 77, ID: 5}, agent.ErrBadRequest},
		{"invalid env key", agent.Frame{Type: agent.FrameRequest, ID: 6, Payload: []byte(`{"op":"set_env","args":{"env":{"A B":"1"}}}`)}, agent.ErrInvalidArgument},
		{"path traversal", agent.Frame{Type: agent.FrameRequest, ID: 7, Payload: []byte(`{"op":"file_get","args":{"path":"/../../etc/shadow"}}`)}, agent.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := fw.WriteFrame(tt.frame); err != nil {
				t.Fatal(err)
			}
			resp := readResponse(t, fr, tt.frame.ID)
			if !errors.Is(resp.Error, tt.want) {
				t.Fatalf("response = %+v, want %v", resp.Error, tt.want)
			}
			// The agent keeps serving after each bad frame.
			fw.WriteFrame(healthRequest(100 + tt.frame.ID))
			if resp := readResponse(t, fr, 100+tt.frame.ID); resp.Error != nil {
				t.Fatalf("health after %s = %+v", tt.name, resp.Error)
			}
		})
	}
}

func TestRawStdinWindowViolation(t *testing.T) {
	fr, fw := rawSession(t, 1<<20)
	sendHello(t, fr, fw, []int{1})
	fw.WriteFrame(agent.Frame{Type: agent.FrameRequest, ID: 1, Payload: []byte(`{"op":"exec","args":{"argv":["sleep","60"],"stdin":true}}`)})
	// Twice the window without waiting for grants.
	chunk := make([]byte, agent.DefaultWindow)
	fw.WriteFrame(agent.Frame{Type: agent.FrameData, Stream: agent.StreamStdin, ID: 1, Payload: chunk})
	fw.WriteFrame(agent.Frame{Type: agent.FrameData, Stream: agent.StreamStdin, ID: 1, Payload: chunk})
	if resp := readResponse(t, fr, 1); !errors.Is(resp.Error, agent.ErrBadRequest) {
		t.Fatalf("exec with window overrun = %+v, want bad_request", resp.Error)
	}
}

// TestRawCorruptStreamCloses sends a header that claims a 2 GiB payload:
// the agent replies with an error and closes the connection, because it
// will not skip that much.
func TestRawCorruptStreamCloses(t *testing.T) {
	fr, fw, conn := rawSessionConn(t, 1024)
	sendHello(t, fr, fw, []int{1})
	hdr := agent.AppendFrame(nil, agent.Frame{Type: agent.FrameRequest, ID: 9})
	hdr[0] = 0x7f
	if _, err := conn.Write(hdr); err != nil {
		t.Fatal(err)
	}
	if resp := readResponse(t, fr, 9); !errors.Is(resp.Error, agent.ErrFrameTooLarge) {
		t.Fatalf("response = %+v, want frame_too_large", resp.Error)
	}
	if f, err := fr.ReadFrame(); err != io.EOF {
		t.Fatalf("after a corrupt frame read %+v, %v; want io.EOF", f, err)
	}
}

func TestDialRetriesWhileGuestBoots(t *testing.T) {
	srv, err := NewServer(Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// The first attempts fail, as a vsock CONNECT to a port without a
	// listener does. The next gives a connection whose guest end stays
	// silent for a while, as a virtio-serial port does before the guest
	// opens it.
	attempts := 0
	var serving sync.WaitGroup
	dial := func(context.Context) (net.Conn, error) {
		attempts++
		if attempts < 3 {
			return nil, errors.New("connection refused")
		}
		hostEnd, guestEnd := net.Pipe()
		serving.Go(func() {
			// Swallow the first hello unanswered.
			hdr := make([]byte, agent.HeaderSize)
			io.ReadFull(guestEnd, hdr)
			io.CopyN(io.Discard, guestEnd, int64(binary.BigEndian.Uint32(hdr)))
			srv.ServeConn(ctx, guestEnd)
		})
		return hostEnd, nil
	}
	client, err := agent.Dial(ctx, dial, &agent.Options{RetryInterval: time.Millisecond, HelloInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	if _, err := client.Health(ctx); err != nil {
		t.Errorf("Health: %v", err)
	}
	client.Close()
	serving.Wait()
	if attempts != 3 {
		t.Errorf("dial attempts = %d, want 3", attempts)
	}
}

func TestDialGivesUpAtDeadline(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	refused := errors.New("connection refused")
	_, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return nil, refused }, &agent.Options{RetryInterval: time.Millisecond})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("Dial = %v, want context.DeadlineExceeded naming the last error", err)
	}
}

func TestClientFailsCallsWhenConnectionBreaks(t *testing.T) {
	srv, err := NewServer(Config{Root: t.TempDir(), BaseEnv: []string{"PATH=" + os.Getenv("PATH")}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var serving sync.WaitGroup
	client, err := agent.Dial(ctxT(t), func(context.Context) (net.Conn, error) {
		hostEnd, guestEnd := net.Pipe()
		serving.Go(func() { srv.ServeConn(ctx, guestEnd) })
		return hostEnd, nil
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	done := make(chan error, 1)
	go func() {
		_, err := client.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"sleep", "60"}}, agent.ExecIO{})
		done <- err
	}()
	// The guest goes away (ctx ends the server side of the connection).
	time.Sleep(50 * time.Millisecond)
	cancel()
	serving.Wait()
	if err := <-done; err == nil {
		t.Fatalf("Exec during connection loss = %v, want an error", err)
	}
	if _, err := client.Health(ctxT(t)); !errors.Is(err, agent.ErrClosed) {
		t.Fatalf("Health on a broken connection = %v, want ErrClosed", err)
	}
}
