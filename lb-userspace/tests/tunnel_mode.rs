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
    tunnel, ChildGuard, NetNs, PORT, VIP4,
};

/// The router's counts of the VIPs' packets it forwards: to the client, to the balancer.
const TO_CLIENT: &[&str] = &["-o", "rc"];
const TO_BALANCER: &[&str] = &["-o", "rb"];
/// Its link to the balancer's node side (where it sends replies from a node's own address).
const TO_BALANCER_NODE_SIDE: &[&str] = &["-o", "rbn"];

/// The routed lab with 2 nodes set up by `cidlb node up`, DTLS 1.2 and 1.3 servers bound to
/// the VIPs on every node, and cidlb running with both VIPs in tunnel mode (`encap`) and
/// `extra` config. Fields drop in order: agent, servers, pins, files, namespaces.
struct Bed {
    _agent: AgentProc,
    /// One-armed: the pass program on the router's end of the balancer's link.
    _router_xdp: Option<aya::Ebpf>,
    _servers: Vec<ChildGuard>,
    pins: PinGuard,
    _node_pins: Vec<PinGuard>,
    dir: std::path::PathBuf,
    r: Routed,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the balancer reaches the nodes: through its second link (`lbn`, tunnels leave by
/// XDP_REDIRECT) or through the link the clients' packets come in on (XDP_TX).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arms {
    Two,
    One,
}

impl Bed {
    fn up(encap: &str, extra: &str) -> Bed {
        Self::up_with(encap, extra, Arms::Two, |c| c)
    }

