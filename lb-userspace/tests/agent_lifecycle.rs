//! The agent under steady traffic in the netns lab: kill -9, restart (adopting the pinned
//! datapath), reload with a node added, drain a node, a bad reload: no packet of an unaffected
//! session may be lost. Health checks take a stopped node out of new-flow rotation and back.
//! `/metrics` is valid Prometheus text and agrees with the kernel's STATS map read by bpftool.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use common::{
    agent::{cidlb, json_counter, AgentProc, Bed},
    traffic::{body, warm_up, Echo, Stream},
};
use lb_lab::{
    node4, node6,
    packet::{cid_record, handshake_record},
    Lab, PORT, VIP4, VIP6,
};

/// A lab config with the given nodes (`k`, extra YAML fields).
fn config(lab: &Lab, pin_dir: &Path, nodes: &[(usize, &str)], extra: &str) -> String {
    let mut s = format!(
        "interfaces: [{}]\nxdp_mode: native\nvips:\n  - {{address: {VIP4}, ports: [{PORT}]}}\n  - {{address: \"{VIP6}\", ports: [{PORT}]}}\nflows: {{capacity: 4096}}\npin_dir: {}\nnodes:\n",
        lab.interfaces().join(", "),
        pin_dir.display()
    );
    for (k, more) in nodes {
        let sep = if more.is_empty() { "" } else { ", " };
        s.push_str(&format!(
            "  - {{id: {k}, address: [{}, \"{}\"]{sep}{more}}}\n",
            node4(*k),
            node6(*k)
        ));
    }
    s.push_str(extra);
    s
}

fn cid_to(node: u8) -> impl Fn(u64) -> Vec<u8> + Send + 'static {
    move |seq| {
        cid_record(
            &[node, 0xca, 0xfe, (seq >> 8) as u8, seq as u8, 0],
            &body(b"steady application data", seq),
        )
    }
}

/// Which node answers a brand-new flow (a fresh source port), for `n` flows.
fn new_flow_nodes(lab: &Lab, n: usize) -> BTreeMap<u32, usize> {
    let name = lab.client.name.clone();
    std::thread::spawn(move || {
        lb_lab::enter(&name);
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 512];
            for _ in 0..5 {
                s.send_to(
                    &handshake_record(b"ClientHello"),
                    SocketAddr::from((VIP4, PORT)),
                )
                .unwrap();
                if let Ok((len, _)) = s.recv_from(&mut buf) {
                    let t = String::from_utf8_lossy(&buf[..len]);
                    if let Some(id) = t
                        .strip_prefix("node=")
                        .and_then(|t| t.split(' ').next())
                        .and_then(|t| t.parse().ok())
                    {
                        *seen.entry(id).or_insert(0) += 1;
                        break;
                    }
                }
            }
        }
        seen
    })
    .join()
    .unwrap()
}

