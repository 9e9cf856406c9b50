//! Header walk: Ethernet (+ up to two VLAN tags), IPv4 with any IHL or IPv6, then UDP.
//!
//! Offsets are relative to the start of the frame. Every read goes through [`ptr_at`], whose
//! single bounds check covers all bytes of the type read, as the verifier requires.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{Counter, FAMILY_V4, FAMILY_V6};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 Fragment header (RFC 8200 §4.5).
const IPV6_FRAGMENT: u8 = 44;
/// Bytes of the IPv6 Fragment header: next header, reserved, offset and flags, identification.
pub const IPV6_FRAGMENT_LEN: usize = 8;

/// [`Packet::frag`]: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// [`Packet::frag`]: the first fragment of a UDP datagram (offset 0, more to come): its UDP
/// header is there, its UDP length and checksum are the whole datagram's.
pub const FRAG_FIRST: u8 = 1;
/// [`Packet::frag`]: a later fragment (offset not zero) of a UDP datagram: no UDP header. Its
/// first's direction (`lb_common::frag::FRAG_TO_VIP`, `FRAG_FROM_NODE`) is added once
/// `frag::first` has found it: [`FRAG_LATER_TO_VIP`], or `FRAG_LATER + FRAG_FROM_NODE`.
pub const FRAG_LATER: u8 = 2;
/// A later fragment whose first went to a VIP's node.
pub const FRAG_LATER_TO_VIP: u8 = FRAG_LATER + lb_common::frag::FRAG_TO_VIP;

/// A pointer to `T` at `off` bytes into the frame, if all of `T` lies inside the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// What follows the IP header.
#[derive(Clone, Copy)]
pub enum L4 {
    Udp(Udp),
    /// ICMP (IPv4, not a later fragment) or ICMPv6 right after the IPv6 header: the offset of
    /// its header (not checked against the frame yet).
    Icmp(usize),
    Other,
}

/// The UDP header's fields, as wire bytes.
#[derive(Clone, Copy)]
pub struct Udp {
    /// Offset of the UDP header.
    pub off: usize,
    pub sport: u16,
    pub dport: u16,
    /// UDP length field, host order.
    pub len: u16,
}

impl Udp {
    /// Offset of the UDP payload (the DTLS record).
    #[inline(always)]
    pub fn payload_off(&self) -> usize {
        self.off + UdpHdr::LEN
    }

    /// Bytes of UDP payload according to the UDP length field (none if it says less than a
    /// header: only balanced packets have their length checked, a node's reply does not).
    #[inline(always)]
    pub fn payload_len(&self) -> usize {
        (self.len as usize).saturating_sub(UdpHdr::LEN)
    }

    /// Balanced packets must carry a sane UDP length: at least the header, and no more than the
    /// frame holds (Ethernet padding may make the frame longer, never shorter); a first
    /// fragment's covers the whole datagram, so there only the lower bound is checked.
    #[inline(always)]
    pub fn check_length(&self, ctx: &XdpContext, frag: u8) -> Result<(), Counter> {
        // A later fragment has no UDP header (its first's was checked).
        if frag >= FRAG_LATER {
            return Ok(());
        }
        let frame = ctx.data_end() - ctx.data();
        if (self.len as usize) < UdpHdr::LEN
            || (self.off + self.len as usize > frame && frag == FRAG_NONE)
        {
            return Err(Counter::DropBadUdpLength);
        }
        Ok(())
    }
}

