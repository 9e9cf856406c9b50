//! Path MTU in NAT mode (issue #21), in the routed lab with a 1,280-byte link between the
//! router and the client: a node's reply larger than that is dropped by the router, whose
//! fragmentation-needed (IPv4) or packet-too-big (IPv6) error goes to the VIP, the reply's
//! source. The balancer sends it on to the node that answered that client flow (docs/datapath.md
//! "ICMP errors and path MTU"), whose kernel then knows the path MTU towards the client: `ip route
//! get` in the node's namespace shows it. The node's next replies leave it fragmented; the
//! balancer un-NATs the fragments, and the client gets the whole reply. For a CID session and
//! a non-CID flow, over IPv4 and IPv6. An error no node can be matched to goes to every node
//! of the VIP, from the agent.

mod common;

use std::{
    net::{IpAddr, UdpSocket},
    thread,
    time::Duration,
};

use common::{
    agent::{cidlb, json_counter, AgentProc, PinGuard},
    pmtu::{await_pmtu, forget_pmtu, node_pmtu, send_too_big},
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

/// `cidlb run` in `r`'s balancer with both VIPs in NAT mode, pins and files tagged `tag`:
/// the agent, its pins, and the directory of its config.
fn nat_agent(r: &Routed, tag: &str) -> (AgentProc, PinGuard, std::path::PathBuf) {
    let pins = PinGuard::new(tag);
    let dir = std::env::temp_dir().join(format!("cidlb-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        r.cidlb_config(&pins.0.display().to_string(), "nat", ""),
    )
    .unwrap();
    let agent = AgentProc::start(&r.lab, &cfg, &["--detach-on-exit"]);
    thread::sleep(Duration::from_millis(1200));
    (agent, pins, dir)
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
    let (agent, pins, dir) = nat_agent(&r, "pm");
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
            forget_pmtu(&r);
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
            let learned = node_pmtu(&r.lab.nodes[0], lb_lab::ip(&client));
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

/// An error the datapath cannot match to a node: about a reply to a client port no reply went
/// to (as for a reply too short to be recorded, or a flow whose entry is gone). The datapath
/// passes it to the kernel (`pass_icmp_no_node`); the agent sees it on the way and sends a copy
/// to every node of the VIP, rewritten to each node's address (docs/datapath.md "ICMP errors and path
/// MTU"), so both nodes' kernels learn the path MTU. The kernel routes the passed error back
/// to the router (the VIP is not the balancer's address), which returns it until its TTL runs
/// out: the agent sends it on once. A blackhole route for each VIP on the balancer ends the
/// loop: each error then passes once.
#[test]
fn an_error_no_node_can_be_matched_to_reaches_every_node_of_the_vip() {
    common::require_root();
    let r = Routed::up(&lb_lab::unique_prefix("pf"), 2).unwrap_or_else(|e| panic!("{e}"));
    let _echo: Vec<Echo> = (1..=2)
        .map(|k| Echo::start(&r.lab.nodes[k - 1].name, k, PORT))
        .collect();
    let (agent, pins, dir) = nat_agent(&r, "pf");
    let stats = || cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    // One error a family, about a reply to `client_port`; each node must learn the path MTU.
    // Returns how the counters grew.
    let one_round = |client_port: u16| {
        let before = stats();
        let mut failures = Vec::new();
        for (vip, client) in [
            (IpAddr::V4(VIP4), IpAddr::V4(CLIENT4)),
            (IpAddr::V6(VIP6), IpAddr::V6(CLIENT6)),
        ] {
            forget_pmtu(&r);
            send_too_big(&r, vip, PORT, client, client_port, MTU as u16);
            let learned = await_pmtu(&r, client, MTU);
            if learned.iter().any(|m| *m != Some(MTU)) {
                failures.push(format!(
                    "{vip}: the nodes' path MTUs towards {client} are {learned:?}, want {MTU} \
                     on each"
                ));
            }
        }
        let after = stats();
        assert!(failures.is_empty(), "{}\n{after}", failures.join("\n"));
        let grew = |c: &str| json_counter(&after, c) - json_counter(&before, c);
        let counts = (grew("pass_icmp_no_node"), grew("icmp_fanout"));
        assert_eq!(grew("icmp_to_node"), 0, "{after}");
        assert_eq!(counts.1, 2, "one error a family, sent on once\n{after}");
        counts
    };
    // The VIPs are not the balancer's addresses: its kernel routes each passed error back to
    // the router, which returns it until its TTL runs out.
    let (passes, _) = one_round(40_000);
    assert!(passes > 2, "no loop to see: {passes} passes");
    // With a blackhole route for each VIP (docs/datapath.md), the kernel drops it instead.
    let b = &r.lab.balancer;
    b.ip(&format!("route add blackhole {VIP4}/32"))
        .and_then(|()| b.ip(&format!("-6 route add blackhole {VIP6}/128")))
        .unwrap_or_else(|e| panic!("{e}"));
    let (passes_held, _) = one_round(40_001);
    assert_eq!(
        passes_held, 2,
        "with the blackhole routes, each error passes once"
    );
    eprintln!("passes of two errors: {passes} looping, {passes_held} with blackhole routes");
    assert!(agent.terminate().expect("cidlb exits").success());
    let _ = std::fs::remove_dir_all(&dir);
}
