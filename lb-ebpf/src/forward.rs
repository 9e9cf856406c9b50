//! Forwarding: the FIB lookup for a planned rewrite (before anything is written), then TTL,
//! MACs, and XDP_TX (same interface), a DEVMAP redirect (another attached interface) or a pass
//! to the kernel.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns},
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
    /// The FIB's answer (`BPF_FIB_LKUP_RET_*`); a cache hit is `SUCCESS`.
    rc: u32,
    /// Egress interface and MACs (valid when [`NextHop::resolved`]).
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    ingress: u32,
    ttl: u8,
    /// The path MTU as cached (0: unknown, or no lookup that learns it) and the packet's L3
    /// length: see [`NextHop::fits`].
    mtu: u16,
    len: u16,
}

impl NextHop {
    /// The destination is this host: nothing to forward.
    #[inline(always)]
    pub fn is_local(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_NOT_FWDED
    }

    /// Forwarding is disabled on the ingress interface (for the packet's family): the FIB
    /// said nothing about the destination.
    #[inline(always)]
    pub fn fwd_disabled(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_FWD_DISABLED
    }

    /// The lookup found a neighbour: `egress` and `dmac` are valid.
    #[inline(always)]
    pub fn resolved(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_SUCCESS
    }

    /// No neighbour entry (ARP/ND) for the next hop yet.
    #[inline(always)]
    pub fn no_neigh(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_NO_NEIGH
    }

    /// The interface the next hop is on (valid when [`NextHop::resolved`]).
    #[inline(always)]
    pub fn egress(&self) -> u32 {
        self.ifindex
    }

    /// The interface the packet came in on.
    #[inline(always)]
    pub fn ingress(&self) -> u32 {
        self.ingress
    }

    /// The next hop's MAC (valid when [`NextHop::resolved`]).
    #[inline(always)]
    pub fn dmac(&self) -> [u8; 6] {
        self.dmac
    }

    /// Lowers the path MTU to `mtu` (a tunnel's configured one; 0: none) if it is smaller or
    /// the FIB's is unknown (`lb_common::tunnel::path_mtu`).
    #[inline(always)]
    pub fn limit_mtu(&mut self, mtu: u16) {
        self.mtu = lb_common::tunnel::path_mtu(mtu, self.mtu);
    }

    /// The path MTU (0: unknown).
    #[inline(always)]
    pub fn mtu(&self) -> u32 {
        self.mtu as u32
    }

    /// Does the packet, `extra` bytes larger (an encapsulation), fit the path MTU?
    #[inline(always)]
    pub fn fits(&self, extra: u32) -> bool {
        self.mtu == 0 || self.len as u32 + extra <= self.mtu as u32
    }

    #[inline(always)]
    fn from_fib(fib: &FibParams, rc: u32, ingress: u32, l3: &L3, mtu: u16) -> Self {
        NextHop {
            rc,
            ifindex: fib.ifindex,
            smac: fib.smac,
            dmac: fib.dmac,
            ingress,
            ttl: l3.ttl,
            mtu,
            len: l3.len,
        }
    }
}

/// What the FIB parameters and the forwarding checks need of the IP header, read before
/// anything is written.
struct L3 {
    ttl: u8,
    /// The L3 length the kernel compares with the MTU.
    len: u16,
    /// IPv4 TOS, or the IPv6 flow label and traffic class (wire bytes).
    tos: u8,
    flowinfo: u32,
}

#[inline(always)]
fn l3(ctx: &XdpContext, pkt: &Packet) -> Result<L3, Counter> {
    if pkt.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            Ok(L3 {
                ttl: (*ip).ttl,
                len: u16::from_be_bytes((*ip).tot_len),
                tos: (*ip).tos,
                flowinfo: 0,
            })
        }
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            Ok(L3 {
                ttl: (*ip).hop_limit,
                len: u16::from_be_bytes((*ip).payload_len).saturating_add(Ipv6Hdr::LEN as u16),
                tos: 0,
                flowinfo: u32::from_ne_bytes((*ip).vcf) & 0x0fff_ffff_u32.to_be(),
            })
        }
    }
}

