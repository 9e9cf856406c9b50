//! Filling the datapath's maps from a validated config: the real code path used by `cidlb run`
//! and by the BPF_PROG_TEST_RUN fixtures alike.

use std::{collections::HashSet, hash::Hash, net::IpAddr};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, MapError},
    Ebpf, Pod,
};
use lb_common::{
    family_index, names, Node, Reverse, ReverseKey, Vip, VipKey, FAMILY_V4, FAMILY_V6, MAX_NODES,
    NODE_F_V4, NODE_F_V6, PORT_WORDS,
};

use crate::{config::Config, datapath::DatapathError};

/// An address as the datapath stores it: wire bytes in u32 words, and its family tag.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// A port as the datapath stores it (the wire bytes read as a native u16).
pub fn port_wire(port: u16) -> u16 {
    port.to_be()
}

fn merr(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        message: e.to_string(),
    }
}

/// Writes every map from `cfg`; `ifindexes` are the attached interfaces (redirect targets).
/// Entries not in the config are removed, so this also applies a changed config in place.
pub fn provision(ebpf: &mut Ebpf, cfg: &Config, ifindexes: &[u32]) -> Result<(), DatapathError> {
    // Nodes: slot = position in the config.
    let mut nodes = Vec::new();
    let mut rings: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for (slot, n) in cfg.nodes.iter().enumerate() {
        let mut node = Node {
            port: n.port.map(port_wire).unwrap_or(0),
            slot: slot as u32,
            ..Node::default()
        };
        if let Some(a) = n.v4() {
            node.addr4 = addr_words(a).0[0];
            node.flags |= NODE_F_V4;
            rings[family_index(FAMILY_V4) as usize].push(n.id);
        }
        if let Some(a) = n.v6() {
            node.addr6 = addr_words(a).0;
            node.flags |= NODE_F_V6;
            rings[family_index(FAMILY_V6) as usize].push(n.id);
        }
        nodes.push((n.id, node));
    }
    sync_hash(ebpf, names::NODES, nodes)?;

    {
        let mut ring: Array<_, u32> =
            Array::try_from(map(ebpf, names::RING)?).map_err(merr(names::RING))?;
        for (fi, ids) in rings.iter().enumerate() {
            for (pos, id) in ids.iter().enumerate() {
                ring.set(fi as u32 * MAX_NODES + pos as u32, id, 0)
                    .map_err(merr(names::RING))?;
            }
        }
    }
    {
        let mut len: Array<_, u32> =
            Array::try_from(map(ebpf, names::RING_LEN)?).map_err(merr(names::RING_LEN))?;
        for (fi, ids) in rings.iter().enumerate() {
            len.set(fi as u32, ids.len() as u32, 0)
                .map_err(merr(names::RING_LEN))?;
        }
    }

    // VIPs: one port bitmap each.
    let mut vips = Vec::new();
    {
        let mut bits: Array<_, u64> =
            Array::try_from(map(ebpf, names::VIP_PORTS)?).map_err(merr(names::VIP_PORTS))?;
        for (index, vip) in cfg.vips.iter().enumerate() {
            let (addr, family) = addr_words(vip.address);
            let mut words = vec![0u64; PORT_WORDS as usize];
            for range in &vip.ports {
                for p in range.ports() {
                    words[p as usize / 64] |= 1 << (p % 64);
                }
            }
            let base = index as u32 * PORT_WORDS;
            for (i, w) in words.iter().enumerate() {
                bits.set(base + i as u32, w, 0)
                    .map_err(merr(names::VIP_PORTS))?;
            }
            vips.push((
                VipKey {
                    addr,
                    family,
                    _pad: [0; 3],
                },
                Vip {
                    index: index as u32,
                },
            ));
        }
    }
    sync_hash(ebpf, names::VIPS, vips)?;

    let (entries, _) = cfg.reverse_entries();
    let reverse = entries.iter().map(|e| {
        let (addr, family) = addr_words(e.node_addr);
        (
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
                node_slot: e.node_index as u32,
            },
        )
    });
    sync_hash(ebpf, names::REVERSE, reverse.collect())?;

    let mut devmap =
        DevMapHash::try_from(map(ebpf, names::DEVMAP)?).map_err(merr(names::DEVMAP))?;
    for &i in ifindexes {
        devmap
            .insert(i, i, None, 0)
            .map_err(|e| DatapathError::Map {
                name: names::DEVMAP,
                message: e.to_string(),
            })?;
    }
    Ok(())
}

fn map<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, DatapathError> {
    ebpf.map_mut(name).ok_or(DatapathError::Map {
        name,
        message: "not in the eBPF object".into(),
    })
}

/// Makes hash map `name` hold exactly `want`.
fn sync_hash<K: Pod + Eq + Hash, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: Vec<(K, V)>,
) -> Result<(), DatapathError> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(merr(name))?;
    let keep: HashSet<K> = want.iter().map(|(k, _)| *k).collect();
    for (k, v) in &want {
        m.insert(k, v, 0).map_err(merr(name))?;
    }
    let stale: Vec<K> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(k))
        .collect();
    for k in stale {
        m.remove(&k).map_err(merr(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        let (w, f) = addr_words("192.0.2.10".parse().unwrap());
        assert_eq!(f, FAMILY_V4);
        assert_eq!(w[0].to_ne_bytes(), [192, 0, 2, 10]);
        let (w, f) = addr_words("2001:db8::1".parse().unwrap());
        assert_eq!(f, FAMILY_V6);
        assert_eq!(w[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(port_wire(5684).to_ne_bytes(), 5684u16.to_be_bytes());
    }
}
