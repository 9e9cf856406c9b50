//! `cargo xtask fuzz [--packets N] [--seed S]`: differential fuzzing of the XDP datapath.
//!
//! Frames (see `gen.rs`) run through the loaded program (BPF_PROG_TEST_RUN, on one pinned CPU,
//! in a namespace of its own whose routes and neighbours are fixed) and through lb-reference,
//! which is given the maps as provisioned and that namespace's FIB. Action, output frame, every
//! counter and every per-node counter must agree. On the first disagreement it prints the frame
//! (hex), both results, and exits 1.
//!
//! What the reference cannot know is held still: one CPU (round-robin cursors, the global
//! limit bucket's share), a fresh datapath every `--epoch` packets with a flow table four times
//! larger and limit maps (`SRC_BUCKETS`, `KNOWN_SRCS`, `COOKIES`) at least twice as large
//! (nothing evicted), a one-hour idle timeout and `known_for` (nothing expires). The precise clock the
//! limits read is known as a window around each run, and the kernel's limit verdict and
//! buckets must fit an instant inside it. The reference builds the Maglev tables and derives
//! `LIMIT_CFG` itself; both are compared with the agent's after every load and reload.
//! `COOKIES` (learned cookies, pending ClientHello walks) is compared with the reference's
//! where `KNOWN_SRCS` is, and after every limits-config frame that starts with a handshake
//! record; the reference hashes with the `COOKIE_KEY` the agent wrote.

mod fibns;
mod gen;
mod kernel;

use std::{process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use cidlb::config::Config;
use clap::Parser;
use lb_common::Counter;
use lb_reference::{limit, maglev, Outcome, State};
use std::collections::HashSet;

#[derive(Parser)]
#[command(
    name = "cidlb-fuzz",
    about = "Differential fuzzing of the cidlb datapath against lb-reference"
)]
struct Cli {
    /// Frames to run through both (frames too short to run are not counted).
    #[arg(long, default_value_t = 100_000)]
    packets: u64,
    /// Seed: the same seed gives the same frames, configs and results.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Frames per loaded datapath (each epoch loads a fresh one, with the next config).
    #[arg(long, default_value_t = 20_000)]
    epoch: u64,
    /// Instead of fuzzing: run this one frame (hex) through a fresh datapath of config
    /// `--config` arriving on `--ingress`, and print both results.
    #[arg(long)]
    replay: Option<String>,
    #[arg(long, default_value = "fxc")]
    ingress: String,
    /// Index of the config (0..8) for `--replay`.
    #[arg(long, default_value_t = 0)]
    config: usize,
}

/// A reload in the middle of a limits config's epoch (node and VIP churn): the `vips:`, body
/// and `limits:` it changes to.
struct Churn {
    what: &'static str,
    vips: &'static str,
    body: &'static str,
    limits: &'static str,
}

/// One config the epochs cycle through. Without `churn`, a reload half-way disables its first
/// node ([`reloaded`]); with it, the reloads are spread evenly over the epoch.
struct FuzzConfig {
    name: &'static str,
    /// `flows.policy`, or "" for the default.
    policy: &'static str,
    /// `vips:` entries, or "" for the two default VIPs.
    vips: &'static str,
    body: &'static str,
    /// `limits:` (a flow mapping), or "" for none.
    limits: &'static str,
    churn: &'static [Churn],
    /// Which stream of the seed its frames come from.
    frames: Frames,
}

/// The frame streams of a seed (`gen::Stream`): each config family draws from its own, so
/// adding configs of one family leaves the frames of the others as they were.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Frames {
    /// `Stream::new`: every kind of frame around the balancer.
    Plain,
    /// `Stream::with_limits`: half of it clients from few sources, and the cookie exchange.
    Limits,
    /// `Stream::with_tunnels`: half of it clients of the tunnel and NAT VIPs side by side.
    Tunnels,
}

const DEFAULT_VIPS: &str = "  - {address: 192.0.2.10, ports: [5684, \"20000-20100\"]}\n  - {address: \"2001:db8:ffff::10\", ports: [5684]}\n";
const CHURN_VIPS_ADDED: &str = "  - {address: 192.0.2.10, ports: [5684, \"20000-20100\"]}\n  - {address: \"2001:db8:ffff::10\", ports: [5684]}\n  - {address: 192.0.2.11, ports: [5685, 30000]}\n";
const CHURN_VIPS_V6_GONE: &str = "  - {address: 192.0.2.10, ports: [5684, \"20000-20100\"]}\n  - {address: 192.0.2.11, ports: [5685, 30000]}\n";

const LIMITS_BOTH: &str = r#"{new_flows_per_source: "50/1s", burst: 4, new_flows: "4000/1s", global_burst: 40, known_reserve: 50, known_for: 1h, exempt: [100.64.0.0/10, "2001:db8:cafe::/48"]}"#;
const LIMITS_GLOBAL: &str =
    r#"{new_flows: "2000/1s", global_burst: 20, known_reserve: 80, known_for: 1h}"#;

