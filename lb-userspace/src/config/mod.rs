//! The YAML schema (a contract: every key is documented in docs/configuration.md, and a
//! test below fails on a key without a row there), as serde types.
//!
//! Parsing goes through serde (which names the key and line of a type error); `validate.rs`
//! checks what types cannot, and holds `Config::load` and `Config::parse`, which do both.

pub mod duration;
pub mod limits;
pub mod node;

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::DpConfig;
use serde::{de, Deserialize, Deserializer};

use self::{duration::duration_field, limits::Limits};

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
    /// A new flow takes the owner of its slot in the Maglev table (`maglev.rs`): the same
    /// node on every balancer with the same config, and after a cold restart.
    #[default]
    Maglev,
    /// A new flow takes the next node of a per-CPU weighted ring: local to one CPU of one box.
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
    /// How a packet reaches its node: `nat` (destination rewritten; replies come back through
    /// the balancer) or `tunnel` (encapsulated; the node answers the client directly).
    #[serde(default)]
    pub forwarding: Forwarding,
    /// The encapsulation of a `forwarding: tunnel` VIP.
    #[serde(default)]
    pub tunnel: Option<Tunnel>,
}

impl Vip {
    /// The tunnel settings if this VIP is in tunnel mode.
    pub fn tunnel(&self) -> Option<&Tunnel> {
        match self.forwarding {
            Forwarding::Tunnel => self.tunnel.as_ref(),
            Forwarding::Nat => None,
        }
    }
}

/// `vips[].forwarding`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    #[default]
    Nat,
    Tunnel,
}

/// `vips[].tunnel.encap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encap {
    /// IP in IP (RFC 2003 / RFC 2473).
    Ipip,
    /// IP in UDP, GUE variant 1.
    Gue,
}

/// `vips[].tunnel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    pub encap: Encap,
    /// The outer IPv4 source: an address, or a prefix whose host bits follow the flow.
    #[serde(default)]
    pub source4: Option<limits::Prefix>,
    /// The outer IPv6 source, likewise.
    #[serde(default)]
    pub source6: Option<limits::Prefix>,
    /// The UDP port the nodes decapsulate GUE on (`encap: gue`).
    #[serde(default)]
    pub gue_port: Option<u16>,
    /// The underlay's path MTU to the nodes (outer packets), when it is below what the FIB
    /// says of the next hop (a smaller link several hops away): the smaller of the two is the
    /// tunnel's path MTU. `None`: the FIB's (route or device) MTU alone.
    #[serde(default)]
    pub mtu: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dtls {
    pub cid_length: u32,
    pub node_id_offset: u32,
    pub node_id_length: u32,
    pub unknown_node: UnknownNode,
    /// Record formats routed by CID; `None`: the key is absent (both, with a warning).
    #[serde(deserialize_with = "de_versions")]
    pub versions: Option<Vec<DtlsVersion>>,
}

impl Default for Dtls {
    fn default() -> Self {
        Self {
            cid_length: 6,
            node_id_offset: 0,
            node_id_length: 1,
            unknown_node: UnknownNode::Drop,
            versions: None,
        }
    }
}

/// A DTLS version whose CID record format routes by CID (`dtls.versions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtlsVersion {
    /// DTLS 1.2: tls12_cid records (RFC 9146).
    V12,
    /// DTLS 1.3: unified-header records with a CID (RFC 9147).
    V13,
}

impl DtlsVersion {
    /// The versions routed by CID when `dtls.versions` is absent.
    pub const DEFAULT: [DtlsVersion; 2] = [DtlsVersion::V12, DtlsVersion::V13];

    pub fn name(self) -> &'static str {
        match self {
            DtlsVersion::V12 => "1.2",
            DtlsVersion::V13 => "1.3",
        }
    }

    fn bit(self) -> u32 {
        match self {
            DtlsVersion::V12 => lb_common::DTLS_V12,
            DtlsVersion::V13 => lb_common::DTLS_V13,
        }
    }
}

