//! Tunnel mode (direct server return, `lb_common::tunnel`): a tunnel VIP's packet keeps its
//! addresses and ports, and goes to its node inside an outer header; the node answers the
//! client directly, from the VIP.
//!
//! In `balance` (`main.rs`): the node is chosen as for a NAT VIP; the next hop is looked up
//! towards the node's address (outer source: the configured one, before the flow's bits), and
//! `forward::send` forwards the packet as it is (TTL decremented, MACs of the next hop), with
//! the tunnel's fallbacks (`forward::TUNNEL`: dropped and counted, never handed to the
//! kernel). Then, in [`encap`], run after `balance` (see `main.rs`), the outer header goes in
//! front:
//! ```text
//!  ipip, IPv4:  Ethernet | IPv4 (proto 4, DF and TOS of the inner) | client's IPv4 packet
//!  ipip, IPv6:  Ethernet | IPv6 (next header 41, traffic class of the inner) | client's IPv6 packet
//!  gue:         Ethernet | outer IP (proto 17) | UDP (flow's source port, gue_port) | inner
//! ```
//! Outer TTL / hop limit 64; IPv4 with DF (and identification 0), the inner TOS; IPv6 with
//! the inner traffic class and the flow's hash as its flow label (so the underlay's ECMP
//! keeps a flow on one path). The GUE UDP checksum is 0 over IPv4 (none, RFC 768), and computed
//! over IPv6 (RFC 8200 §8.1) without reading the payload: the inner UDP checksum already sums
//! it (see [`inner_sum6`]).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    csum::fold,
    tunnel::{
        gue_source_port, overhead as encap_overhead, tuple_hash, Tunnel, ENCAP_GUE, ENCAP_NONE,
        IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP,
    },
    Counter, Node, FAMILY_V4, FAMILY_V6,
};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    flow::node_serves,
    maps,
    nat::Addressing,
    parse::{ptr_at, Packet, Udp},
    stats::count,
};

/// The VIP's tunnel, if it is in tunnel mode.
#[inline(always)]
pub fn of_vip(vip: u32) -> Option<&'static Tunnel> {
    maps::VIP_TUNNEL.get(vip).filter(|t| t.encap != ENCAP_NONE)
}

/// Bytes the encapsulation adds to this packet.
#[inline(always)]
pub fn overhead(t: &Tunnel, pkt: &Packet) -> u32 {
    encap_overhead(t.encap, pkt.family == FAMILY_V6) as u32
}

/// The outer header's addressing for the next-hop lookup: the configured source (its host
/// bits are the flow's only in the packet), the node's address.
#[inline(always)]
pub fn addressing(pkt: &Packet, udp: &Udp, node: &Node, t: &Tunnel) -> Result<Addressing, Counter> {
    if !node_serves(node, pkt) {
        return Err(Counter::DropCidNodeFamily);
    }
    let (src, dst) = if pkt.family == FAMILY_V4 {
        ([t.src4, 0, 0, 0], [node.addr4, 0, 0, 0])
    } else {
        (t.src6, node.addr6)
    };
    Ok(Addressing {
        src,
        dst,
        sport: udp.sport,
        dport: udp.dport,
    })
}

/// A fragment can be encapsulated unless in GUE over IPv6: its outer UDP checksum is derived
/// from the inner datagram's (see [`inner_sum6`]), which covers bytes a fragment lacks.
#[inline(always)]
pub fn check_fragment(pkt: &Packet, udp: &Udp, first: bool, t: &Tunnel) -> Result<(), Counter> {
    if t.encap == ENCAP_GUE && pkt.family == FAMILY_V6 && (udp.off == 0 || first) {
        return Err(Counter::DropFragGue6);
    }
    Ok(())
}

