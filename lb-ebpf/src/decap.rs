//! The node side of tunnel mode (`lb_common::decap`), an object of its own (the `decap` binary
//! of this crate): on a node's interface, it strips the outer header of what balancers tunnel
//! to this node and passes the client's packet to the stack, which delivers it to the VIP on a
//! local interface. For kernels without `ipip`, `fou` or `ip6_tunnel` (and nodes where loading
//! modules is not the operator's to do).
//!
//! Decapsulated, when the outer destination is in `DECAP_ADDRS`:
//! - IPv4 protocol 4 carrying IPv4, IPv6 next header 41 carrying IPv6 (RFC 2003 / RFC 2473),
//! - UDP to the `DECAP_PORTS` port carrying IPv4 or IPv6 (GUE variant 1), over either family.
//!
//! The outer header goes; the Ethernet header is rewritten in front of the inner packet with
//! its type. Everything else passes untouched (`pass_not_tunnel`); a tunnel packet whose inner
//! packet is not the IP it claims is dropped (`drop_decap_malformed`). Outer IPv4 options are
//! skipped by IHL; outer IPv6 extension headers and fragments are not tunnel packets cidlb
//! sends, and pass to the stack as they are.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    decap::{DECAP_GUE, DECAP_IPIP, DECAP_SLOTS, DROP_MALFORMED, MAX_DECAP_ADDRS, PASS_NOT_TUNNEL},
    AddrKey, FAMILY_V4, FAMILY_V6,
};
use network_types::eth::{EthHdr, EtherType};

#[map]
static DECAP_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

#[map]
static DECAP_PORTS: Array<u16> = Array::with_max_entries(1, 0);

#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_SLOTS, 0);

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_IPV6: u8 = 41;

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
}

/// A pointer to `T` at `off` bytes into the frame, if all of `T` lies inside it (this object
/// does not link the datapath's modules).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if ctx.data() + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((ctx.data() + off) as *mut T)
}

#[inline(always)]
fn to_me(addr: [u32; 4], family: u8) -> bool {
    let key = AddrKey {
        addr,
        family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read.
    unsafe { DECAP_ADDRS.get(key).is_some() }
}

/// What the outer header is.
enum Outer {
    /// Strip this many bytes after the Ethernet header; the inner packet is IPv4 (`false`)
    /// or IPv6 (`true`) as the outer header says (IPIP), or as its version nibble says (GUE).
    Ipip(usize, bool),
    Gue(usize),
    Not,
}

#[inline(always)]
fn outer(ctx: &XdpContext) -> Option<Outer> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    let gue_port = *DECAP_PORTS.get(0)?;
    let (proto, len, dst, family) = if ether_type == EtherType::Ipv4 as u16 {
        let ip: *const [u8; 20] = ptr_at(ctx, EthHdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        // Fragments are not tunnel packets cidlb sends (DF, never fragmented).
        if ip[0] >> 4 != 4 || (ip[6] & 0x3f) != 0 || ip[7] != 0 {
            return Some(Outer::Not);
        }
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
        (ip[9], ihl, [dst, 0, 0, 0], FAMILY_V4)
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip: *const [u8; 40] = ptr_at(ctx, EthHdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let w = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
        (ip[6], 40, [w(24), w(28), w(32), w(36)], FAMILY_V6)
    } else {
        return Some(Outer::Not);
    };
    if len < 20 {
        return Some(Outer::Not);
    }
    match proto {
        IPPROTO_IPIP if family == FAMILY_V4 && to_me(dst, family) => Some(Outer::Ipip(len, false)),
        IPPROTO_IPV6 if family == FAMILY_V6 && to_me(dst, family) => Some(Outer::Ipip(len, true)),
        IPPROTO_UDP if gue_port != 0 => {
            // The UDP header at a variable offset (IPv4 options): masked, as the datapath does.
            let at = (EthHdr::LEN + len) & 0xff;
            let udp: *const [u16; 4] = ptr_at(ctx, at)?;
            // SAFETY: bounds checked by ptr_at.
            let dport = unsafe { (*udp)[1] };
            if dport == gue_port && to_me(dst, family) {
                Some(Outer::Gue(len + 8))
            } else {
                Some(Outer::Not)
            }
        }
        _ => Some(Outer::Not),
    }
}

#[xdp]
pub fn cidlb_decap(ctx: XdpContext) -> u32 {
    let (strip, v6, slot) = match outer(&ctx) {
        Some(Outer::Ipip(n, v6)) => (n, Some(v6), DECAP_IPIP),
        Some(Outer::Gue(n)) => (n, None, DECAP_GUE),
        _ => {
            count(PASS_NOT_TUNNEL);
            return xdp_action::XDP_PASS;
        }
    };
    match decap(&ctx, strip & 0xff, v6) {
        Some(()) => {
            count(slot);
            xdp_action::XDP_PASS
        }
        None => {
            count(DROP_MALFORMED);
            xdp_action::XDP_DROP
        }
    }
}

/// Strips `strip` bytes after the Ethernet header. The inner packet must be IP of version
/// 6 (`Some(true)`), 4 (`Some(false)`) or either (`None`, GUE: its version nibble says).
#[inline(always)]
fn decap(ctx: &XdpContext, strip: usize, v6: Option<bool>) -> Option<()> {
    // The MACs first: read after the check below, LLVM would drop their own bounds check as
    // implied by it, and the verifier cannot follow that through a variable offset.
    let macs: *const [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at; copied out before the head moves.
    let macs = unsafe { *macs };
    let first: *const [u8; 20] = ptr_at(ctx, EthHdr::LEN + strip)?;
    // SAFETY: bounds checked by ptr_at.
    let version = unsafe { (*first)[0] } >> 4;
    let inner_v6 = match version {
        4 => false,
        6 => true,
        _ => return None,
    };
    if v6.is_some_and(|want| want != inner_v6) {
        return None;
    }
    // SAFETY: the helper moves the packet's start; pointers are taken again after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return None;
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ether_type = if inner_v6 {
        EtherType::Ipv6
    } else {
        EtherType::Ipv4
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr.copy_from_slice(&macs[..6]);
        (*eth).src_addr.copy_from_slice(&macs[6..]);
        (*eth).ether_type = ether_type as u16;
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
