//! Everything balanced that is not routed by CID (`dtls.rs`: a tls12_cid record or a DTLS 1.3
//! unified header of an enabled version) is pinned per 5-tuple: a known
//! flow goes to its node, a new one takes its slot's node in its family's Maglev table
//! (`flows.policy: maglev`) or the next node of its family's round-robin ring.
//! A new flow must first pass the new-flow limits (`limit.rs`); a hit changes no limit state.
//! No flow is evicted or expires here: the caller keeps the table below capacity and the idle
//! timeout far away.

use lb_common::{
    Counter, FlowKey, Node, FAMILY_V6, MAGLEV_SIZE, MAX_NODES, NODE_F_V4, NODE_F_V6, POLICY_MAGLEV,
};

use crate::{
    limit,
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
) -> Result<(u32, Node), Counter> {
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
            return Ok((*id, *node));
        }
        expired = true;
    }
    // Over a new-flow limit: dropped before a node is picked or anything is inserted.
    limit::admit(t, state, pkt, out)?;
    let (id, node) = if t.config().policy == POLICY_MAGLEV {
        maglev(t, &key)?
    } else {
        pick(t, state, pkt.family)?
    };
    state.flows.insert(key, id);
    out.count(Counter::FlowNew);
    if expired {
        out.count(Counter::FlowExpired);
    }
    Ok((id, node))
}

/// Round robin over the family's ring (the cursor advances even if the node it lands on has
/// vanished from `NODES`).
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

/// The owner of the flow's slot in the family's active Maglev table (`MAGLEV_CTL` 1: half 0,
/// 2: half 1; anything else: no table, no node). The round-robin cursor does not move.
fn maglev(t: &Tables, key: &FlowKey) -> Result<(u32, Node), Counter> {
    let fi = family_index(key.family);
    let half = match t.maglev_ctl[fi] {
        1 => 0,
        2 => 1,
        _ => return Err(Counter::DropNoNode),
    };
    let slot = murmur3_32(&key_bytes(key), FLOW_SEED) % MAGLEV_SIZE;
    let at = (fi * 2 + half) * MAGLEV_SIZE as usize + slot as usize;
    let id = *t.maglev.get(at).ok_or(Counter::DropNoNode)?;
    let node = *t.nodes.get(&id).ok_or(Counter::DropNoNode)?;
    Ok((id, node))
}

/// The flow hash's seed, "cidl" (docs/datapath.md: the Maglev slot of a new flow).
const FLOW_SEED: u32 = 0x6369_646c;

/// The 40 bytes the flow hash covers: source and destination address and port as on the wire,
/// the family, three zero bytes.
fn key_bytes(key: &FlowKey) -> [u8; 40] {
    let mut b = [0u8; 40];
    // The addresses are held as the wire bytes loaded into native (little-endian) words.
    for (i, w) in key.src.iter().chain(&key.dst).enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    // Ports likewise: the wire's two bytes loaded into a u16.
    b[32..34].copy_from_slice(&key.sport.to_le_bytes());
    b[34..36].copy_from_slice(&key.dport.to_le_bytes());
    b[36] = key.family;
    b
}

/// MurmurHash3_x86_32 over bytes (Appleby's reference, SMHasher), written from its
/// definition: 4-byte little-endian blocks, a 1..3-byte tail, the length, `fmix32`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let scramble = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        h = (h ^ scramble(k))
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let k = tail.iter().rev().fold(0u32, |k, &b| (k << 8) | b as u32);
        h ^= scramble(k);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::murmur3_32;

    /// Published MurmurHash3_x86_32 values (SMHasher's function; the usual test vectors).
    #[test]
    fn murmur3_matches_published_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }
}
