//! ICMP errors about a VIP's flows, in NAT mode (docs/datapath.md "ICMP errors and path MTU"). An
//! error quotes the datagram it is about (its IP header and at least 8 bytes after it); the
//! datagram's addressing is rewritten where cidlb rewrote it, so the error reaches the socket
//! that sent the datagram.
//!
//! - A node's error to a client about the client's datagram to a VIP (port unreachable while
//!   the node's DTLS server restarts, ...): the node received it as client:port → node:port,
//!   the client sent it to VIP:port, and its kernel matches an error to a socket by the quoted
//!   addressing. So the outer source node → VIP and the quoted destination node:port →
//!   VIP:port. Only an error from the node the quote names, through `REVERSE` and the reply
//!   origin check (`reply.rs`).
//! - An error to a VIP about a node's reply, from a router on the way to the client
//!   (fragmentation needed, packet too big, unreachable): the client's side saw the reply as
//!   VIP:port → client:port. The node that last answered that client flow with a reply long
//!   enough to meet a smaller path MTU is in `REPLY_DESTS` (written on the reply path,
//!   `remember`): outer destination VIP → node and quoted source
//!   VIP:port → node:port, so the node's kernel learns the path MTU for its socket. At most
//!   `icmp.rate` a second and CPU; an error about an ICMP message is never forwarded (the quote
//!   must be UDP). A tunnel VIP's replies do not cross the balancer: its errors, and those
//!   about a flow no recent reply explains, go to the kernel as before.
//!
//! Every checksum that covers a rewritten field is updated incrementally (a quote is often cut
//! short, so nothing is summed from scratch): the outer IPv4 header, the quoted IPv4 header,
//! the quoted UDP checksum if not zero, and the ICMP checksum (ICMPv6's covers the outer
//! addresses through its pseudo-header).

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    csum::CsumDelta, limits::gcra, Counter, DpConfig, FlowKey, ReplyDest, Reverse, ReverseKey,
    FAMILY_V4, REPLY_DEST_MIN_V4, REPLY_DEST_MIN_V6,
};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    maps,
    nat::{bytes16, Side},
    parse::{ptr_at, words, Packet, Udp, L4},
};

const IPPROTO_UDP: u8 = 17;
/// The ICMP header before the quote: type, code, checksum, 4 bytes that depend on the type.
const ICMP_HDR: usize = 8;

/// An ICMP error's quoted UDP datagram, which `pkt`'s destination sent.
#[derive(Clone, Copy)]
pub struct Quote {
    /// Offset of the ICMP header.
    icmp: usize,
    /// Offset of the quoted IP header.
    ip: usize,
    /// The quoted UDP header's offset and ports (`len` unused).
    pub udp: Udp,
    /// The quoted datagram's destination.
    pub dst: [u32; 4],
}

impl Quote {
    /// The quoted datagram as a reply to it would be addressed (the `REVERSE` lookup, the
    /// reply origin check and the FIB take a reply's ports).
    #[inline(always)]
    pub fn reply(&self) -> Udp {
        Udp {
            off: self.udp.off,
            sport: self.udp.dport,
            dport: self.udp.sport,
            len: 0,
        }
    }
}

/// The quote of an ICMP error (IPv4: destination unreachable, time exceeded, parameter
/// problem; ICMPv6: types 1 to 4) about a UDP datagram `pkt`'s destination sent, if the packet
/// is one and the quote holds the UDP ports.
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
    // The error goes to the quoted datagram's sender.
    if src != pkt.dst {
        return None;
    }
    let uh: *const UdpHdr = ptr_at(ctx, udp)?;
    // SAFETY: as above.
    let (sport, dport) = unsafe { (u16::from_ne_bytes((*uh).src), u16::from_ne_bytes((*uh).dst)) };
    Some(Quote {
        icmp,
        ip,
        udp: Udp {
            off: udp,
            sport,
            dport,
            len: 0,
        },
        dst,
    })
}

