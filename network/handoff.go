package network

import (
	"context"
	"errors"
	"fmt"
	"github.com/embervm/ember/internal/cleanup"
	"slices"

	"github.com/embervm/ember/vm"
)

// ErrModeChange means a handoff asked to move a VM between a bridge network
// and a slot network, which this package does not support.
var ErrModeChange = fmt.Errorf("handoff between bridge and slot networks: %w", vm.ErrUnsupported)

// Handoff gives the running VM leased as fromID a new identity toID in
// network netName without touching the VMM. The TAP keeps its name and its
// open file, and is re-attached to the target network's bridge or moved into
// a new slot namespace. The tenant gets a fresh lease (address in bridge
// mode, slot in slot mode) and its own egress rules, and fromID's lease and
// rules are removed. The MAC is the guest device's and stays, so
// o.MAC is ignored. The
// caller then reconfigures the guest with the returned Addressing through
// the agent.
//
// A failed Handoff restores fromID's lease and placement. Both networks
// must have the same mode.
//
// In slot mode the VMM process stays in the old slot's namespace, which
// therefore lives on, empty, until the VMM exits. The TAP keeps working
// because an open TAP file follows its device across namespaces.
func (m *Manager) Handoff(ctx context.Context, fromID, toID, netName string, o AttachOptions) (Attachment, error) {
	if err := vm.ValidateID(toID); err != nil {
		return Attachment{}, fmt.Errorf("hand off vm %s to %s: %w", fromID, toID, err)
	}
	n, ok := m.networks[netName]
	if !ok {
		return Attachment{}, fmt.Errorf("hand off vm %s to %s: %w %q", fromID, toID, ErrUnknownNetwork, netName)
	}
	if err := o.validate(); err != nil {
		return Attachment{}, fmt.Errorf("hand off vm %s to %s: %w", fromID, toID, err)
	}
	if err := ctx.Err(); err != nil {
		return Attachment{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()

	var from, to Lease
	err := m.store.Update(func(leases []Lease) ([]Lease, []string, error) {
		i := slices.IndexFunc(leases, func(l Lease) bool { return l.VMID == fromID })
		if i < 0 {
			return nil, nil, fmt.Errorf("lease of vm %s: %w", fromID, ErrLeaseNotFound)
		}
		from = leases[i]
		if slices.ContainsFunc(leases, func(l Lease) bool { return l.VMID == toID }) {
			return nil, nil, ErrAttached
		}
		if from.Mode != n.Mode {
			return nil, nil, ErrModeChange
		}
		// Allocate against every lease, fromID's included, so the
		// tenant never inherits the pool VM's address or slot.
		var err error
		to, err = m.newLease(toID, n, o, leases)
		if err != nil {
			return nil, nil, err
		}
		to.MAC = from.MAC
		if n.Mode == ModeBridge {
			to.TAP = from.TAP
		}
		return []Lease{to}, []string{fromID}, nil
	})
	if err != nil {
		return Attachment{}, fmt.Errorf("hand off vm %s to %s: %w", fromID, toID, err)
	}

	var rb cleanup.Stack
	rb.AddFunc(func() error {
		return m.store.Update(func([]Lease) ([]Lease, []string, error) { return []Lease{from}, []string{toID}, nil })
	})
	if err := m.moveTAP(&rb, from, to, n); err != nil {
		return Attachment{}, fmt.Errorf("hand off vm %s to %s: %w", fromID, toID, errors.Join(err, rb.Run()))
	}

	// The tenant is live; what is left is cleanup of the pool identity.
	cleanup := []error{m.fw.RemoveVM(fromID)}
	if from.Mode == ModeSlot {
		cleanup = append(cleanup, m.kernel.DeleteLink("", from.HostVeth), m.kernel.DeleteNS(from.NetNS))
	}
	if err := errors.Join(cleanup...); err != nil {
		m.log.Warn("cleanup of handed-off identity failed, Reconcile will retry", "vm", fromID, "to", toID, "err", err)
	}
	m.log.Info("handed off vm", "vm", fromID, "to", toID, "network", n.Name, "tap", to.TAP, "address", to.Address)
	return m.attachment(to, n), nil
}

// moveTAP re-parents from's TAP to to's bridge or slot and installs to's
// rules, adding undo steps to rb.
func (m *Manager) moveTAP(rb *cleanup.Stack, from, to Lease, n Network) error {
	if n.Mode == ModeBridge {
		if from.Network != to.Network {
			oldBridge := m.networks[from.Network].Bridge
			if err := m.kernel.SetMaster(to.TAP, n.Bridge); err != nil {
				return err
			}
			rb.AddFunc(func() error { return m.kernel.SetMaster(from.TAP, oldBridge) })
		}
		return m.installRules(rb, to, n)
	}

	if err := m.buildSlot(rb, to, n); err != nil {
		return err
	}
	oldNS, newNS := m.kernel.NSPath(from.NetNS), m.kernel.NSPath(to.NetNS)
	if err := m.kernel.MoveLink(oldNS, from.TAP, newNS); err != nil {
		return err
	}
	rb.AddFunc(func() error {
		if err := m.kernel.MoveLink(newNS, to.TAP, oldNS); err != nil {
			return err
		}
		return m.configureSlotTAP(from, m.networks[from.Network])
	})
	if err := m.configureSlotTAP(to, n); err != nil {
		return err
	}
	return m.installRules(rb, to, n)
}
