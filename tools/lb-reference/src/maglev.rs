//! The Maglev tables (`flows.policy: maglev`, docs/configuration.md): built here from the config's nodes, the
//! way docs/configuration.md and the Maglev paper say, so that the table the agent writes into `MAGLEV`
//! can be checked slot by slot rather than trusted.
//!
//! Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI'16, §3.4
//! (populate, pseudocode 1): each node has a preference list of slots, `offset`, `offset +
//! skip`, `offset + 2·skip`, ... (mod M, M prime so every list visits every slot); the nodes
//! take turns, each claiming the first slot of its list not yet claimed, until every slot is.
//! What this project fixes on top (its contract, shared by every balancer):
//! - M = `MAGLEV_SIZE` (65537); one table per family, from the `active` nodes that have an
//!   address of that family (draining and disabled nodes take no new flows); none: no table;
//! - `offset = hash_u32(id, "mago") % M`, `skip = hash_u32(id, "mags") % (M - 1) + 1`, with
//!   `lb_common::hash::hash_u32` (node ids, not their order in the file);
//! - weights: a node's k-th claim (k = 0, 1, ...) comes at virtual time k / weight; claims go in
//!   time order, equal times lowest id first (so every node claims a slot at time 0);
//! - the agent writes a new table into the half of `MAGLEV` no reader is directed to (half 0
//!   when there is none), then flips `MAGLEV_CTL`; a family without a table gets `MAGLEV_CTL`
//!   0 and its halves stay as they were.
//!
//! Health is not modelled: the fuzzer provisions with every node up, where stepping past down
//! nodes changes nothing.

use lb_common::{hash::hash_u32, MAGLEV_CTL_EMPTY, MAGLEV_CTL_HALF0, MAGLEV_ENTRIES, MAGLEV_SIZE};

/// Seeds of the permutation hashes ("mago", "mags"): part of the contract, as
/// `lb_common::hash::FLOW_SEED` is.
const OFFSET_SEED: u32 = 0x6d61_676f;
const SKIP_SEED: u32 = 0x6d61_6773;

/// A configured node as the table sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub weight: u32,
    /// Has an address of family index 0 (IPv4) / 1 (IPv6).
    pub families: [bool; 2],
    /// `state: active` (draining and disabled nodes are left out).
    pub active: bool,
}

/// One family's table from `(id, weight)` pairs (any order, ids unique, weights ≥ 1): the
/// node id of each of the `MAGLEV_SIZE` slots; empty for no nodes.
pub fn build(nodes: &[(u32, u32)]) -> Vec<u32> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let m = u64::from(MAGLEV_SIZE);
    let mut nodes = nodes.to_vec();
    nodes.sort_unstable();
    let offset: Vec<u64> = nodes
        .iter()
        .map(|&(id, _)| u64::from(hash_u32(id, OFFSET_SEED)) % m)
        .collect();
    let skip: Vec<u64> = nodes
        .iter()
        .map(|&(id, _)| u64::from(hash_u32(id, SKIP_SEED)) % (m - 1) + 1)
        .collect();
    // Per node: the next entry of its preference list to try, and the claims made so far.
    let mut next = vec![0u64; nodes.len()];
    let mut claims = vec![0u64; nodes.len()];
    let mut owner: Vec<Option<u32>> = vec![None; MAGLEV_SIZE as usize];
    for _ in 0..m {
        // Whose claim comes first: least claims / weight (cross-multiplied: exact), then the
        // lowest id (the first in id order).
        let mut i = 0;
        for j in 1..nodes.len() {
            let (wi, wj) = (u64::from(nodes[i].1.max(1)), u64::from(nodes[j].1.max(1)));
            if claims[j] * wi < claims[i] * wj {
                i = j;
            }
        }
        loop {
            let slot = ((offset[i] + next[i] % m * skip[i]) % m) as usize;
            next[i] += 1;
            if owner[slot].is_none() {
                owner[slot] = Some(nodes[i].0);
                break;
            }
        }
        claims[i] += 1;
    }
    owner.into_iter().map(|o| o.unwrap_or(0)).collect()
}

/// `MAGLEV` and `MAGLEV_CTL` as the agent must have left them after each provisioning.
#[derive(Clone, Debug)]
pub struct Maglev {
    /// `(family index * 2 + half) * MAGLEV_SIZE + slot` → node id; a fresh map is all zero.
    pub entries: Vec<u32>,
    pub ctl: [u32; 2],
}

impl Default for Maglev {
    fn default() -> Self {
        Self {
            entries: vec![0; MAGLEV_ENTRIES as usize],
            ctl: [MAGLEV_CTL_EMPTY; 2],
        }
    }
}

