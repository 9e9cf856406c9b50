//! The real program: loaded and provisioned by the agent's own code, its maps read back into
//! the reference's [`Tables`] (all but the Maglev tables, which the reference builds and
//! [`Kernel::maglev`] reads for comparison), frames run with BPF_PROG_TEST_RUN between two
//! reads of the precise clock, counters read after each; the new-flow limits' maps on demand.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use anyhow::{Context as _, Result};
use aya::maps::{xdp::DevMapHash, Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use cidlb::{config::Config, datapath::Datapath, stats::Snapshot};
use lb_common::cookie::{self, CookieKey};
use lb_common::limits::{self, LimitConfig, SrcKey};
use lb_common::tunnel::{Tunnel, VIP_TUNNEL};
use lb_common::{
    names, AddrKey, NextHop, Node, NodeAddr, NodeStats, Reverse, ReverseKey, Vip, VlanKey,
    MAGLEV_ENTRIES, MAX_NODES, PORT_WORDS,
};
use lb_reference::Tables;

pub struct Kernel {
    pub dp: Datapath,
    /// Node slots to read per frame: those of `NODES` and of `NODE_ADDRS` (a disabled node
    /// has a slot for its replies but no `NODES` entry).
    slots: BTreeSet<u32>,
    last: Vec<u64>,
    last_nodes: BTreeMap<u32, NodeStats>,
}

/// What one frame did in the kernel.
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
    /// Counter deltas, in `Counter::ALL` order.
    pub counters: Vec<u64>,
    /// Per-slot deltas (slots that moved).
    pub nodes: BTreeMap<u32, NodeStats>,
    /// CLOCK_MONOTONIC (the clock `bpf_ktime_get_ns` reads) just before and just after the
    /// BPF_PROG_TEST_RUN call: the program read the precise clock in between.
    pub clock: (u64, u64),
}

impl Kernel {
    pub fn load(cfg: &Config) -> Result<(Self, Tables)> {
        let dp = Datapath::private(cfg)?;
        let tables = read_tables(&dp, cfg)?;
        let slots = slots_of(&tables);
        let mut k = Kernel {
            dp,
            slots,
            last: Vec::new(),
            last_nodes: BTreeMap::new(),
        };
        (k.last, k.last_nodes) = k.counters()?;
        Ok((k, tables))
    }

    /// Applies a changed config in place, as `cidlb run` does on a reload (the agent's own
    /// provisioning: NODES, rings, the Maglev table, reverse NAT; the next-hop cache is emptied), and reads the
    /// maps back.
    pub fn reload(&mut self, cfg: &Config) -> Result<Tables> {
        self.dp.reprovision(cfg, &|_| true)?;
        let tables = read_tables(&self.dp, cfg)?;
        self.slots = slots_of(&tables);
        (self.last, self.last_nodes) = self.counters()?;
        Ok(tables)
    }

