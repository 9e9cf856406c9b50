//! `limits:`, the new-flow rate limits (`lb-ebpf/src/limit.rs` applies them): the keys and their
//! parsing. `validate.rs` checks them; `plan/limits.rs` turns them into `LIMIT_CFG` and
//! `LIMIT_EXEMPT` contents.

use std::{fmt, net::IpAddr, time::Duration};

use serde::{de, Deserialize, Deserializer};

use super::duration::{duration_field, parse_duration};

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
    /// How long a source stays known after it last echoed a node's cookie.
    #[serde(default = "default_known_for", deserialize_with = "de_known_for")]
    pub known_for: Duration,
    /// Prefixes that skip the per-source limit (carrier-grade NATs, trusted networks).
    #[serde(default)]
    pub exempt: Vec<Prefix>,
    /// Entries of `COOKIES`: nodes' cookies on their way to clients, kept until a ClientHello
    /// echoes them (at least the new flows admitted per handshake round trip).
    #[serde(default = "default_cookie_capacity")]
    pub cookie_capacity: u32,
    /// Entries of `FRAGS`: the first fragment's decision for the later fragments of each
    /// fragmented datagram (to a VIP, or a node's reply), kept until evicted.
    #[serde(default = "default_fragment_capacity")]
    pub fragment_capacity: u32,
}

fn default_cookie_capacity() -> u32 {
    lb_common::cookie::DEFAULT_COOKIE_CAPACITY
}

fn default_fragment_capacity() -> u32 {
    lb_common::frag::DEFAULT_FRAG_CAPACITY
}

fn default_reserve() -> u64 {
    50
}

fn default_known_for() -> Duration {
    Duration::from_secs(600)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
