//! `cargo xtask demo`: cidlb on the built-in netns lab with real DTLS 1.2 CID clients and
//! servers, live counters while it runs, a summary at the end, nothing left behind.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_lab::{ChildGuard, Lab, NetNs, PORT, VIP4, VIP6};
use serde_json::Value;

use crate::{root, setup, sh};

const PREFIX: &str = "cidlb-demo-";
const NODES: usize = 3;
const PIN_DIR: &str = "/sys/fs/bpf/cidlb-demo";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

/// One client run in the background: which traffic, and where its JSON goes.
struct Client {
    label: &'static str,
    child: ChildGuard,
    out: PathBuf,
}

pub fn run() -> Result<()> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    step("setup: nightly rust-src, bpf-linker, iproute2/ethtool/bpftool/iptables, bpffs");
    setup::run()?;
    step("building cidlb and the DTLS test peer (release)");
    sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "-p",
            "lb-testpeer",
        ]),
    )?;
    let out_dir = root().join("target/demo");
    std::fs::create_dir_all(&out_dir)?;

    step(&format!(
        "lab: client, balancer and {NODES} node namespaces ({PREFIX}*)"
    ));
    Lab::down(PREFIX);
    if Path::new(PIN_DIR).exists() {
        let _ = Command::new(bin("cidlb"))
            .args(["detach", "--pin-dir", PIN_DIR])
            .output();
    }
    let lab = Lab::up(PREFIX, NODES).map_err(|e| anyhow!("building the lab: {e}"))?;
    let result = demo(&lab, &out_dir);
    // Whatever happened: stop everything (ChildGuards), remove the namespaces (Lab drop).
    drop(lab);
    let _ = Command::new(bin("cidlb"))
        .args(["detach", "--pin-dir", PIN_DIR])
        .output();
    println!("\nlab removed; nothing left behind.");
    result
}

