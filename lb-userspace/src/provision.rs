//! Writes a plan (`plan/`) into the datapath's maps: the one code path used by `cidlb run` (at
//! start, on reload, on health changes), `cidlb explain`, the fixtures, the fuzzer and the
//! bench.
//!
//! Maps are updated in place, in an order that keeps every intermediate state valid for a
//! packet running concurrently: new node entries before rings that name them, rings before
//! stale nodes go, bitmaps before the VIP entries that point at them. Node slots (per-node
//! counters) and VIP bitmap indices stay with their node id / address across updates.

use std::collections::BTreeMap;

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues,
    },
    util::nr_cpus,
    Ebpf,
};
use lb_common::{
    limits::{self as lim, ExemptKey, LimitConfig, SrcKey},
    names, AddrKey, Node, NodeAddr, NodeStats, Reverse, ReverseKey, Vip, VipSlot, VlanKey,
    LAYOUT_VERSION, MAGLEV_CTL_EMPTY, MAGLEV_CTL_HALF0, MAGLEV_SIZE, MAX_NODES, MAX_VIPS,
    NODE_FILTER_WORDS, NODE_ID_SLOTS, VIP_SLOT_REMOVED, VIP_TABLE_SLOTS,
};

use crate::{
    config::{limits::Limits, Config},
    ebpf::{insert_all, map, merr, remove_all, DatapathError},
    host::Host,
    plan::{self, indices::stable_indices},
};

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
    limits(ebpf, cfg.limits.as_ref())?;
    cookie_key(ebpf)?;
    host(ebpf, cfg, &Host::read())?;
    devmap(ebpf, ifindexes)
}

/// Writes what depends on the host as well as on `cfg`: `LOCAL_ADDRS`, `SRC_FILTER` (VIPs,
/// nodes and the host's addresses) and `VLAN_IFACES`. The agent calls it again whenever the
/// host's addresses or VLAN devices change. A new address's entry and bit are written before
/// the stale ones go; while it runs a packet may see a source refused a moment early or late.
pub fn host(ebpf: &mut Ebpf, cfg: &Config, host: &Host) -> Result<(), DatapathError> {
    let local = plan::sources::local_keys(&host.addrs);
    let entries: Vec<(AddrKey, u8)> = local.iter().map(|k| (*k, 1)).collect();
    let stale = insert_all(ebpf, names::LOCAL_ADDRS, &entries)?;
    let words = plan::sources::src_filter(cfg, &local);
    {
        let mut filter: Array<_, u64> =
            Array::try_from(map(ebpf, names::SRC_FILTER)?).map_err(merr(names::SRC_FILTER))?;
        for (i, w) in words.iter().enumerate() {
            if filter
                .get(&(i as u32), 0)
                .map_err(merr(names::SRC_FILTER))?
                != *w
            {
                filter
                    .set(i as u32, w, 0)
                    .map_err(merr(names::SRC_FILTER))?;
            }
        }
    }
    remove_all::<AddrKey, u8>(ebpf, names::LOCAL_ADDRS, stale)?;
    let stale = insert_all(ebpf, names::VLAN_IFACES, &host.vlans)?;
    remove_all::<VlanKey, u32>(ebpf, names::VLAN_IFACES, stale)
}

