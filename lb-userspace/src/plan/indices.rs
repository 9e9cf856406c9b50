//! Stable indices: a node keeps its slot (per-node counters, next-hop cache) and a VIP its port
//! bitmap index across reloads.

use std::collections::{BTreeMap, HashSet};

/// An index below `limit` for each key: the one it had in `old` if any, else the lowest index
/// that is neither kept nor freed by this pass. A freed index (its key is in `old` but gone)
/// is held back for one pass: packets running while the maps change may still use it for the
/// key that had it (a node's cached next hop, a VIP's port bitmap), so giving it to a new key
/// in the same pass would mix the two. Only when no other index is left does a new key take a
/// freed one. Validation bounds the number of keys by `limit`.
pub fn stable_indices<K: Ord + Copy>(
    keys: impl Iterator<Item = K>,
    old: &BTreeMap<K, u32>,
    limit: u32,
) -> BTreeMap<K, u32> {
    let keys: Vec<K> = keys.collect();
    let mut out = BTreeMap::new();
    let mut used = HashSet::new();
    for k in &keys {
        if let Some(&i) = old.get(k) {
            out.insert(*k, i);
            used.insert(i);
        }
    }
    let freed: HashSet<u32> = old
        .values()
        .copied()
        .filter(|i| !used.contains(i))
        .collect();
    let mut fresh = (0..limit).filter(|i| !used.contains(i) && !freed.contains(i));
    let mut reused = {
        let mut f: Vec<u32> = freed.iter().copied().collect();
        f.sort_unstable();
        f.into_iter()
    };
    for k in &keys {
        if out.contains_key(k) {
            continue;
        }
        let i = fresh.next().or_else(|| reused.next());
        debug_assert!(i.is_some(), "validation bounds the number of keys");
        out.insert(*k, i.unwrap_or(0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_stay_with_their_keys() {
        let old: BTreeMap<u32, u32> = [(10, 0), (20, 1), (30, 2)].into();
        // 20 removed, 40 added: 10 and 30 keep theirs; 40 does not take the 1 that 20 freed
        // in this pass (a packet may still use it for 20), but the next free one.
        let new = stable_indices([10u32, 30, 40].into_iter(), &old, 8);
        assert_eq!(new, [(10, 0), (30, 2), (40, 3)].into());
        // The pass after, 1 is free like any other index.
        let next = stable_indices([10u32, 30, 40, 50].into_iter(), &new, 8);
        assert_eq!(next, [(10, 0), (30, 2), (40, 3), (50, 1)].into());
        // With no other index left, a freed one is taken after all.
        let full = stable_indices([10u32, 30, 40].into_iter(), &old, 3);
        assert_eq!(full, [(10, 0), (30, 2), (40, 1)].into());
    }
}
