//! `limits:` — new-flow rate limits in the datapath (`lb-ebpf/src/limit.rs`): the config keys,
//! their validation, and the `LIMIT_CFG` / `LIMIT_EXEMPT` contents they become.

use std::{collections::HashSet, fmt, net::IpAddr, time::Duration};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, PerCpuValues,
    },
    Ebpf,
};
use lb_common::limits::{
    self, ExemptKey, LimitConfig, SrcKey, LIMIT_F_GLOBAL, LIMIT_F_SOURCE, MAX_EXEMPT,
};
use serde::{de, Deserialize, Deserializer};

use crate::{
    config::{duration_field, parse_duration},
    datapath::DatapathError,
    provision::{map, merr},
};

/// `"20/1s"`: `count` new flows per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}", self.count, self.per)
    }
}

impl Rate {
    /// Parses `"20/1s"`, `"20/s"`, `"1200/1m"`.
    pub fn parse(s: &str) -> Option<Self> {
        let (n, d) = s.split_once('/')?;
        let count: u64 = n.trim().parse().ok()?;
        let d = d.trim();
        let per = if d.starts_with(|c: char| c.is_ascii_digit()) {
            parse_duration(d)?
        } else {
            parse_duration(&format!("1{d}"))?
        };
        Some(Self { count, per })
    }

    /// Nanoseconds per new flow when `share` CPUs split the rate, rounded up (never faster
    /// than configured).
    fn interval_ns(self, share: u64) -> u64 {
        let ns = self.per.as_nanos().saturating_mul(u128::from(share));
        let count = u128::from(self.count.max(1));
        u64::try_from(ns.div_ceil(count)).unwrap_or(u64::MAX)
    }
}

/// serde_yaml reports errors raised here at the enclosing map, so the message names the key.
fn rate_field<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Option<Rate>, D::Error> {
    let s = String::deserialize(d)?;
    Rate::parse(&s).map(Some).ok_or_else(|| {
        de::Error::custom(format!(
            "{key}: {s:?} is not a rate like \"20/1s\" (new flows per duration: ms, s, m, h)"
        ))
    })
}

fn de_rate_source<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
    rate_field(d, "new_flows_per_source")
}

fn de_rate_global<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
    rate_field(d, "new_flows")
}

fn de_known_for<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_field(d, "known_for")
}

/// An address prefix, `"100.64.0.0/10"` or `"2001:db8::/32"` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length {l:?} is outside 0..{max}"))?
        };
        Ok(Self { addr, len })
    }

    /// The `LIMIT_EXEMPT` key: IPv4 as IPv4-mapped IPv6, host bits cleared.
    pub fn key(self) -> Key<ExemptKey> {
        let (bytes, len) = match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), u32::from(self.len) + 96),
            IpAddr::V6(a) => (a.octets(), u32::from(self.len)),
        };
        let v = u128::from_be_bytes(bytes);
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        Key::new(len, (v & mask).to_be_bytes())
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Prefix::parse(&s).map_err(de::Error::custom)
    }
}

/// `limits:`; absent = no limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// New flows per source (IPv4 address, IPv6 /64).
    #[serde(default, deserialize_with = "de_rate_source")]
    pub new_flows_per_source: Option<Rate>,
    /// Per-source burst; default: the rate's count.
    #[serde(default)]
    pub burst: Option<u64>,
    /// New flows in all, from this balancer.
    #[serde(default, deserialize_with = "de_rate_global")]
    pub new_flows: Option<Rate>,
    /// Global burst; default: the rate's count.
    #[serde(default)]
    pub global_burst: Option<u64>,
    /// Percent of the global burst that only known sources may take (0..=90).
    #[serde(default = "default_reserve")]
    pub known_reserve: u64,
    /// How long a source stays known after its last established-flow packet.
    #[serde(default = "default_known_for", deserialize_with = "de_known_for")]
    pub known_for: Duration,
    /// Prefixes that skip the per-source limit (carrier-grade NATs, trusted networks).
    #[serde(default)]
    pub exempt: Vec<Prefix>,
}

fn default_reserve() -> u64 {
    50
}

fn default_known_for() -> Duration {
    Duration::from_secs(600)
}

/// Upper bound on counts and bursts: keeps `burst × interval` far from u64 overflow.
const MAX_COUNT: u64 = 1 << 32;

