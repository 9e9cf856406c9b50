//! Real traffic through the attached XDP program: a client, a balancer running `cidlb run`, and
//! two node namespaces with UDP echo servers. CID records must reach the node their CID names,
//! a non-CID flow must stay on one node, and every reply must come back from the VIP.

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use common::{
    agent::{cidlb, json_counter, AgentProc, Bed},
    traffic::Echo,
};
use lb_lab::{
    packet::{cid_record, handshake_record},
    CLIENT4, CLIENT6, VIP4, VIP6,
};

const PORT: u16 = lb_lab::PORT;

/// Sends `payload` from `sock` to the VIP and returns (node id, reply source) of its echo,
/// retrying a bounded number of times. Late echoes of earlier retries are skipped.
fn ask(sock: &UdpSocket, vip: SocketAddr, payload: &[u8]) -> Option<(u32, SocketAddr)> {
    let mut buf = [0u8; 2048];
    for _ in 0..5 {
        sock.send_to(payload, vip).ok()?;
        while let Ok((len, from)) = sock.recv_from(&mut buf) {
            if !buf[..len].ends_with(payload) {
                continue;
            }
            let text = String::from_utf8_lossy(&buf[..len]);
            let id = text
                .strip_prefix("node=")?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            return Some((id, from));
        }
    }
    None
}

