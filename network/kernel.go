package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/embervm/ember/network/netns"
	"github.com/embervm/ember/network/nft"
)

// ErrLinkExists means an interface name is already in use.
var ErrLinkExists = errors.New("link already exists")

// Link is the manager's view of one network interface.
type Link struct {
	Name string
	// Alias is the interface alias (IFLA_IFALIAS); Ember's links carry
	// "ember:" followed by the owner's id.
	Alias  string
	Kind   string
	Master string
	Up     bool
}

// TAPSpec describes a persistent TAP device.
type TAPSpec struct {
	Name  string
	MTU   int
	Owner uint32
	Group uint32
	Alias string
}

// Kernel is the manager's view of the kernel's links, namespaces and
// sysctls. Every ns argument is a namespace path, and "" means the host
// namespace the Kernel was made for. [NewKernel] returns the netlink
// implementation; networktest has a recording fake.
type Kernel interface {
	CreateNS(name string) (path string, err error)
	// DeleteNS and DeleteLink succeed when the object is already gone.
	DeleteNS(name string) error
	ListNS(prefix string) ([]string, error)
	NSPath(name string) string

	Links(ns string) ([]Link, error)
	// CreateBridge, CreateTAP and CreateVeth fail with ErrLinkExists when
	// a name is taken.
	CreateBridge(name string, mtu int, alias string) error
	CreateTAP(ns string, spec TAPSpec) error
	// CreateVeth creates name in the host namespace and peer in peerNS.
	CreateVeth(name, alias string, mtu int, peerNS, peer string) error
	DeleteLink(ns, name string) error
	// SetMaster attaches host link name to bridge master.
	SetMaster(name, master string) error
	MoveLink(fromNS, name, toNS string) error
	SetUp(ns, name string) error
	ReplaceAddr(ns, name string, addr netip.Prefix) error
	ReplaceDefaultRoute(ns string, gw netip.Addr) error
	// Addrs returns every IPv4 address in the namespace.
	Addrs(ns string) ([]netip.Prefix, error)
	Sysctl(ns, key string) (string, error)
	SetSysctl(ns, key, value string) error
}

// Firewall is the part of [nft.Firewall] that the manager uses.
type Firewall interface {
	InstallVM(p nft.VMPolicy) error
	RemoveVM(vmID string) error
	VMs() ([]string, error)
	EnsureNAT(name string, src netip.Prefix, uplink string) error
	RemoveNAT(name string) error
	InstallSlotNAT(nsPath string, s nft.SlotNAT) error
	Teardown() error
}

// netlinkKernel implements Kernel with netlink. TAPs are created with the
// tun driver's ioctls, which act in the calling thread's namespace, so that
// runs under netns.Do.
type netlinkKernel struct {
	// hostNS is the host namespace's path; "" means the process's own.
	hostNS string
}

// NewKernel returns the netlink Kernel for the host namespace at hostNS, or
// for the process's own namespace when hostNS is "".
func NewKernel(hostNS string) Kernel { return &netlinkKernel{hostNS: hostNS} }

func (k *netlinkKernel) path(ns string) string {
	if ns == "" {
		return k.hostNS
	}
	return ns
}

// handle returns a netlink handle bound to namespace ns; close it after use.
func (k *netlinkKernel) handle(ns string) (*netlink.Handle, error) {
	p := k.path(ns)
	if p == "" {
		return netlink.NewHandle()
	}
	h, err := vnetns.GetFromPath(p)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", p, err)
	}
	defer h.Close()
	return netlink.NewHandleAt(h)
}

func (k *netlinkKernel) CreateNS(name string) (string, error) {
	p, err := netns.Create(name)
	if errors.Is(err, netns.ErrExists) {
		return "", fmt.Errorf("%w: %w", ErrLinkExists, err)
	}
	return p, err
}

func (k *netlinkKernel) DeleteNS(name string) error { return netns.Delete(name) }

func (k *netlinkKernel) ListNS(prefix string) ([]string, error) { return netns.List(prefix) }

func (k *netlinkKernel) NSPath(name string) string { return netns.Path(name) }

func (k *netlinkKernel) Links(ns string) ([]Link, error) {
	h, err := k.handle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	byIndex := map[int]string{}
	for _, l := range links {
		byIndex[l.Attrs().Index] = l.Attrs().Name
	}
	out := make([]Link, 0, len(links))
	for _, l := range links {
		a := l.Attrs()
		out = append(out, Link{
			Name: a.Name, Alias: a.Alias, Kind: l.Type(),
			Master: byIndex[a.MasterIndex], Up: a.Flags&net.FlagUp != 0,
		})
	}
	return out, nil
}

func (k *netlinkKernel) CreateBridge(name string, mtu int, alias string) error {
	h, err := k.handle("")
	if err != nil {
		return err
	}
	defer h.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}
	if err := h.LinkAdd(br); err != nil {
		return linkErr("create bridge", name, err)
	}
	if err := h.LinkSetAlias(br, alias); err != nil {
		h.LinkDel(br)
		return fmt.Errorf("set alias of bridge %s: %w", name, err)
	}
	return nil
}

