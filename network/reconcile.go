package network

import (
	"context"
	"errors"
	"fmt"
	"github.com/embervm/ember/internal/cleanup"
	"slices"
	"strings"
)

// ReconcileReport lists what [Manager.Reconcile] changed.
type ReconcileReport struct {
	// RemovedLinks are Ember links, tagged by alias, that no lease or
	// network owns.
	RemovedLinks []string
	// RemovedNamespaces are slot namespaces that no lease owns.
	RemovedNamespaces []string
	// RemovedRules are VM ids whose firewall rules had no lease.
	RemovedRules []string
	// Rebuilt are VM ids whose TAP or slot was missing and was created
	// again. A VMM that was attached to the old TAP is not attached to the
	// new one and needs a restart.
	Rebuilt []string
}

// Reconcile makes the kernel match the leases after a restart. It sets up
// the networks and removes Ember links, slot namespaces and firewall rules
// that no lease owns. Then it creates again what a lease owns but the kernel
// lacks, and reinstalls every lease's rules. Links without Ember's alias are never
// touched. Problems with one lease do not stop the others; they are returned
// joined with the report of what was done.
func (m *Manager) Reconcile(ctx context.Context) (ReconcileReport, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var rep ReconcileReport

	if err := m.setupLocked(ctx); err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	leases, err := m.store.List()
	if err != nil {
		return rep, fmt.Errorf("reconcile: %w", err)
	}
	var problems []error
	problems = append(problems, m.removeOrphanLinks(&rep, leases)...)
	problems = append(problems, m.removeOrphanNamespaces(&rep, leases)...)

	for _, l := range leases {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		n, ok := m.networks[l.Network]
		if !ok {
			problems = append(problems, fmt.Errorf("lease of vm %s: %w %q: remove the VM or configure the network", l.VMID, ErrUnknownNetwork, l.Network))
			continue
		}
		rebuilt, err := m.ensureLease(l, n)
		if err != nil {
			problems = append(problems, fmt.Errorf("restore vm %s: %w", l.VMID, err))
		}
		if rebuilt {
			rep.Rebuilt = append(rep.Rebuilt, l.VMID)
			m.log.Warn("recreated missing network devices", "vm", l.VMID, "network", l.Network)
		}
	}

	has := func(id string) bool { return slices.ContainsFunc(leases, func(l Lease) bool { return l.VMID == id }) }
	ids, err := m.fw.VMs()
	if err != nil {
		problems = append(problems, err)
	}
	for _, id := range ids {
		if has(id) {
			continue
		}
		if err := m.fw.RemoveVM(id); err != nil {
			problems = append(problems, err)
			continue
		}
		rep.RemovedRules = append(rep.RemovedRules, id)
		m.log.Info("removed orphaned firewall rules", "vm", id)
	}
	return rep, errors.Join(problems...)
}

func (m *Manager) removeOrphanLinks(rep *ReconcileReport, leases []Lease) []error {
	links, err := m.kernel.Links("")
	if err != nil {
		return []error{err}
	}
	bridges := map[string]bool{}
	for _, n := range m.networks {
		if n.Mode == ModeBridge {
			bridges[aliasPrefix+bridgeAliasID+n.Name] = true
		}
	}
	var problems []error
	for _, link := range links {
		if !strings.HasPrefix(link.Alias, aliasPrefix) || bridges[link.Alias] {
			continue
		}
		owner := strings.TrimPrefix(link.Alias, aliasPrefix)
		owned := slices.ContainsFunc(leases, func(l Lease) bool {
			return l.VMID == owner && (l.Mode == ModeBridge && l.TAP == link.Name || l.HostVeth == link.Name)
		})
		if owned {
			continue
		}
		if err := m.kernel.DeleteLink("", link.Name); err != nil {
			problems = append(problems, err)
			continue
		}
		rep.RemovedLinks = append(rep.RemovedLinks, link.Name)
		m.log.Info("removed orphaned link", "link", link.Name, "alias", link.Alias)
	}
	return problems
}

func (m *Manager) removeOrphanNamespaces(rep *ReconcileReport, leases []Lease) []error {
	names, err := m.kernel.ListNS(m.prefix)
	if err != nil {
		return []error{err}
	}
	var problems []error
	for _, name := range names {
		if slices.ContainsFunc(leases, func(l Lease) bool { return l.Mode == ModeSlot && l.NetNS == name }) {
			continue
		}
		if err := m.kernel.DeleteNS(name); err != nil {
			problems = append(problems, err)
			continue
		}
		rep.RemovedNamespaces = append(rep.RemovedNamespaces, name)
		m.log.Info("removed orphaned slot namespace", "netns", name)
	}
	return problems
}

// ensureLease checks the kernel state of l, rebuilds what is missing and
// reinstalls its rules. It reports whether a device had to be rebuilt.
func (m *Manager) ensureLease(l Lease, n Network) (rebuilt bool, err error) {
	var rb cleanup.Stack // kept on success; a failed rebuild is undone
	hostLinks, err := m.kernel.Links("")
	if err != nil {
		return false, err
	}
	hasHost := func(name string) bool {
		return slices.ContainsFunc(hostLinks, func(x Link) bool { return x.Name == name })
	}

	if l.Mode == ModeBridge {
		createTAP := !hasHost(l.TAP)
		if err := m.build(&rb, l, n, createTAP); err != nil {
			return false, errors.Join(err, rb.Run())
		}
		return createTAP, nil
	}

	complete := false
	if nsNames, err := m.kernel.ListNS(l.NetNS); err == nil && slices.Contains(nsNames, l.NetNS) && hasHost(l.HostVeth) {
		slotLinks, err := m.kernel.Links(m.kernel.NSPath(l.NetNS))
		complete = err == nil && slices.ContainsFunc(slotLinks, func(x Link) bool { return x.Name == l.TAP })
	}
	if complete {
		return false, m.installRules(&rb, l, n)
	}
	if err := errors.Join(m.kernel.DeleteLink("", l.HostVeth), m.kernel.DeleteNS(l.NetNS)); err != nil {
		return false, err
	}
	if err := m.build(&rb, l, n, true); err != nil {
		return false, errors.Join(err, rb.Run())
	}
	return true, nil
}

// Teardown detaches every VM and removes every network's bridge, NAT rule
// and Ember's firewall tables. Leases go with their VMs. It is safe to
// repeat.
func (m *Manager) Teardown(ctx context.Context) error {
	leases, err := m.store.List()
	if err != nil {
		return fmt.Errorf("tear down networks: %w", err)
	}
	var errs []error
	for _, l := range leases {
		errs = append(errs, m.Detach(ctx, l.VMID))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	links, err := m.kernel.Links("")
	errs = append(errs, err)
	for _, name := range m.order {
		n := m.networks[name]
		errs = append(errs, m.fw.RemoveNAT(n.Name))
		ours := slices.ContainsFunc(links, func(l Link) bool {
			return l.Name == n.Bridge && l.Alias == aliasPrefix+bridgeAliasID+n.Name
		})
		if n.Mode == ModeBridge && ours {
			errs = append(errs, m.kernel.DeleteLink("", n.Bridge))
		}
	}
	errs = append(errs, m.fw.Teardown())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tear down networks: %w", err)
	}
	return nil
}
