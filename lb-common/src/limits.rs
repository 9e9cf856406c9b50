//! New-flow rate limits (`limits:` in the config): map names, keys and values shared by the
//! datapath (`lb-ebpf/src/limit.rs`) and the agent (`lb-userspace/src/limits.rs`).
//!
//! Every bucket is GCRA (the "virtual scheduling" form of a token bucket): its whole state is a
//! theoretical arrival time `tat` in `bpf_ktime_get_ns()` nanoseconds. A new flow at `now`
//! would move it to `max(tat, now) + interval`; it is admitted when that is at most
//! `now + tolerance`, where `tolerance = burst * interval`. An idle bucket thus admits `burst`
//! new flows at once, and `1 / interval` per nanosecond after that. No division in the
//! datapath: the agent computes every interval and tolerance.

use core::mem::size_of;

/// One GCRA step: the bucket's next `tat` if an event at `now` fits within `tolerance`
/// (`burst * interval`), else `None`. Every bucket of the datapath takes this step: the
/// new-flow limits, the ICMP errors sent on to nodes (`icmp.rate`), the packet-too-big
/// answers.
#[inline(always)]
pub const fn gcra(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let next = if tat > now { tat } else { now }.saturating_add(interval);
    // next > now: the subtraction cannot wrap.
    if next - now <= tolerance {
        Some(next)
    } else {
        None
    }
}

/// `LIMIT_CFG` (one-entry array): what is limited and how. All zero: no limits.
pub const LIMIT_CFG: &str = "LIMIT_CFG";
/// `SRC_BUCKETS` (LRU hash): per-source bucket, [`SrcKey`] → `tat` (u64).
pub const SRC_BUCKETS: &str = "SRC_BUCKETS";
/// `GLOBAL_BUCKET` (array, one slot): the global bucket's `tat`, shared by every CPU
/// (compare-and-swap in the datapath).
pub const GLOBAL_BUCKET: &str = "GLOBAL_BUCKET";
/// `KNOWN_SRCS` (LRU hash): sources with an established flow, [`SrcKey`] → last seen (ns).
pub const KNOWN_SRCS: &str = "KNOWN_SRCS";
/// `LIMIT_EXEMPT` (LPM trie): prefixes that skip the per-source bucket, [`ExemptKey`] → 1.
pub const LIMIT_EXEMPT: &str = "LIMIT_EXEMPT";

/// Entries of `SRC_BUCKETS`.
pub const MAX_SRC_BUCKETS: u32 = 1 << 18;
/// Entries of `KNOWN_SRCS`.
pub const MAX_KNOWN_SRCS: u32 = 1 << 16;
/// Entries of `LIMIT_EXEMPT`.
pub const MAX_EXEMPT: u32 = 1024;

/// [`LimitConfig::flags`]: the per-source bucket is on.
pub const LIMIT_F_SOURCE: u32 = 1;
/// [`LimitConfig::flags`]: the global bucket is on.
pub const LIMIT_F_GLOBAL: u32 = 2;

/// `LIMIT_CFG` value. The agent writes it on every provision, so a reload changes limits
/// without reloading the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitConfig {
    /// `LIMIT_F_*`; 0: no limit at all (and no lookup beyond this entry).
    pub flags: u32,
    pub _pad: u32,
    /// Per source: nanoseconds per new flow.
    pub src_interval_ns: u64,
    /// Per source: `burst * src_interval_ns`.
    pub src_tolerance_ns: u64,
    /// Global: nanoseconds per new flow.
    pub global_interval_ns: u64,
    /// Global: tolerance for known sources (`global_burst * global_interval_ns`).
    pub global_tolerance_ns: u64,
    /// Global: tolerance for other sources, the burst minus the reserve (`known_reserve`)
    /// that only known sources may take.
    pub global_unknown_tolerance_ns: u64,
    /// A source stays known this long after its last established-flow packet.
    pub known_ns: u64,
}

/// Key of `SRC_BUCKETS` and `KNOWN_SRCS`: an IPv4 address, or the /64 of an IPv6 address
/// (words 2 and 3 zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Data of an `LIMIT_EXEMPT` key (after the kernel's `prefix_len: u32`): IPv4 as
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, prefix length + 96), so one trie holds both families.
pub type ExemptKey = [u8; 16];

const _: () = {
    assert!(size_of::<LimitConfig>() == 56);
    assert!(size_of::<SrcKey>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only with explicit padding fields.
    unsafe impl aya::Pod for super::LimitConfig {}
    unsafe impl aya::Pod for super::SrcKey {}
}
