//! `cidlb-bench`: what `cargo xtask bench` runs (as root). Writes `results.jsonl`, `results.md`,
//! `chart.svg` and `throughput.svg` to `--out`.
//!
//! - prog:   per-packet cost of each datapath path in the kernel (BPF_PROG_TEST_RUN with a large
//!   repeat count), beside an empty XDP program (the floor); growth with nodes and flows.
//! - throughput: forwarding in the netns lab with trafgen, cidlb beside the iptables rules it
//!   replaces, plain routing and a minimal XDP forwarder.
//! - echo: the balancer's CPU per echoed record in the routed lab, NAT mode against tunnel
//!   mode (nodes that echo; in tunnel mode their replies bypass the balancer).
//! - memory: the agent's RSS and its maps' kernel memory at the default and maximum flow
//!   capacity.
//!
//! Machines here are noisy: every point is the median of several rounds with min and max, and
//! paths are measured interleaved within a round so drift hits all of them alike.

mod echo;
mod memory;
mod prog;
mod report;
mod throughput;
mod upgrade;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(name = "cidlb-bench")]
struct Cli {
    /// Full mode: more repeats and rounds, flow tables up to 1,000,000.
    #[arg(long)]
    full: bool,
    /// Where to write results.jsonl, results.md, chart.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Only rewrite results.md and the charts from the results.jsonl already in --out.
    #[arg(long)]
    report_only: bool,
    /// Parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prog,throughput,echo,memory"
    )]
    parts: Vec<String>,
}

/// How hard to measure.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub repeat: u32,
    pub rounds: usize,
    pub max_flows: u64,
    pub full: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.report_only {
        let text = std::fs::read_to_string(cli.out.join("results.jsonl"))?;
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let full = text.contains("\"repeat\":1000000");
        let effort = if full {
            Effort {
                repeat: 1_000_000,
                rounds: 9,
                max_flows: 1_000_000,
                full,
            }
        } else {
            Effort {
                repeat: 200_000,
                rounds: 5,
                max_flows: 100_000,
                full,
            }
        };
        report::write(&cli.out, effort, &records)?;
        return Ok(());
    }
    lb_lab::require_root();
    let effort = if cli.full {
        Effort {
            repeat: 1_000_000,
            rounds: 9,
            max_flows: 1_000_000,
            full: true,
        }
    } else {
        Effort {
            repeat: 200_000,
            rounds: 5,
            max_flows: 100_000,
            full: false,
        }
    };
    std::fs::create_dir_all(&cli.out)?;
    let mut records = Vec::new();
    if cli.parts.iter().any(|p| p == "prog") {
        eprintln!(
            "prog: BPF_PROG_TEST_RUN, repeat {}, {} rounds",
            effort.repeat, effort.rounds
        );
        records.extend(prog::run(effort)?);
    }
    if cli.parts.iter().any(|p| p == "throughput") {
        eprintln!("throughput: trafgen through the netns lab");
        records.extend(throughput::run(effort)?);
    }
    if cli.parts.iter().any(|p| p == "echo") {
        eprintln!("echo: balancer CPU per echoed record, NAT against tunnel mode (routed lab)");
        records.extend(echo::run(effort)?);
    }
    if cli.parts.iter().any(|p| p == "upgrade") {
        records.extend(upgrade::run()?);
    }
    if cli.parts.iter().any(|p| p == "memory") {
        eprintln!("memory: agent RSS and map memory");
        records.extend(memory::run()?);
    }
    report::write(&cli.out, effort, &records)?;
    eprintln!(
        "wrote {}/results.jsonl, results.md, chart.svg",
        cli.out.display()
    );
    Ok(())
}

/// Median, min and max of samples.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let med = if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (med, *s.first().unwrap_or(&0.0), *s.last().unwrap_or(&0.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_min_max() {
        assert_eq!(super::stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(super::stats(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
