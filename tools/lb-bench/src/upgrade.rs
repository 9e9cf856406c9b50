//! What an upgrade across datapath layouts costs (lb-userspace `src/upgrade.rs`): copying a
//! full flow table from the old layout's map to the new one, key by key (aya 0.14 has no batch
//! map operations), at 1,000,000 flows and at the largest `flows.capacity`. Not part of the
//! default run: `cidlb-bench --parts upgrade`.

use std::time::Instant;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use cidlb::{config::Config, datapath::Datapath, upgrade};
use lb_common::{names, Flow, FlowKey, FAMILY_V4, MAX_FLOW_CAPACITY};
use serde_json::{json, Value};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn run() -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for flows in [1_000_000u32, MAX_FLOW_CAPACITY] {
        let cfg = Config::parse(
            &format!(
                "interfaces: [lo]\nvips: [{{address: 192.0.2.10, ports: [5684]}}]\n\
                 nodes: [{{id: 1, address: 198.18.0.1}}]\nflows: {{capacity: {flows}}}\n"
            ),
            std::path::Path::new("bench-upgrade.yaml"),
        )?;
        let mut old = Datapath::private(&cfg)?;
        let mut new = Datapath::private(&cfg)?;
        let t = Instant::now();
        {
            let mut m: HashMap<&mut MapData, FlowKey, Flow> =
                HashMap::try_from(old.ebpf.map_mut(names::FLOWS).context("FLOWS")?)?;
            for i in 0..flows {
                let key = FlowKey {
                    src: [i.to_be(), 0, 0, 0],
                    dst: [u32::from_ne_bytes([192, 0, 2, 10]), 0, 0, 0],
                    sport: 40000u16.to_be(),
                    dport: 5684u16.to_be(),
                    family: FAMILY_V4,
                    _pad: [0; 3],
                };
                m.insert(
                    key,
                    Flow {
                        node_id: 1,
                        _pad: 0,
                        last_seen_ns: 1,
                    },
                    0,
                )?;
            }
        }
        let fill_secs = t.elapsed().as_secs_f64();
        let pin = format!("/sys/fs/bpf/cidlb-bench-upgrade-{}", std::process::id());
        old.ebpf.map(names::FLOWS).context("FLOWS")?.pin(&pin)?;
        let rss_before = rss_kib();
        let t = Instant::now();
        let copied = upgrade::copy_flows(std::path::Path::new(&pin), &mut new.ebpf, true);
        let copy_secs = t.elapsed().as_secs_f64();
        let rss_after = rss_kib();
        let _ = std::fs::remove_file(&pin);
        let copied = copied?;
        eprintln!(
            "upgrade: {flows} flows: filled in {fill_secs:.1} s; copied {copied} in {copy_secs:.1} s \
             ({:.2} us per flow); the copying process's RSS {rss_before} -> {rss_after} KiB",
            copy_secs * 1e6 / f64::from(flows)
        );
        out.push(json!({
            "part": "upgrade", "flows": flows, "copied": copied, "copy_secs": copy_secs,
            "rss_kib_before": rss_before, "rss_kib_after": rss_after,
        }));
    }
    Ok(out)
}
