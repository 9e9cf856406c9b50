//! Memory: the running agent's RSS, and the kernel memory of its maps as the kernel reports
//! it (bpftool's `bytes_memlock`), at the default and the maximum flow capacity.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use cidlb::ebpf::MAP_NAMES;
use lb_common::{names, DEFAULT_FLOW_CAPACITY, MAX_FLOW_CAPACITY};
use lb_lab::{
    agent::{Agent, LogTo},
    fib,
};
use serde_json::{json, Value};

pub fn run() -> Result<Vec<Value>> {
    let ns = lb_lab::fib::netns("bm");
    let exe = std::env::current_exe()?;
    let cidlb = exe.with_file_name("cidlb");
    if !cidlb.exists() {
        bail!(
            "{} missing: build it with `cargo build --release -p lb-userspace`",
            cidlb.display()
        );
    }
    let mut out = Vec::new();
    for capacity in [DEFAULT_FLOW_CAPACITY, MAX_FLOW_CAPACITY] {
        let pin_dir = format!("/sys/fs/bpf/cidlb-bench-mem-{}", std::process::id());
        let cfg = std::env::temp_dir().join(format!("cidlb-bench-mem-{}.yaml", std::process::id()));
        std::fs::write(
            &cfg,
            format!(
                "interfaces: [fxc, fxn]\nxdp_mode: native\nvips: [{{address: {}, ports: [{}]}}]\n\
                 nodes: [{{id: 1, address: {}}}, {{id: 2, address: {}}}]\n\
                 flows: {{capacity: {capacity}}}\npin_dir: {pin_dir}\n",
                fib::VIP4,
                lb_lab::PORT,
                fib::NODE1_4,
                fib::NODE2_4,
            ),
        )?;
        let agent = Agent::start_within(
            &cidlb,
            &ns,
            &cfg,
            &["--detach-on-exit"],
            &LogTo::default(),
            Duration::from_secs(120),
        )
        .map_err(|e| anyhow!("flows.capacity {capacity}: {e}"))?;
        let start_secs = agent.start_time.as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        let pid = agent.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
        let mut maps = serde_json::Map::new();
        let mut total = 0u64;
        for name in MAP_NAMES {
            let o = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned", &format!("{pin_dir}/{name}")])
                .output()
                .context("bpftool")?;
            let v: Value = serde_json::from_slice(&o.stdout)
                .with_context(|| format!("bpftool map show {name}"))?;
            let bytes = v["bytes_memlock"].as_u64().unwrap_or(0);
            total += bytes;
            maps.insert((*name).to_owned(), json!(bytes));
        }
        let _ = agent.terminate();
        cidlb::datapath::detach(std::path::Path::new(&pin_dir));
        let _ = std::fs::remove_file(&cfg);
        eprintln!("  capacity {capacity}: RSS {rss_kib} KiB, maps {total} bytes");
        out.push(json!({
            "part": "memory", "flow_capacity": capacity, "agent_rss_kib": rss_kib,
            "maps_bytes": total, "flows_bytes": maps[names::FLOWS], "maps": maps,
            "start_secs": start_secs,
        }));
    }
    Ok(out)
}
