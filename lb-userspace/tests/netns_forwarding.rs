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
    VIP4, VIP6,
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
    std::fs::write(
        &cfg,
        lab.cidlb_config(&pins.0.display().to_string(), "flows: {capacity: 4096}\n"),
    )
    .unwrap();
    let agent = AgentProc::start(lab, &cfg, &["--detach-on-exit"]);
    // veth needs a moment after XDP attach before it forwards.
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
            // CID records: 10 "rebinds" (new source port each) per node, 5 records each.
            for node in [1u8, 2] {
                for rebind in 0..10 {
                    let s = UdpSocket::bind(bind).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    for m in 0..5u8 {
                        let rec =
                            cid_record(&[node, 0xc1, 0xd0, rebind, m, 0], b"application data");
                        report.push(("cid", vip, node as u32, ask(&s, vip, &rec)));
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
                    first,
                    ask(&s, vip, &handshake_record(b"ClientHello")),
                ));
            }
            // New flows spread over both nodes.
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                let s = UdpSocket::bind(bind).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                if let Some((id, _)) = ask(&s, vip, &handshake_record(b"hello")) {
                    seen.insert(id);
                }
            }
            report.push(("spread", vip, 2, Some((seen.len() as u32, vip))));
        }
        report
    })
    .join()
    .expect("client thread");

    let mut failures = Vec::new();
    for (kind, vip, want, got) in &results {
        match got {
            None => failures.push(format!("{kind} to {vip}: no reply")),
            Some((id, from)) => {
                if id != want {
                    failures.push(format!(
                        "{kind} to {vip}: answered by node {id}, want {want}"
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
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(served >= 200, "nodes served {served}");
    assert!(status.success(), "cidlb exited with {status}");
    assert!(!pins.0.exists(), "pins left behind in {}", pins.0.display());
    let links = lab.balancer.must(&["ip", "link", "show"]).unwrap();
    assert!(
        !links.contains("xdp"),
        "XDP still attached after SIGTERM:\n{links}"
    );
}
