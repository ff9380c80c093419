package nft

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Offsets in the IPv4 and transport headers that the rules compare.
const (
	ipv4SrcOffset = 12
	ipv4DstOffset = 16
	dstPortOffset = 2
	// ethSrcOffset is the source MAC in the Ethernet header.
	ethSrcOffset = 6
	// arpSenderIPOffset is the sender protocol address in an Ethernet/IPv4
	// ARP packet (RFC 826): after hardware and protocol type (2+2), their
	// lengths (1+1), the operation (2) and the sender MAC (6).
	arpSenderIPOffset = 14
)

// ifname pads an interface name to IFNAMSIZ, the width that meta iifname
// loads, so the comparison is exact and not a prefix match.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func matchIIFName(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(name)},
	}
}

func matchOIFName(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(name)},
	}
}

// matchEtherType compares meta protocol, the packet's EtherType, which the
// bridge and inet families both set.
func matchEtherType(op expr.CmpOp, etherType uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: binaryutil.BigEndian.PutUint16(etherType)},
	}
}

func matchIPv4() []expr.Any { return matchEtherType(expr.CmpOpEq, unix.ETH_P_IP) }

func matchAddr(offset uint32, op expr.CmpOp, a netip.Addr) []expr.Any {
	b := a.As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: op, Register: 1, Data: b[:]},
	}
}

func matchPrefix(offset uint32, p netip.Prefix) []expr.Any {
	if p.Bits() == 32 {
		return matchAddr(offset, expr.CmpOpEq, p.Addr())
	}
	mask := make([]byte, 4)
	binary.BigEndian.PutUint32(mask, ^uint32(0)<<(32-p.Bits()))
	network := p.Masked().Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: network[:]},
	}
}

func matchL4Proto(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

func matchDstPort(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: dstPortOffset, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func matchEtherSrcNot(mac net.HardwareAddr) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: ethSrcOffset, Len: 6},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte(mac)},
	}
}

func matchCtEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{
			SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0),
		},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// ruleExprs matches the traffic that r allows; the caller has already
// matched IPv4.
func ruleExprs(r Rule) []expr.Any {
	var e []expr.Any
	if r.Dest.Bits() > 0 {
		e = append(e, matchPrefix(ipv4DstOffset, r.Dest)...)
	}
	if r.Protocol != ProtocolAny {
		e = append(e, matchL4Proto(protocolNumbers[r.Protocol])...)
	}
	if r.Port != 0 {
		e = append(e, matchDstPort(r.Port)...)
	}
	return e
}

func verdict(kind expr.VerdictKind) *expr.Verdict { return &expr.Verdict{Kind: kind} }

func jump(chain string) *expr.Verdict { return &expr.Verdict{Kind: expr.VerdictJump, Chain: chain} }

func join(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}
