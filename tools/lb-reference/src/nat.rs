//! Address and port rewrites and their checksums.
//!
//! The datapath updates checksums incrementally (RFC 1624), which keeps a wrong checksum
//! exactly as wrong as it was. The reference computes the full ones'-complement sums instead:
//! the sum over the header (IPv4) or the pseudo-header and datagram (UDP), checksum included,
//! is the same before and after the rewrite. A checksum that comes out as zero is written as
//! 0x0000 in the IPv4 header and as 0xffff in UDP (RFC 768: 0 means "no checksum"); an IPv4
//! datagram sent without a UDP checksum (0) keeps none.

use lb_common::{Counter, Node, Reverse, FAMILY_V4};

use crate::{
    flow::has_family,
    parse::{Packet, Udp},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Src,
    Dst,
}

#[derive(Clone, Copy, Debug)]
pub struct Rewrite {
    pub side: Side,
    pub addr: [u32; 4],
    /// Wire order.
    pub port: u16,
}

impl Rewrite {
    pub fn to_node(pkt: &Packet, udp: &Udp, node: &Node) -> Result<Self, Counter> {
        if !has_family(node, pkt.family) {
            return Err(Counter::DropCidNodeFamily);
        }
        Ok(Self {
            side: Side::Dst,
            addr: if pkt.family == FAMILY_V4 {
                [node.addr4, 0, 0, 0]
            } else {
                node.addr6
            },
            port: if node.port != 0 { node.port } else { udp.dport },
        })
    }

    pub fn to_client(rev: &Reverse) -> Self {
        Self {
            side: Side::Src,
            addr: rev.vip,
            port: rev.vip_port,
        }
    }

    /// The destination after the rewrite.
    pub fn dst(&self, pkt: &Packet) -> [u32; 4] {
        match self.side {
            Side::Dst => self.addr,
            Side::Src => pkt.dst,
        }
    }

    /// The frame with the rewrite written and its checksums fixed.
    pub fn apply(&self, f: &[u8], pkt: &Packet, udp: &Udp) -> Vec<u8> {
        let mut g = f.to_vec();
        let v4 = pkt.family == FAMILY_V4;
        let (alen, src_at) = if v4 {
            (4, pkt.l3 + 12)
        } else {
            (16, pkt.l3 + 8)
        };
        let addr_at = match self.side {
            Side::Src => src_at,
            Side::Dst => src_at + alen,
        };
        let port_at = udp.off + if self.side == Side::Src { 0 } else { 2 };
        let mut bytes = Vec::new();
        for w in self.addr {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        // A later fragment (no UDP header, `udp.off` 0): the address, and the IPv4 header.
        if udp.off == 0 {
            g[addr_at..addr_at + alen].copy_from_slice(&bytes[..alen]);
            if v4 {
                let hl = pkt.l3..pkt.l3 + 20;
                let old = sum(&f[hl.clone()]);
                refit(&mut g, pkt.l3 + 10, hl, old);
            }
            return g;
        }
        let check_at = udp.off + 6;
        let old_udp = pseudo_sum(f, pkt, udp);
        g[addr_at..addr_at + alen].copy_from_slice(&bytes[..alen]);
        g[port_at..port_at + 2].copy_from_slice(&self.port.to_ne_bytes());
        if v4 {
            let hl = pkt.l3..pkt.l3 + 20;
            let old = sum(&f[hl.clone()]);
            refit(&mut g, pkt.l3 + 10, hl, old);
            // An IPv4 datagram without a UDP checksum keeps none.
            if f[check_at..check_at + 2] != [0, 0] {
                refit_udp(&mut g, pkt, udp, old_udp);
            }
        } else {
            refit_udp(&mut g, pkt, udp, old_udp);
        }
        g
    }
}

/// Ones'-complement sum of 16-bit big-endian words (odd length padded with a zero), reduced
/// modulo 0xffff (0xffff and 0 are the same number).
pub fn sum(b: &[u8]) -> u32 {
    let mut s: u64 = 0;
    for c in b.chunks(2) {
        s += u64::from(c[0]) << 8 | u64::from(*c.get(1).unwrap_or(&0));
    }
    (s % 0xffff) as u32
}

/// The UDP checksum's coverage (RFC 768 / RFC 8200 §8.1 pseudo-header with the addresses, the
/// protocol and the length field; then the UDP header and what follows in the frame), checksum
/// included. Only addresses and ports change, so bytes beyond the datagram cancel out.
fn pseudo_sum(f: &[u8], pkt: &Packet, udp: &Udp) -> u32 {
    let addrs = if pkt.family == FAMILY_V4 {
        &f[pkt.l3 + 12..pkt.l3 + 20]
    } else {
        &f[pkt.l3 + 8..pkt.l3 + 40]
    };
    let len = udp.len.to_be_bytes();
    (sum(addrs) + sum(&[0, 17]) + sum(&len) + sum(&f[udp.off..])) % 0xffff
}

fn refit_udp(g: &mut [u8], pkt: &Packet, udp: &Udp, old: u32) {
    let at = udp.off + 6;
    let new = pseudo_sum(g, pkt, udp);
    let c = fix(u32::from(u16::from_be_bytes([g[at], g[at + 1]])), old, new);
    let c = if c == 0 { 0xffff } else { c };
    g[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Rewrites the checksum at `at` so the sum over `range` is what it was (`old`).
pub fn refit(g: &mut [u8], at: usize, range: std::ops::Range<usize>, old: u32) {
    let new = sum(&g[range]);
    let c = fix(u32::from(u16::from_be_bytes([g[at], g[at + 1]])), old, new);
    g[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The checksum value `check'` with `sum_new - check + check' == sum_old` (mod 0xffff), as
/// 0..=0xfffe.
pub fn fix(check: u32, old: u32, new: u32) -> u16 {
    let rest_new = (new + 0xffff - check % 0xffff) % 0xffff;
    ((old + 0xffff - rest_new) % 0xffff) as u16
}
