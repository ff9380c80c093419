package guest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rtnetlink is a minimal route netlink client: one request at a time, each
// acknowledged. It covers what the agent needs (link up and MTU, addresses,
// routes), so the guest needs no ip(8) binary.
type rtnetlink struct {
	fd int
}

var netlinkSeq atomic.Uint32

func openRtnetlink() (*rtnetlink, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind rtnetlink socket: %w", err)
	}
	return &rtnetlink{fd: fd}, nil
}

func (nl *rtnetlink) Close() error { return unix.Close(nl.fd) }

// nlmsg builds one netlink message: a fixed header struct followed by
// attributes.
type nlmsg struct {
	typ   uint16
	flags uint16
	body  []byte
}

func (m *nlmsg) addAttr(typ uint16, data []byte) {
	l := unix.SizeofRtAttr + len(data)
	b := make([]byte, rtaAlign(l))
	binary.NativeEndian.PutUint16(b[0:2], uint16(l))
	binary.NativeEndian.PutUint16(b[2:4], typ)
	copy(b[unix.SizeofRtAttr:], data)
	m.body = append(m.body, b...)
}

func rtaAlign(n int) int { return (n + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1) }

func structBytes[T any](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}

// do sends m with NLM_F_ACK and waits for the kernel's acknowledgement.
func (nl *rtnetlink) do(m nlmsg) error {
	seq := netlinkSeq.Add(1)
	hdr := unix.NlMsghdr{
		Len:   uint32(unix.SizeofNlMsghdr + len(m.body)),
		Type:  m.typ,
		Flags: m.flags | unix.NLM_F_REQUEST | unix.NLM_F_ACK,
		Seq:   seq,
	}
	msg := append(append([]byte{}, structBytes(&hdr)...), m.body...)
	if err := unix.Sendto(nl.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(nl.fd, buf, 0)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, r := range msgs {
			if r.Header.Seq != seq || r.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(r.Data) < 4 {
				return errors.New("short netlink error message")
			}
			if code := int32(binary.NativeEndian.Uint32(r.Data[0:4])); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}

// setLink brings the interface up and sets its MTU when mtu > 0.
func (nl *rtnetlink) setLink(index, mtu int) error {
	info := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(index), Flags: unix.IFF_UP, Change: unix.IFF_UP}
	m := nlmsg{typ: unix.RTM_NEWLINK, body: append([]byte{}, structBytes(&info)...)}
	if mtu > 0 {
		m.addAttr(unix.IFLA_MTU, binary.NativeEndian.AppendUint32(nil, uint32(mtu)))
	}
	return nl.do(m)
}

func (nl *rtnetlink) addr(typ uint16, index int, p netip.Prefix) error {
	family := unix.AF_INET
	if p.Addr().Is6() {
		family = unix.AF_INET6
	}
	msg := unix.IfAddrmsg{Family: uint8(family), Prefixlen: uint8(p.Bits()), Index: uint32(index)}
	m := nlmsg{typ: typ, body: append([]byte{}, structBytes(&msg)...)}
	if typ == unix.RTM_NEWADDR {
		m.flags = unix.NLM_F_CREATE | unix.NLM_F_REPLACE
	}
	a := p.Addr().AsSlice()
	m.addAttr(unix.IFA_LOCAL, a)
	m.addAttr(unix.IFA_ADDRESS, a)
	return nl.do(m)
}

func (nl *rtnetlink) addRoute(index int, dst netip.Prefix, gw netip.Addr) error {
	family := unix.AF_INET
	if dst.Addr().Is6() {
		family = unix.AF_INET6
	}
	scope := uint8(unix.RT_SCOPE_UNIVERSE)
	if !gw.IsValid() {
		scope = unix.RT_SCOPE_LINK
	}
	rt := unix.RtMsg{
		Family:   uint8(family),
		Dst_len:  uint8(dst.Bits()),
		Table:    unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_BOOT,
		Scope:    scope,
		Type:     unix.RTN_UNICAST,
	}
	m := nlmsg{typ: unix.RTM_NEWROUTE, flags: unix.NLM_F_CREATE | unix.NLM_F_REPLACE, body: append([]byte{}, structBytes(&rt)...)}
	if dst.Bits() > 0 {
		m.addAttr(unix.RTA_DST, dst.Addr().AsSlice())
	}
	if gw.IsValid() {
		m.addAttr(unix.RTA_GATEWAY, gw.AsSlice())
	}
	m.addAttr(unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(index)))
	return nl.do(m)
}

// replaceAddrs removes the interface's addresses that are not in want,
// except IPv6 link-local ones, and adds the missing ones.
func (nl *rtnetlink) replaceAddrs(iface *net.Interface, want []netip.Prefix) error {
	have, err := iface.Addrs()
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", iface.Name, err)
	}
	keep := map[netip.Prefix]bool{}
	for _, p := range want {
		keep[p] = true
	}
	for _, a := range have {
		ipnet, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		addr, _ := netip.AddrFromSlice(ipnet.IP)
		addr = addr.Unmap()
		ones, _ := ipnet.Mask.Size()
		p := netip.PrefixFrom(addr, ones)
		if keep[p] || addr.IsLinkLocalUnicast() {
			continue
		}
		if err := nl.addr(unix.RTM_DELADDR, iface.Index, p); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("delete address %s from %s: %w", p, iface.Name, err)
		}
	}
	for _, p := range want {
		if err := nl.addr(unix.RTM_NEWADDR, iface.Index, p); err != nil {
			return fmt.Errorf("add address %s to %s: %w", p, iface.Name, err)
		}
	}
	return nil
}