#[test]
fn restart_reload_and_drain_lose_no_packet() {
    let bed = Bed::up("lc", 3);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    lb_lab::write_then_rename(&cfg, &config(lab, &pins.0, &[(1, ""), (2, "")], ""));
    let agent = AgentProc::start(lab, &cfg, &[]);
    assert!(agent.saw("datapath created"));
    std::thread::sleep(Duration::from_millis(1000));
    warm_up(&lab.client.name, 2);

    let vip4 = SocketAddr::from((VIP4, PORT));
    let vip6 = SocketAddr::from((VIP6, PORT));
    let every = Duration::from_millis(4);
    let max = 5000;
    let s1 = Stream::start(&lab.client.name, vip4, every, max, cid_to(1));
    let s2 = Stream::start(&lab.client.name, vip4, every, max, cid_to(2));
    let s6 = Stream::start(&lab.client.name, vip6, every, max, cid_to(1));
    let sf = Stream::start(&lab.client.name, vip4, every, max, |seq| {
        handshake_record(&body(b"non-CID session record", seq))
    });
    std::thread::sleep(Duration::from_millis(800));

    // kill -9: nothing runs any cleanup; the pinned links keep the program attached.
    agent.kill9();
    std::thread::sleep(Duration::from_millis(800));
    let agent = AgentProc::start(lab, &cfg, &[]);
    assert!(
        agent.saw("datapath adopted"),
        "the restarted agent must adopt the pinned datapath"
    );
    std::thread::sleep(Duration::from_millis(800));

    // Node 3 added, by SIGHUP.
    lb_lab::write_then_rename(
        &cfg,
        &config(lab, &pins.0, &[(1, ""), (2, ""), (3, "")], ""),
    );
    agent.signal(libc::SIGHUP);
    agent
        .wait_for("config reloaded", Duration::from_secs(10))
        .expect("reload after SIGHUP");
    std::thread::sleep(Duration::from_millis(500));

    // Node 2 drained, by editing the file (the agent watches it).
    lb_lab::write_then_rename(
        &cfg,
        &config(
            lab,
            &pins.0,
            &[(1, ""), (2, "state: draining"), (3, "")],
            "",
        ),
    );
    agent
        .wait_for("config reloaded", Duration::from_secs(10))
        .expect("reload after the file changed");
    let fresh = new_flow_nodes(lab, 8);
    assert!(
        !fresh.contains_key(&2),
        "a draining node got new flows: {fresh:?}"
    );
    assert_eq!(
        fresh.values().sum::<usize>(),
        8,
        "every new flow answered: {fresh:?}"
    );

    // A bad config is rejected with key and problem; nothing changes.
    lb_lab::write_then_rename(
        &cfg,
        &config(
            lab,
            &pins.0,
            &[(1, ""), (2, "state: draining"), (3, "")],
            "dtls: {cid_length: 99}\n",
        ),
    );
    let line = agent
        .wait_for("reload rejected", Duration::from_secs(10))
        .expect("bad config must be rejected");
    assert!(
        line.contains("dtls.cid_length") && line.contains("99"),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(500));

    let (r1, r2, r6, rf) = (s1.finish(), s2.finish(), s6.finish(), sf.finish());
    for (name, r, node) in [
        ("CID node 1", &r1, Some(1)),
        ("CID node 2 (drained)", &r2, Some(2)),
        ("CID node 1 IPv6", &r6, Some(1)),
        ("non-CID flow", &rf, None),
    ] {
        assert!(r.sent > 500, "{name}: only {} sent", r.sent);
        assert!(
            r.lost.is_empty(),
            "{name}: {} of {} lost, first {:?}",
            r.lost.len(),
            r.sent,
            &r.lost[..r.lost.len().min(10)]
        );
        assert_eq!(r.wrong_source, 0, "{name}: answers not from the VIP");
        match node {
            Some(n) => assert_eq!(
                r.nodes.keys().copied().collect::<Vec<_>>(),
                [n],
                "{name}: {:?}",
                r.nodes
            ),
            None => assert_eq!(
                r.nodes.len(),
                1,
                "{name}: a flow moved between nodes: {:?}",
                r.nodes
            ),
        }
    }

    // Stopping the agent leaves the datapath forwarding; `cidlb detach` removes it.
    let status = agent.terminate().expect("cidlb exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert_eq!(
        new_flow_nodes(lab, 2).values().sum::<usize>(),
        2,
        "forwarding must go on without the agent"
    );
    let out = cidlb(&["detach", "--pin-dir", pins.0.to_str().unwrap()]);
    assert!(out.contains("detached from 4 interface(s)"), "{out}");
    assert!(!pins.0.exists());
    let links = lab.balancer.must(&["ip", "link", "show"]).unwrap();
    assert!(
        !links.contains("xdp"),
        "XDP still attached after detach:\n{links}"
    );
}

