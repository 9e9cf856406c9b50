//! Per-packet cost in the kernel, per datapath path, with BPF_PROG_TEST_RUN.
//!
//! The kernel runs a program `repeat` times on the same buffer without restoring it. A packet
//! the program rewrites would take another path from the second run on, so the forwarding
//! paths (CID routed, known flow, reply) are measured in shadow mode: parsing, VIP and port
//! lookup, CID decoding, flow table, node lookup and bpf_fib_lookup all run, but the header
//! writes (addresses, ports, checksums, TTL, MACs) and the redirect do not. Pass and drop paths
//! change nothing and run as they are.
//!
//! One frame repeated hits one hot hash bucket and one hot cache line per map, which hides
//! what many clients cost. The growth series therefore also ROTATE over many distinct frames
//! (distinct clients, CIDs naming every node): each frame is one BPF_PROG_TEST_RUN with
//! repeat 1, and the time is the kernel's own per-program accounting (BPF_ENABLE_STATS:
//! run_time_ns / run_cnt, the same figure the lab reads for cidlb and the bare redirect). The
//! floor is rotated over the same frames, in the same rounds, so both carry the accounting's
//! own overhead (two sched_clock reads) alike.
//!
//! A new flow is only measured rotating: every pass takes clients no earlier pass sent, so
//! each frame finds no flow and pins one (one frame repeated is one flow, known from its
//! second run on; the datapath's clock is the coarse one, so not even a 1 ns idle timeout
//! expires it between runs).

use std::{cell::Cell, net::IpAddr, path::Path};

use anyhow::{anyhow, bail, Result};
use aya::maps::HashMap;
use aya::programs::Xdp;
use aya::Ebpf;
use cidlb::{
    config::{limits::Prefix, Config, Encap, Forwarding, Tunnel},
    datapath::Datapath,
    stats::Snapshot,
    testrun,
};
use lb_common::{names, Counter, Flow, FlowKey, FAMILY_V4};
use lb_lab::{
    fib::{CLIENT4, CLIENT_MAC, FXC_MAC, FXN_MAC, VIP4},
    hello::{client_extensions, client_hello, hello_verify_request},
    packet::{cid_record, handshake_record, unified_record, Frame},
    NetNs, PORT,
};
use serde_json::{json, Value};

use crate::{stats, Effort};

/// Node `k`'s address in the bench's 198.18.0.0/16 (RFC 2544 benchmarking range).
fn node_addr(k: u32) -> String {
    format!("198.18.{}.{}", k / 256, k % 256)
}

fn config(nodes: u32, capacity: u32) -> Result<Config> {
    config_with(nodes, capacity, "")
}

/// [`config`] with `extra` YAML appended (e.g. `limits:`).
fn config_with(nodes: u32, capacity: u32, extra: &str) -> Result<Config> {
    let mut y = format!(
        "interfaces: [fxc, fxn]\nvips: [{{address: {VIP4}, ports: [{PORT}]}}]\n\
         dtls: {{cid_length: 6, node_id_offset: 0, node_id_length: 2}}\nnodes:\n",
    );
    for k in 1..=nodes {
        y.push_str(&format!("  - {{id: {k}, address: {}}}\n", node_addr(k)));
    }
    y.push_str(&format!("flows: {{capacity: {capacity}}}\n"));
    y.push_str(extra);
    Config::parse(&y, Path::new("bench.yaml")).map_err(|e| anyhow!("{e}"))
}

/// [`config`] with its VIP in tunnel mode, `encap` from the outer source 198.19.0.1.
fn tunnel_config(nodes: u32, encap: Encap) -> Result<Config> {
    let mut cfg = config(nodes, 65536)?;
    let vip = &mut cfg.vips[0];
    vip.forwarding = Forwarding::Tunnel;
    vip.tunnel = Some(Tunnel {
        encap,
        source4: Some(Prefix::parse("198.19.0.1").map_err(|e| anyhow!(e))?),
        source6: None,
        gue_port: matches!(encap, Encap::Gue).then_some(6080),
        mtu: None,
    });
    Ok(cfg)
}

/// A loaded, provisioned datapath in one of the measuring modes.
fn datapath(cfg: &Config, shadow: bool) -> Result<Datapath> {
    let mut cfg = cfg.clone();
    cfg.shadow = shadow;
    Ok(Datapath::private(&cfg)?)
}

