package netns

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func requireNetNS(t *testing.T) {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("skipping kernel test: %v", err)
	}
}

func testName(t *testing.T, suffix string) string {
	return fmt.Sprintf("embt-net-%d-%s", os.Getpid(), suffix)
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return st.Ino
}

func TestValidateName(t *testing.T) {
	for _, name := range []string{"", ".", "..", "a/b", "a\x00", strings.Repeat("n", 256)} {
		if err := ValidateName(name); err == nil {
			t.Errorf("ValidateName(%q) = nil, want an error", name)
		}
	}
	if err := ValidateName("ember-web-1"); err != nil {
		t.Errorf("ValidateName(ember-web-1) = %v", err)
	}
}

func TestCreateDoDelete(t *testing.T) {
	requireNetNS(t)
	name := testName(t, "ns")
	path, err := Create(name)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { Delete(name) })

	if _, err := Create(name); !errors.Is(err, ErrExists) {
		t.Errorf("second Create error = %v, want ErrExists", err)
	}

	own := inode(t, "/proc/self/ns/net")
	if inode(t, path) == own {
		t.Fatal("created namespace is the process's own")
	}

	var inside uint64
	var ifaces []net.Interface
	err = Do(path, func() error {
		inside = inode(t, fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		ifaces, err = net.Interfaces()
		return err
	})
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	if inside != inode(t, path) {
		t.Errorf("Do ran in namespace inode %d, want %d", inside, inode(t, path))
	}
	if len(ifaces) != 1 || ifaces[0].Name != "lo" {
		t.Errorf("new namespace has interfaces %v, want only lo", ifaces)
	}
	if got := inode(t, "/proc/self/ns/net"); got != own {
		t.Errorf("process namespace changed after Do: %d, want %d", got, own)
	}

	names, err := List(testName(t, ""))
	if err != nil || len(names) != 1 || names[0] != name {
		t.Errorf("List = %v, %v; want [%s]", names, err, name)
	}

	if err := Delete(name); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if Exists(name) {
		t.Error("namespace still exists after Delete")
	}
	if err := Delete(name); err != nil {
		t.Errorf("second Delete = %v, want nil", err)
	}
}

func TestDoReturnsError(t *testing.T) {
	requireNetNS(t)
	want := errors.New("boom")
	if err := Do("/proc/self/ns/net", func() error { return want }); !errors.Is(err, want) {
		t.Errorf("Do error = %v, want %v", err, want)
	}
	if err := Do("/nonexistent/ns", func() error { return nil }); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Do on a missing path = %v, want ErrNotExist", err)
	}
}

func TestCreateInvalidNameLeavesNothing(t *testing.T) {
	requireNetNS(t)
	before, _ := os.ReadDir(DefaultDir)
	if _, err := Create("bad/name"); err == nil {
		t.Fatal("Create(bad/name) = nil, want an error")
	}
	after, _ := os.ReadDir(DefaultDir)
	if len(after) != len(before) {
		t.Errorf("%s has %d entries after a failed Create, want %d", DefaultDir, len(after), len(before))
	}
}

func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"", "ember-1", "..", "a/b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if ValidateName(name) == nil && (strings.Contains(name, "/") || name == "" || name == "." || name == "..") {
			t.Fatalf("ValidateName accepted %q", name)
		}
	})
}