/// Writes the client flow (client → VIP) a reply to `client`:`port` from `vip`:`vip_port`
/// belongs to into this CPU's `REPLY_SCRATCH` key, and returns the scratch.
#[inline(always)]
fn client_flow(
    pkt: &Packet,
    client: &[u32; 4],
    port: u16,
    vip: &[u32; 4],
    vip_port: u16,
) -> Option<*mut maps::ReplyScratch> {
    let s = maps::REPLY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    unsafe {
        (*s).key = FlowKey {
            src: *client,
            dst: *vip,
            sport: port,
            dport: vip_port,
            family: pkt.family,
            _pad: [0; 3],
        };
    }
    Some(s)
}

/// On the reply path (NAT mode): records that the node `pkt` comes from answered the client
/// flow, unless `REPLY_DESTS` already says so (one lookup; a write only when it changes).
/// Only a reply too long for the smallest path of its family can draw a too-big error
/// (`REPLY_DEST_MIN_*`): a shorter one costs a compare. Key and value live in
/// `REPLY_SCRATCH`, not on the stack.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference the helpers read the key and value where they are, in the map"
)]
pub fn remember(ctx: &XdpContext, pkt: &Packet, udp: &Udp, rev: &Reverse) {
    let ip_len = ctx.data_end() - ctx.data() - pkt.l3;
    let min = if pkt.family == FAMILY_V4 {
        REPLY_DEST_MIN_V4
    } else {
        REPLY_DEST_MIN_V6
    };
    if ip_len <= min {
        return;
    }
    let Some(s) = client_flow(pkt, &pkt.dst, udp.dport, &rev.vip, rev.vip_port) else {
        return;
    };
    // SAFETY: `s` is this CPU's scratch slot; `d` an LRU map value under the program's RCU
    // read lock, which a racing writer leaves another node's whole entry or this one.
    unsafe {
        if let Some(d) = maps::REPLY_DESTS.get_ptr(&(*s).key) {
            if (*d).addr == pkt.src && (*d).port == udp.sport {
                return;
            }
        }
        (*s).dest = ReplyDest {
            addr: pkt.src,
            port: udp.sport,
            _pad: 0,
            node_slot: rev.node_slot,
        };
        let _ = maps::REPLY_DESTS.insert(&(*s).key, &(*s).dest, 0);
    }
}

/// The node that last answered the flow an error to a VIP is about (`pkt`'s destination is
/// the quote's source), if `REPLY_DESTS` knows it and the node still serves that VIP port
/// (`REVERSE`: a node removed since, or moved to another slot, is not written to).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference the helper reads the key where it is, in the map"
)]
pub fn reply_dest(pkt: &Packet, q: &Quote) -> Option<ReplyDest> {
    let s = client_flow(pkt, &q.dst, q.udp.dport, &pkt.dst, q.udp.sport)?;
    // SAFETY: this CPU's scratch slot; the entry copied out under the program's RCU read lock.
    let mut dest = unsafe { *maps::REPLY_DESTS.get(&(*s).key)? };
    let serves = ReverseKey {
        addr: dest.addr,
        port: dest.port,
        family: pkt.family,
        _pad: 0,
    };
    // SAFETY: as above.
    let rev = unsafe { *maps::REVERSE.get(serves)? };
    if rev.vip != pkt.dst || rev.vip_port != q.udp.sport {
        return None;
    }
    dest.node_slot = rev.node_slot;
    Some(dest)
}

/// GCRA over this CPU's `ICMP_TAT`: `icmp.rate` errors a second, a tenth of that (at least
/// one) at once.
#[inline(always)]
pub fn admit(cfg: &DpConfig) -> Result<(), Counter> {
    let rate = u64::from(cfg.icmp_rate.max(1));
    let interval = 1_000_000_000 / rate;
    let tolerance = interval * (rate / 10).max(1);
    let tat = maps::ICMP_TAT
        .get_ptr_mut(0)
        .ok_or(Counter::DropIcmpRatelimited)?;
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    unsafe {
        *tat = gcra(*tat, now, interval, tolerance).ok_or(Counter::DropIcmpRatelimited)?;
    }
    Ok(())
}

