// Package netnsfile opens and checks network namespace files, such as
// /run/netns/NAME, for the providers that start VMMs inside a namespace.
package netnsfile

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/embervm/ember/vm"
)

// Check returns a *vm.ValidationError on field "netns" unless path names a
// network namespace.
func Check(path string) error {
	f, err := Open(path)
	if err != nil {
		return err
	}
	return f.Close()
}

// Open opens the network namespace file at path, such as /run/netns/NAME
// or /proc/PID/ns/net. A path that does not exist or is not a network
// namespace returns a *vm.ValidationError on field "netns".
func Open(path string) (*os.File, error) {
	invalid := func(problem string) error {
		return &vm.ValidationError{Problems: []vm.FieldError{{Field: "netns", Problem: problem}}}
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, invalid(fmt.Sprintf("%s does not exist: create the network namespace first, for example with ip netns add NAME", path))
	}
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	// Namespace files stat as regular files. Checking the mode first
	// keeps open(2) away from FIFOs and devices, where it can block.
	if !fi.Mode().IsRegular() {
		return nil, invalid(fmt.Sprintf("%s is not a network namespace", path))
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	// NS_GET_NSTYPE returns the CLONE_NEW* flag of a namespace file and
	// fails with ENOTTY on any other file.
	kind, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil || kind != unix.CLONE_NEWNET {
		f.Close()
		return nil, invalid(fmt.Sprintf("%s is not a network namespace", path))
	}
	return f, nil
}
