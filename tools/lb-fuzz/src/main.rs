//! `cargo xtask fuzz [--packets N] [--seed S]`: differential fuzzing of the XDP datapath.
//!
//! Frames (see `gen.rs`) run through the loaded program (BPF_PROG_TEST_RUN, on one pinned CPU,
//! in a namespace of its own whose routes and neighbours are fixed) and through lb-reference,
//! which is given the maps as provisioned and that namespace's FIB. Action, output frame, every
//! counter and every per-node counter must agree. On the first disagreement it prints the frame
//! (hex), both results, and exits 1.
//!
//! What the reference cannot know is held still: one CPU (round-robin cursors), a fresh
//! datapath every `--epoch` packets with a flow table four times larger (nothing evicted), a
//! one-hour idle timeout (nothing expires), no rate limits (no `limits:` in any config).

mod fibns;
mod gen;
mod kernel;

use std::{process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use cidlb::config::Config;
use clap::Parser;
use lb_common::Counter;
use lb_reference::{Outcome, State};

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
    /// Index of the config (0..5) for `--replay`.
    #[arg(long, default_value_t = 0)]
    config: usize,
}

/// The configs the epochs cycle through: (name, `flows.policy` or "" for the default, body).
/// Node 3 has no neighbour entry; node 4 is disabled (its CID records follow `unknown_node`);
/// node 5 sits on the client side (one-armed, XDP_TX) and is draining; node 2 listens on
/// another port. Between them they cover both policies (Maglev by default and by name) and
/// `dtls.versions` [1.2], [1.3], both and absent. None has `limits:`: new-flow rate limits are
/// off, and their counters must stay 0 in the kernel as they do in the reference.
const CONFIGS: &[(&str, &str, &str)] = &[
    (
        "one-byte ids, unknown_node drop, round robin, DTLS 1.2 and 1.3",
        "round_robin",
        r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: ["1.2", "1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"], port: 5700}
  - {id: 3, address: [203.0.113.13, "2001:db8:1::13"]}
  - {id: 4, address: 203.0.113.14, state: disabled}
  - {id: 5, address: 198.51.100.50, state: draining}
"#,
    ),
    (
        "two-byte ids at offset 2, unknown_node flow, maglev, DTLS 1.2 only",
        "maglev",
        r#"
dtls: {cid_length: 8, node_id_offset: 2, node_id_length: 2, unknown_node: flow, versions: ["1.2"]}
nodes:
  - {id: 257, address: [203.0.113.11, "2001:db8:1::11"], weight: 3}
  - {id: 514, address: "2001:db8:1::12"}
  - {id: 771, address: 198.51.100.50}
  - {id: 1028, address: 203.0.113.14, state: disabled}
"#,
    ),
    (
        "four-byte ids, shadow mode, maglev (default), DTLS 1.3 only",
        "",
        r#"
dtls: {cid_length: 4, node_id_offset: 0, node_id_length: 4, unknown_node: drop, versions: ["1.3"]}
shadow: true
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 16909060, address: [203.0.113.12, "2001:db8:1::12"]}
"#,
    ),
    (
        "no IPv6 node takes new flows, maglev (default), dtls.versions absent",
        "",
        r#"
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: flow}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], state: draining}
  - {id: 2, address: 203.0.113.12}
"#,
    ),
    (
        "three-byte ids at offset 1, unknown_node flow, maglev, DTLS 1.3 only",
        "maglev",
        r#"
dtls: {cid_length: 5, node_id_offset: 1, node_id_length: 3, unknown_node: flow, versions: ["1.3"]}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"], weight: 2}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
  - {id: 3, address: [203.0.113.13, "2001:db8:1::13"]}
  - {id: 5, address: 198.51.100.50}
"#,
    ),
];

fn config(k: usize) -> Result<(String, Config)> {
    let (name, policy, body) = CONFIGS[k % CONFIGS.len()];
    Ok((name.to_owned(), config_text(name, policy, body)?))
}

