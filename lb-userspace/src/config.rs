//! The YAML node map (a contract: every key is documented in README.md) and its validation.
//!
//! Parsing goes through serde (which names the key and line of a type error); validation then
//! checks what types cannot: ranges, uniqueness, and whether the datapath can represent the
//! config (e.g. stateless reverse NAT needs every node address+port to map back to one VIP).

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{DpConfig, MAX_FLOW_CAPACITY, MAX_IFACES, MAX_NODES, MAX_REVERSE, MAX_VIPS};
use serde::{de, Deserialize, Deserializer};

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {problem}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeCfg {
    /// Native (driver) mode if the driver supports it, else generic, with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownNode {
    #[default]
    Drop,
    Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowPolicy {
    #[default]
    RoundRobin,
}

/// An inclusive UDP port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.lo..=self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Str(String),
        }
        let port = |v: i64| -> Result<u16, D::Error> {
            if (1..=65535).contains(&v) {
                Ok(v as u16)
            } else {
                Err(de::Error::custom(format!("port {v} is outside 1..65535")))
            }
        };
        match Raw::deserialize(d)? {
            Raw::Num(n) => {
                let p = port(n)?;
                Ok(PortRange { lo: p, hi: p })
            }
            Raw::Str(s) => {
                let parse = |t: &str| {
                    t.trim().parse::<i64>().map_err(|_| {
                        de::Error::custom(format!(
                            "{s:?} is not a port or a range like \"20000-20100\""
                        ))
                    })
                };
                let (lo, hi) = match s.split_once('-') {
                    Some((a, b)) => (port(parse(a)?)?, port(parse(b)?)?),
                    None => {
                        let p = port(parse(&s)?)?;
                        (p, p)
                    }
                };
                if lo > hi {
                    return Err(de::Error::custom(format!(
                        "range {s:?} ends before it starts"
                    )));
                }
                Ok(PortRange { lo, hi })
            }
        }
    }
}

/// Parses "30s", "500ms", "5m", "1h", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}

/// A duration field; serde_yaml reports errors raised here at the enclosing map, so the message
/// names the key itself.
fn duration_field<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(Duration::from_secs(n)),
        Raw::Str(s) => parse_duration(&s).ok_or_else(|| {
            de::Error::custom(format!(
                "{key}: {s:?} is not a duration like \"30s\", \"500ms\", \"5m\""
            ))
        }),
    }
}

fn de_idle_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_field(d, "idle_timeout")
}

/// `address: 192.0.2.1` or, for a dual-stack node, `address: [192.0.2.1, "2001:db8::1"]`.
fn de_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(IpAddr),
        Many(Vec<IpAddr>),
    }
    Ok(
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected an IP address or a list of up to two (one IPv4, one IPv6)")
        })? {
            Raw::One(a) => vec![a],
            Raw::Many(v) => v,
        },
    )
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub address: IpAddr,
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dtls {
    pub cid_length: u32,
    pub node_id_offset: u32,
    pub node_id_length: u32,
    pub unknown_node: UnknownNode,
}

impl Default for Dtls {
    fn default() -> Self {
        Self {
            cid_length: 6,
            node_id_offset: 0,
            node_id_length: 1,
            unknown_node: UnknownNode::Drop,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flows {
    pub policy: FlowPolicy,
    #[serde(deserialize_with = "de_idle_timeout")]
    pub idle_timeout: Duration,
    pub capacity: u32,
}

impl Default for Flows {
    fn default() -> Self {
        Self {
            policy: FlowPolicy::RoundRobin,
            idle_timeout: Duration::from_secs(30),
            capacity: lb_common::DEFAULT_FLOW_CAPACITY,
        }
    }
}

/// What a node takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// New flows, existing flows and CID records.
    #[default]
    Active,
    /// No new flows; existing flows and CID records continue.
    Draining,
    /// Nothing new; its CID records follow `dtls.unknown_node`, its flows move on.
    Disabled,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: u32,
    #[serde(rename = "address", deserialize_with = "de_addresses")]
    pub addresses: Vec<IpAddr>,
    /// Destination port on the node; `None` keeps the VIP port the client used.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub state: NodeState,
    /// Share of new flows relative to other nodes (1..=100).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A DTLS 1.2 ClientHello; a HelloVerifyRequest or ServerHello means alive.
    Dtls,
    /// A UDP datagram; alive unless ICMP says port or host unreachable.
    Udp,
    /// No health checks: every node is up.
    #[default]
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub probe: Probe,
    #[serde(deserialize_with = "de_interval")]
    pub interval: Duration,
    #[serde(deserialize_with = "de_timeout")]
    pub timeout: Duration,
    /// Failed probes in a row that mark a node down.
    pub fall: u32,
    /// Good probes in a row that mark a down node up again.
    pub rise: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            probe: Probe::None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 2,
        }
    }
}

