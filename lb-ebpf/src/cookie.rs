//! Known sources proven by the node's own cookie (`lb_common::cookie`). Runs only with the
//! global new-flow limit on (`limits.new_flows`), whose reserve known sources take first.
//!
//! - [`learn`], for a genuine reply from a node (passed the origin check, un-NATed): a
//!   HelloVerifyRequest or HelloRetryRequest to client A, port P records the keyed hash of
//!   (A, P, cookie length, first 32 bytes of the cookie) in `COOKIES`.
//! - [`prove`], for a packet to a VIP port on the flow path (once its flow has been admitted
//!   or refused): a ClientHello from (A, P) whose cookie hashes to a recorded entry makes A's
//!   source known (`limit::proven`). A random cookie, or a real one sent from another address
//!   or port, hashes elsewhere.
//!
//! Both run in [`after`], which `main.rs` runs once `balance` has decided, for the packets
//! `try_lb` marked (`Then::Prove`, `Then::Learn`).
//!
//! The handshake formats, after the 13-byte DTLSPlaintext record header (type 22, version,
//! epoch 0, sequence number, length) and the 12-byte handshake header (msg_type, length,
//! message_seq, fragment_offset, fragment_length):
//! ```text
//! HelloVerifyRequest (3, RFC 6347 §4.2.1)  server_version(2) cookie<0..255>
//! ServerHello (2) as HelloRetryRequest     legacy_version(2) = FE FD, random(32) = the
//!   (RFC 9147 §5.1, RFC 8446 §4.1.3)       SHA-256 of "HelloRetryRequest",
//!                                          legacy_session_id_echo<0..32>, cipher_suite(2),
//!                                          compression(1), extensions<..2^16-1>
//! ClientHello (1)                          client_version(2), random(32), session_id<0..32>,
//!                                          cookie<0..255> (DTLS 1.2; empty in 1.3),
//!                                          cipher_suites<2..2^16-2>,
//!                                          compression_methods<1..255>, extensions<..2^16-1>
//! extension                                type(2), length(2), data; cookie (44): cookie<1..2^16-1>
//! ```
//! Versions FE FF and FE FD are accepted in the record and the HelloVerifyRequest (RFC 6347
//! §4.2.1). Only the first record of a datagram is read: a node sends its cookie request
//! alone, and a client starts its datagram with its ClientHello.
//!
//! A DTLS 1.3 ClientHello can span datagrams (wolfSSL's second one does with its default
//! post-quantum key share), and extension order is free, so the cookie extension can lie in
//! a fragment with offset > 0. When a fragment ends before the extensions do, the offset in
//! the message of the next extension header is kept in `COOKIES` under the client's (A, P)
//! with cookie length 0 (no cookie has that length), with the message's sequence number; a
//! later fragment of that message that starts at or before that offset goes on walking from
//! there. An extension header or a cookie cut by a fragment's end is not followed, nor a
//! first fragment that ends before the extensions' length field (every field is read from
//! the fragment, never from what follows it in the datagram): no source is proven, the
//! client is simply not put first. Real stacks fragment inside the key share, which is large.
//!
//! Bytes are read with `bpf_xdp_load_bytes` into the stack, at offsets the verifier sees as
//! plain scalars: the walks have no packet-pointer bounds to prove. These are rare packets
//! (handshakes), so the helper's cost does not touch the record path.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{
    cookie::{cookie_hash, Pending, COOKIE_PREFIX},
    Counter, DpConfig, DTLS_V12, DTLS_V13,
};

use crate::{
    limit, maps,
    parse::{ptr_at, Packet, Udp},
    stats::count,
};

/// ContentType handshake.
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const HELLO_VERIFY_REQUEST: u8 = 3;
/// DTLSPlaintext header: type, version, epoch, sequence number, length.
const RECORD_HEADER: usize = 13;
/// Handshake header: msg_type, length, message_seq, fragment_offset, fragment_length.
const HANDSHAKE_HEADER: usize = 12;
/// The cookie extension (RFC 8446 §4.2.2).
const COOKIE_EXT: u16 = 44;
/// ServerHello.random of a HelloRetryRequest: SHA-256("HelloRetryRequest").
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
/// Extensions walked per fragment at most. wolfSSL's and Mbed TLS's ClientHellos carry about
/// ten.
pub const MAX_EXTENSIONS: usize = 24;

