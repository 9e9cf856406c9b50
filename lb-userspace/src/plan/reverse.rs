//! Stateless reverse NAT as the datapath holds it: `REVERSE` (node address+port → VIP+port),
//! `NODE_ADDRS` (every node address → its slot) and the `NODE_FILTER` bitmap in front of both.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    addr_key, addr_words, hash::addr_filter_bit, port_wire, AddrKey, NodeAddr, Reverse, ReverseKey,
    NODE_FILTER_WORDS,
};

use crate::config::Config;

/// One stateless reverse-NAT entry: replies from `node_addr:node_port` come from `vip:vip_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReverseEntry {
    pub node_index: usize,
    pub node_addr: IpAddr,
    pub node_port: u16,
    pub vip: IpAddr,
    pub vip_port: u16,
}

/// Every reverse-NAT entry, plus a warning for each node address+port that several VIP
/// ports map onto. Replies carry no trace of the port the client used, so such a node's
/// replies come from one VIP port: the one equal to the node port if listed, else the first.
/// Validation (`validate.rs`) has refused two VIPs of one family on one node address+port and
/// bounded the number of entries, so this enumeration is bounded by `MAX_REVERSE`.
pub fn reverse_entries(cfg: &Config) -> (Vec<ReverseEntry>, Vec<String>) {
    let mut seen: BTreeMap<(IpAddr, u16), (ReverseEntry, usize)> = BTreeMap::new();
    for (ni, node) in cfg.nodes.iter().enumerate() {
        // A tunnel VIP's replies leave the node from the VIP: nothing to un-NAT.
        for vip in cfg.vips.iter().filter(|v| v.tunnel().is_none()) {
            let Some(node_addr) = node.address_for(vip.address) else {
                continue;
            };
            for range in &vip.ports {
                for vip_port in range.ports() {
                    let e = ReverseEntry {
                        node_index: ni,
                        node_addr,
                        node_port: node.port.unwrap_or(vip_port),
                        vip: vip.address,
                        vip_port,
                    };
                    seen.entry((node_addr, e.node_port))
                        .and_modify(|(kept, shadowed)| {
                            *shadowed += 1;
                            if e.vip_port == e.node_port && kept.vip_port != kept.node_port {
                                *kept = e;
                            }
                        })
                        .or_insert((e, 0));
                }
            }
        }
    }
    let mut warnings = Vec::new();
    for ((addr, port), (e, shadowed)) in &seen {
        if *shadowed > 0 {
            warnings.push(format!(
                "nodes[{}]: {} other VIP port(s) map onto {addr} port {port}; its replies will come from {}:{} \
                 only, so clients that used another VIP port will not accept them. Leave out `port` \
                 (the node then listens on each VIP port) to avoid this",
                e.node_index, shadowed, e.vip, e.vip_port
            ));
        }
    }
    (seen.into_values().map(|(e, _)| e).collect(), warnings)
}

/// `REVERSE`'s entries: for each reverse-NAT entry whose node has a slot (is in `NODES`).
pub fn reverse_map(cfg: &Config, slots: &BTreeMap<u32, u32>) -> Vec<(ReverseKey, Reverse)> {
    let (entries, _) = reverse_entries(cfg);
    entries
        .iter()
        .filter_map(|e| {
            let slot = *slots.get(&cfg.nodes[e.node_index].id)?;
            let (addr, family) = addr_words(e.node_addr);
            Some((
                ReverseKey {
                    addr,
                    port: port_wire(e.node_port),
                    family,
                    _pad: 0,
                },
                Reverse {
                    vip: addr_words(e.vip).0,
                    vip_port: port_wire(e.vip_port),
                    _pad: 0,
                    node_slot: slot,
                },
            ))
        })
        .collect()
}

/// `NODE_ADDRS`' entries: every address of every node that has a slot, whatever its port.
pub fn node_addrs(cfg: &Config, slots: &BTreeMap<u32, u32>) -> Vec<(AddrKey, NodeAddr)> {
    cfg.nodes
        .iter()
        .filter_map(|n| Some((n, *slots.get(&n.id)?)))
        .flat_map(|(n, slot)| {
            n.addresses
                .iter()
                .map(move |ip| (addr_key(*ip), NodeAddr { slot }))
        })
        .collect()
}

/// `NODE_FILTER`'s words with the bit of each address in `addrs` set.
pub fn filter_words<'a>(addrs: impl Iterator<Item = &'a AddrKey>) -> Vec<u64> {
    let mut words = vec![0u64; NODE_FILTER_WORDS as usize];
    for a in addrs {
        let bit = addr_filter_bit(&a.addr, a.family);
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, SEED};

    #[test]
    fn ambiguous_reverse_nat_warns_and_prefers_the_node_port() {
        // The issue's own example: node 1 listens on 5684 for a VIP with 102 ports.
        let c = parse(SEED).unwrap_or_else(|e| panic!("{e}"));
        let (entries, warnings) = reverse_entries(&c);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("nodes[0]: 101 other VIP port(s)"),
            "{}",
            warnings[0]
        );
        let n1: Vec<_> = entries.iter().filter(|e| e.node_index == 0).collect();
        assert_eq!(n1.len(), 1);
        assert_eq!((n1[0].node_port, n1[0].vip_port), (5684, 5684));
        // Node 2 keeps the client's port: one entry per VIP port, no ambiguity.
        assert_eq!(entries.iter().filter(|e| e.node_index == 1).count(), 102);
    }
}
