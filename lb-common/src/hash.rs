//! Fixed-seed hashes shared by the XDP program and the agent: the flow hash that picks a new
//! flow's Maglev slot, and the word hash the agent builds Maglev permutations from.
//!
//! Both are MurmurHash3_x86_32 (Austin Appleby, public domain; the same function as the
//! reference `MurmurHash3_x86_32` in SMHasher) over little-endian 32-bit words, with a fixed
//! seed: every balancer computes the same value for the same flow, so two balancers with the
//! same config pick the same node for a new flow with no traffic between them. Murmur3's
//! finalizer (`fmix32`) gives full avalanche: each input bit flips each output bit with
//! probability close to 1/2 (the unit tests measure it).
//!
//! Datapath constraints, kept by every function here: no loops (the flow hash is ten unrolled
//! rounds, straight-line code for the verifier), no division, no allocation; multiplies, xors,
//! shifts and rotates only (BPF has no rotate instruction; LLVM lowers `rotate_left` to two
//! shifts and an or). Everything multiplies 32-bit words except `node_check`, which
//! multiplies 64-bit words (BPF multiplies 64-bit registers natively).
//! The one division the hot path needs is the caller's `flow_hash(..) % table_size`.

use crate::maps::{
    FlowKey, Node, NODE_FILTER_BITS_LOG2, SRC_FILTER_BITS_LOG2, VIP_TABLE_SLOTS_LOG2,
};

/// Seed of [`flow_hash`]. Fixed: changing it moves every new flow to another Maglev slot and
/// makes balancers of different versions disagree, so treat it as part of the wire contract.
pub const FLOW_SEED: u32 = 0x6369_646c; // "cidl"

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// Murmur3's per-block mix of one 32-bit word into the running state `h`.
#[inline(always)]
const fn round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Murmur3's finalizer: full avalanche of a 32-bit state.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// MurmurHash3_x86_32 of the four little-endian bytes of `x` with `seed`. The agent derives
/// Maglev offsets and skips from node ids with it (see `lb-userspace/src/maglev.rs`).
#[inline(always)]
pub const fn hash_u32(x: u32, seed: u32) -> u32 {
    fmix32(round(seed, x) ^ 4)
}

/// An address's hash (wire words, `FAMILY_V4`/`FAMILY_V6`): Murmur3's finalizer over the
/// words folded with rotations. Its top bits index the datapath's address tables.
#[inline(always)]
pub const fn addr_hash(addr: &[u32; 4], family: u8) -> u32 {
    let folded = addr[0]
        ^ addr[1].rotate_left(8)
        ^ addr[2].rotate_left(16)
        ^ addr[3].rotate_left(24)
        ^ family as u32;
    fmix32(folded)
}

/// The `NODE_FILTER` bit of an address: the top [`NODE_FILTER_BITS_LOG2`] bits of its hash.
#[inline(always)]
pub const fn addr_filter_bit(addr: &[u32; 4], family: u8) -> u32 {
    addr_hash(addr, family) >> (32 - NODE_FILTER_BITS_LOG2)
}

/// The `SRC_FILTER` bit of an address: the top [`SRC_FILTER_BITS_LOG2`] bits of the folded
/// words times a golden-ratio constant (Fibonacci hashing: one multiply, on every packet to a
/// VIP port; the few addresses a filter holds need no full avalanche).
#[inline(always)]
pub const fn src_filter_bit(addr: &[u32; 4], family: u8) -> u32 {
    let folded = addr[0]
        ^ addr[1].rotate_left(8)
        ^ addr[2].rotate_left(16)
        ^ addr[3].rotate_left(24)
        ^ family as u32;
    folded.wrapping_mul(0x9e37_79b1) >> (32 - SRC_FILTER_BITS_LOG2)
}