struct Frames {
    cid: Vec<u8>,
    cid13: Vec<u8>,
    hello: Vec<u8>,
    /// The same client's hello from another source port.
    hello_other: Vec<u8>,
    reply: Vec<u8>,
    /// A reply too long for the smallest IPv4 path (over 576 bytes): its node is recorded in
    /// `REPLY_DESTS`, for the ICMP errors about it (a lookup, and a write when the node
    /// changes: never, repeated).
    reply_long: Vec<u8>,
    /// Node 1's HelloVerifyRequest to the client, and the client's ClientHello echoing it.
    reply_hvr: Vec<u8>,
    hello_cookie: Vec<u8>,
    other_port: Vec<u8>,
    malformed: Vec<u8>,
}

/// A node's cookie, as long as Mbed TLS's.
const COOKIE: [u8; 28] = [0x5c; 28];

fn frames() -> Frames {
    let client = |dport: u16, payload: &[u8]| {
        Frame::udp(
            CLIENT_MAC,
            FXC_MAC,
            lb_lab::ip(CLIENT4),
            40000,
            lb_lab::ip(VIP4),
            dport,
            payload,
        )
        .bytes()
    };
    // From node 1's own MAC (its neighbour entry in `add_nodes`): the datapath un-NATs only
    // replies that arrive from the node's next hop.
    let node1_reply = |payload: &[u8]| {
        Frame::udp(
            [2, 0, 0, 1, 0, 1],
            FXN_MAC,
            lb_lab::ip(&node_addr(1)),
            PORT,
            lb_lab::ip(CLIENT4),
            40000,
            payload,
        )
        .bytes()
    };
    let body = [0xabu8; 64];
    Frames {
        cid: client(PORT, &cid_record(&[0, 1, 0xa1, 0xa2, 0xa3, 0xa4], &body)),
        cid13: client(
            PORT,
            &unified_record(Some(&[0, 1, 0xa1, 0xa2, 0xa3, 0xa4]), true, true, &body),
        ),
        hello: client(PORT, &handshake_record(&body)),
        hello_other: Frame::udp(
            CLIENT_MAC,
            FXC_MAC,
            lb_lab::ip(CLIENT4),
            40001,
            lb_lab::ip(VIP4),
            PORT,
            &handshake_record(&body),
        )
        .bytes(),
        reply: node1_reply(&body),
        reply_long: node1_reply(&[0xab; 1000]),
        reply_hvr: node1_reply(&hello_verify_request([0xfe, 0xfd], &COOKIE).record()),
        hello_cookie: client(
            PORT,
            &client_hello(&[], &COOKIE, &client_extensions(32)).record(),
        ),
        // Not ours: an address no VIP has (a VIP's other ports are dropped since they would
        // loop, `drop_vip_other_port`; the path timed here is traffic passing the balancer).
        other_port: Frame::udp(
            CLIENT_MAC,
            FXC_MAC,
            lb_lab::ip(CLIENT4),
            40000,
            lb_lab::ip("192.0.2.99"),
            9999,
            &body,
        )
        .bytes(),
        malformed: client(PORT, &cid_record(&[0, 1, 0xa1], b"")),
    }
}

/// Adds the bench nodes' subnet and a permanent neighbour for each, so FIB lookups succeed,
/// and a route to the rotating clients (10.0.0.0/8, see [`clients`]) via the client router.
fn add_nodes(ns: &NetNs, nodes: u32) -> Result<()> {
    ns.ip("addr add 198.18.255.254/16 dev fxn")
        .map_err(|e| anyhow!(e))?;
    ns.ip(&format!("route add 10.0.0.0/8 via {CLIENT4} dev fxc"))
        .map_err(|e| anyhow!(e))?;
    let mut batch = String::new();
    for k in 1..=nodes {
        batch.push_str(&format!(
            "neigh replace {} lladdr 02:00:00:01:{:02x}:{:02x} nud permanent dev fxn\n",
            node_addr(k),
            k / 256,
            k % 256
        ));
    }
    let file = std::env::temp_dir().join(format!("cidlb-bench-neigh-{}", std::process::id()));
    std::fs::write(&file, batch)?;
    let r = lb_lab::run(
        "ip",
        &["-n", &ns.name, "-batch", file.to_str().expect("utf-8")],
    );
    let _ = std::fs::remove_file(&file);
    r.map(|_| ()).map_err(|e| anyhow!(e))
}

