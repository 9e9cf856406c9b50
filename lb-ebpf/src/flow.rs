//! Where a flow is pinned: every balanced packet that is not routed by CID (a tls12_cid
//! record or DTLS 1.3 unified header of an enabled version naming a node; see `dtls.rs`)
//! (ClientHello, the cookie exchange, the rest of the handshake, non-CID sessions) goes to the
//! node recorded for its 5-tuple; a new or idle-expired flow takes its Maglev pick
//! (`maglev.rs`, `flows.policy: maglev`) or the next node in the family's round-robin ring.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    family_index, Counter, DpConfig, Flow, FlowKey, Node, FAMILY_V6, MAX_NODES, NODE_F_V4,
    NODE_F_V6, POLICY_MAGLEV,
};

use crate::{maglev, maps, parse::Packet, parse::Udp, stats::count};

/// The node for this packet's flow, pinning a new flow if needed.
#[inline(always)]
pub fn route(pkt: &Packet, udp: &Udp, cfg: &DpConfig) -> Result<Node, Counter> {
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: udp.sport,
        dport: udp.dport,
        family: pkt.family,
        _pad: [0; 3],
    };
    // The coarse clock (CLOCK_MONOTONIC as of the last tick, 1–10 ms): idle timeouts are
    // seconds, and the precise clock (bpf_ktime_get_ns) costs about 23 ns per call in a VM,
    // more than the rest of a known flow's lookup. Cilium's conntrack ages by jiffies alike.
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut expired = false;
    if let Some(flow) = maps::FLOWS.get_ptr_mut(key) {
        // SAFETY: LRU map value under the program's RCU read lock; a racing writer can only
        // make last_seen or node_id stale, both of which are benign.
        let (node_id, last) = unsafe { ((*flow).node_id, (*flow).last_seen_ns) };
        let idle = now.saturating_sub(last);
        // last_seen is rewritten only when older than refresh_ns, so a busy flow does not
        // write its entry (and bounce its cache line between CPUs) on every packet. It thus
        // lags the flow's last packet by up to refresh_ns: a flow is forgotten only once
        // idle_timeout + refresh_ns have passed since last_seen, so never before it has
        // truly been idle for idle_timeout (and at most refresh_ns after).
        if idle <= cfg.idle_timeout_ns.saturating_add(cfg.refresh_ns) {
            if let Some(node) = maps::node(node_id).filter(|n| has_family(n, pkt.family)) {
                if idle > cfg.refresh_ns {
                    unsafe { (*flow).last_seen_ns = now };
                }
                count(Counter::FlowHit);
                return Ok(node);
            }
        }
        expired = true;
    }

    // Over a new-flow limit: dropped before anything is inserted.
    crate::limit::admit(pkt)?;
    // CONFIG is a read-only global: the verifier sees the policy as a constant and drops the
    // other branch.
    let (node_id, node) = if cfg.policy == POLICY_MAGLEV {
        maglev::pick(&key)?
    } else {
        next_node(pkt.family)?
    };
    let flow = Flow {
        node_id,
        _pad: 0,
        last_seen_ns: now,
    };
    if maps::FLOWS.insert(key, flow, 0).is_err() {
        count(Counter::FlowInsertFailed);
    }
    count(Counter::FlowNew);
    if expired {
        count(Counter::FlowExpired);
    }
    Ok(node)
}

#[inline(always)]
fn has_family(node: &Node, family: u8) -> bool {
    let flag = if family == FAMILY_V6 {
        NODE_F_V6
    } else {
        NODE_F_V4
    };
    node.flags & flag != 0
}

/// Round robin over the family's ring with a per-CPU cursor.
#[inline(always)]
fn next_node(family: u8) -> Result<(u32, Node), Counter> {
    let fi = family_index(family);
    let len = maps::RING_LEN.get(fi).copied().unwrap_or(0);
    if len == 0 || len > MAX_NODES {
        return Err(Counter::DropNoNode);
    }
    let cursor = maps::RR.get_ptr_mut(fi).ok_or(Counter::DropNoNode)?;
    // SAFETY: per-CPU slot.
    let pos = unsafe {
        let pos = *cursor % len;
        *cursor = pos + 1;
        pos
    };
    let id = *maps::RING
        .get(fi * MAX_NODES + pos)
        .ok_or(Counter::DropNoNode)?;
    let node = maps::node(id).ok_or(Counter::DropNoNode)?;
    Ok((id, node))
}

/// Does this node have an address of the packet's family? (CID-routed packets check this.)
#[inline(always)]
pub fn node_serves(node: &Node, pkt: &Packet) -> bool {
    has_family(node, pkt.family)
}