/// The `VIP_TABLE` slot where an address's probe sequence starts: the top
/// [`VIP_TABLE_SLOTS_LOG2`] bits of its hash.
#[inline(always)]
pub const fn vip_slot(addr: &[u32; 4], family: u8) -> u32 {
    addr_hash(addr, family) >> (32 - VIP_TABLE_SLOTS_LOG2)
}

/// The check word of a node (`Node::check`): the node's fields as four 64-bit words (the copy
/// that can tear moves whole words or bytes), each multiplied by its own odd constant, xored,
/// folded to 32 bits. The multiplies are independent, so the datapath pays one multiply's
/// latency, not four. A read made of old and new parts matches the old or the new check only
/// by a 32-bit coincidence.
#[inline(always)]
pub const fn node_check(n: &Node) -> u32 {
    let q0 = n.addr6[0] as u64 | (n.addr6[1] as u64) << 32;
    let q1 = n.addr6[2] as u64 | (n.addr6[3] as u64) << 32;
    let q2 = n.addr4 as u64 | (n.port as u64) << 32 | (n.flags as u64) << 48;
    let q3 = n.slot as u64;
    let h = q0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ q1.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ q2.wrapping_mul(0x1656_67b1_9e37_79f9)
        ^ q3.wrapping_mul(0x85eb_ca77_c2b2_ae63);
    (h ^ (h >> 32)) as u32
}

