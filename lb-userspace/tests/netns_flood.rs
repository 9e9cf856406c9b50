//! Handshake floods (issue #8 §2) against real DTLS peers (lb-testpeer, on Mbed TLS) through
//! cidlb with `limits:`. A spoofed-source ClientHello flood from trafgen (random sources in
//! 10.0.0.0/8) runs while legitimate clients handshake and exchange records. The nodes count
//! the new flows they see themselves (iptables rules matching conntrack's NEW state in
//! each node namespace), independently of cidlb's counters.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::agent::{cidlb, json_counter, lab_up, write_lab_config, AgentProc, PinGuard};
use lb_lab::{
    peer::{self, ClientRun},
    trafgen::{self, Spoofed, Trafgen},
    ChildGuard, Lab, NetNs,
};

/// Flood shape: at least 100,000 distinct sources at at least 50,000 per second.
/// The fast flood: trafgen's TX_RING batches, 900,000 packets from random sources, at least
/// 50,000 per second (asked for 70,000; it sends faster).
const FLOOD_PACKETS: u64 = 900_000;
const FLOOD_PACE: &[&str] = &["-b", "70000pps"];
const MIN_FLOOD_PPS: f64 = 50_000.0;
/// The smooth flood: one sendto() per packet, a 10 µs gap (really one sleep's latency), so
/// packets arrive evenly rather than in batches with idle gaps a handshake could slip into.
/// About 20,000 per second on this machine.
const SMOOTH_PACKETS: u64 = 300_000;
const SMOOTH_PACE: &[&str] = &["-t", "10us"];

