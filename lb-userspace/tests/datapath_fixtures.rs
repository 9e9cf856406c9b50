//! BPF_PROG_TEST_RUN fixtures: the real XDP program, loaded into the kernel and provisioned by
//! the agent's own map code, runs table-driven input frames. Each case asserts the action, the
//! exact output bytes (expected frames are built with etherparse, checksums from scratch) and
//! the exact counters. This file is the harness; the cases are in `fixtures/`, one file and
//! one test per concern.
//!
//! The program's bpf_fib_lookup needs routes and neighbours: the test builds them in a netns of
//! its own (interfaces with fixed MACs, permanent neighbour entries) and runs the program from
//! a thread inside it, so the output MACs are deterministic.

#[path = "fixtures/cid.rs"]
mod cid;
mod common;
#[path = "fixtures/cookies.rs"]
mod cookies;
#[path = "fixtures/dtls13.rs"]
mod dtls13;
#[path = "fixtures/flows.rs"]
mod flows;
#[path = "fixtures/fragments.rs"]
mod fragments;
#[path = "fixtures/icmp.rs"]
mod icmp;
#[path = "fixtures/limits.rs"]
mod limits;
#[path = "fixtures/lookup.rs"]
mod lookup;
#[path = "fixtures/parse.rs"]
mod parse;
#[path = "fixtures/records.rs"]
mod records;
#[path = "fixtures/regressions.rs"]
mod regressions;
#[path = "fixtures/reply.rs"]
mod reply;
#[path = "fixtures/sources.rs"]
mod sources;
#[path = "fixtures/tunnel.rs"]
mod tunnel;
#[path = "fixtures/vip_edge.rs"]
mod vip_edge;
#[path = "fixtures/vlan.rs"]
mod vlan;

use std::net::IpAddr;

use cidlb::{config::Config, datapath::Datapath, plan, stats::Snapshot};
use lb_common::Counter::{self, *};
use lb_lab::{
    fib::*,
    packet::{assert_checksums, cid_record, handshake_record, unified_record, Frame, Mac},
    pin_to_cpu, NetNs,
};

use lb_common::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

const BASE: &str = r#"
interfaces: [fxc, fxn]
vips:
  - address: 192.0.2.10
    ports: [5684, "20000-20100"]
  - address: "2001:db8:ffff::10"
    ports: [5684]
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop}
flows: {policy: round_robin, idle_timeout: 30s, capacity: 1024}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
"#;

/// One packet through the program.
struct Step {
    /// Wait this long before sending (flow idle expiry).
    pause_ms: u64,
    /// Runs on the loaded object before the packet (e.g. to mark the next-hop cache).
    poke: Option<fn(&mut aya::Ebpf)>,
    ingress: &'static str,
    input: Vec<u8>,
    action: u32,
    /// Expected frame after the program; `None`: unchanged.
    output: Option<Vec<u8>>,
}

struct Case {
    name: String,
    config: String,
    steps: Vec<Step>,
    /// Exact value of every counter that must be non-zero besides packets_seen.
    counters: Vec<(Counter, u64)>,
    /// Exact per-node to_node_packets, by node id (nodes not listed: 0).
    to_nodes: Vec<(u32, u64)>,
    /// Exact per-node from_node_packets (un-NATed replies), by node id (nodes not listed: 0).
    from_nodes: Vec<(u32, u64)>,
    /// Changes to the fixture netns for this case only: (apply, undo), each `ip ARGS` or
    /// `sysctl KEY=VALUE`. Undone after the case, whatever its outcome.
    netns: Vec<(String, String)>,
    /// Load in shadow mode (`cidlb run --shadow`).
    shadow: bool,
}

fn case(name: impl Into<String>, steps: Vec<Step>, counters: &[(Counter, u64)]) -> Case {
    Case {
        name: name.into(),
        config: BASE.to_owned(),
        steps,
        counters: counters.to_vec(),
        to_nodes: Vec::new(),
        from_nodes: Vec::new(),
        netns: Vec::new(),
        shadow: false,
    }
}

impl Case {
    fn config(mut self, from: &str, to: &str) -> Self {
        assert!(
            self.config.contains(from),
            "{}: {from:?} not in config",
            self.name
        );
        self.config = self.config.replacen(from, to, 1);
        self
    }
    fn shadow(mut self) -> Self {
        self.shadow = true;
        self
    }
    fn nodes(mut self, n: &[(u32, u64)]) -> Self {
        self.to_nodes = n.to_vec();
        self
    }
    fn replies(mut self, n: &[(u32, u64)]) -> Self {
        self.from_nodes = n.to_vec();
        self
    }
    fn netns(mut self, apply: &str, undo: &str) -> Self {
        self.netns.push((apply.to_owned(), undo.to_owned()));
        self
    }
}