#[test]
fn health_checks_and_metrics() {
    let mut bed = Bed::up("hc", 2);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let (interval, fall, rise) = (Duration::from_millis(500), 2u32, 2u32);
    lb_lab::write_then_rename(
        &cfg,
        &config(
            lab,
            &pins.0,
            &[(1, ""), (2, "")],
            "health: {probe: udp, interval: 500ms, timeout: 200ms, fall: 2, rise: 2}\nstats: {prometheus: \"127.0.0.1:9105\"}\n",
        ),
    );
    let agent = AgentProc::start(lab, &cfg, &["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1500));
    // 24 new flows: with Maglev (the default) a flow's node follows its hash, so all 24 on one
    // of two nodes has odds 2^-23.
    assert_eq!(
        new_flow_nodes(lab, 24).len(),
        2,
        "both nodes take new flows while healthy"
    );

    // Node 2's server stops: the node answers ICMP port unreachable.
    bed.echo[1].stop();
    let t0 = Instant::now();
    let line = agent
        .wait_for("node down", Duration::from_secs(10))
        .expect("node 2 must be marked down");
    let took = t0.elapsed();
    assert!(line.contains("node=2"), "{line}");
    let bound = interval * (fall + 1) + Duration::from_millis(300);
    assert!(
        took <= bound,
        "marked down after {took:?}, bound interval*fall + interval = {:?} (+300 ms slack)",
        interval * (fall + 1)
    );
    let down = new_flow_nodes(lab, 6);
    assert_eq!(
        down.keys().copied().collect::<Vec<_>>(),
        [1],
        "a down node got new flows: {down:?}"
    );

    // It comes back after `rise` good probes.
    bed.echo[1] = Echo::start(&bed.lab.nodes[1].name, 2, PORT);
    let t0 = Instant::now();
    let line = agent
        .wait_for("node up", Duration::from_secs(10))
        .expect("node 2 must come back");
    assert!(line.contains("node=2"), "{line}");
    assert!(
        t0.elapsed() <= interval * (rise + 1) + Duration::from_millis(300),
        "came back after {:?}",
        t0.elapsed()
    );
    let back = new_flow_nodes(lab, 24);
    assert!(
        back.contains_key(&2),
        "node 2 takes new flows again: {back:?}"
    );

    // /metrics: valid text format, and the same counters as `cidlb stats --json`.
    let metrics = scrape(lab, "127.0.0.1:9105");
    let families = validate_prometheus(&metrics);
    for f in [
        "cidlb_packets_total",
        "cidlb_node_packets_total",
        "cidlb_node_up",
        "cidlb_flows",
        "cidlb_health_transitions_total",
    ] {
        assert!(families.contains(f), "{f} missing from /metrics");
    }
    assert!(
        metrics.contains("cidlb_health_transitions_total{node=\"2\"} 2"),
        "{metrics}"
    );
    // /metrics against an independent reading of the kernel's STATS map (bpftool, not cidlb's
    // aya reader): bpftool, then /metrics, then bpftool again. Probes keep arriving, so each
    // counter may only grow: before <= /metrics <= after, counter by counter.
    let stats_pin = pins.0.join(lb_common::names::STATS);
    let before = lb_lab::bpftool::percpu_u64_sums(&stats_pin).unwrap_or_else(|e| panic!("{e}"));
    let metrics = scrape(lab, "127.0.0.1:9105");
    let after = lb_lab::bpftool::percpu_u64_sums(&stats_pin).unwrap_or_else(|e| panic!("{e}"));
    let exported = packets_total(&metrics);
    assert_eq!(
        exported.len(),
        lb_common::Counter::ALL.len(),
        "/metrics must export every counter once: {exported:?}"
    );
    for &c in lb_common::Counter::ALL {
        let (lo, hi) = (before[&(c as u32)], after[&(c as u32)]);
        let got = *exported
            .get(c.name())
            .unwrap_or_else(|| panic!("{} missing from /metrics", c.name()));
        assert!(
            lo <= got && got <= hi,
            "{}: /metrics says {got}, the STATS map held {lo} before and {hi} after",
            c.name()
        );
    }
    // Not a comparison of zeros: the flows above were counted.
    assert!(
        before[&(lb_common::Counter::FlowNew as u32)] >= 14,
        "flow_new: {before:?}"
    );
    assert!(agent.terminate().expect("exits").success());
}

/// `cidlb_packets_total{reason="R"} V` samples of a Prometheus text: reason → value.
fn packets_total(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cidlb_packets_total{reason=\"") else {
            continue;
        };
        let (reason, rest) = rest
            .split_once("\"}")
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        let value: u64 = rest
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        assert!(
            out.insert(reason.to_owned(), value).is_none(),
            "repeated: {line}"
        );
    }
    out
}

/// GET /metrics from inside the balancer namespace.
fn scrape(lab: &Lab, addr: &str) -> String {
    use std::io::{Read, Write};
    let (name, addr) = (lab.balancer.name.clone(), addr.to_owned());
    std::thread::spawn(move || {
        lb_lab::enter(&name);
        let mut c = std::net::TcpStream::connect(&addr).expect("connect to /metrics");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(s.contains("Content-Type: text/plain; version=0.0.4"), "{s}");
        s.split_once("\r\n\r\n").unwrap().1.to_owned()
    })
    .join()
    .unwrap()
}

/// Checks the Prometheus text exposition format (0.0.4) line by line; returns the families.
fn validate_prometheus(text: &str) -> HashSet<String> {
    let mut typed = HashSet::new();
    let mut helped = HashSet::new();
    let mut samples = BTreeSet::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(
                name_ok(name) && helped.insert(name.to_owned()),
                "bad or repeated HELP: {line}"
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap_or(""));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad TYPE: {line}"
            );
            assert!(typed.insert(name.to_owned()), "repeated TYPE: {line}");
        } else {
            assert!(
                !line.is_empty() && !line.starts_with('#'),
                "unexpected line: {line:?}"
            );
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value: {line}"));
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name_ok(name) && typed.contains(name),
                "sample before its TYPE: {line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(
                        labels.starts_with('{') && labels.ends_with('}'),
                        "bad labels: {line}"
                    );
                    for pair in labels[1..labels.len() - 1].split(',') {
                        let (k, v) = pair
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label: {line}"));
                        assert!(
                            name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                            "bad label: {line}"
                        );
                    }
                }
            }
            assert!(samples.insert(series.to_owned()), "repeated series: {line}");
        }
    }
    typed
}

