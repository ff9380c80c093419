// Package e2e contains end-to-end tests that run Ember's packages
// together against real guests: QEMU microvm guests from a guest bundle,
// with host networking built by package network in network namespaces
// that the tests create. It has no code of its own.
//
// The tests need root, QEMU (Debian's qemu-system-x86), iproute2, the tun
// module and a guest bundle from `ember image build` named by the
// EMBER_TEST_BUNDLE environment variable. They skip, saying what is
// missing, without one of these. They change nothing in the test
// process's own network namespace.
package e2e
