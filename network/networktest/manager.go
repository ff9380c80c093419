package networktest

import (
	"log/slog"
	"testing"

	"github.com/embervm/ember/network"
)

// OpenManager opens the lease store at dbPath and a Manager over it, as an
// Ember process start does: nets in host namespace hostNS through kernel,
// with slot namespaces named after [Prefix] and no log output.
func OpenManager(t testing.TB, dbPath string, nets []network.Network, hostNS string, kernel network.Kernel) (*network.Store, *network.Manager) {
	t.Helper()
	s, err := network.OpenStore(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	m, err := network.NewManager(network.Options{
		Networks: nets, Store: s, HostNetNS: hostNS, Kernel: kernel,
		NetNSPrefix: Prefix + "slot-", Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	return s, m
}
