//! VIPs as the datapath holds them: `VIPS` (address → port bitmap index), `VIP_PORTS` (the
//! bitmaps) and `VIP_TABLE` (the open-addressing table the datapath probes first).

use std::collections::BTreeMap;

use lb_common::{
    addr_key, addr_words,
    hash::vip_slot,
    port_wire,
    tunnel::{Tunnel, ENCAP_GUE, ENCAP_IPIP},
    AddrKey, VipSlot, PORT_WORDS, VIP_PROBES, VIP_SLOT_EMPTY, VIP_SLOT_REMOVED, VIP_TABLE_SLOTS,
};

use crate::config::{Config, Encap, Vip};

/// The `VIPS` key of each VIP, in config order.
pub fn keys(cfg: &Config) -> Vec<AddrKey> {
    cfg.vips.iter().map(|v| addr_key(v.address)).collect()
}

/// A VIP's `VIP_PORTS` bitmap: bit `p` set for each port `p` it balances.
pub fn port_words(vip: &Vip) -> Vec<u64> {
    let mut words = vec![0u64; PORT_WORDS as usize];
    for range in &vip.ports {
        for p in range.ports() {
            words[p as usize / 64] |= 1 << (p % 64);
        }
    }
    words
}

/// A VIP's `VIP_TUNNEL` entry: all zero in NAT mode.
pub fn tunnel(vip: &Vip) -> Tunnel {
    let Some(t) = vip.tunnel() else {
        return Tunnel::default();
    };
    let mut out = Tunnel {
        encap: match t.encap {
            Encap::Ipip => ENCAP_IPIP,
            Encap::Gue => ENCAP_GUE,
        },
        gue_port: port_wire(t.gue_port.unwrap_or(0)),
        mtu: t.mtu.unwrap_or(0),
        ..Tunnel::default()
    };
    if let Some(p) = t.source4 {
        out.src4 = addr_words(p.addr).0[0];
        out.src4_bits = 32 - p.len;
    }
    if let Some(p) = t.source6 {
        out.src6 = addr_words(p.addr).0;
        out.src6_bits = 128 - p.len;
    }
    out
}

