//! Known sources proven by the node's own cookie: the map names, the hashed input and the
//! keyed hash shared by the datapath (`lb-ebpf/src/cookie.rs`) and the agent.
//!
//! A node answers a ClientHello without a valid cookie with a HelloVerifyRequest (DTLS 1.2,
//! RFC 6347 §4.2.1) or a HelloRetryRequest (DTLS 1.3, RFC 9147 §5.1) carrying a cookie that
//! only a client at that address and port receives. The datapath records each such cookie
//! on the reply path as a keyed hash of ([`CookieInput`]) in `COOKIES`; a ClientHello from
//! that address and port that echoes it proves the source receives what is sent to it, and
//! makes it known (`KNOWN_SRCS`). The hash is keyed with `COOKIE_KEY`, random per pinned
//! datapath, so no sender can aim a collision at a recorded entry.

use core::mem::size_of;

/// `COOKIES` (LRU hash): keyed hash of a [`CookieInput`] → a recorded cookie (the coarse
/// time it was learned) or, for the input with `len` 0, where a fragmented ClientHello's
/// extensions go on ([`Pending`]).
pub const COOKIES: &str = "COOKIES";
/// `COOKIE_KEY` (array, one slot): the SipHash key, [`CookieKey`]; written once by the agent.
pub const COOKIE_KEY: &str = "COOKIE_KEY";

/// Entries of `COOKIES` unless `limits.cookie_capacity` says otherwise.
pub const DEFAULT_COOKIE_CAPACITY: u32 = 1 << 16;
/// Largest `limits.cookie_capacity` (16 MiB of LRU at about 40 bytes an entry plus overhead).
pub const MAX_COOKIE_CAPACITY: u32 = 1 << 22;

/// Bytes of a cookie that are hashed: its length is hashed too, and a longer cookie's tail
/// adds nothing a blind sender could guess.
pub const COOKIE_PREFIX: usize = 32;

/// The SipHash-1-3 key.
pub type CookieKey = [u64; 2];

/// What is hashed: the client's address and port, the cookie's length and its first
/// [`COOKIE_PREFIX`] bytes (zero beyond the length). `len` 0 is never a cookie (an empty
/// cookie proves nothing and is not recorded): that input names the client's pending
/// ClientHello fragment instead.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CookieInput {
    /// The client's address in the maps' form (`maps` module doc).
    pub addr: [u32; 4],
    /// The client's port, wire bytes.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    /// The cookie's length in bytes (1..=255 in DTLS 1.2, up to 65,535 in DTLS 1.3).
    pub len: u16,
    pub _pad2: [u8; 2],
    pub prefix: [u8; COOKIE_PREFIX],
}

/// [`CookieInput`] in 64-bit words, as the hash reads it.
pub const INPUT_WORDS: usize = size_of::<CookieInput>() / 8;

impl CookieInput {
    /// The input as native-endian 64-bit words (the datapath and the agent run on one host),
    /// in place: the datapath hashes it where it lies, in a map value.
    #[inline(always)]
    pub fn words(&self) -> &[u64; INPUT_WORDS] {
        // SAFETY: repr(C) aligned to 8, no padding the compiler adds (explicit pads, size a
        // multiple of 8 checked below), and every bit pattern is a valid [u64; N].
        unsafe { &*(self as *const Self).cast::<[u64; INPUT_WORDS]>() }
    }
}

/// A `COOKIES` value for the pending entry of a ClientHello whose first fragment ended
/// before its extensions did: the handshake message's sequence number and the offset in the
/// message where the next extension header starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub msg_seq: u16,
    pub _pad: u16,
    /// Message offset of the next extension header.
    pub next: u32,
}

impl Pending {
    #[inline(always)]
    pub const fn to_value(self) -> u64 {
        (self.msg_seq as u64) << 32 | self.next as u64
    }

    #[inline(always)]
    pub const fn from_value(v: u64) -> Self {
        Self {
            msg_seq: (v >> 32) as u16,
            _pad: 0,
            next: v as u32,
        }
    }
}

#[inline(always)]
fn sipround(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-1-3 (Aumasson and Bernstein) of `words` read as their little-endian bytes, with
/// `key`: one compression round per word and three finalization rounds. Straight-line code
/// for the verifier (the word loop has a constant bound). The unit test checks it against
/// the `siphasher` crate.
#[inline(always)]
pub fn siphash13(key: &CookieKey, words: &[u64; INPUT_WORDS]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let mut i = 0;
    while i < INPUT_WORDS {
        let m = u64::from_le(words[i]);
        v[3] ^= m;
        sipround(&mut v);
        v[0] ^= m;
        i += 1;
    }
    // The final block: the message length in bytes in the top byte, nothing else (the input
    // is a whole number of words).
    let b = ((INPUT_WORDS * 8) as u64) << 56;
    v[3] ^= b;
    sipround(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    sipround(&mut v);
    sipround(&mut v);
    sipround(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// The `COOKIES` key of an input.
#[inline(always)]
pub fn cookie_hash(key: &CookieKey, input: &CookieInput) -> u64 {
    siphash13(key, input.words())
}

const _: () = {
    assert!(size_of::<CookieInput>() == 56);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash13_matches_the_siphasher_crate() {
        use core::hash::Hasher;
        let key: CookieKey = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let mut input = CookieInput {
            addr: [0xc633_6407, 0, 0, 0],
            port: 0x3416,
            family: 4,
            len: 28,
            ..Default::default()
        };
        for (i, b) in input.prefix.iter_mut().enumerate() {
            *b = i as u8 * 7 + 1;
        }
        let mut h = siphasher::sip::SipHasher13::new_with_keys(key[0], key[1]);
        for w in input.words() {
            h.write(&w.to_ne_bytes());
        }
        assert_eq!(cookie_hash(&key, &input), h.finish());
        // Any field changes it.
        let mut other = input;
        other.port ^= 1;
        assert_ne!(cookie_hash(&key, &other), cookie_hash(&key, &input));
        assert_ne!(cookie_hash(&[1, 2], &input), cookie_hash(&key, &input));
    }

    #[test]
    fn pending_round_trips() {
        let p = Pending {
            msg_seq: 1,
            _pad: 0,
            next: 1234,
        };
        assert_eq!(Pending::from_value(p.to_value()), p);
    }
}
