//! The Maglev lookup table for `flows.policy: maglev`: which node a new flow goes to.
//!
//! Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI'16, §3.4.
//! Each node has a permutation of the table's slots, `offset + j * skip (mod size)`, with
//! `offset` and `skip` derived from a fixed-seed hash of the node's *id* (not its position in
//! the config). Nodes take turns claiming the next free slot of their permutation until the
//! table is full. A new flow's slot is `lb_common::hash::flow_hash(&key) % size`.
//!
//! Weights. The paper's round robin gives every node one slot per turn. Here the turns are
//! scheduled by weight: a node's `k`-th slot (k = 0, 1, ...) is claimed at virtual time
//! `k / weight`, turns in time order, ties by node id. Every node claims its first slot at
//! time 0, so every node gets at least one slot. After that node `i` claims slots at rate
//! `weight_i`, so its share is `weight_i / Σ weight` within about one slot plus
//! `n · weight_i / Σ weight` slots (the head start at time 0). This is Katran's MaglevV2 idea
//! (a node claims a slot each time its accumulated weight reaches the largest weight), done
//! with exact rational times and a heap, so a build costs `O(size · log n)` turns whatever
//! the weights are, where the round-based form spends `n` steps per round even when only one
//! node has enough credit to claim.
//!
//! The table is a function of the set of `(id, weight)` pairs and the size only: the input is
//! sorted by id first, so two balancers with the same config build the same table, whatever
//! the order of the nodes in their files, and agree on every new flow with no traffic between
//! them.
//!
//! Removing a node from the config (a rebuild without it) moves all of its slots, to the
//! remaining nodes, and a few slots of other nodes too: a Maglev table is not perfectly stable
//! (NSDI'16 §5.3). Bound, stated from measurement (Maglev has no closed-form one): besides the
//! removed node's own slots, at most [`REMOVAL_BOUND_DEFAULT`] (2%) of the table changes owner
//! at [`DEFAULT_SIZE`], and at most [`REMOVAL_BOUND_ANY`] (8%) at any smaller size the size
//! check allows. Measured over 200 random removals per (node count, size) pair, node counts
//! 2..1024, weights random 1..=100 or all equal: at the default size typically 0.2..0.9% and
//! at worst 1.45% (948 slots, one of 3 equal nodes removed; 1.34% for 64..1024 nodes); at
//! size 4099 up to 6.4% (one of 10 nodes). The test
//! `removing_a_node_moves_its_slots_and_few_others` holds every case it draws to the bounds.
//!
//! Health is local to each balancer, so it is kept out of the table: the agent builds the
//! table from the configured active nodes and then steps past the down ones with
//! [`step_past_down`], which reassigns only the slots of down nodes. A health change then
//! moves no flow of a healthy node, and two balancers that disagree about one node's health
//! disagree only about the flows whose slots that node owns or was chosen to take over.

use std::collections::{BinaryHeap, HashMap};

use lb_common::hash::hash_u32;

/// Default table size: 65537 = 2^16 + 1, a prime (Maglev needs a prime size: every `skip` in
/// `1..size` is then coprime with it, so every permutation visits every slot). It is Katran's
/// default too. With [`lb_common::MAX_NODES`] (1024) nodes of equal weight it gives each 64
/// slots, so shares differ by at most 1/64; the table is 256 KiB as a `u32` array map.
pub const DEFAULT_SIZE: u32 = 65537;

/// A table must have at least this many slots per node (the Maglev paper balances load well
/// only with the size well above the number of nodes; 64 × 1024 nodes fits in [`DEFAULT_SIZE`]).
pub const MIN_SLOTS_PER_NODE: u32 = 64;

/// Largest table size accepted (a 64 MiB array map; builds stay well under a second).
pub const MAX_SIZE: u32 = 1 << 24;

// Fixed seeds: changing any of them changes every table, so balancers of different cidlb
// versions would disagree on new flows. Treat them as part of the contract.
const OFFSET_SEED: u32 = 0x6d61_676f; // "mago"
const SKIP_SEED: u32 = 0x6d61_6773; // "mags"
const PROBE_SEED: u32 = 0x6d61_6770; // "magp"

/// Most of the table, besides the removed node's own slots, that changes owner at
/// [`DEFAULT_SIZE`] when one node is removed from the config (see the module doc).
pub const REMOVAL_BOUND_DEFAULT: f64 = 0.02;
/// The same at any size [`validate_size`] accepts.
pub const REMOVAL_BOUND_ANY: f64 = 0.08;

