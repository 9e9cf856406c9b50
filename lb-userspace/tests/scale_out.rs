//! The scale-out test (issue #9): two cidlb balancers behind a router that learns the VIPs over
//! BGP (BIRD, `deploy/bird/*.conf`) and spreads flows over them with an L4-hashed ECMP route;
//! three nodes run the real DTLS test peer and reply through the balancer that brought the
//! request (`lb_lab::fleet`, [`Replies::SameBalancer`], as docs/several-balancers.md sets up).
//!
//! While long non-CID sessions, rebinding CID sessions and a stream of short handshakes run
//! over IPv4 and IPv6, one node's health flaps on one balancer only, one balancer goes into
//! maintenance and back, the other loses every link and gets them back, and the first is
//! restarted cold (pins removed, empty flow table). Each
//! event moves flows between balancers (the test counts flows that both balancers' flow
//! tables hold: at least 20).
//!
//! - `flows.policy: maglev`: every session survives and every record is answered by its node.
//! - `flows.policy: round_robin` (the control): the same events break non-CID sessions.
//! - Tunnel mode (issue #20), `flows.policy: maglev`: both balancers tunnel the VIPs (IPIP
//!   and GUE), the nodes decapsulate (`cidlb node up`) and reply straight through the router
//!   ([`Replies::Direct`]), DTLS 1.3 CID sessions run too: every session survives, every
//!   record is answered by its node, and no reply crosses a balancer.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::{Agent, LogTo, PinGuard},
    fleet::{self, bird_config, Bird, Fleet, Replies, BALANCERS, NODES, TABLE},
    node4, node6,
    peer::{self, ClientRun},
    tunnel, ChildGuard, NetNs, PORT, VIP4, VIP4_SOCKET, VIP6, VIP6_SOCKET,
};

/// One balancer: cidlb, cidlb announce and BIRD in its namespace. Fields drop in order.
struct Balancer {
    agent: Option<Agent>,
    announce: ChildGuard,
    _bird: Bird,
    cfg: PathBuf,
    pins: PinGuard,
}

fn start_agent(ns: &NetNs, cfg: &Path, dir: &Path, i: usize) -> Agent {
    Agent::start(
        common::agent::bin(),
        ns,
        cfg,
        &["--detach-on-exit"],
        &LogTo {
            stderr_prefix: None,
            file: Some(dir.join(format!("cidlb-b{i}.log"))),
        },
    )
    .unwrap_or_else(|e| panic!("balancer {i}: {e}"))
}

/// A global new-flow limit far above the test's rate: it limits nothing, but with it on the
/// balancers learn the nodes' cookies and count the ClientHellos that echo them (issue #19).
const LIMITS: &str = "limits: {new_flows: \"20000/1s\", global_burst: 20000}\n";

/// Balancer `i`'s config. NAT mode: both VIPs on [`PORT`], probed with `udp` at the nodes'
/// addresses. Tunnel mode ([`Replies::Direct`]): both VIPs on [`PORT`] and the port after it
/// (the nodes' DTLS 1.3 servers), the IPv4 VIP through IPIP and the IPv6 VIP through GUE from
/// the balancer's uplink addresses, probed with `dtls` through the tunnel (the nodes' servers
/// bind the VIPs only: a `udp` probe to a node's address would find no server).
fn cidlb_config(policy: &str, pins: &Path, state: &Path, i: usize, replies: Replies) -> String {
    let ifaces = Fleet::balancer_interfaces().join(", ");
    let (vips, probe, dtls) = if replies == Replies::Direct {
        let ((s4, _), (s6, _)) = (fleet::uplink4(i), fleet::uplink6(i));
        let vip = |addr: String, encap: &str| {
            format!(
                "  - {{address: {addr}, ports: [{PORT}, {}], {}}}\n",
                PORT + 1,
                tunnel::vip_settings(encap, &s4, &s6)
            )
        };
        (
            vip(VIP4.to_string(), "ipip") + &vip(format!("\"{VIP6}\""), "gue"),
            "dtls",
            "dtls: {versions: [\"1.2\", \"1.3\"]}\n",
        )
    } else {
        (
            format!("  - {{address: {VIP4}, ports: [{PORT}]}}\n  - {{address: \"{VIP6}\", ports: [{PORT}]}}\n"),
            "udp",
            "",
        )
    };
    let mut s = format!(
        "interfaces: [{ifaces}]\nxdp_mode: native\nvips:\n{vips}{dtls}flows: {{policy: {policy}, idle_timeout: 60s, capacity: 65536}}\nhealth: {{probe: {probe}, interval: 1s, timeout: 500ms, fall: 3, rise: 1}}\nannounce: {{state_dir: {}, table: {TABLE}, grace: 3s}}\n{LIMITS}pin_dir: {}\nnodes:\n",
        state.display(),
        pins.display(),
    );
    for k in 1..=NODES {
        s.push_str(&format!(
            "  - {{id: {k}, address: [{}, \"{}\"]}}\n",
            node4(k),
            node6(k)
        ));
    }
    s
}

