//! Filling the datapath's maps from a validated config: the one code path used by `cidlb run`
//! (at start, on reload, on health changes) and by the BPF_PROG_TEST_RUN fixtures.
//!
//! Maps are updated in place, in an order that keeps every intermediate state valid for a
//! packet running concurrently: new node entries before rings that name them, rings before
//! stale nodes go, bitmaps before the VIP entries that point at them. Node slots (per-node
//! counters) and VIP bitmap indices stay with their node id / address across updates.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    hash::Hash,
    net::IpAddr,
};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf, Pod,
};
use lb_common::{
    family_index,
    hash::{addr_filter_bit, vip_slot},
    names, AddrKey, Node, NodeAddr, NodeStats, Reverse, ReverseKey, Vip, VipSlot, FAMILY_V4,
    FAMILY_V6, LAYOUT_VERSION, MAGLEV_CTL_EMPTY, MAGLEV_CTL_HALF0, MAGLEV_SIZE, MAX_NODES,
    MAX_VIPS, NODE_FILTER_WORDS, NODE_F_V4, NODE_F_V6, NODE_ID_SLOTS, PORT_WORDS, VIP_PROBES,
    VIP_SLOT_EMPTY, VIP_SLOT_REMOVED, VIP_TABLE_SLOTS,
};

use crate::{
    config::{Config, FlowPolicy, NodeState},
    datapath::DatapathError,
    maglev,
};

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

/// Turns an aya map error on map `name` into the agent's error naming that map.
pub(crate) fn merr(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        message: e.to_string(),
    }
}

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
        for vip in &cfg.vips {
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

/// Node ids in round-robin order for new flows: smooth weighted round robin (each node appears
/// `weight` times, spread out), over the nodes that take new flows.
pub fn weighted_ring(nodes: &[(u32, u32)]) -> Vec<u32> {
    let total: i64 = nodes.iter().map(|(_, w)| i64::from(*w)).sum();
    let mut current: Vec<i64> = vec![0; nodes.len()];
    let mut ring = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, (_, w)) in current.iter_mut().zip(nodes) {
            *c += i64::from(*w);
        }
        let best = (0..nodes.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .expect("non-empty");
        current[best] -= total;
        ring.push(nodes[best].0);
    }
    ring
}

/// Writes every map from `cfg`. `ifindexes`: the attached interfaces (redirect targets).
/// `up(id)`: the node's health (always true without health checks). Entries not in the config
/// are removed, so this also applies a changed config in place.
pub fn provision(
    ebpf: &mut Ebpf,
    cfg: &Config,
    ifindexes: &[u32],
    up: &dyn Fn(u32) -> bool,
) -> Result<(), DatapathError> {
    // The pinned maps now hold this layout (see layout.rs): written first, so a datapath
    // pinned by this binary never reads as layout 0 once anything else is in it.
    let mut layout: Array<_, u32> =
        Array::try_from(map(ebpf, names::LAYOUT)?).map_err(merr(names::LAYOUT))?;
    layout
        .set(0, LAYOUT_VERSION, 0)
        .map_err(merr(names::LAYOUT))?;
    let slots = nodes_and_rings(ebpf, cfg, up)?;
    vips(ebpf, cfg)?;
    reverse(ebpf, cfg, &slots)?;
    crate::limits::provision(ebpf, cfg.limits.as_ref())?;
    devmap(ebpf, ifindexes)
}