/// Rewrites one address and port of the error's outer header and the quote: `outer` is the
/// outer side that changes (the quote's other side changes with it), from `from`:`from_port`
/// (in the quote) to `to`:`to_port`, and fixes the checksums.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one rewrite, both directions")]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    q: &Quote,
    outer: Side,
    from: [u32; 4],
    to: [u32; 4],
    from_port: u16,
    to_port: u16,
) -> Result<(), Counter> {
    let uh: *mut UdpHdr = ptr_at(ctx, q.udp.off).ok_or(Counter::PassTruncated)?;
    let hdr: *mut [u8; ICMP_HDR] = ptr_at(ctx, q.icmp).ok_or(Counter::PassTruncated)?;
    // SAFETY: every pointer comes from ptr_at, which checked its bytes lie inside the frame.
    unsafe {
        let udp_check = u16::from_ne_bytes((*uh).check);
        let icmp_check = u16::from_ne_bytes([(*hdr)[2], (*hdr)[3]]);
        let mut icmp_delta = CsumDelta::from_check(icmp_check).replace16(from_port, to_port);
        if pkt.family == FAMILY_V4 {
            let o: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
            let check = CsumDelta::from_check(u16::from_ne_bytes((*o).check))
                .replace32(from[0], to[0])
                .finish();
            (*o).check = check.to_ne_bytes();
            let i: *mut Ipv4Hdr = ptr_at(ctx, q.ip).ok_or(Counter::PassTruncated)?;
            let old = u16::from_ne_bytes((*i).check);
            let new = CsumDelta::from_check(old)
                .replace32(from[0], to[0])
                .finish();
            (*i).check = new.to_ne_bytes();
            let bytes = to[0].to_ne_bytes();
            match outer {
                Side::Src => {
                    (*o).src_addr = bytes;
                    (*i).dst_addr = bytes;
                }
                Side::Dst => {
                    (*o).dst_addr = bytes;
                    (*i).src_addr = bytes;
                }
            }
            icmp_delta = icmp_delta.replace32(from[0], to[0]).replace16(old, new);
            // IPv4 UDP checksum 0: none, and it stays none.
            if udp_check != 0 {
                let new = CsumDelta::from_check(udp_check)
                    .replace32(from[0], to[0])
                    .replace16(from_port, to_port)
                    .finish_udp();
                (*uh).check = new.to_ne_bytes();
                icmp_delta = icmp_delta.replace16(udp_check, new);
            }
        } else {
            let o: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Counter::PassTruncated)?;
            let i: *mut Ipv6Hdr = ptr_at(ctx, q.ip).ok_or(Counter::PassTruncated)?;
            let bytes = bytes16(&to);
            match outer {
                Side::Src => {
                    (*o).src_addr = bytes;
                    (*i).dst_addr = bytes;
                }
                Side::Dst => {
                    (*o).dst_addr = bytes;
                    (*i).src_addr = bytes;
                }
            }
            let new = CsumDelta::from_check(udp_check)
                .replace128(&from, &to)
                .replace16(from_port, to_port)
                .finish_udp();
            (*uh).check = new.to_ne_bytes();
            // The pseudo-header's outer address and the quoted one.
            icmp_delta = icmp_delta
                .replace128(&from, &to)
                .replace128(&from, &to)
                .replace16(udp_check, new);
        }
        match outer {
            Side::Src => (*uh).dst = to_port.to_ne_bytes(),
            Side::Dst => (*uh).src = to_port.to_ne_bytes(),
        }
        let c = icmp_delta.finish().to_ne_bytes();
        (*hdr)[2] = c[0];
        (*hdr)[3] = c[1];
    }
    Ok(())
}