/// The next hop towards a node: from the per-CPU cache if fresh, else a FIB lookup whose
/// successful result is cached for `NEXTHOP_TTL_NS`. Failed lookups (no neighbour yet, ...)
/// are not cached, so the kernel keeps resolving them. The result depends only on the node's
/// address (`to.dst`), not on how the packet arrived, so tagged frames and node replies (whose
/// origin is checked against it, see `reply.rs`) share the cache with client traffic. A hit
/// builds no FIB parameters at all.
///
/// The cache also holds the path MTU, learned when it is filled, because a cache hit skips the
/// MTU check `bpf_fib_lookup` makes: a packet larger than it is marked `too_big` and goes to
/// the kernel (`fwd_kernel_mtu`) instead of being redirected to a device that would drop it.
#[inline(always)]
pub fn lookup_node(
    ctx: &XdpContext,
    pkt: &Packet,
    to: &Addressing,
    slot: u32,
) -> Result<NextHop, Counter> {
    let idx = slot * 2 + family_index(pkt.family);
    // The coarse clock (CLOCK_MONOTONIC at the last tick): a few ns, where bpf_ktime_get_ns
    // reads the clock source, which costs about 23 ns here (in a VM). A 1 s TTL does not need
    // more than tick resolution.
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let l3 = l3(ctx, pkt)?;
    let ingress = ctx.ingress_ifindex() as u32;
    if let Some(c) = maps::NEXTHOP.get_ptr(idx) {
        // SAFETY: per-CPU slot, copied out.
        let c = unsafe { *c };
        if c.expires_ns > now {
            return Ok(NextHop {
                rc: BPF_FIB_LKUP_RET_SUCCESS,
                ifindex: c.ifindex,
                smac: c.smac,
                dmac: c.dmac,
                ingress,
                ttl: l3.ttl,
                mtu: c.mtu,
                len: l3.len,
            });
        }
    }
    let scratch = maps::FIB_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Counter::FwdKernelFib)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    let (fib, probe) = unsafe { (&mut (*scratch).fib, &mut (*scratch).probe) };
    params(ctx, pkt, to, &l3, fib);
    // The MTU lookup below needs the parameters as they are now: a lookup overwrites
    // ifindex, the MACs and (for a gateway route) the destination address.
    *probe = *fib;
    // tot_len 0 never exceeds the MTU, so a routable node always yields its MACs here; the
    // packet's own length is compared with the MTU learned below.
    fib.__bindgen_anon_1.tot_len = 0;
    let rc = fib_lookup(ctx, fib);
    let mut mtu = 0;
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // The kernel's MTU check (net/core/filter.c, bpf_ipv{4,6}_fib_lookup with check_mtu)
        // runs before the neighbour lookup: with tot_len 0xffff it returns FRAG_NEEDED and
        // the route's (or device's) MTU in mtu_result, the union twin of tot_len. Anything
        // else (an MTU of 65535) leaves 0: no check.
        probe.__bindgen_anon_1.tot_len = u16::MAX;
        // SAFETY: reading the union field the kernel writes on FRAG_NEEDED.
        mtu = if fib_lookup(ctx, probe) == BPF_FIB_LKUP_RET_FRAG_NEEDED {
            unsafe { probe.__bindgen_anon_1.mtu_result }
        } else {
            0
        };
        if let Some(c) = maps::NEXTHOP.get_ptr_mut(idx) {
            // SAFETY: per-CPU slot.
            unsafe {
                *c = CachedHop {
                    expires_ns: now + NEXTHOP_TTL_NS,
                    ifindex: fib.ifindex,
                    smac: fib.smac,
                    dmac: fib.dmac,
                    mtu,
                    _pad: [0; 6],
                }
            };
        }
    }
    Ok(NextHop::from_fib(fib, rc, ingress, &l3, mtu))
}

/// Writes the FIB parameters for the packet's (planned) addressing into `fib`.
#[inline(always)]
fn params(ctx: &XdpContext, pkt: &Packet, to: &Addressing, l3: &L3, fib: &mut FibParams) {
    // SAFETY: plain-old-data struct of integers; all-zero is a valid starting value.
    *fib = unsafe { zeroed() };
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = to.sport;
    fib.dport = to.dport;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_1.tot_len = l3.len;
    if pkt.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = l3.tos;
        fib.__bindgen_anon_3.ipv4_src = to.src[0];
        fib.__bindgen_anon_4.ipv4_dst = to.dst[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_2.flowinfo = l3.flowinfo;
        fib.__bindgen_anon_3.ipv6_src = to.src;
        fib.__bindgen_anon_4.ipv6_dst = to.dst;
    }
}

