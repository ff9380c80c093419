package pool

import (
	"context"

	"github.com/embervm/ember/network"
	"github.com/embervm/ember/network/nft"
	"github.com/embervm/ember/vm"
)

// ManagedNetwork implements [Network] with Ember's network manager for one
// workspace network. Every pool entry and tenant gets a lease, a TAP and
// firewall rules there; a hand-off re-keys them to the tenant.
type ManagedNetwork struct {
	Manager *network.Manager
	// Network names the workspace network.
	Network string
	// IfaceID is the guest interface in the snapshot; "" means "eth0".
	IfaceID string
	// MAC is the guest MAC the snapshot carries. Restored VMs keep it, so
	// the lease must use it; "" lets the manager derive one (cold boots).
	MAC string
	// Allow is added to the network's egress allowlist for every VM.
	Allow []nft.Rule
}

var _ Network = (*ManagedNetwork)(nil)

func (n *ManagedNetwork) options() network.AttachOptions {
	return network.AttachOptions{Allow: n.Allow, MAC: n.MAC}
}

func (n *ManagedNetwork) ifaceID() string {
	if n.IfaceID == "" {
		return "eth0"
	}
	return n.IfaceID
}

// Attach leases an identity for VM id.
func (n *ManagedNetwork) Attach(ctx context.Context, id string) (Attachment, error) {
	att, err := n.Manager.Attach(ctx, id, n.Network, n.options())
	if err != nil {
		return Attachment{}, err
	}
	return n.convert(att), nil
}

// Handoff moves entry from's identity to tenant to.
func (n *ManagedNetwork) Handoff(ctx context.Context, from, to string) (Attachment, error) {
	att, err := n.Manager.Handoff(ctx, from, to, n.Network, n.options())
	if err != nil {
		return Attachment{}, err
	}
	return n.convert(att), nil
}

// Detach releases VM id's identity.
func (n *ManagedNetwork) Detach(ctx context.Context, id string) error {
	return n.Manager.Detach(ctx, id)
}

func (n *ManagedNetwork) convert(att network.Attachment) Attachment {
	id := n.ifaceID()
	a := att.Addressing
	return Attachment{
		Interfaces: []vm.NetworkInterface{att.NetworkInterface(id)},
		Overrides:  []vm.NetworkOverride{att.NetworkOverride(id)},
		Guest: GuestNetwork{
			Interfaces: []GuestInterface{{MAC: a.MAC, Address: a.Address, Gateway: a.Gateway}},
			DNS:        a.DNS,
		},
		NetNS: att.NetNSPath,
	}
}