/// Puts the outer header in front of a packet `balance` has forwarded to node `node_id` of
/// the VIP at `vip`, whose UDP header is at `l4`, or, for a later fragment (`l4` 0, no UDP
/// header), whose first fragment's UDP ports `frag::route` kept (the frame is untagged:
/// `forward::send` drops tagged ones in tunnel mode). An error drops the packet (counted); it
/// happens only when the node or the VIP's tunnel changed in between, or the packet has no
/// room in front.
#[inline(always)]
pub fn encap(ctx: &XdpContext, vip: u32, node_id: u32, l4: u32) -> Result<(), Counter> {
    let t = maps::VIP_TUNNEL.get(vip).ok_or(Counter::DropTunnelFib)?;
    let node = maps::node(node_id).ok_or(Counter::DropTunnelFib)?;
    let v6 = {
        let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let ether_type = unsafe { (*eth).ether_type };
        ether_type == EtherType::Ipv6 as u16
    };
    let [sport, dport, udp_len] = if l4 == 0 {
        // A later fragment: its length is only needed for GUE over IPv6, which takes none.
        let [sport, dport] = crate::frag::first_ports();
        [sport, dport, 0]
    } else {
        let p: *const [u16; 3] = ptr_at(ctx, l4 as usize & 0xff).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p }
    };
    // The inner packet's addresses and own length (a frame may carry Ethernet padding after
    // it), and what the outer header copies from it.
    let (src, dst, inner_len, tos, sum6) = if v6 {
        let ip: *const [u8; 40] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let w = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
        (
            [w(8), w(12), w(16), w(20)],
            [w(24), w(28), w(32), w(36)],
            40 + u16::from_be_bytes([ip[4], ip[5]]) as usize,
            (ip[0] << 4) | (ip[1] >> 4),
            inner_sum6(ip, u16::from_be(udp_len)),
        )
    } else {
        let ip: *const [u8; 20] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let w = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
        (
            [w(12), 0, 0, 0],
            [w(16), 0, 0, 0],
            u16::from_be_bytes([ip[2], ip[3]]) as usize,
            ip[1],
            0,
        )
    };
    let h = tuple_hash(&src, &dst, sport, dport);
    let over = encap_overhead(t.encap, v6);
    // SAFETY: the helper moves the packet's start; every pointer is taken again after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(over as i32)) } != 0 {
        return Err(Counter::DropTunnelTooBig);
    }
    // The Ethernet header `send` wrote now starts `over` bytes in: its MACs move to the front.
    let old: *const [u8; 14] = ptr_at(ctx, over).ok_or(Counter::PassTruncated)?;
    let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at; the two ranges do not overlap (over ≥ 20).
    unsafe { *eth = *old };
    let gue = t.encap == ENCAP_GUE;
    let udp_len = 8 + inner_len;
    if v6 {
        let src = t.source6(h);
        let ip: *mut [u8; 40] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let label = h & 0x000f_ffff;
        ip[0] = 0x60 | (tos >> 4);
        ip[1] = (tos << 4) | (label >> 16) as u8;
        ip[2] = (label >> 8) as u8;
        ip[3] = label as u8;
        let payload = if gue { udp_len } else { inner_len };
        ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        ip[6] = if gue { IPPROTO_UDP } else { IPPROTO_IPV6 };
        ip[7] = 64;
        let w = |x: u32| x.to_ne_bytes();
        ip[8..12].copy_from_slice(&w(src[0]));
        ip[12..16].copy_from_slice(&w(src[1]));
        ip[16..20].copy_from_slice(&w(src[2]));
        ip[20..24].copy_from_slice(&w(src[3]));
        ip[24..28].copy_from_slice(&w(node.addr6[0]));
        ip[28..32].copy_from_slice(&w(node.addr6[1]));
        ip[32..36].copy_from_slice(&w(node.addr6[2]));
        ip[36..40].copy_from_slice(&w(node.addr6[3]));
        if gue {
            let sport = gue_source_port(h).to_be();
            let pseudo = sum_words(&src)
                + sum_words(&node.addr6)
                + u64::from((udp_len as u16).to_be())
                + u64::from((IPPROTO_UDP as u16).to_be());
            let check = !fold(
                pseudo
                    + u64::from(sport)
                    + u64::from(t.gue_port)
                    + u64::from((udp_len as u16).to_be())
                    + sum6,
            );
            let check = if check == 0 { 0xffff } else { check };
            put_udp(ctx, EthHdr::LEN + 40, sport, t.gue_port, udp_len, check)?;
        }
    } else {
        let src = t.source4(h);
        let ip: *mut [u8; 20] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let total = if gue { 20 + udp_len } else { 20 + inner_len };
        // DF, so identification 0 (RFC 6864: an atomic datagram): a tunnel packet is never
        // fragmented on the way (one too big for the next hop is dropped here).
        *ip = [
            0x45,
            tos,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            if gue { IPPROTO_UDP } else { IPPROTO_IPIP },
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        ip[12..16].copy_from_slice(&src.to_ne_bytes());
        ip[16..20].copy_from_slice(&node.addr4.to_ne_bytes());
        // The header checksum from the values written, not read back (16-bit words as on the
        // wire, the addresses as two words each).
        let sum = u64::from(u16::from_ne_bytes([0x45, tos]))
            + u64::from((total as u16).to_be())
            + u64::from(u16::from_ne_bytes([0x40, 0]))
            + u64::from(u16::from_ne_bytes([64, ip[9]]))
            + u64::from(src)
            + u64::from(node.addr4);
        ip[10..12].copy_from_slice(&(!fold(sum)).to_ne_bytes());
        if gue {
            put_udp(
                ctx,
                EthHdr::LEN + 20,
                gue_source_port(h).to_be(),
                t.gue_port,
                udp_len,
                0,
            )?;
        }
    }
    count(if gue {
        Counter::TunnelEncapGue
    } else {
        Counter::TunnelEncapIpip
    });
    Ok(())
}

/// The one's complement sum of an inner IPv6 packet (header and UDP datagram), from its header
/// and its UDP checksum alone: a valid UDP checksum makes the datagram's sum the complement of
/// its pseudo-header's. (A wrong inner checksum makes the outer one wrong alike: the node drops
/// the packet, as it would have dropped the inner one.)
#[inline(always)]
fn inner_sum6(ip: &[u8; 40], udp_len: u16) -> u64 {
    let mut header = 0u64;
    let mut i = 0;
    while i < 40 {
        header += u64::from(u16::from_ne_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    let mut pseudo = u64::from(udp_len.to_be()) + u64::from((IPPROTO_UDP as u16).to_be());
    i = 8;
    while i < 40 {
        pseudo += u64::from(u16::from_ne_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    header + u64::from(!fold(pseudo))
}

#[inline(always)]
fn sum_words(a: &[u32; 4]) -> u64 {
    a.iter().map(|w| u64::from(*w)).sum()
}

/// Writes the outer UDP header at packet offset `off` (ports and checksum in wire order).
#[inline(always)]
fn put_udp(
    ctx: &XdpContext,
    off: usize,
    sport: u16,
    dport: u16,
    len: usize,
    check: u16,
) -> Result<(), Counter> {
    let u: *mut [u16; 4] = ptr_at(ctx, off).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *u = [sport, dport, (len as u16).to_be(), check] };
    Ok(())
}
