//! Forwarding throughput in the netns lab, cidlb against what it replaces, in one run.
//!
//! trafgen (netsniff-ng, not part of cidlb) sends DTLS-CID-shaped UDP from the client
//! namespace: records for node 1 and node 2 alternately, from 1 to 65,000 source ports. Each
//! node's veth runs a counting sink that drops and counts CID records naming another node.
//!
//! CPU cost: without threaded NAPI, veth runs a receiver's NAPI in softirq on the CPU that sent
//! the packet, so the balancer's and the sinks' work mix in one softirq figure. Two figures
//! isolate the balancer (issue #11), both measured alike in every mode:
//! - the XDP program's own run time per packet, from the kernel's accounting
//!   (BPF_ENABLE_STATS, run_time_ns / run_cnt of the program attached to the balancer's `lbc`,
//!   cidlb's and the bare redirect's alike; the sinks' program the same way);
//! - the balancer's CPU per packet: `lbc`'s NAPI runs in a kernel thread (threaded NAPI), and so
//!   do the nodes' `n0` (else an XDP_REDIRECT into lbn1 would run the sink's NAPI inside the
//!   balancer's), and the bench reads the `napi/lbc-*` thread's runtime from
//!   /proc/PID/schedstat per delivered packet. The sender has TSO off and `lbc` GRO on, and
//!   the threads are switched on after each mode is in place, since attaching XDP recreates
//!   them (an earlier try saw a threaded veth NAPI woken for only a few hundred of 50,000
//!   packets; which of these it lacked was not pinned down). A point fails if lbc got no such thread, if it did not run
//!   while packets were delivered, or if the kernel counted fewer program runs than delivered
//!   packets: no figure is guessed.
//!
//! Modes, interleaved point by point:
//! - plain:    kernel routing, no rules (the client sends straight to the node addresses);
//! - iptables: the seed's rules: u32 match on 19 FE FD + the CID's node byte, DNAT per node,
//!   `-m statistic --mode nth` round robin for the rest (this kernel has no ipvs),
//!   conntrack on;
//! - cidlb:    `cidlb run`, native XDP;
//! - ceiling:  a minimal XDP forwarder that only sets MACs and redirects to node 1.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, DevMapHash, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf,
};
use lb_common::{names, FwdTarget, SINK_MISROUTED, SINK_PACKETS};
use lb_lab::trafgen::Trafgen;
use lb_lab::{
    agent::{Agent, LogTo},
    packet::cid_record,
    Lab, NetNs,
};
use serde_json::{json, Value};

use crate::{stats, Effort};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Iptables,
    Cidlb,
    Ceiling,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Plain, Mode::Iptables, Mode::Cidlb, Mode::Ceiling];
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain routing",
            Mode::Iptables => "iptables u32+DNAT",
            Mode::Cidlb => "cidlb (XDP)",
            Mode::Ceiling => "XDP redirect only",
        }
    }
}

pub(crate) fn mac(ns: &NetNs, dev: &str) -> Result<[u8; 6]> {
    ns.mac(dev).map_err(|e| anyhow!(e))
}

/// Runs `f` on a thread inside namespace `ns` and returns its result.
pub(crate) fn inside<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let name = ns.name.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            lb_lab::enter(&name);
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

pub(crate) fn attach(ebpf: &mut Ebpf, prog: &str, iface: &str) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow!("no {prog}"))?
        .try_into()?;
    p.load()?;
    p.attach(iface, XdpMode::Driver)
        .with_context(|| format!("attach {prog} to {iface}"))?;
    Ok(())
}

/// (packets, misrouted CID records, CID records per first CID byte 0..=3) seen by a sink.
pub(crate) fn sink_counts(sink: &Ebpf) -> Result<(u64, u64, [u64; 4])> {
    let m: PerCpuArray<_, u64> =
        PerCpuArray::try_from(sink.map(names::SINK).ok_or_else(|| anyhow!("no SINK"))?)?;
    let sum = |i: u32| -> Result<u64> { Ok(m.get(&i, 0)?.iter().sum()) };
    let mut by_node = [0u64; 4];
    for (b, v) in by_node.iter_mut().enumerate() {
        *v = sum(lb_common::SINK_SLOTS + b as u32)?;
    }
    Ok((sum(SINK_PACKETS)?, sum(SINK_MISROUTED)?, by_node))
}

