//! Handshake floods (issue #8 §2, issue #19) against real DTLS peers (lb-testpeer, on Mbed
//! TLS) through cidlb with `limits:`. A spoofed-source ClientHello flood from trafgen (random
//! sources in 10.0.0.0/8, or a pool of 1,000 addresses repeating each tuple) runs while
//! legitimate clients handshake and exchange records. The nodes count the new flows they see
//! themselves (iptables rules counting conntrack entries in each node namespace, by source),
//! independently of cidlb's counters.

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

/// Where the nodes' new flows came from.
#[derive(Debug, Default, Clone, Copy)]
struct NodeFlows {
    all: u64,
    /// From the spoofed floods' 10.0.0.0/8.
    flood: u64,
    /// From the lab's client network (the legitimate clients).
    clients: u64,
    /// Packets (not flows) from the lab's client network.
    client_packets: u64,
}

/// Source prefixes the nodes count new flows from, in [`NodeFlows`]' order after `all`.
const FLOOD_NET: &str = "10.0.0.0/8";
const CLIENT_NET: &str = "198.51.100.0/24";

/// Counters of new UDP flows to the DTLS port in a node namespace: one iptables rule per
/// source prefix matching conntrack entries whose mark is still 0, then one that counts every
/// such entry and marks it. Each entry's first packet is counted once, however often its
/// tuple repeats before the node replies (conntrack calls a packet NEW until it has seen a
/// reply, so a `--ctstate NEW` rule would count a repeated tuple's every copy). First, a rule
/// that counts every packet from the legitimate clients.
fn count_new_flows(ns: &NetNs) {
    for rule in [
        format!("-A INPUT -s {CLIENT_NET} -p udp --dport 5684"),
        format!("-A INPUT -s {FLOOD_NET} -p udp --dport 5684 -m connmark --mark 0"),
        format!("-A INPUT -s {CLIENT_NET} -p udp --dport 5684 -m connmark --mark 0"),
        "-A INPUT -p udp --dport 5684 -m connmark --mark 0 -j CONNMARK --set-mark 1".to_owned(),
    ] {
        let mut args = vec!["iptables"];
        args.extend(rule.split(' '));
        ns.must(&args).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The new flows counted in a node namespace.
fn read_counters(ns: &NetNs) -> NodeFlows {
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
        [client_packets, flood, clients, all] => NodeFlows {
            all,
            flood,
            clients,
            client_packets,
        },
        _ => panic!("unexpected iptables output in {}:\n{out}", ns.name),
    }
}

fn up(tag: &str, extra_config: &str) -> Flood {
    let lab = lab_up(tag, 2);
    let dir = std::env::temp_dir().join(format!("cidlb-flood-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sent = format!(
        "-A OUTPUT -s {} -d {} -p udp --dport {}",
        lb_lab::CLIENT4,
        lb_lab::VIP4,
        lb_lab::PORT
    );
    let mut args = vec!["iptables"];
    args.extend(sent.split(' '));
    lab.client.must(&args).unwrap_or_else(|e| panic!("{e}"));
    // The balancer routes the flood's sources back out towards the client side, as a
    // balancer with a default route would: the nodes' replies to spoofed ClientHellos are
    // un-NATed and sent (the cookies their HelloVerifyRequests carry are learned, and fill
    // the cookie table as a real flood's would), and the client's kernel drops them. Without
    // the route the balancer has no way there and passes them to its kernel.
    lab.balancer
        .ip(&format!(
            "route add {FLOOD_NET} via {} dev lbc",
            lb_lab::CLIENT4
        ))
        .unwrap_or_else(|e| panic!("{e}"));
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

    /// The stats once the flood shows at the balancer (1,000 packets more than `before`),
    /// waiting at most 15 s from `flood_start`.
    fn wait_for_flood(&self, before: &str, flood_start: Instant) -> String {
        loop {
            let s = self.stats();
            if json_counter(&s, "packets_seen") > json_counter(before, "packets_seen") + 1000 {
                return s;
            }
            assert!(
                flood_start.elapsed() < Duration::from_secs(15),
                "no flood at the balancer after 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stats(&self) -> String {
        cidlb(&[
            "stats",
            "--json",
            "--pin-dir",
            self.pins.0.to_str().unwrap(),
        ])
    }

    /// The new flows the nodes saw, summed.
    fn node_flows(&self) -> NodeFlows {
        self.lab
            .nodes
            .iter()
            .map(read_counters)
            .fold(NodeFlows::default(), |a, n| NodeFlows {
                all: a.all + n.all,
                flood: a.flood + n.flood,
                clients: a.clients + n.clients,
                client_packets: a.client_packets + n.client_packets,
            })
    }

    /// Packets the legitimate clients sent to the VIP's DTLS port (an iptables rule in the
    /// client namespace's OUTPUT: the clients' sockets, not trafgen's packet socket).
    fn client_sent(&self) -> u64 {
        let out = self
            .lab
            .client
            .must(&["iptables", "-L", "OUTPUT", "-nvx"])
            .unwrap_or_else(|e| panic!("{e}"));
        out.lines()
            .nth(2)
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("unexpected iptables output in the client:\n{out}"))
    }
}

/// Waits (bounded) for a client to exit and checks that every session succeeded, each on one
/// node (the one its CID names, with a CID).
fn finish(name: &str, g: ChildGuard, out: &Path, sessions: usize, deadline: Instant) {
    let run = wait_run(name, g, out, deadline);
    let bad = problems(name, &run, sessions);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Waits (bounded) for a client to exit and reads its report.
fn wait_run(name: &str, mut g: ChildGuard, out: &Path, deadline: Instant) -> ClientRun {
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
    ClientRun::parse(&text, status.success()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What went wrong in a client's run, one line each: a failed client, a session count other
/// than `sessions`, a failed session or record, a session answered by another node than its
/// CID names.
fn problems(name: &str, run: &ClientRun, sessions: usize) -> Vec<String> {
    let mut bad = Vec::new();
    if !run.ok {
        bad.push(format!("{name}: client failed: {:#}", run.summary));
    }
    if run.sessions.len() != sessions {
        bad.push(format!(
            "{name}: {} sessions reported, {sessions} run",
            run.sessions.len()
        ));
    }
    for s in &run.sessions {
        if s["status"] != "ok" || s["failed"] != 0 {
            bad.push(format!("{name}: {s}"));
        }
    }
    bad.extend(run.misrouted().into_iter().map(|m| format!("{name}: {m}")));
    bad
}

/// Every counter of `cidlb stats --json` that differs between two readings, `name=delta`.
fn moved(before: &str, after: &str) -> String {
    let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let (b, a) = (v(before), v(after));
    a["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, x)| {
                    let d = x.as_u64()? - b["counters"][k].as_u64().unwrap_or(0);
                    (d != 0).then(|| format!("{k}={d}"))
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
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
    let seen = f.wait_for_flood(&before, flood_start);
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
    let NodeFlows {
        all: node_new,
        flood: node_flood,
        ..
    } = f.node_flows();
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

/// The issue #19 flood: tight limits, as an attacker would meet them.
const POOL_LIMITS: &str =
    "limits: {new_flows_per_source: \"20/1s\", new_flows: \"2000/1s\", global_burst: 2000}\n";
/// How long the pooled flood runs: longer than a client's handshake retries (Mbed TLS gives up
/// after 10 s here), so a starved client cannot wait it out.
const POOL_FLOOD_SECS: u64 = 25;
/// The pooled flood goes as fast as trafgen's TX_RING does on one CPU: 130,000 to 290,000
/// per second here, with the machine's other load.
const MIN_POOL_PPS: f64 = 50_000.0;

#[test]
fn pooled_flood_repeating_each_tuple_twice_cannot_crowd_out_returning_clients() {
    pooled_flood("fp2", 2);
}

#[test]
fn pooled_flood_repeating_each_tuple_three_times_cannot_crowd_out_returning_clients() {
    pooled_flood("fp3", 3);
}

/// A blind attacker's best try at the known-source reserve (issue #19): spoofed ClientHellos
/// from a pool of [`trafgen::POOL_SOURCES`] addresses, so every source sends many tuples, and
/// every tuple sent `repeat` times in a row, as if its flow were established, for
/// [`POOL_FLOOD_SECS`] against [`POOL_LIMITS`]. Before the flood, clients at the lab's client
/// address complete cookie exchanges and establish sessions (CID sessions that rebind, non-CID
/// sessions); during it, those sessions must keep every record, and new handshakes from the
/// same address must all succeed.
///
/// When a second packet of a flow made its source known, every pool address was known within
/// a second and the pool took the reserve: a returning client's ClientHello then competed with
/// the flood for each token. Known must mean proven: a ClientHello that echoed the node's
/// cookie, which a blind spoofer never sees.
///
/// How often the client lost that competition depends on the flood's shape: a software flood
/// on a shared 2-CPU machine comes in bursts with pauses of milliseconds (the generator
/// refilling its ring, or preempted), and a token that appears in a pause waits for the next
/// packet, the client's as likely as the flood's. Here about one first ClientHello in three
/// had to be sent again (seen: 3 and 4 lost packets, handshakes of 0.5 s instead of
/// milliseconds; once 1 of 10 handshakes failed). So besides the sessions, two checks that
/// do not depend on the flood's shape: no packet of the legitimate clients is lost (counted
/// by iptables where they send and where the nodes receive), and every flow admitted through
/// the reserve is the client's.
fn pooled_flood(tag: &str, repeat: usize) {
    let f = up(tag, POOL_LIMITS);
    lb_lab::pin_to_cpu(0);
    let count = |n: u32| -> String { n.to_string() };

    // Before the flood: handshakes (each a cookie exchange) from the client's address.
    let (g, out) = f.client("warmup", &["--sessions", "2", "--messages", "2"]);
    let warmup = wait_run("warmup", g, &out, Instant::now() + Duration::from_secs(20));
    // Sessions established before the flood that run through all of it.
    let (cid_n, plain_n) = (4, 2);
    let est_messages = (POOL_FLOOD_SECS + 9).to_string();
    let est_start = Instant::now();
    let mut est_cid = f.client(
        "established-cid",
        &[
            "--sessions",
            &count(cid_n),
            "--parallel",
            &count(cid_n),
            "--messages",
            &est_messages,
            "--interval-ms",
            "1000",
            "--rebind-every",
            "4",
        ],
    );
    let mut est_plain = f.client(
        "established-plain",
        &[
            "--no-cid",
            "--sessions",
            &count(plain_n),
            "--parallel",
            &count(plain_n),
            "--messages",
            &est_messages,
            "--interval-ms",
            "1000",
        ],
    );
    // Their handshakes take milliseconds; each session's report says when it was done.
    std::thread::sleep(Duration::from_millis(2000));
    let before = f.stats();
    let nodes_before = f.node_flows();

    // -n bounds the count (no tuple recurs within it); the flood is stopped after
    // POOL_FLOOD_SECS. It runs on the other CPU than the clients: sharing one, the clients
    // would only run, and send, in the flood's pauses.
    let packets = trafgen::POOL_TUPLES * repeat as u64;
    let (mut tgs, flood_start) = f.flood(packets, &[], &[1], Spoofed::Pool { repeat });
    let mut tg = tgs.pop().expect("one trafgen");
    let flood_seen = |s: &str| json_counter(s, "packets_seen");
    let seen = f.wait_for_flood(&before, flood_start);
    let t_seen = Instant::now();
    let est_before_flood = flood_start.duration_since(est_start).as_millis() as u64;

    // Two seconds in (every pool address has sent many tuples by then): new handshakes from
    // the returning client's address, two at a time, a few records each.
    std::thread::sleep(Duration::from_millis(2000));
    let new_n = 10;
    let fresh = f.client(
        "new-during-flood",
        &[
            "--sessions",
            &count(new_n),
            "--parallel",
            "2",
            "--messages",
            "3",
            "--interval-ms",
            "1000",
        ],
    );
    let flood_end = t_seen + Duration::from_secs(POOL_FLOOD_SECS);
    let fresh = wait_run(
        "new-during-flood",
        fresh.0,
        &fresh.1,
        flood_end + Duration::from_secs(60),
    );
    let fresh_done = t_seen.elapsed().as_secs_f64();
    // The flood runs its course (trafgen sends its -n packets in more than POOL_FLOOD_SECS).
    if let Some(d) = flood_end.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let flood_lasted = tg.running();
    let at_stop = f.stats();
    let flood_secs = t_seen.elapsed().as_secs_f64();
    let trafgen_err = tg.stop();
    let nodes_after = f.node_flows();
    let est_running = [&mut est_cid, &mut est_plain].map(|c| matches!(c.0 .0.try_wait(), Ok(None)));
    let est_deadline = Instant::now() + Duration::from_secs(30);
    let est = [
        ("established-cid", est_cid, cid_n),
        ("established-plain", est_plain, plain_n),
    ]
    .map(|(name, (g, out), n)| (name, wait_run(name, g, &out, est_deadline), n));
    // Every client is done: nothing in flight. Every packet they sent, since the lab came up,
    // against every packet the nodes received from them.
    let legit_sent = f.client_sent();
    let legit_received = f.node_flows().client_packets;
    let legit_lost = legit_sent.saturating_sub(legit_received);

    // The numbers, before any verdict.
    let d = |name: &str| json_counter(&at_stop, name) - json_counter(&before, name);
    let flood_packets = flood_seen(&at_stop) - flood_seen(&seen);
    let pps = flood_packets as f64 / flood_secs;
    let spoofed = nodes_after.flood - nodes_before.flood;
    let legit = nodes_after.clients - nodes_before.clients;
    let ok = |r: &ClientRun| r.sessions.iter().filter(|s| s["status"] == "ok").count();
    let records = |r: &ClientRun| -> (u64, u64) {
        r.sessions.iter().fold((0, 0), |(o, f), s| {
            (
                o + s["ok"].as_u64().unwrap_or(0),
                f + s["failed"].as_u64().unwrap_or(0),
            )
        })
    };
    eprintln!(
        "pooled flood, each tuple sent {repeat} times, from {} sources: {flood_packets} \
         packets in {flood_secs:.1} s ({pps:.0}/s; trafgen still sending at the end: \
         {flood_lasted}{})",
        trafgen::POOL_SOURCES,
        if trafgen_err.trim().is_empty() {
            String::new()
        } else {
            format!("; trafgen said: {}", trafgen_err.trim())
        },
    );
    eprintln!(
        "  nodes (conntrack entries) during the flood: spoofed sources {spoofed}, the \
         legitimate client's address {legit}; packets of the legitimate clients (whole test): \
         {legit_sent} sent, {legit_received} reached the nodes, {legit_lost} lost"
    );
    eprintln!(
        "  balancer: flow_new {} flow_hit {} drop_limit_global {} drop_limit_source {} \
         limit_known_reserve {} known_src_proven {} cookie_learned {} cookie_unproven {}",
        d("flow_new"),
        d("flow_hit"),
        d("drop_limit_global"),
        d("drop_limit_source"),
        d("limit_known_reserve"),
        d("known_src_proven"),
        d("cookie_learned"),
        d("cookie_unproven"),
    );
    eprintln!(
        "  balancer, every counter that moved: {}",
        moved(&before, &at_stop)
    );
    eprintln!(
        "  legitimate: before the flood {}/{} handshakes ok; established before it (done within \
         {est_before_flood} ms): {}; new during it: {}/{new_n} sessions ok, done {fresh_done:.1} \
         s into it, handshake_ms {:?}",
        ok(&warmup),
        warmup.sessions.len(),
        est.iter()
            .map(|(name, r, n)| {
                let (o, fl) = records(r);
                format!(
                    "{name} {}/{n} sessions ok, records {o} ok {fl} failed",
                    ok(r)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        ok(&fresh),
        fresh
            .sessions
            .iter()
            .map(|s| s["handshake_ms"].as_u64().unwrap_or(0))
            .collect::<Vec<_>>(),
    );

    // The verdicts.
    let mut bad = problems("warmup", &warmup, 2);
    for (name, r, n) in &est {
        bad.extend(problems(name, r, *n as usize));
        for s in &r.sessions {
            if s["handshake_ms"].as_u64().unwrap_or(u64::MAX) >= est_before_flood {
                bad.push(format!("{name}: handshake not done before the flood: {s}"));
            }
        }
    }
    bad.extend(problems("new-during-flood", &fresh, new_n as usize));
    // Independently of the clients' retries: none of their packets was dropped. A returning
    // client's ClientHello must not have to retry against the flood; a limit that let the
    // pool in first would drop some.
    if legit_lost > 0 {
        bad.push(format!(
            "{legit_lost} of the legitimate clients' {legit_sent} packets never reached a node"
        ));
    }
    // The returning client's new handshakes each proved its source (the node's cookie,
    // learned on the way out, came back in its second ClientHello), and no ClientHello
    // carried a cookie nobody recorded.
    if d("known_src_proven") < new_n as u64 || d("cookie_unproven") != 0 {
        bad.push(format!(
            "{new_n} new handshakes, known_src_proven {} cookie_unproven {}",
            d("known_src_proven"),
            d("cookie_unproven")
        ));
    }
    // Only proven sources take the reserve, and the one proven source here is the client's:
    // each flow admitted through the reserve is one of its new flows at the nodes.
    if d("limit_known_reserve") > legit {
        bad.push(format!(
            "limit_known_reserve {} but the legitimate client opened only {legit} new flows: \
             spoofed sources took the known reserve",
            d("limit_known_reserve")
        ));
    }
    assert!(
        bad.is_empty(),
        "during the pooled flood:\n{}",
        bad.join("\n")
    );
    // The flood was what it should be: long, fast, repeating its tuples, and reaching the
    // nodes within the limits.
    assert!(
        flood_lasted && fresh_done < flood_secs,
        "the flood ended before the new handshakes did ({fresh_done:.1} s of {flood_secs:.1} s): \
         send more"
    );
    assert!(
        est_running.iter().all(|r| *r),
        "the established sessions ended before the flood did: lengthen them"
    );
    assert!(
        pps >= MIN_POOL_PPS,
        "the flood ran at {pps:.0}/s, below {MIN_POOL_PPS}"
    );
    // An admitted tuple's later copies are hits on the flow its first copy made (when the
    // first copy was the one admitted: about 80% of them here).
    assert!(
        d("flow_hit") * 2 >= (repeat as u64 - 1) * spoofed,
        "flow_hit {} for {spoofed} admitted spoofed tuples sent {repeat} times: trafgen did \
         not repeat its tuples",
        d("flow_hit")
    );
    assert!(
        spoofed >= 1000,
        "only {spoofed} flood flows reached the nodes"
    );
    // POOL_LIMITS' global rate and burst are RATE's.
    let bound = global_bound(RATE, RATE, f.t0.elapsed().as_secs_f64());
    assert!(
        nodes_after.all <= bound,
        "nodes saw {} new flows, the limit allows {bound}",
        nodes_after.all
    );
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
