package qemu

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/embervm/ember/vm"
)

// checkNetNSFieldError fails t unless err is a *vm.ValidationError whose
// only problem is on field "netns".
func checkNetNSFieldError(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, vm.ErrInvalid) {
		t.Fatalf("err = %v, want vm.ErrInvalid", err)
	}
	var ve *vm.ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %T, want *vm.ValidationError", err)
	}
	if len(ve.Problems) != 1 || ve.Problems[0].Field != "netns" {
		t.Errorf("problems = %v, want one on field netns", ve.Problems)
	}
}

func TestCheckNetNS(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, []byte("not a namespace"), 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}

	invalid := []struct {
		name string
		path string
	}{
		{"missing", filepath.Join(dir, "missing")},
		{"directory", dir},
		{"regular file", regular},
		// Opening a FIFO for reading blocks until a writer appears, so
		// this case also shows that the check never opens one.
		{"fifo", fifo},
		{"mount namespace", "/proc/self/ns/mnt"},
		{"device", "/dev/null"},
	}
	for _, tc := range invalid {
		t.Run(tc.name, func(t *testing.T) {
			err := checkNetNS(tc.path)
			checkNetNSFieldError(t, err)
			if !strings.Contains(err.Error(), tc.path) {
				t.Errorf("error %q does not name the path", err)
			}
		})
	}
	t.Run("own network namespace", func(t *testing.T) {
		if err := checkNetNS("/proc/self/ns/net"); err != nil {
			t.Errorf("check /proc/self/ns/net: %v", err)
		}
	})
}

func TestNetNSOfPrecedence(t *testing.T) {
	cases := []struct {
		provider, vmNetNS, want string
	}{
		{"", "", ""},
		{"/run/netns/provider", "", "/run/netns/provider"},
		{"", "/run/netns/vm", "/run/netns/vm"},
		{"/run/netns/provider", "/run/netns/vm", "/run/netns/vm"},
	}
	for _, tc := range cases {
		p := &Provider{opts: Options{NetNS: tc.provider}}
		if got := p.netnsOf(&vm.Config{NetNS: tc.vmNetNS}); got != tc.want {
			t.Errorf("provider %q, vm %q: netns = %q, want %q", tc.provider, tc.vmNetNS, got, tc.want)
		}
	}
}

// TestCreateBadNetNS checks that Create rejects a network namespace that
// is not one before it starts anything. It needs QEMU but no guest: the
// kernel path is never opened.
func TestCreateBadNetNS(t *testing.T) {
	if _, err := os.Stat("/usr/bin/" + DefaultBinary); err != nil {
		t.Skip("needs " + DefaultBinary + ": apt-get install qemu-system-x86")
	}
	missing := filepath.Join(t.TempDir(), "missing-netns")
	good := newTestProvider(t, Options{})
	badDefault := newTestProvider(t, Options{NetNS: missing})
	ctx := t.Context()

	cases := []struct {
		name string
		p    *Provider
		cfg  vm.Config
	}{
		{"vm netns missing", good, bootConfig("ns-1", missing)},
		{"vm netns is a mount namespace", good, bootConfig("ns-2", "/proc/self/ns/mnt")},
		{"provider netns missing", badDefault, bootConfig("ns-3", "")},
		{"restore into missing netns", good, vm.Config{ID: "ns-4", NetNS: missing,
			RestoreFrom: &vm.SnapshotRef{VMID: "none", SnapshotID: "none"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.p.Create(ctx, tc.cfg)
			checkNetNSFieldError(t, err)
			if !strings.Contains(err.Error(), tc.cfg.ID) {
				t.Errorf("error %q does not name the vm", err)
			}
			if _, err := tc.p.Get(ctx, tc.cfg.ID); !errors.Is(err, vm.ErrNotFound) {
				t.Errorf("failed create left a vm: get err = %v", err)
			}
			if err := leaked(tc.p, tc.cfg.ID); err != nil {
				t.Error(err)
			}
		})
	}

	// A valid namespace of the VM wins over a missing one of the
	// provider, so the create gets past the namespace check and fails on
	// the kernel instead.
	_, err := badDefault.Create(ctx, bootConfig("ns-5", "/proc/self/ns/net"))
	var ve *vm.ValidationError
	if !errors.As(err, &ve) || !slices.ContainsFunc(ve.Problems, func(f vm.FieldError) bool { return f.Field == "kernel" }) {
		t.Errorf("create with a valid vm netns: err = %v, want a kernel problem", err)
	}
	if err := leaked(badDefault, "ns-5"); err != nil {
		t.Error(err)
	}
}

// bootConfig returns a valid cold-boot configuration whose kernel does not
// exist, which only the host file check after the namespace check finds.
func bootConfig(id, netns string) vm.Config {
	return vm.Config{ID: id, Kernel: "/nonexistent/vmlinux", VCPUCount: 1, MemSizeMiB: testMemMiB, NetNS: netns}
}

// FuzzCheckNetNS checks that any path either passes as a network
// namespace or fails with a netns field error or a wrapped I/O error, and
// that a path that passes is a regular file.
func FuzzCheckNetNS(f *testing.F) {
	for _, seed := range []string{"/proc/self/ns/net", "/proc/self/ns/mnt", "/proc/1/ns/net", "/dev/null", "/", "", "relative", "/nonexistent/x"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, path string) {
		err := checkNetNS(path)
		if err == nil {
			fi, statErr := os.Stat(path)
			if statErr != nil || !fi.Mode().IsRegular() {
				t.Fatalf("%q passed but is not a regular file: %v", path, statErr)
			}
			return
		}
		var ve *vm.ValidationError
		if errors.As(err, &ve) {
			if len(ve.Problems) != 1 || ve.Problems[0].Field != "netns" {
				t.Fatalf("%q: problems = %v, want one on field netns", path, ve.Problems)
			}
			return
		}
		if !strings.HasPrefix(err.Error(), "open network namespace ") {
			t.Fatalf("%q: unexpected error %v", path, err)
		}
	})
}
