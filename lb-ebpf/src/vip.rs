//! Which packets are ours: to a VIP port (balance) or from a node (reply to un-NAT); and what
//! to do with the rest of a VIP's traffic and with sources that cannot be real.
//!
//! A VIP is routed to the balancers, not configured on them: whatever of a VIP's traffic the
//! datapath passes, the kernel forwards along its default route, back to the upstream router,
//! which sends it to a balancer again until the TTL runs out. So everything addressed to a VIP
//! is decided here: UDP to a balanced port is balanced, UDP to any other port is dropped
//! (`drop_vip_other_port`), and other protocols are dropped too (`drop_vip_other_proto`), except
//! ICMP errors (IPv4 types 3, 4, 5, 11, 12; ICMPv6 types below 128) and IPv6 neighbour
//! discovery (133..=137), which pass as before. Dropped, not answered: the balancer does not
//! speak for the nodes (no echo reply, RST or port unreachable to reflect or amplify).

use lb_common::{
    hash::{addr_filter_bit, src_filter_bit, vip_slot},
    AddrKey, Counter, Reverse, ReverseKey, FAMILY_V4, PORT_WORDS, VIP_PROBES, VIP_SLOT_EMPTY,
    VIP_TABLE_SLOTS,
};

use crate::{
    maps,
    parse::{ptr_at, Packet, L4},
};
use aya_ebpf::programs::XdpContext;

/// What a packet's destination is to the balancer.
pub enum Dest {
    /// A VIP address and a port it balances: the VIP's index (`VIP_PORTS`, `VIP_TUNNEL`).
    Balanced(u32),
    /// A VIP address, another port.
    OtherPort,
    /// No VIP.
    NotVip,
}

/// `hash(addr, family)` with an IPv4 address's three zero words (`parse_v4` leaves them zero)
/// written as zeros, so that the compiler drops their part of the fold: the hashes rotate and
/// xor every word, and a zero word adds nothing, so the result is the same.
#[inline(always)]
fn hash_of(addr: &[u32; 4], family: u8, hash: impl Fn(&[u32; 4], u8) -> u32) -> u32 {
    if family == FAMILY_V4 {
        hash(&[addr[0], 0, 0, 0], FAMILY_V4)
    } else {
        hash(addr, family)
    }
}

/// The port bitmap index of `addr` if it is a VIP: probed in `VIP_TABLE` (an empty slot ends
/// the probe: no VIP), then, after `VIP_PROBES` occupied slots, in `VIPS`.
#[inline(always)]
fn vip_index_of(addr: &[u32; 4], family: u8) -> Option<u32> {
    let start = hash_of(addr, family, vip_slot);
    let mut i = 0;
    while i < VIP_PROBES {
        let slot = maps::VIP_TABLE.get((start + i) % VIP_TABLE_SLOTS)?;
        if slot.family == VIP_SLOT_EMPTY {
            return None;
        }
        if slot.family == family && slot.addr == *addr {
            return Some(slot.index);
        }
        i += 1;
    }
    let key = AddrKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    // SAFETY: copied out under the program's RCU read lock.
    unsafe { maps::VIPS.get(key).map(|v| v.index) }
}

/// The port bitmap index of the packet's destination, if it is a VIP.
#[inline(always)]
pub fn vip_index(pkt: &Packet) -> Option<u32> {
    vip_index_of(&pkt.dst, pkt.family)
}

/// Is (destination address, `dport`) a balanced VIP port, another port of a VIP, or no VIP?
/// `dport` is in wire byte order.
#[inline(always)]
pub fn dest(pkt: &Packet, dport: u16) -> Dest {
    let Some(index) = vip_index(pkt) else {
        return Dest::NotVip;
    };
    let port = u16::from_be(dport) as u32;
    match maps::VIP_PORTS.get(index * PORT_WORDS + port / 64) {
        Some(word) if (*word >> (port % 64)) & 1 == 1 => Dest::Balanced(index),
        _ => Dest::OtherPort,
    }
}

/// Is the packet addressed to a VIP (any port)?
#[inline(always)]
pub fn is_vip(pkt: &Packet) -> bool {
    vip_index(pkt).is_some()
}

/// A packet that is not UDP: to a VIP it is dropped, unless it is an ICMP error (about a VIP's
/// flows: passed as before) or IPv6 neighbour discovery; anything else is not ours.
#[inline(always)]
pub fn not_udp_verdict(ctx: &XdpContext, pkt: &Packet) -> Counter {
    if vip_index(pkt).is_none() {
        return Counter::PassNotUdp;
    }
    if let L4::Icmp(off) = pkt.l4 {
        // Type and code (two bytes: a one-byte bounds check at a variable offset tells the
        // verifier nothing); a frame cut before them is no ICMP message.
        if let Some(tc) = ptr_at::<[u8; 2]>(ctx, off) {
            // SAFETY: ptr_at checked that the bytes lie inside the packet.
            let t = unsafe { (*tc)[0] };
            let passes = if pkt.family == FAMILY_V4 {
                // Destination unreachable, source quench, redirect, time exceeded, parameter
                // problem (RFC 792).
                matches!(t, 3 | 4 | 5 | 11 | 12)
            } else {
                // Error messages (RFC 4443 §2.1), neighbour discovery (RFC 4861 §4).
                t < 128 || (133..=137).contains(&t)
            };
            if passes {
                return Counter::PassNotUdp;
            }
        }
    }
    Counter::DropVipOtherProto
}

/// A packet to a VIP port whose source no client can have: a VIP (its node's reply would be
/// un-NATed to the VIP and loop), a node's address (one node answered by another through the
/// balancer), or an address of the balancer itself. XDP runs before rp_filter, so this is the
/// only place to refuse them. `SRC_FILTER` has the bit of each such address: the clean case
/// costs one array read.
#[inline(always)]
pub fn check_source(pkt: &Packet) -> Result<(), Counter> {
    let bit = hash_of(&pkt.src, pkt.family, src_filter_bit);
    match maps::SRC_FILTER.get(bit / 64) {
        Some(word) if (*word >> (bit % 64)) & 1 == 0 => return Ok(()),
        _ => {}
    }
    if vip_index_of(&pkt.src, pkt.family).is_some() {
        return Err(Counter::DropSrcVip);
    }
    let key = AddrKey {
        addr: pkt.src,
        family: pkt.family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read, under the program's RCU read lock.
    if unsafe { maps::NODE_ADDRS.get(key).is_some() } {
        return Err(Counter::DropSrcNode);
    }
    // SAFETY: as above.
    if unsafe { maps::LOCAL_ADDRS.get(key).is_some() } {
        return Err(Counter::DropSrcLocal);
    }
    Ok(())
}

/// An IPv6 fragment whose Fragment header is followed by anything but UDP: to a VIP it cannot
/// be balanced, and from a node's address it cannot be un-NATed (and would leak the node's
/// address towards the client): dropped. The rest goes to the kernel.
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
/// either, so it is dropped; to a VIP it cannot be balanced (and would loop), so it is dropped;
/// anything else goes to the kernel.
#[inline(always)]
pub fn ext_header_verdict(pkt: &Packet) -> Counter {
    if from_node_addr(pkt) {
        Counter::DropNodeFragment
    } else if vip_index(pkt).is_some() {
        Counter::DropVipOtherProto
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
pub fn from_node_addr(pkt: &Packet) -> bool {
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
