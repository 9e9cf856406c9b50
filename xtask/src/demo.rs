//! `cargo xtask demo`: cidlb on the built-in netns lab with real DTLS 1.2 and DTLS 1.3 CID clients and
//! servers, live counters while it runs, a summary at the end, nothing left behind.
//!
//! The lab is the routed one (`lb_lab::routed`): client, balancer and nodes behind a router.
//! Two NAT VIPs (IPv4 and IPv6), whose replies the router sends back through the balancer to
//! be un-NATed, and beside them one tunnel VIP (IPIP), whose nodes are set up by `cidlb node
//! up` and answer the client straight through the router. The router counts the replies it
//! forwards each way, and the summary checks them.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_lab::{
    agent::{Agent, LogTo},
    peer::ClientRun,
    routed::{Routed, BALANCER_IFACE, BALANCER_NODE_IFACE, VIP4_TUNNEL},
    ChildGuard, Lab, NetNs,
};
use serde_json::Value;

use crate::{setup, sh, target_dir};

const PREFIX: &str = "cidlb-demo-";
const NODES: usize = 3;
const PIN_DIR: &str = "/sys/fs/bpf/cidlb-demo";
/// Node K's `cidlb node` pins: `{NODE_PIN_DIR}{K}`.
const NODE_PIN_DIR: &str = "/sys/fs/bpf/cidlb-demo-node";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// One client run in the background: which traffic, where its JSON goes, how it ended.
struct Client {
    label: &'static str,
    child: ChildGuard,
    out: PathBuf,
    status: Option<std::process::ExitStatus>,
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
    let out_dir = target_dir().join("demo");
    std::fs::create_dir_all(&out_dir)?;

    step(&format!(
        "lab: client, router, balancer and {NODES} node namespaces ({PREFIX}*)"
    ));
    Lab::down(PREFIX);
    remove_pins();
    let lab = Routed::up(PREFIX, NODES).map_err(|e| anyhow!("building the lab: {e}"))?;
    let result = demo(&lab, &out_dir);
    // Whatever happened: stop everything (ChildGuards), remove the namespaces (Routed drop),
    // then the pins (the nodes' XDP links went with their interfaces).
    drop(lab);
    remove_pins();
    println!("\nlab removed; nothing left behind.");
    result
}

/// Detaches the balancer's datapath and removes the nodes' pins (a run's, or one an
/// interrupted run left).
fn remove_pins() {
    if Path::new(PIN_DIR).exists() {
        let _ = Command::new(bin("cidlb"))
            .args(["detach", "--pin-dir", PIN_DIR])
            .output();
    }
    for k in 1..=NODES {
        let _ = std::fs::remove_dir_all(format!("{NODE_PIN_DIR}{k}"));
    }
}

/// The VIP and node port of the demo's DTLS 1.3 servers (the 1.2 ones use `lb_lab::PORT`).
const PORT13: u16 = lb_lab::PORT + 1;
/// The tunnel VIP's ports, DTLS 1.2 and 1.3: a node serving two VIPs of one family serves
/// them on different ports (`cidlb check` refuses shared ones).
const TUNNEL_PORT: u16 = lb_lab::PORT + 2;
const TUNNEL_PORT13: u16 = lb_lab::PORT + 3;

