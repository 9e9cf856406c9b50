//! The balancer's CPU per echoed record, NAT mode against tunnel mode (issue #20), in the
//! routed lab (`lb_lab::routed`): one topology, both modes, interleaved point by point.
//!
//! ```text
//!  trafgen c0 ── router ── lbr balancer lbn ── router ── node K: echo
//!   (sink)        │  NAT:  reply ── router ── lbn → lbr ── router ── c0   (un-NAT)
//!                 └  tunnel: reply ── router ── c0                         (never the balancer)
//! ```
//! - trafgen sends tls12_cid records for nodes 1 and 2 to the VIP at a fixed rate (the same in
//!   every mode, so NAPI batches alike); a counting sink on the client's `c0` (lb-ebpf's bench
//!   `cidlb_sink`) counts the echoes by the CID's node byte and drops them.
//! - Each node runs `cidlb node up` (the decapsulation program, the VIP on `lo`) in every mode,
//!   and a UDP echo socket: bound to its own address in NAT mode (the balancer rewrote the
//!   destination), to the VIP in tunnel mode (so it answers from the VIP). A record whose CID
//!   names another node is counted and not echoed. Why a socket and not an XDP reflector: the
//!   balancer's work depends on what the node answers, not on how; a socket answers through
//!   the node's real path (decapsulation, stack, a socket bound to the VIP), which an XDP
//!   reflector would skip (and XDP_TX on veth needs programs on both ends). Its cost is a
//!   lower rate: a point fails if fewer than 95 % of the records the balancer routed came
//!   back, rather than divide the balancer's CPU by echoes that were never made.
//! - The router sends a node's replies from its own address to the balancer (NAT: `lbn` in,
//!   un-NAT, out of `lbr`) and replies from the VIP straight to the client (tunnel).
//! - The balancer's CPU: both its interfaces' NAPI in kernel threads (threaded NAPI), read from
//!   /proc/PID/schedstat: `lbr` (requests) and `lbn` (NAT replies). The router's `rb` and
//!   `rbn`, where the balancer's redirects land, have threads of their own too, so their NAPI
//!   does not run inside the balancer's.
//! - A point fails rather than guesses: no NAPI thread on either interface; fewer than 95 %
//!   echoed; a NAT point whose replies were not un-NATed (`reply_unnat` short of the echoes);
//!   a tunnel point whose records were not all encapsulated, or whose program ran for more
//!   than the requests (a reply crossed the balancer), or that un-NATed anything; any record
//!   echoed by a node its CID does not name.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::Ebpf;
use cidlb::stats::Snapshot;
use lb_common::{names, Counter};
use lb_lab::{
    agent::{Agent, LogTo},
    routed::{Routed, BALANCER_IFACE, BALANCER_NODE_IFACE},
    trafgen::Trafgen,
    NetNs, PORT, VIP4,
};
use serde_json::{json, Value};

use crate::{
    stats,
    throughput::{
        attach, cid_records_conf, inside, mac, prog_run_stats, sink_counts, thread_runtime,
        threaded_napi, xdp_prog_id,
    },
    Effort,
};

/// How the balancer forwards the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nat,
    Ipip,
    Gue,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Nat, Mode::Ipip, Mode::Gue];

    /// The `forwarding` argument of `Routed::cidlb_config`.
    fn forwarding(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Ipip => "ipip",
            Mode::Gue => "gue",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Nat => "NAT",
            Mode::Ipip => "tunnel ipip",
            Mode::Gue => "tunnel gue",
        }
    }

    fn encap_counter(self) -> Option<Counter> {
        match self {
            Mode::Nat => None,
            Mode::Ipip => Some(Counter::TunnelEncapIpip),
            Mode::Gue => Some(Counter::TunnelEncapGue),
        }
    }
}

/// Echoed records must be at least this share of the records the balancer routed.
const MIN_ECHOED: f64 = 0.95;