    /// Empties the next-hop cache of every configured slot on every CPU, so whether a node's
    /// next hop is cached depends on the frames since, not on how fast they ran.
    pub fn clear_nexthop(&mut self) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut cache: PerCpuArray<&mut MapData, NextHop> =
            PerCpuArray::try_from(self.dp.ebpf.map_mut(names::NEXTHOP).context("NEXTHOP")?)?;
        for &slot in &self.slots {
            for idx in [slot * 2, slot * 2 + 1] {
                cache.set(
                    idx,
                    PerCpuValues::try_from(vec![NextHop::default(); cpus])?,
                    0,
                )?;
            }
        }
        Ok(())
    }

    /// Sets the packet-too-big answers' bucket (`TOO_BIG_BUCKET`) on every CPU to `tat`, the
    /// reference's one bucket: whichever CPU the next frame runs on starts where the reference
    /// does.
    pub fn set_too_big(&mut self, tat: u64) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut m: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(
            self.dp
                .ebpf
                .map_mut(lb_common::tunnel::TOO_BIG_BUCKET)
                .context("TOO_BIG_BUCKET")?,
        )?;
        m.set(0, PerCpuValues::try_from(vec![tat; cpus])?, 0)?;
        Ok(())
    }

    /// Every counter (in `Counter::ALL` order) and each node slot's traffic, summed over CPUs
    /// by the agent's own reader (`cidlb stats`).
    fn counters(&self) -> Result<(Vec<u64>, BTreeMap<u32, NodeStats>)> {
        let snap = Snapshot::from_ebpf(&self.dp.ebpf)?;
        let c = snap.counters.iter().map(|&(_, v)| v).collect();
        let n = Snapshot::slots_of_ebpf(&self.dp.ebpf, self.slots.iter().copied())?;
        Ok((c, n))
    }

    pub fn run(&mut self, frame: &[u8], ifindex: u32) -> Result<Run> {
        let before = monotonic_ns();
        let r = self.dp.run_packet(frame, ifindex, 1)?;
        let after = monotonic_ns();
        let (now, nodes) = self.counters()?;
        let counters = now.iter().zip(&self.last).map(|(a, b)| a - b).collect();
        let mut delta = BTreeMap::new();
        for (slot, s) in &nodes {
            let o = self.last_nodes.get(slot).copied().unwrap_or_default();
            let d = NodeStats {
                to_node_packets: s.to_node_packets - o.to_node_packets,
                to_node_bytes: s.to_node_bytes - o.to_node_bytes,
                from_node_packets: s.from_node_packets - o.from_node_packets,
                from_node_bytes: s.from_node_bytes - o.from_node_bytes,
            };
            if d != NodeStats::default() {
                delta.insert(*slot, d);
            }
        }
        self.last = now;
        self.last_nodes = nodes;
        Ok(Run {
            action: r.action,
            output: r.output,
            counters,
            nodes: delta,
            clock: (before, after),
        })
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.dp
            .ebpf
            .map(name)
            .with_context(|| format!("map {name}"))
    }

    /// `MAGLEV` (both halves of both families, one lookup per entry) and `MAGLEV_CTL`.
    pub fn maglev(&self) -> Result<(Vec<u32>, [u32; 2])> {
        let ctl: Array<&MapData, u32> = Array::try_from(self.map(names::MAGLEV_CTL)?)?;
        let ctl = [ctl.get(&0, 0)?, ctl.get(&1, 0)?];
        let maglev: Array<&MapData, u32> = Array::try_from(self.map(names::MAGLEV)?)?;
        let t = maglev.iter().collect::<Result<Vec<u32>, _>>()?;
        anyhow::ensure!(
            t.len() == MAGLEV_ENTRIES as usize,
            "map MAGLEV holds {} entries, want {MAGLEV_ENTRIES}",
            t.len()
        );
        Ok((t, ctl))
    }

    /// `LIMIT_CFG` as the agent wrote it.
    pub fn limit_config(&self) -> Result<LimitConfig> {
        let cfg: Array<&MapData, LimitConfig> = Array::try_from(self.map(limits::LIMIT_CFG)?)?;
        Ok(cfg.get(&0, 0)?)
    }

    /// `SRC_BUCKETS[key]` (None: no entry).
    pub fn src_bucket(&self, key: &SrcKey) -> Result<Option<u64>> {
        let m: HashMap<&MapData, SrcKey, u64> = HashMap::try_from(self.map(limits::SRC_BUCKETS)?)?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("SRC_BUCKETS lookup"),
        }
    }

    /// `GLOBAL_BUCKET`, the balancer's one global bucket.
    pub fn global_bucket(&self) -> Result<u64> {
        let m: Array<&MapData, u64> = Array::try_from(self.map(limits::GLOBAL_BUCKET)?)?;
        Ok(m.get(&0, 0)?)
    }

    /// Every `SRC_BUCKETS` entry.
    pub fn src_buckets(&self) -> Result<std::collections::HashMap<SrcKey, u64>> {
        let m: HashMap<&MapData, SrcKey, u64> = HashMap::try_from(self.map(limits::SRC_BUCKETS)?)?;
        m.iter()
            .collect::<Result<_, _>>()
            .context("reading SRC_BUCKETS")
    }

    /// Every `COOKIES` entry: keyed hash → learned time or pending walk.
    pub fn cookies(&self) -> Result<std::collections::HashMap<u64, u64>> {
        let m: HashMap<&MapData, u64, u64> = HashMap::try_from(self.map(cookie::COOKIES)?)?;
        m.iter()
            .collect::<Result<_, _>>()
            .context("reading COOKIES")
    }

    /// `COOKIES[key]` (None: no entry).
    pub fn cookie(&self, key: u64) -> Result<Option<u64>> {
        let m: HashMap<&MapData, u64, u64> = HashMap::try_from(self.map(cookie::COOKIES)?)?;
        match m.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("COOKIES lookup"),
        }
    }

    /// Every source in `KNOWN_SRCS`.
    pub fn known_srcs(&self) -> Result<HashSet<SrcKey>> {
        let m: HashMap<&MapData, SrcKey, u64> = HashMap::try_from(self.map(limits::KNOWN_SRCS)?)?;
        m.keys()
            .collect::<Result<_, _>>()
            .context("reading KNOWN_SRCS")
    }
}

/// CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The maps as provisioned, read back through the kernel (not recomputed from the config).
fn read_tables(dp: &Datapath, cfg: &Config) -> Result<Tables> {
    let ebpf = &dp.ebpf;
    let map = |n: &str| ebpf.map(n).with_context(|| format!("map {n}"));
    let mut t = Tables {
        config: Some(cfg.dp_config()),
        ..Default::default()
    };
    let nodes: HashMap<&MapData, u32, Node> = HashMap::try_from(map(names::NODES)?)?;
    for e in nodes.iter() {
        let (k, v) = e?;
        t.nodes.insert(k, v);
    }
    let vips: HashMap<&MapData, AddrKey, Vip> = HashMap::try_from(map(names::VIPS)?)?;
    for e in vips.iter() {
        let (k, v) = e?;
        t.vips.insert(k, v);
    }
    let ports: Array<&MapData, u64> = Array::try_from(map(names::VIP_PORTS)?)?;
    for v in t.vips.values() {
        let words = (0..PORT_WORDS)
            .map(|w| ports.get(&(v.index * PORT_WORDS + w), 0))
            .collect::<Result<Vec<u64>, _>>()?;
        t.vip_ports.insert(v.index, words);
    }
    let tunnels: Array<&MapData, Tunnel> = Array::try_from(map(VIP_TUNNEL)?)?;
    for v in t.vips.values() {
        t.vip_tunnel.insert(v.index, tunnels.get(&v.index, 0)?);
    }
    let rev: HashMap<&MapData, ReverseKey, Reverse> = HashMap::try_from(map(names::REVERSE)?)?;
    for e in rev.iter() {
        let (k, v) = e?;
        t.reverse.insert(k, v);
    }
    let na: HashMap<&MapData, AddrKey, NodeAddr> = HashMap::try_from(map(names::NODE_ADDRS)?)?;
    for e in na.iter() {
        let (k, v) = e?;
        t.node_addrs.insert(k, v);
    }
    let ring_len: Array<&MapData, u32> = Array::try_from(map(names::RING_LEN)?)?;
    let ring: Array<&MapData, u32> = Array::try_from(map(names::RING)?)?;
    for fi in 0..2u32 {
        let len = ring_len.get(&fi, 0)?;
        t.ring_len[fi as usize] = len;
        for pos in 0..len.min(MAX_NODES) {
            t.ring[fi as usize].push(ring.get(&(fi * MAX_NODES + pos), 0)?);
        }
    }
    // Not MAGLEV / MAGLEV_CTL (the reference builds its own; `Kernel::maglev` reads them to
    // compare) nor the limits (the reference derives them from the config).
    let devmap: DevMapHash<&MapData> = DevMapHash::try_from(map(names::DEVMAP)?)?;
    t.devmap = devmap.keys().collect::<Result<HashSet<u32>, _>>()?;
    let local: HashMap<&MapData, AddrKey, u8> = HashMap::try_from(map(names::LOCAL_ADDRS)?)?;
    t.local_addrs = local.keys().collect::<Result<HashSet<AddrKey>, _>>()?;
    let vlans: HashMap<&MapData, VlanKey, u32> = HashMap::try_from(map(names::VLAN_IFACES)?)?;
    for e in vlans.iter() {
        let (k, v) = e?;
        t.vlan_ifaces.insert(k, v);
    }
    // The agent's random key: the reference hashes cookies with it too.
    let key: Array<&MapData, CookieKey> = Array::try_from(map(cookie::COOKIE_KEY)?)?;
    t.cookie_key = key.get(&0, 0)?;
    anyhow::ensure!(t.cookie_key != [0, 0], "COOKIE_KEY was not written");
    Ok(t)
}

/// Every node slot the maps name.
fn slots_of(t: &Tables) -> BTreeSet<u32> {
    t.nodes
        .values()
        .map(|n| n.slot)
        .chain(t.node_addrs.values().map(|a| a.slot))
        .collect()
}