fn demo(r: &Routed, out_dir: &Path) -> Result<()> {
    let lab = &r.lab;
    let peer = bin("cidlb-testpeer");
    let mut servers = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let id = i + 1;
        let log = out_dir.join(format!("node{id}.log"));
        servers.push(
            lb_lab::peer::server(&peer, n, id as u32, &[], Some(&log))
                .map_err(|e| anyhow!("starting a DTLS server: {e}"))?,
        );
        println!(
            "    node {id}: DTLS 1.2 server (Mbed TLS), CIDs start with {id:02x}, at {} / {}",
            lb_lab::node4(id),
            lb_lab::node6(id)
        );
        let log = out_dir.join(format!("node{id}-dtls13.log"));
        servers.push(
            lb_lab::peer::server_on(&peer, n, id as u32, PORT13, &["--dtls", "1.3"], Some(&log))
                .map_err(|e| anyhow!("starting a DTLS 1.3 server: {e}"))?,
        );
        println!(
            "    node {id}: DTLS 1.3 server (wolfSSL) on port {PORT13}, CIDs start with {id:02x}"
        );
        // The tunnel VIP: decapsulation and the VIP on lo by `cidlb node up`, servers bound
        // to the VIP (so they answer from it).
        let node_cfg = out_dir.join(format!("node{id}.yaml"));
        std::fs::write(
            &node_cfg,
            r.node_config_vips(
                id,
                &[IpAddr::V4(VIP4_TUNNEL)],
                &format!("{NODE_PIN_DIR}{id}"),
            ),
        )?;
        let o = n
            .nsenter(bin("cidlb").to_str().unwrap_or("cidlb"))
            .args(["node", "up", "--config"])
            .arg(&node_cfg)
            .output()?;
        if !o.status.success() {
            bail!(
                "cidlb node up on node {id}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        println!("    node {id}: `cidlb node up` (IPIP decapsulation on n0, {VIP4_TUNNEL} on lo)");
        for (port, extra, what) in [
            (TUNNEL_PORT, &[][..], "1.2"),
            (TUNNEL_PORT13, &["--dtls", "1.3"][..], "1.3"),
        ] {
            let log = out_dir.join(format!("node{id}-tunnel-{port}.log"));
            servers.push(
                lb_lab::peer::server_at(
                    &peer,
                    n,
                    id as u32,
                    &format!("{VIP4_TUNNEL}:{port}"),
                    extra,
                    Some(&log),
                )
                .map_err(|e| anyhow!("starting a tunnel VIP's DTLS server: {e}"))?,
            );
            println!("    node {id}: DTLS {what} server on the tunnel VIP {VIP4_TUNNEL}:{port}");
        }
    }
    // The router counts the replies it forwards: from the nodes' own addresses (NAT, to be
    // un-NATed) and from the tunnel VIP (straight to the client).
    for src in node_sources().iter().chain([&format!("{VIP4_TUNNEL}/32")]) {
        r.count_forwarded(src).map_err(|e| anyhow!(e))?;
    }
    r.resolve_balancer_next_hops().map_err(|e| anyhow!(e))?;

    let cfg = out_dir.join("cidlb.yaml");
    // Both record formats route by CID; the VIPs balance the 1.3 port too.
    let nat_ports = [lb_lab::PORT, PORT13];
    let tunnel_ports = [TUNNEL_PORT, TUNNEL_PORT13];
    let config = r.cidlb_config_vips(
        &[
            (IpAddr::V4(lb_lab::VIP4), &nat_ports[..], "nat"),
            (IpAddr::V6(lb_lab::VIP6), &nat_ports[..], "nat"),
            (IpAddr::V4(VIP4_TUNNEL), &tunnel_ports[..], "ipip"),
        ],
        PIN_DIR,
        "dtls: {versions: [\"1.2\", \"1.3\"]}\n",
    );
    std::fs::write(&cfg, config)?;
    step(&format!(
        "cidlb run --config {} (XDP on {BALANCER_IFACE}, {BALANCER_NODE_IFACE}; NAT VIPs {} and {}, tunnel VIP {VIP4_TUNNEL} (ipip))",
        cfg.display(),
        lb_lab::VIP4,
        lb_lab::VIP6
    ));
    let log_path = out_dir.join("cidlb.log");
    let _ = std::fs::remove_file(&log_path);
    let agent = Agent::start(
        &bin("cidlb"),
        &lab.balancer,
        &cfg,
        &["--detach-on-exit"],
        &LogTo {
            stderr_prefix: None,
            file: Some(log_path),
        },
    )
    .map_err(|e| anyhow!("{e}\n(whole log: target/demo/cidlb.log)"))?;
    for l in agent
        .history
        .borrow()
        .iter()
        .filter(|l| l.contains("attached XDP program"))
    {
        println!("    {}", l.split("INFO ").last().unwrap_or(l));
    }
    println!(
        "    ready after {:.1} s ({} written)",
        agent.start_time.as_secs_f64(),
        agent.ready_file.display()
    );
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    std::thread::sleep(Duration::from_millis(1000));

    step("clients: DTLS handshakes, then records while hopping source ports (a NAT rebinding every 4 records)");
    let v4 = lb_lab::VIP4_SOCKET.to_string();
    let v6 = lb_lab::VIP6_SOCKET.to_string();
    let v4_13 = std::net::SocketAddr::new(lb_lab::VIP4_SOCKET.ip(), PORT13).to_string();
    let v6_13 = std::net::SocketAddr::new(lb_lab::VIP6_SOCKET.ip(), PORT13).to_string();
    let t4 = format!("{VIP4_TUNNEL}:{TUNNEL_PORT}");
    let t4_13 = format!("{VIP4_TUNNEL}:{TUNNEL_PORT13}");
    // 40 records 250 ms apart per session: about ten seconds to watch.
    let runs: [(&'static str, &str, &str); 7] = [
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
        (
            "IPv4 1.3 CID",
            &v4_13,
            "--dtls 1.3 --sessions 12 --messages 40 --rebind-every 4 --interval-ms 250 --parallel 12",
        ),
        (
            "IPv6 1.3 CID",
            &v6_13,
            "--dtls 1.3 --sessions 12 --messages 40 --rebind-every 4 --interval-ms 250 --parallel 12",
        ),
        (
            TUNNEL_RUNS[0],
            &t4,
            "--sessions 12 --messages 40 --rebind-every 4 --interval-ms 250 --parallel 12",
        ),
        (
            TUNNEL_RUNS[1],
            &t4_13,
            "--dtls 1.3 --sessions 12 --messages 40 --rebind-every 4 --interval-ms 250 --parallel 12",
        ),
    ];
    let mut clients = Vec::new();
    for (label, vip, args) in runs {
        let out = out_dir.join(format!("{}.jsonl", label.replace(' ', "-")));
        let args: Vec<&str> = args.split(' ').collect();
        let child = lb_lab::peer::spawn_client(&peer, &lab.client, vip, &args, &out)
            .map_err(|e| anyhow!(e))?;
        println!("    {label}: {} to {vip}", args.join(" "));
        clients.push(Client {
            label,
            child,
            out,
            status: None,
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
        for c in clients.iter_mut().filter(|c| c.status.is_none()) {
            c.status = c.child.0.try_wait().ok().flatten();
        }
        let done = clients.iter().filter(|c| c.status.is_some()).count();
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
    summary(r, &clients, &stats)?;
    // SIGTERM: the agent detaches (--detach-on-exit) and removes its ready file.
    if !agent.terminate().is_some_and(|s| s.success()) {
        bail!("cidlb did not exit cleanly on SIGTERM; see target/demo/cidlb.log");
    }
    drop(servers);
    Ok(())
}

/// The client runs to the tunnel VIP.
const TUNNEL_RUNS: [&str; 2] = ["tunnel 1.2 CID", "tunnel 1.3 CID"];

/// The nodes' own addresses, as the router's counters name them.
fn node_sources() -> Vec<String> {
    (1..=NODES)
        .flat_map(|k| {
            [
                format!("{}/32", lb_lab::node4(k)),
                format!("{}/128", lb_lab::node6(k)),
            ]
        })
        .collect()
}

/// Five tls12_cid records for node 9 from the client namespace.
fn forge_unknown_node(client: &NetNs) -> Result<()> {
    let name = client.name.clone();
    std::thread::spawn(move || -> std::io::Result<()> {
        lb_lab::enter(&name);
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let record = lb_lab::packet::cid_record(&[9, 0xaa, 0xbb, 0xcc, 0xdd, 0xee], b"forg");
        for _ in 0..5 {
            s.send_to(&record, lb_lab::VIP4_SOCKET)?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("the forging thread panicked"))?
    .context("sending the forged records")
}

fn stats() -> Result<Value> {
    lb_lab::agent::stats(&bin("cidlb"), Path::new(PIN_DIR)).map_err(|e| anyhow!(e))
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
        "cid13_routed",
        "flow_new",
        "flow_hit",
        "reply_unnat",
        "fwd_redirect",
        "fwd_kernel_no_neigh",
        "tunnel_encap_ipip",
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

fn summary(r: &Routed, clients: &[Client], stats: &Value) -> Result<()> {
    step("summary");
    // Records echoed through the tunnel VIP, and through the NAT VIPs (all other runs).
    let (mut tunnel_echoed, mut nat_echoed) = (0u64, 0u64);
    let mut all_ok = true;
    let mut all_follow_cid = true;
    let mut total_sessions = 0;
    let mut total_rebinds = 0;
    let mut handshakes: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        let text = std::fs::read_to_string(&c.out)?;
        let exited_ok = c.status.is_some_and(|s| s.success());
        let run = ClientRun::parse(&text, exited_ok)
            .map_err(|e| anyhow!("{}: {e} (see {})", c.label, c.out.display()))?;
        // Checked per session from the peer's report: each echo names the node that sent it.
        let wrong = run.misrouted();
        for w in &wrong {
            println!("  {}: {w}", c.label);
        }
        all_follow_cid &= wrong.is_empty();
        let summary = &run.summary;
        let (sessions, ok, rebinds) = (
            summary["sessions"].as_u64().unwrap_or(0),
            summary["ok"].as_u64().unwrap_or(0),
            summary["rebinds"].as_u64().unwrap_or(0),
        );
        all_ok &= run.ok && sessions == ok && summary["messages_failed"].as_u64() == Some(0);
        let echoed = summary["messages_ok"].as_u64().unwrap_or(0);
        if TUNNEL_RUNS.contains(&c.label) {
            tunnel_echoed += echoed;
        } else {
            nat_echoed += echoed;
        }
        total_sessions += sessions;
        total_rebinds += rebinds;
        if let Some(per) = summary["per_node"].as_object() {
            for (k, v) in per {
                *handshakes.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        println!(
            "  {:<14} sessions {ok}/{sessions} ok, records {}/{} echoed, source-port rebinds survived {rebinds}",
            c.label,
            summary["messages_ok"],
            summary["messages_ok"].as_u64().unwrap_or(0) + summary["messages_failed"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "  sessions per node (handshakes placed by Maglev, the default flows.policy): {}",
        handshakes
            .iter()
            .map(|(k, v)| format!("node {k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(o) = stats["nodes"].as_object() {
        for (id, n) in o {
            println!(
                "  node {id}: {} packets in, {} replies out (balancer counters; a tunnel VIP's replies bypass it)",
                n["to_node_packets"], n["from_node_packets"]
            );
        }
    }
    let c = &stats["counters"];
    println!(
        "  balancer: {} DTLS 1.2 and {} DTLS 1.3 records routed by CID, {} new flows, {} flow hits, {} replies un-NATed",
        c["cid_routed"], c["cid13_routed"], c["flow_new"], c["flow_hit"], c["reply_unnat"]
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
    println!(
        "  {total_sessions} sessions ({}), {total_rebinds} rebinds; every echo from the node named in its session's CID (checked per session): {}",
        if all_ok { "all ok" } else { "SOME FAILED" },
        if all_follow_cid { "yes" } else { "NO" }
    );
    let ways = reply_ways(r, tunnel_echoed, nat_echoed, stats)?;
    if !all_ok || !all_follow_cid || !ways {
        bail!("see target/demo/*.jsonl and target/demo/cidlb.log");
    }
    Ok(())
}

/// Prints and checks which way the replies went, by the router's counters: the tunnel VIP's
/// straight to the client (none through the balancer) and every one of its records
/// encapsulated; the NAT VIPs' from the nodes to the balancer (none straight to the client)
/// and un-NATed there. Whether they all held.
fn reply_ways(r: &Routed, tunnel_echoed: u64, nat_echoed: u64, stats: &Value) -> Result<bool> {
    let sum = |sources: &[String], devs: &[&str]| -> Result<u64> {
        let mut n = 0;
        for s in sources {
            for d in devs {
                n += r.forwarded(s, d).map_err(|e| anyhow!(e))?;
            }
        }
        Ok(n)
    };
    let tunnel = [format!("{VIP4_TUNNEL}/32")];
    let (t_client, t_balancer) = (sum(&tunnel, &["rc"])?, sum(&tunnel, &["rb", "rbn"])?);
    let nodes = node_sources();
    let (n_balancer, n_client) = (sum(&nodes, &["rbn"])?, sum(&nodes, &["rc"])?);
    let encap = counter(stats, "tunnel_encap_ipip");
    let unnat = counter(stats, "reply_unnat");
    let tunnel_ok = t_balancer == 0 && t_client >= tunnel_echoed && encap >= tunnel_echoed;
    let nat_ok = n_client == 0 && n_balancer >= nat_echoed && unnat >= nat_echoed;
    let mark = |ok: bool| if ok { "yes" } else { "NO" };
    println!(
        "  tunnel VIP {VIP4_TUNNEL} (ipip): {tunnel_echoed} records echoed, {encap} packets encapsulated \
         (tunnel_encap_ipip); the router forwarded {t_client} replies from the VIP straight to the client \
         and {t_balancer} to the balancer: replies bypass the balancer: {}",
        mark(tunnel_ok)
    );
    println!(
        "  NAT VIPs: {nat_echoed} records echoed; the router sent {n_balancer} replies from the nodes' \
         addresses to the balancer ({unnat} un-NATed) and {n_client} straight to the client: replies \
         cross the balancer: {}",
        mark(nat_ok)
    );
    Ok(tunnel_ok && nat_ok)
}
