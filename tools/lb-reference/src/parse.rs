//! Ethernet, up to two VLAN tags, IPv4 (IHL 5..15) or IPv6, UDP (docs/datapath.md "What the datapath
//! does", step 1).

use lb_common::{Counter, FAMILY_V4, FAMILY_V6};

use crate::{vip, Tables};

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4_MIN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;

/// The UDP header as the datapath records it (ports as wire-order `u16`).
#[derive(Clone, Copy, Debug)]
pub struct Udp {
    pub off: usize,
    pub sport: u16,
    pub dport: u16,
    /// The length field, host order.
    pub len: u16,
}

impl Udp {
    pub fn payload_off(&self) -> usize {
        self.off + UDP_LEN
    }
}

/// [`Packet::frag`]: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// A first fragment (offset 0) of a UDP datagram: its UDP header is there, its length and
/// checksum the whole datagram's.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (offset not zero) of a UDP datagram: no UDP header; once its first is
/// found (`frag.rs`), plus the first's direction.
pub const FRAG_LATER: u8 = 2;

#[derive(Clone, Copy, Debug)]
pub struct Packet {
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`] (+ direction).
    pub frag: u8,
    /// A fragment's identification (IPv4 16 bits, IPv6 Fragment header 32), host order.
    pub frag_id: u32,
    pub family: u8,
    pub vlans: u8,
    pub l3: usize,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub udp: Option<Udp>,
    /// Where the ICMP header starts: IPv4 protocol 1 (not a later fragment) or IPv6 next
    /// header 58.
    pub icmp: Option<usize>,
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn word(f: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

pub fn parse(f: &[u8], t: &Tables) -> Result<Packet, Counter> {
    if f.len() < ETH_LEN {
        return Err(Counter::PassTruncated);
    }
    let mut et = be16(f, 12);
    let mut l3 = ETH_LEN;
    let mut vlans = 0;
    while vlans < 2 && (et == 0x8100 || et == 0x88a8) {
        if f.len() < l3 + VLAN_LEN {
            return Err(Counter::PassTruncated);
        }
        et = be16(f, l3 + 2);
        l3 += VLAN_LEN;
        vlans += 1;
    }
    match et {
        0x0800 => parse_v4(f, t, l3, vlans),
        0x86dd => parse_v6(f, t, l3, vlans),
        _ => Err(Counter::PassNotIp),
    }
}

fn parse_v4(f: &[u8], _t: &Tables, l3: usize, vlans: u8) -> Result<Packet, Counter> {
    if f.len() < l3 + IPV4_MIN {
        return Err(Counter::PassTruncated);
    }
    let ihl = (f[l3] & 0x0f) as usize;
    if ihl < 5 {
        return Err(Counter::DropBadIpHeader);
    }
    let mut pkt = Packet {
        family: FAMILY_V4,
        vlans,
        l3,
        src: [word(f, l3 + 12), 0, 0, 0],
        dst: [word(f, l3 + 16), 0, 0, 0],
        udp: None,
        icmp: None,
        frag: FRAG_NONE,
        frag_id: 0,
    };
    // ICMP, unless a later fragment (offset not zero): those carry no ICMP header.
    if f[l3 + 9] == 1 && be16(f, l3 + 6) & 0x1fff == 0 {
        pkt.icmp = Some(l3 + ihl * 4);
    }
    if f[l3 + 9] != 17 {
        return Ok(pkt);
    }
    // MF or a fragment offset (RFC 791): a fragment. The first carries the UDP header.
    let frags = be16(f, l3 + 6);
    if frags & 0x3fff != 0 {
        pkt.frag_id = u32::from(be16(f, l3 + 4));
        if frags & 0x1fff != 0 {
            pkt.frag = FRAG_LATER;
            return Ok(pkt);
        }
        pkt.frag = FRAG_FIRST;
    }
    pkt.udp = Some(parse_udp(f, l3 + ihl * 4)?);
    Ok(pkt)
}

fn parse_v6(f: &[u8], t: &Tables, l3: usize, vlans: u8) -> Result<Packet, Counter> {
    if f.len() < l3 + IPV6_LEN {
        return Err(Counter::PassTruncated);
    }
    let mut src = [0; 4];
    let mut dst = [0; 4];
    for i in 0..4 {
        src[i] = word(f, l3 + 8 + 4 * i);
        dst[i] = word(f, l3 + 24 + 4 * i);
    }
    let mut pkt = Packet {
        family: FAMILY_V6,
        vlans,
        l3,
        src,
        dst,
        udp: None,
        icmp: None,
        frag: FRAG_NONE,
        frag_id: 0,
    };
    match f[l3 + 6] {
        58 => {
            pkt.icmp = Some(l3 + IPV6_LEN);
            Ok(pkt)
        }
        17 => {
            pkt.udp = Some(parse_udp(f, l3 + IPV6_LEN)?);
            Ok(pkt)
        }
        // A Fragment header (RFC 8200 §4.5) right after the fixed header: followed to UDP.
        44 => {
            let fh = l3 + IPV6_LEN;
            if f.len() < fh + 8 {
                return Err(Counter::PassTruncated);
            }
            if f[fh] != 17 {
                return Err(vip::fragment_verdict(t, &pkt));
            }
            pkt.frag_id = u32::from_be_bytes([f[fh + 4], f[fh + 5], f[fh + 6], f[fh + 7]]);
            // Offset: the top 13 bits of the third and fourth bytes.
            if be16(f, fh + 2) >> 3 != 0 {
                pkt.frag = FRAG_LATER;
                return Ok(pkt);
            }
            pkt.frag = FRAG_FIRST;
            pkt.udp = Some(parse_udp(f, fh + 8)?);
            Ok(pkt)
        }
        // The other extension headers of RFC 8200 §4 and the IANA list: not walked.
        0 | 43 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => Err(vip::ext_header_verdict(t, &pkt)),
        _ => Ok(pkt),
    }
}

fn parse_udp(f: &[u8], off: usize) -> Result<Udp, Counter> {
    if f.len() < off + UDP_LEN {
        return Err(Counter::PassTruncated);
    }
    Ok(Udp {
        off,
        sport: u16::from_ne_bytes([f[off], f[off + 1]]),
        dport: u16::from_ne_bytes([f[off + 2], f[off + 3]]),
        len: be16(f, off + 4),
    })
}

/// A balanced datagram's UDP length: at least the header, at most what the frame holds; a
/// first fragment's is the whole datagram's (only at least the header), a later fragment has
/// none.
pub fn check_udp_length(f: &[u8], udp: &Udp, frag: u8) -> Result<(), Counter> {
    if frag >= FRAG_LATER {
        return Ok(());
    }
    let len = udp.len as usize;
    if len < UDP_LEN || (frag == FRAG_NONE && udp.off + len > f.len()) {
        return Err(Counter::DropBadUdpLength);
    }
    Ok(())
}