/// The flow hash: MurmurHash3_x86_32 with [`FLOW_SEED`] over the 40 bytes of `key` as laid out
/// in memory on a little-endian machine (the host and `bpfel`), with the padding bytes taken as
/// zero whatever they hold. Addresses and ports are hashed as their wire bytes.
///
/// The slot of a new flow in a Maglev table of `size` entries is `flow_hash(&key) % size`.
/// (With the default size 65537 = 2^16 + 1, 2^32 ≡ 1 (mod 65537): slot 0 gets one hash value
/// more than the others out of 2^32, a bias of no consequence.)
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = FLOW_SEED;
    h = round(h, key.src[0]);
    h = round(h, key.src[1]);
    h = round(h, key.src[2]);
    h = round(h, key.src[3]);
    h = round(h, key.dst[0]);
    h = round(h, key.dst[1]);
    h = round(h, key.dst[2]);
    h = round(h, key.dst[3]);
    // Bytes 32..36: sport then dport, each in wire order; little-endian word = sport | dport << 16.
    h = round(h, key.sport as u32 | (key.dport as u32) << 16);
    // Bytes 36..40: family, then three padding bytes taken as zero.
    h = round(h, key.family as u32);
    fmix32(h ^ 40)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::maps::{FAMILY_V4, FAMILY_V6};
    use crate::splitmix::SplitMix64;

    /// A second, independent MurmurHash3_x86_32: byte-oriented, with the tail handling the
    /// words-only functions above never need, written from the algorithm's description.
    fn murmur3_bytes(data: &[u8], seed: u32) -> u32 {
        let mut h = seed;
        let mut chunks = data.chunks_exact(4);
        for c in &mut chunks {
            let mut k = u32::from(c[0])
                | u32::from(c[1]) << 8
                | u32::from(c[2]) << 16
                | u32::from(c[3]) << 24;
            k = k.wrapping_mul(0xcc9e2d51);
            k = k.rotate_left(15);
            k = k.wrapping_mul(0x1b873593);
            h ^= k;
            h = h.rotate_left(13);
            h = h.wrapping_mul(5).wrapping_add(0xe6546b64);
        }
        let tail = chunks.remainder();
        let mut k: u32 = 0;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        if !tail.is_empty() {
            k = k.wrapping_mul(0xcc9e2d51);
            k = k.rotate_left(15);
            k = k.wrapping_mul(0x1b873593);
            h ^= k;
        }
        h ^= data.len() as u32;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85ebca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2ae35);
        h ^= h >> 16;
        h
    }

    /// Published MurmurHash3_x86_32 test vectors (SMHasher's reference implementation, as
    /// quoted in the Wikipedia article and widely used ports): (input, seed, hash).
    const PUBLISHED: &[(&[u8], u32, u32)] = &[
        (b"", 0, 0),
        (b"", 1, 0x514e_28b7),
        (b"", 0xffff_ffff, 0x81f1_6f39),
        (&[0, 0, 0, 0], 0, 0x2362_f9de),
        (&[0xff, 0xff, 0xff, 0xff], 0, 0x7629_3b50),
        (&[0x21, 0x43, 0x65, 0x87], 0, 0xf55b_516b),
        (&[0x21, 0x43, 0x65, 0x87], 0x5082_edee, 0x2362_f9de),
        (&[0x21, 0x43, 0x65], 0, 0x7e4a_8634),
        (&[0x21, 0x43], 0, 0xa0f7_b07a),
        (&[0x21], 0, 0x7266_1cf4),
        (b"aaaa", 0x9747_b28c, 0x5a97_808a),
        (b"abcd", 0x9747_b28c, 0xf047_8627),
        (b"abc", 0x9747_b28c, 0xc84a_62dd),
        (b"Hello, world!", 0x9747_b28c, 0x2488_4cba),
        (
            b"The quick brown fox jumps over the lazy dog",
            0x9747_b28c,
            0x2fa8_26cd,
        ),
    ];

    #[test]
    fn reference_matches_published_vectors() {
        for (data, seed, want) in PUBLISHED {
            assert_eq!(
                murmur3_bytes(data, *seed),
                *want,
                "murmur3({data:x?}, {seed:#x})"
            );
        }
    }

    #[test]
    fn hash_u32_matches_published_vectors() {
        // The four-byte published vectors, read as a little-endian word.
        assert_eq!(hash_u32(0, 0), 0x2362_f9de);
        assert_eq!(hash_u32(0xffff_ffff, 0), 0x7629_3b50);
        assert_eq!(hash_u32(0x8765_4321, 0), 0xf55b_516b);
        assert_eq!(hash_u32(0x8765_4321, 0x5082_edee), 0x2362_f9de);
    }

    /// A flow key built the way the datapath builds it: addresses and ports as wire bytes.
    fn key(src: &[u8], dst: &[u8], sport: u16, dport: u16) -> FlowKey {
        let words = |a: &[u8]| {
            let mut w = [0u32; 4];
            for (i, c) in a.chunks(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            w
        };
        FlowKey {
            src: words(src),
            dst: words(dst),
            sport: u16::from_ne_bytes(sport.to_be_bytes()),
            dport: u16::from_ne_bytes(dport.to_be_bytes()),
            family: if src.len() == 4 { FAMILY_V4 } else { FAMILY_V6 },
            _pad: [0; 3],
        }
    }

    /// The 40 bytes the flow hash is defined over, laid out from the key's meaning (not from
    /// its memory): src (16), dst (16), sport, dport (big-endian, as on the wire), family, 0 0 0.
    fn wire_bytes(src: &[u8], dst: &[u8], sport: u16, dport: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(src);
        b.resize(16, 0);
        b.extend_from_slice(dst);
        b.resize(32, 0);
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&dport.to_be_bytes());
        b.push(if src.len() == 4 { FAMILY_V4 } else { FAMILY_V6 });
        b.extend_from_slice(&[0, 0, 0]);
        b
    }

    #[test]
    fn flow_hash_known_vectors() {
        // Computed by the Python `mmh3` package (a C port of SMHasher's MurmurHash3), a third
        // implementation: mmh3.hash(bytes(wire_bytes(..)), 0x6369646c, signed=False).
        // (src, dst, sport, dport, hash)
        type Vector = (&'static [u8], &'static [u8], u16, u16, u32);
        let cases: &[Vector] = &[
            (&[192, 0, 2, 1], &[192, 0, 2, 10], 40000, 5684, 0x8f95_bac7),
            (
                &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                &[
                    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
                ],
                5684,
                5684,
                0xe249_14c2,
            ),
        ];
        for &(src, dst, sport, dport, want) in cases {
            let k = key(src, dst, sport, dport);
            let bytes = wire_bytes(src, dst, sport, dport);
            assert_eq!(bytes.len(), 40);
            assert_eq!(murmur3_bytes(&bytes, FLOW_SEED), want, "reference, {src:?}");
            assert_eq!(flow_hash(&k), want, "flow_hash, {src:?}");
        }
    }

    /// Random keys (a fixed-seed splitmix64 stream, so failures reproduce) agree with the
    /// byte-oriented reference.
    #[test]
    fn flow_hash_matches_reference_on_random_keys() {
        let mut rng = SplitMix64(1);
        for i in 0..10_000 {
            let v6 = i % 2 == 1;
            let n = if v6 { 16 } else { 4 };
            let src: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let dst: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let (sp, dp) = (rng.next() as u16, rng.next() as u16);
            let k = key(&src, &dst, sp, dp);
            assert_eq!(
                flow_hash(&k),
                murmur3_bytes(&wire_bytes(&src, &dst, sp, dp), FLOW_SEED),
                "key {k:?}"
            );
        }
    }

    #[test]
    fn padding_bytes_do_not_change_the_hash() {
        let mut k = key(&[10, 0, 0, 1], &[10, 0, 0, 2], 1, 2);
        let h = flow_hash(&k);
        k._pad = [0xff, 0x12, 0x34];
        assert_eq!(flow_hash(&k), h);
    }

    /// Flipping any one of the key's 296 meaningful bits flips each output bit with probability
    /// within 0.5 ± 0.05 (over 2000 random keys per input bit; a weak hash such as the rounds
    /// without `fmix32` fails this by a wide margin).
    #[test]
    fn avalanche() {
        let mut rng = SplitMix64(7);
        const TRIALS: u32 = 2000;
        let mut worst: f64 = 0.0;
        // Meaningful bits: src, dst (256), ports (32), family (8).
        for bit in 0..296u32 {
            let mut flips = [0u32; 32];
            for _ in 0..TRIALS {
                let mut k = random_key(&mut rng);
                let h0 = flow_hash(&k);
                flip(&mut k, bit);
                let d = h0 ^ flow_hash(&k);
                for (o, f) in flips.iter_mut().enumerate() {
                    *f += (d >> o) & 1;
                }
            }
            for (o, f) in flips.iter().enumerate() {
                let p = f64::from(*f) / f64::from(TRIALS);
                worst = worst.max((p - 0.5).abs());
                assert!(
                    (p - 0.5).abs() < 0.05,
                    "input bit {bit} flips output bit {o} with probability {p}"
                );
            }
        }
        assert!(worst > 0.0, "no variation measured at all");
    }

    /// Consecutive source ports of one client (the worst case a NAT produces) and random keys
    /// spread evenly over the 65537 slots of a default Maglev table and over 64 buckets:
    /// chi-square within a generous bound of its expectation.
    #[test]
    fn distribution_over_slots() {
        const SIZE: u32 = 65537;
        const N: u32 = 1 << 20;
        let mut slots = std::vec![0u32; SIZE as usize];
        let mut buckets = [0u32; 64];
        for i in 0..N {
            // 16 clients × 65536 source ports, all to one VIP and port.
            let k = key(
                &[198, 51, 100, (i >> 16) as u8],
                &[192, 0, 2, 10],
                i as u16,
                5684,
            );
            let h = flow_hash(&k);
            slots[(h % SIZE) as usize] += 1;
            buckets[(h % 64) as usize] += 1;
        }
        let chi = |counts: &[u32]| {
            let e = f64::from(N) / counts.len() as f64;
            counts
                .iter()
                .map(|&c| (f64::from(c) - e).powi(2) / e)
                .sum::<f64>()
        };
        // Chi-square with k-1 degrees of freedom has mean k-1 and standard deviation
        // sqrt(2(k-1)); allow 6 standard deviations.
        let (c_slots, c_buckets) = (chi(&slots), chi(&buckets));
        let bound = |k: f64| (k - 1.0) + 6.0 * (2.0 * (k - 1.0)).sqrt();
        assert!(
            c_slots < bound(f64::from(SIZE)),
            "chi-square over {SIZE} slots: {c_slots}"
        );
        assert!(
            c_buckets < bound(64.0),
            "chi-square over 64 buckets: {c_buckets}"
        );
        assert!(slots.iter().all(|&c| c > 0), "an empty slot among {SIZE}");
    }

    fn random_node(rng: &mut SplitMix64) -> Node {
        let w = |rng: &mut SplitMix64| rng.next() as u32;
        Node {
            addr6: [w(rng), w(rng), w(rng), w(rng)],
            addr4: w(rng),
            port: rng.next() as u16,
            flags: 1 + (rng.next() % 3) as u16,
            slot: rng.range(0, 1024),
            check: 0,
        }
        .sealed()
    }

    /// A node read while the agent overwrites it with another: each byte from one or the other.
    fn torn(old: &Node, new: &Node, mask: u32) -> Node {
        // SAFETY: Node is repr(C) plain integers without padding (32 bytes, asserted in maps.rs).
        let (a, b) = unsafe {
            (
                core::mem::transmute::<Node, [u8; 32]>(*old),
                core::mem::transmute::<Node, [u8; 32]>(*new),
            )
        };
        let mut out = [0u8; 32];
        for i in 0..32 {
            out[i] = if mask >> i & 1 == 1 { b[i] } else { a[i] };
        }
        // SAFETY: as above; every bit pattern is a valid Node.
        unsafe { core::mem::transmute::<[u8; 32], Node>(out) }
    }

    #[test]
    fn node_check_catches_torn_reads() {
        let mut rng = SplitMix64(0x6e6f_6465);
        let mut torn_seen = 0;
        for _ in 0..2_000 {
            let old = random_node(&mut rng);
            let mut new = random_node(&mut rng);
            new.slot = old.slot;
            let new = new.sealed();
            // Torn at 8-byte words (how memcpy moves them) and at random bytes.
            let masks = (1..15u32)
                .map(|q| {
                    (0..4).fold(0, |m, i| {
                        if q >> i & 1 == 1 {
                            m | 0xff << (8 * i)
                        } else {
                            m
                        }
                    })
                })
                .chain((0..16).map(|_| rng.next() as u32));
            for mask in masks {
                let t = torn(&old, &new, mask);
                if t == old || t == new {
                    continue;
                }
                torn_seen += 1;
                assert_ne!(t.check, node_check(&t), "{old:?} / {new:?} mask {mask:#x}");
            }
            assert_eq!(old.check, node_check(&old));
        }
        assert!(torn_seen > 10_000, "{torn_seen}");
    }

    fn random_key(rng: &mut SplitMix64) -> FlowKey {
        let mut k = FlowKey {
            family: if rng.next() & 1 == 0 {
                FAMILY_V4
            } else {
                FAMILY_V6
            },
            sport: rng.next() as u16,
            dport: rng.next() as u16,
            ..FlowKey::default()
        };
        for w in k.src.iter_mut().chain(k.dst.iter_mut()) {
            *w = rng.next() as u32;
        }
        k
    }

    fn flip(k: &mut FlowKey, bit: u32) {
        let (w, b) = (bit / 32, bit % 32);
        match w {
            0..=3 => k.src[w as usize] ^= 1 << b,
            4..=7 => k.dst[w as usize - 4] ^= 1 << b,
            8 if b < 16 => k.sport ^= 1 << b,
            8 => k.dport ^= 1 << (b - 16),
            _ => k.family ^= 1 << b,
        }
    }
}
