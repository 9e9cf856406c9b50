//! Tunnel mode end to end, in the routed lab (`lb_lab::routed`): the nodes do not route
//! through the balancer. Real DTLS 1.2 (Mbed TLS) and DTLS 1.3 (wolfSSL) sessions, over IPv4
//! and IPv6, rebind their source ports; every record is answered by the node its CID names,
//! through the balancer's IPIP or GUE tunnels and each node's `cidlb node` decapsulation; and
//! no reply crosses the balancer: the router counts the VIP's packets it forwards to the
//! client and to the balancer (iptables FORWARD), and the balancer un-NATs nothing.

mod common;

use std::time::Duration;

use common::agent::{cidlb, json_counter, AgentProc, PinGuard};
use lb_lab::{
    peer::{self, ClientRun},
    routed::Routed,
    ChildGuard, NetNs, PORT, VIP4, VIP6,
};

/// Packets the router forwarded from a VIP out of `dev` (iptables and ip6tables FORWARD).
fn forwarded_from_vips(router: &NetNs, dev: &str) -> u64 {
    let mut total = 0;
    for (tool, vip) in [
        ("iptables", VIP4.to_string()),
        ("ip6tables", VIP6.to_string()),
    ] {
        let out = router
            .must(&[tool, "-L", "FORWARD", "-nvx"])
            .unwrap_or_else(|e| panic!("{e}"));
        for line in out.lines().skip(2) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // pkts bytes target prot opt in out source destination (ip6tables: no opt)
            if f.contains(&dev) && f.iter().any(|w| w.starts_with(vip.as_str())) {
                total += f[0].parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

fn count_vip_packets(router: &NetNs) {
    for dev in ["rb", "rc"] {
        router
            .must(&[
                "iptables",
                "-A",
                "FORWARD",
                "-s",
                &VIP4.to_string(),
                "-o",
                dev,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        router
            .must(&[
                "ip6tables",
                "-A",
                "FORWARD",
                "-s",
                &VIP6.to_string(),
                "-o",
                dev,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

fn sessions(encap: &str) {
    let r = Routed::up(&lb_lab::unique_prefix("tm"), 2).unwrap_or_else(|e| panic!("{e}"));
    let lab = &r.lab;
    let pins = PinGuard::new(&format!("tm{encap}"));
    let dir = std::env::temp_dir().join(format!("cidlb-tm-{encap}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Node side: decapsulation, the VIPs on lo, servers bound to the VIPs (a wildcard-bound
    // server would answer from the node's own address).
    let mut servers: Vec<ChildGuard> = Vec::new();
    let mut node_pins = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let k = i + 1;
        let np = PinGuard::new(&format!("tm{encap}n{k}"));
        let file = dir.join(format!("node{k}.yaml"));
        std::fs::write(&file, r.node_config(k, &np.0.display().to_string())).unwrap();
        let o = n
            .nsenter(common::agent::bin().to_str().unwrap())
            .args(["node", "up", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "cidlb node up on node {k}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        node_pins.push(np);
        for (vip, port, extra) in [
            (format!("{VIP4}:{PORT}"), PORT, &[][..]),
            (format!("[{VIP6}]:{PORT}"), PORT, &[][..]),
            (
                format!("{VIP4}:{}", PORT + 1),
                PORT + 1,
                &["--dtls", "1.3"][..],
            ),
            (
                format!("[{VIP6}]:{}", PORT + 1),
                PORT + 1,
                &["--dtls", "1.3"][..],
            ),
        ] {
            let _ = port;
            servers.push(
                peer::server_at(&common::testpeer(), n, k as u32, &vip, extra, None)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
    }
    count_vip_packets(&r.router);
    let cfg = dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        r.cidlb_config(&pins.0.display().to_string(), encap, ""),
    )
    .unwrap();
    let _agent = AgentProc::start(lab, &cfg, &["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1200));

    let mut records = 0;
    for (server, proto) in [
        (format!("{VIP4}:{PORT}"), &[][..]),
        (format!("[{VIP6}]:{PORT}"), &[][..]),
        (format!("{VIP4}:{}", PORT + 1), &["--dtls", "1.3"][..]),
        (format!("[{VIP6}]:{}", PORT + 1), &["--dtls", "1.3"][..]),
    ] {
        let args = [
            proto,
            &["--sessions", "4", "--messages", "12", "--rebind-every", "3"][..],
        ]
        .concat();
        let run: ClientRun = peer::client(&common::testpeer(), &lab.client, &server, &args)
            .unwrap_or_else(|e| panic!("{e}"));
        if !run.ok {
            let stats = cidlb(&["stats", "--pin-dir", pins.0.to_str().unwrap()]);
            let nodes: Vec<String> = lab
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let o = n
                        .nsenter(common::agent::bin().to_str().unwrap())
                        .args(["node", "check", "--config"])
                        .arg(dir.join(format!("node{}.yaml", i + 1)))
                        .output()
                        .unwrap();
                    format!(
                        "node {}: {}{}",
                        i + 1,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .collect();
            let router = r
                .router
                .must(&[
                    "sh",
                    "-c",
                    "ip -s link; nstat -az | grep -E '^Ip(6)?(In|Out|Forw)'",
                ])
                .unwrap_or_else(|e| e)
                + &lab
                    .balancer
                    .must(&["sh", "-c", "ethtool -S lbr; ethtool -S lbn"])
                    .unwrap_or_else(|e| e);
            panic!(
                "{encap} {server} {proto:?}: {:#}\nbalancer:\n{stats}\n{}\nrouter:\n{router}",
                run.summary,
                nodes.join("\n")
            );
        }
        assert_eq!(run.sessions.len(), 4, "{server}");
        for s in &run.sessions {
            assert_eq!(s["status"], "ok", "{s}");
            assert_eq!(s["failed"], 0, "{s}");
            assert!(s["rebinds"].as_u64().unwrap() >= 3, "{s}");
        }
        let bad = run.misrouted();
        assert!(bad.is_empty(), "{encap} {server}: {}", bad.join("\n"));
        records += 4 * 12;
    }

    let stats = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    let encapsulated = json_counter(&stats, &format!("tunnel_encap_{encap}"));
    assert!(encapsulated >= records, "{stats}");
    assert_eq!(json_counter(&stats, "reply_unnat"), 0, "{stats}");
    let to_client = forwarded_from_vips(&r.router, "rc");
    let to_balancer = forwarded_from_vips(&r.router, "rb");
    eprintln!(
        "{encap}: {encapsulated} packets tunnelled; the router forwarded {to_client} packets from \
         the VIPs to the client and {to_balancer} to the balancer"
    );
    assert!(
        to_client >= records,
        "replies reached the client: {to_client}"
    );
    assert_eq!(to_balancer, 0, "replies crossed the balancer");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dtls_sessions_through_ipip_tunnels_bypass_the_balancer_on_the_way_back() {
    sessions("ipip");
}

#[test]
fn dtls_sessions_through_gue_tunnels_bypass_the_balancer_on_the_way_back() {
    sessions("gue");
}