#[inline(always)]
fn fib_lookup(ctx: &XdpContext, fib: &mut FibParams) -> u32 {
    // SAFETY: the helper reads and writes only the params struct of the size given.
    unsafe { bpf_fib_lookup(ctx.as_ptr(), fib, size_of::<FibParams>() as i32, 0) as u32 }
}

/// FIB lookup for the packet as it will be after its rewrite, before anything is written.
/// VLAN-tagged frames are looked up too (they leave through the kernel, see `send`, but a
/// reply's lookup says whether it is addressed to this host): the lookup names the route,
/// whichever device the tag belongs to.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, pkt: &Packet, to: &Addressing) -> Result<NextHop, Counter> {
    let l3 = l3(ctx, pkt)?;
    let scratch = maps::FIB_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Counter::FwdKernelFib)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    let fib = unsafe { &mut (*scratch).fib };
    params(ctx, pkt, to, &l3, fib);
    let rc = fib_lookup(ctx, fib);
    Ok(NextHop::from_fib(
        fib,
        rc,
        ctx.ingress_ifindex() as u32,
        &l3,
        0,
    ))
}

/// What [`send`] does with a packet it cannot forward itself: each a counter whose name
/// says pass (to the kernel) or drop.
pub struct Fallbacks {
    pub vlan: Counter,
    pub mtu: Counter,
    pub no_neigh: Counter,
    pub fib: Counter,
    pub iface: Counter,
}

/// NAT mode: the rewritten packet is the kernel's to forward, signal or fragment.
pub const TO_KERNEL: Fallbacks = Fallbacks {
    vlan: Counter::FwdKernelVlan,
    mtu: Counter::FwdKernelMtu,
    no_neigh: Counter::FwdKernelNoNeigh,
    fib: Counter::FwdKernelFib,
    iface: Counter::FwdKernelIface,
};

/// Tunnel mode: the kernel cannot take the packet (unencapsulated it would route it back to
/// the VIP, encapsulated it would see a source of its own), so it is dropped and counted.
pub const TUNNEL: Fallbacks = Fallbacks {
    vlan: Counter::DropTunnelVlan,
    mtu: Counter::DropTunnelTooBig,
    no_neigh: Counter::DropTunnelNoNeigh,
    fib: Counter::DropTunnelFib,
    iface: Counter::DropTunnelFib,
};

/// Sends an already rewritten packet (`extra` bytes larger once encapsulated) to its next
/// hop, or hands it to `or` (counted).
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    hop: &NextHop,
    or: &Fallbacks,
    extra: u32,
) -> Result<u32, Counter> {
    // The kernel owns the mapping from VLAN devices to tags; let it route tagged frames
    // (the rewrite is done, so it forwards them to the node or the client).
    if pkt.vlans != 0 {
        return Err(or.vlan);
    }
    match hop.rc {
        BPF_FIB_LKUP_RET_SUCCESS if !hop.fits(extra) => return Err(or.mtu),
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // Larger than the path MTU: the kernel fragments it (IPv4 without DF) or answers with
        // ICMP "fragmentation needed" / "packet too big"; a redirect would be dropped silently.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(or.mtu),
        // The kernel resolves the neighbour (ARP/ND) and forwards this packet itself.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(or.no_neigh),
        // Blackhole, unreachable, forwarding disabled, ...: the kernel decides (and signals).
        _ => return Err(or.fib),
    }
    let egress = hop.ifindex;
    // The redirect helper only records the target (the kernel redirects once the program
    // returns XDP_REDIRECT), and fails for an interface not in DEVMAP: so it runs before any
    // header is written, and a failure hands the packet to the kernel with its L2 untouched.
    let redirect = if egress == hop.ingress {
        None
    } else {
        match maps::DEVMAP.redirect(egress, 0) {
            Ok(action) => Some(action),
            Err(_) => return Err(or.iface),
        }
    };
    // Like any router: a packet that would expire goes to the kernel for its ICMP error (a
    // recorded redirect target is ignored when the program returns XDP_PASS).
    if hop.ttl <= 1 {
        return Err(Counter::FwdKernelTtl);
    }
    decrement_ttl(ctx, pkt)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = hop.dmac;
        (*eth).src_addr = hop.smac;
    }
    match redirect {
        None => {
            count(Counter::FwdTx);
            Ok(xdp_action::XDP_TX)
        }
        Some(action) => {
            count(Counter::FwdRedirect);
            Ok(action)
        }
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
