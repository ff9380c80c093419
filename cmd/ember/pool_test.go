package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPoolCommandsOnRealGuest(t *testing.T) {
	env, bundle, runDir := guestEnv(t)
	t.Cleanup(func() {
		runCLI(t, env, "pool", "rm", "cli-pool")
		runCLI(t, env, "vm", "rm", "cli-golden", "cli-tenant")
	})
	mustRun(t, env, exitOK, "vm", "create", "cli-golden", "--bundle", bundle, "--mem", "128")
	mustRun(t, env, exitOK, "vm", "start", "cli-golden")
	mustRun(t, env, exitOK, "vm", "exec", "cli-golden", "--", "true")
	mustRun(t, env, exitOK, "vm", "snapshot", "cli-golden", "base")

	mustRun(t, env, exitOK, "pool", "create", "cli-pool", "--snapshot", "cli-golden/base", "--min", "2")
	_, stderr, code := runCLI(t, env, "pool", "create", "cli-pool", "--snapshot", "cli-golden/base")
	if code != exitFailure || !strings.Contains(stderr, "already exists") {
		t.Fatalf("duplicate pool: exit %d stderr %q", code, stderr)
	}

	out := mustRun(t, env, exitOK, "pool", "acquire", "cli-pool", "cli-tenant", "--env", "TEAM=red", "-o", "json")
	var res struct {
		VM, Path, State string
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.VM != "cli-tenant" || res.Path != "warm" || res.State != "running" {
		t.Fatalf("acquire report %q (%v)", out, err)
	}
	if got := mustRun(t, env, exitOK, "vm", "exec", "cli-tenant", "--", "hostname"); got != "cli-tenant\n" {
		t.Fatalf("tenant hostname = %q", got)
	}
	_, stderr, code = runCLI(t, env, "pool", "acquire", "cli-pool", "cli-tenant")
	if code != exitFailure || !strings.Contains(stderr, "tenant id in use") {
		t.Fatalf("tenant in use: exit %d stderr %q", code, stderr)
	}

	var pools []struct {
		Name     string
		Entries  []struct{ ID string }
		Ready    int
		MinDepth int `json:"min_depth"`
		MaxDepth int `json:"max_depth"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, env, exitOK, "pool", "ls", "-o", "json")), &pools); err != nil {
		t.Fatal(err)
	}
	if len(pools) != 1 || pools[0].Name != "cli-pool" {
		t.Fatalf("pool ls = %+v, want one row for cli-pool", pools)
	}
	// The maximum in effect is the minimum when none was given.
	if p := pools[0]; len(p.Entries) != 2 || p.Ready != 2 || p.MinDepth != 2 || p.MaxDepth != 2 {
		t.Fatalf("pool after acquire and refill = %+v", p)
	}

	mustRun(t, env, exitOK, "pool", "rm", "cli-pool")
	mustRun(t, env, exitOK, "vm", "rm", "cli-golden", "cli-tenant")
	entries, _ := os.ReadDir(filepath.Join(runDir, "qemu"))
	if len(entries) != 0 {
		t.Fatalf("run directory not empty after pool rm: %v", entries)
	}
}

func TestPoolCommandErrors(t *testing.T) {
	env := []string{"EMBER_STATE_DIR=" + t.TempDir(), "EMBER_RUN_DIR=" + t.TempDir()}
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"pool", "acquire", "nope", "t1"}, exitFailure, "pool not found: nope"},
		{[]string{"pool", "rm", "nope"}, exitFailure, "pool not found: nope"},
		{[]string{"pool", "create", "p1", "--snapshot", "no-separator"}, exitUsage, "use VM/SNAPSHOT"},
		{[]string{"pool", "create", "bad_name", "--snapshot", "a/b"}, exitUsage, "pool name"},
		{[]string{"pool", "acquire", "p1", "t1", "--env", "NOEQUALS"}, exitUsage, "use KEY=VALUE"},
		{[]string{"pool", "create", "p1"}, exitUsage, "missing --snapshot VM/SNAPSHOT"},
		{[]string{"pool", "create", "p1", "--snapshot", "a/b", "--min", "-1"}, exitUsage, "--min -1 is invalid"},
		{[]string{"pool", "create", "p1", "--snapshot", "a/b", "--min", "3", "--max", "2"}, exitUsage, "--max 2 is invalid"},
		{[]string{"pool", "create", "p1", "--snapshot", "a/b", "--min", "two"}, exitUsage, `--min "two" is invalid, want a whole number`},
	}
	for _, tc := range cases {
		_, stderr, code := runCLI(t, env, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("ember %s: exit %d stderr %q, want exit %d and %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}