/// The configs the epochs cycle through. Node 3 has no neighbour entry; node 4 is disabled
/// (its CID records follow `unknown_node`); node 5 sits on the client side (one-armed, XDP_TX)
/// and is draining; node 2 listens on another port. Between them they cover both policies
/// (Maglev by default and by name) and `dtls.versions` [1.2], [1.3], both and absent. Configs
/// 5 and 6 have `limits:` (tight buckets, exempt prefixes some generated sources fall in) and
/// node and VIP churn; 7 and 8 put VIPs in tunnel mode beside NAT VIPs (8 with reloads that
/// switch their forwarding). Each family's frames come from a stream of its own ([`Frames`]),
/// so the other configs see the frames they saw before the limits and tunnel configs existed.
const CONFIGS: &[FuzzConfig] = &[
    FuzzConfig {
        name: "one-byte ids, unknown_node drop, round robin, DTLS 1.2 and 1.3",
        policy: "round_robin",
        vips: "",
        body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"], port: 5700}
  - {id: 3, address: [203.0.113.13, "2001:db8:1::13"]}
  - {id: 4, address: 203.0.113.14, state: disabled}
  - {id: 5, address: 198.51.100.50, state: draining}
"#,
        limits: "",
        churn: &[],
        frames: Frames::Plain,
    },
    FuzzConfig {
        name: "two-byte ids at offset 2, unknown_node flow, maglev, DTLS 1.2 only",
        policy: "maglev",
        vips: "",
        body: r#"
dtls: {cid_length: 8, node_id_offset: 2, node_id_length: 2, unknown_node: flow, versions: ["1.2"]}
nodes:
  - {id: 257, address: [203.0.113.11, "2001:db8:1::11"], weight: 3}
  - {id: 514, address: "2001:db8:1::12"}
  - {id: 771, address: 198.51.100.50}
  - {id: 1028, address: 203.0.113.14, state: disabled}
"#,
        limits: "",
        churn: &[],
        frames: Frames::Plain,
    },
    FuzzConfig {
        name: "four-byte ids, shadow mode, maglev (default), DTLS 1.3 only",
        policy: "",
        vips: "",
        body: r#"
dtls: {cid_length: 4, node_id_offset: 0, node_id_length: 4, unknown_node: drop, versions: ["1.3"]}
shadow: true
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 16909060, address: [203.0.113.12, "2001:db8:1::12"]}
"#,
        limits: "",
        churn: &[],
        frames: Frames::Plain,
    },
    FuzzConfig {
        name: "no IPv6 node takes new flows, maglev (default), dtls.versions absent",
        policy: "",
        vips: "",
        body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], state: draining}
  - {id: 2, address: 203.0.113.12}
"#,
        limits: "",
        churn: &[],
        frames: Frames::Plain,
    },
    FuzzConfig {
        name: "three-byte ids at offset 1, unknown_node flow, maglev, DTLS 1.3 only",
        policy: "maglev",
        vips: "",
        body: r#"
dtls: {cid_length: 5, node_id_offset: 1, node_id_length: 3, unknown_node: flow, versions: ["1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], weight: 2}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: [203.0.113.13, "2001:db8:1::13"]}
  - {id: 5, address: 198.51.100.50}
"#,
        limits: "",
        churn: &[],
        frames: Frames::Plain,
    },
    FuzzConfig {
        name: "limits per source (exempt prefixes) and global, maglev, node and VIP churn",
        policy: "maglev",
        vips: "",
        body: LIMITED_NODES,
        limits: LIMITS_BOTH,
        churn: &[
            Churn {
                what: "node 6 and VIP 192.0.2.11 added",
                vips: CHURN_VIPS_ADDED,
                body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], weight: 2}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: 203.0.113.13, weight: 3}
  - {id: 6, address: [203.0.113.16, "2001:db8:1::16"]}
"#,
                limits: LIMITS_BOTH,
            },
            Churn {
                what: "node 1 and the IPv6 VIP removed",
                vips: CHURN_VIPS_V6_GONE,
                body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow, versions: ["1.2", "1.3"]}
nodes:
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: 203.0.113.13, weight: 3}
  - {id: 6, address: [203.0.113.16, "2001:db8:1::16"]}
"#,
                limits: LIMITS_BOTH,
            },
            Churn {
                what: "back to the start with burst 6 (the buckets start full)",
                vips: "",
                body: LIMITED_NODES,
                limits: r#"{new_flows_per_source: "50/1s", burst: 6, new_flows: "4000/1s", global_burst: 40, known_reserve: 50, known_for: 1h, exempt: [100.64.0.0/10, "2001:db8:cafe::/48"]}"#,
            },
        ],
        frames: Frames::Limits,
    },
    FuzzConfig {
        name: "limits global only (known_reserve 80), round robin, node and VIP churn",
        policy: "round_robin",
        vips: "",
        body: GLOBAL_NODES,
        limits: LIMITS_GLOBAL,
        churn: &[
            Churn {
                what: "node 7 and VIP 192.0.2.11 added",
                vips: CHURN_VIPS_ADDED,
                body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: ["1.2"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"], weight: 2}
  - {id: 5, address: 198.51.100.50}
  - {id: 7, address: "2001:db8:1::17"}
"#,
                limits: LIMITS_GLOBAL,
            },
            Churn {
                what: "node 2 and the IPv6 VIP removed",
                vips: CHURN_VIPS_V6_GONE,
                body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: ["1.2"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 5, address: 198.51.100.50}
  - {id: 7, address: "2001:db8:1::17"}
"#,
                limits: LIMITS_GLOBAL,
            },
            Churn {
                what: "back to the start with global_burst 30 (the buckets start full)",
                vips: "",
                body: GLOBAL_NODES,
                limits: r#"{new_flows: "2000/1s", global_burst: 30, known_reserve: 80, known_for: 1h}"#,
            },
        ],
        frames: Frames::Limits,
    },
    FuzzConfig {
        name: "tunnel VIPs (ipip IPv4, gue IPv6) beside NAT VIPs, round robin, DTLS 1.2 and 1.3",
        policy: "round_robin",
        vips: TUNNEL_VIPS,
        body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: [203.0.113.13, "2001:db8:1::13"]}
  - {id: 4, address: 203.0.113.14, state: disabled}
  - {id: 5, address: 198.51.100.50, state: draining}
  - {id: 6, address: 100.64.0.9}
"#,
        limits: "",
        churn: &[],
        frames: Frames::Tunnels,
    },
    FuzzConfig {
        name: "tunnel VIPs (gue IPv4 from a /16, ipip IPv6) beside NAT VIPs, maglev, global limit, forwarding churn",
        policy: "maglev",
        vips: TUNNEL_VIPS_SWAPPED,
        body: TUNNEL_NODES,
        limits: LIMITS_LOOSE,
        churn: &[
            Churn {
                what: "IPv4 VIP from gue to ipip, IPv6 VIP to nat",
                vips: TUNNEL_VIPS_CHURNED,
                body: TUNNEL_NODES,
                limits: LIMITS_LOOSE,
            },
            Churn {
                what: "back to the start with node 1 disabled",
                vips: TUNNEL_VIPS_SWAPPED,
                body: r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], weight: 2, state: disabled}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: 203.0.113.13}
  - {id: 5, address: 198.51.100.50}