/// Where this file's buffers live: a per-CPU map value, not the stack (see [`learn`]).
type Scratch = crate::maps::CookieScratch;

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    maps::COOKIE_SCRATCH
        .get_ptr_mut(0)
        .map(|p| unsafe { &mut *p })
}

/// Loads `N` bytes at packet offset `off` into the scratch buffer; false unless the packet
/// holds them all.
#[inline(always)]
fn fill<const N: usize>(ctx: &XdpContext, s: &mut Scratch, off: usize) -> bool {
    const { assert!(N <= crate::maps::COOKIE_BUF) };
    // SAFETY: the helper writes at most N bytes into the buffer, and fails (non-zero) unless
    // all N lie inside the packet.
    unsafe { bpf_xdp_load_bytes(ctx.ctx, off as u32, s.buf.as_mut_ptr().cast(), N as u32) == 0 }
}

/// The big-endian u16 at packet offset `off`.
#[inline(always)]
fn u16_at(ctx: &XdpContext, s: &mut Scratch, off: usize) -> Option<usize> {
    fill::<2>(ctx, s, off).then(|| be16([s.buf[0], s.buf[1]]))
}

/// The byte at packet offset `off`.
#[inline(always)]
fn u8_at(ctx: &XdpContext, s: &mut Scratch, off: usize) -> Option<usize> {
    fill::<1>(ctx, s, off).then(|| s.buf[0] as usize)
}

#[inline(always)]
fn be16(b: [u8; 2]) -> usize {
    u16::from_be_bytes(b) as usize
}

#[inline(always)]
fn be24(b: &[u8]) -> usize {
    ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize
}

#[inline(always)]
fn dtls_version(hi: u8, lo: u8) -> bool {
    hi == 0xfe && (lo == 0xff || lo == 0xfd)
}

/// Is the datagram's first byte a handshake record's? One direct read (the two bytes ending
/// there keep the verifier's bounds check, as in `dtls.rs`), so other packets pay nothing more.
#[inline(always)]
pub fn starts_handshake(ctx: &XdpContext, udp: &Udp) -> bool {
    if udp.payload_len() < 1 {
        return false;
    }
    match ptr_at::<[u8; 2]>(ctx, udp.payload_off() - 1) {
        // SAFETY: ptr_at checked that the bytes lie inside the packet.
        Some(p) => (unsafe { (*p)[1] }) == HANDSHAKE,
        None => false,
    }
}

/// The first record's handshake fragment. Offsets are packet offsets.
struct Fragment {
    msg_type: u8,
    msg_seq: u16,
    /// The whole message's length.
    msg_len: usize,
    /// Where this fragment starts in the message.
    frag_off: usize,
    /// The fragment's first byte, and one past its last.
    body: usize,
    end: usize,
}

impl Fragment {
    /// Offset in the message of packet offset `at` (inside this fragment).
    #[inline(always)]
    fn msg_offset(&self, at: usize) -> usize {
        self.frag_off + (at - self.body)
    }
}

/// The handshake fragment in the datagram's first record, if it is one (epoch 0) and its
/// lengths agree: the fragment inside the record, the record inside the datagram (by its UDP
/// length) and the frame, the fragment inside the message.
#[inline(always)]
fn fragment(ctx: &XdpContext, s: &mut Scratch, udp: &Udp) -> Option<Fragment> {
    let p = udp.payload_off();
    if !fill::<{ RECORD_HEADER + HANDSHAKE_HEADER }>(ctx, s, p) {
        return None;
    }
    let h = &s.buf;
    if h[0] != HANDSHAKE || !dtls_version(h[1], h[2]) || h[3] != 0 || h[4] != 0 {
        return None;
    }
    let record_len = be16([h[11], h[12]]);
    let msg_len = be24(&h[14..17]);
    let frag_off = be24(&h[19..22]);
    let frag_len = be24(&h[22..25]);
    // The record inside the frame too: a node's reply has its UDP length unchecked, and a
    // cookie's first bytes could lie in the frame while its end (and its length) does not.
    let frame = ctx.data_end() - ctx.data();
    if HANDSHAKE_HEADER + frag_len > record_len
        || RECORD_HEADER + record_len > udp.payload_len()
        || p + RECORD_HEADER + record_len > frame
        || frag_off + frag_len > msg_len
    {
        return None;
    }
    let body = p + RECORD_HEADER + HANDSHAKE_HEADER;
    Some(Fragment {
        msg_type: h[13],
        msg_seq: u16::from_be_bytes([h[17], h[18]]),
        msg_len,
        frag_off,
        body,
        end: body + frag_len,
    })
}