/// Fills the flow table with `n` flows that no bench packet matches.
fn prefill(dp: &mut Datapath, n: u64) -> Result<()> {
    let map = dp
        .ebpf
        .map_mut(names::FLOWS)
        .ok_or_else(|| anyhow!("no FLOWS"))?;
    let mut flows: HashMap<_, FlowKey, Flow> = HashMap::try_from(map)?;
    for i in 0..n {
        let key = FlowKey {
            src: [
                u32::from_ne_bytes([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                0,
                0,
                0,
            ],
            dst: [u32::from_ne_bytes(lb_lab::VIP4.octets()), 0, 0, 0],
            sport: (1024 + (i % 60000) as u16).to_be(),
            dport: PORT.to_be(),
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        let flow = Flow {
            node_id: 1,
            _pad: 0,
            last_seen_ns: 0,
        };
        flows.insert(key, flow, 0)?;
    }
    Ok(())
}

use lb_common::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT};

/// What a path must do, checked before it is timed: its action, and exactly which counters one
/// packet moves (each by one). A frame that took another path fails the bench instead of
/// being timed under this path's name.
#[derive(Clone, Copy)]
struct Expect {
    action: u32,
    counters: &'static [Counter],
}

/// The empty program touches no map.
const FLOOR: Expect = Expect {
    action: XDP_PASS,
    counters: &[],
};
const CID_ROUTED: Expect = Expect {
    action: XDP_PASS,
    counters: &[
        Counter::PacketsSeen,
        Counter::CidRouted,
        Counter::ShadowPass,
    ],
};
const CID13_ROUTED: Expect = Expect {
    action: XDP_PASS,
    counters: &[
        Counter::PacketsSeen,
        Counter::Cid13Routed,
        Counter::ShadowPass,
    ],
};
/// Rewritten and redirected for real (rotating: every run starts from the frame as sent).
const CID_FORWARDED: Expect = Expect {
    action: XDP_REDIRECT,
    counters: &[
        Counter::PacketsSeen,
        Counter::CidRouted,
        Counter::FwdRedirect,
    ],
};
const CID_TUNNEL_IPIP: Expect = Expect {
    action: XDP_REDIRECT,
    counters: &[
        Counter::PacketsSeen,
        Counter::CidRouted,
        Counter::FwdRedirect,
        Counter::TunnelEncapIpip,
    ],
};
const CID_TUNNEL_GUE: Expect = Expect {
    action: XDP_REDIRECT,
    counters: &[
        Counter::PacketsSeen,
        Counter::CidRouted,
        Counter::FwdRedirect,
        Counter::TunnelEncapGue,
    ],
};
/// A client no earlier pass sent: no flow yet, so one is pinned.
const NEW_FLOW: Expect = Expect {
    action: XDP_PASS,
    counters: &[Counter::PacketsSeen, Counter::FlowNew, Counter::ShadowPass],
};
const KNOWN_FLOW: Expect = Expect {
    action: XDP_PASS,
    counters: &[Counter::PacketsSeen, Counter::FlowHit, Counter::ShadowPass],
};
/// Over the per-source limit: dropped before the flow table (shadow mode decides after).
const OVER_LIMIT: Expect = Expect {
    action: XDP_DROP,
    counters: &[Counter::PacketsSeen, Counter::DropLimitSource],
};
/// Limits that never refuse (a token per nanosecond), to time the buckets' cost.
const LIMITS_OPEN: &str =
    "limits: {new_flows_per_source: \"4294967296/1ms\", new_flows: \"4294967296/1ms\"}\n";
/// Limits that refuse every new flow after the first.
const LIMITS_SHUT: &str = "limits: {new_flows_per_source: \"1/1h\", burst: 1}\n";
const REPLY: Expect = Expect {
    action: XDP_PASS,
    counters: &[
        Counter::PacketsSeen,
        Counter::ReplyUnnat,
        Counter::ShadowPass,
    ],
};
/// A HelloVerifyRequest's cookie learned on the way (global limit on).
const REPLY_HVR: Expect = Expect {
    action: XDP_PASS,
    counters: &[
        Counter::PacketsSeen,
        Counter::ReplyUnnat,
        Counter::ShadowPass,
        Counter::CookieLearned,
    ],
};
/// A ClientHello of a known flow echoing a learned cookie: its source proven.
const HELLO_COOKIE: Expect = Expect {
    action: XDP_PASS,
    counters: &[
        Counter::PacketsSeen,
        Counter::FlowHit,
        Counter::ShadowPass,
        Counter::KnownSrcProven,
    ],
};
const NOT_VIP: Expect = Expect {
    action: XDP_PASS,
    counters: &[Counter::PacketsSeen, Counter::PassNotVip],
};
const MALFORMED: Expect = Expect {
    action: XDP_DROP,
    counters: &[Counter::PacketsSeen, Counter::DropCidTruncated],
};

struct Case<'a> {
    path: &'static str,
    how: &'static str,
    ebpf: &'a Ebpf,
    program: &'static str,
    frame: &'a [u8],
    ingress: u32,
    expect: Expect,
    samples: Vec<f64>,
}

impl<'a> Case<'a> {
    fn new(
        (path, how, expect): (&'static str, &'static str, Expect),
        ebpf: &'a Ebpf,
        program: &'static str,
        frame: &'a [u8],
        ingress: u32,
    ) -> Self {
        Case {
            path,
            how,
            ebpf,
            program,
            frame,
            ingress,
            expect,
            samples: Vec::new(),
        }
    }

    /// Runs the frame once to settle state (a known flow needs its first packet), then once
    /// more, and checks that run's action and counter changes against [`Expect`].
    fn verify(&self) -> Result<()> {
        let run = |repeat| {
            testrun::run_program(self.ebpf, self.program, self.frame, self.ingress, repeat)
        };
        run(1)?;
        // The floor lives in the bench object, which has no counters.
        let snap = || -> Result<Option<Snapshot>> {
            Ok(match self.expect.counters {
                [] => None,
                _ => Some(Snapshot::from_ebpf(self.ebpf)?),
            })
        };
        let before = snap()?;
        let r = run(1)?;
        let after = snap()?;
        let moved: Vec<(Counter, u64)> = Counter::ALL
            .iter()
            .map(|&c| match (&before, &after) {
                (Some(b), Some(a)) => (c, a.get(c).wrapping_sub(b.get(c))),
                _ => (c, 0),
            })
            .filter(|&(_, d)| d != 0)
            .collect();
        let mut want: Vec<(Counter, u64)> = self.expect.counters.iter().map(|&c| (c, 1)).collect();
        want.sort_by_key(|&(c, _)| c as u32);
        if r.action != self.expect.action || moved != want {
            let names = |v: &[(Counter, u64)]| {
                v.iter()
                    .map(|(c, d)| format!("{}+{d}", c.name()))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            bail!(
                "path {:?} ({}): the frame took another path: action {} (want {}), counters [{}] \
                 (want [{}]); not timing it under this name",
                self.path,
                self.how,
                r.action,
                self.expect.action,
                names(&moved),
                names(&want),
            );
        }
        Ok(())
    }
}

/// A path the bench times: checked once, then sampled round after round.
trait Timed {
    /// Fails unless the path takes its action and moves exactly its counters.
    fn verify(&self) -> Result<()>;
    /// One timing sample, in ns per packet.
    fn sample(&self, effort: Effort) -> Result<f64>;
    fn samples(&mut self) -> &mut Vec<f64>;
}

impl Timed for Case<'_> {
    fn verify(&self) -> Result<()> {
        Case::verify(self)
    }

    fn sample(&self, effort: Effort) -> Result<f64> {
        let r = testrun::run_program(
            self.ebpf,
            self.program,
            self.frame,
            self.ingress,
            effort.repeat,
        )?;
        if r.action != self.expect.action {
            bail!(
                "path {:?}: action {} while timing, {} when checked",
                self.path,
                r.action,
                self.expect.action
            );
        }
        Ok(r.per_run.as_nanos() as f64)
    }

    fn samples(&mut self) -> &mut Vec<f64> {
        &mut self.samples
    }
}

/// Checks every case's path, then times them interleaved, `effort.rounds` samples each, so
/// drift hits all of them alike.
fn measure<T: Timed>(cases: &mut [T], effort: Effort) -> Result<()> {
    for c in cases.iter() {
        c.verify()?;
    }
    for _ in 0..effort.rounds {
        for c in cases.iter_mut() {
            let ns = c.sample(effort)?;
            c.samples().push(ns);
        }
    }
    Ok(())
}

fn record(c: &Case<'_>, floor: f64, nodes: u32, flows: u64, effort: Effort) -> Value {
    let (med, min, max) = stats(&c.samples);
    json!({
        "part": "prog", "path": c.path, "how": c.how, "nodes": nodes, "flows": flows,
        "median_ns": med, "min_ns": min, "max_ns": max,
        "ratio_to_floor": if floor > 0.0 { med / floor } else { 0.0 },
        "repeat": effort.repeat, "rounds": effort.rounds,
    })
}

/// Fewest runs in one rotating pass: a series point with a single client still averages over
/// this many runs.
const MIN_RUNS: usize = 4096;

/// A path measured by rotating over `frames`, timed by the kernel's run-time accounting.
struct Rotation<'a> {
    path: &'static str,
    ebpf: &'a Ebpf,
    program: &'static str,
    frames: &'a [Vec<u8>],
    /// `Some(n)`: every pass takes the next `n` frames, never sent before (new flows);
    /// `None`: every pass sends all of `frames`.
    fresh: Option<usize>,
    passes: Cell<usize>,
    ingress: u32,
    expect: Expect,
    samples: Vec<f64>,
}