"#,
                limits: LIMITS_LOOSE,
            },
        ],
        frames: Frames::Tunnels,
    },
];

/// The tunnel configs' VIPs: 192.0.2.10 and 2001:db8:ffff::10 (where most generated client
/// frames go) in tunnel mode, 192.0.2.11 and 2001:db8:ffff::11 in NAT mode. Node 3 has no
/// neighbour entry, node 5 sits on the client side (XDP_TX), node 6 behind the interface
/// cidlb is not attached to.
const TUNNEL_VIPS: &str = r#"  - {address: 192.0.2.10, ports: [5684, "20000-20100"], forwarding: tunnel, tunnel: {encap: ipip, source4: 10.99.0.1, mtu: 1460}}
  - {address: "2001:db8:ffff::10", ports: [5684], forwarding: tunnel, tunnel: {encap: gue, source6: "fd99::/116", gue_port: 6080}}
  - {address: 192.0.2.11, ports: [5684, 5685]}
  - {address: "2001:db8:ffff::11", ports: [5684]}
"#;
const TUNNEL_VIPS_SWAPPED: &str = r#"  - {address: 192.0.2.10, ports: [5684, "20000-20100"], forwarding: tunnel, tunnel: {encap: gue, source4: 10.99.0.0/16, gue_port: 6080}}
  - {address: "2001:db8:ffff::10", ports: [5684], forwarding: tunnel, tunnel: {encap: ipip, source6: "fd99::1", mtu: 1480}}
  - {address: 192.0.2.11, ports: [5684, 5685]}
  - {address: "2001:db8:ffff::11", ports: [5684]}
"#;
/// Two NAT VIPs of one family cannot share a port (replies are un-NATed by node address and
/// port): the IPv6 one the reload turns to NAT takes 5684, the other moves to 5685.
const TUNNEL_VIPS_CHURNED: &str = r#"  - {address: 192.0.2.10, ports: [5684, "20000-20100"], forwarding: tunnel, tunnel: {encap: ipip, source4: 10.99.0.0/24}}
  - {address: "2001:db8:ffff::10", ports: [5684]}
  - {address: 192.0.2.11, ports: [5684, 5685]}
  - {address: "2001:db8:ffff::11", ports: [5685]}
"#;

const TUNNEL_NODES: &str = r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], weight: 2}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: 203.0.113.13}
  - {id: 5, address: 198.51.100.50}
"#;

/// A global limit the tunnel stream never runs dry: it only turns the cookie step on, which a
/// tunnel VIP's packet skips once it is encapsulated.
const LIMITS_LOOSE: &str =
    r#"{new_flows: "100000/1s", global_burst: 5000, known_reserve: 10, known_for: 1h}"#;

const LIMITED_NODES: &str = r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], weight: 2}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: 203.0.113.13, weight: 3}
"#;

const GLOBAL_NODES: &str = r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: ["1.2"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"], weight: 2}
  - {id: 5, address: 198.51.100.50}
"#;

fn config(k: usize) -> Result<(String, Config)> {
    let c = &CONFIGS[k % CONFIGS.len()];
    Ok((
        c.name.to_owned(),
        config_text(c.name, c.policy, c.vips, c.body, c.limits)?,
    ))
}

fn config_text(name: &str, policy: &str, vips: &str, body: &str, limits: &str) -> Result<Config> {
    let mut body = body.to_owned();
    let shadow = body.contains("shadow: true\n");
    body = body.replace("shadow: true\n", "");
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!(", policy: {policy}")
    };
    let vips = if vips.is_empty() { DEFAULT_VIPS } else { vips };
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!("limits: {limits}\n")
    };
    let text = format!(
        "interfaces: [fxc, fxn]\nvips:\n{vips}flows: {{idle_timeout: 1h, capacity: 131072{policy}}}\n{body}{limits}",
    );
    let mut cfg = Config::parse(&text, std::path::Path::new(name))
        .with_context(|| format!("fuzz config {name:?}"))?;
    cfg.shadow = shadow;
    Ok(cfg)
}

/// The reloads of epoch `k`'s config, in order: (what changes, the new config).
fn reloads(k: usize) -> Result<Vec<(String, Config)>> {
    let c = &CONFIGS[k % CONFIGS.len()];
    if c.churn.is_empty() {
        return Ok(reloaded(k)
            .map(|r| vec![("first node disabled".to_owned(), r)])
            .unwrap_or_default());
    }
    c.churn
        .iter()
        .map(|ch| {
            let r = config_text(c.name, c.policy, ch.vips, ch.body, ch.limits)
                .with_context(|| format!("reload {:?}", ch.what))?;
            Ok((ch.what.to_owned(), r))
        })
        .collect()
}