/// From the client to a VIP port, as it arrives on fxc.
fn client(vip: &str, dport: u16, payload: &[u8]) -> Frame {
    let src = if lb_lab::ip(vip).is_ipv4() {
        CLIENT4
    } else {
        CLIENT6
    };
    Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        lb_lab::ip(src),
        40000,
        lb_lab::ip(vip),
        dport,
        payload,
    )
}

/// The frame as forwarded to a node out of fxn: new destination, TTL - 1, MACs from the FIB.
fn to_node(f: &Frame, node: &str, mac: Mac) -> Frame {
    let mut g = f.clone();
    g.dst = lb_lab::ip(node);
    g.ttl -= 1;
    g.src_mac = FXN_MAC;
    g.dst_mac = mac;
    g
}

/// A node's reply as it arrives on fxn, from the node's own MAC.
fn reply(node: &str, sport: u16, client: &str, payload: &[u8]) -> Frame {
    let mac = if node == NODE2_4 || node == NODE2_6 {
        NODE2_MAC
    } else {
        NODE1_MAC
    };
    Frame::udp(
        mac,
        FXN_MAC,
        lb_lab::ip(node),
        sport,
        lb_lab::ip(client),
        40000,
        payload,
    )
}

/// A reply as un-NATed towards the client on fxc: source VIP:port, TTL - 1, MACs from the FIB.
fn unnat(r: &Frame, vip: &str, vip_port: u16) -> Frame {
    let mut q = r.clone();
    q.src = lb_lab::ip(vip);
    q.sport = vip_port;
    q.ttl -= 1;
    q.src_mac = FXC_MAC;
    q.dst_mac = CLIENT_MAC;
    q
}

/// A MAC no neighbour in the fixture netns has: seen in an output only if it came from the
/// next-hop cache the test overwrote.
const MARKER_MAC: Mac = [0x02, 0xee, 0xee, 0xee, 0xee, 0xee];

/// Overwrites the next-hop MAC of every filled `NEXTHOP` entry (all CPUs) with [`MARKER_MAC`].
fn mark_nexthop_cache(ebpf: &mut aya::Ebpf) {
    use aya::maps::{PerCpuArray, PerCpuValues};
    let mut map: PerCpuArray<_, lb_common::NextHop> =
        PerCpuArray::try_from(ebpf.map_mut(lb_common::names::NEXTHOP).expect("NEXTHOP"))
            .expect("NEXTHOP is a per-CPU array");
    let mut marked = 0;
    for i in 0..map.len() {
        let mut vals: Vec<lb_common::NextHop> = map.get(&i, 0).unwrap().iter().copied().collect();
        if vals.iter().all(|v| v.expires_ns == 0) {
            continue;
        }
        for v in vals.iter_mut().filter(|v| v.expires_ns != 0) {
            v.dmac = MARKER_MAC;
            marked += 1;
        }
        map.set(i, PerCpuValues::try_from(vals).unwrap(), 0)
            .unwrap();
    }
    assert!(marked > 0, "no NEXTHOP entry was filled");
}

fn fwd(ingress: &'static str, input: &Frame, output: &Frame, action: u32) -> Step {
    Step {
        pause_ms: 0,
        poke: None,
        ingress,
        input: input.bytes(),
        action,
        output: Some(output.bytes()),
    }
}

/// A client frame arriving on fxc and redirected out of fxn to `node` (MAC `mac`).
fn redirect(input: &Frame, node: &str, mac: Mac) -> Step {
    fwd("fxc", input, &to_node(input, node, mac), XDP_REDIRECT)
}

fn unchanged(ingress: &'static str, input: Vec<u8>, action: u32) -> Step {
    Step {
        pause_ms: 0,
        poke: None,
        ingress,
        input,
        action,
        output: None,
    }
}

fn cid(node: u8) -> Vec<u8> {
    cid_record(
        &[node, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5],
        b"encrypted application data",
    )
}

/// A CID record from the client naming no configured node (`p`, to the IPv4 VIP): dropped
/// under `unknown_node: drop`, routed by flow to node 1 under `unknown_node: flow`. `label`
/// prefixes the case names.
fn unknown_node_cases(label: &str, p: &Frame) -> [Case; 2] {
    [
        case(
            format!("{label}unknown node, unknown_node: drop"),
            vec![unchanged("fxc", p.bytes(), XDP_DROP)],
            &[(DropCidUnknownNode, 1)],
        ),
        case(
            format!("{label}unknown node, unknown_node: flow"),
            vec![redirect(p, NODE1_4, NODE1_MAC)],
            &[(CidUnknownNodeFlow, 1), (FlowNew, 1), (FwdRedirect, 1)],
        )
        .config("unknown_node: drop", "unknown_node: flow")
        .nodes(&[(1, 1)]),
    ]
}

