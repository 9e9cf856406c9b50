//! Path MTU in tunnel mode: a client's packet that does not fit the tunnel once encapsulated
//! is answered, from the VIP, with the ICMP error that tells the client the MTU that fits,
//! sent back the way the packet came (XDP_TX).
//!
//! The tunnel's path MTU is the smaller of `tunnel.mtu` (the underlay's MTU to the nodes, for
//! a smaller link several hops away, which no lookup here can see) and the FIB's MTU towards
//! the node's next hop (route `mtu` or device MTU, `forward::lookup_node`), see
//! `lb_common::tunnel::path_mtu`. `main.rs` runs [`answer`] after `balance` when
//! `forward::send` found the encapsulated packet too big, so it takes no stack of its own
//! from the hot path. The frame is untagged (`send` drops tagged tunnel frames first), its IP
//! header at 14. In place, the frame becomes:
//! ```text
//!  IPv4: Ethernet (MACs swapped) | IPv4, VIP → client, proto 1, TTL 64, DF, id 0
//!        | ICMP type 3 code 4 (RFC 1191: next-hop MTU = path MTU − encapsulation)
//!        | the client's packet from its IP header, cut to 576 bytes in all (RFC 1812 §4.3.2.3)
//!  IPv6: Ethernet (MACs swapped) | IPv6, VIP → client, next header 58, hop limit 64
//!        | ICMPv6 type 2 code 0 (RFC 4443 §3.2: MTU = path MTU − encapsulation)
//!        | the client's packet, cut to 1280 bytes in all (RFC 4443 §2.4 (c))
//! ```
//! The quote is cut to a multiple of 4 bytes as well (the checksum sums 32-bit words), and
//! never runs past the frame. The client's kernel matches the error to its socket by the
//! quoted addresses and ports (client → VIP), whatever router sent it; sent from the VIP it
//! also passes filters that expect answers from the VIP.
//!
//! Not answered (the packet is dropped, `drop_tunnel_too_big`): IPv4 without DF, whose sender
//! does no path MTU discovery and lets routers fragment (RFC 791), which XDP cannot do (one
//! frame in, one out; the kernel cannot take it either, see `forward::TUNNEL`); and a path MTU
//! that leaves less than 68 (IPv4) or 1280 (IPv6) bytes for the client's packet. Answers are
//! rate-limited per CPU (`TOO_BIG_BUCKET`, `drop_icmp_too_big_limited`).

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    csum::fold,
    tunnel::{inner_mtu, too_big_admit, ICMP4_MAX, ICMP6_MAX},
    Counter,
};
use network_types::eth::{EthHdr, EtherType};

use crate::{maps, parse::ptr_at, stats::count};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 + ICMP headers, IPv6 + ICMPv6 headers: what goes in front of the quote.
const HDR4: usize = 20 + 8;
const HDR6: usize = 40 + 8;
/// Quote words at most.
const WORDS4: usize = (ICMP4_MAX - HDR4) / 4;
const WORDS6: usize = (ICMP6_MAX - HDR6) / 4;

/// Turns the frame into the answer to a packet `over` bytes of encapsulation too big for the
/// tunnel's path MTU `path_mtu`. `Ok`: send it (XDP_TX); `Err`: the counter that ends it.
#[inline(always)]
pub fn answer(ctx: &XdpContext, over: u32, path_mtu: u32) -> Result<(), Counter> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let v6 = unsafe { (*eth).ether_type } == EtherType::Ipv6 as u16;
    let frame = ctx.data_end() - ctx.data();
    let (mtu, quote, hdr) = if v6 {
        let ip: *const [u8; 40] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::DropTunnelTooBig)?;
        // SAFETY: bounds checked by ptr_at.
        let len = 40 + u16::from_be_bytes(unsafe { [(*ip)[4], (*ip)[5]] }) as usize;
        let mtu =
            inner_mtu(path_mtu as u16, over as usize, true).ok_or(Counter::DropTunnelTooBig)?;
        (mtu, quote_len(len, frame, ICMP6_MAX - HDR6), HDR6)
    } else {
        let ip: *const [u8; 20] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::DropTunnelTooBig)?;
        // SAFETY: bounds checked by ptr_at.
        let (len, flags) = unsafe { (u16::from_be_bytes([(*ip)[2], (*ip)[3]]), (*ip)[6]) };
        if flags & 0x40 == 0 {
            return Err(Counter::DropTunnelTooBig);
        }
        let mtu =
            inner_mtu(path_mtu as u16, over as usize, false).ok_or(Counter::DropTunnelTooBig)?;
        (mtu, quote_len(len as usize, frame, ICMP4_MAX - HDR4), HDR4)
    };
    admit()?;
    // Room for the new headers in front, then the frame cut after the quote. The Ethernet
    // header stays where it was, `hdr` bytes in, until it is copied to the front.
    // SAFETY: the helpers move the packet's ends; every pointer is taken again after them.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr as i32)) } != 0 {
        return Err(Counter::DropTunnelTooBig);
    }
    let cut = (frame + hdr) as i32 - (EthHdr::LEN + hdr + quote) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0 {
        return Err(Counter::DropTunnelTooBig);
    }
    let old: *const [u8; 14] = ptr_at(ctx, hdr).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe { *old };
    let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &mut *eth };
    // Back to whom it came from, from whom it went to.
    eth[0..6].copy_from_slice(&old[6..12]);
    eth[6..12].copy_from_slice(&old[0..6]);
    eth[12..14].copy_from_slice(&old[12..14]);
    if v6 {
        answer6(ctx, mtu, quote)?;
    } else {
        answer4(ctx, mtu, quote)?;
    }
    count(Counter::IcmpTooBigSent);
    Ok(())
}