/// What `limits:` cannot express: `(key, problem)`, as `validate.rs` reports.
pub(crate) fn validate(l: &Limits) -> Result<(), (String, String)> {
    let err = |k: &str, p: String| Err((format!("limits.{k}"), p));
    if l.new_flows_per_source.is_none() && l.new_flows.is_none() {
        return err(
            "new_flows",
            "set new_flows_per_source, new_flows or both (or remove `limits`)".into(),
        );
    }
    for (key, rate) in [
        ("new_flows_per_source", l.new_flows_per_source),
        ("new_flows", l.new_flows),
    ] {
        if let Some(r) = rate {
            if !(1..=MAX_COUNT).contains(&r.count) {
                return err(key, format!("count {} is outside 1..{MAX_COUNT}", r.count));
            }
            if r.per.is_zero() || r.per > Duration::from_secs(86_400) {
                return err(key, format!("{r}: the duration must be within 1ms..24h"));
            }
        }
    }
    for (key, burst, rate) in [
        ("burst", l.burst, l.new_flows_per_source),
        ("global_burst", l.global_burst, l.new_flows),
    ] {
        match (burst, rate) {
            (Some(_), None) => {
                let of = if key == "burst" {
                    "new_flows_per_source"
                } else {
                    "new_flows"
                };
                return err(
                    key,
                    format!("is set without {of}, which it is the burst of"),
                );
            }
            (Some(b), Some(_)) if !(1..=MAX_COUNT).contains(&b) => {
                return err(key, format!("{b} is outside 1..{MAX_COUNT}"));
            }
            _ => {}
        }
    }
    if l.known_reserve > 90 {
        return err(
            "known_reserve",
            format!(
                "{}% is above 90%: new sources would hardly ever get a flow",
                l.known_reserve
            ),
        );
    }
    if l.known_for.is_zero() {
        return err("known_for", "must be longer than 0".into());
    }
    if !l.exempt.is_empty() && l.new_flows_per_source.is_none() {
        return err(
            "exempt",
            "only skips new_flows_per_source, which is not set".into(),
        );
    }
    if l.exempt.len() > MAX_EXEMPT as usize {
        return err("exempt", format!("at most {MAX_EXEMPT} prefixes"));
    }
    let mut seen = HashSet::new();
    for (i, p) in l.exempt.iter().enumerate() {
        let k = p.key();
        if !seen.insert((k.prefix_len(), k.data())) {
            return err(&format!("exempt[{i}]"), format!("{p} is listed twice"));
        }
    }
    Ok(())
}

/// The `LIMIT_CFG` value for `limits` on a machine with `ncpus` possible CPUs (the global
/// bucket is split evenly over per-CPU buckets). `None`: all zero, no limits.
pub fn limit_config(limits: Option<&Limits>, ncpus: u64) -> LimitConfig {
    let Some(l) = limits else {
        return LimitConfig::default();
    };
    let mut c = LimitConfig {
        known_ns: u64::try_from(l.known_for.as_nanos()).unwrap_or(u64::MAX),
        ..LimitConfig::default()
    };
    if let Some(r) = l.new_flows_per_source {
        c.flags |= LIMIT_F_SOURCE;
        c.src_interval_ns = r.interval_ns(1);
        c.src_tolerance_ns = c.src_interval_ns.saturating_mul(l.burst.unwrap_or(r.count));
    }
    if let Some(r) = l.new_flows {
        let ncpus = ncpus.max(1);
        c.flags |= LIMIT_F_GLOBAL;
        c.global_interval_ns = r.interval_ns(ncpus);
        // Each CPU's share of the burst, at least one flow (so the bound is
        // rate × time + max(burst, CPUs)).
        let share = (l.global_burst.unwrap_or(r.count) / ncpus).max(1);
        let reserve = share * l.known_reserve / 100;
        c.global_tolerance_ns = c.global_interval_ns.saturating_mul(share);
        c.global_unknown_tolerance_ns = c.global_interval_ns.saturating_mul(share - reserve);
    }
    c
}