/// The parsed headers of one frame.
#[derive(Clone, Copy)]
pub struct Packet {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Number of VLAN tags (0..=2).
    pub vlans: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`] (UDP only; `frag.rs`, which reads the
    /// identification from the packet again: kept here it would cost stack on every path).
    pub frag: u8,
    /// Source and destination address (IPv4 in word 0), wire bytes.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub l4: L4,
}

impl Packet {
    /// Frame length in bytes, for the per-node byte counters.
    #[inline(always)]
    pub fn frame_len(ctx: &XdpContext) -> u64 {
        (ctx.data_end() - ctx.data()) as u64
    }
}

/// Walks Ethernet, VLAN, IP and UDP headers. Errors are counters that end the packet's
/// processing: passes for traffic that is not ours, drops for what must not reach a node.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Counter> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    let mut vlans = 0u8;
    // 802.1ad outer tag, 802.1Q inner tag (or a single 802.1Q tag). Unrolled: two at most.
    if is_vlan(ether_type) {
        let tag: *const VlanHdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
        ether_type = unsafe { (*tag).ether_type };
        l3 += VlanHdr::LEN;
        vlans += 1;
        if is_vlan(ether_type) {
            let tag: *const VlanHdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
            ether_type = unsafe { (*tag).ether_type };
            l3 += VlanHdr::LEN;
            vlans += 1;
        }
    }

    if ether_type == EtherType::Ipv4 as u16 {
        parse_v4(ctx, l3, vlans)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_v6(ctx, l3, vlans)
    } else {
        Err(Counter::PassNotIp)
    }
}

#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == EtherType::Ieee8021q as u16 || ether_type == EtherType::Ieee8021ad as u16
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize, vlans: u8) -> Result<Packet, Counter> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
    let (vihl, proto, frags, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            u16::from_be_bytes((*ip).frags),
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    // IHL counts 32-bit words, 5..=15: options are skipped, never assumed absent.
    let ihl = (vihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(Counter::DropBadIpHeader);
    }
    let mut pkt = Packet {
        family: FAMILY_V4,
        vlans,
        l3,
        frag: FRAG_NONE,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        l4: L4::Other,
    };
    if proto == IPPROTO_ICMP && frags & 0x1fff == 0 {
        pkt.l4 = L4::Icmp(l3 + ihl * 4);
    }
    if proto != IPPROTO_UDP {
        return Ok(pkt);
    }
    // MF set or a non-zero offset: a fragment (RFC 791). Only the first (offset 0) carries the
    // UDP header; the later ones follow it (`frag.rs`).
    if frags & 0x3fff != 0 {
        if frags & 0x1fff != 0 {
            pkt.frag = FRAG_LATER;
            return Ok(pkt);
        }
        pkt.frag = FRAG_FIRST;
    }
    pkt.l4 = parse_udp(ctx, l3 + ihl * 4)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize, vlans: u8) -> Result<Packet, Counter> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
    let (next, src, dst) = unsafe {
        (
            (*ip).next_hdr,
            words(&(*ip).src_addr),
            words(&(*ip).dst_addr),
        )
    };
    let mut pkt = Packet {
        family: FAMILY_V6,
        vlans,
        l3,
        frag: FRAG_NONE,
        src,
        dst,
        l4: L4::Other,
    };
    match next {
        IPPROTO_UDP => {
            pkt.l4 = parse_udp(ctx, l3 + Ipv6Hdr::LEN)?;
            Ok(pkt)
        }
        IPPROTO_ICMPV6 => {
            pkt.l4 = L4::Icmp(l3 + Ipv6Hdr::LEN);
            Ok(pkt)
        }
        // A Fragment header right after the fixed header, UDP after it: the first fragment is
        // parsed on (offset 0; an atomic fragment, RFC 6946, too), a later one follows its
        // first (`frag.rs`). Anything but UDP after it cannot be balanced or un-NATed.
        IPV6_FRAGMENT => {
            let fh: *const [u8; IPV6_FRAGMENT_LEN] =
                ptr_at(ctx, l3 + Ipv6Hdr::LEN).ok_or(Counter::PassTruncated)?;
            // SAFETY: ptr_at checked the bytes lie inside the frame.
            let fh = unsafe { *fh };
            if fh[0] != IPPROTO_UDP {
                return Err(crate::vip::fragment_verdict(&pkt));
            }
            // The offset's 13 bits above the reserved bits and M.
            if u16::from_be_bytes([fh[2], fh[3]]) & 0xfff8 != 0 {
                pkt.frag = FRAG_LATER;
                return Ok(pkt);
            }
            pkt.frag = FRAG_FIRST;
            pkt.l4 = parse_udp(ctx, l3 + Ipv6Hdr::LEN + IPV6_FRAGMENT_LEN)?;
            Ok(pkt)
        }
        // Hop-by-hop, routing, destination options, AH, mobility, HIP, shim6, experimental:
        // the UDP header sits behind them; not walked here (RFC 8200 §4), and neither is a
        // Fragment header behind them.
        // From a node's address such a packet is dropped (it cannot be un-NATed), and so is one
        // to a VIP (the kernel would route it back upstream: a loop).
        0 | 43 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => Err(crate::vip::ext_header_verdict(&pkt)),
        _ => Ok(pkt),
    }
}

#[inline(always)]
fn parse_udp(ctx: &XdpContext, off: usize) -> Result<L4, Counter> {
    let udp: *const UdpHdr = ptr_at(ctx, off).ok_or(Counter::PassTruncated)?;
    Ok(unsafe {
        L4::Udp(Udp {
            off,
            sport: u16::from_ne_bytes((*udp).src),
            dport: u16::from_ne_bytes((*udp).dst),
            len: u16::from_be_bytes((*udp).len),
        })
    })
}

/// An address's wire bytes as four u32 words.
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
