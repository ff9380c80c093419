// Package netns creates, enters and deletes named Linux network namespaces.
//
// A named namespace is a bind mount of a namespace file on a file under a
// directory, /run/netns by default, the same layout that iproute2's
// "ip netns" uses, so "ip netns list" and "ip netns exec" see Ember's
// namespaces and Ember sees theirs. The bind mount keeps the namespace alive
// while no process is inside it.
//
// Switching namespaces is per thread in Linux. [Do] therefore runs its
// function on a new goroutine locked to its OS thread. When the thread cannot
// switch back to its original namespace, the goroutine exits still locked,
// and the Go runtime destroys the thread instead of handing it to other
// goroutines. No goroutine outside Do ever runs inside another namespace.
//
// A sketch:
//
//	path, err := netns.Create("ember-web-1")
//	if err != nil {
//		return err
//	}
//	defer netns.Delete("ember-web-1")
//	err = netns.Do(path, func() error {
//		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0)
//	})
//
// Everything here needs CAP_SYS_ADMIN. The functions are safe for concurrent
// use.
package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// DefaultDir is the directory of named namespaces, the same as for "ip netns".
const DefaultDir = "/run/netns"

// ErrExists means a named namespace already exists.
var ErrExists = errors.New("network namespace already exists")

// dirMu serializes the one-time setup of DefaultDir as a shared mount.
var dirMu sync.Mutex

// Path returns the file of the named namespace name.
func Path(name string) string { return filepath.Join(DefaultDir, name) }

// ValidateName checks that name can be a file name under DefaultDir.
func ValidateName(name string) error {
	switch {
	case name == "":
		return errors.New("invalid network namespace name: empty")
	case name == "." || name == "..":
		return fmt.Errorf("invalid network namespace name %q", name)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("invalid network namespace name %q: contains '/' or NUL", name)
	case len(name) > 255:
		return fmt.Errorf("invalid network namespace name %q: longer than 255 bytes", name)
	}
	return nil
}

// Create makes a new, empty network namespace named name and returns its
// path. It fails with [ErrExists] when the name is taken. A failed Create
// leaves no file or mount behind.
func Create(name string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	if err := ensureDir(); err != nil {
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}

	path := Path(name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("create netns %s: %w", name, ErrExists)
	}
	if err != nil {
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()

	err = onLockedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", src, err)
		}
		return nil
	})
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}
	return path, nil
}

// Delete removes the named namespace name. The namespace itself lives on
// while a process is still inside it. Deleting a namespace that does not
// exist is not an error.
func Delete(name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	path := Path(name)
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete netns %s: unmount: %w", name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete netns %s: %w", name, err)
	}
	return nil
}

// Exists reports whether a named namespace name exists.
func Exists(name string) bool {
	_, err := os.Stat(Path(name))
	return err == nil
}

// List returns the names of the named namespaces that start with prefix.
func List(prefix string) ([]string, error) {
	entries, err := os.ReadDir(DefaultDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list netns: %w", err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Do runs fn with its OS thread inside the namespace at path, which is a
// named namespace file or a /proc/PID/ns/net link. An empty path runs fn in
// the process's own namespace. fn must not start goroutines that expect to
// be in the namespace: only fn's own thread is.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	defer unix.Close(target)

	return onLockedThread(func() error {
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
		return fn()
	})
}

// onLockedThread runs fn on a new goroutine locked to its thread and then
// returns the thread to the namespace it started in. When that fails, the
// goroutine exits locked and the runtime discards the thread.
func onLockedThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer unix.Close(origin)

		fnErr := fn()
		if err := unix.Setns(origin, unix.CLONE_NEWNET); err != nil {
			// Stay locked: the runtime ends this thread when the
			// goroutine returns.
			errc <- errors.Join(fnErr, fmt.Errorf("return to original netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// ensureDir creates DefaultDir and makes it a shared mount point, as
// iproute2 does, so that namespaces mounted later propagate to other mount
// namespaces that share it.
func ensureDir() error {
	dirMu.Lock()
	defer dirMu.Unlock()
	if err := os.MkdirAll(DefaultDir, 0o755); err != nil {
		return err
	}
	err := unix.Mount("", DefaultDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		// Not a mount point yet: bind it onto itself first.
		if err := unix.Mount(DefaultDir, DefaultDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", DefaultDir, err)
		}
		err = unix.Mount("", DefaultDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount: %w", DefaultDir, err)
	}
	return nil
}

// Available reports why named namespaces cannot be used here, or nil. It
// checks for root and for the namespace directory without changing
// anything.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN): run the tests as root, e.g. sudo go test")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		return fmt.Errorf("kernel without network namespace support (/proc/self/ns/net: %w)", err)
	}
	return nil
}