#[test]
fn real_traffic_reaches_the_cid_node_and_replies_come_from_the_vip() {
    let mut bed = Bed::up("nf", 2);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    bed.write_config("flows: {capacity: 4096}\n");
    let agent = AgentProc::start(lab, &cfg, &["--detach-on-exit"]);
    // Ready means attached: the file appeared only once XDP was on every interface.
    let ready = agent.ready_file.clone();
    let links = lab.balancer.must(&["ip", "link", "show"]).unwrap();
    for dev in lab.interfaces() {
        assert!(
            links
                .lines()
                .any(|l| l.contains(&format!(" {dev}@")) && l.contains("xdp")),
            "ready file written but no XDP program on {dev}:\n{links}"
        );
    }
    // veth needs a moment after XDP attach before it forwards.
    thread::sleep(Duration::from_millis(1500));

    let client_ns = lab.client.name.clone();
    let results = thread::spawn(move || {
        lb_lab::enter(&client_ns);
        let mut report = Vec::new();
        let mut spread = Vec::new();
        for (vip, bind) in [
            (format!("{VIP4}:{PORT}"), "0.0.0.0:0"),
            (format!("[{VIP6}]:{PORT}"), "[::]:0"),
        ] {
            let vip: SocketAddr = vip.parse().unwrap();
            // CID records: 10 "rebinds" (new source port each) per node, 5 records each.
            for node in [1u8, 2] {
                for rebind in 0..10 {
                    let s = UdpSocket::bind(bind).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    for m in 0..5u8 {
                        let rec =
                            cid_record(&[node, 0xc1, 0xd0, rebind, m, 0], b"application data");
                        report.push(("cid", vip, Some(node as u32), ask(&s, vip, &rec)));
                    }
                }
            }
            // A non-CID flow (handshake records) from one source port stays on one node.
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let first = ask(&s, vip, &handshake_record(b"ClientHello"))
                .map(|r| r.0)
                .unwrap_or(0);
            for _ in 0..20 {
                report.push((
                    "flow",
                    vip,
                    Some(first),
                    ask(&s, vip, &handshake_record(b"ClientHello")),
                ));
            }
            // New flows spread over both nodes: any node may answer each one (`None`), every
            // reply must still come from the VIP, and together they reach both nodes.
            let mut seen = std::collections::BTreeSet::new();
            // 24 flows: with Maglev (the default) each lands by its hash; all on one of two
            // nodes has odds 2^-23.
            for _ in 0..24 {
                let s = UdpSocket::bind(bind).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let got = ask(&s, vip, &handshake_record(b"hello"));
                if let Some((id, _)) = got {
                    seen.insert(id);
                }
                report.push(("spread", vip, None, got));
            }
            spread.push((vip, seen));
        }
        (report, spread)
    })
    .join()
    .expect("client thread");
    let (results, spread) = results;

    let mut failures = Vec::new();
    for (vip, seen) in &spread {
        if seen.len() != 2 {
            failures.push(format!(
                "spread to {vip}: 24 new flows reached nodes {seen:?}, want both"
            ));
        }
    }
    for (kind, vip, want, got) in &results {
        match got {
            None => failures.push(format!("{kind} to {vip}: no reply")),
            Some((id, from)) => {
                if want.is_some_and(|w| w != *id) {
                    failures.push(format!(
                        "{kind} to {vip}: answered by node {id}, want {want:?}"
                    ));
                }
                if from != vip {
                    failures.push(format!(
                        "{kind} to {vip}: reply came from {from}, not the VIP"
                    ));
                }
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Counters through the CLI, from the pinned maps.
    let json = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    // 2 families x 2 nodes x 10 rebinds x 5 records, each at least once.
    assert!(
        json_counter(&json, "cid_routed") >= 200,
        "cid_routed: {json}"
    );
    assert!(
        json_counter(&json, "reply_unnat") >= 200 + 2 * 27,
        "reply_unnat: {json}"
    );
    assert!(
        json_counter(&json, "fwd_redirect") > 0,
        "fwd_redirect: {json}"
    );

    // SIGTERM with --detach-on-exit: the agent detaches, unpins and exits 0.
    let status = agent.terminate().expect("cidlb exits on SIGTERM");
    let served: u64 = bed.echo.iter_mut().map(Echo::stop).sum();
    assert!(served >= 200, "nodes served {served}");
    assert!(status.success(), "cidlb exited with {status}");
    assert!(
        !ready.exists(),
        "ready file {} left after a clean exit",
        ready.display()
    );
    assert!(!pins.0.exists(), "pins left behind in {}", pins.0.display());
    let links = lab.balancer.must(&["ip", "link", "show"]).unwrap();
    assert!(
        !links.contains("xdp"),
        "XDP still attached after SIGTERM:\n{links}"
    );
}

/// A node whose DTLS server is gone answers with port unreachable. The balancer un-NATs the
/// error (from the VIP, quoting the client's datagram to the VIP), so the client's connected
/// socket sees "connection refused"; from the node's own address it would match no socket.
#[test]
fn a_nodes_port_unreachable_reaches_the_client_from_the_vip() {
    let mut bed = Bed::up("ni", 1);
    bed.write_config("");
    // Nothing listens on the node's port any more.
    let _ = bed.echo.iter_mut().map(Echo::stop).sum::<u64>();
    let agent = AgentProc::start(&bed.lab, &bed.cfg, &[]);
    thread::sleep(Duration::from_millis(1500));

    let client_ns = bed.lab.client.name.clone();
    let refused = thread::spawn(move || {
        lb_lab::enter(&client_ns);
        let mut out = Vec::new();
        for (vip, bind) in [
            (format!("{VIP4}:{PORT}"), "0.0.0.0:0"),
            (format!("[{VIP6}]:{PORT}"), "[::]:0"),
        ] {
            let s = UdpSocket::bind(bind).unwrap();
            s.connect(&vip).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 64];
            // Bounded: five tries, 300 ms each.
            let got = (0..5).find_map(|_| {
                let _ = s.send(&handshake_record(b"ClientHello"));
                match s.recv(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some("refused"),
                    Ok(_) => Some("an answer"),
                    Err(_) => None,
                }
            });
            out.push((vip, got));
        }
        out
    })
    .join()
    .expect("client thread");
    for (vip, got) in &refused {
        assert_eq!(
            *got,
            Some("refused"),
            "a datagram to {vip}: the node's port unreachable did not reach the socket"
        );
    }
    let json = cidlb(&["stats", "--json", "--pin-dir", bed.pins.0.to_str().unwrap()]);
    assert!(
        json_counter(&json, "reply_icmp_unnat") >= 2,
        "reply_icmp_unnat: {json}"
    );
    assert!(agent.terminate().expect("cidlb exits").success());
}

/// Real kernel fragmentation both ways (issue 21, items 3 and 4): the client's routes to the
/// VIPs have an MTU of 1280 (`mtu lock` for IPv4: no DF, the kernel fragments), so its
/// 1400-byte datagrams leave as fragments, every one of which must reach the node the CID (or
/// the flow) names, which reassembles and echoes; the nodes' routes to the client have an MTU
/// of 1280 too, so the echo leaves the node as fragments, every one of which must be
/// un-NATed: the client's kernel reassembles the whole echo, from the VIP.
#[test]
fn fragmented_datagrams_reach_their_node_and_fragmented_replies_come_from_the_vip() {
    let bed = Bed::up("fg", 2);
    bed.write_config("");
    let lab = &bed.lab;
    lab.client
        .ip(&format!(
            "route add {VIP4}/32 via 198.51.100.1 mtu lock 1280"
        ))
        .unwrap();
    lab.client
        .ip(&format!(
            "-6 route add {VIP6}/128 via 2001:db8:c::1 mtu 1280"
        ))
        .unwrap();
    for (i, n) in lab.nodes.iter().enumerate() {
        let gw4 = format!("203.0.113.{}", 16 * i + 1);
        n.ip(&format!("route add {CLIENT4}/32 via {gw4} mtu lock 1280"))
            .unwrap();
        n.ip(&format!(
            "-6 route add {CLIENT6}/128 via 2001:db8:{:x}::1 mtu 1280",
            i + 1
        ))
        .unwrap();
    }
    let agent = AgentProc::start(lab, &bed.cfg, &[]);
    thread::sleep(Duration::from_millis(1500));

    let client_ns = lab.client.name.clone();
    let results = thread::spawn(move || {
        lb_lab::enter(&client_ns);
        let mut report = Vec::new();
        for (vip, bind) in [
            (format!("{VIP4}:{PORT}"), "0.0.0.0:0"),
            (format!("[{VIP6}]:{PORT}"), "[::]:0"),
        ] {
            let vip: SocketAddr = vip.parse().unwrap();
            for node in [1u8, 2] {
                for m in 0..3u8 {
                    let s = UdpSocket::bind(bind).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    let rec = cid_record(&[node, 0xf1, 0xa9, m, 0, 0], &[m; 1380]);
                    report.push((vip, Some(node as u32), rec.len(), ask(&s, vip, &rec)));
                }
            }
            // By flow: the handshake datagrams of one source port stay on one node.
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let hello = handshake_record(&[0x01; 1390]);
            let first = ask(&s, vip, &hello).map(|r| r.0);
            for _ in 0..3 {
                report.push((vip, first, hello.len(), ask(&s, vip, &hello)));
            }
        }
        report
    })
    .join()
    .expect("client thread");

    let mut failures = Vec::new();
    for (vip, want, len, got) in &results {
        assert!(*len > 1280, "a {len}-byte datagram is not fragmented");
        match got {
            None => failures.push(format!("{len} bytes to {vip}: no whole echo")),
            Some((id, from)) => {
                if want.is_some_and(|w| w != *id) {
                    failures.push(format!("to {vip}: answered by node {id}, want {want:?}"));
                }
                if from != vip {
                    failures.push(format!("to {vip}: the echo came from {from}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let json = cidlb(&["stats", "--json", "--pin-dir", bed.pins.0.to_str().unwrap()]);
    // 2 families x (6 CID datagrams + 4 by flow), each in 2 fragments, each answered.
    for (name, at_least) in [
        ("frag_first", 20),
        ("frag_followed", 20),
        ("reply_frag_first", 20),
        ("reply_frag_unnat", 20),
    ] {
        assert!(json_counter(&json, name) >= at_least, "{name}: {json}");
    }
    for name in [
        "drop_frag_unknown",
        "drop_reply_frag_unknown",
        "drop_node_fragment",
    ] {
        assert_eq!(json_counter(&json, name), 0, "{name}: {json}");
    }
    assert!(agent.terminate().expect("cidlb exits").success());
}

#[test]
fn no_readiness_when_the_datapath_cannot_come_up() {
    // An interface that does not exist: `cidlb run` must exit with the reason and never write
    // its ready file, and the harness must say so at once rather than wait out its timeout.
    let bed = Bed::up("nr", 1);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let text = lab
        .cidlb_config(&pins.0.display().to_string(), "")
        .replace("interfaces: [", "interfaces: [nosuch0, ");
    std::fs::write(&cfg, text).unwrap();
    let t0 = std::time::Instant::now();
    let err = match lb_lab::agent::Agent::start(
        common::agent::bin(),
        &lab.balancer,
        &cfg,
        &[],
        &lb_lab::agent::LogTo::default(),
    ) {
        Ok(a) => panic!(
            "cidlb reported ready without interface nosuch0 (ready file {})",
            a.ready_file.display()
        ),
        Err(e) => e,
    };
    assert!(
        err.contains("before it was ready") && err.contains("nosuch0"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert!(!pins.0.exists(), "a failed start left pins behind");
}