/// `dtls.versions`: a list of "1.2" / "1.3", quoted or not (YAML reads `1.2` unquoted as a
/// float, and `1.20` is the same float).
fn de_versions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<DtlsVersion>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Str(String),
        Num(f64),
    }
    let raw = Vec::<Raw>::deserialize(d)?;
    raw.into_iter()
        .map(|r| {
            let text = match r {
                Raw::Str(s) => s.trim().to_owned(),
                Raw::Num(f) => f.to_string(),
            };
            match text.as_str() {
                "1.2" => Ok(DtlsVersion::V12),
                "1.3" => Ok(DtlsVersion::V13),
                other => Err(serde::de::Error::custom(format!(
                    "dtls.versions: {other:?} is not a DTLS version cidlb routes by CID; \
                     list \"1.2\" (RFC 9146 tls12_cid records) and/or \"1.3\" (RFC 9147 unified headers)"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl Dtls {
    /// The versions routed by CID (the default when the key is absent).
    pub fn versions(&self) -> &[DtlsVersion] {
        self.versions.as_deref().unwrap_or(&DtlsVersion::DEFAULT)
    }

    /// `DpConfig::dtls_versions`.
    pub fn versions_mask(&self) -> u32 {
        self.versions().iter().fold(0, |m, v| m | v.bit())
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
            policy: FlowPolicy::Maglev,
            idle_timeout: Duration::from_secs(30),
            capacity: lb_common::DEFAULT_FLOW_CAPACITY,
        }
    }
}

/// ICMP errors about a VIP's flows (docs/datapath.md "ICMP errors and path MTU").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Icmp {
    /// Errors forwarded to nodes per second and CPU (`icmp_to_node`); the rest are dropped
    /// (`drop_icmp_ratelimited`).
    pub rate: u32,
}

impl Default for Icmp {
    fn default() -> Self {
        Self {
            rate: lb_common::DEFAULT_ICMP_RATE,
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
    /// Panic mode: when fewer than this percent of a family's active nodes are up, health is
    /// ignored for that family's new flows (every active node takes them). Absent: only when
    /// none is up. 0: never.
    pub panic_threshold: Option<u32>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            probe: Probe::None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 2,
            panic_threshold: None,
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

/// Announcing the VIPs through the operator's routing daemon (`cidlb announce`, `announce.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Announce {
    /// Where `cidlb run` keeps its heartbeat and `cidlb maintenance` its switch.
    pub state_dir: PathBuf,
    /// Kernel routing table `cidlb announce` puts a host route per VIP into while this balancer
    /// can serve it (BIRD: `protocol kernel { kernel table N; learn; }`); 0: no routes, only the
    /// per-VIP files under `state_dir/ready/`.
    pub table: u32,
    /// How old the agent's heartbeat may be before the VIPs are withdrawn: long enough for an
    /// agent restart (or a kill -9 and a restart by systemd) that the pinned datapath rides out.
    #[serde(deserialize_with = "de_grace")]
    pub grace: Duration,
}

impl Default for Announce {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/run/cidlb"),
            table: 0,
            grace: Duration::from_secs(10),
        }
    }
}

fn de_grace<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_field(d, "grace")
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

/// The `pin_dir` of a config file, for commands that only need to find the pinned datapath
/// (`cidlb stats --config`, `cidlb detach --config`). Only that key is read, so a file that no
/// longer validates (edited since `cidlb run` started, or written for another version) still
/// leads to the datapath it names.
pub fn pin_dir_of(path: &Path) -> Result<PathBuf, ConfigError> {
    #[derive(Deserialize)]
    struct PinDirOnly {
        #[serde(default = "default_pin_dir")]
        pin_dir: PathBuf,
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    serde_yaml::from_str::<PinDirOnly>(&text)
        .map(|c| c.pin_dir)
        .map_err(|e| ConfigError::Parse {
            file: path.to_owned(),
            message: e.to_string(),
        })
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
    #[serde(default)]
    pub icmp: Icmp,
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub stats: Stats,
    /// New-flow rate limits (`config/limits.rs`); absent: none.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Present when this balancer runs `cidlb announce` (several balancers behind ECMP);
    /// without it the agent writes no heartbeat.
    #[serde(default)]
    pub announce: Option<Announce>,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Shadow mode (`cidlb run --shadow`, not a config key): decide and count, pass everything.
    #[serde(skip)]
    pub shadow: bool,
}

impl Config {
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

    /// Things that are valid but that the operator should look at (`cidlb check`, `cidlb run`).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.dtls.versions.is_none() {
            w.push(
                "dtls.versions is not set: DTLS 1.2 AND DTLS 1.3 CID records are routed by CID \
                 (earlier cidlb releases routed 1.3 records by flow). Check that your nodes put \
                 their node id at dtls.node_id_offset of the DTLS 1.3 CIDs they issue too, then \
                 set dtls.versions: [\"1.2\", \"1.3\"] (or [\"1.2\"] to keep 1.3 records by flow) \
                 to silence this warning"
                    .to_owned(),
            );
        }
        w
    }

    /// The datapath's load-time constants.
    /// `COOKIES`' size: `limits.cookie_capacity`, or the default without `limits:`.
    pub fn cookie_capacity(&self) -> u32 {
        self.limits
            .as_ref()
            .map_or(lb_common::cookie::DEFAULT_COOKIE_CAPACITY, |l| {
                l.cookie_capacity
            })
    }

    /// `FRAGS`' size: `limits.fragment_capacity`, or the default without `limits:`.
    pub fn fragment_capacity(&self) -> u32 {
        self.limits
            .as_ref()
            .map_or(lb_common::frag::DEFAULT_FRAG_CAPACITY, |l| {
                l.fragment_capacity
            })
    }

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
            policy: match self.flows.policy {
                FlowPolicy::Maglev => lb_common::POLICY_MAGLEV,
                FlowPolicy::RoundRobin => lb_common::POLICY_ROUND_ROBIN,
            },
            dtls_versions: self.dtls.versions_mask(),
            icmp_rate: self.icmp.rate,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The issue's example config; other modules' tests start from it too.
    pub(crate) const SEED: &str = r#"
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

    pub(crate) fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    pub(crate) fn with(from: &str, to: &str) -> String {
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
    fn dtls_versions_quoted_or_not() {
        use lb_common::{DTLS_V12, DTLS_V13};
        let cases = [
            ("[\"1.2\", \"1.3\"]", DTLS_V12 | DTLS_V13),
            ("[1.2, 1.3]", DTLS_V12 | DTLS_V13),
            ("[1.3]", DTLS_V13),
            ("[\"1.2\"]", DTLS_V12),
            ("[1.20]", DTLS_V12),
        ];
        for (list, mask) in cases {
            let text = with(
                "  unknown_node: drop\n",
                &format!("  unknown_node: drop\n  versions: {list}\n"),
            );
            let c = parse(&text).unwrap_or_else(|e| panic!("{list}: {e}"));
            assert_eq!(c.dp_config().dtls_versions, mask, "{list}");
            assert!(c.warnings().is_empty(), "{list}: {:?}", c.warnings());
        }
        // Absent: both formats, and a warning that says what to check.
        let c = parse(SEED).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.dp_config().dtls_versions, DTLS_V12 | DTLS_V13);
        let w = c.warnings().join("\n");
        assert!(
            w.contains("dtls.versions is not set") && w.contains("node_id_offset"),
            "{w}"
        );
        for (list, want) in [
            ("[1.1]", "\"1.1\" is not a DTLS version"),
            ("[\"1.4\"]", "\"1.4\" is not a DTLS version"),
            ("[\"tls\"]", "\"tls\" is not a DTLS version"),
            ("[1.3, \"1.3\"]", "dtls.versions[1]: 1.3 is listed twice"),
            ("[]", "dtls.versions: list \"1.2\" and/or \"1.3\""),
        ] {
            let text = with(
                "  unknown_node: drop\n",
                &format!("  unknown_node: drop\n  versions: {list}\n"),
            );
            let e = parse(&text).expect_err(list);
            assert!(e.contains(want) && e.contains("test.yaml"), "{list}: {e}");
        }
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

    /// Every key of the schema has a row in docs/configuration.md, and every row names a key.
    /// The keys come from serde itself, not from a list kept here: a mapping given an unknown
    /// key is refused with the names of the fields it expects (every struct of the schema
    /// denies unknown fields), and a field that answers a mapping of one unknown key the same
    /// way is a section whose keys are walked in turn (a list of sections: its first element).
    #[test]
    fn docs_have_a_row_for_every_key() {
        let base: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../../docs/quickstart.yaml")).expect("yaml");
        let mut keys = Vec::new();
        let mut sections = Vec::new();
        walk(&base, &mut Vec::new(), &mut keys, &mut sections);
        assert!(
            keys.len() > 40 && sections.iter().any(|s| s == "vips[].tunnel"),
            "the walk found too little: keys {keys:?}, sections {sections:?}"
        );
        let docs = include_str!("../../../docs/configuration.md");
        let rows: Vec<&str> = docs
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .collect();
        for k in &keys {
            assert!(
                rows.contains(&k.as_str()),
                "docs/configuration.md has no row for `{k}`, a key of the schema"
            );
        }
        for r in &rows {
            assert!(
                keys.iter().chain(&sections).any(|k| k == r),
                "docs/configuration.md has a row for `{r}`, which is no key of the schema"
            );
        }
    }

    const PROBE: &str = "zz_not_a_key";

    #[derive(Clone)]
    enum Step {
        Key(String),
        First,
    }

    fn name(path: &[Step]) -> String {
        let mut out = String::new();
        for s in path {
            match s {
                Step::Key(k) if out.is_empty() => out.push_str(k),
                Step::Key(k) => out.push_str(&format!(".{k}")),
                Step::First => out.push_str("[]"),
            }
        }
        out
    }

    /// `base` with the value at `path` replaced by `value` (missing levels made).
    fn put(base: &serde_yaml::Value, path: &[Step], value: serde_yaml::Value) -> serde_yaml::Value {
        use serde_yaml::Value;
        let Some((step, rest)) = path.split_first() else {
            return value;
        };
        match step {
            Step::Key(k) => {
                let mut map = match base {
                    Value::Mapping(m) => m.clone(),
                    _ => Default::default(),
                };
                let key = Value::String(k.clone());
                let inner = put(map.get(&key).unwrap_or(&Value::Null), rest, value);
                map.insert(key, inner);
                Value::Mapping(map)
            }
            Step::First => {
                let mut seq = match base {
                    Value::Sequence(s) if !s.is_empty() => s.clone(),
                    _ => vec![Value::Null],
                };
                seq[0] = put(&seq[0], rest, value);
                Value::Sequence(seq)
            }
        }
    }

    /// The fields serde expects at `path`, if a mapping belongs there.
    fn fields_at(base: &serde_yaml::Value, path: &[Step]) -> Option<Vec<String>> {
        let mut probe = serde_yaml::Mapping::new();
        probe.insert(PROBE.into(), 1.into());
        let doc = put(base, path, serde_yaml::Value::Mapping(probe));
        let err = serde_yaml::from_value::<Config>(doc).err()?.to_string();
        let (_, expected) = err.split_once(&format!("unknown field `{PROBE}`, expected"))?;
        Some(
            expected
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect(),
        )
    }

    fn walk(
        base: &serde_yaml::Value,
        path: &mut Vec<Step>,
        keys: &mut Vec<String>,
        sections: &mut Vec<String>,
    ) {
        let fields =
            fields_at(base, path).unwrap_or_else(|| panic!("{} is no section", name(path)));
        for f in fields {
            path.push(Step::Key(f));
            if fields_at(base, path).is_some() {
                sections.push(name(path));
                walk(base, path, keys, sections);
            } else {
                path.push(Step::First);
                if fields_at(base, path).is_some() {
                    sections.push(name(path));
                    walk(base, path, keys, sections);
                    path.pop();
                    sections.push(name(path));
                } else {
                    path.pop();
                    keys.push(name(path));
                }
            }
            path.pop();
        }
    }
}
