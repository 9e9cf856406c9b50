//! Reading the datapath's counters: summed over CPUs, from a loaded object or from pins.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::{names, Counter, Node, NodeStats};

/// A snapshot of every counter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per-reason counters, in `Counter::ALL` order.
    pub counters: Vec<(Counter, u64)>,
    /// Per-node traffic keyed by node id.
    pub nodes: BTreeMap<u32, NodeStats>,
}

impl Snapshot {
    pub fn get(&self, c: Counter) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }

    /// Reads the maps pinned under `dir` by a running `cidlb run`.
    pub fn from_pins(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let open = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path).with_context(|| {
                format!(
                    "cannot open {} (is `cidlb run` running with pin_dir {}?)",
                    path.display(),
                    dir.display()
                )
            })
        };
        let stats = PerCpuArray::try_from(Map::PerCpuArray(open(names::STATS)?))?;
        let node_stats = PerCpuArray::try_from(Map::PerCpuArray(open(names::NODE_STATS)?))?;
        let nodes = HashMap::try_from(Map::HashMap(open(names::NODES)?))?;
        Self::read(&stats, &node_stats, &nodes)
    }

    /// Reads the maps of a datapath loaded in this process.
    pub fn from_ebpf(ebpf: &aya::Ebpf) -> anyhow::Result<Self> {
        let get = |n: &str| ebpf.map(n).ok_or_else(|| anyhow::anyhow!("no map {n}"));
        let stats = PerCpuArray::try_from(get(names::STATS)?)?;
        let node_stats = PerCpuArray::try_from(get(names::NODE_STATS)?)?;
        let nodes = HashMap::try_from(get(names::NODES)?)?;
        Self::read(&stats, &node_stats, &nodes)
    }

    fn read<S, T, U>(
        stats: &PerCpuArray<S, u64>,
        node_stats: &PerCpuArray<T, NodeStats>,
        nodes: &HashMap<U, u32, Node>,
    ) -> anyhow::Result<Self>
    where
        S: std::borrow::Borrow<MapData>,
        T: std::borrow::Borrow<MapData>,
        U: std::borrow::Borrow<MapData>,
    {
        let mut snap = Snapshot::default();
        for &c in Counter::ALL {
            let v: u64 = stats.get(&(c as u32), 0)?.iter().sum();
            snap.counters.push((c, v));
        }
        for entry in nodes.iter() {
            let (id, node) = entry?;
            snap.nodes.insert(id, slot_sum(node_stats, node.slot)?);
        }
        Ok(snap)
    }

    /// Per-node counters by slot (a disabled node has a slot but no `NODES` entry), from a
    /// datapath loaded in this process.
    pub fn slots_of_ebpf(
        ebpf: &aya::Ebpf,
        slots: impl Iterator<Item = u32>,
    ) -> anyhow::Result<BTreeMap<u32, NodeStats>> {
        let map = ebpf
            .map(names::NODE_STATS)
            .ok_or_else(|| anyhow::anyhow!("no map {}", names::NODE_STATS))?;
        let node_stats = PerCpuArray::try_from(map)?;
        slots
            .map(|slot| Ok((slot, slot_sum(&node_stats, slot)?)))
            .collect()
    }
}

/// One slot's `NODE_STATS`, summed over CPUs.
fn slot_sum<T: std::borrow::Borrow<MapData>>(
    node_stats: &PerCpuArray<T, NodeStats>,
    slot: u32,
) -> anyhow::Result<NodeStats> {
    let mut sum = NodeStats::default();
    for s in node_stats.get(&slot, 0)?.iter() {
        sum.to_node_packets += s.to_node_packets;
        sum.to_node_bytes += s.to_node_bytes;
        sum.from_node_packets += s.from_node_packets;
        sum.from_node_bytes += s.from_node_bytes;
    }
    Ok(sum)
}

impl Snapshot {
    /// A table for people: non-zero counters (all with `all`), then per-node traffic. With an
    /// earlier snapshot and the seconds since, a per-second rate column.
    pub fn render_text(&self, all: bool, since: Option<(&Snapshot, f64)>) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<24} {:>14} {:>12}",
            "counter",
            "packets",
            if since.is_some() { "per second" } else { "" }
        );
        for (c, v) in &self.counters {
            if all || *v != 0 {
                let rate = since
                    .filter(|(_, secs)| *secs > 0.0)
                    .map(|(p, secs)| format!("{:.1}", v.saturating_sub(p.get(*c)) as f64 / secs))
                    .unwrap_or_default();
                let _ = writeln!(s, "{:<24} {:>14} {:>12}", c.name(), v, rate);
            }
        }
        let _ = writeln!(
            s,
            "\n{:>6} {:>14} {:>16} {:>14} {:>16}",
            "node", "to_node_pkts", "to_node_bytes", "from_node_pkts", "from_node_bytes"
        );
        for (id, n) in &self.nodes {
            let _ = writeln!(
                s,
                "{:>6} {:>14} {:>16} {:>14} {:>16}",
                id, n.to_node_packets, n.to_node_bytes, n.from_node_packets, n.from_node_bytes
            );
        }
        s
    }

    /// One JSON object: `{"counters": {name: n, ...}, "nodes": {"id": {...}, ...}}`.
    pub fn render_json(&self) -> String {
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(c, v)| format!("\"{}\":{v}", c.name()))
            .collect();
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                format!(
                    "\"{id}\":{{\"to_node_packets\":{},\"to_node_bytes\":{},\"from_node_packets\":{},\"from_node_bytes\":{}}}",
                    n.to_node_packets, n.to_node_bytes, n.from_node_packets, n.from_node_bytes
                )
            })
            .collect();
        format!(
            "{{\"counters\":{{{}}},\"nodes\":{{{}}}}}",
            counters.join(","),
            nodes.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counter table of docs/security.md is the operator's reference: it must name every
    /// counter, in index order (bpftool shows indices).
    #[test]
    fn docs_document_every_counter_in_order() {
        let readme = include_str!("../../docs/security.md");
        let mut at = 0;
        for c in Counter::ALL {
            // A row's first cell, at the start of a line: a counter named in the last cell of
            // another table's row is no row of this one.
            let row = format!("\n| `{}` |", c.name());
            let found = readme[at..].find(&row).unwrap_or_else(|| {
                panic!(
                    "docs/security.md lacks a row for {} (in index order)",
                    c.name()
                )
            });
            at += found + row.len();
        }
    }

    #[test]
    fn json_and_text_render() {
        let mut s = Snapshot::default();
        s.counters.push((Counter::CidRouted, 7));
        s.nodes.insert(
            2,
            NodeStats {
                to_node_packets: 3,
                ..NodeStats::default()
            },
        );
        assert_eq!(
            s.render_json(),
            "{\"counters\":{\"cid_routed\":7},\"nodes\":{\"2\":{\"to_node_packets\":3,\"to_node_bytes\":0,\"from_node_packets\":0,\"from_node_bytes\":0}}}"
        );
        assert!(s.render_text(false, None).contains("cid_routed"));
        assert!(s
            .render_text(false, Some((&Snapshot::default(), 2.0)))
            .contains("3.5"));
        assert_eq!(s.get(Counter::CidRouted), 7);
    }
}