/// What a walk over extensions found.
enum Walk {
    /// The cookie: packet offset and length, whole inside the fragment.
    Cookie(usize, usize),
    /// The fragment ended before the extensions: the next header's packet offset.
    Beyond(usize),
    /// No cookie, or one this walk does not follow.
    Nothing,
}

/// Walks extension headers from packet offset `at` up to `ext_end` (where the extensions end,
/// possibly past the fragment) inside a fragment ending at `frag_end`.
#[inline(always)]
fn walk(ctx: &XdpContext, s: &mut Scratch, mut at: usize, ext_end: usize, frag_end: usize) -> Walk {
    let mut i = 0;
    while i < MAX_EXTENSIONS {
        if at >= ext_end {
            return Walk::Nothing;
        }
        if at + 4 > frag_end {
            return Walk::Beyond(at);
        }
        if !fill::<4>(ctx, s, at) {
            return Walk::Nothing;
        }
        let len = be16([s.buf[2], s.buf[3]]);
        if be16([s.buf[0], s.buf[1]]) == COOKIE_EXT as usize {
            let cookie_len = match u16_at(ctx, s, at + 4) {
                Some(l) => l,
                None => return Walk::Nothing,
            };
            let cookie = at + 6;
            if cookie_len == 0 || cookie_len + 2 > len || cookie + cookie_len > frag_end {
                return Walk::Nothing;
            }
            return Walk::Cookie(cookie, cookie_len);
        }
        at += 4 + len;
        i += 1;
    }
    Walk::Nothing
}

/// Writes the hash input for client (`addr`, `port`) and the `len`-byte cookie at packet
/// offset `at` (`len` 0: the client's pending entry) into the scratch value, and hashes it.
#[inline(always)]
fn hash(
    ctx: &XdpContext,
    s: &mut Scratch,
    addr: &[u32; 4],
    port: u16,
    family: u8,
    at: usize,
    len: usize,
) -> Option<u64> {
    let input = &mut s.input;
    input.addr = *addr;
    input.port = port;
    input.family = family;
    input._pad = 0;
    input.len = len as u16;
    input._pad2 = [0; 2];
    input.prefix = [0; COOKIE_PREFIX];
    let n = if len < COOKIE_PREFIX {
        len
    } else {
        COOKIE_PREFIX
    };
    if n > 0 && n <= COOKIE_PREFIX {
        // SAFETY: at most COOKIE_PREFIX bytes into `prefix`; fails unless all in the packet.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                at as u32,
                input.prefix.as_mut_ptr().cast(),
                n as u32,
            )
        };
        if rc != 0 {
            return None;
        }
    }
    let key = maps::COOKIE_KEY.get(0)?;
    Some(cookie_hash(key, input))
}

/// Which cookie step a packet needs, as `try_lb` found it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A handshake record to a VIP port on the flow path: [`prove`].
    Client,
    /// A genuine reply from a node starting with a handshake record: [`learn`].
    Node,
}

/// The cookie step, after `balance` has decided (and rewritten) the packet, its buffers in
/// `COOKIE_SCRATCH` (see `main.rs`). It parses the headers again:
/// the rewrite leaves the client's address and port, and the payload, where they were (a
/// reply's destination, a request's source).
#[inline(always)]
pub fn after(ctx: &XdpContext, hello: Hello) {
    if !limit::known_sources_on() {
        return;
    }
    let Ok(pkt) = crate::parse::parse(ctx) else {
        return;
    };
    let crate::parse::L4::Udp(udp) = pkt.l4 else {
        return;
    };
    let Some(s) = scratch() else {
        return;
    };
    match hello {
        Hello::Client => {
            let _ = prove(ctx, s, &pkt, &udp, &crate::CONFIG.load());
        }
        Hello::Node => {
            let _ = learn(ctx, s, &pkt, &udp);
        }
    }
}

