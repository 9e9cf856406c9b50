//! Which UDP packets are the balancer's: to a VIP port, or from a node's serving port.

use lb_common::{AddrKey, Counter, Reverse, ReverseKey};

use crate::{parse::Packet, Tables};

fn key(addr: [u32; 4], family: u8) -> AddrKey {
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
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

/// A fragment: dropped when addressed to a VIP or coming from a node's address, else passed.
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