fn de_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_field(d, "interval")
}

fn de_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_field(d, "timeout")
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stats {
    /// Address to serve Prometheus `/metrics` on, e.g. `127.0.0.1:9105`.
    pub prometheus: Option<std::net::SocketAddr>,
}

impl Node {
    pub fn v4(&self) -> Option<IpAddr> {
        self.addresses.iter().copied().find(IpAddr::is_ipv4)
    }
    pub fn v6(&self) -> Option<IpAddr> {
        self.addresses.iter().copied().find(IpAddr::is_ipv6)
    }
    pub fn address_for(&self, vip: IpAddr) -> Option<IpAddr> {
        if vip.is_ipv4() {
            self.v4()
        } else {
            self.v6()
        }
    }
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/cidlb";

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

/// A validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpModeCfg,
    pub vips: Vec<Vip>,
    #[serde(default)]
    pub dtls: Dtls,
    #[serde(default)]
    pub flows: Flows,
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub stats: Stats,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Shadow mode (`cidlb run --shadow`, not a config key): decide and count, pass everything.
    #[serde(skip)]
    pub shadow: bool,
}

/// One stateless reverse-NAT entry: replies from `node_addr:node_port` come from `vip:vip_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReverseEntry {
    pub node_index: usize,
    pub node_addr: IpAddr,
    pub node_port: u16,
    pub vip: IpAddr,
    pub vip_port: u16,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                file: file.to_owned(),
                key,
                problem,
            })?;
        Ok(cfg)
    }

    /// The UDP port health probes go to on `node`: its own port, else the first VIP port of
    /// the node's family.
    pub fn probe_port(&self, node: &Node) -> u16 {
        node.port.unwrap_or_else(|| {
            self.vips
                .iter()
                .find(|v| node.address_for(v.address).is_some())
                .and_then(|v| v.ports.first())
                .map_or(0, |p| p.lo)
        })
    }

    /// The datapath's load-time constants.
    pub fn dp_config(&self) -> DpConfig {
        DpConfig {
            cid_len: self.dtls.cid_length,
            node_id_offset: self.dtls.node_id_offset,
            node_id_len: self.dtls.node_id_length,
            unknown_node_flow: u32::from(self.dtls.unknown_node == UnknownNode::Flow),
            idle_timeout_ns: u64::try_from(self.flows.idle_timeout.as_nanos()).unwrap_or(u64::MAX),
            refresh_ns: u64::try_from((self.flows.idle_timeout / 8).as_nanos())
                .unwrap_or(u64::MAX)
                .min(1_000_000_000),
            shadow: u32::from(self.shadow),
            _pad: 0,
        }
    }

    /// Every reverse-NAT entry, plus a warning for each node address+port that several VIP
    /// ports map onto. Replies carry no trace of the port the client used, so such a node's
    /// replies come from one VIP port: the one equal to the node port if listed, else the first.
    pub fn reverse_entries(&self) -> (Vec<ReverseEntry>, Vec<String>) {
        let mut seen: BTreeMap<(IpAddr, u16), (ReverseEntry, usize)> = BTreeMap::new();
        for (ni, node) in self.nodes.iter().enumerate() {
            for vip in &self.vips {
                let Some(node_addr) = node.address_for(vip.address) else {
                    continue;
                };
                for range in &vip.ports {
                    for vip_port in range.ports() {
                        let e = ReverseEntry {
                            node_index: ni,
                            node_addr,
                            node_port: node.port.unwrap_or(vip_port),
                            vip: vip.address,
                            vip_port,
                        };
                        seen.entry((node_addr, e.node_port))
                            .and_modify(|(kept, shadowed)| {
                                *shadowed += 1;
                                if e.vip_port == e.node_port && kept.vip_port != kept.node_port {
                                    *kept = e;
                                }
                            })
                            .or_insert((e, 0));
                    }
                }
            }
        }
        let mut warnings = Vec::new();
        for ((addr, port), (e, shadowed)) in &seen {
            if *shadowed > 0 {
                warnings.push(format!(
                    "nodes[{}]: {} other VIP port(s) map onto {addr} port {port}; its replies will come from {}:{} \
                     only, so clients that used another VIP port will not accept them. Leave out `port` \
                     (the node then listens on each VIP port) to avoid this",
                    e.node_index, shadowed, e.vip, e.vip_port
                ));
            }
        }
        (seen.into_values().map(|(e, _)| e).collect(), warnings)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, p: String| Err((k.to_owned(), p));
        if self.interfaces.is_empty() {
            return err(
                "interfaces",
                "list at least one interface to attach to".into(),
            );
        }
        if self.interfaces.len() > MAX_IFACES as usize {
            return err("interfaces", format!("at most {MAX_IFACES} interfaces"));
        }
        let mut ifs = HashSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return err(
                    &format!("interfaces[{i}]"),
                    format!("{name:?} is not a valid interface name"),
                );
            }
            if !ifs.insert(name) {
                return err(
                    &format!("interfaces[{i}]"),
                    format!("{name:?} is listed twice"),
                );
            }
        }

        if self.vips.is_empty() {
            return err("vips", "list at least one VIP".into());
        }
        if self.vips.len() > MAX_VIPS as usize {
            return err("vips", format!("at most {MAX_VIPS} VIP addresses"));
        }
        let mut vip_addrs = HashSet::new();
        for (i, vip) in self.vips.iter().enumerate() {
            if !vip_addrs.insert(vip.address) {
                return err(
                    &format!("vips[{i}].address"),
                    format!(
                        "{} is listed twice; put all its ports in one entry",
                        vip.address
                    ),
                );
            }
            if vip.ports.is_empty() {
                return err(
                    &format!("vips[{i}].ports"),
                    "list at least one port or range".into(),
                );
            }
        }

        let d = &self.dtls;
        if !(1..=32).contains(&d.cid_length) {
            return err(
                "dtls.cid_length",
                format!(
                    "{} is outside 1..32 (RFC 9146 allows up to 255, cidlb up to 32)",
                    d.cid_length
                ),
            );
        }
        if !(1..=4).contains(&d.node_id_length) {
            return err(
                "dtls.node_id_length",
                format!("{} is outside 1..4", d.node_id_length),
            );
        }
        if d.node_id_offset + d.node_id_length > d.cid_length {
            return err(
                "dtls.node_id_offset",
                format!(
                    "node id bytes {}..{} do not fit in a {}-byte CID",
                    d.node_id_offset,
                    d.node_id_offset + d.node_id_length,
                    d.cid_length
                ),
            );
        }

        if self.flows.idle_timeout.is_zero() {
            return err("flows.idle_timeout", "must be longer than 0".into());
        }
        if !(1..=MAX_FLOW_CAPACITY).contains(&self.flows.capacity) {
            return err(
                "flows.capacity",
                format!(
                    "{} is outside 1..{MAX_FLOW_CAPACITY} (the table is preallocated)",
                    self.flows.capacity
                ),
            );
        }

        if self.nodes.is_empty() {
            return err("nodes", "list at least one node".into());
        }
        if self.nodes.len() > MAX_NODES as usize {
            return err("nodes", format!("at most {MAX_NODES} nodes"));
        }
        let id_limit = 1u64 << (8 * d.node_id_length);
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if u64::from(n.id) >= id_limit {
                return err(
                    &format!("nodes[{i}].id"),
                    format!(
                        "{} does not fit in dtls.node_id_length = {} byte(s)",
                        n.id, d.node_id_length
                    ),
                );
            }
            if !ids.insert(n.id) {
                return err(
                    &format!("nodes[{i}].id"),
                    format!("node id {} is used twice", n.id),
                );
            }
            let (v4, v6) = (
                n.addresses.iter().filter(|a| a.is_ipv4()).count(),
                n.addresses.iter().filter(|a| a.is_ipv6()).count(),
            );
            if n.addresses.is_empty() || v4 > 1 || v6 > 1 {
                return err(
                    &format!("nodes[{i}].address"),
                    "give one address, or one IPv4 and one IPv6".into(),
                );
            }
            for a in &n.addresses {
                if vip_addrs.contains(a) {
                    return err(&format!("nodes[{i}].address"), format!("{a} is also a VIP"));
                }
                if !addrs.insert(*a) {
                    return err(
                        &format!("nodes[{i}].address"),
                        format!("{a} is used by another node"),
                    );
                }
            }
            if !(1..=100).contains(&n.weight) {
                return err(
                    &format!("nodes[{i}].weight"),
                    format!("{} is outside 1..100", n.weight),
                );
            }
            if n.port == Some(0) {
                return err(
                    &format!("nodes[{i}].port"),
                    "0 is not a port; leave it out to keep the VIP port".into(),
                );
            }
        }
        for (i, vip) in self.vips.iter().enumerate() {
            if !self
                .nodes
                .iter()
                .any(|n| n.address_for(vip.address).is_some())
            {
                let fam = if vip.address.is_ipv4() {
                    "IPv4"
                } else {
                    "IPv6"
                };
                return err(
                    &format!("vips[{i}].address"),
                    format!("no node has an {fam} address to serve {}", vip.address),
                );
            }
        }
        for fam in [true, false] {
            let total: u32 = self
                .nodes
                .iter()
                .filter(|n| {
                    if fam {
                        n.v4().is_some()
                    } else {
                        n.v6().is_some()
                    }
                })
                .map(|n| n.weight)
                .sum();
            if total > MAX_NODES {
                return err(
                    "nodes",
                    format!(
                        "weights of the {} nodes add up to {total}, more than {MAX_NODES}",
                        if fam { "IPv4" } else { "IPv6" }
                    ),
                );
            }
        }
        let h = &self.health;
        if h.interval.is_zero() || h.timeout.is_zero() {
            return err(
                "health",
                "interval and timeout must be longer than 0".into(),
            );
        }
        if h.timeout > h.interval {
            return err(
                "health.timeout",
                format!(
                    "{:?} is longer than the interval {:?}",
                    h.timeout, h.interval
                ),
            );
        }
        if h.fall == 0 || h.rise == 0 {
            return err("health", "fall and rise must be at least 1".into());
        }
        let (reverse, _) = self.reverse_entries();
        if reverse.len() > MAX_REVERSE as usize {
            return err(
                "vips",
                format!(
                    "{} node×port pairs exceed the limit of {MAX_REVERSE}",
                    reverse.len()
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
interfaces: [eth0, eth1]
xdp_mode: auto
vips:
  - address: 192.0.2.10
    ports: [5684, "20000-20100"]
dtls:
  cid_length: 6
  node_id_offset: 0
  node_id_length: 1
  unknown_node: drop
flows:
  policy: round_robin
  idle_timeout: 30s
  capacity: 1048576
nodes:
  - id: 1
    address: 192.168.178.123
    port: 5684
  - id: 2
    address: 192.168.178.124
pin_dir: /sys/fs/bpf/cidlb
"#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    fn with(from: &str, to: &str) -> String {
        assert!(SEED.contains(from), "{from:?} not in seed");
        SEED.replacen(from, to, 1)
    }

    #[test]
    fn issue_example_parses() {
        let c = parse(SEED).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.interfaces, ["eth0", "eth1"]);
        assert_eq!(
            c.vips[0].ports,
            [
                PortRange { lo: 5684, hi: 5684 },
                PortRange {
                    lo: 20000,
                    hi: 20100
                }
            ]
        );
        assert_eq!(c.flows.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.nodes[0].port, Some(5684));
        assert_eq!(c.nodes[1].port, None);
        assert_eq!(c.dp_config().idle_timeout_ns, 30_000_000_000);
    }

    #[test]
    fn defaults_apply() {
        let c = parse("interfaces: [e]\nvips: [{address: 192.0.2.1, ports: [1]}]\nnodes: [{id: 1, address: 10.0.0.1}]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.dp_config(), lb_common::DpConfig::DEFAULT);
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.xdp_mode, XdpModeCfg::Auto);
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "cid_length: 6",
                "cid_length: 40",
                &["test.yaml", "dtls.cid_length", "40"],
            ),
            (
                "node_id_length: 1",
                "node_id_length: 5",
                &["dtls.node_id_length"],
            ),
            (
                "node_id_offset: 0",
                "node_id_offset: 6",
                &["dtls.node_id_offset", "do not fit"],
            ),
            (
                "unknown_node: drop",
                "unknown_node: maybe",
                &["test.yaml", "unknown_node", "maybe"],
            ),
            ("xdp_mode: auto", "xdp_mode: turbo", &["xdp_mode", "turbo"]),
            (
                "idle_timeout: 30s",
                "idle_timeout: soon",
                &["idle_timeout", "soon"],
            ),
            (
                "idle_timeout: 30s",
                "idle_timeout: 0s",
                &["flows.idle_timeout"],
            ),
            ("capacity: 1048576", "capacity: 0", &["flows.capacity"]),
            (
                "\"20000-20100\"",
                "\"20100-20000\"",
                &["ports", "ends before it starts"],
            ),
            ("\"20000-20100\"", "70000", &["ports", "70000"]),
            (
                "address: 192.0.2.10",
                "address: 192.0.2.300",
                &["vips", "address"],
            ),
            ("- id: 1", "- id: 2", &["nodes[1].id", "used twice"]),
            ("- id: 1", "- id: 256", &["nodes[0].id", "does not fit"]),
            (
                "address: 192.168.178.124",
                "address: 192.168.178.123",
                &["nodes[1].address", "another node"],
            ),
            (
                "address: 192.168.178.124",
                "address: 192.0.2.10",
                &["nodes[1].address", "also a VIP"],
            ),
            (
                "interfaces: [eth0, eth1]",
                "interfaces: []",
                &["interfaces", "at least one"],
            ),
            (
                "interfaces: [eth0, eth1]",
                "interfaces: [eth0, eth0]",
                &["interfaces[1]", "twice"],
            ),
            ("pin_dir:", "pin_drr:", &["unknown field", "pin_drr"]),
        ];
        for (from, to, want) in cases {
            let text = with(from, to);
            let e = parse(&text).expect_err(&format!("{to:?} should be rejected"));
            for w in *want {
                assert!(e.contains(w), "error for {to:?} lacks {w:?}: {e}");
            }
        }
    }

    #[test]
    fn ambiguous_reverse_nat_warns_and_prefers_the_node_port() {
        // The issue's own example: node 1 listens on 5684 for a VIP with 102 ports.
        let c = parse(SEED).unwrap_or_else(|e| panic!("{e}"));
        let (entries, warnings) = c.reverse_entries();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("nodes[0]: 101 other VIP port(s)"),
            "{}",
            warnings[0]
        );
        let n1: Vec<_> = entries.iter().filter(|e| e.node_index == 0).collect();
        assert_eq!(n1.len(), 1);
        assert_eq!((n1[0].node_port, n1[0].vip_port), (5684, 5684));
        // Node 2 keeps the client's port: one entry per VIP port, no ambiguity.
        assert_eq!(entries.iter().filter(|e| e.node_index == 1).count(), 102);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }

    #[test]
    fn dual_stack_node() {
        let c = parse(&with(
            "address: 192.168.178.124",
            "address: [192.168.178.124, \"2001:db8::2\"]",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.nodes[1].v4().is_some() && c.nodes[1].v6().is_some());
    }
}
