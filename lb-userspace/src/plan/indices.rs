//! Stable indices: a node keeps its slot (per-node counters, next-hop cache) and a VIP its port
//! bitmap index across reloads.

use std::collections::{BTreeMap, HashSet};

/// An index below `limit` for each key: the one it had in `old` if any, else the lowest free.
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
    let mut next = 0;
    for k in &keys {
        if out.contains_key(k) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        debug_assert!(next < limit, "validation bounds the number of keys");
        out.insert(*k, next);
        used.insert(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_stay_with_their_keys() {
        let old: BTreeMap<u32, u32> = [(10, 0), (20, 1), (30, 2)].into();
        // 20 removed, 40 added: 10 and 30 keep theirs, 40 takes the freed 1.
        let new = stable_indices([10u32, 30, 40].into_iter(), &old, 8);
        assert_eq!(new, [(10, 0), (30, 2), (40, 1)].into());
    }
}
