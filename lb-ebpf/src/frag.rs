//! IP fragments (RFC 791 §2.3, RFC 8200 §4.5): only the first fragment of a datagram carries
//! its UDP header and DTLS record, so the first is balanced (or, from a node, un-NATed) like
//! any datagram and its ports (and, to a VIP, its node) recorded in `FRAGS` under what every
//! fragment of the datagram shares: (source, destination, identification, family). A later
//! fragment (offset not zero) takes its first's ports in place of the UDP header it lacks and
//! goes the same way through `try_lb` (`main.rs`): to a VIP, to the first's node (destination
//! rewritten, or encapsulated for a tunnel VIP); from a node, origin-checked and made to come
//! from the VIP. One whose first is not recorded (it came before its first, or the first was
//! dropped, or its entry was evicted) is counted and dropped: the balancer keeps no fragment,
//! it only follows. `FRAGS` is an LRU of `limits.fragment_capacity` entries: an entry lives
//! until evicted, and a datagram's fragments arrive within milliseconds.
//!
//! A later fragment has no UDP header: only its address is rewritten (and the IPv4 header
//! checksum fixed). The first's UDP checksum covers the whole datagram; the usual rewrite
//! (`nat.rs`) updates it incrementally, so nothing is reassembled. IPv6: only a Fragment
//! header right after the fixed header, followed by UDP, is followed (`parse.rs`).
//!
//! The key and value live in a per-CPU scratch slot (`FRAG_SCRATCH`) and are passed to the map
//! helpers from there: the program has no stack to spare for them.

// The map helpers take the key and value by `Borrow`: a reference into the scratch slot is
// passed as the pointer itself, where a value would be copied onto the stack first.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values stay in FRAG_SCRATCH, off the stack"
)]

use aya_ebpf::programs::XdpContext;
use lb_common::{csum::CsumDelta, frag::FRAG_TO_VIP, Counter, FAMILY_V4};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    maps,
    nat::{bytes16, Side},
    parse::{ptr_at, Packet, Udp, FRAG_LATER, IPV6_FRAGMENT_LEN},
};

/// The fragment's identification, host order: IPv4's 16 bits, or the IPv6 Fragment header's
/// 32 (right after the fixed header: `parse.rs` follows no other).
#[inline(always)]
fn id(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    if pkt.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, pkt.l3)?;
        // SAFETY: bounds checked by ptr_at.
        Some(u16::from_be_bytes(unsafe { (*ip).id }) as u32)
    } else {
        let fh: *const [u8; IPV6_FRAGMENT_LEN] = ptr_at(ctx, pkt.l3 + Ipv6Hdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let fh = unsafe { *fh };
        Some(u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]))
    }
}

/// The scratch slot with `pkt`'s key written.
#[inline(always)]
fn scratch(ctx: &XdpContext, pkt: &Packet) -> Option<*mut maps::FragScratch> {
    let id = id(ctx, pkt)?;
    let s = maps::FRAG_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    unsafe {
        (*s).key.src = pkt.src;
        (*s).key.dst = pkt.dst;
        (*s).key.id = id;
        (*s).key.family = pkt.family;
        (*s).key._pad = [0; 3];
    }
    Some(s)
}

/// Writes a first fragment's key, ports and direction into `FRAG_SCRATCH`, for [`commit`]
/// once its node is known.
#[inline(always)]
pub fn prepare(ctx: &XdpContext, pkt: &Packet, dir: u8, udp: &Udp) {
    let Some(s) = scratch(ctx, pkt) else {
        return;
    };
    // SAFETY: as in `scratch`.
    unsafe {
        (*s).route.node_id = 0;
        (*s).route.sport = udp.sport;
        (*s).route.dport = udp.dport;
        (*s).route.dir = dir;
        (*s).route._pad = [0; 3];
    }
}

/// Records the first fragment [`prepare`] wrote, as gone to node `node_id` (0 from a node).
#[inline(always)]
pub fn commit(node_id: u32) {
    let Some(s) = maps::FRAG_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, written by `prepare` in this run; the helper copies key and
    // value out of it.
    unsafe {
        (*s).route.node_id = node_id;
        let _ = maps::FRAGS.insert(&(*s).key, &(*s).route, 0);
    }
}

/// A later fragment's stand-in for its missing UDP header: its first's ports, and its new
/// `Packet::frag`, which says which way the first went (`FRAG_LATER` + its direction); with
/// no first recorded, zeros and `FRAG_LATER`. The first's entry stays in
/// `FRAG_SCRATCH` for [`first_node`] and [`first_ports`].
#[inline(always)]
pub fn first(ctx: &XdpContext, pkt: &Packet) -> (Udp, u8) {
    let mut udp = Udp {
        off: 0,
        sport: 0,
        dport: 0,
        len: 0,
    };
    let Some(s) = scratch(ctx, pkt) else {
        return (udp, FRAG_LATER);
    };
    // SAFETY: the key is this CPU's slot; the value is read under the RCU read lock.
    unsafe {
        let Some(r) = maps::FRAGS.get(&(*s).key) else {
            return (udp, FRAG_LATER);
        };
        (*s).route = *r;
        if r.dir == FRAG_TO_VIP || r.dir == lb_common::frag::FRAG_FROM_NODE {
            udp.sport = r.sport;
            udp.dport = r.dport;
            return (udp, FRAG_LATER + r.dir);
        }
    }
    (udp, FRAG_LATER)
}

/// The node the first fragment went to ([`first`] found it).
#[inline(always)]
pub fn first_node() -> u32 {
    match maps::FRAG_SCRATCH.get_ptr(0) {
        // SAFETY: this CPU's slot, written by `first` in this run.
        Some(s) => unsafe { (*s).route.node_id },
        None => u32::MAX,
    }
}

/// The first fragment's ports ([`first`] found them), wire order.
#[inline(always)]
pub fn first_ports() -> [u16; 2] {
    match maps::FRAG_SCRATCH.get_ptr(0) {
        // SAFETY: this CPU's slot, written by `first` in this run.
        Some(s) => unsafe { [(*s).route.sport, (*s).route.dport] },
        None => [0; 2],
    }
}

/// Writes `addr` as a later fragment's source or destination; IPv4 fixes its header checksum
/// (there is no UDP header to fix).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, side: Side, addr: &[u32; 4]) -> Result<(), Counter> {
    if pkt.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        let old = if side == Side::Dst {
            pkt.dst[0]
        } else {
            pkt.src[0]
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let check = CsumDelta::from_check(u16::from_ne_bytes((*ip).check))
                .replace32(old, addr[0])
                .finish();
            (*ip).check = check.to_ne_bytes();
            match side {
                Side::Dst => (*ip).dst_addr = addr[0].to_ne_bytes(),
                Side::Src => (*ip).src_addr = addr[0].to_ne_bytes(),
            }
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at. IPv6 has no header checksum.
        unsafe {
            match side {
                Side::Dst => (*ip).dst_addr = bytes16(addr),
                Side::Src => (*ip).src_addr = bytes16(addr),
            }
        }
    }
    Ok(())
}
