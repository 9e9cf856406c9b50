//! End to end with real DTLS 1.2 Connection ID peers (lb-testpeer, on Mbed TLS) and DTLS 1.3
//! ones (lb-testpeer --dtls 1.3, on wolfSSL): sessions keep
//! working through cidlb while their clients rebind to new source ports, as behind a NAT.
//!
//! The peers are the `cidlb-testpeer` binary, built by `cargo test --workspace` (as
//! `cargo xtask test` runs it) next to this test's executable.

mod common;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use common::agent::{cidlb, json_counter, lab_up, write_lab_config, AgentProc, PinGuard};
use lb_lab::{
    peer::{self, ClientRun},
    ChildGuard, Lab, NetNs,
};

fn testpeer() -> PathBuf {
    common::testpeer()
}

/// A DTLS echo server for node `id` in a node namespace, listening on both families.
fn server(ns: &NetNs, id: u32, extra: &[&str]) -> ChildGuard {
    peer::server(&testpeer(), ns, id, extra, None).unwrap_or_else(|e| panic!("{e}"))
}

fn client(lab: &Lab, vip: &str, args: &[&str]) -> ClientRun {
    peer::client(&testpeer(), &lab.client, vip, args).unwrap_or_else(|e| panic!("{e}"))
}

/// A control that must be able to fail: through `lab` (client args `proto` first), 4 sessions
/// without rebinding work (`steady_msg` if not), so the control differs only in the
/// rebinding; 6 sessions rebinding every 2 of 12 records mostly fail (`survived_msg` if all
/// pass), at least 3 of them. Five rebinds a session: a rebind lands on the session's node
/// by chance about half the time (the other node of two, or a reused port whose 5-tuple is
/// still pinned there), and with three (every 3 records) a fresh clone once saw 4 of 6
/// sessions survive the iptables control.
fn assert_control_fails_only_when_rebinding(
    lab: &Lab,
    proto: &[&str],
    steady_msg: &str,
    survived_msg: &str,
) {
    let steady = client(
        lab,
        &v4(),
        &[proto, &["--sessions", "4", "--messages", "6"]].concat(),
    );
    assert!(steady.ok, "{steady_msg}: {:#}", steady.summary);
    let run = client(
        lab,
        &v4(),
        &[
            proto,
            &[
                "--sessions",
                "6",
                "--messages",
                "12",
                "--rebind-every",
                "2",
                "--timeout-ms",
                "300",
            ],
        ]
        .concat(),
    );
    assert!(!run.ok, "{survived_msg}");
    let failed = run.summary["failed"].as_u64().unwrap();
    assert!(
        failed >= 3,
        "only {failed} of 6 rebinding sessions failed: {:#}",
        run.summary
    );
}

/// Every session ok, answered by exactly the node its server CID names, with `rebinds` rebinds.
fn assert_sessions_follow_their_cid(
    run: &ClientRun,
    sessions: usize,
    min_rebinds: u64,
) -> BTreeMap<String, u64> {
    assert!(run.ok, "client failed: {:#}", run.summary);
    assert_eq!(run.sessions.len(), sessions);
    let mut per_node = BTreeMap::new();
    for s in &run.sessions {
        assert_eq!(s["status"], "ok", "{s}");
        assert_eq!(s["failed"], 0, "{s}");
        let nodes = ClientRun::answered_by(s);
        assert_eq!(nodes.len(), 1, "a session answered by several nodes: {s}");
        let node = nodes[0];
        let cid_node = ClientRun::cid_node(s).unwrap_or_else(|| panic!("no server CID: {s}"));
        assert_eq!(
            node, cid_node,
            "session answered by node {node} but its CID {} names {cid_node}",
            s["server_cid"]
        );
        assert!(s["rebinds"].as_u64().unwrap() >= min_rebinds, "{s}");
        *per_node.entry(node.to_string()).or_insert(0) += 1;
    }
    per_node
}