/// Writes `NODES`, `RING` and `RING_LEN`, and with `flows.policy: maglev` the `MAGLEV`
/// tables (all a health change touches); returns node slots.
pub fn nodes_and_rings(
    ebpf: &mut Ebpf,
    cfg: &Config,
    up: &dyn Fn(u32) -> bool,
) -> Result<BTreeMap<u32, u32>, DatapathError> {
    // Nodes in NODES: all but disabled ones (a disabled node's CIDs follow unknown_node).
    let present: Vec<&crate::config::Node> = cfg
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Disabled)
        .collect();
    let old_slots: BTreeMap<u32, u32> = {
        let m: HashMap<_, u32, Node> =
            HashMap::try_from(map(ebpf, names::NODES)?).map_err(merr(names::NODES))?;
        m.iter()
            .filter_map(Result::ok)
            .map(|(id, n)| (id, n.slot))
            .collect()
    };
    let slots = stable_indices(present.iter().map(|n| n.id), &old_slots, MAX_NODES);
    let new_slots: Vec<u32> = present
        .iter()
        .filter(|n| !old_slots.contains_key(&n.id))
        .map(|n| slots[&n.id])
        .collect();
    if !new_slots.is_empty() {
        // A slot handed to a new node starts from zero, not from its previous owner's traffic.
        let mut stats: PerCpuArray<_, NodeStats> =
            PerCpuArray::try_from(map(ebpf, names::NODE_STATS)?)
                .map_err(merr(names::NODE_STATS))?;
        let cpus = nr_cpus().map_err(|(_, e)| DatapathError::Map {
            name: names::NODE_STATS,
            message: e.to_string(),
        })?;
        for slot in new_slots {
            let zero = PerCpuValues::try_from(vec![NodeStats::default(); cpus]).map_err(|e| {
                DatapathError::Map {
                    name: names::NODE_STATS,
                    message: e.to_string(),
                }
            })?;
            stats.set(slot, zero, 0).map_err(merr(names::NODE_STATS))?;
        }
    }

    let mut nodes = Vec::new();
    let mut takers: [Vec<(u32, u32)>; 2] = [Vec::new(), Vec::new()];
    // Maglev: every active node of the family, up or not (health is applied by stepping past
    // down nodes, so a health change moves only a down node's slots).
    let mut active: [Vec<(u32, u32)>; 2] = [Vec::new(), Vec::new()];
    for n in &present {
        let mut node = Node {
            port: n.port.map(port_wire).unwrap_or(0),
            slot: slots[&n.id],
            ..Node::default()
        };
        let takes_new = n.state == NodeState::Active && up(n.id);
        for (fi, has) in [(0, n.v4().is_some()), (1, n.v6().is_some())] {
            if has && n.state == NodeState::Active {
                active[fi].push((n.id, n.weight));
            }
        }
        if let Some(a) = n.v4() {
            node.addr4 = addr_words(a).0[0];
            node.flags |= NODE_F_V4;
            if takes_new {
                takers[family_index(FAMILY_V4) as usize].push((n.id, n.weight));
            }
        }
        if let Some(a) = n.v6() {
            node.addr6 = addr_words(a).0;
            node.flags |= NODE_F_V6;
            if takes_new {
                takers[family_index(FAMILY_V6) as usize].push((n.id, n.weight));
            }
        }
        nodes.push((n.id, node.sealed()));
    }
    // Cached next hops belong to a slot's previous owner (or its old address): forget them
    // before the new node entries can be read.
    clear_nexthops(
        ebpf,
        slots
            .values()
            .copied()
            .chain(old_slots.values().copied())
            .max(),
    )?;
    let stale_nodes = insert_all(ebpf, names::NODES, &nodes)?;
    node_ids(ebpf, nodes.iter().copied())?;

    {
        let [ring, len] = ebpf.maps_disjoint_mut([names::RING, names::RING_LEN]);
        let missing = |name| DatapathError::Map {
            name,
            message: "not in the eBPF object".into(),
        };
        let mut ring: Array<_, u32> =
            Array::try_from(ring.ok_or(missing(names::RING))?).map_err(merr(names::RING))?;
        let mut len: Array<_, u32> =
            Array::try_from(len.ok_or(missing(names::RING_LEN))?).map_err(merr(names::RING_LEN))?;
        for (fi, t) in takers.iter().enumerate() {
            let ids = weighted_ring(t);
            let base = fi as u32 * MAX_NODES;
            // Entries first, then the length: a reader sees an old length over valid ids.
            let old_len = len.get(&(fi as u32), 0).map_err(merr(names::RING_LEN))?;
            for (pos, id) in ids.iter().enumerate() {
                ring.set(base + pos as u32, id, 0)
                    .map_err(merr(names::RING))?;
            }
            // Positions past the new end may still be read under the old length.
            let fill = ids.first().copied().unwrap_or(0);
            for pos in ids.len() as u32..old_len.min(MAX_NODES) {
                ring.set(base + pos, fill, 0).map_err(merr(names::RING))?;
            }
            len.set(fi as u32, ids.len() as u32, 0)
                .map_err(merr(names::RING_LEN))?;
        }
    }
    if cfg.flows.policy == FlowPolicy::Maglev {
        for (fi, nodes) in active.iter().enumerate() {
            let table = maglev_table(nodes, up)?;
            write_maglev(ebpf, fi as u32, &table)?;
        }
    }
    node_ids(ebpf, stale_nodes.iter().map(|&id| (id, Node::default())))?;
    remove_all::<u32, Node>(ebpf, names::NODES, stale_nodes)?;
    Ok(slots)
}

