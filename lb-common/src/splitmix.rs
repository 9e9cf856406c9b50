//! splitmix64 (Steele, Lea, Flood 2014): a small fixed-seed generator for test inputs, so a
//! failing random case reproduces on every machine. Not for anything that needs unpredictability.

/// The generator's state; the seed is the first state (`SplitMix64(1)`).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 pseudo-random bits.
    #[expect(
        clippy::should_implement_trait,
        reason = "an infinite stream of u64, not an Iterator callers would collect"
    )]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform (up to modulo bias) in `lo..=hi`; `lo <= hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % (u64::from(hi - lo) + 1)) as u32
    }
}

#[cfg(test)]
mod tests {
    /// The published first outputs of splitmix64 from state 0 (the reference C code's
    /// `next()`), so the generator is the algorithm its doc names.
    #[test]
    fn published_vector() {
        let mut r = super::SplitMix64(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next(), 0x6e78_9e6a_a1b9_65f4);
    }
}
