//! The next hop (FIB), TTL, MACs, and how the frame leaves: XDP_TX, a redirect to another
//! attached interface, or the kernel (docs/datapath.md step 6).

use lb_common::{Counter, FAMILY_V4, NEXTHOP_TTL_NS};

use crate::{
    fib::{Fib, FibRc},
    nat,
    parse::Packet,
    stats::Outcome,
    State, Tables, XDP_REDIRECT, XDP_TX,
};

/// A `NEXTHOP` entry as the reference keeps it.
#[derive(Clone, Copy, Debug)]
pub struct CachedHop {
    pub expires_ns: u64,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u16,
}

#[derive(Clone, Copy, Debug)]
pub struct Hop {
    pub rc: FibRc,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub ingress: u32,
    /// TTL / hop limit as received.
    pub ttl: u8,
    /// The path MTU as cached (node lookups only; 0: unknown, no check) and the packet's
    /// length as the kernel compares it with the MTU: see [`Hop::fits`].
    pub mtu: u16,
    pub len: u16,
}

impl Hop {
    /// Does the packet, `extra` bytes larger (an encapsulation), fit the path MTU?
    pub fn fits(&self, extra: u32) -> bool {
        self.mtu == 0 || u32::from(self.len) + extra <= u32::from(self.mtu)
    }
}

/// The length the kernel compares with the MTU (IPv4 total length; IPv6 payload length plus
/// its header, saturating) and the TTL / hop limit, from the header as received.
fn len_ttl(f: &[u8], pkt: &Packet) -> (u16, u8) {
    let l3 = pkt.l3;
    if pkt.family == FAMILY_V4 {
        (u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]), f[l3 + 8])
    } else {
        let pl = u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]);
        (pl.saturating_add(40), f[l3 + 7])
    }
}

/// Towards a node's address: the route's answer, and whether the packet exceeds the path MTU.
/// Like the datapath, a successful answer is kept per node slot and family for
/// `NEXTHOP_TTL_NS` (`NEXTHOP`, on the one CPU) and used instead of a lookup while fresh, with
/// the path MTU learned when it was filled (a lookup with `tot_len` 0xffff).
pub fn lookup_node(
    fib: &dyn Fib,
    state: &mut State,
    f: &[u8],
    pkt: &Packet,
    (src, dst): (&[u32; 4], &[u32; 4]),
    ingress: u32,
    slot: u32,
) -> Hop {
    let (len, ttl) = len_ttl(f, pkt);
    let idx = slot * 2 + u32::from(pkt.family != FAMILY_V4);
    let mut hop = Hop {
        rc: FibRc::Success,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        ingress,
        ttl,
        mtu: 0,
        len,
    };
    if let Some(c) = state
        .nexthop
        .get(&idx)
        .filter(|c| c.expires_ns > state.now_ns)
    {
        hop.ifindex = c.ifindex;
        hop.smac = c.smac;
        hop.dmac = c.dmac;
        hop.mtu = c.mtu;
        return hop;
    }
    let a = fib.lookup(pkt.family, src, dst, ingress, 0);
    (hop.rc, hop.ifindex, hop.smac, hop.dmac) = (a.rc, a.ifindex, a.smac, a.dmac);
    if a.rc == FibRc::Success {
        let probe = fib.lookup(pkt.family, src, dst, ingress, u16::MAX);
        let mtu = if probe.rc == FibRc::FragNeeded {
            probe.mtu
        } else {
            0
        };
        hop.mtu = mtu;
        state.nexthop.insert(
            idx,
            CachedHop {
                expires_ns: state.now_ns + NEXTHOP_TTL_NS,
                ifindex: a.ifindex,
                smac: a.smac,
                dmac: a.dmac,
                mtu,
            },
        );
    }
    hop
}

/// Any other destination, checked against the MTU by the FIB itself.
pub fn lookup(
    fib: &dyn Fib,
    f: &[u8],
    pkt: &Packet,
    (src, dst): (&[u32; 4], &[u32; 4]),
    ingress: u32,
) -> Hop {
    let (len, ttl) = len_ttl(f, pkt);
    let a = fib.lookup(pkt.family, src, dst, ingress, len);
    Hop {
        rc: a.rc,
        ifindex: a.ifindex,
        smac: a.smac,
        dmac: a.dmac,
        ingress,
        ttl,
        mtu: 0,
        len,
    }
}

/// What [`send`] does with a packet it cannot forward itself: a counter each, whose name
/// says pass (to the kernel) or drop.
pub struct Fallbacks {
    pub vlan: Counter,
    pub mtu: Counter,
    pub no_neigh: Counter,
    pub fib: Counter,
    pub iface: Counter,
}

/// NAT mode: the kernel gets the rewritten packet (docs/datapath.md step 6).
pub const TO_KERNEL: Fallbacks = Fallbacks {
    vlan: Counter::FwdKernelVlan,
    mtu: Counter::FwdKernelMtu,
    no_neigh: Counter::FwdKernelNoNeigh,
    fib: Counter::FwdKernelFib,
    iface: Counter::FwdKernelIface,
};

/// Tunnel mode: every case that hands a NAT packet to the kernel drops a tunnel packet
/// (docs/forwarding.md "Tunnel mode"); an interface cidlb is not on counts as a FIB failure.
pub const TUNNEL: Fallbacks = Fallbacks {
    vlan: Counter::DropTunnelVlan,
    mtu: Counter::DropTunnelTooBig,
    no_neigh: Counter::DropTunnelNoNeigh,
    fib: Counter::DropTunnelFib,
    iface: Counter::DropTunnelFib,
};

/// Sends `out.frame` (rewritten, or to be encapsulated: `extra` bytes larger), or names why
/// it cannot: `or`'s counter. A TTL about to expire goes to the kernel in either mode.
pub fn send(
    t: &Tables,
    pkt: &Packet,
    hop: &Hop,
    or: &Fallbacks,
    extra: u32,
    out: &mut Outcome,
) -> Result<u32, Counter> {
    if pkt.vlans != 0 {
        return Err(or.vlan);
    }
    match hop.rc {
        FibRc::Success if !hop.fits(extra) => return Err(or.mtu),
        FibRc::Success => {}
        FibRc::FragNeeded => return Err(or.mtu),
        FibRc::NoNeigh => return Err(or.no_neigh),
        _ => return Err(or.fib),
    }
    if hop.ifindex != hop.ingress && !t.devmap.contains(&hop.ifindex) {
        return Err(or.iface);
    }
    if hop.ttl <= 1 {
        return Err(Counter::FwdKernelTtl);
    }
    let g = &mut out.frame;
    let l3 = pkt.l3;
    if pkt.family == FAMILY_V4 {
        let old = nat::sum(&g[l3..l3 + 20]);
        g[l3 + 8] -= 1;
        nat::refit(g, l3 + 10, l3..l3 + 20, old);
    } else {
        g[l3 + 7] -= 1;
    }
    g[0..6].copy_from_slice(&hop.dmac);
    g[6..12].copy_from_slice(&hop.smac);
    if hop.ifindex == hop.ingress {
        out.count(Counter::FwdTx);
        Ok(XDP_TX)
    } else {
        out.count(Counter::FwdRedirect);
        Ok(XDP_REDIRECT)
    }
}