/// The kernel's clock (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC_COARSE, tick resolution)
/// before a frame runs. The kernel reads it a little later, inside the run, and may see the
/// next tick: while any entry is within `MARGIN` (more than a tick at HZ 100) of expiring,
/// wait, so that entry is plainly fresh or plainly stale for both.
fn steady_now(state: &State) -> u64 {
    const MARGIN: u64 = 25_000_000;
    loop {
        let now = monotonic_ns();
        let near = state
            .nexthop
            .values()
            .find(|c| now + MARGIN > c.expires_ns && now < c.expires_ns + MARGIN);
        match near {
            None => return now,
            Some(c) => {
                std::thread::sleep(std::time::Duration::from_nanos(c.expires_ns + MARGIN - now))
            }
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The config of epoch `k` with its first node disabled (a reload in the middle of the epoch:
/// flows pinned to that node are re-pinned, `flow_expired`), if that config is valid.
fn reloaded(k: usize) -> Option<Config> {
    let (_, cfg) = config(k).ok()?;
    let first = cfg.nodes.first()?.id;
    let c = &CONFIGS[k % CONFIGS.len()];
    let body = c.body;
    let line = body
        .lines()
        .find(|l| l.contains(&format!("{{id: {first},")))?;
    let new_line = if line.contains("state:") {
        line.replace("state: draining", "state: disabled")
    } else {
        line.replace('}', ", state: disabled}")
    };
    let text = body.replace(line, &new_line);
    let mut r = config_text(c.name, c.policy, c.vips, &text, c.limits).ok()?;
    r.shadow = cfg.shadow;
    Some(r)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lb_lab::require_root();
    let ns = lb_lab::fib::netns("fz");
    // A thread of its own inside the namespace, on one CPU (per-CPU round-robin cursors and
    // counters).
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            lb_lab::pin_to_cpu(0);
            fuzz(&cli, &ns)
        })
        .join()
        .expect("fuzz thread panicked")
    });
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cidlb-fuzz: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How far the program's read of the precise clock may lie outside the two reads around the
/// run: the vDSO's CLOCK_MONOTONIC and the kernel's NMI-safe copy (`ktime_get_mono_fast_ns`)
/// can differ by a little. Far below every bucket interval here (≥ 500 µs).
const CLOCK_SLACK_NS: u64 = 2_000;

/// `limits:` as the reference takes them (docs/configuration.md keys).
fn settings(cfg: &Config) -> Option<limit::Settings> {
    let l = cfg.limits.as_ref()?;
    let rate = |r: cidlb::config::limits::Rate| limit::Rate {
        count: r.count,
        per_ns: u64::try_from(r.per.as_nanos()).unwrap_or(u64::MAX),
    };
    Some(limit::Settings {
        new_flows_per_source: l.new_flows_per_source.map(rate),
        burst: l.burst,
        new_flows: l.new_flows.map(rate),
        global_burst: l.global_burst,
        known_reserve: l.known_reserve,
        known_for_ns: u64::try_from(l.known_for.as_nanos()).unwrap_or(u64::MAX),
        exempt: l.exempt.iter().map(|p| (p.addr, p.len)).collect(),
    })
}

/// The config's nodes as the reference's Maglev builder takes them.
fn members(cfg: &Config) -> Vec<maglev::Member> {
    cfg.nodes
        .iter()
        .map(|n| maglev::Member {
            id: n.id,
            weight: n.weight,
            families: [n.v4().is_some(), n.v6().is_some()],
            active: format!("{:?}", n.state) == "Active",
        })
        .collect()
}

/// After the agent provisioned `cfg` (a load or a reload): the reference derives the limits
/// and builds the Maglev tables itself, and both must equal what the agent wrote into the
/// kernel. Err(message): a disagreement.
fn provisioned(
    kernel: &kernel::Kernel,
    cfg: &Config,
    tables: &mut lb_reference::Tables,
    mg: &mut maglev::Maglev,
    state: &mut State,
) -> Result<std::result::Result<(), String>> {
    let limits = settings(cfg).and_then(|s| limit::Limits::new(&s));
    let want = limits
        .as_ref()
        .map(limit::Limits::limit_config)
        .unwrap_or_default();
    let got = kernel.limit_config()?;
    if got != want {
        return Ok(Err(format!(
            "LIMIT_CFG: the agent wrote {got:?}, the reference derives {want:?}"
        )));
    }
    // A reload that changes the limits starts every bucket full.
    if tables.limits.as_ref().map(limit::Limits::limit_config) != Some(want) {
        state.limits.refill();
    }
    tables.limits = limits;
    if cfg.flows.policy == cidlb::config::FlowPolicy::Maglev {
        mg.provision(&members(cfg));
    }
    let (k, ctl) = kernel.maglev()?;
    if let Err(e) = mg.compare(&k, ctl) {
        return Ok(Err(e));
    }
    tables.maglev.clone_from(&mg.entries);
    tables.maglev_ctl = mg.ctl;
    Ok(Ok(()))
}

fn counter_index(c: Counter) -> usize {
    Counter::ALL.iter().position(|&x| x == c).unwrap_or(0)
}

/// The precise clock's window for a frame that just ran, and (limits on) what the kernel's
/// limit step left behind for the frame's source, for `lb_reference::limit`.
fn precise(
    kernel: &kernel::Kernel,
    k: &kernel::Run,
    frame: &[u8],
    tables: &lb_reference::Tables,
) -> Result<limit::Precise> {
    let mut p = limit::Precise {
        lo: k.clock.0.saturating_sub(CLOCK_SLACK_NS),
        hi: k.clock.1.saturating_add(CLOCK_SLACK_NS),
        kernel: None,
    };
    if tables.limits.is_none() {
        return Ok(p);
    }
    // The source the limit step would key on, if the frame gets that far (the reference's own
    // parse: a frame it cannot parse never reaches the limits).
    let Ok(pkt) = lb_reference::parse::parse(frame, tables) else {
        return Ok(p);
    };
    let key = limit::src_key(&pkt);
    let c = |x| k.counters[counter_index(x)];
    p.kernel = Some(limit::Observed {
        src_tat: kernel.src_bucket(&key)?,
        global_tat: kernel.global_bucket()?,
        counters: [
            c(Counter::LimitExempt),
            c(Counter::LimitKnownReserve),
            c(Counter::DropLimitSource),
            c(Counter::DropLimitGlobal),
        ],
    });
    Ok(p)
}

/// Every source bucket, the global bucket and the set of known sources, kernel against
/// reference. Err(message): a disagreement.
fn limit_state(kernel: &kernel::Kernel, state: &State) -> Result<std::result::Result<(), String>> {
    let global = kernel.global_bucket()?;
    if global != state.limits.global {
        return Ok(Err(format!(
            "GLOBAL_BUCKET: kernel {global}, reference {}",
            state.limits.global
        )));
    }
    let src = kernel.src_buckets()?;
    if src != state.limits.src {
        let only_k = src.iter().find(|(k, v)| state.limits.src.get(k) != Some(v));
        let only_r = state.limits.src.iter().find(|(k, v)| src.get(k) != Some(v));
        return Ok(Err(format!(
            "SRC_BUCKETS: {} entries in the kernel, {} in the reference; first kernel entry the \
             reference lacks: {only_k:?}; first reference entry the kernel lacks: {only_r:?}",
            src.len(),
            state.limits.src.len()
        )));
    }
    let known = kernel.known_srcs()?;
    let want: HashSet<_> = state.limits.known.keys().copied().collect();
    if known != want {
        return Ok(Err(format!(
            "KNOWN_SRCS: kernel {} sources, reference {}; kernel only: {:?}; reference only: {:?}",
            known.len(),
            want.len(),
            known.difference(&want).next(),
            want.difference(&known).next()
        )));
    }
    cookie_state(kernel, state)
}

/// For a frame whose UDP payload starts with a handshake record (by the reference's parse):
/// the `COOKIES` entry of its sender's pending ClientHello walk, kernel against reference
/// (one lookup; the whole map would cost a syscall per entry per frame). Err(message): a
/// disagreement.
fn pending_walk(
    kernel: &kernel::Kernel,
    frame: &[u8],
    tables: &lb_reference::Tables,
    state: &State,
) -> Result<std::result::Result<(), String>> {
    use lb_reference::cookie::{pending_key, Entry};
    let Ok(pkt) = lb_reference::parse::parse(frame, tables) else {
        return Ok(Ok(()));
    };
    let Some(udp) = pkt.udp.filter(|u| frame.get(u.payload_off()) == Some(&22)) else {
        return Ok(Ok(()));
    };
    let key = pending_key(tables, &pkt, &udp);
    let got = kernel.cookie(key)?;
    let want = state.limits.cookies.get(&key);
    let agree = match (got, want) {
        (None, None) => true,
        (Some(v), Some(Entry::Pending(p))) => v == p.to_value(),
        _ => false,
    };
    Ok(if agree {
        Ok(())
    } else {
        Err(format!(
            "COOKIES entry {key:x} of the sender's pending walk: kernel {:?}, reference {want:?}",
            got.map(lb_common::cookie::Pending::from_value)
        ))
    })
}

/// `COOKIES`, kernel against reference: the same keys, and for pending ClientHello walks the
/// same value (a learned cookie's value is the coarse time it was learned: not compared).
/// Err(message): a disagreement.
fn cookie_state(kernel: &kernel::Kernel, state: &State) -> Result<std::result::Result<(), String>> {
    use lb_reference::cookie::Entry;
    let got = kernel.cookies()?;
    let want = &state.limits.cookies;
    let only_k = got.keys().find(|k| !want.contains_key(k));
    let only_r = want.iter().find(|(k, _)| !got.contains_key(k));
    let pending = want.iter().find_map(|(k, e)| match e {
        Entry::Pending(p) if got.get(k).is_some_and(|&v| v != p.to_value()) => {
            Some((k, *p, lb_common::cookie::Pending::from_value(got[k])))
        }
        _ => None,
    });
    if got.len() != want.len() || only_k.is_some() || only_r.is_some() || pending.is_some() {
        return Ok(Err(format!(
            "COOKIES: kernel {} entries, reference {}; first kernel key the reference lacks: \
             {only_k:x?}; first reference entry the kernel lacks: {only_r:x?}; first pending \
             entry that differs (key, reference, kernel): {pending:x?}",
            got.len(),
            want.len()
        )));
    }
    Ok(Ok(()))
}

/// Frames, reloads and counters of one config over the run.
#[derive(Default)]
struct PerConfig {
    epochs: u64,
    frames: u64,
    reloads: u64,
    hits: Vec<u64>,
}

/// Ok(true): no disagreement.
fn fuzz(cli: &Cli, ns: &lb_lab::NetNs) -> Result<bool> {
    anyhow::ensure!(
        cli.epoch <= 131072 / 4,
        "--epoch {} is too large: the flow table (131072) must stay far from full",
        cli.epoch
    );
    // No LRU map of the limits may evict within an epoch (each frame adds at most one source).
    anyhow::ensure!(
        cli.epoch <= u64::from(lb_common::limits::MAX_KNOWN_SRCS) / 2,
        "--epoch {} is too large: KNOWN_SRCS ({}) must stay far from full",
        cli.epoch,
        lb_common::limits::MAX_KNOWN_SRCS
    );
    // Nor FRAGS (each frame records at most one first fragment), which the reference never
    // evicts.
    anyhow::ensure!(
        cli.epoch <= u64::from(lb_common::frag::DEFAULT_FRAG_CAPACITY) / 2,
        "--epoch {} is too large: FRAGS ({}) must stay far from full",
        cli.epoch,
        lb_common::frag::DEFAULT_FRAG_CAPACITY
    );
    // Nor COOKIES (each frame learns a cookie or leaves a pending walk, at most one entry);
    // no fuzz config sets `limits.cookie_capacity`, so it has the default size.
    anyhow::ensure!(
        cli.epoch <= u64::from(lb_common::cookie::DEFAULT_COOKIE_CAPACITY) / 2,
        "--epoch {} is too large: COOKIES ({}) must stay far from full",
        cli.epoch,
        lb_common::cookie::DEFAULT_COOKIE_CAPACITY
    );
    let corpus =
        gen::Corpus::parse(include_str!("../corpus/dtls12.txt")).map_err(anyhow::Error::msg)?;
    // Forwarding off on the interface cidlb is not attached to: frames arriving there get
    // no FIB answer (`pass_fwd_disabled`, `fwd_kernel_fib`) unless the next-hop cache holds one.
    for k in [
        "net.ipv4.conf.fxo.forwarding=0",
        "net.ipv6.conf.fxo.forwarding=0",
    ] {
        ns.sysctl(k).map_err(anyhow::Error::msg)?;
    }
    // Let IPv6 addresses and routes settle before they are read.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let fib = fibns::read(ns)?;
    let ifindexes: Vec<(&str, u32)> = gen::INGRESS
        .iter()
        .map(|n| cidlb::datapath::resolve_interfaces(&[(*n).to_owned()]).map(|v| (*n, v[0])))
        .collect::<Result<_, _>>()?;
    if let Some(h) = &cli.replay {
        let frame = (0..h.len() / 2)
            .map(|k| u8::from_str_radix(&h[2 * k..2 * k + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .context("--replay: not hex")?;
        let ingress = gen::INGRESS
            .iter()
            .find(|n| **n == cli.ingress)
            .context("--ingress: fxc, fxn or fxo")?;
        let ifindex = ifindexes
            .iter()
            .find(|(n, _)| n == ingress)
            .context("--ingress: no such interface")?
            .1;
        let (name, cfg) = config(cli.config)?;
        let (mut kernel, mut tables) = kernel::Kernel::load(&cfg)?;
        let mut state = State {
            now_ns: monotonic_ns(),
            ..Default::default()
        };
        let mut mg = maglev::Maglev::default();
        if let Err(e) = provisioned(&kernel, &cfg, &mut tables, &mut mg, &mut state)? {
            println!("DISAGREEMENT at the load (config {name:?}): {e}");
            return Ok(false);
        }
        let k = kernel.run(&frame, ifindex)?;
        state.precise = precise(&kernel, &k, &frame, &tables)?;
        let want = lb_reference::classify(&frame, ifindex, &tables, &mut state, &fib);
        let p = gen::Packet {
            frame,
            ingress,
            kind: "replayed",
        };
        report(&name, 1, &p, &k, &want);
        return Ok(true);
    }
    let mut stream = gen::Stream::new(cli.seed, &corpus);
    let mut limited = gen::Stream::with_limits(cli.seed, &corpus);
    let mut tunnels = gen::Stream::with_tunnels(cli.seed, &corpus);
    let started = Instant::now();
    let mut hits = vec![0u64; Counter::ALL.len()];
    let mut per: Vec<PerConfig> = (0..CONFIGS.len())
        .map(|_| PerConfig {
            hits: vec![0; Counter::ALL.len()],
            ..Default::default()
        })
        .collect();
    let (mut done, mut skipped, mut epoch) = (0u64, 0u64, 0usize);
    while done < cli.packets {
        let ci = epoch % CONFIGS.len();
        let (name, cfg) = config(epoch)?;
        let (mut kernel, mut tables) = kernel::Kernel::load(&cfg)?;
        let mut state = State::default();
        let mut mg = maglev::Maglev::default();
        if let Err(e) = provisioned(&kernel, &cfg, &mut tables, &mut mg, &mut state)? {
            println!(
                "DISAGREEMENT at the load before frame {} (config {name:?}): {e}",
                done + 1
            );
            return Ok(false);
        }
        let limits_on = cfg.limits.is_some();
        let stream = match CONFIGS[ci].frames {
            Frames::Plain => &mut stream,
            Frames::Limits => &mut limited,
            Frames::Tunnels => &mut tunnels,
        };
        per[ci].epochs += 1;
        let end = (done + cli.epoch).min(cli.packets);
        // Reloads spread evenly over the epoch (one, half-way, for configs without churn).
        let mut pending = reloads(epoch)?;
        let n = pending.len() as u64;
        let mut schedule: Vec<(u64, String, Config)> = pending
            .drain(..)
            .enumerate()
            .map(|(i, (what, c))| (done + cli.epoch * (i as u64 + 1) / (n + 1), what, c))
            .collect();
        schedule.reverse();
        while done < end {
            if schedule.last().is_some_and(|(at, _, _)| done >= *at) {
                let (_, what, c) = schedule.pop().context("reload schedule")?;
                if limits_on {
                    if let Err(e) = limit_state(&kernel, &state)? {
                        println!("DISAGREEMENT before the reload ({what}) at frame {done} (config {name:?}): {e}");
                        return Ok(false);
                    }
                }
                let fresh = kernel.reload(&c)?;
                tables = lb_reference::Tables {
                    maglev: std::mem::take(&mut tables.maglev),
                    limits: tables.limits.take(),
                    ..fresh
                };
                state.nexthop.clear();
                per[ci].reloads += 1;
                if let Err(e) = provisioned(&kernel, &c, &mut tables, &mut mg, &mut state)? {
                    println!("DISAGREEMENT at the reload ({what}) before frame {} (config {name:?}): {e}", done + 1);
                    return Ok(false);
                }
            }
            let p = stream.next_packet();
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (the kernel's
            // bpf_test_init); no driver hands XDP one either. Not counted in --packets.
            if p.frame.len() < 14 {
                skipped += 1;
                continue;
            }
            done += 1;
            per[ci].frames += 1;
            let ifindex = ifindexes
                .iter()
                .find(|(n, _)| *n == p.ingress)
                .context("generated frame on an unknown interface")?
                .1;
            // Every 1,000 frames (far less than the cache's second), the next-hop cache is
            // emptied in both, so the same seed gives the same counts.
            if done % 1000 == 0 {
                kernel.clear_nexthop()?;
                state.nexthop.clear();
                if limits_on && done % 5000 == 0 {
                    if let Err(e) = limit_state(&kernel, &state)? {
                        println!(
                            "DISAGREEMENT after frame {} (config {name:?}): {e}",
                            done - 1
                        );
                        return Ok(false);
                    }
                }
            }
            state.now_ns = steady_now(&state);
            // The packet-too-big answers' bucket: the kernel's (on every CPU) set to the
            // reference's before each frame; for every tenth frame emptied in both, by more
            // than a tick of the coarse clock, and refilled after it as it was (so the
            // reference's clock never meets the kernel's at the bucket's edge).
            let tat = state.too_big_tat;
            if CONFIGS[ci].frames == Frames::Tunnels {
                if done % 10 == 3 {
                    state.too_big_tat = state.now_ns
                        + lb_common::tunnel::TOO_BIG_BURST * lb_common::tunnel::TOO_BIG_INTERVAL_NS
                        + 50_000_000;
                }
                kernel.set_too_big(state.too_big_tat)?;
            }
            let k = kernel.run(&p.frame, ifindex)?;
            state.precise = precise(&kernel, &k, &p.frame, &tables)?;
            let want = lb_reference::classify(&p.frame, ifindex, &tables, &mut state, &fib);
            if CONFIGS[ci].frames == Frames::Tunnels && done % 10 == 3 {
                state.too_big_tat = tat;
            }
            let mut counters_agree = true;
            for (i, &c) in Counter::ALL.iter().enumerate() {
                hits[i] += k.counters[i];
                per[ci].hits[i] += k.counters[i];
                counters_agree &= k.counters[i] == want.delta(c);
            }
            if k.action != want.action
                || k.output != want.frame
                || !counters_agree
                || k.nodes != want.nodes
                || want.misfit.is_some()
            {
                report(&name, done, &p, &k, &want);
                return Ok(false);
            }
            // A frame the cookie step may look at: its sender's pending ClientHello walk must
            // agree right after it (it shows in no counter; the whole of COOKIES is compared
            // at the checkpoints).
            if limits_on {
                if let Err(e) = pending_walk(&kernel, &p.frame, &tables, &state)? {
                    report(&name, done, &p, &k, &want);
                    println!("after this frame: {e}");
                    return Ok(false);
                }
            }
        }
        // Without the global limit nothing is learned: COOKIES must be empty in both.
        let end_state = if limits_on {
            limit_state(&kernel, &state)?
        } else {
            cookie_state(&kernel, &state)?
        };
        if let Err(e) = end_state {
            println!("DISAGREEMENT at the end of the epoch, frame {done} (config {name:?}): {e}");
            return Ok(false);
        }
        epoch += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "cidlb-fuzz: seed {}: {} frames compared ({} generated frames shorter than an Ethernet header not runnable), {} datapath loads, {:.0} s, 0 disagreements",
        cli.seed, done, skipped, epoch, secs
    );
    let (swept, valid) = stream.valid_sweeps();
    println!(
        "every truncation of a recorded-datagram frame: {swept} sweeps over the {valid} such frames ({} full rounds)",
        swept / valid.max(1)
    );
    println!("per config (epochs, frames, reloads; new flows and limit counters):");
    for (i, pc) in per.iter().enumerate() {
        let h = |c| pc.hits[counter_index(c)];
        println!(
            "  [{i}] {}: {} epochs, {} frames, {} reloads; flow_new {}, drop_limit_source {}, drop_limit_global {}, limit_known_reserve {}, limit_exempt {}",
            CONFIGS[i].name,
            pc.epochs,
            pc.frames,
            pc.reloads,
            h(Counter::FlowNew),
            h(Counter::DropLimitSource),
            h(Counter::DropLimitGlobal),
            h(Counter::LimitKnownReserve),
            h(Counter::LimitExempt),
        );
    }
    println!("counters hit (kernel == reference):");
    for (i, c) in Counter::ALL.iter().enumerate() {
        println!("  {:<24} {}", c.name(), hits[i]);
    }
    Ok(true)
}

fn report(config: &str, n: u64, p: &gen::Packet, k: &kernel::Run, want: &Outcome) {
    println!(
        "DISAGREEMENT at frame {n} ({} frame, config {config:?}, ingress {})",
        p.kind, p.ingress
    );
    println!("frame  {}", lb_lab::hex(&p.frame));
    println!(
        "kernel:    action {}  output {}",
        k.action,
        lb_lab::hex(&k.output)
    );
    println!(
        "reference: action {}  output {}",
        want.action,
        lb_lab::hex(&want.frame)
    );
    println!("counters (kernel / reference), where either moved:");
    for (i, &c) in Counter::ALL.iter().enumerate() {
        let (a, b) = (k.counters[i], want.delta(c));
        if a != 0 || b != 0 {
            let mark = if a != b { "   <-- differs" } else { "" };
            println!("  {:<24} {a} / {b}{mark}", c.name());
        }
    }
    println!(
        "per-node (slot: kernel / reference): {:?} / {:?}",
        k.nodes, want.nodes
    );
    if let Some(m) = &want.misfit {
        println!("{m}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_parses_and_its_reloads_disable_a_node_or_churn() {
        for (k, fc) in CONFIGS.iter().enumerate() {
            let (name, cfg) = config(k).unwrap();
            let r = reloads(k).unwrap();
            assert!(!r.is_empty(), "{name}: no reload");
            for (_, c) in &r {
                assert_eq!(c.shadow, cfg.shadow, "{name}");
            }
            if fc.churn.is_empty() || fc.frames != Frames::Limits {
                if !fc.churn.is_empty() {
                    continue;
                }
                let first = cfg.nodes[0].id;
                let node = r[0].1.nodes.iter().find(|n| n.id == first).unwrap();
                assert_eq!(format!("{:?}", node.state), "Disabled", "{name}");
                continue;
            }
            // Churn: some reload adds a node and a VIP, some removes one of each, and the
            // limits stay on throughout.
            let ids = |c: &Config| c.nodes.iter().map(|n| n.id).collect::<HashSet<_>>();
            let vips = |c: &Config| {
                c.vips
                    .iter()
                    .map(|v| format!("{v:?}"))
                    .collect::<HashSet<_>>()
            };
            let mut prev = cfg.clone();
            let (mut node_added, mut node_removed, mut vip_added, mut vip_removed) =
                (false, false, false, false);
            for (what, c) in &r {
                assert!(c.limits.is_some(), "{name}: {what}: limits off");
                node_added |= !ids(c).is_subset(&ids(&prev));
                node_removed |= !ids(&prev).is_subset(&ids(c));
                vip_added |= !vips(c).is_subset(&vips(&prev));
                vip_removed |= !vips(&prev).is_subset(&vips(c));
                prev = c.clone();
            }
            assert!(
                node_added && node_removed && vip_added && vip_removed,
                "{name}: churn must add and remove a node and a VIP"
            );
        }
    }

    /// The limits configs (replacing "no fuzz config has limits"): between them a per-source
    /// and a global bucket, exempt prefixes that generated sources fall in, both policies.
    #[test]
    fn limits_configs_cover_both_buckets_and_exempt_prefixes() {
        let with: Vec<Config> = (0..CONFIGS.len())
            .map(|k| config(k).unwrap().1)
            .filter(|c| c.limits.is_some())
            .collect();
        assert!(with.len() >= 2);
        let l = |c: &Config| c.limits.clone().unwrap();
        assert!(with.iter().any(|c| l(c).new_flows_per_source.is_some()));
        assert!(with.iter().any(|c| l(c).new_flows.is_some()));
        assert!(with
            .iter()
            .any(|c| l(c).new_flows.is_some() && l(c).new_flows_per_source.is_none()));
        for policy in ["Maglev", "RoundRobin"] {
            assert!(
                with.iter()
                    .any(|c| format!("{:?}", c.flows.policy) == policy),
                "{policy}"
            );
        }
        // Some of the generated sources fall in an exempt prefix (IPv4 and IPv6).
        let s = settings(with.iter().find(|c| !l(c).exempt.is_empty()).unwrap()).unwrap();
        let lim = limit::Limits::new(&s).unwrap();
        let mut fam = HashSet::new();
        for src in ["100.64.0.9", "2001:db8:cafe::1"] {
            let a: std::net::IpAddr = src.parse().unwrap();
            fam.insert(a.is_ipv4());
            assert!(
                lim.exempt.iter().any(|&(p, len)| {
                    let v = match a {
                        std::net::IpAddr::V4(x) => u128::from_be_bytes(x.to_ipv6_mapped().octets()),
                        std::net::IpAddr::V6(x) => u128::from_be_bytes(x.octets()),
                    };
                    (v >> (128 - len)) == (p >> (128 - len))
                }),
                "{src} is not exempt"
            );
        }
        assert_eq!(fam.len(), 2);
    }

    /// Cookies are learned only with the global limit on: some config has it with both DTLS
    /// versions (cookie field and extension both proven), and none resizes `COOKIES` (the
    /// epoch guard assumes the default size).
    #[test]
    fn a_config_learns_cookies_of_both_versions_and_none_resizes_the_table() {
        use lb_common::{DTLS_V12, DTLS_V13};
        let cfgs: Vec<Config> = (0..CONFIGS.len())
            .map(|k| config(k).unwrap().1)
            .chain((0..CONFIGS.len()).flat_map(|k| reloads(k).unwrap().into_iter().map(|r| r.1)))
            .collect();
        assert!(cfgs.iter().any(|c| {
            c.limits.as_ref().is_some_and(|l| l.new_flows.is_some())
                && c.dp_config().dtls_versions == DTLS_V12 | DTLS_V13
        }));
        for c in &cfgs {
            assert_eq!(
                c.cookie_capacity(),
                lb_common::cookie::DEFAULT_COOKIE_CAPACITY
            );
        }
    }

    /// The tunnel configs: between them IPIP and GUE over both families, each beside a NAT
    /// VIP of its family, a source prefix of each family, and a reload that changes a VIP's
    /// forwarding.
    #[test]
    fn tunnel_configs_cover_both_encaps_and_families_beside_nat_vips() {
        use cidlb::config::Encap;
        let mut seen = HashSet::new();
        let mut prefixes = HashSet::new();
        let mut switched = false;
        for k in (0..CONFIGS.len()).filter(|&k| CONFIGS[k].frames == Frames::Tunnels) {
            let cfg = config(k).unwrap().1;
            for v in &cfg.vips {
                let v4 = v.address.is_ipv4();
                let Some(t) = v.tunnel() else { continue };
                seen.insert((format!("{:?}", t.encap), v4));
                assert!(
                    cfg.vips
                        .iter()
                        .any(|n| n.tunnel().is_none() && n.address.is_ipv4() == v4),
                    "{}: no NAT VIP beside {}",
                    CONFIGS[k].name,
                    v.address
                );
                let src = if v4 { t.source4 } else { t.source6 }.unwrap();
                if src.len < if v4 { 32 } else { 128 } {
                    prefixes.insert(v4);
                }
                assert_eq!(t.gue_port.is_some(), t.encap == Encap::Gue);
            }
            let mode = |c: &Config| {
                c.vips
                    .iter()
                    .map(|v| (v.address, v.tunnel().map(|t| format!("{:?}", t.encap))))
                    .collect::<Vec<_>>()
            };
            switched |= reloads(k)
                .unwrap()
                .iter()
                .any(|(_, r)| mode(r) != mode(&cfg));
        }
        for encap in ["Ipip", "Gue"] {
            for v4 in [true, false] {
                assert!(seen.contains(&(encap.to_owned(), v4)), "{encap} v4={v4}");
            }
        }
        assert_eq!(prefixes.len(), 2, "a source prefix of each family");
        assert!(switched, "no reload changes a VIP's forwarding");
    }

    #[test]
    fn configs_cover_both_policies_and_every_dtls_versions_mask() {
        use lb_common::{DTLS_V12, DTLS_V13, POLICY_MAGLEV, POLICY_ROUND_ROBIN};
        let dp: Vec<_> = (0..CONFIGS.len())
            .map(|k| config(k).unwrap().1.dp_config())
            .collect();
        for policy in [POLICY_MAGLEV, POLICY_ROUND_ROBIN] {
            assert!(dp.iter().any(|c| c.policy == policy), "policy {policy}");
        }
        for mask in [DTLS_V12, DTLS_V13, DTLS_V12 | DTLS_V13] {
            assert!(
                dp.iter().any(|c| c.dtls_versions == mask),
                "versions {mask}"
            );
        }
    }

    #[test]
    fn corpus_parses() {
        let c = gen::Corpus::parse(include_str!("../corpus/dtls12.txt")).unwrap();
        // Client records with a CID naming node 1 (type 25, FE FD, CID starting 01).
        assert!(c
            .to_server
            .iter()
            .any(|d| d.len() > 12 && d[..3] == [25, 0xfe, 0xfd] && d[11] == 1));
    }
}