/// Mirrors `NODES` entries into `NODE_IDS` (ids below `NODE_ID_SLOTS`), after `NODES` has them:
/// a packet that reads a `NODE_IDS` element while it is written falls back to `NODES`. A
/// default `Node` (no family flag) is no node.
fn node_ids(
    ebpf: &mut Ebpf,
    nodes: impl Iterator<Item = (u32, Node)>,
) -> Result<(), DatapathError> {
    let mut ids: Array<_, Node> =
        Array::try_from(map(ebpf, names::NODE_IDS)?).map_err(merr(names::NODE_IDS))?;
    for (id, node) in nodes.filter(|&(id, _)| id < NODE_ID_SLOTS) {
        ids.set(id, node, 0).map_err(merr(names::NODE_IDS))?;
    }
    Ok(())
}

/// The Maglev table new flows of one family use: built from `nodes` (the family's active
/// nodes, `(id, weight)`, in any order) at `MAGLEV_SIZE`, then each slot of a down node given
/// to its next up preference (`maglev::step_past_down`). Empty: no node takes new flows.
pub fn maglev_table(
    nodes: &[(u32, u32)],
    up: &dyn Fn(u32) -> bool,
) -> Result<Vec<u32>, DatapathError> {
    let table = maglev::table(nodes, MAGLEV_SIZE).map_err(|e| DatapathError::Map {
        name: names::MAGLEV,
        message: e.to_string(),
    })?;
    Ok(maglev::step_past_down(&table, up))
}

/// Writes `table` into the inactive half of family `fi`'s `MAGLEV` tables, then makes it the
/// active one in `MAGLEV_CTL` (one array write, atomic for a reader): a new flow reads the
/// whole old table or the whole new one. An empty table sets `MAGLEV_CTL_EMPTY`.
fn write_maglev(ebpf: &mut Ebpf, fi: u32, table: &[u32]) -> Result<(), DatapathError> {
    let [tables, ctl] = ebpf.maps_disjoint_mut([names::MAGLEV, names::MAGLEV_CTL]);
    let missing = |name| DatapathError::Map {
        name,
        message: "not in the eBPF object".into(),
    };
    let mut tables: Array<_, u32> =
        Array::try_from(tables.ok_or(missing(names::MAGLEV))?).map_err(merr(names::MAGLEV))?;
    let mut ctl: Array<_, u32> =
        Array::try_from(ctl.ok_or(missing(names::MAGLEV_CTL))?).map_err(merr(names::MAGLEV_CTL))?;
    if table.is_empty() {
        return ctl
            .set(fi, MAGLEV_CTL_EMPTY, 0)
            .map_err(merr(names::MAGLEV_CTL));
    }
    debug_assert_eq!(table.len(), MAGLEV_SIZE as usize);
    let active = ctl.get(&fi, 0).map_err(merr(names::MAGLEV_CTL))?;
    // The half no reader is directed to (half 0 when there is no table yet). A packet that
    // read MAGLEV_CTL before the previous flip may still be reading this half: it would need
    // to run across two table writes (hundreds of milliseconds), which an XDP run does not.
    let half = if active == MAGLEV_CTL_HALF0 { 1 } else { 0 };
    let base = (fi * 2 + half) * MAGLEV_SIZE;
    for (slot, id) in table.iter().enumerate() {
        tables
            .set(base + slot as u32, id, 0)
            .map_err(merr(names::MAGLEV))?;
    }
    ctl.set(fi, MAGLEV_CTL_HALF0 + half, 0)
        .map_err(merr(names::MAGLEV_CTL))
}

fn vips(ebpf: &mut Ebpf, cfg: &Config) -> Result<(), DatapathError> {
    // VIPs: one port bitmap each, at an index that stays with the address.
    let old_vips: BTreeMap<AddrKey, u32> = {
        let m: HashMap<_, AddrKey, Vip> =
            HashMap::try_from(map(ebpf, names::VIPS)?).map_err(merr(names::VIPS))?;
        m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.index))
            .collect()
    };
    let keys: Vec<AddrKey> = cfg
        .vips
        .iter()
        .map(|v| {
            let (addr, family) = addr_words(v.address);
            AddrKey {
                addr,
                family,
                _pad: [0; 3],
            }
        })
        .collect();
    let index = stable_indices(keys.iter().copied(), &old_vips, MAX_VIPS);
    {
        let mut bits: Array<_, u64> =
            Array::try_from(map(ebpf, names::VIP_PORTS)?).map_err(merr(names::VIP_PORTS))?;
        for (vip, key) in cfg.vips.iter().zip(&keys) {
            let mut words = vec![0u64; PORT_WORDS as usize];
            for range in &vip.ports {
                for p in range.ports() {
                    words[p as usize / 64] |= 1 << (p % 64);
                }
            }
            let base = index[key] * PORT_WORDS;
            for (i, w) in words.iter().enumerate() {
                bits.set(base + i as u32, w, 0)
                    .map_err(merr(names::VIP_PORTS))?;
            }
        }
    }
    let vips: Vec<(AddrKey, Vip)> = keys.iter().map(|k| (*k, Vip { index: index[k] })).collect();
    let stale = insert_all(ebpf, names::VIPS, &vips)?;
    write_vip_table(ebpf, &index)?;
    remove_all::<AddrKey, Vip>(ebpf, names::VIPS, stale)
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
        let free = (0..VIP_PROBES)
            .map(|i| ((start + i) % VIP_TABLE_SLOTS) as usize)
            .find(|&i| !live(&out[i]));
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