impl<'a> Rotation<'a> {
    fn new(
        path: &'static str,
        (ebpf, program): (&'a Ebpf, &'static str),
        frames: &'a [Vec<u8>],
        ingress: u32,
        expect: Expect,
    ) -> Self {
        Rotation {
            path,
            ebpf,
            program,
            frames,
            fresh: None,
            passes: Cell::new(0),
            ingress,
            expect,
            samples: Vec::new(),
        }
    }

    /// Each pass sends `n` frames none of the earlier passes sent.
    fn fresh(mut self, n: usize) -> Self {
        self.fresh = Some(n);
        self
    }

    /// The frames of the next pass (a pass runs at least [`MIN_RUNS`] frames: fewer distinct
    /// ones are sent round and round).
    fn next_frames(&self) -> Result<&'a [Vec<u8>]> {
        let k = self.passes.get();
        self.passes.set(k + 1);
        match self.fresh {
            None => Ok(self.frames),
            Some(n) => self.frames.get(k * n..(k + 1) * n).ok_or_else(|| {
                anyhow!(
                    "rotating {:?}: no unsent frames left for pass {}",
                    self.path,
                    k + 1
                )
            }),
        }
    }
}

/// The program's run time and run count so far (BPF_OBJ_GET_INFO_BY_FD; counted while
/// BPF_ENABLE_STATS is on).
fn prog_stats(ebpf: &Ebpf, program: &str) -> Result<(u64, u64)> {
    let p: &Xdp = ebpf
        .program(program)
        .ok_or_else(|| anyhow!("no program {program}"))?
        .try_into()?;
    let info = p.info()?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

impl Rotation<'_> {
    /// One pass over every frame; ns per run from the kernel's accounting. Fails if the
    /// kernel did not count exactly one run per frame (accounting off, or another user of
    /// the program) or a frame took another action.
    fn pass(&self) -> Result<f64> {
        let distinct = self.next_frames()?;
        let runs_wanted = distinct.len().max(MIN_RUNS);
        let frames = || distinct.iter().cycle().take(runs_wanted);
        let (t0, n0) = prog_stats(self.ebpf, self.program)?;
        for frame in frames() {
            let r = testrun::run_program(self.ebpf, self.program, frame, self.ingress, 1)?;
            if r.action != self.expect.action {
                bail!(
                    "rotating {:?}: action {} (want {})",
                    self.path,
                    r.action,
                    self.expect.action
                );
            }
        }
        let (t1, n1) = prog_stats(self.ebpf, self.program)?;
        let runs = n1.wrapping_sub(n0);
        if runs != runs_wanted as u64 {
            bail!(
                "rotating {:?}: the kernel counted {runs} runs for {runs_wanted} frames (is \
                 kernel.bpf_stats_enabled accounting on?)",
                self.path,
            );
        }
        Ok(t1.wrapping_sub(t0) as f64 / runs as f64)
    }

    /// A settling pass (a known flow needs its first packet), then a checked one: every frame
    /// takes the path's action and each of the path's counters moves once per frame, no other.
    fn verify(&self) -> Result<()> {
        self.pass()?;
        let snap = || -> Result<Option<Snapshot>> {
            Ok(match self.expect.counters {
                [] => None,
                _ => Some(Snapshot::from_ebpf(self.ebpf)?),
            })
        };
        let before = snap()?;
        self.pass()?;
        let after = snap()?;
        let n = self.fresh.unwrap_or(self.frames.len()).max(MIN_RUNS) as u64;
        for &c in Counter::ALL {
            let moved = match (&before, &after) {
                (Some(b), Some(a)) => a.get(c).wrapping_sub(b.get(c)),
                _ => 0,
            };
            let want = if self.expect.counters.contains(&c) {
                n
            } else {
                0
            };
            if moved != want {
                bail!(
                    "rotating {:?}: counter {} moved {moved} over {n} frames, want {want}; not \
                     timing it under this name",
                    self.path,
                    c.name()
                );
            }
        }
        Ok(())
    }
}