/// Softirq time of all CPUs so far, in seconds (/proc/stat, USER_HZ ticks).
fn softirq_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// The id of the XDP program attached to `dev` in `ns`, if any (`ip -j link`).
pub(crate) fn xdp_prog_id(ns: &NetNs, dev: &str) -> Option<u32> {
    let out = ns.must(&["ip", "-j", "link", "show", "dev", dev]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32)
}

/// Run time (ns) and run count the kernel accounted to program `id` so far.
pub(crate) fn prog_run_stats(id: u32) -> Option<(u64, u64)> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| (p.run_time().as_nanos() as u64, p.run_count()))
}

/// Pids of the kernel threads named `napi/{dev}-*`.
pub(crate) fn napi_threads(dev: &str) -> Vec<u32> {
    let prefix = format!("napi/{dev}-");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim_end().starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// CPU time (ns) threads `pids` ran so far (/proc/PID/schedstat, first field).
pub(crate) fn thread_runtime(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Switches `dev`'s NAPI in `ns` to a kernel thread; returns the threads it made (those
/// named `napi/{dev}-*` that were not there before: other namespaces may have a `dev` too).
pub(crate) fn threaded_napi(ns: &NetNs, dev: &str) -> Result<Vec<u32>> {
    let before = napi_threads(dev);
    let path = format!("/sys/class/net/{dev}/threaded");
    ns.must(&["sh", "-c", &format!("echo 0 > {path}; echo 1 > {path}")])
        .map_err(|e| anyhow!("threaded NAPI on {dev} in {}: {e}", ns.name))?;
    Ok(napi_threads(dev)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect())
}

struct Bed {
    lab: Lab,
    sinks: Vec<Ebpf>,
    macs: Macs,
    conf_dir: PathBuf,
    pin_dir: String,
    shim: PathBuf,
}

struct Macs {
    c0: [u8; 6],
    lbc: [u8; 6],
    lbn1: [u8; 6],
    node1: [u8; 6],
}

fn trafgen_conf(bed: &Bed, mode: Mode, payload: usize, flows: u32) -> Result<PathBuf> {
    let s = cid_records_conf(bed.macs.lbc, bed.macs.c0, payload, flows, |node| {
        if mode == Mode::Plain {
            lb_lab::node4(node as usize).to_string()
        } else {
            lb_lab::VIP4.to_string()
        }
    });
    let p = bed
        .conf_dir
        .join(format!("trafgen-{payload}-{flows}-{:?}.cfg", mode));
    std::fs::write(&p, s)?;
    Ok(p)
}

/// A trafgen config of tls12_cid records from the lab's client to `dst(node)`, for nodes 1 and
/// 2 in turn, `payload` bytes of UDP payload; each node's records come from `flows` source
/// ports of their own (one 5-tuple, one session), from 1024 on.
pub(crate) fn cid_records_conf(
    dmac: [u8; 6],
    smac: [u8; 6],
    payload: usize,
    flows: u32,
    dst: impl Fn(u8) -> String,
) -> String {
    let mut s = String::new();
    for node in [1u8, 2] {
        let fill = payload.saturating_sub(19);
        let base = 1024 + (u32::from(node) - 1) * flows;
        let sport = if flows > 1 {
            format!("dinc({base}, {})", base + flows - 1)
        } else {
            base.to_string()
        };
        // The record header from lb-lab's builder; trafgen fills the body itself.
        let record = cid_record(&[node, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5], &vec![0xab; fill]);
        let header: Vec<String> = record[..record.len() - fill]
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect();
        s.push_str(&format!(
            "{{\n  eth(da={}, sa={}),\n  ipv4(saddr={}, daddr={}, ttl=64),\n  udp(sp={sport}, dp={}),\n  \
             {},\n  fill(0xab, {fill})\n}}\n",
            lb_lab::fib::mac_str(dmac),
            lb_lab::fib::mac_str(smac),
            lb_lab::CLIENT4,
            dst(node),
            lb_lab::PORT,
            header.join(", "),
        ));
    }
    s
}

fn start_trafgen(bed: &Bed, conf: &std::path::Path) -> Result<Trafgen> {
    Trafgen::start(
        &bed.lab.client,
        "c0",
        conf,
        &bed.shim,
        0,
        &[],
        &bed.conf_dir.join("trafgen.err"),
    )
    .map_err(|e| anyhow!(e))
}

/// A mode's state while it is in place.
enum Active {
    None,
    Agent(Agent),
    Ceiling(Ebpf),
}

fn enter(bed: &Bed, mode: Mode) -> Result<Active> {
    let b = &bed.lab.balancer;
    Ok(match mode {
        Mode::Plain => Active::None,
        Mode::Iptables => {
            bed.lab.seed_iptables(true).map_err(|e| anyhow!(e))?;
            Active::None
        }
        Mode::Cidlb => {
            let cfg = bed.conf_dir.join("cidlb.yaml");
            std::fs::write(
                &cfg,
                bed.lab
                    .cidlb_config(&bed.pin_dir, "flows: {capacity: 262144}\n"),
            )?;
            let exe = std::env::current_exe()?.with_file_name("cidlb");
            let agent = Agent::start(&exe, b, &cfg, &["--detach-on-exit"], &LogTo::default())
                .map_err(|e| anyhow!(e))?;
            Active::Agent(agent)
        }
        Mode::Ceiling => {
            let macs = &bed.macs;
            let ebpf = inside(b, || -> Result<Ebpf> {
                let mut e = cidlb::testrun::load_bench_object(0)?;
                let ifs = cidlb::datapath::resolve_interfaces(&["lbn1".into()])?;
                {
                    let mut dev = DevMapHash::try_from(
                        e.map_mut(names::DEVMAP)
                            .ok_or_else(|| anyhow!("no DEVMAP"))?,
                    )?;
                    dev.insert(ifs[0], ifs[0], None, 0)?;
                }
                {
                    let mut fwd: Array<_, FwdTarget> =
                        Array::try_from(e.map_mut(names::FWD).ok_or_else(|| anyhow!("no FWD"))?)?;
                    fwd.set(
                        0,
                        FwdTarget {
                            ifindex: ifs[0],
                            dmac: macs.node1,
                            smac: macs.lbn1,
                        },
                        0,
                    )?;
                }
                attach(&mut e, names::FWD_PROG, "lbc")?;
                Ok(e)
            })?;
            Active::Ceiling(ebpf)
        }
    })
}

fn leave(bed: &Bed, mode: Mode, active: Active) {
    match active {
        Active::Agent(a) => {
            let _ = a.terminate();
            cidlb::datapath::detach(std::path::Path::new(&bed.pin_dir));
        }
        Active::Ceiling(e) => drop(e),
        Active::None => {}
    }
    if mode == Mode::Iptables {
        bed.lab.clear_iptables();
    }
}

fn point(bed: &Bed, mode: Mode, payload: usize, flows: u32, window: Duration) -> Result<Value> {
    let active = enter(bed, mode)?;
    let r = (|| -> Result<Value> {
        // veth needs a moment after an XDP attach before it forwards.
        std::thread::sleep(Duration::from_millis(1000));
        // After the attach (which can recreate NAPI threads): the sinks' NAPI in threads of
        // their own, then the balancer's.
        let mut sink_threads = 0;
        for n in &bed.lab.nodes {
            sink_threads += threaded_napi(n, "n0")?.len();
        }
        let napi = threaded_napi(&bed.lab.balancer, "lbc")?;
        // Let the new NAPI threads settle before traffic.
        std::thread::sleep(Duration::from_millis(300));
        if napi.is_empty() {
            bail!(
                "threaded NAPI on lbc in {} made no napi/lbc-* kernel thread: the balancer's CPU \
                 cannot be told apart from the sinks'",
                bed.lab.balancer.name
            );
        }
        let prog_id = xdp_prog_id(&bed.lab.balancer, "lbc");
        let xdp_mode = matches!(mode, Mode::Cidlb | Mode::Ceiling);
        if xdp_mode != prog_id.is_some() {
            bail!(
                "{}: XDP program on lbc: {prog_id:?}, want {}",
                mode.name(),
                if xdp_mode { "one" } else { "none" }
            );
        }
        let sink_ids: Vec<u32> = bed
            .lab
            .nodes
            .iter()
            .filter_map(|n| xdp_prog_id(n, "n0"))
            .collect();
        let run_stats = |ids: &[u32]| -> (u64, u64) {
            ids.iter()
                .filter_map(|&id| prog_run_stats(id))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let conf = trafgen_conf(bed, mode, payload, flows)?;
        let tg = start_trafgen(bed, &conf)?;
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let (s1a, m1a, h1a) = sink_counts(&bed.sinks[0])?;
        let (s2a, m2a, h2a) = sink_counts(&bed.sinks[1])?;
        let cpu_a = softirq_secs();
        let napi_a = thread_runtime(&napi);
        let prog_a = run_stats(prog_id.as_slice());
        let sink_a = run_stats(&sink_ids);
        std::thread::sleep(window);
        let napi_b = thread_runtime(&napi);
        let prog_b = run_stats(prog_id.as_slice());
        let sink_b = run_stats(&sink_ids);
        let (s1b, m1b, h1b) = sink_counts(&bed.sinks[0])?;
        let (s2b, m2b, h2b) = sink_counts(&bed.sinks[1])?;
        let hist = |a: [u64; 4], b: [u64; 4]| -> Vec<u64> { (0..4).map(|i| b[i] - a[i]).collect() };
        let cpu_b = softirq_secs();
        let secs = t0.elapsed().as_secs_f64();
        let conntrack = bed
            .lab
            .balancer
            .must(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        // Which rules the packets took (pkts column of each DTLS_NAT rule).
        let rule_hits: Vec<u64> = if mode == Mode::Iptables {
            bed.lab
                .balancer
                .must(&["iptables", "-t", "nat", "-L", "DTLS_NAT", "-nvx"])
                .unwrap_or_default()
                .lines()
                .skip(2)
                .filter_map(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
                .collect()
        } else {
            Vec::new()
        };
        let err = tg.stop();
        if err.contains("failed") {
            bail!("trafgen: {}", err.trim());
        }
        let delivered = (s1b - s1a) + (s2b - s2a);
        let cpu_secs = cpu_b - cpu_a;
        let misrouted = (m1b - m1a) + (m2b - m2a);
        let cid_records: u64 = hist(h1a, h1b).iter().chain(hist(h2a, h2b).iter()).sum();
        let per = |a: (u64, u64), b: (u64, u64)| {
            let n = b.1.wrapping_sub(a.1);
            if n > 0 {
                b.0.wrapping_sub(a.0) as f64 / n as f64
            } else {
                0.0
            }
        };
        let napi_ns = napi_b.wrapping_sub(napi_a);
        // The balancer's NAPI thread must have done the forwarding, and the kernel must have
        // counted the program's runs (one per received packet, at least one per delivered).
        if delivered > 0 && napi_ns == 0 {
            bail!("{delivered} packets delivered but lbc's NAPI thread did not run: not threaded?");
        }
        let prog_runs = prog_b.1.wrapping_sub(prog_a.1);
        // The counts are read a moment apart, so packets in flight between the reads differ
        // (578,368 runs for 578,816 delivered was seen): allow 1 %.
        if xdp_mode && prog_runs.saturating_mul(100) < delivered.saturating_mul(99) {
            bail!(
                "{}: the kernel counted {prog_runs} runs of the program on lbc for {delivered} \
                 delivered packets (is BPF_ENABLE_STATS accounting on?)",
                mode.name()
            );
        }
        Ok(json!({
            "part": "throughput", "mode": mode.name(), "payload": payload, "flows": flows, "source_ports": 2 * flows,
            "delivered_pps": delivered as f64 / secs,
            "node1_share": if delivered > 0 { (s1b - s1a) as f64 / delivered as f64 } else { 0.0 },
            // All CPUs' softirq time: with every NAPI threaded, what is left here is not the
            // forwarding (kept for comparison with earlier runs).
            "softirq_cpu": cpu_secs / secs,
            // The balancer's NAPI thread: its share of a CPU, and delivered packets per CPU-second.
            "balancer_cpu": napi_ns as f64 / 1e9 / secs,
            "pkts_per_cpu_sec": if napi_ns > 0 { delivered as f64 / (napi_ns as f64 / 1e9) } else { 0.0 },
            "conntrack": conntrack,
            "prog_ns_per_run": per(prog_a, prog_b),
            "prog_runs": prog_runs,
            "sink_prog_ns_per_run": per(sink_a, sink_b),
            "napi_threads": napi.len(),
            "sink_napi_threads": sink_threads,
            "balancer_ns_per_pkt": if delivered > 0 { napi_ns as f64 / delivered as f64 } else { 0.0 },
            "misrouted": misrouted,
            "misrouted_share": if cid_records > 0 { misrouted as f64 / cid_records as f64 } else { 0.0 },
            "iptables_rule_hits": rule_hits,
            "cid_bytes_at_node1": hist(h1a, h1b),
            "cid_bytes_at_node2": hist(h2a, h2b),
        }))
    })();
    leave(bed, mode, active);
    r
}

pub fn run(effort: Effort) -> Result<Vec<Value>> {
    // The kernel accounts every program's run time while this fd is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("BPF_ENABLE_STATS (run time accounting): {e}"))?;
    let lab = Lab::up(&lb_lab::unique_prefix("tp"), 2).map_err(|e| anyhow!(e))?;
    let b = &lab.balancer;
    // NAPI on the balancer's ingress veth in every mode (GRO), sender without TSO (the lab's
    // client side already has it off).
    b.must(&["ethtool", "-K", "lbc", "gro", "on"])
        .map_err(|e| anyhow!(e))?;
    let macs = Macs {
        c0: mac(&lab.client, "c0")?,
        lbc: mac(b, "lbc")?,
        lbn1: mac(b, "lbn1")?,
        node1: mac(&lab.nodes[0], "n0")?,
    };
    let mut sinks = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let e = inside(n, || -> Result<Ebpf> {
            let mut e = cidlb::testrun::load_bench_object(i as u8 + 1)?;
            attach(&mut e, names::SINK_PROG, "n0")?;
            Ok(e)
        })?;
        sinks.push(e);
    }
    let conf_dir = std::env::temp_dir().join(format!("cidlb-bench-tp-{}", std::process::id()));
    std::fs::create_dir_all(&conf_dir)?;
    let shim = lb_lab::trafgen::build_shim(&conf_dir).map_err(|e| anyhow!(e))?;
    let bed = Bed {
        lab,
        sinks,
        macs,
        shim,
        conf_dir,
        pin_dir: format!("/sys/fs/bpf/cidlb-bench-tp-{}", std::process::id()),
    };
    // Flows per node: each node's records come from their own source ports, so 32,500 per
    // node make 65,000 client source ports in all.
    let (payloads, flow_counts, repeats, window): (&[usize], &[u32], usize, Duration) =
        if effort.full {
            (
                &[64, 512, 1200],
                &[1, 500, 32500],
                5,
                Duration::from_secs(3),
            )
        } else {
            (
                &[64, 512, 1200],
                &[1, 32500],
                3,
                Duration::from_millis(1500),
            )
        };
    // CIDLB_BENCH_MODES=plain,iptables,cidlb,ceiling runs a subset (for looking into one mode).
    let modes: Vec<Mode> = match std::env::var("CIDLB_BENCH_MODES") {
        Ok(list) => Mode::ALL
            .into_iter()
            .filter(|m| {
                list.split(',').any(|x| {
                    m.name().starts_with(x.trim())
                        || format!("{m:?}").eq_ignore_ascii_case(x.trim())
                })
            })
            .collect(),
        Err(_) => Mode::ALL.to_vec(),
    };
    let mut raw: Vec<Value> = Vec::new();
    for rep in 0..repeats {
        for &payload in payloads {
            for &flows in flow_counts {
                for mode in modes.iter().copied() {
                    // A point may fail once in a few dozen (trafgen saw ENETDOWN once, right after
                    // the NAPI threads were switched); retried twice, each failure reported.
                    let mut attempt = 0;
                    let v = loop {
                        attempt += 1;
                        match point(&bed, mode, payload, flows, window) {
                            Ok(v) => break v,
                            Err(e) if attempt < 3 => {
                                eprintln!(
                                    "  {} {payload} B {flows} flows failed, retrying: {e:#}",
                                    mode.name()
                                );
                            }
                            Err(e) => {
                                return Err(e).with_context(|| {
                                    format!("{} {payload} B {flows} flows", mode.name())
                                })
                            }
                        }
                    };
                    eprintln!(
                        "  [{}] {:<18} {payload:>5} B {flows:>6} flows: {:>9.0} pps, balancer CPU {:.2}, {:.0} ns/pkt ({} NAPI threads), prog {:.0} ns/run, conntrack {}",
                        rep + 1,
                        mode.name(),
                        v["delivered_pps"].as_f64().unwrap_or(0.0),
                        v["balancer_cpu"].as_f64().unwrap_or(0.0),
                        v["balancer_ns_per_pkt"].as_f64().unwrap_or(0.0),
                        v["napi_threads"],
                        v["prog_ns_per_run"].as_f64().unwrap_or(0.0),
                        v["conntrack"]
                    );
                    raw.push(v);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&bed.conf_dir);
    // One record per point: median with min-max over the repeats.
    let mut out = Vec::new();
    for &payload in payloads {
        for &flows in flow_counts {
            for mode in modes.iter().copied() {
                let pts: Vec<&Value> = raw
                    .iter()
                    .filter(|r| {
                        r["mode"] == mode.name() && r["payload"] == payload && r["flows"] == flows
                    })
                    .collect();
                let col = |k: &str| {
                    pts.iter()
                        .map(|r| r[k].as_f64().unwrap_or(0.0))
                        .collect::<Vec<_>>()
                };
                let (pps, pps_min, pps_max) = stats(&col("delivered_pps"));
                let (cpu, _, _) = stats(&col("softirq_cpu"));
                let (bal_cpu, _, _) = stats(&col("balancer_cpu"));
                let (per_cpu, per_min, per_max) = stats(&col("pkts_per_cpu_sec"));
                let (prog_ns, prog_min, prog_max) = stats(&col("prog_ns_per_run"));
                let (bal_ns, bal_min, bal_max) = stats(&col("balancer_ns_per_pkt"));
                out.push(json!({
                    "part": "throughput", "mode": mode.name(), "payload": payload, "flows": flows, "source_ports": 2 * flows,
                    "delivered_pps": pps, "delivered_pps_min": pps_min, "delivered_pps_max": pps_max,
                    "softirq_cpu": cpu, "balancer_cpu": bal_cpu, "pkts_per_cpu_sec": per_cpu, "pkts_per_cpu_sec_min": per_min, "pkts_per_cpu_sec_max": per_max,
                    "conntrack": pts.iter().map(|r| r["conntrack"].as_u64().unwrap_or(0)).max().unwrap_or(0),
                    "prog_ns_per_run": prog_ns, "prog_ns_min": prog_min, "prog_ns_max": prog_max,
                    "sink_prog_ns_per_run": stats(&col("sink_prog_ns_per_run")).0,
                    "balancer_ns_per_pkt": bal_ns, "balancer_ns_min": bal_min, "balancer_ns_max": bal_max,
                    "napi_threads": pts.iter().map(|r| r["napi_threads"].as_u64().unwrap_or(0)).min().unwrap_or(0),
                    "sink_napi_threads": pts.iter().map(|r| r["sink_napi_threads"].as_u64().unwrap_or(0)).min().unwrap_or(0),
                    "misrouted_share": stats(&col("misrouted_share")).0,
                    "node1_share": stats(&col("node1_share")).0,
                    "repeats": pts.len(),
                    "cid_bytes_at_node1": pts.last().map(|r| r["cid_bytes_at_node1"].clone()),
                    "cid_bytes_at_node2": pts.last().map(|r| r["cid_bytes_at_node2"].clone()),
                }));
            }
        }
    }
    Ok(out)
}