/// Polls until the router's route to both VIPs has `hops` next hops.
fn wait_hops(f: &Fleet, hops: usize, within: Duration, what: &str) {
    let t0 = Instant::now();
    loop {
        let r4 = f.router_route(&VIP4_SOCKET.ip().to_string());
        let r6 = f.router_route(&VIP6_SOCKET.ip().to_string());
        let count = |r: &str| {
            if r.trim().is_empty() {
                0
            } else {
                r.matches("nexthop").count().max(1)
            }
        };
        if count(&r4) == hops && count(&r6) == hops {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "{what}: router routes after {within:?}, want {hops} next hops:\n{r4}{r6}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The keys of a pinned flow table (bpftool's JSON, one string per key).
fn flow_keys(pin_dir: &Path) -> BTreeSet<String> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin_dir.join("FLOWS"))
        .output()
        .expect("bpftool");
    if !out.status.success() {
        return BTreeSet::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| e["key"].to_string())
        .collect()
}

/// Flows both balancers' tables hold (each was seen by both: it changed balancer).
fn shared_flows(bs: &[Balancer]) -> BTreeSet<String> {
    let a = flow_keys(&bs[0].pins.0);
    let b = flow_keys(&bs[1].pins.0);
    a.intersection(&b).cloned().collect()
}

/// ~30 s of traffic each. `--give-up-after 3`: a session that lost its node ends instead of
/// retrying through every message (the control would run for many minutes).
const LONG_NON_CID: &[&str] = &[
    "--no-cid",
    "--sessions",
    "24",
    "--parallel",
    "24",
    "--messages",
    "150",
    "--interval-ms",
    "200",
    "--give-up-after",
    "3",
];
const CID_REBINDING: &[&str] = &[
    "--sessions",
    "8",
    "--parallel",
    "8",
    "--messages",
    "130",
    "--interval-ms",
    "250",
    "--rebind-every",
    "10",
    "--give-up-after",
    "3",
];
/// Short sessions, one after another on 2 threads: handshakes all along the events. A 3 s
/// timeout lets a handshake retransmit over the few seconds a balancer change can cost.
const HANDSHAKES: &[&str] = &[
    "--sessions",
    "260",
    "--parallel",
    "2",
    "--messages",
    "2",
    "--interval-ms",
    "150",
    "--timeout-ms",
    "3000",
    "--give-up-after",
    "1",
];

struct Outcome {
    runs: Vec<(String, ClientRun)>,
    changed: usize,
    /// Both balancers' counters over the scenario.
    counts: Counts,
    /// The VIPs' packets the router forwarded, by where they came from.
    vip: fleet::VipReplies,
}

/// The counters of both balancers the scenarios read: the cookie proofs (issue #19) and what
/// the tunnels and the un-NAT of replies did.
const COUNTED: [&str; 5] = [
    "known_src_proven",
    "cookie_unproven",
    "tunnel_encap_ipip",
    "tunnel_encap_gue",
    "reply_unnat",
];

/// [`COUNTED`], in that order, of one balancer or summed over several.
#[derive(Debug, Clone, Copy, Default)]
struct Counts([u64; COUNTED.len()]);

impl Counts {
    /// One balancer's counters.
    fn read(b: &Balancer) -> Self {
        let st =
            lb_lab::agent::stats(common::agent::bin(), &b.pins.0).unwrap_or_else(|e| panic!("{e}"));
        Self(COUNTED.map(|c| {
            lb_lab::agent::counter(&st, c).unwrap_or_else(|| panic!("no counter {c}: {st}"))
        }))
    }

    /// Both balancers' counters, summed.
    fn read_all(bs: &[Balancer]) -> Self {
        bs.iter().map(Self::read).fold(Self::default(), Self::plus)
    }

    fn plus(self, o: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }

    fn since(self, before: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] - before.0[i]))
    }

    fn get(&self, name: &str) -> u64 {
        let i = COUNTED.iter().position(|c| *c == name);
        self.0[i.unwrap_or_else(|| panic!("{name} is not in COUNTED"))]
    }

    fn proofs(&self) -> Proofs {
        Proofs {
            proven: self.get("known_src_proven"),
            unproven: self.get("cookie_unproven"),
        }
    }
}