/// Fields drop in order: agent, servers, pins, files, then the namespaces.
struct Flood {
    _agent: AgentProc,
    _servers: Vec<ChildGuard>,
    pins: PinGuard,
    tmp: TempDir,
    /// When the datapath's buckets were created (before the agent started): every bound on
    /// new flows counts from here.
    t0: Instant,
    lab: Lab,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Counters of new UDP flows to the DTLS port in a node namespace (iptables rules matching
/// conntrack state NEW): all of them, and those from the flood's 10.0.0.0/8.
fn count_new_flows(ns: &NetNs) {
    for rule in [
        "-A INPUT -p udp --dport 5684 -m conntrack --ctstate NEW",
        "-A INPUT -s 10.0.0.0/8 -p udp --dport 5684 -m conntrack --ctstate NEW",
    ] {
        let mut args = vec!["iptables"];
        args.extend(rule.split(' '));
        ns.must(&args).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// (all new flows, new flows from 10.0.0.0/8) counted in a node namespace.
fn read_counters(ns: &NetNs) -> (u64, u64) {
    let out = ns
        .must(&["iptables", "-L", "INPUT", "-nvx"])
        .unwrap_or_else(|e| panic!("{e}"));
    // Two header lines, then one line per rule in order; the first column is packets.
    let pkts: Vec<u64> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    match pkts[..] {
        [all, flood] => (all, flood),
        _ => panic!("unexpected iptables output in {}:\n{out}", ns.name),
    }
}

fn up(tag: &str, extra_config: &str) -> Flood {
    let lab = lab_up(tag, 2);
    let dir = std::env::temp_dir().join(format!("cidlb-flood-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let servers = lab
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            count_new_flows(n);
            peer::server(&common::testpeer(), n, i as u32 + 1, &[], None)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let pins = PinGuard::new(tag);
    let cfg = dir.join("cidlb.yaml");
    write_lab_config(&lab, &pins, &cfg, extra_config);
    let t0 = Instant::now();
    let agent = AgentProc::start(&lab, &cfg, &["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1200));
    Flood {
        _agent: agent,
        _servers: servers,
        pins,
        tmp: TempDir(dir),
        t0,
        lab,
    }
}

impl Flood {
    /// Starts the flood of spoofed ClientHellos from the client namespace: one trafgen per CPU
    /// in `cpus`, each sending `packets` at the same pace, so the flood lasts as long on two
    /// CPUs as on one (see [`hello_flood`] for where it runs), from sources as `from` says.
    fn flood(
        &self,
        packets: u64,
        pace: &[&str],
        cpus: &[usize],
        from: Spoofed,
    ) -> (Vec<Trafgen>, Instant) {
        assert!(
            cpus.len() == 1 || from == Spoofed::Random,
            "a pool flood runs on one CPU: two generators would send the same tuples"
        );
        let hello = cidlb::health::client_hello([0x5a; 32]);
        let conf = trafgen::spoofed_udp_flood(
            self.lab
                .balancer
                .mac("lbc")
                .unwrap_or_else(|e| panic!("{e}")),
            self.lab.client.mac("c0").unwrap_or_else(|e| panic!("{e}")),
            lb_lab::VIP4,
            lb_lab::PORT,
            &hello,
            from,
        );
        let conf_path = self.tmp.0.join("flood.cfg");
        std::fs::write(&conf_path, conf).unwrap();
        let shim = trafgen::build_shim(&self.tmp.0).unwrap_or_else(|e| panic!("{e}"));
        let n = packets.to_string();
        let tgs = cpus
            .iter()
            .map(|&cpu| {
                Trafgen::start(
                    &self.lab.client,
                    "c0",
                    &conf_path,
                    &shim,
                    cpu,
                    &[&["-n", n.as_str()], pace].concat(),
                    &self.tmp.0.join(format!("trafgen-{cpu}.err")),
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        (tgs, Instant::now())
    }

    fn client(&self, name: &str, args: &[&str]) -> (ChildGuard, PathBuf) {
        let out = self.tmp.0.join(format!("{name}.json"));
        let g = peer::spawn_client(
            &common::testpeer(),
            &self.lab.client,
            &lb_lab::VIP4_SOCKET.to_string(),
            args,
            &out,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (g, out)
    }

    fn stats(&self) -> String {
        cidlb(&[
            "stats",
            "--json",
            "--pin-dir",
            self.pins.0.to_str().unwrap(),
        ])
    }

    /// (all new flows, new flows from the flood) the nodes saw.
    fn node_flows(&self) -> (u64, u64) {
        self.lab
            .nodes
            .iter()
            .map(read_counters)
            .fold((0, 0), |(a, f), (x, y)| (a + x, f + y))
    }
}

/// Waits (bounded) for a client to exit and checks that every session succeeded, each on one
/// node (the one its CID names, with a CID).
fn finish(name: &str, mut g: ChildGuard, out: &Path, sessions: usize, deadline: Instant) {
    while Instant::now() < deadline {
        if let Ok(Some(_)) = g.0.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = g.0.try_wait().ok().flatten();
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("{name}: client still running at the deadline:\n{text}"));
    let run = ClientRun::parse(&text, status.success()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(run.ok, "{name}: client failed: {:#}\n{text}", run.summary);
    assert_eq!(run.sessions.len(), sessions, "{name}: {text}");
    for s in &run.sessions {
        assert_eq!(s["status"], "ok", "{name}: {s}");
        assert_eq!(s["failed"], 0, "{name}: {s}");
    }
    let bad = run.misrouted();
    assert!(bad.is_empty(), "{name}: {}", bad.join("\n"));
}

/// The most new flows a balancer with these limits lets through in `secs` seconds: one bucket
/// for the balancer, whichever CPUs run the program.
fn global_bound(rate_per_s: u64, burst: u64, secs: f64) -> u64 {
    (rate_per_s as f64 * secs).ceil() as u64 + burst
}

const RATE: u64 = 2000;
const LIMITS: &str =
    "limits: {new_flows_per_source: \"100/1s\", burst: 200, new_flows: \"2000/1s\", global_burst: 2000}\n";

#[test]
fn spoofed_hello_flood_is_limited_and_legitimate_sessions_all_succeed() {
    hello_flood("fl", FLOOD_PACKETS, FLOOD_PACE, MIN_FLOOD_PPS, &[0]);
}

/// The same against an even flood, with no gaps between batches: without known sources going
/// first, about half of the legitimate sessions fail here (seen with the marking of known
/// sources removed from flow.rs: 8 of 16 CID sessions).
#[test]
fn smooth_hello_flood_legitimate_sessions_go_first() {
    hello_flood("fs", SMOOTH_PACKETS, SMOOTH_PACE, 15_000.0, &[0, 1]);
}

/// `packets` spoofed ClientHellos paced by `pace` (at least `min_pps`) while legitimate
/// clients handshake and exchange records through cidlb with [`LIMITS`].
///
/// The clients run on CPU 0, and trafgen on each CPU of `flood_cpus`; a veth's receive path,
/// where XDP runs, runs on the sender's CPU, so the flood reaches the program on one CPU or on
/// two, as a NIC's queues would. The global limit is one bucket for the balancer either way:
/// the nodes get the configured rate, not less on one CPU (a bucket per CPU holding a share
/// of the rate admitted half of it here, seen with 2 CPUs) nor more on two.
fn hello_flood(tag: &str, packets: u64, pace: &[&str], min_pps: f64, flood_cpus: &[usize]) {
    let f = up(tag, LIMITS);
    lb_lab::pin_to_cpu(0);

    // A returning client: one session before the flood makes its address known.
    let (g, out) = f.client("warmup", &["--sessions", "1", "--messages", "3"]);
    finish(
        "warmup",
        g,
        &out,
        1,
        Instant::now() + Duration::from_secs(20),
    );
    let before = f.stats();

    let (mut tgs, flood_start) = f.flood(packets, pace, flood_cpus, Spoofed::Random);
    // Wait (bounded) until the flood is seen at the balancer, then measure its rate over 1 s.
    // Packets the balancer saw (the flood is almost all of them).
    let flood_seen = |s: &str| json_counter(s, "packets_seen");
    let seen = loop {
        let s = f.stats();
        if flood_seen(&s) > flood_seen(&before) + 1000 {
            break s;
        }
        assert!(
            flood_start.elapsed() < Duration::from_secs(15),
            "no flood at the balancer after 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let t_seen = Instant::now();
    eprintln!(
        "flood seen after {:.2} s",
        flood_start.elapsed().as_secs_f64()
    );
    // During the flood: rebinding CID sessions, long non-CID sessions idle 1 s between
    // records, and short handshakes.
    let cid = f.client(
        "cid",
        &[
            "--sessions",
            "16",
            "--messages",
            "12",
            "--interval-ms",
            "150",
            "--rebind-every",
            "3",
            "--parallel",
            "4",
        ],
    );
    let plain = f.client(
        "plain",
        &[
            "--no-cid",
            "--sessions",
            "4",
            "--messages",
            "5",
            "--interval-ms",
            "1000",
            "--parallel",
            "4",
        ],
    );
    let short = f.client(
        "short",
        &["--sessions", "30", "--messages", "1", "--parallel", "2"],
    );
    std::thread::sleep(Duration::from_millis(1000));
    let rate_stats = f.stats();
    let pps = (flood_seen(&rate_stats) - flood_seen(&seen)) as f64 / t_seen.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    finish("cid", cid.0, &cid.1, 16, deadline);
    finish("plain", plain.0, &plain.1, 4, deadline);
    finish("short", short.0, &short.1, 30, deadline);
    let legit_done = flood_start.elapsed().as_secs_f64();
    let flood_outlasted_sessions = tgs.iter_mut().all(Trafgen::running);

    // The flood ends by itself after `packets`; bounded in time all the same.
    let (mut ok, mut err) = (true, String::new());
    for tg in tgs {
        let (o, e) = tg.wait(Duration::from_secs(30));
        ok &= o;
        err.push_str(&e);
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    let stats = f.stats();
    let (node_new, node_flood) = f.node_flows();
    let secs = f.t0.elapsed().as_secs_f64();
    let d = |name: &str| json_counter(&stats, name) - json_counter(&before, name);
    let dropped = d("drop_limit_global") + d("drop_limit_source");
    let bound = global_bound(RATE, RATE, secs);
    eprintln!(
        "flood: trafgen ok={ok} ({}) in {flood_secs:.1} s, {pps:.0} packets/s over 1 s, legitimate \
         sessions done after {legit_done:.1} s; balancer: \
         drop_limit_global {} drop_limit_source {} flow_new {} limit_known_reserve {}; nodes saw \
         {node_new} new flows ({node_flood} from the flood) in {secs:.1} s, bound {bound}; \
         flood on CPUs {flood_cpus:?}: {:.0} new flows/s admitted while it ran (limit {RATE}/s)",
        err.trim(),
        d("drop_limit_global"),
        d("drop_limit_source"),
        json_counter(&stats, "flow_new"),
        d("limit_known_reserve"),
        node_new as f64 / flood_secs,
    );
    assert!(
        ok,
        "trafgen did not send its {packets} packets (per CPU): {err}"
    );
    assert!(
        pps >= min_pps,
        "the flood ran at {pps:.0}/s, below {min_pps}"
    );
    // The nodes saw no more new flows than the limit allows since the buckets were created
    // (nor did the balancer pin more), and the flood did reach them within it (the node
    // counter counts).
    assert!(
        node_new <= bound,
        "nodes saw {node_new} new flows, the limit allows {bound}"
    );
    assert!(json_counter(&stats, "flow_new") <= bound, "{stats}");
    // ... and no fewer than it allows either, wherever the flood ran: the limit was saturated
    // for the whole flood, so at least 70% of rate x time went through (a bucket per CPU gave
    // about 50% with the flood on one of two CPUs).
    let floor = (0.7 * RATE as f64 * flood_secs) as u64;
    assert!(
        node_new >= floor,
        "nodes saw {node_new} new flows in {flood_secs:.1} s of flood on CPUs {flood_cpus:?}, \
         below 70% of the configured {RATE}/s ({floor})"
    );
    assert!(
        node_flood >= 1000,
        "only {node_flood} flood flows reached the nodes"
    );
    // 24 random bits per source: N packets come from about N - N²/2²⁵ distinct sources
    // (900,000: 876,000; 300,000: 297,000);
    // at least 100,000 of them were dropped and counted at the balancer.
    assert!(dropped >= 100_000, "only {dropped} flood packets dropped");
    assert!(
        flood_outlasted_sessions,
        "the flood ended before the legitimate sessions did ({legit_done:.1} s): send more"
    );
    // The legitimate handshakes met an exhausted share and went first on the reserve.
    assert!(d("limit_known_reserve") >= 10, "{stats}");
}

/// Established non-CID sessions (routed by the flow table alone), idle 2 s between records,
/// through a 4096-entry flow table while the flood runs for at least 6 s of their life (three
/// idle gaps). Returns the flood's stats line.
fn small_table_flood(tag: &str, extra_config: &str, packets: u64, pace: &[&str]) -> String {
    let f = up(tag, &format!("flows: {{capacity: 4096}}\n{extra_config}"));
    lb_lab::pin_to_cpu(0);
    let before = f.stats();
    let mut plain = f.client(
        "idle",
        &[
            "--no-cid",
            "--sessions",
            "6",
            "--messages",
            "6",
            "--interval-ms",
            "2000",
            "--parallel",
            "6",
        ],
    );
    // Handshakes done, first records exchanged: the sessions are established.
    std::thread::sleep(Duration::from_millis(1500));
    let (mut tgs, flood_start) = f.flood(packets, pace, &[0], Spoofed::Random);
    let mut tg = tgs.pop().expect("one trafgen");
    // Poll both (bounded): when did the flood end, when did the sessions end?
    let (mut flood_end, mut legit_end) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (flood_end.is_none() || legit_end.is_none()) && Instant::now() < deadline {
        if flood_end.is_none() && !tg.running() {
            flood_end = Some(flood_start.elapsed().as_secs_f64());
        }
        if legit_end.is_none() && matches!(plain.0 .0.try_wait(), Ok(Some(_))) {
            legit_end = Some(flood_start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, err) = tg.wait(Duration::from_secs(1));
    let stats = f.stats();
    let d = |name: &str| json_counter(&stats, name) - json_counter(&before, name);
    let (flood_end, legit_end) = (flood_end.unwrap_or(f64::MAX), legit_end.unwrap_or(f64::MAX));
    let line = format!(
        "capacity 4096, {extra_config:?}: {packets} packets in {flood_end:.1} s ({:.0}/s), \
         sessions ended after {legit_end:.1} s of it; flow_new {} flow_hit {} drop_limit_global {}",
        packets as f64 / flood_end,
        d("flow_new"),
        d("flow_hit"),
        d("drop_limit_global"),
    );
    eprintln!("{line}");
    finish("idle", plain.0, &plain.1, 6, Instant::now());
    assert!(ok, "trafgen did not send its {packets} packets: {err}");
    assert!(
        flood_end.min(legit_end) >= 6.0,
        "the flood overlapped the idle sessions for less than 6 s: {line}"
    );
    // Every flood packet is dropped by a limit or becomes a new flow (5-tuples from 40 random
    // bits practically never repeat); the 6 sessions are 6 more new flows. A session whose
    // entry had been evicted would have been pinned again: one new flow more.
    let accounted = d("drop_limit_global") + d("drop_limit_source") + d("flow_new");
    assert!(
        (packets..=packets + 6).contains(&accounted),
        "{accounted} new-flow packets for {packets} flood packets and 6 sessions: a session's \
         flow was evicted and pinned again ({line})"
    );
    line
}

#[test]
fn established_sessions_survive_a_flood_into_a_small_flow_table() {
    // The kernel's LRU alone (no limits): every flood packet becomes a flow, and the idle
    // sessions' entries are kept. At the 10,000 per second; much faster, the nodes'
    // servers (not the table) start losing records.
    small_table_flood("ft", "", 100_000, &["-b", "12000pps"]);
    // With limits, at full rate: the flood inserts at most the limit.
    small_table_flood("fu", LIMITS, FLOOD_PACKETS, FLOOD_PACE);
}