/// Writes `LIMIT_CFG` and `LIMIT_EXEMPT` from the config. When the limits change, the buckets
/// start full again (a bucket filled at an old, slower rate would otherwise hold new flows back
/// for up to the old burst's time).
pub fn provision(ebpf: &mut Ebpf, limits: Option<&Limits>) -> Result<(), DatapathError> {
    let ncpus = aya::util::nr_cpus().map_err(|(what, e)| DatapathError::Map {
        name: limits::GLOBAL_BUCKET,
        message: format!("{what}: {e}"),
    })?;
    let want = limit_config(limits, ncpus as u64);

    // Exempt prefixes first: a new prefix is in place before a limit that needs it.
    {
        let mut trie: LpmTrie<&mut MapData, ExemptKey, u8> =
            LpmTrie::try_from(map(ebpf, limits::LIMIT_EXEMPT)?)
                .map_err(merr(limits::LIMIT_EXEMPT))?;
        let keep: Vec<Key<ExemptKey>> = limits
            .map(|l| l.exempt.iter().map(|p| p.key()).collect())
            .unwrap_or_default();
        for k in &keep {
            trie.insert(k, 1, 0).map_err(merr(limits::LIMIT_EXEMPT))?;
        }
        let stale: Vec<Key<ExemptKey>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !keep
                    .iter()
                    .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        for k in stale {
            trie.remove(&k).map_err(merr(limits::LIMIT_EXEMPT))?;
        }
    }

    let mut cfg: Array<&mut MapData, LimitConfig> =
        Array::try_from(map(ebpf, limits::LIMIT_CFG)?).map_err(merr(limits::LIMIT_CFG))?;
    let old = cfg.get(&0, 0).map_err(merr(limits::LIMIT_CFG))?;
    if old == want {
        return Ok(());
    }
    cfg.set(0, want, 0).map_err(merr(limits::LIMIT_CFG))?;

    let mut global: PerCpuArray<&mut MapData, u64> =
        PerCpuArray::try_from(map(ebpf, limits::GLOBAL_BUCKET)?)
            .map_err(merr(limits::GLOBAL_BUCKET))?;
    let zero = PerCpuValues::try_from(vec![0u64; ncpus]).map_err(|e| DatapathError::Map {
        name: limits::GLOBAL_BUCKET,
        message: e.to_string(),
    })?;
    global
        .set(0, zero, 0)
        .map_err(merr(limits::GLOBAL_BUCKET))?;
    let mut src: HashMap<&mut MapData, SrcKey, u64> =
        HashMap::try_from(map(ebpf, limits::SRC_BUCKETS)?).map_err(merr(limits::SRC_BUCKETS))?;
    let keys: Vec<SrcKey> = src.keys().filter_map(Result::ok).collect();
    for k in keys {
        // Gone already (evicted or expired under us) is fine.
        let _ = src.remove(&k);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, SEED};

    fn with_limits(l: &str) -> Result<crate::config::Config, String> {
        parse(&format!("{SEED}limits:\n{l}"))
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("20/1s"),
            Some(Rate {
                count: 20,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            Rate::parse("20/m").map(|r| r.per),
            Some(Duration::from_secs(60))
        );
        assert_eq!(Rate::parse("5/500ms").map(|r| r.count), Some(5));
        for bad in ["20", "x/1s", "20/1 fortnight", "/1s", "-1/1s"] {
            assert_eq!(Rate::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn issue_example_becomes_buckets() {
        let c = with_limits(
            "  new_flows_per_source: \"20/1s\"\n  burst: 40\n  new_flows: \"20000/1s\"\n  exempt: [100.64.0.0/10, \"2001:db8::/32\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let l = limit_config(c.limits.as_ref(), 2);
        assert_eq!(l.flags, LIMIT_F_SOURCE | LIMIT_F_GLOBAL);
        assert_eq!(l.src_interval_ns, 50_000_000);
        assert_eq!(l.src_tolerance_ns, 40 * 50_000_000);
        // Two CPUs: 10,000/s each, burst 10,000 each, half of it reserved.
        assert_eq!(l.global_interval_ns, 100_000);
        assert_eq!(l.global_tolerance_ns, 10_000 * 100_000);
        assert_eq!(l.global_unknown_tolerance_ns, 5_000 * 100_000);
        assert_eq!(l.known_ns, 600_000_000_000);
        assert_eq!(limit_config(None, 2), LimitConfig::default());
        let p = Prefix::parse("100.64.0.0/10").unwrap();
        assert_eq!(p.key().prefix_len(), 106);
        assert_eq!(p.key().data()[10..13], [0xff, 0xff, 100]);
        // Host bits are cleared.
        assert_eq!(
            Prefix::parse("10.1.2.3/8").unwrap().key().data()[13..],
            [0, 0, 0]
        );
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases: &[(&str, &[&str])] = &[
            ("  burst: 3\n", &["test.yaml", "limits.new_flows", "set"]),
            (
                "  new_flows: \"20000/1s\"\n  burst: 3\n",
                &["limits.burst", "without new_flows_per_source"],
            ),
            (
                "  new_flows_per_source: \"20 per second\"\n",
                &[
                    "test.yaml",
                    "new_flows_per_source",
                    "20 per second",
                    "not a rate",
                ],
            ),
            ("  new_flows: \"0/1s\"\n", &["limits.new_flows", "count 0"]),
            ("  new_flows: \"5/0s\"\n", &["limits.new_flows", "duration"]),
            (
                "  new_flows_per_source: \"20/1s\"\n  burst: 0\n",
                &["limits.burst", "0 is outside"],
            ),
            (
                "  new_flows: \"20/1s\"\n  known_reserve: 95\n",
                &["limits.known_reserve", "95%"],
            ),
            (
                "  new_flows: \"20/1s\"\n  exempt: [10.0.0.0/8]\n",
                &["limits.exempt", "new_flows_per_source"],
            ),
            (
                "  new_flows_per_source: \"20/1s\"\n  exempt: [10.0.0.0/33]\n",
                &["exempt", "10.0.0.0/33", "outside 0..32"],
            ),
            (
                "  new_flows_per_source: \"20/1s\"\n  exempt: [10.0.0.0/8, 10.9.0.0/8]\n",
                &["limits.exempt[1]", "twice"],
            ),
            (
                "  new_flows: \"20/1s\"\n  known_for: soon\n",
                &["limits", "known_for", "soon"],
            ),
            (
                "  new_flows: \"20/1s\"\n  rate: 5\n",
                &["unknown field", "rate"],
            ),
        ];
        for (l, want) in cases {
            let e = with_limits(l).expect_err(&format!("{l:?} should be rejected"));
            for w in *want {
                assert!(e.contains(w), "error for {l:?} lacks {w:?}: {e}");
            }
        }
        assert!(parse(SEED).unwrap().limits.is_none());
    }
}