/// Cookie proofs (issue #19) summed over both balancers: ClientHellos that echoed a cookie
/// the receiving balancer had recorded from the node's reply (`known_src_proven`), and those
/// whose cookie it had not (`cookie_unproven`).
#[derive(Debug, Clone, Copy, Default)]
struct Proofs {
    proven: u64,
    unproven: u64,
}

impl Proofs {
    /// ClientHellos that carried a cookie.
    fn with_cookie(self) -> u64 {
        self.proven + self.unproven
    }

    /// The share of them that proved their source, in percent.
    fn share(self) -> f64 {
        100.0 * self.proven as f64 / self.with_cookie().max(1) as f64
    }
}

impl std::fmt::Display for Proofs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} ClientHellos with a cookie proved their source ({:.1}%; known_src_proven \
             {}, cookie_unproven {})",
            self.proven,
            self.with_cookie(),
            self.share(),
            self.proven,
            self.unproven
        )
    }
}

/// The fleet with its nodes' DTLS servers, the router's BIRD and both balancers (cidlb,
/// `cidlb announce`, BIRD), announced. With [`Replies::Direct`] (tunnel mode) every node
/// decapsulates on its link to each balancer (`cidlb node up`, once per link). Fields drop in
/// order: balancers first, namespaces last.
struct Lab {
    bs: Vec<Balancer>,
    _router_bird: Bird,
    _servers: Vec<ChildGuard>,
    _node_pins: Vec<PinGuard>,
    dir: PathBuf,
    testpeer: PathBuf,
    f: Fleet,
}

