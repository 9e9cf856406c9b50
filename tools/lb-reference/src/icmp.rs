//! ICMP errors about a VIP's flows, NAT mode (docs/datapath.md "ICMP errors and path MTU"):
//! - a node's error to a client about the client's datagram to a VIP: outer source and quoted
//!   destination go back to the VIP and its port ([`unnat`], `reply_icmp_unnat`);
//! - a router's error to a VIP about a node's un-NATed reply: on to the node that last
//!   answered that client flow, outer destination and quoted source to the node's address and
//!   port ([`to_node`], `icmp_to_node`), at most `icmp.rate` a second ([`admit`]).
//!
//! The checksums are refitted from full sums, as `nat.rs` does: each sum over what a checksum
//! covers stays what it was.

use lb_common::{Counter, DpConfig, FlowKey, ReplyDest, Reverse, ReverseKey, FAMILY_V4};

use crate::{
    nat::{fix, refit, sum, Side},
    parse::Packet,
    State, Tables,
};

/// Where an ICMP error's parts are, and the quoted addressing (ports in wire order).
#[derive(Clone, Copy, Debug)]
pub struct Quote {
    icmp: usize,
    ip: usize,
    udp: usize,
    /// The quoted datagram's destination and ports.
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

fn word(f: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

/// The quote, if `pkt` is an ICMP error (IPv4: destination unreachable, time exceeded,
/// parameter problem; ICMPv6: types 1 to 4) about a UDP datagram that the error's destination
/// sent, with the ICMP header, the quoted IP header and the quoted UDP header inside the frame.
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
    if src != pkt.dst || f.len() < udp + 8 {
        return None;
    }
    Some(Quote {
        icmp,
        ip,
        udp,
        dst,
        sport: u16::from_ne_bytes([f[udp], f[udp + 1]]),
        dport: u16::from_ne_bytes([f[udp + 2], f[udp + 3]]),
    })
}

/// The client flow (client → VIP) an error to a VIP is about: the quoted reply reversed.
pub fn client_flow(pkt: &Packet, q: &Quote) -> FlowKey {
    FlowKey {
        src: q.dst,
        dst: pkt.dst,
        sport: q.dport,
        dport: q.sport,
        family: pkt.family,
        _pad: [0; 3],
    }
}

/// The node that last answered the client flow, if it still serves the VIP port the quote
/// came from (`REVERSE`), with its slot as `REVERSE` has it now.
pub fn reply_dest(t: &Tables, state: &State, pkt: &Packet, q: &Quote) -> Option<ReplyDest> {
    let mut dest = *state.reply_dests.get(&client_flow(pkt, q))?;
    let rev = t.reverse.get(&ReverseKey {
        addr: dest.addr,
        port: dest.port,
        family: pkt.family,
        _pad: 0,
    })?;
    if rev.vip != pkt.dst || rev.vip_port != q.sport {
        return None;
    }
    dest.node_slot = rev.node_slot;
    Some(dest)
}

/// GCRA at `icmp.rate` a second, a burst of a tenth of that (at least one), on the coarse
/// clock.
pub fn admit(cfg: &DpConfig, state: &mut State) -> Result<(), Counter> {
    let rate = u64::from(cfg.icmp_rate.max(1));
    let interval = 1_000_000_000 / rate;
    let tolerance = interval * ((rate / 10).max(1) - 1);
    let t = state.icmp_tat.max(state.now_ns);
    if t - state.now_ns > tolerance {
        return Err(Counter::DropIcmpRatelimited);
    }
    state.icmp_tat = t + interval;
    Ok(())
}

/// A node's error to a client, from the VIP: outer source and quoted destination.
pub fn unnat(f: &[u8], pkt: &Packet, q: &Quote, rev: &Reverse) -> Vec<u8> {
    rewrite(f, pkt, q, Side::Src, &rev.vip, rev.vip_port)
}

/// A router's error to a VIP, to the node: outer destination and quoted source.
pub fn to_node(f: &[u8], pkt: &Packet, q: &Quote, dest: &ReplyDest) -> Vec<u8> {
    rewrite(f, pkt, q, Side::Dst, &dest.addr, dest.port)
}

/// The frame with the outer header's `outer` address and the quote's other one set to `addr`,
/// and the quote's port on that side to `port`.
fn rewrite(f: &[u8], pkt: &Packet, q: &Quote, outer: Side, addr: &[u32; 4], port: u16) -> Vec<u8> {
    let mut g = f.to_vec();
    let v4 = pkt.family == FAMILY_V4;
    let alen = if v4 { 4 } else { 16 };
    let bytes: Vec<u8> = addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let (outer_src, inner_src) = if v4 {
        (pkt.l3 + 12, q.ip + 12)
    } else {
        (pkt.l3 + 8, q.ip + 8)
    };
    let (outer_at, inner_at, port_at) = match outer {
        Side::Src => (outer_src, inner_src + alen, q.udp + 2),
        Side::Dst => (outer_src + alen, inner_src, q.udp),
    };
    // What each checksum covers, summed before anything changes. The quoted UDP checksum's
    // pseudo-header and header: only an address and a port change, so the rest of the
    // datagram (often cut from the quote) cancels out.
    let udp_sum =
        |g: &[u8]| (sum(&g[inner_src..inner_src + 2 * alen]) + sum(&g[q.udp..q.udp + 8])) % 0xffff;
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

    g[outer_at..outer_at + alen].copy_from_slice(&bytes[..alen]);
    g[inner_at..inner_at + alen].copy_from_slice(&bytes[..alen]);
    g[port_at..port_at + 2].copy_from_slice(&port.to_ne_bytes());
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
        let c = fix(u32::from(u16::from_be_bytes(udp_check)), old_udp, new);
        let c = if c == 0 { 0xffff } else { c };
        g[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let at = q.icmp + 2;
    let new = icmp_sum(&g);
    let c = fix(
        u32::from(u16::from_be_bytes([g[at], g[at + 1]])),
        old_icmp,
        new,
    );
    g[at..at + 2].copy_from_slice(&c.to_be_bytes());
    g
}
