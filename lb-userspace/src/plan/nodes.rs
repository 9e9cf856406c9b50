//! Nodes as the datapath holds them: `NODES` entries with stable slots, the weighted rings of
//! `flows.policy: round_robin`, and the Maglev tables of `flows.policy: maglev`.

use std::collections::BTreeMap;

use lb_common::{
    addr_words, family_index, port_wire, Node, FAMILY_V4, FAMILY_V6, MAX_NODES, NODE_F_V4,
    NODE_F_V6,
};

use crate::{
    config::{Config, FlowPolicy, NodeState},
    plan::{indices::stable_indices, maglev},
};

/// What `NODES`, `RING`/`RING_LEN` and `MAGLEV` should hold for a config and the nodes' health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// Node id → slot (per-node counters, next-hop cache), for every configured node: a
    /// disabled one too, which is not in `NODES` but keeps its reverse NAT (`plan/reverse.rs`),
    /// so the replies it still sends leave with the VIP's address, not its own.
    pub slots: BTreeMap<u32, u32>,
    /// Slots that a node takes for the first time: their counters start from zero.
    pub new_slots: Vec<u32>,
    /// `NODES` entries (sealed), in config order: every node but disabled ones (a disabled
    /// node's CIDs follow `dtls.unknown_node`).
    pub nodes: Vec<(u32, Node)>,
    /// Per family (`family_index`): node ids in round-robin order over the nodes that take
    /// new flows.
    pub rings: [Vec<u32>; 2],
    /// With `flows.policy: maglev`, per family: the Maglev table (empty: no node takes new
    /// flows); `None` with round robin.
    pub maglev: Option<[Vec<u32>; 2]>,
    /// Per family: in panic mode (see [`panic`]), health ignored for new flows.
    pub panic: [bool; 2],
}

/// Per family (`family_index`): is it in panic mode? Of the family's active nodes (the ones
/// that take new flows when healthy), fewer than `health.panic_threshold` percent are up, or,
/// without a threshold, none is. Then every active node of the family takes new flows,
/// health or not: all balancers see the same nodes, so dropping every new flow while the VIP
/// stays announced helps nobody, and an attacker who forges the probes' ICMP errors cannot
/// take a whole family out. `panic_threshold: 0` turns it off.
pub fn panic(cfg: &Config, up: &dyn Fn(u32) -> bool) -> [bool; 2] {
    let mut out = [false; 2];
    for (fi, v6) in [(0, false), (1, true)] {
        let active: Vec<u32> = cfg
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .filter(|n| {
                if v6 {
                    n.v6().is_some()
                } else {
                    n.v4().is_some()
                }
            })
            .map(|n| n.id)
            .collect();
        let n_up = active.iter().filter(|&&id| up(id)).count();
        out[fi] = !active.is_empty()
            && match cfg.health.panic_threshold {
                None => n_up == 0,
                Some(t) => (n_up as u64) * 100 < u64::from(t) * active.len() as u64,
            };
    }
    out
}

/// Plans the nodes of `cfg`. `old_slots`: the slots the maps hold now, by node id (a node keeps
/// its own); `up(id)`: the node's health (always true without health checks).
pub fn plan(
    cfg: &Config,
    up: &dyn Fn(u32) -> bool,
    old_slots: &BTreeMap<u32, u32>,
) -> Result<NodePlan, maglev::MaglevError> {
    let panic = panic(cfg, up);
    // In panic mode a family's nodes all count as up for its new flows.
    let up_in = |fi: usize, id: u32| panic[fi] || up(id);
    let present: Vec<_> = cfg
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Disabled)
        .collect();
    let slots = stable_indices(cfg.nodes.iter().map(|n| n.id), old_slots, MAX_NODES);
    let new_slots = cfg
        .nodes
        .iter()
        .filter(|n| !old_slots.contains_key(&n.id))
        .map(|n| slots[&n.id])
        .collect();

    let mut nodes = Vec::new();
    let mut takers: [Vec<(u32, u32)>; 2] = [Vec::new(), Vec::new()];
    // Maglev: every active node of the family, up or not (health is applied by stepping past
    // down nodes, so a health change moves only a down node's slots).
    let mut active: [Vec<(u32, u32)>; 2] = [Vec::new(), Vec::new()];
    for n in &present {
        let mut node = Node {
            port: n.port.map(port_wire).unwrap_or(0),
            slot: slots[&n.id],
            ..Node::default()
        };
        let takes_new = |fi: usize| n.state == NodeState::Active && up_in(fi, n.id);
        for (fi, has) in [(0, n.v4().is_some()), (1, n.v6().is_some())] {
            if has && n.state == NodeState::Active {
                active[fi].push((n.id, n.weight));
            }
        }
        if let Some(a) = n.v4() {
            node.addr4 = addr_words(a).0[0];
            node.flags |= NODE_F_V4;
            let fi = family_index(FAMILY_V4) as usize;
            if takes_new(fi) {
                takers[fi].push((n.id, n.weight));
            }
        }
        if let Some(a) = n.v6() {
            node.addr6 = addr_words(a).0;
            node.flags |= NODE_F_V6;
            let fi = family_index(FAMILY_V6) as usize;
            if takes_new(fi) {
                takers[fi].push((n.id, n.weight));
            }
        }
        nodes.push((n.id, node.sealed()));
    }
    let maglev = match cfg.flows.policy {
        FlowPolicy::Maglev => Some([
            maglev::family_table(&active[0], &|id| up_in(0, id))?,
            maglev::family_table(&active[1], &|id| up_in(1, id))?,
        ]),
        FlowPolicy::RoundRobin => None,
    };
    Ok(NodePlan {
        slots,
        new_slots,
        nodes,
        rings: [weighted_ring(&takers[0]), weighted_ring(&takers[1])],
        maglev,
        panic,
    })
}

