//! Known sources proven by the node's own cookie (`lb-ebpf/src/cookie.rs`, whose module doc is
//! the spec): the step that runs once the packet's verdict is made, only with the global
//! new-flow limit on (its reserve is what known sources take first).
//!
//! Written from RFC 6347 §4.2.1 (HelloVerifyRequest, DTLS 1.2 ClientHello), RFC 9147 §5.1 and
//! RFC 8446 §4.1.2-4.1.4, §4.2.2 (HelloRetryRequest, the cookie extension) and that doc:
//! - learn: a genuine reply from a node (origin checked, not for this host, forwarding on)
//!   whose first record is a handshake fragment at offset 0 of a HelloVerifyRequest
//!   (server_version FE FF or FE FD) or of a HelloRetryRequest (a ServerHello whose random is
//!   SHA-256("HelloRetryRequest")) with a cookie extension (44): the keyed hash of (client
//!   address, port, cookie length, first 32 cookie bytes) goes into `COOKIES`;
//! - prove: a handshake record to a VIP port on the flow path, whatever its verdict: a
//!   ClientHello fragment whose cookie (DTLS 1.2: the cookie field, non-empty, in the first
//!   fragment; DTLS 1.3: the cookie extension, walked over at most 24 extensions per fragment)
//!   hashes, with the sender's address and port, to a `COOKIES` key makes the source known
//!   (`known_src_proven`), else `cookie_unproven`. A first fragment that ends inside the
//!   extensions leaves a pending entry (the len-0 input's hash → message sequence number and
//!   the message offset of the next extension header); a later fragment of that message from
//!   the same address and port that starts at or before that offset (and ends after it) walks
//!   on from there.
//!
//! Every field read must lie inside the handshake fragment, the fragment inside its record,
//! the record inside the UDP datagram (its length field) and inside the frame. An extension
//! header or cookie cut by the fragment's end is not followed. Only the first record of a
//! datagram is read.
//!
//! The hash is SipHash-1-3 (the `siphasher` crate) keyed with `COOKIE_KEY` over the 56 bytes
//! of `lb_common::cookie::CookieInput`, laid out here byte by byte.

use std::collections::HashMap;

use lb_common::{
    cookie::{Pending, COOKIE_PREFIX},
    Counter, DTLS_V12, DTLS_V13,
};

use crate::{limit, parse, stats::Outcome, State, Tables};

/// ContentType handshake (RFC 6347 §4.1).
const HANDSHAKE: u8 = 22;
/// HandshakeType (RFC 6347 §4.3.2, RFC 8446 §4).
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const HELLO_VERIFY_REQUEST: u8 = 3;
/// The cookie extension (RFC 8446 §4.2.2).
const COOKIE_EXT: u16 = 44;
/// RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this random.
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
/// Extensions looked at per fragment (the spec's bound).
const MAX_EXTENSIONS: usize = 24;

/// Which cookie step a packet needs, as `try_lb` marks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hello {
    None,
    /// To a VIP port, by flow, starting with a handshake record: [`prove`].
    Client,
    /// A genuine reply from a node, starting with a handshake record: [`learn`].
    Node,
}

/// A `COOKIES` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A node's cookie, learned at this coarse time.
    Learned(u64),
    /// A fragmented ClientHello's walk, to go on in a later fragment.
    Pending(Pending),
}

/// `COOKIES`: key → entry. Nothing is evicted (the caller keeps it far from full).
pub type Cookies = HashMap<u64, Entry>;

/// Are cookies learned and matched? Only with the global limit on.
pub fn on(t: &Tables) -> bool {
    t.limits.as_ref().is_some_and(|l| l.global.is_some())
}

/// Does the datagram's first byte say handshake? (`try_lb` marks the packet with it.)
pub fn starts_handshake(frame: &[u8], udp: &parse::Udp) -> bool {
    datagram_len(udp) > 0 && frame.get(udp.payload_off()) == Some(&HANDSHAKE)
}

/// Bytes of UDP payload: the length field's, less the header (none if the field says less
/// than a header).
fn datagram_len(udp: &parse::Udp) -> usize {
    usize::from(udp.len).saturating_sub(8)
}