/// Writes `NODES`, `RING` and `RING_LEN`, and with `flows.policy: maglev` the `MAGLEV`
/// tables (all a health change touches); returns node slots.
pub fn nodes_and_rings(
    ebpf: &mut Ebpf,
    cfg: &Config,
    up: &dyn Fn(u32) -> bool,
) -> Result<BTreeMap<u32, u32>, DatapathError> {
    // A node's slot: its `NODES` entry's, or for a node not in `NODES` (disabled), the one
    // its addresses' `NODE_ADDRS` entries hold.
    let mut old_slots: BTreeMap<u32, u32> = {
        let m: HashMap<_, u32, Node> =
            HashMap::try_from(map(ebpf, names::NODES)?).map_err(merr(names::NODES))?;
        m.iter()
            .filter_map(Result::ok)
            .map(|(id, n)| (id, n.slot))
            .collect()
    };
    {
        let addrs: HashMap<_, AddrKey, NodeAddr> =
            HashMap::try_from(map(ebpf, names::NODE_ADDRS)?).map_err(merr(names::NODE_ADDRS))?;
        let found: Vec<(u32, u32)> = cfg
            .nodes
            .iter()
            .filter(|n| !old_slots.contains_key(&n.id))
            .filter_map(|n| {
                n.addresses
                    .iter()
                    .find_map(|&ip| addrs.get(&lb_common::addr_key(ip), 0).ok())
                    .map(|a| (n.id, a.slot))
            })
            .collect();
        old_slots.extend(found);
    }
    let plan = plan::nodes::plan(cfg, up, &old_slots).map_err(|e| DatapathError::Map {
        name: names::MAGLEV,
        message: e.to_string(),
    })?;
    if !plan.new_slots.is_empty() {
        // A slot handed to a new node starts from zero, not from its previous owner's traffic.
        let mut stats: PerCpuArray<_, NodeStats> =
            PerCpuArray::try_from(map(ebpf, names::NODE_STATS)?)
                .map_err(merr(names::NODE_STATS))?;
        let cpus = nr_cpus().map_err(|(_, e)| DatapathError::Map {
            name: names::NODE_STATS,
            message: e.to_string(),
        })?;
        for &slot in &plan.new_slots {
            let zero = PerCpuValues::try_from(vec![NodeStats::default(); cpus]).map_err(|e| {
                DatapathError::Map {
                    name: names::NODE_STATS,
                    message: e.to_string(),
                }
            })?;
            stats.set(slot, zero, 0).map_err(merr(names::NODE_STATS))?;
        }
    }

    // Cached next hops belong to a slot's previous owner (or its old address): forget them
    // before the new node entries can be read.
    clear_nexthops(
        ebpf,
        plan.slots
            .values()
            .copied()
            .chain(old_slots.values().copied())
            .max(),
    )?;
    let stale_nodes = insert_all(ebpf, names::NODES, &plan.nodes)?;
    node_ids(ebpf, plan.nodes.iter().copied())?;

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
        for (fi, ids) in plan.rings.iter().enumerate() {
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
    if let Some(tables) = &plan.maglev {
        for (fi, table) in tables.iter().enumerate() {
            write_maglev(ebpf, fi as u32, table)?;
        }
    }
    node_ids(ebpf, stale_nodes.iter().map(|&id| (id, Node::default())))?;
    remove_all::<u32, Node>(ebpf, names::NODES, stale_nodes)?;
    Ok(plan.slots)
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
    let keys = plan::vips::keys(cfg);
    let index = stable_indices(keys.iter().copied(), &old_vips, MAX_VIPS);
    {
        let mut bits: Array<_, u64> =
            Array::try_from(map(ebpf, names::VIP_PORTS)?).map_err(merr(names::VIP_PORTS))?;
        for (vip, key) in cfg.vips.iter().zip(&keys) {
            let base = index[key] * lb_common::PORT_WORDS;
            for (i, w) in plan::vips::port_words(vip).iter().enumerate() {
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

/// Writes `VIP_TABLE`'s changed slots so that no reader sees half a slot: a slot that takes a
/// VIP is first written whole as removed (a probe goes past it), then only its family changes.
fn write_vip_table(ebpf: &mut Ebpf, want: &BTreeMap<AddrKey, u32>) -> Result<(), DatapathError> {
    let mut table: Array<_, VipSlot> =
        Array::try_from(map(ebpf, names::VIP_TABLE)?).map_err(merr(names::VIP_TABLE))?;
    let now: Vec<VipSlot> = (0..VIP_TABLE_SLOTS)
        .map(|i| table.get(&i, 0).map_err(merr(names::VIP_TABLE)))
        .collect::<Result<_, _>>()?;
    let next = plan::vips::vip_table(&now, want);
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
    let reverse = plan::reverse::reverse_map(cfg, slots);
    let addrs = plan::reverse::node_addrs(cfg, slots);
    // The filter gains the new addresses' bits before any entry needs them, and loses the
    // old ones' only after their entries are gone.
    let filter_now = read_filter(ebpf)?;
    let filter_new = plan::reverse::filter_words(addrs.iter().map(|(k, _)| k));
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

/// Gives `COOKIE_KEY` a random key, once: a pinned datapath keeps it (restarts and reloads
/// must still match the cookies `COOKIES` holds); a new one (fresh pins, an upgrade's staged
/// maps) gets its own.
fn cookie_key(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    use lb_common::cookie::{CookieKey, COOKIE_KEY};
    let mut key: Array<_, CookieKey> =
        Array::try_from(map(ebpf, COOKIE_KEY)?).map_err(merr(COOKIE_KEY))?;
    if key.get(&0, 0).map_err(merr(COOKIE_KEY))? != [0, 0] {
        return Ok(());
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| DatapathError::Map {
            name: COOKIE_KEY,
            message: format!("reading a random key from /dev/urandom: {e}"),
        })?;
    let w = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    key.set(0, [w(0), w(8)], 0).map_err(merr(COOKIE_KEY))
}

/// Writes `LIMIT_CFG` and `LIMIT_EXEMPT` from the config. When the limits change, the buckets
/// start full again (a bucket filled at an old, slower rate would otherwise hold new flows back
/// for up to the old burst's time).
fn limits(ebpf: &mut Ebpf, limits: Option<&Limits>) -> Result<(), DatapathError> {
    let want = plan::limits::limit_config(limits);

    // Exempt prefixes first: a new prefix is in place before a limit that needs it.
    {
        let mut trie: LpmTrie<&mut MapData, ExemptKey, u8> =
            LpmTrie::try_from(map(ebpf, lim::LIMIT_EXEMPT)?).map_err(merr(lim::LIMIT_EXEMPT))?;
        let keep = plan::limits::exempt_keys(limits);
        for k in &keep {
            trie.insert(k, 1, 0).map_err(merr(lim::LIMIT_EXEMPT))?;
        }
        let stale: Vec<Key<ExemptKey>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !keep
                    .iter()
                    .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        for k in stale {
            trie.remove(&k).map_err(merr(lim::LIMIT_EXEMPT))?;
        }
    }

    let mut cfg: Array<&mut MapData, LimitConfig> =
        Array::try_from(map(ebpf, lim::LIMIT_CFG)?).map_err(merr(lim::LIMIT_CFG))?;
    let old = cfg.get(&0, 0).map_err(merr(lim::LIMIT_CFG))?;
    if old == want {
        return Ok(());
    }
    cfg.set(0, want, 0).map_err(merr(lim::LIMIT_CFG))?;

    let mut global: Array<&mut MapData, u64> =
        Array::try_from(map(ebpf, lim::GLOBAL_BUCKET)?).map_err(merr(lim::GLOBAL_BUCKET))?;
    global.set(0, 0, 0).map_err(merr(lim::GLOBAL_BUCKET))?;
    let mut src: HashMap<&mut MapData, SrcKey, u64> =
        HashMap::try_from(map(ebpf, lim::SRC_BUCKETS)?).map_err(merr(lim::SRC_BUCKETS))?;
    let keys: Vec<SrcKey> = src.keys().filter_map(Result::ok).collect();
    for k in keys {
        // Gone already (evicted or expired under us) is fine.
        let _ = src.remove(&k);
    }
    Ok(())
}