func (k *netlinkKernel) CreateTAP(ns string, spec TAPSpec) error {
	return netns.Do(k.path(ns), func() error {
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: spec.Name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			// IFF_TUN_EXCL makes the create fail when the name exists.
			// Firecracker and QEMU attach with IFF_VNET_HDR, which the
			// kernel accepts per open file.
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_TUN_EXCL,
			Owner: spec.Owner,
			Group: spec.Group,
		}
		// The library reports a taken name as formatted text without the
		// errno, so look the name up first; IFF_TUN_EXCL still guards
		// against a race.
		if _, err := netlink.LinkByName(spec.Name); err == nil {
			return fmt.Errorf("create tap %s: %w", spec.Name, ErrLinkExists)
		}
		if err := netlink.LinkAdd(tap); err != nil {
			return linkErr("create tap", spec.Name, err)
		}
		err := netlink.LinkSetMTU(tap, spec.MTU)
		if err == nil {
			err = netlink.LinkSetAlias(tap, spec.Alias)
		}
		if err != nil {
			netlink.LinkDel(tap)
			return fmt.Errorf("configure tap %s: %w", spec.Name, err)
		}
		return nil
	})
}

func (k *netlinkKernel) CreateVeth(name, alias string, mtu int, peerNS, peer string) error {
	h, err := k.handle("")
	if err != nil {
		return err
	}
	defer h.Close()
	target, err := vnetns.GetFromPath(k.path(peerNS))
	if err != nil {
		return fmt.Errorf("open netns %s: %w", peerNS, err)
	}
	defer target.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: name, MTU: mtu},
		PeerName:      peer,
		PeerNamespace: netlink.NsFd(target),
	}
	if err := h.LinkAdd(veth); err != nil {
		return linkErr("create veth", name, err)
	}
	if err := h.LinkSetAlias(veth, alias); err != nil {
		h.LinkDel(veth)
		return fmt.Errorf("set alias of veth %s: %w", name, err)
	}
	return nil
}

func (k *netlinkKernel) DeleteLink(ns, name string) error {
	h, err := k.handle(ns)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

func (k *netlinkKernel) SetMaster(name, master string) error {
	h, err := k.handle("")
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", name, master, err)
	}
	br, err := h.LinkByName(master)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", name, master, err)
	}
	if err := h.LinkSetMaster(l, br); err != nil {
		return fmt.Errorf("attach %s to %s: %w", name, master, err)
	}
	return nil
}

func (k *netlinkKernel) MoveLink(fromNS, name, toNS string) error {
	h, err := k.handle(fromNS)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("move link %s: %w", name, err)
	}
	target := k.path(toNS)
	var fd vnetns.NsHandle
	if target == "" {
		fd, err = vnetns.GetFromPath(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
	} else {
		fd, err = vnetns.GetFromPath(target)
	}
	if err != nil {
		return fmt.Errorf("move link %s: %w", name, err)
	}
	defer fd.Close()
	if err := h.LinkSetNsFd(l, int(fd)); err != nil {
		return fmt.Errorf("move link %s: %w", name, err)
	}
	return nil
}

func (k *netlinkKernel) SetUp(ns, name string) error {
	h, err := k.handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err == nil {
		err = h.LinkSetUp(l)
	}
	if err != nil {
		return fmt.Errorf("set link %s up: %w", name, err)
	}
	return nil
}

func (k *netlinkKernel) ReplaceAddr(ns, name string, addr netip.Prefix) error {
	h, err := k.handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err == nil {
		err = h.AddrReplace(l, &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}})
	}
	if err != nil {
		return fmt.Errorf("set address %s on %s: %w", addr, name, err)
	}
	return nil
}

func (k *netlinkKernel) ReplaceDefaultRoute(ns string, gw netip.Addr) error {
	h, err := k.handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	r := &netlink.Route{Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: gw.AsSlice()}
	if err := h.RouteReplace(r); err != nil {
		return fmt.Errorf("set default route via %s: %w", gw, err)
	}
	return nil
}

func (k *netlinkKernel) Addrs(ns string) ([]netip.Prefix, error) {
	h, err := k.handle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(ip, bits))
	}
	return out, nil
}

func sysctlPath(key string) string { return "/proc/sys/" + strings.ReplaceAll(key, ".", "/") }

func (k *netlinkKernel) Sysctl(ns, key string) (string, error) {
	var v []byte
	err := netns.Do(k.path(ns), func() error {
		var err error
		v, err = os.ReadFile(sysctlPath(key))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", key, err)
	}
	return strings.TrimSpace(string(v)), nil
}

func (k *netlinkKernel) SetSysctl(ns, key, value string) error {
	err := netns.Do(k.path(ns), func() error {
		return os.WriteFile(sysctlPath(key), []byte(value), 0o644)
	})
	if err != nil {
		return fmt.Errorf("write sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

func linkErr(op, name string, err error) error {
	if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("%s %s: %w", op, name, ErrLinkExists)
	}
	return fmt.Errorf("%s %s: %w", op, name, err)
}
