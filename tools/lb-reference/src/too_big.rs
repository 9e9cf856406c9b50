//! A tunnel VIP's packet too big for the tunnel (docs/forwarding.md "Path MTU in tunnel mode").
//!
//! The tunnel's path MTU is the smaller of `tunnel.mtu` and the next hop's MTU (each 0 when
//! unknown). A packet whose IP length plus the encapsulation exceeds it is not forwarded:
//! - IPv4 without DF: dropped unanswered (`drop_tunnel_too_big`);
//! - a path MTU less the encapsulation below 68 (IPv4) or 1280 (IPv6): likewise;
//! - over the answers' rate limit (the one CPU's GCRA bucket on the coarse clock, a token every
//!   `TOO_BIG_INTERVAL_NS`, bursts of `TOO_BIG_BURST`): dropped (`drop_icmp_too_big_limited`);
//! - else answered with XDP_TX (`icmp_too_big_sent`): the frame becomes Ethernet with the MACs
//!   swapped, then a new IP header from the packet's destination (the VIP) to its source
//!   (IPv4: IHL 5, TOS 0, identification 0, DF, TTL 64, protocol 1; IPv6: traffic class and
//!   flow label 0, hop limit 64, next header 58), an ICMP header (IPv4: type 3 code 4, 16
//!   unused bits, the next-hop MTU; IPv6: type 2 code 0, the 32-bit MTU), MTU = path MTU less
//!   the encapsulation; then the packet from its IP header, as many bytes as the frame holds
//!   after its Ethernet header, no more than the IP length says, 576 (IPv4) or 1280 (IPv6)
//!   bytes for the whole answer, rounded down to a multiple of 4. Checksums over it all from
//!   scratch (ICMPv6: with the RFC 8200 §8.1 pseudo-header).

use lb_common::{
    tunnel::{TOO_BIG_BURST, TOO_BIG_INTERVAL_NS},
    Counter, FAMILY_V4,
};

use crate::{parse::Packet, stats::Outcome, State, XDP_TX};

/// The RFC 1071 checksum of `b` (even length).
fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The answer to the packet in `frame`, `extra` bytes of encapsulation too big for `path_mtu`.
pub fn answer(
    frame: &[u8],
    pkt: &Packet,
    state: &mut State,
    extra: u32,
    path_mtu: u16,
    out: &mut Outcome,
) -> Result<u32, Counter> {
    let l3 = pkt.l3;
    let v4 = pkt.family == FAMILY_V4;
    if v4 && frame[l3 + 6] & 0x40 == 0 {
        return Err(Counter::DropTunnelTooBig);
    }
    let least = if v4 { 68 } else { 1280 };
    let Some(mtu) = u32::from(path_mtu)
        .checked_sub(extra)
        .filter(|m| *m >= least)
    else {
        return Err(Counter::DropTunnelTooBig);
    };
    // The bucket: empty when its time is more than a burst's worth ahead of now.
    let now = state.now_ns;
    let tat = state.too_big_tat.max(now);
    if tat - now > (TOO_BIG_BURST - 1) * TOO_BIG_INTERVAL_NS {
        return Err(Counter::DropIcmpTooBigLimited);
    }
    state.too_big_tat = tat + TOO_BIG_INTERVAL_NS;

    let ip_len = if v4 {
        usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]))
    } else {
        40 + usize::from(u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]))
    };
    let (hdr, max) = if v4 { (28, 576) } else { (48, 1280) };
    let keep = (frame.len() - 14).min(ip_len).min(max - hdr) & !3;
    let quote = &frame[l3..l3 + keep];

    let mut g = Vec::with_capacity(14 + hdr + keep);
    g.extend_from_slice(&frame[6..12]);
    g.extend_from_slice(&frame[0..6]);
    g.extend_from_slice(&frame[12..14]);
    let mut icmp = Vec::new();
    if v4 {
        let (src, dst) = (&frame[l3 + 16..l3 + 20], &frame[l3 + 12..l3 + 16]);
        let total = (hdr + keep) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
        ip.extend_from_slice(src);
        ip.extend_from_slice(dst);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        g.extend_from_slice(&ip);
        icmp.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
        icmp.extend_from_slice(&(mtu as u16).to_be_bytes());
        icmp.extend_from_slice(quote);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
    } else {
        let (src, dst) = (&frame[l3 + 24..l3 + 40], &frame[l3 + 8..l3 + 24]);
        let len = (8 + keep) as u16;
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&len.to_be_bytes());
        ip.extend_from_slice(&[58, 64]);
        ip.extend_from_slice(src);
        ip.extend_from_slice(dst);
        g.extend_from_slice(&ip);
        icmp.extend_from_slice(&[2, 0, 0, 0]);
        icmp.extend_from_slice(&mtu.to_be_bytes());
        icmp.extend_from_slice(quote);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(src);
        pseudo.extend_from_slice(dst);
        pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&icmp);
        let c = checksum(&pseudo);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
    }
    g.extend_from_slice(&icmp);
    out.frame = g;
    out.count(Counter::IcmpTooBigSent);
    Ok(XDP_TX)
}