/// Node ids in round-robin order for new flows: smooth weighted round robin (each node appears
/// `weight` times, spread out), over the nodes that take new flows.
pub fn weighted_ring(nodes: &[(u32, u32)]) -> Vec<u32> {
    let total: i64 = nodes.iter().map(|(_, w)| i64::from(*w)).sum();
    let mut current: Vec<i64> = vec![0; nodes.len()];
    let mut ring = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, (_, w)) in current.iter_mut().zip(nodes) {
            *c += i64::from(*w);
        }
        let best = (0..nodes.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .expect("non-empty");
        current[best] -= total;
        ring.push(nodes[best].0);
    }
    ring
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, with};

    #[test]
    fn weighted_ring_is_spread_and_proportional() {
        assert_eq!(weighted_ring(&[(1, 1), (2, 1)]), [1, 2]);
        assert_eq!(
            weighted_ring(&[(1, 5), (2, 1), (3, 1)]),
            [1, 1, 2, 1, 3, 1, 1]
        );
        let r = weighted_ring(&[(7, 3), (9, 2)]);
        assert_eq!(r.iter().filter(|&&x| x == 7).count(), 3);
        assert_eq!(r.len(), 5);
        assert!(weighted_ring(&[]).is_empty());
    }

    #[test]
    fn disabled_nodes_are_not_in_nodes_but_keep_a_slot() {
        let c = parse(&with("  - id: 2\n", "  - id: 2\n    state: disabled\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let p = plan(&c, &|_| true, &[(1, 7)].into()).expect("plan");
        // Node 2 has a slot (for its reverse NAT), new, so its counters start from zero.
        assert_eq!(p.slots, [(1, 7), (2, 0)].into());
        assert_eq!(p.new_slots, [0]);
        assert_eq!(p.nodes.len(), 1, "a disabled node is not in NODES");
        assert_eq!(p.nodes[0].0, 1);
        assert_eq!(p.rings, [vec![1], vec![]]);
        assert_eq!(p.maglev, None, "the seed config is round robin");
    }

    /// Four dual-stack active nodes and one IPv4-only draining one, with `health:` extra keys.
    fn four(health: &str) -> Config {
        let mut y = String::from(
            "interfaces: [eth0]\nvips: [{address: 192.0.2.10, ports: [5684]}]\nflows: {policy: maglev}\nnodes:\n",
        );
        for id in 1..=4 {
            y.push_str(&format!(
                "  - {{id: {id}, address: [10.0.0.{id}, \"2001:db8::{id}\"]}}\n"
            ));
        }
        y.push_str("  - {id: 5, address: 10.0.0.5, state: draining}\n");
        y.push_str(&format!("health: {{probe: dtls{health}}}\n"));
        parse(&y).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn panic_mode_by_default_only_when_no_active_node_is_up() {
        let c = four("");
        // The draining node's health does not count: it takes no new flows anyway.
        assert_eq!(panic(&c, &|id| id == 5), [true, true]);
        assert_eq!(panic(&c, &|id| id == 4), [false, false]);
        // In panic, every active node of the family takes new flows, as if up.
        let p = plan(&c, &|_| false, &BTreeMap::new()).expect("plan");
        assert_eq!(p.panic, [true, true]);
        assert_eq!(p.rings[0], [1, 2, 3, 4]);
        let tables = p.maglev.expect("maglev");
        for t in &tables {
            let mut ids: Vec<u32> = t.clone();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids, [1, 2, 3, 4], "every active node has slots in panic");
        }
        // Out of panic, the down nodes take none.
        let p = plan(&c, &|id| id == 2, &BTreeMap::new()).expect("plan");
        assert_eq!(p.panic, [false, false]);
        assert_eq!(p.rings, [vec![2], vec![2]]);
        assert!(p
            .maglev
            .expect("maglev")
            .iter()
            .all(|t| t.iter().all(|&id| id == 2)));
    }

    #[test]
    fn panic_threshold_is_a_percent_of_the_familys_active_nodes() {
        let c = four(", panic_threshold: 50");
        // 2 of 4 up: 50% is not below 50%.
        assert_eq!(panic(&c, &|id| id <= 2), [false, false]);
        // 1 of 4 up: 25% < 50%.
        assert_eq!(panic(&c, &|id| id == 1), [true, true]);
        let never = four(", panic_threshold: 0");
        assert_eq!(panic(&never, &|_| false), [false, false]);
        let p = plan(&never, &|_| false, &BTreeMap::new()).expect("plan");
        assert!(
            p.rings.iter().all(Vec::is_empty),
            "no panic: no node takes new flows"
        );
    }
}