fn config_text(name: &str, policy: &str, body: &str) -> Result<Config> {
    let mut body = body.to_owned();
    let shadow = body.contains("shadow: true\n");
    body = body.replace("shadow: true\n", "");
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!(", policy: {policy}")
    };
    let text = format!(
        "interfaces: [fxc, fxn]\nvips:\n  - address: {}\n    ports: [5684, \"20000-20100\"]\n  - address: \"{}\"\n    ports: [5684]\nflows: {{idle_timeout: 1h, capacity: 131072{policy}}}\n{body}",
        lb_lab::fib::VIP4,
        lb_lab::fib::VIP6,
    );
    let mut cfg = Config::parse(&text, std::path::Path::new(name))
        .with_context(|| format!("fuzz config {name:?}"))?;
    cfg.shadow = shadow;
    Ok(cfg)
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
    let (name, policy, body) = CONFIGS[k % CONFIGS.len()];
    let line = body
        .lines()
        .find(|l| l.contains(&format!("{{id: {first},")))?;
    let new_line = if line.contains("state:") {
        line.replace("state: draining", "state: disabled")
    } else {
        line.replace('}', ", state: disabled}")
    };
    let text = body.replace(line, &new_line);
    let mut c = config_text(name, policy, &text).ok()?;
    c.shadow = cfg.shadow;
    Some(c)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

/// Ok(true): no disagreement.
fn fuzz(cli: &Cli, ns: &lb_lab::NetNs) -> Result<bool> {
    anyhow::ensure!(
        cli.epoch <= 131072 / 4,
        "--epoch {} is too large: the flow table (131072) must stay far from full",
        cli.epoch
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
        let ifindex = ifindexes.iter().find(|(n, _)| n == ingress).unwrap().1;
        let (name, cfg) = config(cli.config)?;
        let (mut kernel, tables) = kernel::Kernel::load(&cfg)?;
        let mut state = State {
            now_ns: monotonic_ns(),
            ..Default::default()
        };
        let k = kernel.run(&frame, ifindex)?;
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
    let started = Instant::now();
    let mut hits = vec![0u64; Counter::ALL.len()];
    let (mut done, mut skipped, mut epoch) = (0u64, 0u64, 0usize);
    while done < cli.packets {
        let (name, cfg) = config(epoch)?;
        let (mut kernel, mut tables) = kernel::Kernel::load(&cfg)?;
        let mut state = State::default();
        let end = (done + cli.epoch).min(cli.packets);
        let mut reload = reloaded(epoch).map(|c| (done + cli.epoch / 2, c));
        while done < end {
            if let Some((at, c)) = &reload {
                if done >= *at {
                    tables = kernel.reload(c)?;
                    state.nexthop.clear();
                    reload = None;
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
            let ifindex = ifindexes.iter().find(|(n, _)| *n == p.ingress).unwrap().1;
            // Every 1,000 frames (far less than the cache's second), the next-hop cache is
            // emptied in both, so the same seed gives the same counts.
            if done % 1000 == 0 {
                kernel.clear_nexthop()?;
                state.nexthop.clear();
            }
            state.now_ns = steady_now(&state);
            let k = kernel.run(&p.frame, ifindex)?;
            let want = lb_reference::classify(&p.frame, ifindex, &tables, &mut state, &fib);
            let mut counters_agree = true;
            for (i, &c) in Counter::ALL.iter().enumerate() {
                hits[i] += k.counters[i];
                counters_agree &= k.counters[i] == want.delta(c);
            }
            if k.action != want.action
                || k.output != want.frame
                || !counters_agree
                || k.nodes != want.nodes
            {
                report(&name, done, &p, &k, &want);
                return Ok(false);
            }
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
    println!("frame  {}", hex(&p.frame));
    println!("kernel:    action {}  output {}", k.action, hex(&k.output));
    println!(
        "reference: action {}  output {}",
        want.action,
        hex(&want.frame)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_parses_and_has_a_reload_that_disables_its_first_node() {
        for k in 0..CONFIGS.len() {
            let (name, cfg) = config(k).unwrap();
            let r = reloaded(k).unwrap_or_else(|| panic!("{name}: no valid reload"));
            let first = cfg.nodes[0].id;
            let node = r.nodes.iter().find(|n| n.id == first).unwrap();
            assert_eq!(format!("{:?}", node.state), "Disabled", "{name}");
            assert_eq!(r.shadow, cfg.shadow, "{name}");
            assert!(
                cfg.limits.is_none(),
                "{name}: the reference models no rate limits"
            );
        }
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
