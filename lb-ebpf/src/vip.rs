//! Which UDP packets are ours: to a VIP port (balance) or from a node (reply to un-NAT).

use lb_common::{AddrKey, Counter, Reverse, ReverseKey, PORT_WORDS};

use crate::{maps, parse::Packet};

#[inline(always)]
fn vip_index(pkt: &Packet) -> Option<u32> {
    let key = AddrKey {
        addr: pkt.dst,
        family: pkt.family,
        _pad: [0; 3],
    };
    // SAFETY: copied out under the program's RCU read lock.
    unsafe { maps::VIPS.get(key).map(|v| v.index) }
}

/// Is (destination address, `dport`) a balanced VIP port? `dport` is in wire byte order.
#[inline(always)]
pub fn is_vip_port(pkt: &Packet, dport: u16) -> bool {
    let Some(index) = vip_index(pkt) else {
        return false;
    };
    let port = u16::from_be(dport) as u32;
    let Some(word) = maps::VIP_PORTS.get(index * PORT_WORDS + port / 64) else {
        return false;
    };
    (*word >> (port % 64)) & 1 == 1
}

/// A fragment cannot be balanced per packet (only the first holds ports): drop those addressed
/// to a VIP. One from a node's address cannot be un-NATed (later fragments carry no ports) and
/// would leak the node's address towards the client: drop it too. Pass the rest to the kernel.
#[inline(always)]
pub fn fragment_verdict(pkt: &Packet) -> Counter {
    if vip_index(pkt).is_some() {
        Counter::DropFragment
    } else if from_node_addr(pkt) {
        Counter::DropNodeFragment
    } else {
        Counter::PassNotVip
    }
}

/// IPv6 with extension headers (not walked): from a node's address it cannot be un-NATed
/// either, so it is dropped; anything else goes to the kernel.
#[inline(always)]
pub fn ext_header_verdict(pkt: &Packet) -> Counter {
    if from_node_addr(pkt) {
        Counter::DropNodeFragment
    } else {
        Counter::PassIpv6ExtHdr
    }
}

/// Is the source address one of a node's (any port)?
#[inline(always)]
fn from_node_addr(pkt: &Packet) -> bool {
    let key = AddrKey {
        addr: pkt.src,
        family: pkt.family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read, under the program's RCU read lock.
    unsafe { maps::NODE_ADDRS.get(key).is_some() }
}

/// The VIP a reply from (source address, `sport`) must appear to come from, if the source is a
/// node's serving address and port.
#[inline(always)]
pub fn reverse(pkt: &Packet, sport: u16) -> Option<Reverse> {
    let key = ReverseKey {
        addr: pkt.src,
        port: sport,
        family: pkt.family,
        _pad: 0,
    };
    // SAFETY: copied out under the program's RCU read lock.
    unsafe { maps::REVERSE.get(key).copied() }
}