/// A genuine reply from a node to client (`pkt.dst`, `udp.dport`): records the cookie of a
/// HelloVerifyRequest or HelloRetryRequest.
#[inline(always)]
fn learn(ctx: &XdpContext, s: &mut Scratch, pkt: &Packet, udp: &Udp) -> Option<()> {
    let f = fragment(ctx, s, udp)?;
    if f.frag_off != 0 {
        return None;
    }
    let (at, len) = match f.msg_type {
        HELLO_VERIFY_REQUEST => {
            if !fill::<3>(ctx, s, f.body) || !dtls_version(s.buf[0], s.buf[1]) {
                return None;
            }
            (f.body + 3, s.buf[2] as usize)
        }
        SERVER_HELLO => {
            if !fill::<35>(ctx, s, f.body) || s.buf[0] != 0xfe || s.buf[1] != 0xfd {
                return None;
            }
            if s.buf[2..34] != HRR_RANDOM {
                return None;
            }
            let sid = s.buf[34] as usize;
            if sid > 32 {
                return None;
            }
            // cipher_suite, compression, extensions length.
            let at = f.body + 35 + sid;
            let ext_len = u16_at(ctx, s, at + 3)?;
            let start = at + 5;
            match walk(ctx, s, start, start + ext_len, f.end) {
                Walk::Cookie(at, len) => (at, len),
                _ => return None,
            }
        }
        _ => return None,
    };
    if len == 0 || at + len > f.end {
        return None;
    }
    let h = hash(ctx, s, &pkt.dst, udp.dport, pkt.family, at, len)?;
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let _ = maps::COOKIES.insert(h, now, 0);
    count(Counter::CookieLearned);
    Some(())
}

/// A packet to a VIP port on the flow path: a ClientHello that echoes a recorded cookie
/// makes its source known (for its next new flows: this one has been admitted or refused).
#[inline(always)]
fn prove(ctx: &XdpContext, s: &mut Scratch, pkt: &Packet, udp: &Udp, cfg: &DpConfig) -> Option<()> {
    let f = fragment(ctx, s, udp)?;
    if f.msg_type != CLIENT_HELLO {
        return None;
    }
    let found = if f.frag_off == 0 {
        let sid = u8_at(ctx, s, f.body + 34)?;
        if sid > 32 {
            return None;
        }
        let at = f.body + 35 + sid;
        let cookie_len = u8_at(ctx, s, at)?;
        if cookie_len > 0 {
            // DTLS 1.2: the cookie field.
            if cfg.dtls_versions & DTLS_V12 == 0 {
                return None;
            }
            Walk::Cookie(at + 1, cookie_len)
        } else {
            // DTLS 1.3: an empty legacy cookie; the cookie extension, if any.
            if cfg.dtls_versions & DTLS_V13 == 0 {
                return None;
            }
            let at = at + 1;
            let at = at + 2 + u16_at(ctx, s, at)?;
            let at = at + 1 + u8_at(ctx, s, at)?;
            // Every field read so far, up to the extensions' length, must be the fragment's
            // own: past its end lie other records or padding, not the message.
            if at + 2 > f.end {
                return None;
            }
            let ext_len = u16_at(ctx, s, at)?;
            walk(ctx, s, at + 2, at + 2 + ext_len, f.end)
        }
    } else {
        let pending = hash(ctx, s, &pkt.src, udp.sport, pkt.family, 0, 0)?;
        // SAFETY: copied out under the RCU read lock.
        let p = Pending::from_value(unsafe { *maps::COOKIES.get(pending)? });
        let next = p.next as usize;
        if p.msg_seq != f.msg_seq || next < f.frag_off || next >= f.msg_offset(f.end) {
            return None;
        }
        // The extensions are the ClientHello's last field: they end with the message.
        walk(
            ctx,
            s,
            f.body + (next - f.frag_off),
            f.body + (f.msg_len - f.frag_off),
            f.end,
        )
    };
    match found {
        Walk::Cookie(at, len) => {
            if at + len > f.end {
                return None;
            }
            let h = hash(ctx, s, &pkt.src, udp.sport, pkt.family, at, len)?;
            // SAFETY: only presence is read.
            if unsafe { maps::COOKIES.get(h).is_some() } {
                limit::proven(pkt);
                count(Counter::KnownSrcProven);
            } else {
                count(Counter::CookieUnproven);
            }
        }
        Walk::Beyond(at) => {
            let pending = hash(ctx, s, &pkt.src, udp.sport, pkt.family, 0, 0)?;
            let p = Pending {
                msg_seq: f.msg_seq,
                _pad: 0,
                next: f.msg_offset(at) as u32,
            };
            let _ = maps::COOKIES.insert(pending, p.to_value(), 0);
        }
        Walk::Nothing => {}
    }
    Some(())
}
