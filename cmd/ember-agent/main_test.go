package main

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestStaticBinary builds the agent as the image builder does and checks
// that it has no dynamic loader, so it runs as /init in an initramfs that
// has no libc.
func TestStaticBinary(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not in PATH; install Go to build the agent")
	}
	bin := filepath.Join(t.TempDir(), "ember-agent")
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatalf("open built binary: %v", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary has a %v program header; it must be static", p.Type)
		}
	}
	fi, _ := os.Stat(bin)
	t.Logf("ember-agent is %d bytes", fi.Size())
}

func TestPrefixWriter(t *testing.T) {
	var buf bytes.Buffer
	logger := newLogger(&buf, 0)
	logger.Info("first", "key", "value")
	logger.Info("second")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("got %d lines, want 2:\n%s", len(lines), buf.String())
	}
	for _, line := range lines {
		if !strings.HasPrefix(line, "ember-agent: ") {
			t.Errorf("line %q lacks the ember-agent: prefix", line)
		}
	}
}

// TestKeepRunningRestarts checks that a transport that panics and then
// fails is started again, and that keepRunning returns once ctx ends.
func TestKeepRunningRestarts(t *testing.T) {
	var buf bytes.Buffer
	logger := newLogger(&buf, 0)
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	keepRunning(ctx, logger, "test", func(context.Context) error {
		calls++
		switch calls {
		case 1:
			panic("deliberate test panic")
		case 2:
			return errors.New("transport broke")
		}
		cancel()
		return nil
	})
	if calls != 3 {
		t.Fatalf("transport ran %d times, want 3", calls)
	}
	logs := buf.String()
	if !strings.Contains(logs, "deliberate test panic") || !strings.Contains(logs, "transport broke") {
		t.Errorf("log lacks the panic or the error:\n%s", logs)
	}
}