/// Fields drop in order: agent, servers, pins, then the namespaces.
struct Setup {
    agent: AgentProc,
    servers: Vec<ChildGuard>,
    pins: PinGuard,
    lab: Lab,
}

fn setup(tag: &str, nodes: usize, extra_config: &str) -> Setup {
    let ids: Vec<u32> = (1..=nodes as u32).collect();
    setup_ids(tag, &ids, extra_config)
}

/// A lab with one node per entry of `ids`, node k's server issuing CIDs for `ids[k - 1]`
/// (the config always names node k as id k), and cidlb running.
fn setup_ids(tag: &str, ids: &[u32], extra_config: &str) -> Setup {
    setup_peers(tag, ids, extra_config, &[])
}

/// As [`setup_ids`], the servers started with `server_args` (e.g. [`DTLS13`]).
fn setup_peers(tag: &str, ids: &[u32], extra_config: &str, server_args: &[&str]) -> Setup {
    let lab = lab_up(tag, ids.len());
    let servers = lab
        .nodes
        .iter()
        .zip(ids)
        .map(|(n, id)| server(n, *id, server_args))
        .collect();
    let pins = PinGuard::new(tag);
    let cfg = std::env::temp_dir().join(format!("cidlb-e2e-{tag}-{}.yaml", std::process::id()));
    write_lab_config(&lab, &pins, &cfg, extra_config);
    let agent = AgentProc::start(&lab, &cfg, &["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1200));
    Setup {
        agent,
        servers,
        pins,
        lab,
    }
}

fn v4() -> String {
    lb_lab::VIP4_SOCKET.to_string()
}

fn v6() -> String {
    lb_lab::VIP6_SOCKET.to_string()
}

/// Limits that refuse nothing but turn the cookie steps on (they run with the global limit).
const OPEN_LIMITS: &str = "limits: {new_flows: \"100000/1s\"}\n";

/// Every handshake's cookie (Mbed TLS's HelloVerifyRequest, wolfSSL's HelloRetryRequest, the
/// second ClientHello in one datagram or two) was learned on the reply path and echoed: each
/// session proved its source, and no cookie failed to match.
fn assert_every_handshake_proven(json: &str, handshakes: u64) {
    assert!(json_counter(json, "cookie_learned") >= handshakes, "{json}");
    assert!(
        json_counter(json, "known_src_proven") >= handshakes,
        "{json}"
    );
    assert_eq!(json_counter(json, "cookie_unproven"), 0, "{json}");
}

#[test]
fn twenty_rebinding_sessions_over_two_nodes_ipv4() {
    let s = setup("e2", 2, OPEN_LIMITS);
    // 55 messages, a rebind after every 5th: 10 rebinds per session.
    let run = client(
        &s.lab,
        &v4(),
        &[
            "--sessions",
            "20",
            "--messages",
            "55",
            "--rebind-every",
            "5",
        ],
    );
    let per_node = assert_sessions_follow_their_cid(&run, 20, 10);
    // Handshakes spread by Maglev (the default; all 20 on one node: odds 2^-19): both nodes
    // hold sessions.
    assert_eq!(per_node.len(), 2, "handshakes did not spread: {per_node:?}");
    let json = cidlb(&["stats", "--json", "--pin-dir", s.pins.0.to_str().unwrap()]);
    assert!(json_counter(&json, "cid_routed") >= 20 * 55, "{json}");
    assert_eq!(json_counter(&json, "drop_cid_unknown_node"), 0);
    assert_every_handshake_proven(&json, 20);
}

#[test]
fn rebinding_sessions_over_four_nodes_and_ipv6() {
    let s = setup("e4", 4, "");
    for vip in [v4(), v6()] {
        let vip = vip.as_str();
        let run = client(
            &s.lab,
            vip,
            &[
                "--sessions",
                "20",
                "--messages",
                "33",
                "--rebind-every",
                "3",
            ],
        );
        let per_node = assert_sessions_follow_their_cid(&run, 20, 10);
        assert!(
            per_node.len() >= 3,
            "{vip}: 20 handshakes over 4 nodes reached only {per_node:?}"
        );
    }
}

#[test]
fn non_cid_session_stays_on_one_node() {
    let s = setup("en", 2, "");
    // Plain DTLS 1.2 (no CID), no rebinding: routed by flow, each session on one node.
    let run = client(
        &s.lab,
        &v4(),
        &["--sessions", "10", "--messages", "30", "--no-cid"],
    );
    assert!(run.ok, "{:#}", run.summary);
    for sess in &run.sessions {
        assert_eq!(sess["status"], "ok", "{sess}");
        assert_eq!(sess["nodes"].as_array().unwrap().len(), 1, "{sess}");
    }
    let json = cidlb(&["stats", "--json", "--pin-dir", s.pins.0.to_str().unwrap()]);
    assert_eq!(json_counter(&json, "cid_routed"), 0, "{json}");
    assert!(json_counter(&json, "flow_hit") >= 10 * 30, "{json}");
}

#[test]
fn cid_naming_an_unknown_node_is_dropped_and_counted() {
    // Node 2's server issues CIDs for node 9, which the config does not know.
    let s = setup_ids("eu", &[1, 9], "");
    let (lab, pins) = (&s.lab, &s.pins);
    let run = client(
        lab,
        &v4(),
        &["--sessions", "8", "--messages", "6", "--timeout-ms", "300"],
    );
    let mut healthy = 0;
    let mut broken = 0;
    for sess in &run.sessions {
        match sess["server_cid"].as_str().map(|c| &c[..2]) {
            Some("01") => {
                assert_eq!(
                    sess["status"], "ok",
                    "a session on a known node was affected: {sess}"
                );
                healthy += 1;
            }
            Some("09") => {
                assert_ne!(
                    sess["status"], "ok",
                    "records for an unknown node must not arrive: {sess}"
                );
                broken += 1;
            }
            other => panic!("unexpected CID {other:?}: {sess}"),
        }
    }
    assert!(
        healthy > 0 && broken > 0,
        "healthy {healthy}, broken {broken}"
    );
    let json = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    assert!(json_counter(&json, "drop_cid_unknown_node") > 0, "{json}");
}

#[test]
fn control_rebinding_fails_through_a_five_tuple_balancer() {
    // The same lab and peers, but no cidlb: iptables DNAT with round robin per new 5-tuple
    // (conntrack), as the seed uses for handshakes. A rebinding client lands on the other node
    // half of the time, where no session exists: the test can fail.
    common::require_root();
    let lab = Lab::up(&lb_lab::unique_prefix("ec"), 2).unwrap_or_else(|e| panic!("{e}"));
    let _servers = [server(&lab.nodes[0], 1, &[]), server(&lab.nodes[1], 2, &[])];
    lab.seed_iptables(false).unwrap_or_else(|e| panic!("{e}"));
    assert_control_fails_only_when_rebinding(
        &lab,
        &[],
        "without rebinding the 5-tuple balancer must work",
        "rebinding sessions survived a 5-tuple balancer: the e2e tests could not fail",
    );
}

#[test]
fn dtls_health_probe_follows_a_real_server() {
    // The dtls probe sends a ClientHello; Mbed TLS answers with a HelloVerifyRequest.
    health_probe_follows_real_servers("eh", &[]);
}

#[test]
fn dtls_health_probe_follows_a_real_dtls13_only_server() {
    // Issue #12: wolfSSL in DTLS 1.3-only mode answers the probe's DTLS 1.2 ClientHello with a
    // HelloVerifyRequest (then, were the cookie sent back, a protocol_version alert; both
    // count as alive).
    health_probe_follows_real_servers("eh3", DTLS13);
}

/// Two nodes whose servers run with `server_args`, probed with `probe: dtls`: healthy servers
/// stay up, a stopped one goes down, a restarted one comes back, and sessions work again.
fn health_probe_follows_real_servers(tag: &str, server_args: &[&str]) {
    let health = "health: {probe: dtls, interval: 500ms, timeout: 300ms, fall: 2, rise: 2}\n";
    let mut s = setup_peers(tag, &[1, 2], health, server_args);
    let agent = &s.agent;
    // Healthy servers: no node goes down.
    assert!(
        agent
            .wait_for("node down", Duration::from_secs(3))
            .is_none(),
        "a healthy DTLS server was marked down"
    );
    drop(s.servers.pop());
    let agent = &s.agent;
    let line = agent
        .wait_for("node down", Duration::from_secs(5))
        .expect("stopped server must be marked down");
    assert!(line.contains("node=2"), "{line}");
    let restarted = server(&s.lab.nodes[1], 2, server_args);
    s.servers.push(restarted);
    let agent = &s.agent;
    let line = agent
        .wait_for("node up", Duration::from_secs(5))
        .expect("restarted server must come back");
    assert!(line.contains("node=2"), "{line}");
    // Sessions work across both nodes again.
    let args = [server_args, &["--sessions", "6", "--messages", "6"]].concat();
    let run = client(&s.lab, &v4(), &args);
    assert_sessions_follow_their_cid(&run, 6, 0);
}

// --- DTLS 1.3 (issue #12): wolfSSL peers, records with the RFC 9147 unified header ---

/// Peer arguments selecting the DTLS 1.3 backend (wolfSSL).
const DTLS13: &[&str] = &["--dtls", "1.3"];

#[test]
fn dtls13_rebinding_sessions_follow_their_cid_ipv4_and_ipv6() {
    let s = setup_peers(
        "e13",
        &[1, 2],
        &format!("dtls: {{versions: [\"1.2\", \"1.3\"]}}\n{OPEN_LIMITS}"),
        DTLS13,
    );
    let (sessions, messages) = (10u64, 55u64);
    let (sessions_arg, messages_arg) = (sessions.to_string(), messages.to_string());
    for vip in [v4(), v6()] {
        // 55 messages, a rebind after every 5th: 10 rebinds per session.
        let args = [
            DTLS13,
            &[
                "--sessions",
                &sessions_arg,
                "--messages",
                &messages_arg,
                "--rebind-every",
                "5",
            ],
        ]
        .concat();
        let run = client(&s.lab, &vip, &args);
        let per_node = assert_sessions_follow_their_cid(&run, sessions as usize, 10);
        assert_eq!(
            per_node.len(),
            2,
            "{vip}: handshakes did not spread: {per_node:?}"
        );
    }
    let json = cidlb(&["stats", "--json", "--pin-dir", s.pins.0.to_str().unwrap()]);
    // Every application record (and each client's last handshake flight) is a unified header
    // with the server's CID; none is a tls12_cid record.
    assert!(
        json_counter(&json, "cid13_routed") >= 2 * sessions * messages,
        "{json}"
    );
    assert_eq!(json_counter(&json, "cid_routed"), 0, "{json}");
    assert_eq!(json_counter(&json, "drop_cid13_truncated"), 0, "{json}");
    assert_eq!(json_counter(&json, "drop_cid_unknown_node"), 0, "{json}");
    assert_every_handshake_proven(&json, 2 * sessions);
}

#[test]
fn control_dtls13_rebinding_fails_with_only_dtls12_routed_by_cid() {
    // The same peers through cidlb with `dtls.versions: ["1.2"]`: 1.3 records go by flow, so a
    // rebinding client's new 5-tuple is a new flow, round robin sends it to the other node half
    // of the time, and that node has no session: the 1.3 test above can fail.
    let s = setup_peers("e13c", &[1, 2], "dtls: {versions: [\"1.2\"]}\n", DTLS13);
    assert_control_fails_only_when_rebinding(
        &s.lab,
        DTLS13,
        "without rebinding 1.3 sessions must work by flow",
        "rebinding 1.3 sessions survived flow routing: the 1.3 e2e test could not fail",
    );
    let json = cidlb(&["stats", "--json", "--pin-dir", s.pins.0.to_str().unwrap()]);
    assert_eq!(json_counter(&json, "cid13_routed"), 0, "{json}");
}