struct Failure(String);

/// Runs `ip ARGS` or `sysctl KEY=VALUE` in the fixture netns.
fn netns_cmd(ns: &NetNs, cmd: &str) -> Result<(), String> {
    match cmd.strip_prefix("sysctl ") {
        Some(kv) => ns.sysctl(kv),
        None => ns.ip(cmd.strip_prefix("ip ").unwrap_or(cmd)),
    }
}

/// Applies a case's netns changes, runs it, and undoes them (in reverse order) whatever happened.
fn run_case(ns: &NetNs, c: &Case) -> Result<(), Failure> {
    let mut applied = Vec::new();
    let mut result = Ok(());
    for (apply, undo) in &c.netns {
        if let Err(e) = netns_cmd(ns, apply) {
            result = Err(Failure(format!("{}: netns {apply:?}: {e}", c.name)));
            break;
        }
        applied.push(undo);
    }
    if result.is_ok() {
        result = run_steps(c);
    }
    for undo in applied.into_iter().rev() {
        netns_cmd(ns, undo).unwrap_or_else(|e| panic!("{}: undo {undo:?}: {e}", c.name));
    }
    result
}

fn run_steps(c: &Case) -> Result<(), Failure> {
    let fail = |m: String| Failure(format!("{}: {m}", c.name));
    let mut cfg = Config::parse(&c.config, std::path::Path::new("fixture.yaml"))
        .map_err(|e| fail(e.to_string()))?;
    cfg.shadow = c.shadow;
    let mut dp = Datapath::private(&cfg).map_err(|e| fail(e.to_string()))?;
    for (i, s) in c.steps.iter().enumerate() {
        std::thread::sleep(std::time::Duration::from_millis(s.pause_ms));
        if let Some(poke) = s.poke {
            poke(&mut dp.ebpf);
        }
        let ifindex = cidlb::datapath::resolve_interfaces(&[s.ingress.to_owned()])
            .map_err(|e| fail(e.to_string()))?[0];
        let r = dp
            .run_packet(&s.input, ifindex, 1)
            .map_err(|e| fail(format!("step {i}: test_run: {e}")))?;
        let out = r.output;
        if r.action != s.action {
            // The counters so far say why.
            let counted = Snapshot::from_ebpf(&dp.ebpf).map_or_else(
                |e| e.to_string(),
                |snap| {
                    snap.counters
                        .iter()
                        .filter(|(c, n)| *n != 0 && *c != PacketsSeen)
                        .map(|(c, n)| format!("{}={n}", c.name()))
                        .collect::<Vec<_>>()
                        .join(" ")
                },
            );
            return Err(fail(format!(
                "step {i}: action {} want {} (counters: {counted})",
                r.action, s.action
            )));
        }
        let want = s.output.as_ref().unwrap_or(&s.input);
        if &out != want {
            return Err(fail(format!(
                "step {i}: output differs\n got  {}\n want {}",
                lb_lab::hex(&out),
                lb_lab::hex(want)
            )));
        }
        if s.output.is_some() {
            assert_checksums(&out, &c.name);
        }
    }
    let snap = Snapshot::from_ebpf(&dp.ebpf).map_err(|e| fail(e.to_string()))?;
    for &(counter, value) in &snap.counters {
        let want = if counter == PacketsSeen {
            c.steps.len() as u64
        } else {
            c.counters
                .iter()
                .find(|(k, _)| *k == counter)
                .map_or(0, |(_, v)| *v)
        };
        if value != want {
            return Err(fail(format!(
                "counter {} = {value}, want {want}",
                counter.name()
            )));
        }
    }
    // Every configured node, listed or not (not listed: 0).
    let want =
        |list: &[(u32, u64)], id: u32| list.iter().find(|(k, _)| *k == id).map_or(0, |(_, v)| *v);
    for (id, n) in &snap.nodes {
        let (to, from) = (want(&c.to_nodes, *id), want(&c.from_nodes, *id));
        if n.to_node_packets != to || n.from_node_packets != from {
            return Err(fail(format!(
                "node {id}: to_node_packets = {}, from_node_packets = {}, want {to}, {from}",
                n.to_node_packets, n.from_node_packets
            )));
        }
    }
    for (id, _) in c.to_nodes.iter().chain(&c.from_nodes) {
        if !snap.nodes.contains_key(id) {
            return Err(fail(format!("node {id} is listed but not configured")));
        }
    }
    Ok(())
}

