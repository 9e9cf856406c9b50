//! Real traffic through the attached XDP program: a client, a balancer running `cidlb run`, and
//! two node namespaces with UDP echo servers. CID records must reach the node their CID names,
//! a non-CID flow must stay on one node, and every reply must come back from the VIP.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{netns::NetNs, packet::cid_record, packet::handshake_record};

const VIP4: &str = "192.0.2.10";
const VIP6: &str = "2001:db8:ffff::10";
const PORT: u16 = 5684;

struct Lab {
    client: NetNs,
    lb: NetNs,
    nodes: Vec<NetNs>,
}

/// client ─ lbc [balancer] lbn1 ─ node1
///                          lbn2 ─ node2
fn lab() -> Lab {
    let client = NetNs::new("nc");
    let lb = NetNs::new("nb");
    let nodes = vec![NetNs::new("n1"), NetNs::new("n2")];
    // Client side.
    lb.ip(&format!(
        "link add lbc type veth peer name c0 netns {}",
        client.name
    ));
    lb.ip("addr add 198.51.100.1/24 dev lbc");
    lb.ip("addr add 2001:db8:c::1/64 dev lbc nodad");
    lb.ip("link set lbc up");
    client.ip("addr add 198.51.100.7/24 dev c0");
    client.ip("addr add 2001:db8:c::7/64 dev c0 nodad");
    client.ip("link set c0 up");
    client.ip("route add default via 198.51.100.1");
    client.ip("-6 route add default via 2001:db8:c::1");
    quiet_veth(&client, "c0");
    // Node sides: node i on 203.0.113.(128*(i-1)) /25 and 2001:db8:i::/64.
    for (i, n) in nodes.iter().enumerate() {
        let k = i + 1;
        let dev = format!("lbn{k}");
        let base = 128 * i;
        lb.ip(&format!(
            "link add {dev} type veth peer name n0 netns {}",
            n.name
        ));
        lb.ip(&format!("addr add 203.0.113.{}/25 dev {dev}", base + 1));
        lb.ip(&format!("addr add 2001:db8:{k}::1/64 dev {dev} nodad"));
        lb.ip(&format!("link set {dev} up"));
        n.ip(&format!("addr add 203.0.113.{}/25 dev n0", base + 11));
        n.ip(&format!("addr add 2001:db8:{k}::11/64 dev n0 nodad"));
        n.ip("link set n0 up");
        // Replies go through the balancer (the seed's topology).
        n.ip(&format!("route add default via 203.0.113.{}", base + 1));
        n.ip(&format!("-6 route add default via 2001:db8:{k}::1"));
        quiet_veth(n, "n0");
    }
    lb.sysctl("net.ipv4.ip_forward=1");
    lb.sysctl("net.ipv6.conf.all.forwarding=1");
    Lab { client, lb, nodes }
}

/// veth peers of XDP interfaces: full checksums on send (no offload that leaves a partial
/// checksum for the XDP program to see), GRO on receive (native-mode XDP_REDIRECT into a veth
/// needs its peer to have NAPI, which GRO enables).
fn quiet_veth(ns: &NetNs, dev: &str) {
    ns.must(&["ethtool", "-K", dev, "tx", "off", "tso", "off", "gro", "on"]);
}

struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    pin_dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        cidlb::datapath::unpin_maps(&self.pin_dir);
    }
}

fn start_agent(lb: &NetNs, dir: &std::path::Path) -> Agent {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/cidlb-test-{}", std::process::id()));
    assert!(
        cidlb::datapath::is_bpffs(std::path::Path::new("/sys/fs/bpf")),
        "/sys/fs/bpf is not mounted (cargo xtask test mounts it)"
    );
    let cfg = dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces: [lbc, lbn1, lbn2]\nxdp_mode: native\nvips:\n  - address: {VIP4}\n    ports: [{PORT}]\n  - address: \"{VIP6}\"\n    ports: [{PORT}]\n\
             nodes:\n  - {{id: 1, address: [203.0.113.11, \"2001:db8:1::11\"]}}\n  - {{id: 2, address: [203.0.113.139, \"2001:db8:2::11\"]}}\n\
             flows: {{capacity: 4096}}\npin_dir: {}\n",
            pin_dir.display()
        ),
    )
    .unwrap();
    // nsenter (not `ip netns exec`) keeps the host's /sys, so /sys/fs/bpf is there to pin in.
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lb.name))
        .arg(env!("CARGO_BIN_EXE_cidlb"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cidlb");
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[cidlb] {line}");
            let _ = tx.send(line);
        }
    });
    let agent = Agent {
        child,
        lines: rx,
        pin_dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.lines.recv_timeout(left) {
            Ok(l) if l.contains("cidlb running") => break,
            Ok(_) => {}
            Err(_) => panic!("cidlb did not report running within 20 s"),
        }
    }
    // veth needs a moment after XDP attach before it forwards.
    thread::sleep(Duration::from_millis(1500));
    let _ = &lb;
    agent
}

/// UDP echo servers on each node: answer `node=<id> ` + payload, until `stop`.
fn start_echo(nodes: &[NetNs], stop: &Arc<AtomicBool>) -> Vec<thread::JoinHandle<u64>> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let path = format!("/run/netns/{}", n.name);
            let stop = stop.clone();
            thread::spawn(move || {
                enter(&path);
                let s = UdpSocket::bind(("::", PORT)).expect("bind echo");
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 2048];
                let mut served = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = s.recv_from(&mut buf) {
                        let mut out = format!("node={} ", i + 1).into_bytes();
                        out.extend_from_slice(&buf[..len]);
                        let _ = s.send_to(&out, from);
                        served += 1;
                    }
                }
                served
            })
        })
        .collect()
}

fn enter(path: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: valid fd; affects only this thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

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
    common::require_root();
    let lab = lab();
    let tmp = std::env::temp_dir().join(format!("cidlb-netns-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = start_echo(&lab.nodes, &stop);
    let agent = start_agent(&lab.lb, &tmp);

    let client_path = format!("/run/netns/{}", lab.client.name);
    let results = thread::spawn(move || {
        enter(&client_path);
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
    let out = Command::new(env!("CARGO_BIN_EXE_cidlb"))
        .args(["stats", "--json", "--pin-dir"])
        .arg(&agent.pin_dir)
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cidlb stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counter = |name: &str| -> u64 {
        let key = format!("\"{name}\":");
        let at = json
            .find(&key)
            .unwrap_or_else(|| panic!("{name} missing in {json}"))
            + key.len();
        json[at..]
            .split([',', '}'])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // 2 families x 2 nodes x 10 rebinds x 5 records, each at least once.
    assert!(counter("cid_routed") >= 200, "cid_routed: {json}");
    assert!(
        counter("reply_unnat") >= 200 + 2 * 27,
        "reply_unnat: {json}"
    );
    assert!(counter("fwd_redirect") > 0, "fwd_redirect: {json}");

    // SIGTERM: the agent detaches, unpins and exits 0.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let mut agent = agent;
    let status = agent.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let served: u64 = echo.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(served >= 200, "nodes served {served}");
    assert!(status.success(), "cidlb exited with {status}");
    assert!(
        !agent.pin_dir.exists(),
        "pins left behind in {}",
        agent.pin_dir.display()
    );
    let links = lab.lb.must(&["ip", "link", "show"]);
    assert!(
        !links.contains("xdp"),
        "XDP still attached after SIGTERM:\n{links}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
