//! An ICMP error a node sends a client about the client's datagram to a VIP (port unreachable
//! while the node's DTLS server restarts, time exceeded, a parameter problem), un-NATed like
//! the node's replies (NAT mode).
//!
//! The error quotes the datagram as the node received it: client:port → node:port. The client
//! sent it to VIP:port, and its kernel matches an error to a socket by the quoted addressing, so
//! the error is rewritten as if the VIP had sent it: outer source node → VIP, quoted destination
//! node:port → VIP:port, and every checksum that covers them (outer IPv4 header, quoted IPv4
//! header, quoted UDP checksum if not zero, ICMP checksum; ICMPv6's covers the outer source
//! through its pseudo-header). Updated incrementally: a quote is often cut short, so nothing is
//! summed from scratch.
//!
//! Only an error whose quote names a node's serving address and port (`REVERSE`) and whose
//! outer source is that node, addressed to the quote's source, passes the same origin check as
//! a reply. Anything else (a node's error about its own outbound traffic, a quote cut before
//! the UDP ports) goes on as before.

use aya_ebpf::programs::XdpContext;
use lb_common::{csum::CsumDelta, Counter, FAMILY_V4};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    nat::{bytes16, Rewrite},
    parse::{ptr_at, words, Packet, Udp, L4},
};

const IPPROTO_UDP: u8 = 17;
/// The ICMP header before the quote: type, code, checksum, 4 bytes that depend on the type.
const ICMP_HDR: usize = 8;

/// An ICMP error's quoted UDP datagram, client → node.
#[derive(Clone, Copy)]
pub struct Quote {
    /// Offset of the ICMP header.
    icmp: usize,
    /// Offset of the quoted IP header.
    ip: usize,
    /// The quoted UDP header, as a node's reply would carry it: source the node's port,
    /// destination the client's (for the `REVERSE` lookup, the origin check and the FIB).
    pub reply: Udp,
}

/// The quote of an ICMP error from `pkt`'s source about a UDP datagram it received from
/// `pkt`'s destination, if the packet is one.
#[inline(always)]
pub fn quote(ctx: &XdpContext, pkt: &Packet) -> Option<Quote> {
    let L4::Icmp(icmp) = pkt.l4 else {
        return None;
    };
    let hdr = ptr_at::<[u8; ICMP_HDR]>(ctx, icmp)?;
    // SAFETY: ptr_at checked the bytes lie inside the frame.
    let ty = unsafe { (*hdr)[0] };
    let ip = icmp + ICMP_HDR;
    let (udp, src, dst) = if pkt.family == FAMILY_V4 {
        // Destination unreachable, time exceeded, parameter problem (RFC 792).
        if !matches!(ty, 3 | 11 | 12) {
            return None;
        }
        let h: *const Ipv4Hdr = ptr_at(ctx, ip)?;
        // SAFETY: as above.
        let (vihl, proto, frags, src, dst) = unsafe {
            (
                (*h).vihl,
                (*h).proto,
                u16::from_be_bytes((*h).frags),
                u32::from_ne_bytes((*h).src_addr),
                u32::from_ne_bytes((*h).dst_addr),
            )
        };
        let ihl = (vihl & 0x0f) as usize;
        // A quoted later fragment holds no UDP header.
        if ihl < 5 || proto != IPPROTO_UDP || frags & 0x1fff != 0 {
            return None;
        }
        (ip + ihl * 4, [src, 0, 0, 0], [dst, 0, 0, 0])
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem
        // (RFC 4443 §2.1).
        if !matches!(ty, 1..=4) {
            return None;
        }
        let h: *const Ipv6Hdr = ptr_at(ctx, ip)?;
        // SAFETY: as above.
        let (next, src, dst) =
            unsafe { ((*h).next_hdr, words(&(*h).src_addr), words(&(*h).dst_addr)) };
        if next != IPPROTO_UDP {
            return None;
        }
        (ip + Ipv6Hdr::LEN, src, dst)
    };
    // The quoted datagram came from the client the error goes to, to the node sending it.
    if src != pkt.dst || dst != pkt.src {
        return None;
    }
    let uh: *const UdpHdr = ptr_at(ctx, udp)?;
    // SAFETY: as above.
    let (client_port, node_port) =
        unsafe { (u16::from_ne_bytes((*uh).src), u16::from_ne_bytes((*uh).dst)) };
    Some(Quote {
        icmp,
        ip,
        reply: Udp {
            off: udp,
            sport: node_port,
            dport: client_port,
            len: 0,
        },
    })
}

/// Writes `rw` (the node's address and port → the VIP's) into the outer source and the quoted
/// destination, and fixes the checksums.
#[inline(always)]
pub fn unnat(ctx: &XdpContext, pkt: &Packet, q: &Quote, rw: &Rewrite) -> Result<(), Counter> {
    let (node, vip) = (pkt.src, rw.addr);
    let (node_port, vip_port) = (q.reply.sport, rw.port);
    let uh: *mut UdpHdr = ptr_at(ctx, q.reply.off).ok_or(Counter::PassTruncated)?;
    let hdr: *mut [u8; ICMP_HDR] = ptr_at(ctx, q.icmp).ok_or(Counter::PassTruncated)?;
    // SAFETY: every pointer comes from ptr_at, which checked its bytes lie inside the frame.
    unsafe {
        let udp_check = u16::from_ne_bytes((*uh).check);
        let icmp_check = u16::from_ne_bytes([(*hdr)[2], (*hdr)[3]]);
        let mut icmp_delta = CsumDelta::from_check(icmp_check).replace16(node_port, vip_port);
        if pkt.family == FAMILY_V4 {
            let outer: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
            let check = CsumDelta::from_check(u16::from_ne_bytes((*outer).check))
                .replace32(node[0], vip[0])
                .finish();
            (*outer).check = check.to_ne_bytes();
            (*outer).src_addr = vip[0].to_ne_bytes();

            let inner: *mut Ipv4Hdr = ptr_at(ctx, q.ip).ok_or(Counter::PassTruncated)?;
            let old = u16::from_ne_bytes((*inner).check);
            let new = CsumDelta::from_check(old)
                .replace32(node[0], vip[0])
                .finish();
            (*inner).check = new.to_ne_bytes();
            (*inner).dst_addr = vip[0].to_ne_bytes();
            icmp_delta = icmp_delta.replace32(node[0], vip[0]).replace16(old, new);
            // IPv4 UDP checksum 0: none, and it stays none.
            if udp_check != 0 {
                let new = CsumDelta::from_check(udp_check)
                    .replace32(node[0], vip[0])
                    .replace16(node_port, vip_port)
                    .finish_udp();
                (*uh).check = new.to_ne_bytes();
                icmp_delta = icmp_delta.replace16(udp_check, new);
            }
        } else {
            let outer: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
            (*outer).src_addr = bytes16(&vip);
            let inner: *mut Ipv6Hdr = ptr_at(ctx, q.ip).ok_or(Counter::PassTruncated)?;
            (*inner).dst_addr = bytes16(&vip);
            let new = CsumDelta::from_check(udp_check)
                .replace128(&node, &vip)
                .replace16(node_port, vip_port)
                .finish_udp();
            (*uh).check = new.to_ne_bytes();
            // The pseudo-header's source and the quoted destination.
            icmp_delta = icmp_delta
                .replace128(&node, &vip)
                .replace128(&node, &vip)
                .replace16(udp_check, new);
        }
        (*uh).dst = vip_port.to_ne_bytes();
        let c = icmp_delta.finish().to_ne_bytes();
        (*hdr)[2] = c[0];
        (*hdr)[3] = c[1];
    }
    Ok(())
}
