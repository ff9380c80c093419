// Package network gives Ember's VMs their host networking: TAP devices,
// per-VM namespaces, address leases, NAT and an egress firewall, all made
// through netlink and nftables with no external commands.
//
// A workspace picks one of two modes in its [Network] configuration:
//
//   - Bridge mode: every VM's TAP is a port of one Ember bridge, which holds
//     the gateway address (the first address of Subnet). Each VM leases its
//     own address and MAC. The VMM gives the guest device the MAC, and the
//     guest learns its address from the kernel's ip= argument at cold boot or
//     from the agent after a restore or handoff. A snapshot carries its
//     guest's MAC, so only one clone of a snapshot fits on a bridge
//     ([ErrMACInUse]); slot mode is for clones.
//   - Slot mode: every VM's TAP, always named tap0, lives in its own network
//     namespace (a slot) where the guest has the same address as in every
//     other slot. A veth pair joins the slot to the host, and NAT inside the
//     slot maps the guest's address to the slot's unique address. Many clones
//     of one snapshot can therefore run without re-addressing, and a
//     snapshot that names tap0 restores in any slot.
//
// [Manager] owns the kernel state. Attach leases an identity (address,
// gateway, MAC, TAP name, slot) in a bbolt database ([Store]) and then builds
// the TAP, slot and firewall rules, undoing every step when one fails.
// Detach removes them. Handoff moves a running VM's TAP from a pool identity
// to a tenant identity without touching the VMM: the TAP keeps its name and
// open file, and is re-attached to another bridge or moved into a new slot.
// Reconcile, run at every start, sets up bridges and NAT, removes links,
// slots and rules that no lease owns, and rebuilds what a lease owns but the
// kernel lacks.
//
// Ember's links carry the interface alias "ember:" plus the owner's id.
// Reconcile removes only such links, and a name that a link without that
// alias holds is an error ([ErrLinkExists]), never taken over.
//
// Egress rules are per VM and live in Ember's own nftables tables (package
// nft). The network's allowlist and the VM's own are checked first. Then
// traffic to protected ranges (every Ember network and the host's own
// addresses) is dropped, so tenants reach neither each other nor the host
// unless a rule allows it. Last comes the network's default policy,
// deny-all or allow-all. Bridge-mode VMs are matched in the bridge family,
// whose hooks report the TAP as the input port. Slot-mode VMs are matched on the
// host side of their veth in the inet family.
//
// A sketch of a VM's network life:
//
//	store, _ := network.OpenStore("/var/lib/ember/leases.db")
//	m, err := network.NewManager(network.Options{Networks: nets, Store: store})
//	if err != nil {
//		return err
//	}
//	if _, err := m.Reconcile(ctx); err != nil {
//		log.Warn("network reconcile incomplete", "err", err)
//	}
//	att, err := m.Attach(ctx, "web-1", "default", network.AttachOptions{})
//	if err != nil {
//		return err
//	}
//	spec.NetworkInterfaces = []vm.NetworkInterface{att.NetworkInterface("eth0")}
//	if att.NetNSPath != "" {
//		spec.NetNS = &att.NetNSPath // slot mode: the VMM runs in the slot
//	}
//	bootArgs += " " + att.Addressing.KernelArg()
//	// ... run the VM; on destroy:
//	err = m.Detach(ctx, "web-1")
//
// Limits:
//
//   - IPv4 only. IPv6 from guests is dropped.
//   - In slot mode the VMM must run inside Attachment.NetNSPath (vm.Spec.NetNS)
//     to open its TAP.
//   - The kernel on Ember's hosts has no bridge conntrack, so in bridge mode
//     a guest's replies to connections that others open to it pass the same
//     allowlist as its own connections. In slot mode replies pass as
//     established traffic.
//   - In bridge mode a guest's frames with a foreign source MAC, ARP sender
//     address or IPv4 source address are dropped. A restored or handed-off
//     guest therefore has no network until the agent applies its new
//     addressing.
//   - Handoff moves VMs between networks of the same mode only.
package network
