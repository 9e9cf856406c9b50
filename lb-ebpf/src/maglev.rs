//! `flows.policy: maglev`: a new flow's node is the owner of its slot in the family's Maglev
//! table, `MAGLEV[(family index * 2 + half) * MAGLEV_SIZE + flow_hash(key) % MAGLEV_SIZE]`,
//! with `half` the active one in `MAGLEV_CTL[family index]`.
//!
//! The pick depends only on the flow's 5-tuple and the table, and the agent builds the table
//! from the config's node ids and weights alone (`lb-userspace/src/maglev.rs`), stepping past
//! nodes its health checks hold down. So balancers with the same config send a new flow to the
//! same node, and so does a balancer restarted cold (empty flow table) — no state is shared.

use lb_common::{
    family_index, hash::flow_hash, Counter, FlowKey, Node, MAGLEV_CTL_HALF0, MAGLEV_SIZE,
};

use crate::maps;

/// The Maglev pick for a new flow: its node id and node. `DropNoNode` when the family has no
/// table (no node takes its new flows) or the slot names a node that is gone (the agent
/// writes new nodes before a table naming them, so only a racing removal gets here).
#[inline(always)]
pub fn pick(key: &FlowKey) -> Result<(u32, Node), Counter> {
    let fi = family_index(key.family);
    let ctl = *maps::MAGLEV_CTL.get(fi).ok_or(Counter::DropNoNode)?;
    let half = ctl.wrapping_sub(MAGLEV_CTL_HALF0);
    // ctl 0 (no table) wraps to a large value and is refused with anything out of range.
    if half > 1 {
        return Err(Counter::DropNoNode);
    }
    // One u32 modulo by a constant (BPF_MOD); the hash is straight-line code (no loops).
    let slot = flow_hash(key) % MAGLEV_SIZE;
    let id = *maps::MAGLEV
        .get((fi * 2 + half) * MAGLEV_SIZE + slot)
        .ok_or(Counter::DropNoNode)?;
    let node = maps::node(id).ok_or(Counter::DropNoNode)?;
    Ok((id, node))
}