    /// As [`Bed::up`], with the balancer's `arms`, the agent's config passed through `edit`
    /// first.
    fn up_with(encap: &str, extra: &str, arms: Arms, edit: impl Fn(String) -> String) -> Bed {
        let r = Routed::up(&lb_lab::unique_prefix("tm"), 2).unwrap_or_else(|e| panic!("{e}"));
        let router_xdp = (arms == Arms::One).then(|| {
            r.one_armed().unwrap_or_else(|e| panic!("{e}"));
            common::xdp_pass(&r.router, "rb")
        });
        let pins = PinGuard::new(&format!("tm{encap}"));
        let dir = std::env::temp_dir().join(format!("cidlb-tm-{encap}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Node side: decapsulation, the VIPs on lo, servers bound to the VIPs (a
        // wildcard-bound server would answer from the node's own address).
        let mut servers: Vec<ChildGuard> = Vec::new();
        let mut node_pins = Vec::new();
        for (i, n) in r.lab.nodes.iter().enumerate() {
            let k = i + 1;
            let np = PinGuard::new(&format!("tm{encap}n{k}"));
            std::fs::write(
                dir.join(format!("node{k}.yaml")),
                r.node_config(k, &np.0.display().to_string()),
            )
            .unwrap();
            node_pins.push(np);
            let bed_dir = dir.clone();
            node_cmd(n, &bed_dir, k, "up");
            servers.extend(
                tunnel::servers(&common::testpeer(), n, k).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        tunnel::count_forwarded_from_vips(
            &r.router,
            &[TO_CLIENT, TO_BALANCER, TO_BALANCER_NODE_SIDE],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let cfg = dir.join("cidlb.yaml");
        std::fs::write(
            &cfg,
            edit(r.cidlb_config(
                &pins.0.display().to_string(),
                encap,
                &format!("dtls: {{versions: [\"1.2\", \"1.3\"]}}\n{extra}"),
            )),
        )
        .unwrap();
        let agent = AgentProc::start(&r.lab, &cfg, &["--detach-on-exit"]);
        std::thread::sleep(Duration::from_millis(1200));
        Bed {
            _agent: agent,
            _router_xdp: router_xdp,
            _servers: servers,
            pins,
            _node_pins: node_pins,
            dir,
            r,
        }
    }
}

/// `cidlb node ACTION` on node `k` of a bed whose files are in `dir`; panics if it fails.
fn node_cmd(n: &NetNs, dir: &std::path::Path, k: usize, action: &str) {
    common::agent::node_cmd(n, &dir.join(format!("node{k}.yaml")), action);
}

fn sessions(encap: &str) {
    sessions_with(encap, Arms::Two);
}

fn sessions_with(encap: &str, arms: Arms) {
    let bed = Bed::up_with(encap, "", arms, |c| c);
    let (r, lab, pins, dir) = (&bed.r, &bed.r.lab, &bed.pins, &bed.dir);
    let mut records = 0;
    for (fam, port, proto) in tunnel::SERVERS {
        let server = lb_lab::vip_socket(fam, port);
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
    // Every tunnel left the way the arms say.
    let (tx, redirect) = (
        json_counter(&stats, "fwd_tx"),
        json_counter(&stats, "fwd_redirect"),
    );
    match arms {
        Arms::Two => assert!(redirect >= encapsulated && tx == 0, "{stats}"),
        Arms::One => assert!(tx >= encapsulated && redirect == 0, "{stats}"),
    }
    assert_eq!(json_counter(&stats, "reply_unnat"), 0, "{stats}");
    let [to_client, to_balancer, to_node_side] =
        tunnel::forwarded_from_vips(&r.router).unwrap_or_else(|e| panic!("{e}"))[..]
    else {
        panic!("the router counts three rules");
    };
    let to_balancer = to_balancer + to_node_side;
    eprintln!(
        "{encap}: {encapsulated} packets tunnelled; the router forwarded {to_client} packets from \
         the VIPs to the client and {to_balancer} to the balancer"
    );
    assert!(
        to_client >= records,
        "replies reached the client: {to_client}"
    );
    assert_eq!(to_balancer, 0, "replies crossed the balancer");
}

#[test]
fn dtls_sessions_through_ipip_tunnels_bypass_the_balancer_on_the_way_back() {
    sessions("ipip");
}

#[test]
fn dtls_sessions_through_gue_tunnels_bypass_the_balancer_on_the_way_back() {
    sessions("gue");
}

/// A one-armed balancer: the tunnels go back out of the veth the clients' packets came in on,
/// grown by the encapsulation (XDP_TX).
#[test]
fn dtls_sessions_through_a_one_armed_balancer_leave_by_xdp_tx() {
    sessions_with("ipip", Arms::One);
}

/// Packets the balancer sent each node, by node id.
fn to_nodes(bed: &Bed) -> std::collections::BTreeMap<String, u64> {
    let stats = cidlb(&["stats", "--json", "--pin-dir", bed.pins.0.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["nodes"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n["to_node_packets"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs DTLS 1.2 sessions to the IPv4 VIP (no rebinding), all of which must succeed: the
/// nodes the balancer sent their packets to (its per-node counters, not the client's view:
/// a client retries a handshake that a dead node swallowed, and the retry lands elsewhere).
fn nodes_sent_to(bed: &Bed, sessions: usize) -> Vec<String> {
    let before = to_nodes(bed);
    let run = peer::client(
        &common::testpeer(),
        &bed.r.lab.client,
        &format!("{VIP4}:{PORT}"),
        &["--sessions", &sessions.to_string(), "--messages", "2"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(run.ok, "{:#}", run.summary);
    to_nodes(bed)
        .into_iter()
        .filter(|(k, v)| *v > before.get(k).copied().unwrap_or(0))
        .map(|(k, _)| k)
        .collect()
}

/// Health through the tunnel: a node whose DTLS server is up but whose decapsulation is gone
/// is down (a probe to its own address would still find the server), and takes no new flows
/// until its decapsulation is back.
#[test]
fn a_node_without_decapsulation_is_down_though_its_server_is_up() {
    let bed = Bed::up(
        "gue",
        "flows: {policy: round_robin}\nhealth: {probe: dtls, interval: 200ms, timeout: 150ms, fall: 2, rise: 2}\n",
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(nodes_sent_to(&bed, 6), ["1", "2"], "both nodes up at first");
    node_cmd(&bed.r.lab.nodes[0], &bed.dir, 1, "down");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        nodes_sent_to(&bed, 6),
        ["2"],
        "node 1 lost its decapsulation: no new flows for it"
    );
    node_cmd(&bed.r.lab.nodes[0], &bed.dir, 1, "up");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(nodes_sent_to(&bed, 6), ["1", "2"], "node 1 back");
}

/// Sends `payload` to `vip`:`PORT` from a UDP socket in the client's namespace with path MTU
/// discovery on (DF set, IPv4; no fragmentation by the client's kernel), again every 200 ms
/// until the socket's path MTU (IP_MTU / IPV6_MTU) drops below 1500, at most 3 s: that MTU.
fn learned_mtu(client: &NetNs, vip: std::net::IpAddr, payload: Vec<u8>) -> Option<u32> {
    let name = client.name.clone();
    std::thread::spawn(move || {
        lb_lab::enter(&name);
        let any: std::net::SocketAddr = if vip.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = std::net::UdpSocket::bind(any).unwrap();
        s.connect((vip, PORT)).unwrap();
        let (level, discover, mtu_opt) = if vip.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_MTU)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_MTU)
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: a valid socket and an int option of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                discover,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let mtu = || {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: as above, the kernel writes at most `len` bytes.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    level,
                    mtu_opt,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            (rc == 0).then_some(v as u32)
        };
        for _ in 0..15 {
            // EMSGSIZE once the MTU is learned: the datagram no longer fits.
            let _ = s.send(&payload);
            std::thread::sleep(Duration::from_millis(200));
            if let Some(m) = mtu().filter(|m| *m < 1500) {
                return Some(m);
            }
        }
        None
    })
    .join()
    .unwrap()
}

/// Path MTU in tunnel mode (docs/forwarding.md "Path MTU in tunnel mode"): the underlay between router and
/// nodes carries 1400 bytes, which the balancer's FIB cannot see (its own link to the router
/// is 1500), so `tunnel.mtu: 1400` says it. A record too big once encapsulated is answered
/// from the VIP with ICMP fragmentation needed (1380 = 1400 - 20 for IPIP over IPv4) or packet
/// too big (1360 over IPv6); the client's kernel learns that MTU for the VIP (the socket's
/// IP_MTU, `ip route get`), and real DTLS sessions whose records fit it are answered. So are
/// sessions whose records do not (1,400-byte messages): the client's kernel now fragments each
/// record to fit, and the balancer sends every fragment through the tunnel to the node its
/// first fragment's CID names (`frag_first`, `frag_followed`), whose kernel reassembles it;
/// the node's own 1,400-byte link fragments its echo. Without `tunnel.mtu` the balancer forwards the
/// record and the router drops it: the client learns nothing. The answer leaves `lbr` by
/// native XDP_TX, which reaches the router's end only with an XDP program there
/// ([`common::xdp_pass`]; without it `lbr` counts the XDP_TX and `rb` receives nothing).
#[test]
fn a_record_too_big_for_the_tunnel_teaches_the_client_its_path_mtu() {
    let bed = Bed::up_with("ipip", "", Arms::Two, |c| {
        c.replace("tunnel: {encap: ipip", "tunnel: {mtu: 1400, encap: ipip")
    });
    let (r, lab, pins) = (&bed.r, &bed.r.lab, &bed.pins);
    let _pass = common::xdp_pass(&r.router, "rb");
    for k in 1..=lab.nodes.len() {
        r.router.ip(&format!("link set rn{k} mtu 1400")).unwrap();
        lab.nodes[k - 1].ip("link set n0 mtu 1400").unwrap();
    }
    let record = lb_lab::packet::cid_record(&[1, 2, 3, 4, 5, 6], &[0x5a; 1420]);
    for (vip, want) in [(VIP4.into(), 1380), (lb_lab::VIP6.into(), 1360)] {
        let got = learned_mtu(&lab.client, vip, record.clone());
        let stats = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
        assert_eq!(got, Some(want), "the client's path MTU to {vip}\n{stats}");
        let route = lab
            .client
            .must(&["ip", "route", "get", &vip.to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(route.contains(&format!("mtu {want}")), "{route}");
    }
    let stats = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    assert!(json_counter(&stats, "icmp_too_big_sent") >= 2, "{stats}");
    // Two sessions of four records a family, each record `len` bytes of payload.
    let sessions_answered = |len: &str| {
        for server in [
            lb_lab::vip_socket("v4", PORT),
            lb_lab::vip_socket("v6", PORT),
        ] {
            let args = ["--sessions", "2", "--messages", "4", "--payload-len", len];
            let run = peer::client(&common::testpeer(), &lab.client, &server, &args)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(run.ok, "{server}, {len}-byte records: {:#}", run.summary);
            let bad = run.misrouted();
            assert!(bad.is_empty(), "{server}: {}", bad.join("\n"));
        }
    };
    sessions_answered("1200");
    let before = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    sessions_answered("1400");
    let after = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    let grew = |c: &str| json_counter(&after, c) - json_counter(&before, c);
    // Two families, two sessions, four full-size records each: every record in two fragments.
    assert!(grew("frag_first") >= 16, "{after}");
    assert!(grew("frag_followed") >= 16, "{after}");
    assert_eq!(grew("drop_frag_unknown"), 0, "{after}");
}

/// An ICMP error about a tunnel VIP's reply: the reply went from the node straight to the
/// client, so the balancer cannot know which node sent it. The datapath passes the error to
/// the kernel, and the agent sends it unchanged through the tunnel to every node of the VIP
/// (docs/datapath.md "ICMP errors and path MTU"): each node's kernel, which owns the VIP, learns the
/// client's path MTU. IPIP and GUE, IPv4 and IPv6.
#[test]
fn an_error_about_a_tunnel_vips_reply_reaches_every_node_through_its_tunnel() {
    use common::pmtu::{await_pmtu, forget_pmtu, send_too_big};
    use std::net::IpAddr;
    const MTU: u32 = 1280;
    for encap in ["ipip", "gue"] {
        let bed = Bed::up(encap, "");
        let stats = || cidlb(&["stats", "--json", "--pin-dir", bed.pins.0.to_str().unwrap()]);
        let before = stats();
        for (vip, client) in [
            (IpAddr::V4(VIP4), IpAddr::V4(lb_lab::CLIENT4)),
            (IpAddr::V6(lb_lab::VIP6), IpAddr::V6(lb_lab::CLIENT6)),
        ] {
            forget_pmtu(&bed.r);
            send_too_big(&bed.r, vip, PORT, client, 40_000, MTU as u16);
            let learned = await_pmtu(&bed.r, client, MTU);
            assert!(
                learned.iter().all(|m| *m == Some(MTU)),
                "{encap}, {vip}: the nodes' path MTUs towards {client} are {learned:?}\n{}",
                stats()
            );
        }
        let after = stats();
        let grew = |c: &str| json_counter(&after, c) - json_counter(&before, c);
        assert_eq!(grew("icmp_fanout"), 2, "{encap}: {after}");
    }
}

/// A NAT VIP and a tunnel VIP at once, on one balancer and the same nodes: real DTLS 1.2
/// sessions to both, rebinding; the NAT VIP's replies come back through the balancer (the
/// router sends replies from a node's own address to it) and are un-NATed, the tunnel VIP's go
/// straight to the client.
#[test]
fn a_nat_vip_and_a_tunnel_vip_on_one_balancer() {
    use lb_lab::routed::VIP4_TUNNEL;
    const TUNNEL_PORT: u16 = PORT + 2;
    common::require_root();
    let r = Routed::up(&lb_lab::unique_prefix("tn"), 2).unwrap_or_else(|e| panic!("{e}"));
    let pins = PinGuard::new("tnboth");
    let dir = std::env::temp_dir().join(format!("cidlb-tn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut servers: Vec<ChildGuard> = Vec::new();
    let mut node_pins = Vec::new();
    for (i, n) in r.lab.nodes.iter().enumerate() {
        let k = i + 1;
        // The NAT VIP's server on the node's own addresses, the tunnel VIP's bound to it.
        servers.push(
            peer::server(&common::testpeer(), n, k as u32, &[], None)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let np = PinGuard::new(&format!("tnboth{k}"));
        let file = dir.join(format!("node{k}.yaml"));
        std::fs::write(
            &file,
            r.node_config_vips(k, &[VIP4_TUNNEL.into()], &np.0.display().to_string()),
        )
        .unwrap();
        common::agent::node_cmd(n, &file, "up");
        node_pins.push(np);
        servers.push(
            peer::server_at(
                &common::testpeer(),
                n,
                k as u32,
                &format!("{VIP4_TUNNEL}:{TUNNEL_PORT}"),
                &[],
                None,
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let tunnel_src = format!("{VIP4_TUNNEL}/32");
    let node_src = "203.0.113.0/24";
    for src in [tunnel_src.as_str(), node_src] {
        r.count_forwarded(src).unwrap_or_else(|e| panic!("{e}"));
    }
    r.resolve_balancer_next_hops()
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg = dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        r.cidlb_config_vips(
            &[
                (VIP4.into(), &[PORT][..], "nat"),
                (VIP4_TUNNEL.into(), &[TUNNEL_PORT][..], "ipip"),
            ],
            &pins.0.display().to_string(),
            "",
        ),
    )
    .unwrap();
    let agent = AgentProc::start(&r.lab, &cfg, &["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1200));

    let args = ["--sessions", "4", "--messages", "10", "--rebind-every", "3"];
    for server in [
        format!("{VIP4}:{PORT}"),
        format!("{VIP4_TUNNEL}:{TUNNEL_PORT}"),
    ] {
        let run = peer::client(&common::testpeer(), &r.lab.client, &server, &args)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(run.ok, "{server}: {:#}", run.summary);
        let bad = run.misrouted();
        assert!(bad.is_empty(), "{server}: {}", bad.join("\n"));
    }
    let stats = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    let records = 4 * 10;
    assert!(json_counter(&stats, "reply_unnat") >= records, "{stats}");
    assert!(
        json_counter(&stats, "tunnel_encap_ipip") >= records,
        "{stats}"
    );
    let fwd = |src: &str, dev: &str| r.forwarded(src, dev).unwrap_or_else(|e| panic!("{e}"));
    // The tunnel VIP's replies: to the client only. The NAT VIP's: from the nodes' addresses
    // to the balancer's node side only (it un-NATs them).
    assert!(
        fwd(&tunnel_src, "rc") >= records,
        "tunnel replies to the client"
    );
    assert_eq!(
        fwd(&tunnel_src, "rb") + fwd(&tunnel_src, "rbn"),
        0,
        "tunnel replies crossed the balancer"
    );
    assert!(
        fwd(node_src, "rbn") >= records,
        "NAT replies to the balancer"
    );
    assert_eq!(
        fwd(node_src, "rc"),
        0,
        "NAT replies went around the balancer"
    );
    assert!(agent.terminate().expect("cidlb exits").success());
    drop(servers);
    for (i, n) in r.lab.nodes.iter().enumerate() {
        common::agent::node_cmd(n, &dir.join(format!("node{}.yaml", i + 1)), "down");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