/// Runs `cases` in a fixture netns of their own, from a thread inside it pinned to one CPU
/// (per-CPU round-robin cursors), and fails with every failing case.
fn run(what: &str, cases: Vec<Case>) {
    common::require_root();
    assert!(!cases.is_empty(), "{what}: no cases");
    let ns = lb_lab::fib::netns("fx");
    let failures: Vec<String> = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            pin_to_cpu(0);
            cases
                .iter()
                .filter_map(|c| run_case(&ns, c).err().map(|f| f.0))
                .collect()
        })
        .join()
        .expect("fixture thread panicked")
    });
    println!(
        "{what}: {} fixture cases, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{what}: {} of {} fixture cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn cid_fixtures() {
    run("CID routing", cid::cases());
}

#[test]
fn parse_fixtures() {
    run(
        "ports, fragments, VLANs, checksums, malformed",
        parse::cases(),
    );
}

#[test]
fn reply_fixtures() {
    run("replies and the origin check", reply::cases());
}

#[test]
fn icmp_fixtures() {
    run("ICMP errors from nodes", icmp::cases());
}

#[test]
fn flow_fixtures() {
    run("flows, forwarding, shadow mode", flows::cases());
}

#[test]
fn limit_fixtures() {
    run("new-flow limits", limits::cases());
}

#[test]
fn tunnel_fixtures() {
    run("tunnel mode", tunnel::cases());
}

#[test]
fn cookie_fixtures() {
    run(
        "known sources proven by the node's cookie",
        cookies::cases(),
    );
}

/// `COOKIES` has the size `limits.cookie_capacity` asks for, and the default without it.
#[test]
fn cookie_table_follows_the_config() {
    use aya::maps::Map;
    let size = |limits: &str| {
        let base = BASE.replace("interfaces: [fxc, fxn]", "interfaces: [lo]");
        let cfg = Config::parse(&format!("{base}{limits}"), "cookie-size.yaml".as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
        let dp = Datapath::private(&cfg).unwrap_or_else(|e| panic!("{e}"));
        match dp.ebpf.map(lb_common::cookie::COOKIES) {
            Some(Map::LruHashMap(m)) => m.info().expect("map info").max_entries(),
            _ => panic!("no COOKIES LRU map"),
        }
    };
    assert_eq!(
        size("limits: {new_flows: \"100/1s\", cookie_capacity: 4096}\n"),
        4096
    );
    assert_eq!(
        size("limits: {new_flows: \"100/1s\"}\n"),
        lb_common::cookie::DEFAULT_COOKIE_CAPACITY
    );
    assert_eq!(size(""), lb_common::cookie::DEFAULT_COOKIE_CAPACITY);
}

/// `FRAGS` has the size `limits.fragment_capacity` asks for, and the default without it.
#[test]
fn fragment_table_follows_the_config() {
    use aya::maps::Map;
    let size = |limits: &str| {
        let base = BASE.replace("interfaces: [fxc, fxn]", "interfaces: [lo]");
        let cfg = Config::parse(&format!("{base}{limits}"), "frag-size.yaml".as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
        let dp = Datapath::private(&cfg).unwrap_or_else(|e| panic!("{e}"));
        match dp.ebpf.map(lb_common::frag::FRAGS) {
            Some(Map::LruHashMap(m)) => m.info().expect("map info").max_entries(),
            _ => panic!("no FRAGS LRU map"),
        }
    };
    assert_eq!(
        size("limits: {new_flows: \"100/1s\", fragment_capacity: 1024}\n"),
        1024
    );
    assert_eq!(size(""), lb_common::frag::DEFAULT_FRAG_CAPACITY);
}

#[test]
fn dtls13_fixtures() {
    run("DTLS 1.3 unified headers", dtls13::cases());
}

#[test]
fn lookup_fixtures() {
    run("VIP_TABLE and NODE_IDS", lookup::cases());
}

#[test]
fn vip_edge_fixtures() {
    run(
        "traffic to a VIP that is not balanced (no loop)",
        vip_edge::cases(),
    );
}

#[test]
fn record_fixtures() {
    run(
        "every record of a datagram names the node",
        records::cases(),
    );
}

#[test]
fn source_fixtures() {
    run("sources that cannot be real", sources::cases());
}

#[test]
fn vlan_fixtures() {
    run("the origin check of VLAN-tagged replies", vlan::cases());
}

#[test]
fn fragment_fixtures() {
    run("IP fragments follow their first", fragments::cases());
}

#[test]
fn regression_fixtures() {
    run("regressions", regressions::cases());
}