struct Bed {
    r: Routed,
    sink: Ebpf,
    dir: PathBuf,
    shim: PathBuf,
    pin_dir: String,
    node_pins: Vec<String>,
    cidlb: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for (i, n) in self.r.lab.nodes.iter().enumerate() {
            let _ = n
                .nsenter(self.cidlb.to_str().unwrap_or("cidlb"))
                .args(["node", "down", "--config"])
                .arg(self.dir.join(format!("node{}.yaml", i + 1)))
                .output();
        }
        for p in self.node_pins.iter().chain([&self.pin_dir]) {
            let _ = std::fs::remove_dir_all(p);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One node's echo socket, answering until stopped (or for at most a minute).
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
    echoed: Arc<AtomicU64>,
    misrouted: Arc<AtomicU64>,
}

impl Echo {
    /// Node K (1-based, in `nodes[K-1]`) echoes what reaches `addr(K)`:[`PORT`], if its CID's
    /// first byte is K.
    fn start(nodes: &[NetNs], addr: impl Fn(usize) -> IpAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let misrouted = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let k = i + 1;
            let (name, at) = (n.name.clone(), SocketAddr::new(addr(k), PORT));
            let (stop, echoed, misrouted) = (stop.clone(), echoed.clone(), misrouted.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || -> Result<()> {
                lb_lab::enter(&name);
                let bound = UdpSocket::bind(at).with_context(|| format!("bind {at} in {name}"));
                let s = match bound {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                // Room for the records that arrive while the thread waits for a CPU (other
                // work shares these cores), and a real-time priority so it waits little.
                let size: libc::c_int = 16 << 20;
                // SAFETY: a valid socket and an int option of the right size.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&size as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                realtime(0);
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let Ok((len, from)) = s.recv_from(&mut buf) else {
                        continue;
                    };
                    // tls12_cid: type 25 at 0, the CID's first byte at 11.
                    if len < 12 || buf[0] != 25 || usize::from(buf[11]) != k {
                        misrouted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if s.send_to(&buf[..len], from).is_ok() {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| anyhow!("node {k}'s echo socket did not start"))?
                .map_err(|e| anyhow!(e))?;
        }
        Ok(Echo {
            stop,
            threads,
            echoed,
            misrouted,
        })
    }

    /// Stops the sockets: (records echoed, records for another node).
    fn stop(self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| anyhow!("an echo thread panicked"))??;
        }
        Ok((
            self.echoed.load(Ordering::Relaxed),
            self.misrouted.load(Ordering::Relaxed),
        ))
    }
}

/// Gives thread `tid` (0: the caller) SCHED_FIFO priority 50, so other load on the machine
/// does not starve the lab's packet path (the kernel's RT throttling still leaves 5 %).
fn realtime(tid: u32) {
    let p = libc::sched_param { sched_priority: 50 };
    // SAFETY: a plain syscall on a thread id; failure leaves the thread as it was.
    unsafe { libc::sched_setscheduler(tid as libc::pid_t, libc::SCHED_FIFO, &p) };
}

/// How many times threads `pids` were run on a CPU so far (/proc/PID/schedstat, third
/// field): a NAPI thread's wakeups.
fn thread_runs(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// The figures read at each end of a measuring window.
struct Reading {
    requests_ns: u64,
    replies_ns: u64,
    wakeups: u64,
    prog: (u64, u64),
    echoes: u64,
    counters: Snapshot,
}

fn read(bed: &Bed, threads: &(Vec<u32>, Vec<u32>), prog_id: u32, pin: &Path) -> Result<Reading> {
    let (_, _, by_node) = sink_counts(&bed.sink)?;
    Ok(Reading {
        requests_ns: thread_runtime(&threads.0),
        replies_ns: thread_runtime(&threads.1),
        wakeups: thread_runs(&threads.0) + thread_runs(&threads.1),
        prog: prog_run_stats(prog_id).unwrap_or((0, 0)),
        echoes: by_node[1] + by_node[2],
        counters: Snapshot::from_pins(pin)?,
    })
}

fn point(bed: &Bed, mode: Mode, rate: u32, window: Duration) -> Result<Value> {
    let lab = &bed.r.lab;
    let cfg = bed.dir.join("cidlb.yaml");
    std::fs::write(
        &cfg,
        bed.r.cidlb_config(
            &bed.pin_dir,
            mode.forwarding(),
            "flows: {capacity: 65536}\n",
        ),
    )?;
    let agent = Agent::start(
        &bed.cidlb,
        &lab.balancer,
        &cfg,
        &["--detach-on-exit"],
        &LogTo::default(),
    )
    .map_err(|e| anyhow!(e))?;
    let echo = Echo::start(&lab.nodes, |k| match mode {
        Mode::Nat => IpAddr::V4(lb_lab::node4(k)),
        _ => IpAddr::V4(VIP4),
    });
    let r = echo.and_then(|echo| {
        let r = measure(bed, mode, rate, window);
        let (echoed, misrouted) = echo.stop()?;
        let mut v = r.map_err(|e| {
            anyhow!("{e:#} (the nodes' sockets echoed {echoed} records during the whole point)")
        })?;
        if misrouted > 0 {
            bail!(
                "{}: {misrouted} records reached a node their CID does not name",
                mode.name()
            );
        }
        v["node_echoes"] = json!(echoed);
        Ok(v)
    });
    let _ = agent.terminate();
    cidlb::datapath::detach(Path::new(&bed.pin_dir));
    r
}

fn measure(bed: &Bed, mode: Mode, rate: u32, window: Duration) -> Result<Value> {
    let (lab, router) = (&bed.r.lab, &bed.r.router);
    // veth needs a moment after an XDP attach before it forwards.
    std::thread::sleep(Duration::from_millis(1000));
    // After the attach (which can recreate NAPI threads): the router's ends, where the
    // balancer's redirects land, in threads of their own; then the balancer's.
    for dev in ["rb", "rbn"] {
        let t = threaded_napi(router, dev)?;
        if t.is_empty() {
            bail!("threaded NAPI on the router's {dev} made no kernel thread");
        }
        t.into_iter().for_each(realtime);
    }
    let threads = (
        threaded_napi(&lab.balancer, BALANCER_IFACE)?,
        threaded_napi(&lab.balancer, BALANCER_NODE_IFACE)?,
    );
    threads
        .0
        .iter()
        .chain(&threads.1)
        .copied()
        .for_each(realtime);
    if threads.0.is_empty() || threads.1.is_empty() {
        bail!(
            "threaded NAPI on the balancer made no kernel thread for {} ({:?}) or {} ({:?}): \
             its CPU cannot be told apart",
            BALANCER_IFACE,
            threads.0,
            BALANCER_NODE_IFACE,
            threads.1
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let prog_id = xdp_prog_id(&lab.balancer, BALANCER_IFACE)
        .ok_or_else(|| anyhow!("no XDP program on the balancer's {BALANCER_IFACE}"))?;
    if xdp_prog_id(&lab.balancer, BALANCER_NODE_IFACE) != Some(prog_id) {
        bail!(
            "the balancer's {BALANCER_NODE_IFACE} runs another program than its {BALANCER_IFACE}"
        );
    }
    let conf = bed.dir.join(format!("trafgen-{rate}.cfg"));
    std::fs::write(
        &conf,
        cid_records_conf(mac(router, "rc")?, mac(&lab.client, "c0")?, 64, 1, |_| {
            VIP4.to_string()
        }),
    )?;
    let tg = Trafgen::start(
        &lab.client,
        "c0",
        &conf,
        &bed.shim,
        0,
        &["-b", &format!("{rate}pps")],
        &bed.dir.join("trafgen.err"),
    )
    .map_err(|e| anyhow!(e))?;
    std::thread::sleep(Duration::from_millis(100));
    tg.realtime(40);
    std::thread::sleep(Duration::from_millis(400));
    let pin = Path::new(&bed.pin_dir);
    let t0 = Instant::now();
    let a = read(bed, &threads, prog_id, pin)?;
    std::thread::sleep(window);
    let b = read(bed, &threads, prog_id, pin)?;
    let secs = t0.elapsed().as_secs_f64();
    let err = tg.stop();
    if err.contains("failed") {
        bail!("trafgen: {}", err.trim());
    }
    let delta = |c: Counter| b.counters.get(c).saturating_sub(a.counters.get(c));
    let requests = delta(Counter::CidRouted);
    let echoed = b.echoes.saturating_sub(a.echoes);
    let unnat = delta(Counter::ReplyUnnat);
    let runs = b.prog.1.saturating_sub(a.prog.1);
    let req_ns = b.requests_ns.saturating_sub(a.requests_ns);
    let rep_ns = b.replies_ns.saturating_sub(a.replies_ns);
    let name = mode.name();
    if requests == 0 || (echoed as f64) < MIN_ECHOED * requests as f64 {
        bail!(
            "{name} at {rate} pps: {echoed} records echoed of {requests} routed (under {:.0} %): \
             the nodes did not keep up, or replies were lost",
            100.0 * MIN_ECHOED
        );
    }
    if req_ns == 0 {
        bail!("{name}: {requests} records routed but lbr's NAPI thread did not run");
    }
    // The counts are read a moment apart, so records in flight between the reads differ: 2 %.
    match mode.encap_counter() {
        None => {
            if (unnat as f64) < 0.98 * echoed as f64 {
                bail!("{name}: {unnat} replies un-NATed for {echoed} echoes: replies bypassed the balancer");
            }
            if rep_ns == 0 {
                bail!("{name}: {unnat} replies un-NATed but lbn's NAPI thread did not run");
            }
        }
        Some(c) => {
            let encap = delta(c);
            if (encap as f64) < 0.98 * requests as f64 {
                bail!("{name}: {encap} records encapsulated of {requests} routed");
            }
            if unnat > 0 || runs as f64 > 1.02 * requests as f64 {
                bail!(
                    "{name}: the balancer's program ran {runs} times for {requests} requests and \
                     un-NATed {unnat} replies: replies crossed the balancer"
                );
            }
        }
    }
    let per_echo = |ns: u64| ns as f64 / echoed as f64;
    Ok(json!({
        "part": "echo", "mode": name, "rate": rate,
        "requests_pps": requests as f64 / secs,
        "echoed_pps": echoed as f64 / secs,
        "echoed_share": echoed as f64 / requests as f64,
        "balancer_ns_per_echo": per_echo(req_ns + rep_ns),
        "request_side_ns": per_echo(req_ns),
        "reply_side_ns": per_echo(rep_ns),
        "balancer_cpu": (req_ns + rep_ns) as f64 / 1e9 / secs,
        "prog_runs_per_echo": runs as f64 / echoed as f64,
        "prog_ns_per_run": if runs > 0 { b.prog.0.saturating_sub(a.prog.0) as f64 / runs as f64 } else { 0.0 },
        "reply_unnat": unnat,
        // Packets the balancer's NAPI threads took per wakeup: at low rates each packet wakes
        // a thread, whose wakeup then dominates the CPU per packet.
        "packets_per_wakeup": runs as f64 / b.wakeups.saturating_sub(a.wakeups).max(1) as f64,
    }))
}

pub fn run(effort: Effort) -> Result<Vec<Value>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("BPF_ENABLE_STATS (run time accounting): {e}"))?;
    let cidlb = std::env::current_exe()?.with_file_name("cidlb");
    let r = Routed::up(&lb_lab::unique_prefix("te"), 2).map_err(|e| anyhow!(e))?;
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("cidlb-bench-te-{pid}"));
    std::fs::create_dir_all(&dir)?;
    let shim = lb_lab::trafgen::build_shim(&dir).map_err(|e| anyhow!(e))?;
    // The echoes end at the client's sink (else its kernel would answer them with ICMP, which
    // in NAT mode would cross the balancer).
    let sink = inside(&r.lab.client, || -> Result<Ebpf> {
        let mut e = cidlb::testrun::load_bench_object(0)?;
        attach(&mut e, names::SINK_PROG, "c0")?;
        Ok(e)
    })?;
    let mut bed = Bed {
        r,
        sink,
        dir,
        shim,
        pin_dir: format!("/sys/fs/bpf/cidlb-bench-te-{pid}"),
        node_pins: Vec::new(),
        cidlb,
    };
    for (i, n) in bed.r.lab.nodes.iter().enumerate() {
        let k = i + 1;
        let pins = format!("/sys/fs/bpf/cidlb-bench-te-{pid}-n{k}");
        let file = bed.dir.join(format!("node{k}.yaml"));
        std::fs::write(&file, bed.r.node_config_vips(k, &[IpAddr::V4(VIP4)], &pins))?;
        bed.node_pins.push(pins);
        let o = n
            .nsenter(bed.cidlb.to_str().unwrap_or("cidlb"))
            .args(["node", "up", "--config"])
            .arg(&file)
            .output()?;
        if !o.status.success() {
            bail!(
                "cidlb node up on node {k}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    bed.r.resolve_balancer_next_hops().map_err(|e| anyhow!(e))?;
    let (rates, repeats, window): (&[u32], usize, Duration) = if effort.full {
        (&[20_000, 50_000, 80_000], 5, Duration::from_secs(3))
    } else {
        (&[20_000, 50_000, 100_000], 3, Duration::from_millis(1500))
    };
    let mut raw = Vec::new();
    for rep in 0..repeats {
        for &rate in rates {
            for mode in Mode::ALL {
                let mut attempt = 0;
                let v = loop {
                    attempt += 1;
                    match point(&bed, mode, rate, window) {
                        Ok(v) => break v,
                        Err(e) if attempt < 3 => {
                            eprintln!("  {} {rate} pps failed, retrying: {e:#}", mode.name());
                        }
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("echo: {} at {rate} pps", mode.name()))
                        }
                    }
                };
                eprintln!(
                    "  [{}] {:<12} {rate:>6} pps offered: {:>7.0} echoed/s, balancer {:.0} ns per echoed record ({:.0} requests + {:.0} replies), prog {:.0} ns/run, {:.1} packets per NAPI wakeup",
                    rep + 1,
                    mode.name(),
                    v["echoed_pps"].as_f64().unwrap_or(0.0),
                    v["balancer_ns_per_echo"].as_f64().unwrap_or(0.0),
                    v["request_side_ns"].as_f64().unwrap_or(0.0),
                    v["reply_side_ns"].as_f64().unwrap_or(0.0),
                    v["prog_ns_per_run"].as_f64().unwrap_or(0.0),
                    v["packets_per_wakeup"].as_f64().unwrap_or(0.0),
                );
                raw.push(v);
            }
        }
    }
    let mut out = Vec::new();
    for &rate in rates {
        for mode in Mode::ALL {
            let pts: Vec<&Value> = raw
                .iter()
                .filter(|r| r["mode"] == mode.name() && r["rate"] == rate)
                .collect();
            let col = |k: &str| -> Vec<f64> {
                pts.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect()
            };
            let (ns, ns_min, ns_max) = stats(&col("balancer_ns_per_echo"));
            out.push(json!({
                "part": "echo", "mode": mode.name(), "rate": rate, "repeats": pts.len(),
                "echoed_pps": stats(&col("echoed_pps")).0,
                "echoed_share": stats(&col("echoed_share")).0,
                "balancer_ns_per_echo": ns, "balancer_ns_min": ns_min, "balancer_ns_max": ns_max,
                "request_side_ns": stats(&col("request_side_ns")).0,
                "reply_side_ns": stats(&col("reply_side_ns")).0,
                "balancer_cpu": stats(&col("balancer_cpu")).0,
                "prog_ns_per_run": stats(&col("prog_ns_per_run")).0,
                "prog_runs_per_echo": stats(&col("prog_runs_per_echo")).0,
                "packets_per_wakeup": stats(&col("packets_per_wakeup")).0,
                // Each repeat's own tunnel ÷ NAT (interleaved: the NAT point just before it).
                "samples_ns": col("balancer_ns_per_echo"),
            }));
        }
    }
    Ok(out)
}
