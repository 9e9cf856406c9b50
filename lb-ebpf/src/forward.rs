//! Forwarding: the FIB lookup for a planned rewrite (before anything is written), then TTL,
//! MACs, and XDP_TX (same interface), a DEVMAP redirect (another attached interface) or a pass
//! to the kernel.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    csum::CsumDelta, family_index, Counter, NextHop as CachedHop, FAMILY_V4, NEXTHOP_TTL_NS,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    maps,
    nat::Addressing,
    parse::{ptr_at, Packet},
    stats::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_UDP: u8 = 17;

/// The next hop for a packet's (planned) addressing.
pub struct NextHop {
    fib: FibParams,
    rc: u32,
    ingress: u32,
    ttl: u8,
}

impl NextHop {
    /// The destination is this host: nothing to forward.
    #[inline(always)]
    pub fn is_local(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_NOT_FWDED
    }
}

/// The next hop towards a node: from the per-CPU cache if fresh, else a FIB lookup whose
/// successful result is cached for `NEXTHOP_TTL_NS`. Failed lookups (no neighbour yet, ...)
/// are not cached, so the kernel keeps resolving them.
#[inline(always)]
pub fn lookup_node(
    ctx: &XdpContext,
    pkt: &Packet,
    to: &Addressing,
    slot: u32,
) -> Result<NextHop, Counter> {
    let idx = slot * 2 + family_index(pkt.family);
    let now = unsafe { bpf_ktime_get_ns() };
    if pkt.vlans == 0 {
        if let Some(c) = maps::NEXTHOP.get_ptr(idx) {
            // SAFETY: per-CPU slot, copied out.
            let c = unsafe { *c };
            if c.expires_ns > now {
                // SAFETY: plain-old-data struct of integers.
                let mut fib: FibParams = unsafe { zeroed() };
                fib.ifindex = c.ifindex;
                fib.smac = c.smac;
                fib.dmac = c.dmac;
                return Ok(NextHop {
                    fib,
                    rc: BPF_FIB_LKUP_RET_SUCCESS,
                    ingress: ctx.ingress_ifindex() as u32,
                    ttl: ttl(ctx, pkt)?,
                });
            }
        }
    }
    let hop = lookup(ctx, pkt, to)?;
    if hop.rc == BPF_FIB_LKUP_RET_SUCCESS {
        if let Some(c) = maps::NEXTHOP.get_ptr_mut(idx) {
            // SAFETY: per-CPU slot.
            unsafe {
                *c = CachedHop {
                    expires_ns: now + NEXTHOP_TTL_NS,
                    ifindex: hop.fib.ifindex,
                    smac: hop.fib.smac,
                    dmac: hop.fib.dmac,
                    mtu: 0,
                    _pad: [0; 6],
                }
            };
        }
    }
    Ok(hop)
}

#[inline(always)]
fn ttl(ctx: &XdpContext, pkt: &Packet) -> Result<u8, Counter> {
    // SAFETY: bounds checked by ptr_at.
    if pkt.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        Ok(unsafe { (*ip).ttl })
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        Ok(unsafe { (*ip).hop_limit })
    }
}

/// FIB lookup for the packet as it will be after its rewrite, before anything is written.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, pkt: &Packet, to: &Addressing) -> Result<NextHop, Counter> {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: plain-old-data struct of integers; all-zero is a valid starting value.
    let mut fib: FibParams = unsafe { zeroed() };
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = to.sport;
    fib.dport = to.dport;
    fib.ifindex = ingress;
    let ttl = if pkt.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at; the bindings' unions are plain integers.
        unsafe {
            fib.family = AF_INET;
            fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
            fib.__bindgen_anon_2.tos = (*ip).tos;
            fib.__bindgen_anon_3.ipv4_src = to.src[0];
            fib.__bindgen_anon_4.ipv4_dst = to.dst[0];
            (*ip).ttl
        }
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: as above.
        unsafe {
            fib.family = AF_INET6;
            fib.__bindgen_anon_1.tot_len =
                u16::from_be_bytes((*ip).payload_len) + Ipv6Hdr::LEN as u16;
            fib.__bindgen_anon_2.flowinfo = u32::from_ne_bytes((*ip).vcf) & 0x0fff_ffff_u32.to_be();
            fib.__bindgen_anon_3.ipv6_src = to.src;
            fib.__bindgen_anon_4.ipv6_dst = to.dst;
            (*ip).hop_limit
        }
    };
    // VLAN-tagged frames go to the kernel anyway (see `send`): skip the lookup.
    if pkt.vlans != 0 {
        return Ok(NextHop {
            fib,
            rc: u32::MAX,
            ingress,
            ttl,
        });
    }
    // SAFETY: the helper reads and writes only the params struct of the size given.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, size_of::<FibParams>() as i32, 0) } as u32;
    Ok(NextHop {
        fib,
        rc,
        ingress,
        ttl,
    })
}

/// Sends an already rewritten packet to its next hop, or hands it to the kernel (counted).
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, hop: &NextHop) -> Result<u32, Counter> {
    // The kernel owns the mapping from VLAN devices to tags; let it route tagged frames
    // (the rewrite is done, so it forwards them to the node or the client).
    if pkt.vlans != 0 {
        return Err(Counter::FwdKernelVlan);
    }
    match hop.rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The kernel resolves the neighbour (ARP/ND) and forwards this packet itself.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Counter::FwdKernelNoNeigh),
        // Blackhole, unreachable, forwarding disabled, ...: the kernel decides (and signals).
        _ => return Err(Counter::FwdKernelFib),
    }
    let egress = hop.fib.ifindex;
    if egress != hop.ingress && maps::DEVMAP.get_ifindex(egress).is_none() {
        return Err(Counter::FwdKernelIface);
    }
    // Like any router: a packet that would expire goes to the kernel for its ICMP error.
    if hop.ttl <= 1 {
        return Err(Counter::FwdKernelTtl);
    }
    decrement_ttl(ctx, pkt)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = hop.fib.dmac;
        (*eth).src_addr = hop.fib.smac;
    }

    if egress == hop.ingress {
        count(Counter::FwdTx);
        return Ok(xdp_action::XDP_TX);
    }
    match maps::DEVMAP.redirect(egress, 0) {
        Ok(action) => {
            count(Counter::FwdRedirect);
            Ok(action)
        }
        // Not reachable: the entry was looked up above within the same RCU section.
        Err(_) => Err(Counter::FwdKernelIface),
    }
}

#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) -> Result<(), Counter> {
    if pkt.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at. TTL and protocol form one 16-bit checksum word.
        unsafe {
            let old = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
            (*ip).ttl -= 1;
            let new = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
            let check = u16::from_ne_bytes((*ip).check);
            (*ip).check = CsumDelta::from_check(check)
                .replace16(old, new)
                .finish()
                .to_ne_bytes();
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at. IPv6 has no header checksum.
        unsafe { (*ip).hop_limit -= 1 };
    }
    Ok(())
}
