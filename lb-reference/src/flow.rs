//! Everything balanced that is not a routable tls12_cid record is pinned per 5-tuple: a known
//! flow goes to its node, a new one takes the next node of its family's round-robin ring.
//! No flow is evicted or expires here: the caller keeps the table below capacity and the idle
//! timeout far away.

use lb_common::{Counter, FlowKey, Node, FAMILY_V6, MAX_NODES, NODE_F_V4, NODE_F_V6};

use crate::{
    parse::{Packet, Udp},
    stats::Outcome,
    State, Tables,
};

fn family_index(family: u8) -> usize {
    usize::from(family == FAMILY_V6)
}

pub fn has_family(node: &Node, family: u8) -> bool {
    let flag = if family == FAMILY_V6 {
        NODE_F_V6
    } else {
        NODE_F_V4
    };
    node.flags & flag != 0
}

pub fn route(
    t: &Tables,
    state: &mut State,
    pkt: &Packet,
    udp: &Udp,
    out: &mut Outcome,
) -> Result<Node, Counter> {
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: udp.sport,
        dport: udp.dport,
        family: pkt.family,
        _pad: [0; 3],
    };
    let mut expired = false;
    if let Some(id) = state.flows.get(&key) {
        // A flow whose node is gone (or lost the family) is re-pinned.
        if let Some(node) = t.nodes.get(id).filter(|n| has_family(n, pkt.family)) {
            out.count(Counter::FlowHit);
            return Ok(*node);
        }
        expired = true;
    }
    let (id, node) = pick(t, state, pkt.family)?;
    state.flows.insert(key, id);
    out.count(Counter::FlowNew);
    if expired {
        out.count(Counter::FlowExpired);
    }
    Ok(node)
}

/// Round robin over the family's ring (the cursor advances even if the node it lands on has
/// vanished from `NODES`). A Maglev policy replaces this function.
fn pick(t: &Tables, state: &mut State, family: u8) -> Result<(u32, Node), Counter> {
    let fi = family_index(family);
    let len = t.ring_len[fi];
    if len == 0 || len > MAX_NODES {
        return Err(Counter::DropNoNode);
    }
    let pos = state.rr[fi] % len;
    state.rr[fi] = pos + 1;
    let id = *t.ring[fi].get(pos as usize).ok_or(Counter::DropNoNode)?;
    let node = *t.nodes.get(&id).ok_or(Counter::DropNoNode)?;
    Ok((id, node))
}
