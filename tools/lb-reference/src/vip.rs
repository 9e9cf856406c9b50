//! Which UDP packets are the balancer's: to a VIP port, or from a node's serving port; what
//! becomes of the rest of a VIP's traffic, and of sources no client can have (docs/datapath.md,
//! "What the datapath does", step 1, and docs/security.md, "Hostile input").

use lb_common::{AddrKey, Counter, Reverse, ReverseKey};

use crate::{parse::Packet, Tables};

fn key(addr: [u32; 4], family: u8) -> AddrKey {
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// The destination VIP's bitmap index (`VIPS`), if the destination is a VIP.
pub fn index(t: &Tables, pkt: &Packet) -> Option<u32> {
    t.vips.get(&key(pkt.dst, pkt.family)).map(|v| v.index)
}

/// Is the destination a VIP address?
pub fn to_vip(t: &Tables, pkt: &Packet) -> bool {
    t.vips.contains_key(&key(pkt.dst, pkt.family))
}

/// The counters of refusals that shadow mode passes instead.
pub fn refused_at_edge(c: Counter) -> bool {
    matches!(
        c,
        Counter::DropVipOtherPort
            | Counter::DropVipOtherProto
            | Counter::DropSrcVip
            | Counter::DropSrcNode
            | Counter::DropSrcLocal
    )
}

/// Not UDP. To a VIP: an ICMP error (IPv4 types 3, 4, 5, 11, 12; ICMPv6 below 128) or IPv6
/// neighbour discovery (133..=137) passes as any other non-UDP packet; the rest (TCP, echo,
/// other protocols, an ICMP header cut off) is dropped, since the kernel would send it back
/// upstream.
pub fn not_udp_verdict(t: &Tables, f: &[u8], pkt: &Packet) -> Counter {
    if !to_vip(t, pkt) {
        return Counter::PassNotUdp;
    }
    // Its type, if the frame holds the type and code bytes.
    let icmp_type = pkt.icmp.and_then(|off| f.get(off..off + 2)).map(|tc| tc[0]);
    let error = match icmp_type {
        Some(ty) if pkt.family == lb_common::FAMILY_V4 => [3, 4, 5, 11, 12].contains(&ty),
        Some(ty) => ty < 128 || (133..=137).contains(&ty),
        None => false,
    };
    if error {
        Counter::PassNotUdp
    } else {
        Counter::DropVipOtherProto
    }
}

/// A datagram to a VIP port from a VIP, a node's address or the balancer's own: refused.
pub fn check_source(t: &Tables, pkt: &Packet) -> Result<(), Counter> {
    let k = key(pkt.src, pkt.family);
    if t.vips.contains_key(&k) {
        Err(Counter::DropSrcVip)
    } else if t.node_addrs.contains_key(&k) {
        Err(Counter::DropSrcNode)
    } else if t.local_addrs.contains(&k) {
        Err(Counter::DropSrcLocal)
    } else {
        Ok(())
    }
}

/// Is the source one of a node's addresses?
pub fn from_node_addr(t: &Tables, pkt: &Packet) -> bool {
    t.node_addrs.contains_key(&key(pkt.src, pkt.family))
}

/// Is (destination, `dport` in wire order) a balanced VIP port?
pub fn is_vip_port(t: &Tables, pkt: &Packet, dport: u16) -> bool {
    let Some(vip) = t.vips.get(&key(pkt.dst, pkt.family)) else {
        return false;
    };
    let port = u16::from_be(dport) as usize;
    t.vip_ports
        .get(&vip.index)
        .and_then(|words| words.get(port / 64))
        .is_some_and(|w| (w >> (port % 64)) & 1 == 1)
}

/// An IPv6 Fragment header followed by anything but UDP: dropped when addressed to a VIP or
/// coming from a node's address, else passed.
pub fn fragment_verdict(t: &Tables, pkt: &Packet) -> Counter {
    if t.vips.contains_key(&key(pkt.dst, pkt.family)) {
        Counter::DropFragment
    } else if t.node_addrs.contains_key(&key(pkt.src, pkt.family)) {
        Counter::DropNodeFragment
    } else {
        Counter::PassNotVip
    }
}

/// IPv6 with an extension header other than a fragment header.
pub fn ext_header_verdict(t: &Tables, pkt: &Packet) -> Counter {
    if t.node_addrs.contains_key(&key(pkt.src, pkt.family)) {
        Counter::DropNodeFragment
    } else if to_vip(t, pkt) {
        Counter::DropVipOtherProto
    } else {
        Counter::PassIpv6ExtHdr
    }
}

/// The VIP a datagram from (source, `sport`) is a reply for, if that is a node's serving port.
pub fn reverse(t: &Tables, pkt: &Packet, sport: u16) -> Option<Reverse> {
    t.reverse
        .get(&ReverseKey {
            addr: pkt.src,
            port: sport,
            family: pkt.family,
            _pad: 0,
        })
        .copied()
}