fn lab_up(policy: &str, tag: &str, replies: Replies) -> Lab {
    common::require_root();
    let prefix = lb_lab::unique_prefix(tag);
    let f = Fleet::up(&prefix, replies).unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("cidlb-{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let testpeer = common::testpeer();

    // Nodes: the DTLS echo servers, node k issuing CIDs that start with k. NAT mode: one on
    // the wildcard. Tunnel mode: decapsulation on each balancer's link (`cidlb node up`, a
    // file and pin directory per link), then DTLS 1.2 and 1.3 servers bound to the VIPs.
    let mut _servers: Vec<ChildGuard> = Vec::new();
    let mut _node_pins = Vec::new();
    for (ki, n) in f.nodes.iter().enumerate() {
        let k = ki + 1;
        if replies != Replies::Direct {
            _servers.push(
                peer::server(&testpeer, n, k as u32, &[], None).unwrap_or_else(|e| panic!("{e}")),
            );
            continue;
        }
        for i in 1..=BALANCERS {
            let pins = PinGuard::new(&format!("{tag}n{k}b{i}"));
            let cfg = dir.join(format!("node{k}-b{i}.yaml"));
            let text = tunnel::node_config(
                &format!("b{i}"),
                k,
                &[VIP4.into(), VIP6.into()],
                &pins.0.display().to_string(),
            );
            std::fs::write(&cfg, text).unwrap();
            common::agent::node_cmd(n, &cfg, "up");
            _node_pins.push(pins);
        }
        _servers.extend(tunnel::servers(&testpeer, n, k).unwrap_or_else(|e| panic!("{e}")));
    }

    // The router's BIRD, from deploy/bird/router.conf.
    let _router_bird = fleet::start_router_bird(&f, &dir, &common::deploy_bird("router.conf"))
        .unwrap_or_else(|e| panic!("{e}"));

    // Balancers: the same cidlb config (but pin and state directories), their own BIRD.
    let bs: Vec<Balancer> = (1..=BALANCERS)
        .map(|i| {
            let ns = &f.balancers[i - 1];
            let pins = PinGuard::new(&format!("{tag}{i}"));
            let state = dir.join(format!("state-b{i}"));
            let cfg = dir.join(format!("cidlb-b{i}.yaml"));
            std::fs::write(&cfg, cidlb_config(policy, &pins.0, &state, i, replies)).unwrap();
            let ((l4, p4), (l6, p6)) = (fleet::uplink4(i), fleet::uplink6(i));
            let conf = bird_config(
                &common::deploy_bird("balancer.conf"),
                &[
                    ("ROUTER_ID", l4.clone()),
                    ("LOCAL4", l4),
                    ("PEER4", p4),
                    ("LOCAL6", l6),
                    ("PEER6", p6),
                    ("CIDLB_TABLE", TABLE.to_string()),
                ],
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let bird =
                Bird::start(ns, &dir, &format!("b{i}"), &conf).unwrap_or_else(|e| panic!("{e}"));
            let agent = start_agent(ns, &cfg, &dir, i);
            let announce = ChildGuard(
                ns.nsenter(common::agent::bin().to_str().unwrap())
                    .args(["announce", "--every-ms", "200", "--config"])
                    .arg(&cfg)
                    .stderr(std::fs::File::create(dir.join(format!("announce-b{i}.log"))).unwrap())
                    .spawn()
                    .expect("spawn cidlb announce"),
            );
            Balancer {
                agent: Some(agent),
                announce,
                _bird: bird,
                cfg,
                pins,
            }
        })
        .collect();
    wait_hops(&f, 2, Duration::from_secs(20), "both balancers announced");
    std::thread::sleep(Duration::from_millis(1000));
    Lab {
        bs,
        _router_bird,
        _servers,
        _node_pins,
        dir,
        testpeer,
        f,
    }
}

/// The scenario, with `flows.policy: policy`, the nodes replying as `replies` says: through
/// the balancer that brought the request ([`Replies::SameBalancer`], NAT VIPs) or straight
/// through the router ([`Replies::Direct`], tunnel VIPs, with DTLS 1.3 CID sessions as well).
fn scenario(policy: &str, tag: &str, replies: Replies) -> Outcome {
    let Lab {
        f,
        testpeer,
        dir,
        _servers,
        _node_pins,
        _router_bird,
        mut bs,
    } = lab_up(policy, tag, replies);
    let counts_before = Counts::read_all(&bs);

    // Traffic, both families: long non-CID sessions (routed by flow for their whole life),
    // rebinding CID sessions, and a stream of short handshakes.
    // In tunnel mode also rebinding DTLS 1.3 CID sessions (wolfSSL), on the port after PORT.
    let mut kinds = vec![
        ("long-non-cid", PORT, LONG_NON_CID.to_vec()),
        ("cid-rebinding", PORT, CID_REBINDING.to_vec()),
        ("handshakes", PORT, HANDSHAKES.to_vec()),
    ];
    if replies == Replies::Direct {
        let dtls13 = [&["--dtls", "1.3"], CID_REBINDING].concat();
        kinds.push(("cid-rebinding-dtls13", PORT + 1, dtls13));
    }
    let mut clients = Vec::new();
    for fam in ["v4", "v6"] {
        for (kind, port, args) in &kinds {
            let name = format!("{kind}-{fam}");
            let out = dir.join(format!("{name}.json"));
            let vip = lb_lab::vip_socket(fam, *port);
            let child = peer::spawn_client(&testpeer, &f.client, &vip, args, &out)
                .unwrap_or_else(|e| panic!("{e}"));
            clients.push((name, out, child));
        }
    }
    let t0 = Instant::now();
    let at = |secs: u64| {
        let due = t0 + Duration::from_secs(secs);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };

    // 0. A health flap seen by one balancer only: node 3 rejects balancer 2's probes (ICMP
    // port unreachable from the node), so balancer 2 holds it down for a while and balancer 1
    // does not. No flow changes balancer meanwhile, so nothing may break: balancer 2's new
    // flows of node 3 take their second choice and stay pinned there.
    let probe_src = fleet::pair4(2, 3).0;
    let iptables = |op: &str| {
        let cmd = [
            "iptables",
            op,
            "INPUT",
            "-p",
            "udp",
            "-s",
            &probe_src,
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-port-unreachable",
        ];
        f.nodes[2].must(&cmd).unwrap_or_else(|e| panic!("{e}"));
    };
    at(1);
    iptables("-I");
    at(6);
    iptables("-D");
    let log = std::fs::read_to_string(dir.join("cidlb-b2.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("node down") && l.contains("node=3")),
        "balancer 2 never held node 3 down: the flap did not happen"
    );

    // 1. Balancer 1 in maintenance: withdrawn (its flows move to balancer 2), then back.
    // (Node 3 is up again on balancer 2 by now: rise 1, interval 1 s.)
    at(9);
    let c1 = bs[0].cfg.display().to_string();
    common::agent::cidlb(&["maintenance", "on", "--config", &c1]);
    wait_hops(&f, 1, Duration::from_secs(3), "balancer 1 in maintenance");
    at(13);
    common::agent::cidlb(&["maintenance", "off", "--config", &c1]);
    wait_hops(
        &f,
        2,
        Duration::from_secs(3),
        "balancer 1 out of maintenance",
    );

    // 2. Balancer 2 loses every link: the router's BGP hold time (3 s) drops it.
    at(16);
    f.set_balancer_links(2, false).unwrap();
    wait_hops(&f, 1, Duration::from_secs(6), "balancer 2 cut off");
    at(20);
    f.set_balancer_links(2, true).unwrap();
    wait_hops(&f, 2, Duration::from_secs(10), "balancer 2 reconnected");

    // 3. Balancer 1 restarted cold: detached, pins removed, a fresh agent with an empty flow
    // table; flows that come back to it are new to it.
    at(23);
    let mut changed = shared_flows(&bs);
    // Its counters start over: what it counted so far is kept here.
    let b1_before_restart = Counts::read(&bs[0]);
    let agent = bs[0].agent.take().expect("running");
    agent.terminate().expect("cidlb exits on SIGTERM");
    assert!(!bs[0].pins.0.exists(), "cold restart: pins must be gone");
    wait_hops(&f, 1, Duration::from_secs(3), "balancer 1 stopped");
    bs[0].agent = Some(start_agent(&f.balancers[0], &bs[0].cfg, &dir, 1));
    wait_hops(
        &f,
        2,
        Duration::from_secs(10),
        "balancer 1 back after a cold restart",
    );

    // The clients finish on their own (bounded by their message counts and timeouts).
    let mut runs = Vec::new();
    for (name, out, mut child) in clients {
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "client {name} still running after 90 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = std::fs::read_to_string(&out).unwrap();
        let run =
            ClientRun::parse(&text, status.success()).unwrap_or_else(|e| panic!("{name}: {e}"));
        runs.push((name, run));
    }
    changed.extend(shared_flows(&bs));
    let paths = f.reply_paths().unwrap_or_else(|e| panic!("{e}"));
    let counts = Counts::read_all(&bs)
        .plus(b1_before_restart)
        .since(counts_before);
    let proofs = counts.proofs();
    let vip = f.vip_replies().unwrap_or_else(|e| panic!("{e}"));
    // (With Replies::Direct no reply leaves through a balancer's link: the nodes' count of
    // those through the other balancer says nothing.)
    let crossed = match replies {
        Replies::Direct => String::new(),
        _ => format!(
            "{} of {} node replies left through the other balancer than their connection's; ",
            paths.crossed, paths.replies
        ),
    };
    println!(
        "{policy} {replies:?}: {} flows changed balancer; wall time {:?}; {crossed}the router \
         forwarded {} packets from the VIPs from the nodes' own links and {} from the \
         balancers; {proofs}",
        changed.len(),
        t0.elapsed(),
        vip.from_nodes,
        vip.from_balancers,
    );
    for (name, run) in &runs {
        println!("{policy} {name}: {}", run.summary);
    }
    for (i, b) in bs.iter().enumerate() {
        let json =
            common::agent::cidlb(&["stats", "--json", "--pin-dir", b.pins.0.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let nonzero: Vec<String> = v["counters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, x)| x.as_u64() != Some(0))
                    .map(|(k, x)| format!("{k}={x}"))
                    .collect()
            })
            .unwrap_or_default();
        println!("{policy} balancer {}: {}", i + 1, nonzero.join(" "));
    }
    for b in &mut bs {
        let _ = b.announce.terminate(5);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        runs,
        changed: changed.len(),
        counts,
        vip,
    }
}

/// Panics unless the events moved at least 20 flows between balancers and yet every client
/// ran to the end, every session ok, every record answered by its node.
fn assert_every_session_survived(o: &Outcome, what: &str) {
    assert!(
        o.changed >= 20,
        "{what}: only {} flows changed balancer: the events did not exercise the fleet",
        o.changed
    );
    let mut bad = Vec::new();
    for (name, run) in &o.runs {
        if !run.ok {
            bad.push(format!("{name}: client failed: {}", run.summary));
        }
        for m in run.misrouted() {
            bad.push(format!("{name}: {m}"));
        }
        for s in &run.sessions {
            if s["status"] != "ok" {
                bad.push(format!("{name}: {s}"));
            }
        }
    }
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
}

#[test]
fn maglev_sessions_survive_balancers_leaving_and_joining() {
    let o = scenario("maglev", "som", Replies::SameBalancer);
    assert_every_session_survived(&o, "with maglev");
    let proofs = o.counts.proofs();
    // Every handshake is a cookie exchange, and the nodes reply through the balancer that
    // brought the request, so each ClientHello that echoes a cookie proves its source, but
    // those whose handshake a balancer event cut in two: the first ClientHello and the
    // node's reply through one balancer, the second through the other (maintenance, a cut),
    // or through a balancer restarted cold in between (its cookies are gone).
    let sessions: usize = o.runs.iter().map(|(_, r)| r.sessions.len()).sum();
    assert!(
        proofs.with_cookie() >= sessions as u64,
        "{sessions} handshakes but only {} ClientHellos with a cookie: {proofs}",
        proofs.with_cookie(),
    );
    assert!(
        proofs.unproven <= EVENT_UNPROVEN,
        "replies through the balancer that brought the request: {proofs}; more unproven than \
         the {EVENT_UNPROVEN} the events can account for",
    );
}

/// Tunnel mode (issue #20): the same events with both balancers serving tunnel VIPs by
/// Maglev (the IPv4 VIP through IPIP, the IPv6 VIP through GUE), the nodes decapsulating
/// (`cidlb node up` on each balancer's link) and replying straight to the client through the
/// router ([`Replies::Direct`]). DTLS 1.3 CID sessions (wolfSSL) run beside the DTLS 1.2 ones.
/// Every session survives and every record is answered by its node; every echoed record went
/// through a tunnel; and no reply crossed a balancer: the router forwarded the VIPs' packets
/// from the nodes' own links, none from a balancer, the balancers un-NATed nothing, and no
/// cookie proved a source (a balancer learns cookies only from replies that cross it).
#[test]
fn tunnel_mode_maglev_sessions_survive_balancers_leaving_and_joining() {
    let o = scenario("maglev", "ft", Replies::Direct);
    assert_every_session_survived(&o, "tunnel mode, maglev");
    // Records echoed, per family: each crossed a tunnel and came back as a reply.
    let echoed = |fam: &str| -> u64 {
        o.runs
            .iter()
            .filter(|(name, _)| name.ends_with(fam))
            .flat_map(|(_, r)| &r.sessions)
            .map(|s| s["ok"].as_u64().unwrap_or(0))
            .sum()
    };
    let (v4, v6) = (echoed("-v4"), echoed("-v6"));
    let c = o.counts;
    let (ipip, gue) = (c.get("tunnel_encap_ipip"), c.get("tunnel_encap_gue"));
    println!(
        "tunnel mode: {v4} IPv4 and {v6} IPv6 records echoed; {ipip} packets through IPIP, {gue} \
         through GUE"
    );
    assert!(
        ipip >= v4 && gue >= v6,
        "{v4} IPv4 and {v6} IPv6 records echoed, but the balancers tunnelled {ipip} packets \
         through IPIP and {gue} through GUE"
    );
    assert!(
        o.vip.from_nodes >= v4 + v6,
        "{} records echoed, but the router forwarded only {} replies from the nodes' links",
        v4 + v6,
        o.vip.from_nodes
    );
    assert_eq!(
        o.vip.from_balancers, 0,
        "replies crossed a balancer on their way to the client"
    );
    assert_eq!(c.get("reply_unnat"), 0, "a balancer un-NATed replies");
    assert_eq!(
        c.proofs().proven,
        0,
        "a balancer proved a cookie, so it saw a node's reply: {}",
        c.proofs()
    );
}

/// ClientHellos with a cookie the events of [`scenario`] may leave unproven: handshakes in
/// flight when a balancer goes or comes back (maintenance on and off, a cut and a
/// reconnection, a cold restart) whose second ClientHello meets the other balancer.
const EVENT_UNPROVEN: u64 = 12;

/// The control: the same events with per-box round robin break non-CID sessions, which shows
/// the test above can fail.
#[test]
fn control_round_robin_breaks_sessions_that_change_balancer() {
    let o = scenario("round_robin", "sor", Replies::SameBalancer);
    assert!(
        o.changed >= 20,
        "only {} flows changed balancer: the control's failure would be left to chance",
        o.changed
    );
    let failed: u64 = o
        .runs
        .iter()
        .filter(|(name, _)| name.starts_with("long-non-cid"))
        .map(|(_, r)| r.summary["failed"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        failed > 0,
        "round robin: no long non-CID session broke, though flows changed balancer"
    );
}

/// What a VIP receives that no VIP port takes (a ping, UDP to an unbalanced port, a TCP SYN,
/// UDP behind an IPv6 destination-options header) must not loop: the kernel of a balancer
/// routes it back to the router (its default route; the VIP is only in `announce.table`),
/// which sends it to a balancer again until the TTL runs out. Each frame carries a unique id;
/// the router must forward it exactly once towards a balancer and never see it come back.
#[test]
fn vip_traffic_no_vip_port_takes_does_not_loop() {
    use etherparse::PacketBuilder;
    let lab = lab_up("maglev", "sol", Replies::SameBalancer);
    let (f, dir) = (&lab.f, &lab.dir);
    let cmac = f.client.mac("c0").unwrap();
    let rmac = f.router.mac("rc").unwrap();
    let (c4, c6) = (lb_lab::CLIENT4.octets(), lb_lab::CLIENT6.octets());
    let (v4, v6) = match (VIP4_SOCKET.ip(), VIP6_SOCKET.ip()) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V6(b)) => (a.octets(), b.octets()),
        _ => unreachable!(),
    };
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |what: &str, build: &dyn Fn(&[u8]) -> Vec<u8>| {
        // Unique per frame and run, so nothing else on the wire matches it.
        let id = format!("cidlb-loop-{}-{what}", std::process::id());
        frames.push((id.clone(), build(id.as_bytes())));
    };
    let eth = || PacketBuilder::ethernet2(cmac, rmac);
    let write = |b: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        b(&mut out);
        out
    };
    add("ping4", &|id| {
        write(&|o| {
            eth()
                .ipv4(c4, v4, 64)
                .icmpv4_echo_request(7, 1)
                .write(o, id)
                .unwrap()
        })
    });
    add("udp4", &|id| {
        write(&|o| {
            eth()
                .ipv4(c4, v4, 64)
                .udp(40001, 5700)
                .write(o, id)
                .unwrap()
        })
    });
    add("syn4", &|id| {
        write(&|o| {
            eth()
                .ipv4(c4, v4, 64)
                .tcp(40002, VIP4_SOCKET.port(), 1, 64240)
                .syn()
                .write(o, id)
                .unwrap()
        })
    });
    add("ping6", &|id| {
        write(&|o| {
            eth()
                .ipv6(c6, v6, 64)
                .icmpv6_echo_request(7, 1)
                .write(o, id)
                .unwrap()
        })
    });
    add("udp6", &|id| {
        write(&|o| {
            eth()
                .ipv6(c6, v6, 64)
                .udp(40001, 5700)
                .write(o, id)
                .unwrap()
        })
    });
    add("syn6", &|id| {
        write(&|o| {
            eth()
                .ipv6(c6, v6, 64)
                .tcp(40002, VIP6_SOCKET.port(), 1, 64240)
                .syn()
                .write(o, id)
                .unwrap()
        })
    });
    add("dstopts6", &|id| {
        // UDP to the balanced port behind a destination-options header (PadN): the header
        // goes in after the IPv6 header; the UDP checksum does not cover it.
        let mut fr = write(&|o| {
            eth()
                .ipv6(c6, v6, 64)
                .udp(40003, VIP6_SOCKET.port())
                .write(o, id)
                .unwrap()
        });
        let l3 = 14;
        let plen = u16::from_be_bytes([fr[l3 + 4], fr[l3 + 5]]) + 8;
        fr[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
        fr[l3 + 6] = 60;
        fr.splice(l3 + 40..l3 + 40, [17, 0, 1, 4, 0, 0, 0, 0]);
        fr
    });
    let wires: Vec<Vec<u8>> = frames.iter().map(|(_, fr)| fr.clone()).collect();
    // The router's interfaces towards the balancers.
    let towards: Vec<u32> = (1..=BALANCERS)
        .map(|i| {
            let out = f
                .router
                .must(&["cat", &format!("/sys/class/net/rb{i}/ifindex")]);
            out.unwrap().trim().parse().unwrap()
        })
        .collect();
    let ((), seen) = lb_lab::sniff::capture(&f.router, Duration::from_secs(4), || {
        std::thread::sleep(Duration::from_millis(200));
        lb_lab::sniff::send(&f.client, "c0", &wires);
    });
    let mut bad = Vec::new();
    for (id, _) in &frames {
        let hits = |outgoing: bool| {
            seen.iter()
                .filter(|s| s.outgoing == outgoing && towards.contains(&s.ifindex))
                .filter(|s| lb_lab::sniff::contains(&s.frame, id.as_bytes()))
                .count()
        };
        let (out, back) = (hits(true), hits(false));
        println!("{id}: forwarded towards a balancer {out} time(s), came back {back} time(s)");
        if out != 1 || back != 0 {
            bad.push(format!(
                "{id}: forwarded {out}, came back {back} (want 1 and 0)"
            ));
        }
    }
    // What the balancers counted (one balancer got each frame, by the router's hash).
    let mut dropped = 0;
    for (i, b) in lab.bs.iter().enumerate() {
        let st = lb_lab::agent::stats(common::agent::bin(), &b.pins.0).unwrap();
        let n = |c: &str| lb_lab::agent::counter(&st, c).unwrap_or(0);
        let (port, proto) = (n("drop_vip_other_port"), n("drop_vip_other_proto"));
        println!(
            "balancer {}: drop_vip_other_port {port}, drop_vip_other_proto {proto}",
            i + 1
        );
        dropped += port + proto;
    }
    if dropped != frames.len() as u64 {
        bad.push(format!(
            "the balancers dropped {dropped} of the {} frames",
            frames.len()
        ));
    }
    let _ = std::fs::remove_dir_all(dir);
    assert!(bad.is_empty(), "VIP traffic looped:\n{}", bad.join("\n"));
}

/// Handshakes per family in [`handshake_round`].
const ROUND_SESSIONS: u32 = 60;

/// What one [`handshake_round`] did.
struct Round {
    /// The nodes' replies meanwhile, and how many left through the other balancer than the
    /// one that brought their connection (iptables in the nodes, `Fleet::reply_paths`).
    paths: fleet::ReplyPaths,
    /// The cookie proofs both balancers counted meanwhile.
    proofs: Proofs,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; {} of {} node replies left through the other balancer",
            self.proofs, self.paths.crossed, self.paths.replies
        )
    }
}

/// Short DTLS 1.2 sessions (a cookie exchange each) from the client to both VIPs, each on a
/// new source port, so the router spreads them over both balancers; every session must
/// succeed.
fn handshake_round(lab: &Lab, what: &str) -> Round {
    let paths = || lab.f.reply_paths().unwrap_or_else(|e| panic!("{e}"));
    let before = paths();
    let counts_before = Counts::read_all(&lab.bs);
    let n = ROUND_SESSIONS.to_string();
    let args = ["--sessions", &n, "--parallel", "4", "--messages", "1"];
    let runs = [("v4", VIP4_SOCKET), ("v6", VIP6_SOCKET)].map(|(fam, vip)| {
        let out = lab.dir.join(format!("round-{what}-{fam}.json"));
        let child = peer::spawn_client(&lab.testpeer, &lab.f.client, &vip.to_string(), &args, &out)
            .unwrap_or_else(|e| panic!("{e}"));
        (fam, out, child)
    });
    for (fam, out, mut child) in runs {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} {fam}: client still running after 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = std::fs::read_to_string(&out).unwrap();
        let run = ClientRun::parse(&text, status.success())
            .unwrap_or_else(|e| panic!("{what} {fam}: {e}"));
        assert!(run.ok, "{what} {fam}: {}\n{text}", run.summary);
    }
    let after = paths();
    Round {
        paths: fleet::ReplyPaths {
            replies: after.replies - before.replies,
            crossed: after.crossed - before.crossed,
        },
        proofs: Counts::read_all(&lab.bs).since(counts_before).proofs(),
    }
}