fn demo(lab: &Lab, out_dir: &Path) -> Result<()> {
    let peer = bin("cidlb-testpeer");
    let mut servers = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let id = i + 1;
        let log = std::fs::File::create(out_dir.join(format!("node{id}.log")))?;
        let child = n
            .command(peer.to_str().expect("utf-8 path"))
            .args([
                "server",
                "--listen",
                &format!("[::]:{PORT}"),
                "--node-id",
                &id.to_string(),
            ])
            .stderr(log)
            .spawn()
            .context("starting a DTLS server")?;
        servers.push(ChildGuard(child));
        println!(
            "    node {id}: DTLS 1.2 server (Mbed TLS), CIDs start with {id:02x}, at {} / {}",
            lb_lab::node4(id),
            lb_lab::node6(id)
        );
    }

    let cfg = out_dir.join("cidlb.yaml");
    std::fs::write(&cfg, lab.cidlb_config(PIN_DIR, ""))?;
    step(&format!(
        "cidlb run --config {} (XDP on {})",
        cfg.display(),
        lab.interfaces().join(", ")
    ));
    let mut agent = lab
        .balancer
        .nsenter(bin("cidlb").to_str().expect("utf-8 path"))
        .args(["run", "--detach-on-exit", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cidlb")?;
    let err = agent.stderr.take().expect("piped");
    let agent = ChildGuard(agent);
    let log_path = out_dir.join("cidlb.log");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(log_path).ok();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("cidlb running") => break,
            Ok(l) if l.contains("attached XDP program") => {
                println!("    {}", l.split("INFO ").last().unwrap_or(&l))
            }
            Ok(l) if l.contains("ERROR") => bail!("cidlb failed to start: {l}"),
            _ if Instant::now() > deadline => {
                bail!("cidlb did not start within 30 s; see target/demo/cidlb.log")
            }
            _ if INTERRUPTED.load(Ordering::SeqCst) => bail!("interrupted"),
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(1000));

    step("clients: DTLS handshakes, then records while hopping source ports (a NAT rebinding every 4 records)");
    let v4 = format!("{VIP4}:{PORT}");
    let v6 = format!("[{VIP6}]:{PORT}");
    // 40 records 250 ms apart per session: about ten seconds to watch.
    let runs: [(&'static str, &str, &str); 3] = [
        (
            "IPv4 CID",
            &v4,
            "--sessions 24 --messages 40 --rebind-every 4 --interval-ms 250 --parallel 24",
        ),
        (
            "IPv6 CID",
            &v6,
            "--sessions 24 --messages 40 --rebind-every 4 --interval-ms 250 --parallel 24",
        ),
        (
            "IPv4 no CID",
            &v4,
            "--sessions 8 --messages 40 --no-cid --interval-ms 250 --parallel 8",
        ),
    ];
    let mut clients = Vec::new();
    for (label, vip, args) in runs {
        let out = out_dir.join(format!("{}.jsonl", label.replace(' ', "-")));
        let child = lab
            .client
            .command(peer.to_str().expect("utf-8 path"))
            .args(["client", "--server", vip, "--json"])
            .args(args.split(' '))
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()?;
        println!("    {label}: {args} to {vip}");
        clients.push(Client {
            label,
            child: ChildGuard(child),
            out,
        });
    }
    forge_unknown_node(&lab.client)?;
    println!(
        "    5 forged CID records naming node 9 (not configured): expect drop_cid_unknown_node = 5"
    );

    step("live counters (cidlb stats, from the pinned maps)");
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut prev: Option<(Value, Instant)> = None;
    let mut drawn = 0;
    let mut printed: Option<Instant> = None;
    loop {
        let done = clients
            .iter_mut()
            .filter_map(|c| c.child.0.try_wait().ok().flatten())
            .count();
        let stats = stats()?;
        let block = live_block(
            &stats,
            prev.as_ref(),
            started.elapsed(),
            done,
            clients.len(),
        );
        if tty {
            // Redraw in place.
            if drawn > 0 {
                print!("\x1b[{drawn}A\x1b[J");
            }
            print!("{block}");
            drawn = block.lines().count();
        } else if printed.is_none_or(|t| t.elapsed() >= Duration::from_secs(3))
            || done == clients.len()
        {
            print!("{block}");
            printed = Some(Instant::now());
        }
        std::io::stdout().flush()?;
        if prev
            .as_ref()
            .is_none_or(|(_, t)| t.elapsed() >= Duration::from_secs(1))
        {
            prev = Some((stats, Instant::now()));
        }
        if done == clients.len() {
            break;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("clients still running after 180 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    let stats = stats()?;
    summary(&clients, &stats)?;
    drop(agent);
    drop(servers);
    Ok(())
}

/// Five tls12_cid records for node 9 from the client, sent with bash's /dev/udp.
fn forge_unknown_node(client: &NetNs) -> Result<()> {
    let record =
        r"\x19\xfe\xfd\x00\x01\x00\x00\x00\x00\x00\x01\x09\xaa\xbb\xcc\xdd\xee\x00\x04forg";
    let script = format!("for i in 1 2 3 4 5; do printf '{record}' > /dev/udp/{VIP4}/{PORT}; done");
    client
        .must(&["bash", "-c", &script])
        .map_err(|e| anyhow!(e))?;
    Ok(())
}

fn stats() -> Result<Value> {
    let out = Command::new(bin("cidlb"))
        .args(["stats", "--json", "--pin-dir", PIN_DIR])
        .output()?;
    if !out.status.success() {
        bail!("cidlb stats: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

fn live_block(
    s: &Value,
    prev: Option<&(Value, Instant)>,
    elapsed: Duration,
    done: usize,
    total: usize,
) -> String {
    let rate = |name: &str| -> String {
        prev.map(|(p, t)| {
            let secs = t.elapsed().as_secs_f64().max(0.1);
            format!(
                " ({:.0}/s)",
                counter(s, name).saturating_sub(counter(p, name)) as f64 / secs
            )
        })
        .unwrap_or_default()
    };
    let spin = ["|", "/", "-", "\\"][(elapsed.as_millis() / 500) as usize % 4];
    let mut b = format!(
        "  {spin} {:>5.1}s  clients finished {done}/{total}\n",
        elapsed.as_secs_f64()
    );
    for name in [
        "cid_routed",
        "flow_new",
        "flow_hit",
        "reply_unnat",
        "fwd_redirect",
        "fwd_kernel_no_neigh",
    ] {
        b.push_str(&format!(
            "    {name:<22} {:>8}{}\n",
            counter(s, name),
            rate(name)
        ));
    }
    let drops: Vec<String> = s["counters"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| k.starts_with("drop_") && v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        })
        .unwrap_or_default();
    b.push_str(&format!(
        "    drops: {}\n",
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops.join(" ")
        }
    ));
    let nodes: Vec<String> = s["nodes"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(id, n)| {
                    format!(
                        "node {id}: {} in / {} out",
                        n["to_node_packets"], n["from_node_packets"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    b.push_str(&format!("    {}\n", nodes.join("   ")));
    b
}

fn summary(clients: &[Client], stats: &Value) -> Result<()> {
    step("summary");
    let mut all_ok = true;
    let mut total_sessions = 0;
    let mut total_rebinds = 0;
    let mut handshakes: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        let text = std::fs::read_to_string(&c.out)?;
        let summary = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v.get("summary").cloned())
            .ok_or_else(|| {
                anyhow!(
                    "{}: no summary from the client (see {})",
                    c.label,
                    c.out.display()
                )
            })?;
        let (sessions, ok, rebinds) = (
            summary["sessions"].as_u64().unwrap_or(0),
            summary["ok"].as_u64().unwrap_or(0),
            summary["rebinds"].as_u64().unwrap_or(0),
        );
        all_ok &= sessions == ok && summary["messages_failed"].as_u64() == Some(0);
        total_sessions += sessions;
        total_rebinds += rebinds;
        if let Some(per) = summary["per_node"].as_object() {
            for (k, v) in per {
                *handshakes.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        println!(
            "  {:<12} sessions {ok}/{sessions} ok, records {}/{} echoed, source-port rebinds survived {rebinds}",
            c.label,
            summary["messages_ok"],
            summary["messages_ok"].as_u64().unwrap_or(0) + summary["messages_failed"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "  sessions per node (round-robin handshakes): {}",
        handshakes
            .iter()
            .map(|(k, v)| format!("node {k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(o) = stats["nodes"].as_object() {
        for (id, n) in o {
            println!(
                "  node {id}: {} packets in, {} replies out (balancer counters)",
                n["to_node_packets"], n["from_node_packets"]
            );
        }
    }
    let c = &stats["counters"];
    println!(
        "  balancer: {} CID records routed by CID, {} new flows, {} flow hits, {} replies un-NATed",
        c["cid_routed"], c["flow_new"], c["flow_hit"], c["reply_unnat"]
    );
    let drops: Vec<String> = c
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| k.starts_with("drop_") && v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "  drops by reason: {}",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(", ")
        }
    );
    println!("  {total_sessions} sessions, {total_rebinds} rebinds, every echo back from the node named in the session's CID: {}", if all_ok { "yes" } else { "NO" });
    if !all_ok {
        bail!("some sessions failed; see target/demo/*.jsonl and target/demo/cidlb.log");
    }
    Ok(())
}