/// Bytes of the client's packet (its IP length `len`, in a frame of `frame` bytes) quoted.
#[inline(always)]
fn quote_len(len: usize, frame: usize, max: usize) -> usize {
    let mut q = frame - EthHdr::LEN;
    if len < q {
        q = len;
    }
    if max < q {
        q = max;
    }
    q & !3
}

/// The rate limit: `Err` when this CPU's bucket is empty.
#[inline(always)]
fn admit() -> Result<(), Counter> {
    let b = maps::TOO_BIG_BUCKET
        .get_ptr_mut(0)
        .ok_or(Counter::DropIcmpTooBigLimited)?;
    // SAFETY: the helper takes no arguments; the slot is this CPU's.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        *b = too_big_admit(*b, now).ok_or(Counter::DropIcmpTooBigLimited)?;
    }
    Ok(())
}

/// The sum of `quote` bytes (a multiple of 4, at most `words` words) at `off`, 32-bit words
/// as loaded (RFC 1071 §2 C: the same as 16-bit words, `off` being even past the ICMP header).
#[inline(always)]
fn sum_quote(ctx: &XdpContext, off: usize, quote: usize, words: usize) -> Result<u64, Counter> {
    let mut sum = 0u64;
    let mut i = 0usize;
    while i < words {
        if i * 4 >= quote {
            break;
        }
        let w: *const u32 = ptr_at(ctx, off + i * 4).ok_or(Counter::DropTunnelTooBig)?;
        // SAFETY: bounds checked by ptr_at.
        sum += u64::from(unsafe { w.read_unaligned() });
        i += 1;
    }
    Ok(sum)
}

/// IPv4 header and ICMP fragmentation needed in front of the quote (the client's IPv4 header
/// at 14 + 28 now).
#[inline(always)]
fn answer4(ctx: &XdpContext, mtu: u16, quote: usize) -> Result<(), Counter> {
    let q: *const [u8; 20] = ptr_at(ctx, EthHdr::LEN + HDR4).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { &*q };
    let client = u32::from_ne_bytes([q[12], q[13], q[14], q[15]]);
    let vip = u32::from_ne_bytes([q[16], q[17], q[18], q[19]]);
    let total = (HDR4 + quote) as u16;
    let ip: *mut [u8; 28] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let [t0, t1] = total.to_be_bytes();
    let [m0, m1] = mtu.to_be_bytes();
    *ip = [
        0x45,
        0,
        t0,
        t1,
        0,
        0,
        0x40,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0, //
        3,
        4,
        0,
        0,
        0,
        0,
        m0,
        m1,
    ];
    ip[12..16].copy_from_slice(&vip.to_ne_bytes());
    ip[16..20].copy_from_slice(&client.to_ne_bytes());
    let sum = u64::from(u16::from_ne_bytes([0x45, 0]))
        + u64::from(u16::from_ne_bytes([t0, t1]))
        + u64::from(u16::from_ne_bytes([0x40, 0]))
        + u64::from(u16::from_ne_bytes([64, IPPROTO_ICMP]))
        + u64::from(vip)
        + u64::from(client);
    ip[10..12].copy_from_slice(&(!fold(sum)).to_ne_bytes());
    let sum = u64::from(u16::from_ne_bytes([3, 4]))
        + u64::from(u16::from_ne_bytes([m0, m1]))
        + sum_quote(ctx, EthHdr::LEN + HDR4, quote, WORDS4)?;
    let ip: *mut [u8; 28] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    ip[22..24].copy_from_slice(&(!fold(sum)).to_ne_bytes());
    Ok(())
}

/// IPv6 header and ICMPv6 packet too big in front of the quote (the client's IPv6 header at
/// 14 + 48 now).
#[inline(always)]
fn answer6(ctx: &XdpContext, mtu: u16, quote: usize) -> Result<(), Counter> {
    let q: *const [u8; 40] = ptr_at(ctx, EthHdr::LEN + HDR6).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { &*q };
    // The client's destination (the VIP) is the answer's source, its source the answer's
    // destination.
    let mut addrs = [0u8; 32];
    addrs[0..16].copy_from_slice(&q[24..40]);
    addrs[16..32].copy_from_slice(&q[8..24]);
    let len = (8 + quote) as u16;
    let ip: *mut [u8; 48] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let [l0, l1] = len.to_be_bytes();
    let [m0, m1] = mtu.to_be_bytes();
    ip[0..8].copy_from_slice(&[0x60, 0, 0, 0, l0, l1, IPPROTO_ICMPV6, 64]);
    ip[8..40].copy_from_slice(&addrs);
    ip[40..48].copy_from_slice(&[2, 0, 0, 0, 0, 0, m0, m1]);
    // The pseudo-header (RFC 8200 §8.1): addresses, upper-layer length, next header.
    let mut sum = u64::from(u32::from_ne_bytes([0, 0, l0, l1]))
        + u64::from(u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]));
    let mut i = 0;
    while i < 32 {
        sum += u64::from(u32::from_ne_bytes([
            addrs[i],
            addrs[i + 1],
            addrs[i + 2],
            addrs[i + 3],
        ]));
        i += 4;
    }
    sum += u64::from(u16::from_ne_bytes([2, 0]))
        + u64::from(u16::from_ne_bytes([m0, m1]))
        + sum_quote(ctx, EthHdr::LEN + HDR6, quote, WORDS6)?;
    let ip: *mut [u8; 48] = ptr_at(ctx, EthHdr::LEN).ok_or(Counter::DropTunnelTooBig)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    ip[42..44].copy_from_slice(&(!fold(sum)).to_ne_bytes());
    Ok(())
}