/// Issue #19 item 4. Behind ECMP a node's HelloVerifyRequest can leave through the other
/// balancer than the one that brought the ClientHello; the client's second ClientHello (same
/// 5-tuple, so the same balancer as the first) then meets a balancer that never saw its
/// cookie, and its source stays unproven. With [`Replies::SameBalancer`] every reply crosses
/// the balancer that saw the request. Handshakes over IPv4 and IPv6, first with the nodes
/// replying by ECMP (the control: about half cross, and as many stay unproven), then, on the
/// same fleet, through the balancer that brought the request: none crosses, every one proven.
#[test]
fn cookies_prove_sources_only_when_replies_return_through_their_balancer() {
    let lab = lab_up("maglev", "sop", Replies::Ecmp);
    let ecmp = handshake_round(&lab, "ecmp");
    lab.f
        .reply_through_ingress()
        .unwrap_or_else(|e| panic!("{e}"));
    let same = handshake_round(&lab, "same");
    println!("nodes reply by ECMP: {ecmp}");
    println!("nodes reply through the balancer that brought the request: {same}");
    let _ = std::fs::remove_dir_all(&lab.dir);
    let least = 2 * ROUND_SESSIONS as u64;
    assert!(
        ecmp.proofs.with_cookie() >= least && same.proofs.with_cookie() >= least,
        "fewer than {least} ClientHellos with a cookie: by ECMP {ecmp}; through the balancer \
         {same}"
    );
    assert_eq!(same.paths.crossed, 0, "{same}");
    assert_eq!(same.proofs.unproven, 0, "{same}");
    // The control: 120 handshakes' replies each take either balancer by a hash independent of
    // the request's; fewer than 10% crossing, or proven share above 90%, would be a 1-in-10^14
    // chance.
    assert!(
        ecmp.paths.crossed * 10 >= ecmp.paths.replies && ecmp.proofs.share() < 90.0,
        "replies by ECMP: {ecmp}; about half should have crossed and stayed unproven"
    );
}