/// The step after the verdict: the packet (as rewritten) parsed again, then learn or prove.
pub fn after(t: &Tables, state: &mut State, out: &mut Outcome, hello: Hello) {
    if hello == Hello::None || !on(t) {
        return;
    }
    let frame = out.frame.clone();
    let Ok(pkt) = parse::parse(&frame, t) else {
        return;
    };
    let Some(udp) = pkt.udp else {
        return;
    };
    match hello {
        // The reply's destination is the client (the rewrite only changed its source).
        Hello::Node => learn(t, state, out, &frame, &pkt, &udp),
        // The request's source is the client (the rewrite only changed its destination).
        Hello::Client => prove(t, state, out, &frame, &pkt, &udp),
        Hello::None => {}
    }
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

fn is_dtls_version(v: &[u8]) -> bool {
    v == [0xfe, 0xff] || v == [0xfe, 0xfd]
}

/// The handshake fragment in the datagram's first record: the message's type, sequence number
/// and length, where the fragment lies in the message, and its bytes.
struct Fragment<'a> {
    msg_type: u8,
    msg_seq: u16,
    msg_len: usize,
    offset: usize,
    bytes: &'a [u8],
}

/// RFC 6347 §4.1 record header (type, version, epoch, sequence number, length) and §4.2.2
/// handshake header (type, length, message_seq, fragment_offset, fragment_length). Epoch 0
/// only (handshake messages in the clear); the record inside the datagram and the frame, the
/// fragment inside the record and inside the message.
fn fragment<'a>(frame: &'a [u8], udp: &parse::Udp) -> Option<Fragment<'a>> {
    let start = udp.payload_off();
    let datagram = frame.get(start..)?;
    let datagram = &datagram[..datagram.len().min(datagram_len(udp))];
    let rec = datagram.get(..13)?;
    if rec[0] != HANDSHAKE || !is_dtls_version(&rec[1..3]) || rec[3..5] != [0, 0] {
        return None;
    }
    let record = datagram.get(13..13 + be16(&rec[11..13]))?;
    let hs = record.get(..12)?;
    let (msg_len, offset, frag_len) = (be24(&hs[1..4]), be24(&hs[6..9]), be24(&hs[9..12]));
    if offset + frag_len > msg_len {
        return None;
    }
    Some(Fragment {
        msg_type: hs[0],
        msg_seq: u16::from_be_bytes([hs[4], hs[5]]),
        msg_len,
        offset,
        bytes: record.get(12..12 + frag_len)?,
    })
}

/// What a walk over extension headers found (offsets in the fragment).
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    /// The cookie, whole in the fragment: where it starts, its length.
    Cookie(usize, usize),
    /// The fragment ends before the next extension header (at this offset) does.
    Beyond(usize),
    Nothing,
}

/// Extensions of `frag`, from offset `at` up to `end` (where the extensions end, possibly
/// past the fragment): type(2) length(2) data. The cookie extension's data is
/// `cookie<1..2^16-1>`, inside the extension.
fn walk(frag: &[u8], mut at: usize, end: usize) -> Walk {
    for _ in 0..MAX_EXTENSIONS {
        if at >= end {
            return Walk::Nothing;
        }
        let Some(h) = frag.get(at..at + 4) else {
            return Walk::Beyond(at);
        };
        let (ty, len) = (be16(&h[..2]), be16(&h[2..]));
        if ty == usize::from(COOKIE_EXT) {
            let Some(l) = frag.get(at + 4..at + 6) else {
                return Walk::Nothing;
            };
            let n = be16(l);
            if n == 0 || n + 2 > len || at + 6 + n > frag.len() {
                return Walk::Nothing;
            }
            return Walk::Cookie(at + 6, n);
        }
        at += 4 + len;
    }
    Walk::Nothing
}

