//! Which UDP packets are ours: to a VIP port (balance) or from a node (reply to un-NAT).

use lb_common::{
    hash::{addr_filter_bit, vip_slot},
    AddrKey, Counter, Reverse, ReverseKey, PORT_WORDS, VIP_PROBES, VIP_SLOT_EMPTY, VIP_TABLE_SLOTS,
};

use crate::{maps, parse::Packet};

/// The port bitmap index of the packet's destination, if it is a VIP: probed in `VIP_TABLE`
/// (an empty slot ends the probe: no VIP), then, after `VIP_PROBES` occupied slots, in `VIPS`.
#[inline(always)]
fn vip_index(pkt: &Packet) -> Option<u32> {
    let start = vip_slot(&pkt.dst, pkt.family);
    let mut i = 0;
    while i < VIP_PROBES {
        let slot = maps::VIP_TABLE.get((start + i) % VIP_TABLE_SLOTS)?;
        if slot.family == VIP_SLOT_EMPTY {
            return None;
        }
        if slot.family == pkt.family && slot.addr == pkt.dst {
            return Some(slot.index);
        }
        i += 1;
    }
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

/// Could the source address be a node's? `NODE_FILTER` has the bit of every node address set
/// (false positives happen, false negatives do not): the fast exit for traffic that is not ours.
#[inline(always)]
fn maybe_node_addr(pkt: &Packet) -> bool {
    let bit = addr_filter_bit(&pkt.src, pkt.family);
    match maps::NODE_FILTER.get(bit / 64) {
        Some(word) => (*word >> (bit % 64)) & 1 == 1,
        None => true,
    }
}

/// Is the source address one of a node's (any port)?
#[inline(always)]
fn from_node_addr(pkt: &Packet) -> bool {
    if !maybe_node_addr(pkt) {
        return false;
    }
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
    if !maybe_node_addr(pkt) {
        return None;
    }
    let key = ReverseKey {
        addr: pkt.src,
        port: sport,
        family: pkt.family,
        _pad: 0,
    };
    // SAFETY: copied out under the program's RCU read lock.
    unsafe { maps::REVERSE.get(key).copied() }
}