#[test]
fn explain_and_shadow_mode() {
    let bed = Bed::up("sh", 2);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    lb_lab::write_then_rename(&cfg, &config(lab, &pins.0, &[(1, ""), (2, "")], ""));

    // explain: a CID record for node 2, through a private copy of the program.
    let out = lab
        .balancer
        .nsenter(env!("CARGO_BIN_EXE_cidlb"))
        .args([
            "explain",
            "--config",
            cfg.to_str().unwrap(),
            "--src",
            "198.51.100.7:40000",
            "--dst",
            "192.0.2.10:5684",
        ])
        .args([
            "--payload",
            "19fefd000100000000000102a1a2a3a4a50004abcdabcd",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("counters: cid_routed"), "{text}");
    assert!(text.contains("node:     2 (sent to it)"), "{text}");
    assert!(text.contains(&format!("-> {}:5684", node4(2))), "{text}");
    assert!(!pins.0.exists(), "explain must not pin anything");

    // The same record to the VIP in tunnel mode: the encapsulated frame, outer and inner. A
    // tunnel packet is dropped while the node's neighbour is unresolved (the kernel cannot
    // take it): a datagram from the balancer resolves it, as the node's health probes do.
    let node2 = node4(2).to_string();
    let _ = lab
        .balancer
        .must(&["bash", "-c", &format!("echo > /dev/udp/{node2}/9")]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !lab
        .balancer
        .must(&["ip", "neigh", "show", &node2])
        .unwrap_or_default()
        .contains("lladdr")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{node2} never resolved"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let tunnel_cfg = cfg.with_extension("tunnel.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        &format!("ports: [{}]}}", lb_lab::PORT),
        &format!(
            "ports: [{}], forwarding: tunnel, tunnel: {{encap: ipip, source4: 10.99.0.1}}}}",
            lb_lab::PORT
        ),
        1,
    );
    std::fs::write(&tunnel_cfg, text).unwrap();
    let out = lab
        .balancer
        .nsenter(env!("CARGO_BIN_EXE_cidlb"))
        .args(["explain", "--config", tunnel_cfg.to_str().unwrap()])
        .args(["--src", "198.51.100.7:40000", "--dst", "192.0.2.10:5684"])
        .args([
            "--payload",
            "19fefd000100000000000102a1a2a3a4a50004abcdabcd",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&tunnel_cfg);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("tunnel_encap_ipip"), "{text}");
    assert!(
        text.contains("after:    eth ")
            && text.contains(&format!("10.99.0.1 -> {}  ttl 64  ipip", node4(2))),
        "{text}"
    );
    assert!(
        text.contains("inner: 198.51.100.7:40000 -> 192.0.2.10:5684"),
        "{text}"
    );

    // Shadow mode: routed and counted, but nothing is forwarded to the nodes.
    let agent = AgentProc::start(lab, &cfg, &["--shadow", "--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1200));
    let s = Stream::start(
        &lab.client.name,
        SocketAddr::from((VIP4, PORT)),
        Duration::from_millis(5),
        100,
        cid_to(1),
    );
    let r = s.finish();
    assert_eq!(r.received, 0, "shadow mode forwarded packets: {r:?}");
    let json = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    assert_eq!(json_counter(&json, "cid_routed"), r.sent, "{json}");
    assert_eq!(json_counter(&json, "shadow_pass"), r.sent, "{json}");
    assert_eq!(json_counter(&json, "fwd_redirect"), 0, "{json}");
    assert!(agent.terminate().expect("exits").success());
}