/// The `COOKIES` key of client (`addr`, `port`) and `cookie` (empty: the client's pending
/// entry): SipHash-1-3 over `CookieInput`'s 56 bytes (addr 0..16 as the maps hold it, port
/// 16..18 in wire order, family 18, pad 19, len 20..22 native, pad 22..24, the cookie's first
/// 32 bytes zero-padded 24..56).
pub fn key(t: &Tables, pkt: &parse::Packet, addr: &[u32; 4], port: u16, cookie: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut b = [0u8; 56];
    for (i, w) in addr.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b[16..18].copy_from_slice(&port.to_ne_bytes());
    b[18] = pkt.family;
    b[20..22].copy_from_slice(&(cookie.len() as u16).to_ne_bytes());
    let n = cookie.len().min(COOKIE_PREFIX);
    b[24..24 + n].copy_from_slice(&cookie[..n]);
    let mut h = siphasher::sip::SipHasher13::new_with_keys(t.cookie_key[0], t.cookie_key[1]);
    h.write(&b);
    h.finish()
}

/// The `COOKIES` key of the pending ClientHello walk of the frame's sender (`pkt.src`,
/// `udp.sport`), whether or not it has one.
pub fn pending_key(t: &Tables, pkt: &parse::Packet, udp: &parse::Udp) -> u64 {
    key(t, pkt, &pkt.src, udp.sport, &[])
}

/// A genuine reply to client (`pkt.dst`, `udp.dport`): a HelloVerifyRequest's or a
/// HelloRetryRequest's cookie is recorded.
fn learn(
    t: &Tables,
    state: &mut State,
    out: &mut Outcome,
    frame: &[u8],
    pkt: &parse::Packet,
    udp: &parse::Udp,
) {
    let Some(f) = fragment(frame, udp) else {
        return;
    };
    if f.offset != 0 {
        return;
    }
    let b = f.bytes;
    let cookie = match f.msg_type {
        // server_version(2) cookie<0..2^8-1>
        HELLO_VERIFY_REQUEST => {
            let Some(v) = b.get(..3) else { return };
            if !is_dtls_version(&v[..2]) {
                return;
            }
            let Some(c) = b.get(3..3 + usize::from(v[2])) else {
                return;
            };
            c
        }
        // legacy_version(2) = FE FD, random(32), legacy_session_id_echo<0..32>,
        // cipher_suite(2), legacy_compression_method(1), extensions<6..2^16-1>
        SERVER_HELLO => {
            let Some(fixed) = b.get(..35) else { return };
            if fixed[..2] != [0xfe, 0xfd] || fixed[2..34] != HRR_RANDOM || fixed[34] > 32 {
                return;
            }
            let at = 35 + usize::from(fixed[34]) + 3;
            let Some(l) = b.get(at..at + 2) else { return };
            let start = at + 2;
            match walk(b, start, start + be16(l)) {
                Walk::Cookie(c, n) => &b[c..c + n],
                _ => return,
            }
        }
        _ => return,
    };
    if cookie.is_empty() {
        return;
    }
    let k = key(t, pkt, &pkt.dst, udp.dport, cookie);
    state.limits.cookies.insert(k, Entry::Learned(state.now_ns));
    out.count(Counter::CookieLearned);
}

