//! `cidlb node up|down|check` on a node namespace, end to end: the decapsulation program
//! attached to a veth, the VIPs on lo, the sysctls; tunnel packets as the balancer sends them
//! (IPIP over IPv4, GUE over IPv6), sent from the peer namespace, reach a UDP socket bound to
//! the VIP in the node's own stack; `check` counts them; `down` undoes it and `check` says so.

mod common;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use common::agent::PinGuard;
use lb_lab::{
    packet::{tunnel_frame, Encap, Frame},
    sniff, NetNs,
};

const NODE4: &str = "10.77.0.2";
const NODE6: &str = "fd77::2";
const VIP4: &str = "192.0.2.10";
const VIP6: &str = "2001:db8:ffff::10";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn node_up_decapsulates_into_the_stack_and_down_undoes_it() {
    common::require_root();
    let peer = NetNs::new("ndp");
    let node = NetNs::new("ndn");
    let pins = PinGuard::new("node");
    peer.ip(&format!(
        "link add p0 type veth peer name n0 netns {}",
        node.name
    ))
    .unwrap();
    peer.ip("addr add 10.77.0.1/24 dev p0").unwrap();
    peer.ip("addr add fd77::1/64 dev p0").unwrap();
    peer.ip("link set p0 up").unwrap();
    node.ip(&format!("addr add {NODE4}/24 dev n0")).unwrap();
    node.ip(&format!("addr add {NODE6}/64 dev n0")).unwrap();
    node.ip("link set n0 up").unwrap();
    // The clients' packets come out of the tunnel; the node routes back to them by default.
    node.ip("route add default via 10.77.0.1").unwrap();
    node.ip("-6 route add default via fd77::1").unwrap();
    let cfg = std::env::temp_dir().join(format!("cidlb-node-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "interface: n0\ntunnel_addresses: [{NODE4}, \"{NODE6}\"]\n\
             vips: [{VIP4}, \"{VIP6}\"]\ngue_port: 6080\npin_dir: {}\n",
            pins.0.display()
        ),
    )
    .unwrap();
    let node_cmd = |action: &str| {
        node.nsenter(common::agent::bin().to_str().unwrap())
            .args(["node", action, "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // Before `up`: check names what is missing, and fails.
    let o = node_cmd("check");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no decapsulation on n0"), "{}", text(&o));

    let o = node_cmd("up");
    assert!(o.status.success(), "{}", text(&o));
    let o = node_cmd("check");
    assert!(o.status.success(), "{}", text(&o));
    // Again: replaced in place, still fine.
    let o = node_cmd("up");
    assert!(o.status.success(), "second up: {}", text(&o));

    // The DTLS server's sockets, bound to the VIPs on lo.
    let (tx, rx) = std::sync::mpsc::channel();
    let name = node.name.clone();
    let server = std::thread::spawn(move || {
        lb_lab::enter(&name);
        let socks: Vec<UdpSocket> = [VIP4, VIP6]
            .iter()
            .map(|v| {
                let s = UdpSocket::bind(SocketAddr::new(ip(v), 5684)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s
            })
            .collect();
        tx.send(()).unwrap();
        socks
            .iter()
            .map(|s| {
                let mut buf = [0u8; 64];
                s.recv_from(&mut buf)
                    .map(|(n, from)| (buf[..n].to_vec(), from))
                    .ok()
            })
            .collect::<Vec<_>>()
    });
    rx.recv().unwrap();

    let peer_mac = peer.mac("p0").unwrap();
    let node_mac = node.mac("n0").unwrap();
    let client = |src: &str, vip: &str, payload: &[u8]| {
        Frame::udp([0; 6], [0; 6], ip(src), 40000, ip(vip), 5684, payload)
    };
    let frames = vec![
        tunnel_frame(
            peer_mac,
            node_mac,
            ip("10.99.0.1"),
            ip(NODE4),
            0,
            Encap::Ipip,
            &client("198.51.100.7", VIP4, b"through ipip"),
        ),
        tunnel_frame(
            peer_mac,
            node_mac,
            ip("fd99::1"),
            ip(NODE6),
            0x1234,
            Encap::Gue {
                sport: 0xc001,
                dport: 6080,
            },
            &client("2001:db8:c::7", VIP6, b"through gue"),
        ),
    ];
    sniff::send(&peer, "p0", &frames);
    let got = server.join().unwrap();
    assert_eq!(
        got[0].as_ref().map(|(d, f)| (d.as_slice(), f.to_string())),
        Some((&b"through ipip"[..], "198.51.100.7:40000".to_owned())),
        "IPIP: the client's datagram reaches the VIP's socket"
    );
    assert_eq!(
        got[1].as_ref().map(|(d, f)| (d.as_slice(), f.to_string())),
        Some((&b"through gue"[..], "[2001:db8:c::7]:40000".to_owned())),
        "GUE over IPv6: the client's datagram reaches the VIP's socket"
    );
    let o = node_cmd("check");
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("decap_ipip 1") && t.contains("decap_gue 1"),
        "{t}"
    );
    assert!(t.contains("drop_decap_malformed 0"), "{t}");

    let o = node_cmd("down");
    assert!(o.status.success(), "{}", text(&o));
    let o = node_cmd("check");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("no decapsulation on n0") && t.contains(&format!("{VIP4} is not on lo")),
        "{t}"
    );
    let _ = std::fs::remove_file(&cfg);
}