/// Probes [`step_past_down`] makes along a slot's preference list before it falls back to a
/// pick among the up slots; see there.
pub const MAX_PROBES: u32 = 128;

/// Why a table cannot be built. The caller adds where the values came from (config file and
/// key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "Maglev table size {size} is not a prime: Maglev needs a prime size so that every \
         node's permutation visits every slot; use {DEFAULT_SIZE} or another prime"
    )]
    NotPrime { size: u32 },
    #[error(
        "Maglev table size {size} is too small for {nodes} nodes: it needs at least \
         {MIN_SLOTS_PER_NODE} slots per node ({min}); use a prime of at least {min}, such as \
         {DEFAULT_SIZE}"
    )]
    TooSmall { size: u32, nodes: usize, min: u64 },
    #[error("Maglev table size {size} is larger than the maximum {MAX_SIZE}; use {DEFAULT_SIZE}")]
    TooLarge { size: u32 },
    #[error("node id {id} is listed twice for the Maglev table; node ids must be unique")]
    DuplicateId { id: u32 },
    #[error(
        "node {id} has weight 0 in the Maglev table; a node that takes no new flows must be \
         left out of the table, not given weight 0"
    )]
    ZeroWeight { id: u32 },
}

/// Checks a table size for `nodes` nodes: prime, at most [`MAX_SIZE`], and at least
/// [`MIN_SLOTS_PER_NODE`] slots per node.
pub fn validate_size(size: u32, nodes: usize) -> Result<(), MaglevError> {
    if size > MAX_SIZE {
        return Err(MaglevError::TooLarge { size });
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size });
    }
    let min = nodes as u64 * u64::from(MIN_SLOTS_PER_NODE);
    if u64::from(size) < min {
        return Err(MaglevError::TooSmall { size, nodes, min });
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The Maglev table for `nodes` (`(node id, weight)` in any order): the node id of each of
/// `size` slots. An empty node set gives an empty table (no node takes new flows). Errors on a
/// bad size (see [`validate_size`]), a repeated id, or a weight of 0.
pub fn table(nodes: &[(u32, u32)], size: u32) -> Result<Vec<u32>, MaglevError> {
    validate_size(size, nodes.len())?;
    let mut sorted = nodes.to_vec();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(MaglevError::DuplicateId { id: pair[0].0 });
        }
    }
    if let Some(&(id, _)) = sorted.iter().find(|(_, w)| *w == 0) {
        return Err(MaglevError::ZeroWeight { id });
    }
    if sorted.is_empty() {
        return Ok(Vec::new());
    }
    Ok(fill(&sorted, size))
}

/// One node's next turn: its `k`-th slot, claimed at virtual time `k / weight`.
#[derive(PartialEq, Eq)]
struct Turn {
    k: u64,
    weight: u64,
    /// Position in the id-sorted node list: breaks ties in time, lowest id first.
    node: usize,
}