/// Writes `VIP_TABLE`'s changed slots so that no reader sees half a slot: a slot that takes a
/// VIP is first written whole as removed (a probe goes past it), then only its family changes.
fn write_vip_table(ebpf: &mut Ebpf, want: &BTreeMap<AddrKey, u32>) -> Result<(), DatapathError> {
    let mut table: Array<_, VipSlot> =
        Array::try_from(map(ebpf, names::VIP_TABLE)?).map_err(merr(names::VIP_TABLE))?;
    let now: Vec<VipSlot> = (0..VIP_TABLE_SLOTS)
        .map(|i| table.get(&i, 0).map_err(merr(names::VIP_TABLE)))
        .collect::<Result<_, _>>()?;
    let next = vip_table(&now, want);
    for (i, (old, new)) in now.iter().zip(&next).enumerate() {
        if old == new {
            continue;
        }
        // A new VIP in the slot is hidden until written whole; a VIP that stays (only its
        // index changes, one aligned word) is not.
        let same_vip = old.family == new.family && old.addr == new.addr;
        if new.family != VIP_SLOT_REMOVED && !same_vip {
            let hidden = VipSlot {
                family: VIP_SLOT_REMOVED,
                ..*new
            };
            table
                .set(i as u32, hidden, 0)
                .map_err(merr(names::VIP_TABLE))?;
        }
        table
            .set(i as u32, new, 0)
            .map_err(merr(names::VIP_TABLE))?;
    }
    Ok(())
}

fn reverse(ebpf: &mut Ebpf, cfg: &Config, slots: &BTreeMap<u32, u32>) -> Result<(), DatapathError> {
    let (entries, _) = reverse_entries(cfg);
    let reverse: Vec<(ReverseKey, Reverse)> = entries
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
        .collect();
    // Every address of every node in NODES, whatever its port.
    let mut addrs: Vec<(AddrKey, NodeAddr)> = Vec::new();
    for n in &cfg.nodes {
        let Some(&slot) = slots.get(&n.id) else {
            continue;
        };
        for ip in &n.addresses {
            let (addr, family) = addr_words(*ip);
            addrs.push((
                AddrKey {
                    addr,
                    family,
                    _pad: [0; 3],
                },
                NodeAddr { slot },
            ));
        }
    }
    // The filter gains the new addresses' bits before any entry needs them, and loses the
    // old ones' only after their entries are gone.
    let filter_now = read_filter(ebpf)?;
    let filter_new = filter_words(addrs.iter().map(|(k, _)| k));
    let union: Vec<u64> = filter_now
        .iter()
        .zip(&filter_new)
        .map(|(a, b)| a | b)
        .collect();
    write_filter(ebpf, &filter_now, &union)?;

    let stale = insert_all(ebpf, names::REVERSE, &reverse)?;
    remove_all::<ReverseKey, Reverse>(ebpf, names::REVERSE, stale)?;

    let stale = insert_all(ebpf, names::NODE_ADDRS, &addrs)?;
    remove_all::<AddrKey, NodeAddr>(ebpf, names::NODE_ADDRS, stale)?;
    write_filter(ebpf, &union, &filter_new)
}

