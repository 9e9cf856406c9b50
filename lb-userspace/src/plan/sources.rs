//! Sources no client can have, as the datapath refuses them on the way to a VIP port: the
//! VIPs, the nodes' addresses and the balancer's own (`LOCAL_ADDRS`), with one `SRC_FILTER`
//! bit each in front of the exact lookups (`lb-ebpf/src/vip.rs`, `check_source`).

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{addr_key, hash::src_filter_bit, AddrKey, MAX_LOCAL_ADDRS, SRC_FILTER_WORDS};

use crate::config::Config;

/// `LOCAL_ADDRS`' keys: the balancer's addresses, deduplicated, at most `MAX_LOCAL_ADDRS`
/// (the lowest; a host with more has them refused only as far as they fit).
pub fn local_keys(local: &[IpAddr]) -> Vec<AddrKey> {
    let set: BTreeSet<AddrKey> = local.iter().map(|ip| addr_key(*ip)).collect();
    set.into_iter().take(MAX_LOCAL_ADDRS as usize).collect()
}

/// `SRC_FILTER`'s words: the bit of every VIP, every node address and every key of `local`.
pub fn src_filter(cfg: &Config, local: &[AddrKey]) -> Vec<u64> {
    let mut words = vec![0u64; SRC_FILTER_WORDS as usize];
    let vips = cfg.vips.iter().map(|v| addr_key(v.address));
    let nodes = cfg
        .nodes
        .iter()
        .flat_map(|n| n.addresses.iter().map(|ip| addr_key(*ip)));
    for a in vips.chain(nodes).chain(local.iter().copied()) {
        let bit = src_filter_bit(&a.addr, a.family);
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, SEED};

    #[test]
    fn every_impossible_source_has_its_bit() {
        let c = parse(SEED).unwrap_or_else(|e| panic!("{e}"));
        let local = local_keys(&["10.9.8.7".parse().unwrap(), "10.9.8.7".parse().unwrap()]);
        assert_eq!(local.len(), 1);
        let words = src_filter(&c, &local);
        let has = |ip: IpAddr| {
            let k = addr_key(ip);
            let bit = src_filter_bit(&k.addr, k.family);
            words[(bit / 64) as usize] >> (bit % 64) & 1 == 1
        };
        assert!(has("10.9.8.7".parse().unwrap()));
        for v in &c.vips {
            assert!(has(v.address));
        }
        for n in &c.nodes {
            assert!(n.addresses.iter().all(|a| has(*a)));
        }
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert!(set as usize <= 1 + c.vips.len() + c.nodes.len() * 2);
    }
}