impl Timed for Rotation<'_> {
    fn verify(&self) -> Result<()> {
        Rotation::verify(self)
    }

    fn sample(&self, _: Effort) -> Result<f64> {
        self.pass()
    }

    fn samples(&mut self) -> &mut Vec<f64> {
        &mut self.samples
    }
}

/// Rotating client `i`'s address, in 10.0.0.0/8.
fn client_addr(i: u64) -> IpAddr {
    IpAddr::from([10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

/// Rotating client `i`'s source port.
fn client_port(i: u64) -> u16 {
    1024 + (i % 60000) as u16
}

/// `n` distinct clients (source address and port) sending `payload(i)` to the VIP.
fn clients(n: u64, payload: impl Fn(u64) -> Vec<u8>) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            Frame::udp(
                CLIENT_MAC,
                FXC_MAC,
                client_addr(i),
                client_port(i),
                lb_lab::ip(VIP4),
                PORT,
                &payload(i),
            )
            .bytes()
        })
        .collect()
}

/// A CID record naming node `1 + i % nodes`.
fn cid_for(nodes: u32) -> impl Fn(u64) -> Vec<u8> {
    move |i| {
        let node = 1 + (i % u64::from(nodes)) as u16;
        let [a, b] = node.to_be_bytes();
        cid_record(&[a, b, 0xa1, 0xa2, 0xa3, i as u8], &[0xab; 64])
    }
}

