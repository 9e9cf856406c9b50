//! Path MTU in NAT mode (issue #21), in the routed lab with a 1,280-byte link between the
//! router and the client: a node's reply larger than that is dropped by the router, whose
//! fragmentation-needed (IPv4) or packet-too-big (IPv6) error goes to the VIP, the reply's
//! source. The balancer sends it on to the node that answered that client flow (docs/datapath.md
//! "ICMP errors and path MTU"), whose kernel then knows the path MTU towards the client: `ip route
//! get` in the node's namespace shows it. The node's next replies leave it fragmented; the
//! balancer un-NATs the fragments, and the client gets the whole reply. For a CID session and
//! a non-CID flow, over IPv4 and IPv6.

mod common;

use std::{net::UdpSocket, thread, time::Duration};

use common::{
    agent::{cidlb, json_counter, AgentProc, PinGuard},
    traffic::Echo,
};
use lb_lab::{
    packet::{cid_record, handshake_record},
    routed::Routed,
    CLIENT4, CLIENT6, PORT, VIP4, VIP6,
};

/// The client link's MTU (IPv6's minimum), and the reply size that does not fit it.
const MTU: u32 = 1280;
const REPLY: usize = 1400;

/// The path MTU node 1's kernel has for `client` (`ip route get`'s `mtu`), if it has one.
fn node_pmtu(r: &Routed, client: &str) -> Option<u32> {
    let fam = if client.contains(':') { "-6" } else { "-4" };
    let out = r.lab.nodes[0]
        .must(&["ip", fam, "route", "get", client])
        .unwrap_or_else(|e| panic!("{e}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

#[test]
fn a_routers_too_big_error_reaches_the_node_that_sent_the_reply() {
    common::require_root();
    let r = Routed::up(&lb_lab::unique_prefix("pm"), 1).unwrap_or_else(|e| panic!("{e}"));
    r.router
        .ip(&format!("link set rc mtu {MTU}"))
        .unwrap_or_else(|e| panic!("{e}"));
    r.lab
        .client
        .ip(&format!("link set c0 mtu {MTU}"))
        .unwrap_or_else(|e| panic!("{e}"));
    // The error comes from the router, and the balancer sends it to the node through the
    // same router, which would drop a packet from its own address as a martian (IPv4 only;
    // docs/datapath.md "ICMP errors and path MTU").
    r.router
        .sysctl("net.ipv4.conf.rbn.accept_local=1")
        .unwrap_or_else(|e| panic!("{e}"));
    let _echo = Echo::start(&r.lab.nodes[0].name, 1, PORT);
    let pins = PinGuard::new("pm");
    let dir = std::env::temp_dir().join(format!("cidlb-pm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        r.cidlb_config(&pins.0.display().to_string(), "nat", ""),
    )
    .unwrap();
    let agent = AgentProc::start(&r.lab, &cfg, &["--detach-on-exit"]);
    thread::sleep(Duration::from_millis(1200));
    r.resolve_balancer_next_hops()
        .unwrap_or_else(|e| panic!("{e}"));
    let stats = || cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);

    let mut failures = Vec::new();
    for (vip, client, bind) in [
        (VIP4.to_string(), CLIENT4.to_string(), "0.0.0.0:0"),
        (format!("[{VIP6}]"), CLIENT6.to_string(), "[::]:0"),
    ] {
        let pad = format!("pad={REPLY}");
        for (what, payload) in [
            (
                "CID session",
                cid_record(&[1, 0xc1, 0xd0, 0, 0, 0], pad.as_bytes()),
            ),
            ("non-CID flow", handshake_record(pad.as_bytes())),
        ] {
            // A fresh start: the node forgets what it learned about the client.
            r.lab.nodes[0]
                .must(&["ip", "route", "flush", "cache"])
                .and_then(|_| r.lab.nodes[0].must(&["ip", "-6", "route", "flush", "cache"]))
                .unwrap_or_else(|e| panic!("{e}"));
            let before = json_counter(&stats(), "icmp_to_node");
            let (client_ns, to) = (r.lab.client.name.clone(), format!("{vip}:{PORT}"));
            // The request is small; its reply is REPLY bytes. The first reply is lost at the
            // router; once the node knows the path MTU it fragments the next ones, which the
            // balancer un-NATs and the client reassembles. Five tries, 300 ms each, from one
            // source port (one flow).
            let answered = thread::spawn(move || {
                lb_lab::enter(&client_ns);
                let s = UdpSocket::bind(bind).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                (0..5).any(|_| {
                    let _ = s.send_to(&payload, &to);
                    s.recv(&mut buf).is_ok_and(|n| n == REPLY)
                })
            })
            .join()
            .expect("client thread");
            let sent_on = json_counter(&stats(), "icmp_to_node") - before;
            let learned = node_pmtu(&r, &client);
            eprintln!(
                "{vip} {what}: reply answered {answered}, {sent_on} errors sent to the node, \
                 its path MTU to {client}: {learned:?}"
            );
            if sent_on == 0 {
                failures.push(format!("{vip} {what}: no ICMP error went to the node"));
            }
            if !answered {
                failures.push(format!(
                    "{vip} {what}: no {REPLY}-byte reply reached the client once the node knew"
                ));
            }
            if learned != Some(MTU) {
                failures.push(format!(
                    "{vip} {what}: node 1's path MTU towards {client} is {learned:?}, want {MTU}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(agent.terminate().expect("cidlb exits").success());
    let _ = std::fs::remove_dir_all(&dir);
}
