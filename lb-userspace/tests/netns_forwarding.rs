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

use common::packet::{cid_record, handshake_record};
use lb_lab::{Lab, NetNs, VIP4, VIP6};

const PORT: u16 = lb_lab::PORT;

struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    pin_dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        cidlb::datapath::detach(&self.pin_dir);
    }
}

fn start_agent(lab: &Lab, dir: &std::path::Path) -> Agent {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/cidlb-test-{}", std::process::id()));
    assert!(
        cidlb::datapath::is_bpffs(std::path::Path::new("/sys/fs/bpf")),
        "/sys/fs/bpf is not mounted (cargo xtask test mounts it)"
    );
    let cfg = dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        lab.cidlb_config(&pin_dir.display().to_string(), "flows: {capacity: 4096}\n"),
    )
    .unwrap();
    // nsenter (not `ip netns exec`) keeps the host's /sys, so /sys/fs/bpf is there to pin in.
    let mut child = lab
        .balancer
        .nsenter(env!("CARGO_BIN_EXE_cidlb"))
        .args(["run", "--detach-on-exit", "--config"])
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
    agent
}

/// UDP echo servers on each node: answer `node=<id> ` + payload, until `stop`.
fn start_echo(nodes: &[NetNs], stop: &Arc<AtomicBool>) -> Vec<thread::JoinHandle<u64>> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let name = n.name.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                lb_lab::enter(&name);
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
    let lab = Lab::up(&lb_lab::unique_prefix("nf"), 2).unwrap_or_else(|e| panic!("{e}"));
    let tmp = std::env::temp_dir().join(format!("cidlb-netns-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = start_echo(&lab.nodes, &stop);
    let agent = start_agent(&lab, &tmp);

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

    // SIGTERM with --detach-on-exit: the agent detaches, unpins and exits 0.
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
    let links = lab.balancer.must(&["ip", "link", "show"]).unwrap();
    assert!(
        !links.contains("xdp"),
        "XDP still attached after SIGTERM:\n{links}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
