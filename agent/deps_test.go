package agent

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies keeps the protocol package stdlib-only and the guest
// binary's import set small: the standard library, golang.org/x/sys/unix and
// the agent's own packages.
func TestDependencies(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not in PATH; install Go to run the dependency check")
	}
	tests := []struct {
		pkg     string
		allowed []string
	}{
		{"github.com/embervm/ember/agent", nil},
		{"github.com/embervm/ember/agent/guest", []string{"github.com/embervm/ember/agent", "golang.org/x/sys/unix"}},
		{"github.com/embervm/ember/cmd/ember-agent", []string{"github.com/embervm/ember/agent", "golang.org/x/sys/unix"}},
	}
	for _, tt := range tests {
		t.Run(tt.pkg, func(t *testing.T) {
			out, err := exec.Command(goBin, "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", tt.pkg).CombinedOutput()
			if err != nil {
				t.Fatalf("go list %s: %v\n%s", tt.pkg, err, out)
			}
			for dep := range strings.FieldsSeq(string(out)) {
				if dep == tt.pkg || allowedDep(dep, tt.allowed) {
					continue
				}
				t.Errorf("%s imports %s, which is not allowed", tt.pkg, dep)
			}
		})
	}
}

func allowedDep(dep string, allowed []string) bool {
	for _, a := range allowed {
		if dep == a || strings.HasPrefix(dep, a+"/") {
			return true
		}
	}
	return false
}
