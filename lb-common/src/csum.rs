//! Incremental Internet checksum updates (RFC 1071 one's complement sum, RFC 1624 eqn. 3).
//!
//! Values are taken exactly as loaded from the packet (`from_ne_bytes` of the wire bytes) and the
//! result is stored back the same way: the one's complement sum does not depend on byte order
//! as long as every term is treated alike (RFC 1071 §2 B). Summing 32-bit words into a u64 and
//! folding is equivalent to summing 16-bit words (RFC 1071 §2 C, "parallel summation").
//!
//! Pure integer code, so the same functions run in the XDP program and in host unit tests.

/// Running difference of an incremental update: starts from a checksum field, accumulates
/// replaced words, and produces the new checksum field.
#[derive(Clone, Copy, Debug)]
pub struct CsumDelta(u64);

impl CsumDelta {
    /// Starts from the current value of a checksum field.
    #[inline(always)]
    pub const fn from_check(check: u16) -> Self {
        Self(!check as u64)
    }

    /// Accounts for a 32-bit word changing from `old` to `new`.
    #[inline(always)]
    pub const fn replace32(self, old: u32, new: u32) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Accounts for a 16-bit word changing from `old` to `new`.
    #[inline(always)]
    pub const fn replace16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Accounts for a 128-bit address changing from `old` to `new`.
    #[inline(always)]
    pub const fn replace128(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        self.replace32(old[0], new[0])
            .replace32(old[1], new[1])
            .replace32(old[2], new[2])
            .replace32(old[3], new[3])
    }

    /// The new checksum field value.
    #[inline(always)]
    pub const fn finish(self) -> u16 {
        !fold(self.0)
    }

    /// The new UDP checksum field: a computed 0 is sent as 0xFFFF (RFC 768; RFC 8200 §8.1),
    /// because 0 means "no checksum" for IPv4 UDP and is invalid for IPv6 UDP.
    #[inline(always)]
    pub const fn finish_udp(self) -> u16 {
        match self.finish() {
            0 => 0xffff,
            c => c,
        }
    }
}

/// Folds a u64 one's complement accumulator to 16 bits. Fixed number of steps (no loop) so the
/// BPF verifier sees straight-line code; four folds suffice for any sum of < 2^32 terms.
#[inline(always)]
pub const fn fold(s: u64) -> u16 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full RFC 1071 checksum over bytes (reference for the tests).
    fn full(bytes: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for c in bytes.chunks(2) {
            let w = if c.len() == 2 {
                [c[0], c[1]]
            } else {
                [c[0], 0]
            };
            s += u16::from_ne_bytes(w) as u64;
        }
        !fold(s)
    }

    #[test]
    fn incremental_matches_full_recompute() {
        // An IPv4 header with a correct checksum, then the destination address changed.
        let mut h: [u8; 20] = [
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 198, 51, 100, 7, 192, 0, 2, 10,
        ];
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(full(&h), 0);

        for new in [
            [10u8, 0, 0, 1],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [203, 0, 113, 99],
        ] {
            let mut g = h;
            let old = u32::from_ne_bytes(g[16..20].try_into().unwrap());
            g[16..20].copy_from_slice(&new);
            let check = u16::from_ne_bytes([g[10], g[11]]);
            let upd = CsumDelta::from_check(check)
                .replace32(old, u32::from_ne_bytes(new))
                .finish();
            g[10..12].copy_from_slice(&upd.to_ne_bytes());
            assert_eq!(full(&g), 0, "header {g:?}");
        }
    }

    #[test]
    fn ttl_as_16bit_word() {
        let mut h: [u8; 20] = [
            0x46, 0, 0, 44, 0, 1, 0, 0, 1, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        let old = u16::from_ne_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_ne_bytes([h[8], h[9]]);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let upd = CsumDelta::from_check(check).replace16(old, new).finish();
        h[10..12].copy_from_slice(&upd.to_ne_bytes());
        assert_eq!(full(&h), 0);
    }

    #[test]
    fn udp_zero_becomes_ffff() {
        // A delta that lands exactly on a computed checksum of 0.
        let d = CsumDelta::from_check(0xffff).replace16(0, 0);
        assert_eq!(d.finish(), 0);
        assert_eq!(d.finish_udp(), 0xffff);
    }
}
