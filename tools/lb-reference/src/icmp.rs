//! A node's ICMP error to a client about the client's datagram to a VIP (README, hostile
//! input, `reply_icmp_unnat`). The error quotes the datagram as the node received it (client
//! → node); the client sent it to the VIP, so the error must look as if the VIP sent it: outer
//! source and quoted destination address and port back to the VIP's. The checksums are refitted
//! from full sums, as `nat.rs` does: each sum over what a checksum covers stays what it was.

use lb_common::{Reverse, FAMILY_V4};

use crate::{
    nat::{refit, sum},
    parse::Packet,
};

/// Where an ICMP error's parts are, and the quoted ports (wire order).
#[derive(Clone, Copy, Debug)]
pub struct Quote {
    icmp: usize,
    ip: usize,
    udp: usize,
    /// The quoted destination port: the node's serving port.
    pub node_port: u16,
}

fn word(f: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

/// The quote, if `pkt` is an ICMP error (IPv4: destination unreachable, time exceeded,
/// parameter problem; ICMPv6: types 1 to 4) from its source about a UDP datagram that came to
/// that source from the error's destination, with the ICMP header, the quoted IP header and
/// the quoted UDP header inside the frame.
pub fn quote(f: &[u8], pkt: &Packet) -> Option<Quote> {
    let icmp = pkt.icmp?;
    let ip = icmp + 8;
    if f.len() < ip {
        return None;
    }
    let (udp, src, dst) = if pkt.family == FAMILY_V4 {
        if !matches!(f[icmp], 3 | 11 | 12) || f.len() < ip + 20 {
            return None;
        }
        let ihl = (f[ip] & 0x0f) as usize;
        // IPv4 protocol UDP, and not a later fragment (only the first holds the UDP header).
        let offset = u16::from_be_bytes([f[ip + 6], f[ip + 7]]) & 0x1fff;
        if ihl < 5 || f[ip + 9] != 17 || offset != 0 {
            return None;
        }
        (
            ip + 4 * ihl,
            [word(f, ip + 12), 0, 0, 0],
            [word(f, ip + 16), 0, 0, 0],
        )
    } else {
        if !(1..=4).contains(&f[icmp]) || f.len() < ip + 40 || f[ip + 6] != 17 {
            return None;
        }
        let mut src = [0; 4];
        let mut dst = [0; 4];
        for i in 0..4 {
            src[i] = word(f, ip + 8 + 4 * i);
            dst[i] = word(f, ip + 24 + 4 * i);
        }
        (ip + 40, src, dst)
    };
    if src != pkt.dst || dst != pkt.src || f.len() < udp + 8 {
        return None;
    }
    Some(Quote {
        icmp,
        ip,
        udp,
        node_port: u16::from_ne_bytes([f[udp + 2], f[udp + 3]]),
    })
}

/// The frame with the outer source and the quoted destination set to `rev`'s VIP and port.
pub fn unnat(f: &[u8], pkt: &Packet, q: &Quote, rev: &Reverse) -> Vec<u8> {
    let mut g = f.to_vec();
    let v4 = pkt.family == FAMILY_V4;
    let alen = if v4 { 4 } else { 16 };
    let vip: Vec<u8> = rev.vip.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let (outer_src, inner_dst) = if v4 {
        (pkt.l3 + 12, q.ip + 16)
    } else {
        (pkt.l3 + 8, q.ip + 24)
    };
    // What each checksum covers, summed before anything changes. The quoted UDP checksum's
    // pseudo-header and header: only the addresses and the port change, so the rest of the
    // datagram (often cut from the quote) cancels out.
    let inner_addrs = q.ip + if v4 { 12 } else { 8 }..inner_dst + alen;
    let udp_sum = |g: &[u8]| (sum(&g[inner_addrs.clone()]) + sum(&g[q.udp..q.udp + 8])) % 0xffff;
    // ICMPv6's pseudo-header holds the outer addresses.
    let icmp_sum = |g: &[u8]| {
        let pseudo = if v4 {
            0
        } else {
            sum(&g[pkt.l3 + 8..pkt.l3 + 40])
        };
        (pseudo + sum(&g[q.icmp..])) % 0xffff
    };
    let (old_udp, old_icmp) = (udp_sum(f), icmp_sum(f));
    let udp_check = [f[q.udp + 6], f[q.udp + 7]];

    g[outer_src..outer_src + alen].copy_from_slice(&vip[..alen]);
    g[inner_dst..inner_dst + alen].copy_from_slice(&vip[..alen]);
    g[q.udp + 2..q.udp + 4].copy_from_slice(&rev.vip_port.to_ne_bytes());
    if v4 {
        let outer = pkt.l3..pkt.l3 + 20;
        refit(&mut g, pkt.l3 + 10, outer.clone(), sum(&f[outer]));
        let inner = q.ip..q.ip + 20;
        refit(&mut g, q.ip + 10, inner.clone(), sum(&f[inner]));
    }
    // An IPv4 datagram sent without a UDP checksum keeps none.
    if !v4 || udp_check != [0, 0] {
        let at = q.udp + 6;
        let new = udp_sum(&g);
        let c = crate::nat::fix(u32::from(u16::from_be_bytes(udp_check)), old_udp, new);
        let c = if c == 0 { 0xffff } else { c };
        g[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let at = q.icmp + 2;
    let new = icmp_sum(&g);
    let c = crate::nat::fix(
        u32::from(u16::from_be_bytes([g[at], g[at + 1]])),
        old_icmp,
        new,
    );
    g[at..at + 2].copy_from_slice(&c.to_be_bytes());
    g
}