/// `NODE_FILTER`'s words with the bit of each address in `addrs` set.
fn filter_words<'a>(addrs: impl Iterator<Item = &'a AddrKey>) -> Vec<u64> {
    let mut words = vec![0u64; NODE_FILTER_WORDS as usize];
    for a in addrs {
        let bit = addr_filter_bit(&a.addr, a.family);
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

fn read_filter(ebpf: &mut Ebpf) -> Result<Vec<u64>, DatapathError> {
    let filter: Array<_, u64> =
        Array::try_from(map(ebpf, names::NODE_FILTER)?).map_err(merr(names::NODE_FILTER))?;
    (0..NODE_FILTER_WORDS)
        .map(|i| filter.get(&i, 0).map_err(merr(names::NODE_FILTER)))
        .collect()
}

/// Writes the words of `new` that differ from `old`.
fn write_filter(ebpf: &mut Ebpf, old: &[u64], new: &[u64]) -> Result<(), DatapathError> {
    let mut filter: Array<_, u64> =
        Array::try_from(map(ebpf, names::NODE_FILTER)?).map_err(merr(names::NODE_FILTER))?;
    for (i, (a, b)) in old.iter().zip(new).enumerate() {
        if a != b {
            filter
                .set(i as u32, b, 0)
                .map_err(merr(names::NODE_FILTER))?;
        }
    }
    Ok(())
}

fn devmap(ebpf: &mut Ebpf, ifindexes: &[u32]) -> Result<(), DatapathError> {
    let mut devmap =
        DevMapHash::try_from(map(ebpf, names::DEVMAP)?).map_err(merr(names::DEVMAP))?;
    let dev_err = |e: aya::maps::xdp::XdpMapError| DatapathError::Map {
        name: names::DEVMAP,
        message: e.to_string(),
    };
    for &i in ifindexes {
        devmap.insert(i, i, None, 0).map_err(dev_err)?;
    }
    let stale: Vec<u32> = devmap
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !ifindexes.contains(k))
        .collect();
    for k in stale {
        devmap.remove(k).map_err(merr(names::DEVMAP))?;
    }
    Ok(())
}

/// Empties the next-hop cache of slots `0..=max_slot` (both families, every CPU).
fn clear_nexthops(ebpf: &mut Ebpf, max_slot: Option<u32>) -> Result<(), DatapathError> {
    let Some(max_slot) = max_slot else {
        return Ok(());
    };
    let merr_n = |message: String| DatapathError::Map {
        name: names::NEXTHOP,
        message,
    };
    let mut cache: PerCpuArray<_, lb_common::NextHop> =
        PerCpuArray::try_from(map(ebpf, names::NEXTHOP)?).map_err(merr(names::NEXTHOP))?;
    let cpus = nr_cpus().map_err(|(_, e)| merr_n(e.to_string()))?;
    for idx in 0..(max_slot + 1) * 2 {
        let empty = PerCpuValues::try_from(vec![lb_common::NextHop::default(); cpus])
            .map_err(|e| merr_n(e.to_string()))?;
        cache.set(idx, empty, 0).map_err(merr(names::NEXTHOP))?;
    }
    Ok(())
}

/// An index below `limit` for each key: the one it had in `old` if any, else the lowest free.
fn stable_indices<K: Ord + Copy>(
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

/// The map `name` of the loaded object, or an error naming it.
pub(crate) fn map<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, DatapathError> {
    ebpf.map_mut(name).ok_or(DatapathError::Map {
        name,
        message: "not in the eBPF object".into(),
    })
}

/// Inserts every entry of `want` into hash map `name`; returns the keys it holds beyond them.
fn insert_all<K: Pod + Eq + Hash, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &[(K, V)],
) -> Result<Vec<K>, DatapathError> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(merr(name))?;
    let keep: StdHashMap<K, ()> = want.iter().map(|(k, _)| (*k, ())).collect();
    for (k, v) in want {
        m.insert(k, v, 0).map_err(merr(name))?;
    }
    Ok(m.keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains_key(k))
        .collect())
}

fn remove_all<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: Vec<K>,
) -> Result<(), DatapathError> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(merr(name))?;
    for k in keys {
        m.remove(&k).map_err(merr(name))?;
    }
    Ok(())
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

    #[test]
    fn weighted_ring_is_spread_and_proportional() {
        assert_eq!(weighted_ring(&[(1, 1), (2, 1)]), [1, 2]);
        assert_eq!(
            weighted_ring(&[(1, 5), (2, 1), (3, 1)]),
            [1, 1, 2, 1, 3, 1, 1]
        );
        let r = weighted_ring(&[(7, 3), (9, 2)]);
        assert_eq!(r.iter().filter(|&&x| x == 7).count(), 3);
        assert_eq!(r.len(), 5);
        assert!(weighted_ring(&[]).is_empty());
    }

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
        // if it had one, goes to one that fell through.
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
        let placed = same
            .iter()
            .filter(|k| matches!(probe(&table, k), Some(Some(_))))
            .count();
        assert_eq!(placed, in_table);

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
    fn indices_stay_with_their_keys() {
        let old: BTreeMap<u32, u32> = [(10, 0), (20, 1), (30, 2)].into();
        // 20 removed, 40 added: 10 and 30 keep theirs, 40 takes the freed 1.
        let new = stable_indices([10u32, 30, 40].into_iter(), &old, 8);
        assert_eq!(new, [(10, 0), (30, 2), (40, 1)].into());
    }
}