/// A handshake record to a VIP port from client (`pkt.src`, `udp.sport`): a ClientHello that
/// echoes a recorded cookie proves its source.
fn prove(
    t: &Tables,
    state: &mut State,
    out: &mut Outcome,
    frame: &[u8],
    pkt: &parse::Packet,
    udp: &parse::Udp,
) {
    let Some(f) = fragment(frame, udp) else {
        return;
    };
    if f.msg_type != CLIENT_HELLO {
        return;
    }
    let b = f.bytes;
    let versions = t.config().dtls_versions;
    let pending_key = pending_key(t, pkt, udp);
    let found = if f.offset == 0 {
        // client_version(2) random(32) session_id<0..32> cookie<0..2^8-1>
        // cipher_suites<2..2^16-2> compression_methods<1..2^8-1> extensions<0..2^16-1>
        let Some(&sid) = b.get(34) else { return };
        if sid > 32 {
            return;
        }
        let at = 35 + usize::from(sid);
        let Some(&cookie_len) = b.get(at) else { return };
        if cookie_len > 0 {
            // DTLS 1.2: the cookie field.
            if versions & DTLS_V12 == 0 {
                return;
            }
            Walk::Cookie(at + 1, usize::from(cookie_len))
        } else {
            // DTLS 1.3 (RFC 9147 §5.3: legacy_cookie empty): the cookie extension.
            if versions & DTLS_V13 == 0 {
                return;
            }
            let at = at + 1;
            let Some(l) = b.get(at..at + 2) else { return };
            let at = at + 2 + be16(l);
            let Some(&l) = b.get(at) else { return };
            let at = at + 1 + usize::from(l);
            let Some(l) = b.get(at..at + 2) else { return };
            walk(b, at + 2, at + 2 + be16(l))
        }
    } else {
        let Some(Entry::Pending(p)) = state.limits.cookies.get(&pending_key).copied() else {
            return;
        };
        let next = p.next as usize;
        if p.msg_seq != f.msg_seq || next < f.offset || next >= f.offset + b.len() {
            return;
        }
        // The extensions end the ClientHello: they end with the message.
        walk(b, next - f.offset, f.msg_len - f.offset)
    };
    match found {
        Walk::Cookie(at, n) => {
            let Some(cookie) = b.get(at..at + n) else {
                return;
            };
            let k = key(t, pkt, &pkt.src, udp.sport, cookie);
            if matches!(state.limits.cookies.get(&k), Some(Entry::Learned(_))) {
                limit::proven(state, pkt);
                out.count(Counter::KnownSrcProven);
            } else {
                out.count(Counter::CookieUnproven);
            }
        }
        Walk::Beyond(at) => {
            let p = Pending {
                msg_seq: f.msg_seq,
                _pad: 0,
                next: (f.offset + at) as u32,
            };
            state.limits.cookies.insert(pending_key, Entry::Pending(p));
        }
        Walk::Nothing => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::cookie::{cookie_hash, CookieInput};
    use lb_lab::hello;

    fn v4(a: [u8; 4]) -> parse::Packet {
        parse::Packet {
            family: lb_common::FAMILY_V4,
            vlans: 0,
            l3: 14,
            src: [u32::from_ne_bytes(a), 0, 0, 0],
            dst: [0; 4],
            udp: None,
            icmp: None,
            frag: 0,
            frag_id: 0,
        }
    }

    /// This module's byte layout and the `siphasher` crate give what the datapath's own
    /// SipHash over `CookieInput` gives.
    #[test]
    fn key_matches_lb_commons_hash_of_the_input() {
        let t = Tables {
            cookie_key: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
            ..Default::default()
        };
        let pkt = v4([198, 51, 100, 7]);
        for len in [0usize, 1, 28, 32, 33, 64] {
            let cookie: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let mut input = CookieInput {
                addr: pkt.src,
                port: 40000u16.to_be(),
                family: pkt.family,
                len: len as u16,
                ..Default::default()
            };
            let n = len.min(COOKIE_PREFIX);
            input.prefix[..n].copy_from_slice(&cookie[..n]);
            assert_eq!(
                key(&t, &pkt, &pkt.src, 40000u16.to_be(), &cookie),
                cookie_hash(&t.cookie_key, &input),
                "cookie of {len} bytes"
            );
        }
    }

    /// The walk over a DTLS 1.3 ClientHello cut in two: the first fragment leaves the offset
    /// of the next extension header, the second finds the cookie from there.
    #[test]
    fn a_cookie_extension_in_the_second_fragment_is_found() {
        let mut exts = hello::client_extensions(1200);
        exts.push(hello::cookie_extension(&[7; 40]));
        let ch = hello::client_hello13(&exts);
        let at = ch.extension_at(COOKIE_EXT).unwrap();
        let start = ch.extensions_start().unwrap();
        let body = &ch.body;
        let ext_end = body.len();
        // Whole: found where it was put.
        assert_eq!(walk(body, start, ext_end), Walk::Cookie(at + 6, 40));
        // Cut inside the key share: the next header (the cookie's) lies beyond.
        let cut = 600;
        assert_eq!(walk(&body[..cut], start, ext_end), Walk::Beyond(at));
        assert_eq!(walk(&body[at..], 0, ext_end - at), Walk::Cookie(6, 40));
        // Cut inside the cookie extension: not followed.
        assert_eq!(walk(&body[..at + 10], start, ext_end), Walk::Nothing);
    }
}
