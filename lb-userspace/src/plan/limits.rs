//! `limits:` as the datapath holds it: the `LIMIT_CFG` value (GCRA intervals and tolerances)
//! and the `LIMIT_EXEMPT` keys.

use aya::maps::lpm_trie::Key;
use lb_common::limits::{ExemptKey, LimitConfig, LIMIT_F_GLOBAL, LIMIT_F_SOURCE};

use crate::config::limits::{Limits, Prefix, Rate};

/// Nanoseconds per new flow when `share` CPUs split the rate, rounded up (never faster than
/// configured).
fn interval_ns(rate: Rate, share: u64) -> u64 {
    let ns = rate.per.as_nanos().saturating_mul(u128::from(share));
    let count = u128::from(rate.count.max(1));
    u64::try_from(ns.div_ceil(count)).unwrap_or(u64::MAX)
}

/// The `LIMIT_EXEMPT` key of a prefix: IPv4 as IPv4-mapped IPv6, host bits cleared.
pub fn exempt_key(p: Prefix) -> Key<ExemptKey> {
    let (bytes, len) = match p.addr {
        std::net::IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), u32::from(p.len) + 96),
        std::net::IpAddr::V6(a) => (a.octets(), u32::from(p.len)),
    };
    let v = u128::from_be_bytes(bytes);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    Key::new(len, (v & mask).to_be_bytes())
}

/// The `LIMIT_EXEMPT` keys of `limits` (none without limits).
pub fn exempt_keys(limits: Option<&Limits>) -> Vec<Key<ExemptKey>> {
    limits
        .map(|l| l.exempt.iter().map(|&p| exempt_key(p)).collect())
        .unwrap_or_default()
}

/// The `LIMIT_CFG` value for `limits` (one global bucket shared by every CPU). `None`: all
/// zero, no limits.
pub fn limit_config(limits: Option<&Limits>) -> LimitConfig {
    let Some(l) = limits else {
        return LimitConfig::default();
    };
    let mut c = LimitConfig {
        known_ns: u64::try_from(l.known_for.as_nanos()).unwrap_or(u64::MAX),
        ..LimitConfig::default()
    };
    if let Some(r) = l.new_flows_per_source {
        c.flags |= LIMIT_F_SOURCE;
        c.src_interval_ns = interval_ns(r, 1);
        c.src_tolerance_ns = c.src_interval_ns.saturating_mul(l.burst.unwrap_or(r.count));
    }
    if let Some(r) = l.new_flows {
        c.flags |= LIMIT_F_GLOBAL;
        c.global_interval_ns = interval_ns(r, 1);
        let burst = l.global_burst.unwrap_or(r.count).max(1);
        let reserve = burst * l.known_reserve / 100;
        c.global_tolerance_ns = c.global_interval_ns.saturating_mul(burst);
        c.global_unknown_tolerance_ns = c.global_interval_ns.saturating_mul(burst - reserve);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, SEED};

    #[test]
    fn issue_example_becomes_buckets() {
        let c = parse(&format!(
            "{SEED}limits:\n  new_flows_per_source: \"20/1s\"\n  burst: 40\n  new_flows: \"20000/1s\"\n  exempt: [100.64.0.0/10, \"2001:db8::/32\"]\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let l = limit_config(c.limits.as_ref());
        assert_eq!(l.flags, LIMIT_F_SOURCE | LIMIT_F_GLOBAL);
        assert_eq!(l.src_interval_ns, 50_000_000);
        assert_eq!(l.src_tolerance_ns, 40 * 50_000_000);
        // One bucket for the balancer: 20,000/s, burst 20,000, half of it reserved.
        assert_eq!(l.global_interval_ns, 50_000);
        assert_eq!(l.global_tolerance_ns, 20_000 * 50_000);
        assert_eq!(l.global_unknown_tolerance_ns, 10_000 * 50_000);
        assert_eq!(l.known_ns, 600_000_000_000);
        assert_eq!(limit_config(None), LimitConfig::default());
        let p = exempt_key(Prefix::parse("100.64.0.0/10").unwrap());
        assert_eq!(p.prefix_len(), 106);
        assert_eq!(p.data()[10..13], [0xff, 0xff, 100]);
        // Host bits are cleared.
        assert_eq!(
            exempt_key(Prefix::parse("10.1.2.3/8").unwrap()).data()[13..],
            [0, 0, 0]
        );
    }
}