const FAMILY: [&str; 2] = ["IPv4", "IPv6"];

impl Maglev {
    /// One provisioning (load or reload) of a `flows.policy: maglev` config: each family's new
    /// table into its inactive half, then that half made active.
    pub fn provision(&mut self, members: &[Member]) {
        for fi in 0..2 {
            let nodes: Vec<(u32, u32)> = members
                .iter()
                .filter(|n| n.active && n.families[fi])
                .map(|n| (n.id, n.weight))
                .collect();
            let table = build(&nodes);
            if table.is_empty() {
                self.ctl[fi] = MAGLEV_CTL_EMPTY;
                continue;
            }
            let half = usize::from(self.ctl[fi] == MAGLEV_CTL_HALF0);
            let base = (fi * 2 + half) * MAGLEV_SIZE as usize;
            self.entries[base..base + MAGLEV_SIZE as usize].copy_from_slice(&table);
            self.ctl[fi] = MAGLEV_CTL_HALF0 + half as u32;
        }
    }

    /// Slot by slot against the kernel's `MAGLEV` (whole) and `MAGLEV_CTL`: the first
    /// difference, named by family, half and slot, with how many slots differ in all.
    pub fn compare(&self, kernel: &[u32], kernel_ctl: [u32; 2]) -> Result<(), String> {
        for fi in 0..2 {
            if kernel_ctl[fi] != self.ctl[fi] {
                return Err(format!(
                    "MAGLEV_CTL[{}] is {} in the kernel, the reference wants {} (0: no table, 1: \
                     half 0 active, 2: half 1)",
                    FAMILY[fi], kernel_ctl[fi], self.ctl[fi]
                ));
            }
        }
        if kernel.len() != self.entries.len() {
            return Err(format!(
                "MAGLEV holds {} entries in the kernel, the reference {}",
                kernel.len(),
                self.entries.len()
            ));
        }
        let size = MAGLEV_SIZE as usize;
        let differ: Vec<usize> = (0..kernel.len())
            .filter(|&i| kernel[i] != self.entries[i])
            .collect();
        let Some(&first) = differ.first() else {
            return Ok(());
        };
        let (table, slot) = (first / size, first % size);
        let half_state = if self.ctl[table / 2] == MAGLEV_CTL_HALF0 + (table % 2) as u32 {
            "active"
        } else {
            "inactive"
        };
        Err(format!(
            "MAGLEV {} half {} ({half_state}) slot {slot}: the agent wrote node {}, the reference \
             built node {} ({} slot(s) differ in all)",
            FAMILY[table / 2],
            table % 2,
            kernel[first],
            self.entries[first],
            differ.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(t: &[u32], id: u32) -> f64 {
        t.iter().filter(|&&x| x == id).count() as f64 / t.len() as f64
    }

    #[test]
    fn weights_set_the_shares_and_order_does_not_matter() {
        let a = build(&[(7, 1), (3, 2), (11, 1)]);
        let b = build(&[(11, 1), (7, 1), (3, 2)]);
        assert_eq!(a, b);
        assert_eq!(a.len(), MAGLEV_SIZE as usize);
        assert!((share(&a, 3) - 0.5).abs() < 0.01);
        assert!((share(&a, 7) - 0.25).abs() < 0.01);
        assert!(build(&[]).is_empty());
        assert!(build(&[(1, 1)]).iter().all(|&x| x == 1));
    }

    #[test]
    fn provisioning_alternates_halves_and_compare_names_the_slot() {
        let n = |id, v6| Member {
            id,
            weight: 1,
            families: [true, v6],
            active: true,
        };
        let mut m = Maglev::default();
        m.provision(&[n(1, false), n(2, false)]);
        assert_eq!(m.ctl, [MAGLEV_CTL_HALF0, MAGLEV_CTL_EMPTY]);
        m.provision(&[n(1, true), n(2, false)]);
        assert_eq!(m.ctl, [MAGLEV_CTL_HALF0 + 1, MAGLEV_CTL_HALF0]);
        assert_eq!(m.compare(&m.entries, m.ctl), Ok(()));
        let mut k = m.entries.clone();
        let s = MAGLEV_SIZE as usize;
        let j = (s + 1..2 * s).find(|&j| k[j] != k[s]).unwrap();
        k.swap(s, j);
        let e = m.compare(&k, m.ctl).unwrap_err();
        assert!(e.starts_with("MAGLEV IPv4 half 1 (active) slot 0:"), "{e}");
        assert!(e.contains("2 slot(s) differ"), "{e}");
    }
}