fn hello(_: u64) -> Vec<u8> {
    handshake_record(&[0xab; 64])
}

fn rotation_records(
    cases: &[Rotation<'_>],
    series: &str,
    nodes: u32,
    flows: u64,
    effort: Effort,
) -> Vec<Value> {
    let floor = stats(&cases[0].samples).0;
    cases
        .iter()
        .map(|c| {
            let (med, min, max) = stats(&c.samples);
            json!({
                "part": "prog", "series": series, "path": c.path, "how": "rotating, bpf_stats",
                "nodes": nodes, "flows": flows, "frames": c.fresh.unwrap_or(c.frames.len()),
                "median_ns": med, "min_ns": min, "max_ns": max,
                "ratio_to_floor": if floor > 0.0 { med / floor } else { 0.0 },
                "rounds": effort.rounds,
            })
        })
        .collect()
}

/// The growth series, rotating over distinct frames and timed by the kernel's accounting.
/// The cidlb program of a loaded datapath, for [`Rotation::new`].
fn prog(dp: &Datapath) -> (&Ebpf, &'static str) {
    (&dp.ebpf, names::PROGRAM)
}

fn run_rotating(ifs: &[u32], effort: Effort, out: &mut Vec<Value>) -> Result<()> {
    let (fxc, fxn) = (ifs[0], ifs[1]);
    // Held for the whole part: the kernel accounts run time while this fd is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("BPF_ENABLE_STATS (run time accounting): {e}"))?;
    let floor_object = testrun::load_floor()?;
    let floor = (&floor_object, names::FLOOR);
    const CLIENTS: usize = 4096;
    // New flows: a settling and a checked pass, then one pass per round, each of clients no
    // pass sent before (the flow tables below hold them all).
    let new = clients(((effort.rounds + 2) * CLIENTS) as u64, hello);
    // Nodes: CID records naming every node in turn, and new flows from as many clients.
    for nodes in [2u32, 16, 64, 256] {
        let cfg = config(nodes, 65536)?;
        let shadow = datapath(&cfg, true)?;
        let nat = datapath(&cfg, false)?;
        let ipip = datapath(&tunnel_config(nodes, Encap::Ipip)?, false)?;
        let gue = datapath(&tunnel_config(nodes, Encap::Gue)?, false)?;
        let limited = datapath(&config_with(nodes, 65536, LIMITS_OPEN)?, true)?;
        let cid = clients(CLIENTS as u64, cid_for(nodes));
        let mut cases = vec![
            Rotation::new("empty program (floor)", floor, &cid, fxc, FLOOR),
            Rotation::new("CID record routed", prog(&shadow), &cid, fxc, CID_ROUTED),
            // Forwarded for real, NAT and tunnel mode side by side (issue #20's ≤ 1.3×).
            Rotation::new(
                "CID record forwarded, NAT",
                prog(&nat),
                &cid,
                fxc,
                CID_FORWARDED,
            ),
            Rotation::new(
                "CID record forwarded, tunnel ipip",
                prog(&ipip),
                &cid,
                fxc,
                CID_TUNNEL_IPIP,
            ),
            Rotation::new(
                "CID record forwarded, tunnel gue",
                prog(&gue),
                &cid,
                fxc,
                CID_TUNNEL_GUE,
            ),
            Rotation::new("new flow", prog(&shadow), &new, fxc, NEW_FLOW).fresh(CLIENTS),
            Rotation::new("new flow, limits on", prog(&limited), &new, fxc, NEW_FLOW)
                .fresh(CLIENTS),
        ];
        measure(&mut cases, effort)?;
        out.extend(rotation_records(
            &cases,
            "rotate_nodes",
            nodes,
            CLIENTS as u64,
            effort,
        ));
        eprintln!("  rotating, {nodes} nodes done");
    }
    // Flows: as many distinct clients as flows in the table, each a known flow.
    let mut sizes = vec![1u64, 1_000, 100_000];
    if effort.max_flows >= 1_000_000 {
        sizes.push(1_000_000);
    }
    for flows in sizes {
        let cfg = config(2, (2 * flows).max(4096) as u32)?;
        let shadow = datapath(&cfg, true)?;
        let plain = datapath(&cfg, false)?;
        let known = clients(flows, hello);
        // Not ours: the same clients to an address no VIP has.
        let other: Vec<Vec<u8>> = (0..flows)
            .map(|i| {
                Frame::udp(
                    CLIENT_MAC,
                    FXC_MAC,
                    client_addr(i),
                    client_port(i),
                    lb_lab::ip("192.0.2.99"),
                    9999,
                    &[0xab; 64],
                )
                .bytes()
            })
            .collect();
        let cid = clients(flows, cid_for(2));
        // Node 1 answering each of those clients, from its own MAC.
        let replies: Vec<Vec<u8>> = (0..flows)
            .map(|i| {
                Frame::udp(
                    [2, 0, 0, 1, 0, 1],
                    FXN_MAC,
                    lb_lab::ip(&node_addr(1)),
                    PORT,
                    client_addr(i),
                    client_port(i),
                    &[0xab; 64],
                )
                .bytes()
            })
            .collect();
        let mut cases = vec![
            Rotation::new("empty program (floor)", floor, &cid, fxc, FLOOR),
            Rotation::new("known flow", prog(&shadow), &known, fxc, KNOWN_FLOW),
            Rotation::new("reply un-NAT", prog(&shadow), &replies, fxn, REPLY),
            Rotation::new("CID record routed", prog(&shadow), &cid, fxc, CID_ROUTED),
            Rotation::new("non-VIP port, passed", prog(&plain), &other, fxc, NOT_VIP),
        ];
        measure(&mut cases, effort)?;
        out.extend(rotation_records(&cases, "rotate_flows", 2, flows, effort));
        eprintln!("  rotating, {flows} flows done");
    }
    Ok(())
}

pub fn run(effort: Effort) -> Result<Vec<Value>> {
    let ns = lb_lab::fib::netns("bn");
    let max_nodes = 256;
    add_nodes(&ns, max_nodes)?;
    let name = ns.name.clone();
    std::thread::scope(|s| {
        s.spawn(|| {
            lb_lab::enter(&name);
            lb_lab::pin_to_cpu(0);
            run_inside(effort)
        })
        .join()
        .map_err(|_| anyhow!("bench thread panicked"))?
    })
}

fn run_inside(effort: Effort) -> Result<Vec<Value>> {
    let ifs = cidlb::datapath::resolve_interfaces(&["fxc".into(), "fxn".into()])?;
    let (fxc, fxn) = (ifs[0], ifs[1]);
    let f = frames();
    let mut out = Vec::new();

    // The main table: every path at 2 nodes, one flow.
    let cfg = config(2, 4096)?;
    let plain = datapath(&cfg, false)?;
    let floor_object = testrun::load_floor()?;
    let shadow = datapath(&cfg, true)?;
    let open = config_with(2, 4096, LIMITS_OPEN)?;
    let shadow_limited = datapath(&open, true)?;
    let shut = datapath(&config_with(2, 4096, LIMITS_SHUT)?, true)?;
    // The client's one token goes to another of its ports: the timed frame is over the limit
    // from its first run, so it never pins a flow.
    testrun::run_program(&shut.ebpf, names::PROGRAM, &f.hello_other, fxc, 1)?;
    let (prog, floor) = (names::PROGRAM, names::FLOOR);
    let mut cases = vec![
        Case::new(
            ("empty program (floor)", "XDP_PASS only", FLOOR),
            &floor_object,
            floor,
            &f.cid,
            fxc,
        ),
        Case::new(
            ("CID record routed", "shadow", CID_ROUTED),
            &shadow.ebpf,
            prog,
            &f.cid,
            fxc,
        ),
        Case::new(
            ("DTLS 1.3 CID record routed", "shadow", CID13_ROUTED),
            &shadow.ebpf,
            prog,
            &f.cid13,
            fxc,
        ),
        Case::new(
            ("known flow", "shadow", KNOWN_FLOW),
            &shadow.ebpf,
            prog,
            &f.hello,
            fxc,
        ),
        Case::new(
            ("known flow, limits on", "shadow", KNOWN_FLOW),
            &shadow_limited.ebpf,
            prog,
            &f.hello,
            fxc,
        ),
        Case::new(
            (
                "new flow over the limit, dropped",
                "as is (dropped before the flow table)",
                OVER_LIMIT,
            ),
            &shut.ebpf,
            prog,
            &f.hello,
            fxc,
        ),
        Case::new(
            ("reply un-NAT", "shadow", REPLY),
            &shadow.ebpf,
            prog,
            &f.reply,
            fxn,
        ),
        Case::new(
            ("reply un-NAT, 1,000 bytes (REPLY_DESTS)", "shadow", REPLY),
            &shadow.ebpf,
            prog,
            &f.reply_long,
            fxn,
        ),
        Case::new(
            ("reply un-NAT, limits on", "shadow", REPLY),
            &shadow_limited.ebpf,
            prog,
            &f.reply,
            fxn,
        ),
        // Before the ClientHello below: its cookie is learned here.
        Case::new(
            (
                "reply un-NAT, HelloVerifyRequest learned",
                "shadow",
                REPLY_HVR,
            ),
            &shadow_limited.ebpf,
            prog,
            &f.reply_hvr,
            fxn,
        ),
        Case::new(
            (
                "known flow, ClientHello echoing a cookie",
                "shadow",
                HELLO_COOKIE,
            ),
            &shadow_limited.ebpf,
            prog,
            &f.hello_cookie,
            fxc,
        ),
        Case::new(
            ("non-VIP port, passed", "as is", NOT_VIP),
            &plain.ebpf,
            prog,
            &f.other_port,
            fxc,
        ),
        Case::new(
            ("malformed CID record, dropped", "as is", MALFORMED),
            &plain.ebpf,
            prog,
            &f.malformed,
            fxc,
        ),
    ];
    measure(&mut cases, effort)?;
    let floor_ns = stats(&cases[0].samples).0;
    for c in &cases {
        out.push(record(c, floor_ns, 2, 1, effort));
    }
    eprintln!("  paths done (floor {floor_ns:.0} ns)");

    // Growth with the number of nodes.
    for nodes in [2u32, 16, 64, 256] {
        let cfg = config(nodes, 4096)?;
        let shadow = datapath(&cfg, true)?;
        let mut cases = vec![Case::new(
            ("CID record routed", "shadow", CID_ROUTED),
            &shadow.ebpf,
            prog,
            &f.cid,
            fxc,
        )];
        measure(&mut cases, effort)?;
        for c in &cases {
            let mut r = record(c, floor_ns, nodes, 1, effort);
            r["series"] = json!("nodes");
            out.push(r);
        }
        eprintln!("  {nodes} nodes done");
    }

    // Growth with the number of flows in the table.
    let mut sizes = vec![1u64, 1_000, 100_000];
    if effort.max_flows >= 1_000_000 {
        sizes.push(1_000_000);
    }
    for flows in sizes {
        let cfg = config(2, (2 * flows).max(4096) as u32)?;
        let mut shadow = datapath(&cfg, true)?;
        prefill(&mut shadow, flows.saturating_sub(1))?;
        let mut cases = vec![
            Case::new(
                ("known flow", "shadow", KNOWN_FLOW),
                &shadow.ebpf,
                prog,
                &f.hello,
                fxc,
            ),
            Case::new(
                ("CID record routed", "shadow", CID_ROUTED),
                &shadow.ebpf,
                prog,
                &f.cid,
                fxc,
            ),
        ];
        measure(&mut cases, effort)?;
        for c in &cases {
            let mut r = record(c, floor_ns, 2, flows, effort);
            r["series"] = json!("flows");
            out.push(r);
        }
        eprintln!("  {flows} flows done");
    }
    run_rotating(&ifs, effort, &mut out)?;
    Ok(out)
}