/// `VIP_TABLE` once `want` (VIP → bitmap index) is placed in `table`: a VIP keeps its slot
/// (with its index updated), a slot whose VIP is gone becomes `VIP_SLOT_REMOVED`, and a new
/// VIP takes the first empty or removed slot of its probe sequence, or, when the first
/// `VIP_PROBES` are all taken, none (the datapath then finds it in `VIPS`).
pub fn vip_table(table: &[VipSlot], want: &BTreeMap<AddrKey, u32>) -> Vec<VipSlot> {
    let key = |s: &VipSlot| AddrKey {
        addr: s.addr,
        family: s.family,
        _pad: [0; 3],
    };
    let live = |s: &VipSlot| s.family != VIP_SLOT_EMPTY && s.family != VIP_SLOT_REMOVED;
    let mut out: Vec<VipSlot> = table
        .iter()
        .map(|s| match want.get(&key(s)) {
            Some(&index) if live(s) => VipSlot { index, ..*s },
            _ if live(s) => VipSlot {
                family: VIP_SLOT_REMOVED,
                ..*s
            },
            _ => *s,
        })
        .collect();
    for (k, &index) in want {
        if out.iter().any(|s| live(s) && key(s) == *k) {
            continue;
        }
        let start = vip_slot(&k.addr, k.family);
        // Not a slot whose VIP this pass removes: a reader may be comparing against that
        // VIP right now, and would see half of each (the slot is free again next pass).
        let free = (0..VIP_PROBES)
            .map(|i| ((start + i) % VIP_TABLE_SLOTS) as usize)
            .find(|&i| !live(&out[i]) && !live(&table[i]));
        if let Some(i) = free {
            out[i] = VipSlot {
                addr: k.addr,
                family: k.family,
                _pad: [0; 3],
                index,
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::FAMILY_V4;

    /// The datapath's probe (`lb-ebpf/src/vip.rs`): `Some(Some(index))` found in the table,
    /// `Some(None)` ended at an empty slot, `None` fell through to `VIPS`.
    fn probe(table: &[VipSlot], k: &AddrKey) -> Option<Option<u32>> {
        let start = vip_slot(&k.addr, k.family);
        for i in 0..VIP_PROBES {
            let s = &table[((start + i) % VIP_TABLE_SLOTS) as usize];
            if s.family == VIP_SLOT_EMPTY {
                return Some(None);
            }
            if s.family == k.family && s.addr == k.addr {
                return Some(Some(s.index));
            }
        }
        None
    }

    fn v4(a: u32) -> AddrKey {
        AddrKey {
            addr: [a.to_be(), 0, 0, 0],
            family: FAMILY_V4,
            _pad: [0; 3],
        }
    }

    #[test]
    fn vip_table_finds_every_vip_and_no_other_address() {
        let empty = vec![VipSlot::default(); VIP_TABLE_SLOTS as usize];
        // Six addresses that start their probe at the same slot, and some others.
        let start = vip_slot(&v4(0x0a00_0000).addr, FAMILY_V4);
        let same: Vec<AddrKey> = (0x0a00_0000u32..)
            .map(v4)
            .filter(|k| vip_slot(&k.addr, k.family) == start)
            .take(6)
            .collect();
        let mut want: BTreeMap<AddrKey, u32> = same
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, i as u32))
            .collect();
        want.insert(v4(0xc000_0201), 40);
        want.insert(v4(0xc000_0202), 41);
        let table = vip_table(&empty, &want);
        for (k, &index) in &want {
            match probe(&table, k) {
                Some(Some(i)) => assert_eq!(i, index, "{k:?}"),
                Some(None) => panic!("{k:?} ends at an empty slot: the datapath would miss it"),
                None => assert!(same.contains(k), "{k:?} falls through without a collision"),
            }
        }
        // At most VIP_PROBES of the colliding six fit; the rest are looked up in VIPS.
        let in_table = same
            .iter()
            .filter(|k| matches!(probe(&table, k), Some(Some(_))))
            .count();
        assert!(
            in_table >= 1 && in_table <= VIP_PROBES as usize,
            "{in_table}"
        );

        // Removing a colliding VIP: the VIPs after its slot are still found, and its slot,
        // if it had one, goes to one that fell through, but only on the pass after (a reader
        // may still be comparing against the removed VIP in this one).
        let gone = same[0];
        want.remove(&gone);
        let table = vip_table(&table, &want);
        assert!(!matches!(probe(&table, &gone), Some(Some(_))));
        for (k, &index) in &want {
            match probe(&table, k) {
                Some(Some(i)) => assert_eq!(i, index),
                Some(None) => panic!("{k:?} lost after a removal"),
                None => assert!(same.contains(k)),
            }
        }
        let placed = |table: &[VipSlot]| {
            same.iter()
                .filter(|k| matches!(probe(table, k), Some(Some(_))))
                .count()
        };
        // The removed VIP's slot stays empty for this pass (one fewer placed at most) ...
        assert!(placed(&table) + 1 >= in_table && placed(&table) <= in_table);
        // ... and the next pass fills it again.
        let table = vip_table(&table, &want);
        assert_eq!(placed(&table), in_table);

        // Three colliding VIPs fill three slots in a row; the first one's removal leaves its
        // slot taken (removed), so a probe for the other two does not stop there.
        let three: BTreeMap<AddrKey, u32> = same[..3]
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, i as u32))
            .collect();
        let first = *three.keys().next().expect("three keys");
        let table = vip_table(&empty, &three);
        let mut two = three.clone();
        two.remove(&first);
        let table = vip_table(&table, &two);
        for (k, &index) in &two {
            assert_eq!(probe(&table, k), Some(Some(index)), "{k:?} after a removal");
        }
        assert_eq!(probe(&table, &first).and_then(|i| i), None);
    }

    #[test]
    fn a_slot_is_not_reused_in_the_pass_that_frees_it() {
        let empty = vec![VipSlot::default(); VIP_TABLE_SLOTS as usize];
        let start = vip_slot(&v4(0x0a00_0000).addr, FAMILY_V4);
        let two: Vec<AddrKey> = (0x0a00_0000u32..)
            .map(v4)
            .filter(|k| vip_slot(&k.addr, k.family) == start)
            .take(2)
            .collect();
        let (x, y) = (two[0], two[1]);
        let table = vip_table(&empty, &[(x, 0)].into());
        assert_eq!(probe(&table, &x), Some(Some(0)));
        let s = start as usize;
        assert_eq!((table[s].addr, table[s].family), (x.addr, x.family));
        // X goes and Y, whose probe starts at the same slot, comes in one pass: Y must not
        // take X's slot while a reader may still be comparing against X there.
        let table = vip_table(&table, &[(y, 0)].into());
        assert_eq!(
            table[s].family, VIP_SLOT_REMOVED,
            "X's slot is marked removed"
        );
        assert_eq!(
            probe(&table, &y),
            Some(Some(0)),
            "Y is found, past X's slot"
        );
        assert_eq!(probe(&table, &x), Some(None));
    }
}