impl Ord for Turn {
    /// Reversed (earliest time, then lowest id, is greatest) for `BinaryHeap`, a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // k / w compared exactly: k ≤ size ≤ 2^24 and w < 2^32, so products fit in u64.
        (other.k * self.weight)
            .cmp(&(self.k * other.weight))
            .then(other.node.cmp(&self.node))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The population loop (NSDI'16 pseudocode 1, with weighted turns). `sorted`: non-empty,
/// sorted by id, ids unique, weights > 0; `size` prime.
fn fill(sorted: &[(u32, u32)], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    // Each node's permutation: slot `pos`, then `pos + skip`, ... (mod size).
    let mut pos: Vec<u64> = Vec::with_capacity(sorted.len());
    let mut skip: Vec<u64> = Vec::with_capacity(sorted.len());
    for &(id, _) in sorted {
        pos.push(u64::from(hash_u32(id, OFFSET_SEED)) % m);
        skip.push(u64::from(hash_u32(id, SKIP_SEED)) % (m - 1) + 1);
    }
    let mut taken = vec![false; size as usize];
    let mut out = vec![0u32; size as usize];
    let mut turns: BinaryHeap<Turn> = sorted
        .iter()
        .enumerate()
        .map(|(node, &(_, w))| Turn {
            k: 0,
            weight: u64::from(w),
            node,
        })
        .collect();
    for _ in 0..size {
        let mut turn = turns.pop().expect("every node is always in the heap");
        let i = turn.node;
        // The table is not full, and a permutation visits every slot (size is prime), so
        // this ends within `size` steps.
        while taken[pos[i] as usize] {
            pos[i] += skip[i];
            if pos[i] >= m {
                pos[i] -= m;
            }
        }
        taken[pos[i] as usize] = true;
        out[pos[i] as usize] = sorted[i].0;
        turn.k += 1;
        turns.push(turn);
    }
    out
}

/// The table new flows use while some nodes are down: `table` (built by [`table`] from the
/// configured active nodes) with each slot of a down node (`up(id)` false) given to that slot's
/// next preference among the up nodes. Returns an empty table when no node in `table` is up.
///
/// A slot's preference list is the owners of the slots on its probe sequence
/// `s + j · step(s) (mod size)`, j = 1, 2, ..., with `step(s)` from a fixed-seed hash of `s`
/// (a permutation of all slots, as the size is prime). Owners turn up in proportion to their
/// table share, so a down node's flows spread over the up nodes by weight.
///
/// Bound on moved entries: exactly the slots of the down nodes change, all of them, and no
/// other. So a health change never moves a flow of a healthy node. Two balancers whose down
/// sets are `D1 ⊆ D2` disagree only on slots owned by a node of `D2 \ D1` or whose next up
/// preference under `D1` is in `D2 \ D1`: the least the design allows, as the test
/// `nested_down_sets_disagree_only_where_they_must` checks.
///
/// Cost: at most [`MAX_PROBES`] probes per down slot. A slot whose first `MAX_PROBES`
/// preferences are all down (likely only when most of the table is down: with half of it up
/// the odds are 2^-128) falls back to the owner of an up slot picked by the same hash: still
/// deterministic and by weight, but not nested-consistent.
pub fn step_past_down(table: &[u32], up: impl Fn(u32) -> bool) -> Vec<u32> {
    let m = table.len() as u64;
    let mut cache: HashMap<u32, bool> = HashMap::new();
    let slot_up: Vec<bool> = table
        .iter()
        .map(|&id| *cache.entry(id).or_insert_with(|| up(id)))
        .collect();
    let up_slots: Vec<u32> = (0..table.len() as u32)
        .filter(|&s| slot_up[s as usize])
        .collect();
    if up_slots.is_empty() {
        return Vec::new();
    }
    let mut out = table.to_vec();
    for s in 0..table.len() {
        if slot_up[s] {
            continue;
        }
        let h = u64::from(hash_u32(s as u32, PROBE_SEED));
        // m ≥ 2 here: a one-slot table has its only slot either up or no up slot at all.
        let step = h % (m - 1) + 1;
        let mut p = s as u64;
        let mut pick = None;
        for _ in 0..MAX_PROBES {
            p += step;
            if p >= m {
                p -= m;
            }
            if slot_up[p as usize] {
                pick = Some(table[p as usize]);
                break;
            }
        }
        out[s] =
            pick.unwrap_or_else(|| table[up_slots[(h % up_slots.len() as u64) as usize] as usize]);
    }
    out
}

/// The Maglev table new flows of one family use: built from `nodes` (the family's active
/// nodes, `(id, weight)`, in any order) at `MAGLEV_SIZE`, then each slot of a down node given
/// to its next up preference ([`step_past_down`]). Empty: no node takes new flows.
pub fn family_table(
    nodes: &[(u32, u32)],
    up: &dyn Fn(u32) -> bool,
) -> Result<Vec<u32>, MaglevError> {
    let table = table(nodes, lb_common::MAGLEV_SIZE)?;
    Ok(step_past_down(&table, up))
}

#[cfg(test)]
mod tests {
    use lb_common::splitmix::SplitMix64;

    use super::*;

    /// `n` distinct random ids in 0..=max_id with weights in 1..=100.
    fn random_nodes(rng: &mut SplitMix64, n: usize, max_id: u32) -> Vec<(u32, u32)> {
        let mut ids = std::collections::BTreeSet::new();
        while ids.len() < n {
            ids.insert(rng.range(0, max_id));
        }
        let mut v: Vec<(u32, u32)> = ids.into_iter().map(|id| (id, rng.range(1, 100))).collect();
        // Not sorted: the table must not depend on the order.
        for i in (1..v.len()).rev() {
            v.swap(i, rng.range(0, i as u32) as usize);
        }
        v
    }

    /// Slots per node id.
    fn counts(t: &[u32]) -> HashMap<u32, u64> {
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted
            .chunk_by(|a, b| a == b)
            .map(|run| (run[0], run.len() as u64))
            .collect()
    }

    /// Primes for the random tests, each ≥ 64 × the node counts it is used with.
    const PRIMES: [u32; 4] = [4099, 8191, 16381, DEFAULT_SIZE];

    /// The test: over 1000 random node sets and weights (1..=100), each node's share of
    /// the table is within 1 percentage point of its weight share. Also checked: the tighter
    /// bound the module doc derives, |slots − size·w/W| ≤ 1 + n·w/W, every node has a slot, and
    /// no slot names anything else.
    #[test]
    fn shares_follow_weights_over_1000_random_sets() {
        let mut rng = SplitMix64(1);
        let (mut worst_pp, mut worst_slots) = (0.0f64, 0.0f64);
        for round in 0..1000 {
            // Mostly small tables to keep the debug build's run short; every 50th at the
            // default size with up to 1024 nodes.
            let (n, size) = if round % 50 == 0 {
                (rng.range(65, 1024), DEFAULT_SIZE)
            } else {
                (rng.range(1, 64), PRIMES[rng.range(0, 1) as usize])
            };
            let nodes = random_nodes(&mut rng, n as usize, u32::MAX);
            let t = table(&nodes, size).expect("valid input");
            assert_eq!(t.len(), size as usize);
            let c = counts(&t);
            assert_eq!(
                c.len(),
                nodes.len(),
                "a node without a slot, or a stray id: {nodes:?}"
            );
            let total: u64 = nodes.iter().map(|&(_, w)| u64::from(w)).sum();
            for &(id, w) in &nodes {
                let got = c[&id] as f64;
                let ideal = f64::from(size) * f64::from(w) / total as f64;
                let pp = (got - ideal).abs() / f64::from(size) * 100.0;
                assert!(
                    pp < 1.0,
                    "node {id} weight {w}: {got} slots of {size}, ideal {ideal:.1} ({pp:.3} points off)"
                );
                let bound = 1.0 + f64::from(n) * f64::from(w) / total as f64;
                assert!(
                    (got - ideal).abs() <= bound,
                    "node {id} weight {w}: {got} slots, ideal {ideal:.2}, bound ±{bound:.2} ({n} nodes)"
                );
                worst_pp = worst_pp.max(pp);
                worst_slots = worst_slots.max((got - ideal).abs());
            }
        }
        eprintln!("worst share error: {worst_pp:.4} points, {worst_slots:.2} slots");
    }

    /// Weights 1..=100 on 100 nodes: each node's slots track its weight; the weight-100 node
    /// has 100 times the weight-1 node's slots, within the bound above.
    #[test]
    fn weights_1_to_100() {
        let nodes: Vec<(u32, u32)> = (1..=100).map(|w| (1000 + w, w)).collect();
        let t = table(&nodes, DEFAULT_SIZE).unwrap();
        let c = counts(&t);
        let total = 5050.0;
        for &(id, w) in &nodes {
            let ideal = f64::from(DEFAULT_SIZE) * f64::from(w) / total;
            let bound = 1.0 + 100.0 * f64::from(w) / total;
            let got = c[&id] as f64;
            assert!(
                (got - ideal).abs() <= bound,
                "weight {w}: {got} slots, ideal {ideal:.2} ± {bound:.2}"
            );
        }
        // Ideal 12.98 ± 1.02 and 1297.8 ± 2.98 slots (the bound above).
        assert!((12..=14).contains(&c[&1001]), "{}", c[&1001]);
        assert!((1295..=1300).contains(&c[&1100]), "{}", c[&1100]);
    }

    /// Every node gets at least one slot, even the weight-1 nodes beside weight-100 ones at
    /// the most nodes the default size takes (ideal share of a weight-1 node: 0.64 slots).
    #[test]
    fn every_node_gets_a_slot() {
        let nodes: Vec<(u32, u32)> = (0..1024)
            .map(|i| (i * 7919, if i < 1000 { 100 } else { 1 }))
            .collect();
        let t = table(&nodes, DEFAULT_SIZE).unwrap();
        let c = counts(&t);
        for &(id, w) in &nodes {
            assert!(
                c.get(&id).copied().unwrap_or(0) >= 1,
                "node {id} (weight {w}) has no slot"
            );
        }
        // One node: every slot.
        assert!(table(&[(9, 3)], 8191).unwrap().iter().all(|&id| id == 9));
    }

    #[test]
    fn empty_node_set() {
        assert_eq!(table(&[], DEFAULT_SIZE), Ok(Vec::new()));
        // The size is still checked.
        assert_eq!(
            table(&[], 65536),
            Err(MaglevError::NotPrime { size: 65536 })
        );
        assert!(step_past_down(&[], |_| true).is_empty());
    }

    /// Two builds from the same config in different file order are identical.
    #[test]
    fn same_config_in_any_order_gives_the_same_table() {
        let mut rng = SplitMix64(3);
        for _ in 0..20 {
            let n = rng.range(2, 127) as usize;
            let mut nodes = random_nodes(&mut rng, n, 1_000_000);
            let a = table(&nodes, 8191).unwrap();
            nodes.reverse();
            let b = table(&nodes, 8191).unwrap();
            nodes.sort_unstable();
            let c = table(&nodes, 8191).unwrap();
            assert!(a == b && b == c, "order changed the table for {nodes:?}");
        }
    }

    /// Removing a node from the config: all of its slots move, to the remaining nodes, and
    /// few slots of other nodes move with them: at most REMOVAL_BOUND_DEFAULT of the table at
    /// the default size, REMOVAL_BOUND_ANY at smaller ones.
    #[test]
    fn removing_a_node_moves_its_slots_and_few_others() {
        let mut rng = SplitMix64(4);
        let (mut worst_default, mut worst_any) = (0.0f64, 0.0f64);
        for round in 0..80 {
            let (n, size) = match round % 4 {
                0 if round % 8 == 0 => (rng.range(65, 1024), DEFAULT_SIZE),
                0 => (rng.range(2, 64), DEFAULT_SIZE),
                _ => (rng.range(2, 64), PRIMES[rng.range(0, 2) as usize]),
            };
            let mut nodes = random_nodes(&mut rng, n as usize, u32::MAX);
            if round % 3 == 0 {
                nodes.iter_mut().for_each(|(_, w)| *w = 1);
            }
            let before = table(&nodes, size).unwrap();
            let gone = nodes[rng.range(0, n - 1) as usize].0;
            let rest: Vec<_> = nodes
                .iter()
                .copied()
                .filter(|&(id, _)| id != gone)
                .collect();
            let after = table(&rest, size).unwrap();
            let mut others = 0u32;
            for (b, a) in before.iter().zip(&after) {
                assert_ne!(*a, gone, "a slot still names the removed node {gone}");
                if *b != gone && a != b {
                    others += 1;
                }
            }
            let frac = f64::from(others) / f64::from(size);
            let (bound, worst) = if size == DEFAULT_SIZE {
                (REMOVAL_BOUND_DEFAULT, &mut worst_default)
            } else {
                (REMOVAL_BOUND_ANY, &mut worst_any)
            };
            assert!(
                frac <= bound,
                "removing node {gone} of {n} (size {size}) moved {others} slots of other nodes"
            );
            *worst = worst.max(frac);
        }
        eprintln!(
            "worst other slots moved on removal: {:.2}% at size {DEFAULT_SIZE}, {:.2}% at smaller sizes",
            worst_default * 100.0,
            worst_any * 100.0
        );
    }

    /// Down nodes: their slots, and only theirs, move, each to an up node; the moved slots
    /// spread over the up nodes by weight.
    #[test]
    fn step_past_down_moves_only_down_slots() {
        let mut rng = SplitMix64(5);
        for _ in 0..50 {
            let n = rng.range(2, 127);
            let nodes = random_nodes(&mut rng, n as usize, u32::MAX);
            let t = table(&nodes, 16381).unwrap();
            let down: std::collections::HashSet<u32> = nodes
                .iter()
                .filter(|_| rng.range(0, 3) == 0)
                .map(|&(id, _)| id)
                .collect();
            if down.len() == nodes.len() {
                assert!(step_past_down(&t, |id| !down.contains(&id)).is_empty());
                continue;
            }
            let s = step_past_down(&t, |id| !down.contains(&id));
            assert_eq!(s.len(), t.len());
            let mut gained: HashMap<u32, u64> = HashMap::new();
            let mut moved = 0u64;
            for (before, after) in t.iter().zip(&s) {
                if down.contains(before) {
                    assert!(
                        !down.contains(after),
                        "a down node's slot went to down node {after}"
                    );
                    *gained.entry(*after).or_insert(0) += 1;
                    moved += 1;
                } else {
                    assert_eq!(before, after, "an up node's slot moved");
                }
            }
            // By weight: an up node gains about moved · (its slots / up slots).
            let c = counts(&t);
            let up_slots: u64 = c
                .iter()
                .filter(|(id, _)| !down.contains(id))
                .map(|(_, n)| n)
                .sum();
            for (&id, &slots) in c.iter().filter(|(id, _)| !down.contains(id)) {
                let want = moved as f64 * slots as f64 / up_slots as f64;
                let got = gained.get(&id).copied().unwrap_or(0) as f64;
                // Binomial: 6 standard deviations plus one slot.
                let sd = (want * (1.0 - slots as f64 / up_slots as f64)).sqrt();
                assert!(
                    (got - want).abs() <= 6.0 * sd + 1.0,
                    "node {id} gained {got} of {moved} moved slots, expected {want:.1}"
                );
            }
        }
    }

    /// Two balancers with down sets D1 ⊆ D2 (one has seen a node fail that the other has not
    /// yet) disagree only on slots they must: owned by a node of D2 \ D1, or handed by the
    /// first to a node of D2 \ D1.
    #[test]
    fn nested_down_sets_disagree_only_where_they_must() {
        let mut rng = SplitMix64(6);
        for _ in 0..50 {
            let n = rng.range(3, 127);
            let nodes = random_nodes(&mut rng, n as usize, 1 << 20);
            let t = table(&nodes, 16381).unwrap();
            let ids: Vec<u32> = nodes.iter().map(|&(id, _)| id).collect();
            // D1: about a quarter of the nodes; D2: D1 and one or two more, one node stays up.
            let d1: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|_| rng.range(0, 3) == 0)
                .collect();
            let mut d2 = d1.clone();
            for _ in 0..2 {
                let extra = ids[rng.range(0, n - 1) as usize];
                if !d2.contains(&extra) && d2.len() + 1 < ids.len() {
                    d2.push(extra);
                }
            }
            let (s1, s2) = (
                step_past_down(&t, |id| !d1.contains(&id)),
                step_past_down(&t, |id| !d2.contains(&id)),
            );
            let only2 = |id: &u32| d2.contains(id) && !d1.contains(id);
            for i in 0..t.len() {
                if s1[i] != s2[i] {
                    assert!(
                        only2(&t[i]) || only2(&s1[i]),
                        "slot {i}: owner {}, with D1 {} and with D2 {} (D1 {d1:?}, D2 {d2:?})",
                        t[i],
                        s1[i],
                        s2[i]
                    );
                }
            }
        }
    }

    fn digest(t: &[u32]) -> u64 {
        t.iter().enumerate().fold(0u64, |d, (s, &id)| {
            d.wrapping_add((s as u64 + 1) * u64::from(id))
        })
    }

    /// Tables computed by a second implementation written apart from this one (Python, with
    /// the `mmh3` package's MurmurHash3 and exact fractions for the turn times), from the
    /// algorithm as the module doc states it. Pins the algorithm and its seeds: balancers of
    /// different versions must build the same table.
    #[test]
    fn known_tables_from_a_second_implementation() {
        // Sizes below the 64-slots-per-node minimum, so through `fill` directly.
        assert_eq!(
            fill(&[(1, 1), (2, 2), (7, 3)], 13),
            [1, 7, 7, 7, 1, 2, 2, 7, 7, 7, 1, 2, 2]
        );
        assert_eq!(
            step_past_down(&fill(&[(1, 1), (2, 2), (7, 3)], 13), |id| id != 2),
            [1, 7, 7, 7, 1, 1, 7, 7, 7, 7, 1, 1, 1]
        );
        assert_eq!(
            fill(&[(10, 1), (20, 1), (40, 2), (300, 5)], 17),
            [300, 300, 300, 300, 300, 10, 300, 300, 40, 20, 40, 300, 40, 40, 20, 10, 300]
        );
        let t = table(&[(3, 1), (1, 2), (2, 1), (1_000_000, 4)], DEFAULT_SIZE).unwrap();
        assert_eq!(
            t[..16],
            [
                1, 1_000_000, 1, 2, 1_000_000, 1_000_000, 1_000_000, 3, 2, 1, 1_000_000, 3,
                1_000_000, 1, 1_000_000, 3
            ]
        );
        let c = counts(&t);
        assert_eq!(
            (c[&1_000_000], c[&1], c[&2], c[&3]),
            (32768, 16385, 8192, 8192)
        );
        assert_eq!(digest(&t), 0x0003_d08e_e3a7_75e1);
        let s = step_past_down(&t, |id| id != 2);
        assert_eq!(digest(&s), 0x0004_5dd6_bd48_59f3);
        // Most of the table down: the fallback after MAX_PROBES runs for some slots.
        let t = table(&[(3, 1), (1, 2), (2, 1), (1_000_000, 100)], DEFAULT_SIZE).unwrap();
        let s = step_past_down(&t, |id| id != 1_000_000);
        let c = counts(&s);
        assert_eq!((c[&1], c[&2], c[&3]), (32905, 16205, 16427));
        assert_eq!(digest(&s), 0xe060_df01);
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        assert_eq!(
            table(&[(1, 1)], 65535),
            Err(MaglevError::NotPrime { size: 65535 })
        );
        assert_eq!(table(&[(1, 1)], 0), Err(MaglevError::NotPrime { size: 0 }));
        assert_eq!(table(&[(1, 1)], 1), Err(MaglevError::NotPrime { size: 1 }));
        // 16777259 is the first prime above 2^24.
        assert_eq!(
            table(&[(1, 1)], 16_777_259),
            Err(MaglevError::TooLarge { size: 16_777_259 })
        );
        // 127 nodes fit in 8191 (64 × 127 = 8128), 128 do not (8192).
        let nodes: Vec<(u32, u32)> = (0..128).map(|i| (i, 1)).collect();
        assert!(table(&nodes[..127], 8191).is_ok());
        let e = table(&nodes, 8191).unwrap_err();
        assert_eq!(
            e,
            MaglevError::TooSmall {
                size: 8191,
                nodes: 128,
                min: 8192
            }
        );
        assert!(e.to_string().contains("at least 64 slots per node"), "{e}");
        assert_eq!(
            table(&[(1, 1), (2, 3), (1, 2)], 8191),
            Err(MaglevError::DuplicateId { id: 1 })
        );
        let e = table(&[(1, 1), (2, 0)], 8191).unwrap_err();
        assert_eq!(e, MaglevError::ZeroWeight { id: 2 });
        assert!(e.to_string().contains("left out of the table"), "{e}");
        for p in [2, 3, 5, 7, 8191, 65537, 16_777_213] {
            assert!(is_prime(p), "{p}");
        }
        for c in [0, 1, 4, 9, 65535, 65539 * 3, 16_777_215] {
            assert!(!is_prime(c), "{c}");
        }
    }

    /// Building the default table for 1024 nodes (the most the datapath holds). The issue asks
    /// for well under 100 ms in release (measured: 7 ms); the debug build here gets a loose 3 s.
    #[test]
    fn build_time_1024_nodes() {
        let nodes: Vec<(u32, u32)> = (0..1024).map(|i| (i, 1 + i % 100)).collect();
        let start = std::time::Instant::now();
        let t = table(&nodes, DEFAULT_SIZE).unwrap();
        let took = start.elapsed();
        assert_eq!(counts(&t).len(), 1024);
        let limit = if cfg!(debug_assertions) { 3000 } else { 100 };
        assert!(took.as_millis() < limit, "took {took:?}");
        eprintln!("1024 nodes, size {DEFAULT_SIZE}: {took:?}");
        // The health step's worst case: one node of 1024 up, so nearly every slot exhausts
        // its MAX_PROBES probes and falls back.
        let start = std::time::Instant::now();
        let s = step_past_down(&t, |id| id == 99);
        let took = start.elapsed();
        assert!(s.iter().all(|&id| id == 99));
        assert!(took.as_millis() < limit, "step took {took:?}");
        eprintln!("step past 1023 down nodes of 1024: {took:?}");
    }
}
