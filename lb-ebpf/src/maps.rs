//! Every map of the datapath. Names match `lb_common::names` (pin files, bpftool, agent).
//! Sizes the agent may change at load time: `FLOWS` and `REPLY_DESTS` (flows.capacity),
//! `COOKIES` (limits.cookie_capacity), `FRAGS` (limits.fragment_capacity).

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    cookie::{CookieInput, CookieKey, DEFAULT_COOKIE_CAPACITY},
    frag::{FragKey, FragRoute, DEFAULT_FRAG_CAPACITY},
    hash::node_check,
    limits::{ExemptKey, LimitConfig, SrcKey, MAX_EXEMPT, MAX_KNOWN_SRCS, MAX_SRC_BUCKETS},
    tunnel::Tunnel,
    AddrKey, Flow, FlowKey, NextHop, Node, NodeAddr, NodeStats, ReplyDest, Reverse, ReverseKey,
    Vip, VipSlot, VlanKey, DEFAULT_FLOW_CAPACITY, MAGLEV_ENTRIES, MAX_IFACES, MAX_LOCAL_ADDRS,
    MAX_NODES, MAX_REVERSE, MAX_VIPS, MAX_VLAN_IFACES, NODE_FILTER_WORDS, NODE_ID_SLOTS,
    PORT_WORDS, SRC_FILTER_WORDS, STATS_SLOTS, VIP_TABLE_SLOTS,
};

/// Per-CPU counters indexed by [`lb_common::Counter`] (`STATS_SLOTS` ≥ the number of counters, so
/// appending one keeps the pinned layout).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

/// The pinned layout's version (`lb_common::LAYOUT_VERSION`), written by the agent; the
/// program never reads it.
#[map]
pub static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU per-node traffic indexed by `Node::slot`.
#[map]
pub static NODE_STATS: PerCpuArray<NodeStats> = PerCpuArray::with_max_entries(MAX_NODES, 0);

/// Node id (as decoded from a CID) → where the node is. Every node is here; the agent replaces
/// a changed node's entry whole, so a read of it is never torn.
#[map]
pub static NODES: HashMap<u32, Node> = HashMap::with_max_entries(MAX_NODES, 0);

/// The same nodes by id, for ids below `NODE_ID_SLOTS`: an array lookup is a bounds check and
/// an add, a hash lookup hashes the key and walks a bucket (the hot CID path: 31 ns without
/// it, 26 ns with it and its check word; `cargo xtask bench` at commits 71b729d and 5f325f5).
/// An element is updated in place, so every one carries a check word (see [`node`]).
#[map]
pub static NODE_IDS: Array<Node> = Array::with_max_entries(NODE_ID_SLOTS, 0);

/// Round-robin rings of node ids for new flows: family index * MAX_NODES + position.
/// Only nodes that take new flows and have an address of that family are in a ring.
#[map]
pub static RING: Array<u32> = Array::with_max_entries(2 * MAX_NODES, 0);

/// Used length of each family's ring.
#[map]
pub static RING_LEN: Array<u32> = Array::with_max_entries(2, 0);

/// Per-CPU round-robin cursor per family: no cross-CPU contention on new flows.
#[map]
pub static RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(2, 0);

/// Maglev tables of node ids for new flows (`flows.policy: maglev`), two halves per family:
/// `(family index * 2 + half) * MAGLEV_SIZE + slot`. See `maglev.rs`.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_ENTRIES, 0);

/// Per family: the active `MAGLEV` half + 1, or 0 for no table (`lb_common::MAGLEV_CTL_*`).
#[map]
pub static MAGLEV_CTL: Array<u32> = Array::with_max_entries(2, 0);

/// Client 5-tuple → pinned node, least recently used evicted first.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// Client flow (client → VIP) → the node that last answered it through this balancer: where
/// an ICMP error about that answer goes (`icmp.rs`). Written on the reply path when it
/// changes; sized like `FLOWS` by the agent.
#[map]
pub static REPLY_DESTS: LruHashMap<FlowKey, ReplyDest> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// `icmp.rs`' `REPLY_DESTS` key and value, per CPU (not pinned: scratch space only; on the
/// stack they took what the program does not have).
#[map]
pub static REPLY_SCRATCH: PerCpuArray<ReplyScratch> = PerCpuArray::with_max_entries(1, 0);

/// What `REPLY_SCRATCH` holds.
#[repr(C)]
pub struct ReplyScratch {
    pub key: FlowKey,
    pub dest: ReplyDest,
}

/// Per CPU: the GCRA theoretical arrival time of the next ICMP error forwarded to a node
/// (`icmp.rate`). Not pinned: a new program starts with a full burst.
#[map]
pub static ICMP_TAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// VIP address → index of its port bitmap. The datapath reads it only for a VIP that found no
/// slot in `VIP_TABLE` (see `vip.rs`).
#[map]
pub static VIPS: HashMap<AddrKey, Vip> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The VIPs again, by hash with open addressing (`lb_common::VipSlot`): a few array reads and
/// compares instead of hashing a 20-byte key and walking a bucket on every packet.
#[map]
pub static VIP_TABLE: Array<VipSlot> = Array::with_max_entries(VIP_TABLE_SLOTS, 0);

/// Per VIP (by its `VIP_PORTS` index): its encapsulation in tunnel mode, all zero in NAT mode
/// (`lb_common::tunnel`).
#[map]
pub static VIP_TUNNEL: Array<Tunnel> = Array::with_max_entries(MAX_VIPS, 0);

/// One 65536-bit port bitmap per VIP: bit p set = UDP port p of that VIP is balanced.
#[map]
pub static VIP_PORTS: Array<u64> = Array::with_max_entries(MAX_VIPS * PORT_WORDS, 0);

/// Node address + source port → VIP address + port, for stateless reverse NAT of replies.
#[map]
pub static REVERSE: HashMap<ReverseKey, Reverse> = HashMap::with_max_entries(MAX_REVERSE, 0);

/// A node's address (any port) → its slot: recognises packets from a node that carry no
/// ports (fragments, extension headers).
#[map]
pub static NODE_ADDRS: HashMap<AddrKey, NodeAddr> = HashMap::with_max_entries(2 * MAX_NODES, 0);

/// A bit per node address (`lb_common::hash::addr_filter_bit`): clear means the source is no
/// node's, so neither `REVERSE` nor `NODE_ADDRS` is looked up (false positives only cost that
/// lookup). Their hash buckets are spread over 1 MiB and 32 KiB, and a packet from a client that
/// is not ours would otherwise miss the cache on them when many clients send.
#[map]
pub static NODE_FILTER: Array<u64> = Array::with_max_entries(NODE_FILTER_WORDS, 0);

/// A bit per address no client can have: every VIP, node address and address of the balancer
/// itself (`lb_common::hash::src_filter_bit`). Clear means the source of a packet to a VIP port
/// is none of those, with one array read; set, `VIP_TABLE`, `NODE_ADDRS` and `LOCAL_ADDRS` say
/// which (false positives only cost those lookups). See `vip::check_source`.
#[map]
pub static SRC_FILTER: Array<u64> = Array::with_max_entries(SRC_FILTER_WORDS, 0);

/// The balancer's own addresses (any interface, any scope), kept current by the agent.
#[map]
pub static LOCAL_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// (parent ifindex, VLAN id) → the VLAN device's ifindex, for every VLAN device on (or stacked
/// on) an attached interface; filled by the agent. See `reply::check_origin`.
#[map]
pub static VLAN_IFACES: HashMap<VlanKey, u32> = HashMap::with_max_entries(MAX_VLAN_IFACES, 0);

/// ifindex → ifindex of the interfaces cidlb is attached to (redirect targets).
#[map]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

/// Per-CPU next-hop cache per node and family (see `forward::lookup_node`).
#[map]
pub static NEXTHOP: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(2 * MAX_NODES, 0);

/// The FIB lookup's parameter blocks (`forward.rs`), per CPU: on the stack their 128 bytes
/// left no room in the program's 512 for anything else. Not pinned: scratch space only.
#[map]
pub static FIB_SCRATCH: PerCpuArray<FibScratch> = PerCpuArray::with_max_entries(1, 0);

/// What `FIB_SCRATCH` holds: the lookup's parameters and the MTU probe's copy of them.
#[repr(C)]
pub struct FibScratch {
    pub fib: bpf_fib_lookup,
    pub probe: bpf_fib_lookup,
}

/// New-flow limits (`limit.rs`): what is limited; all zero when `limits:` is not configured.
#[map]
pub static LIMIT_CFG: Array<LimitConfig> = Array::with_max_entries(1, 0);

/// Per-source new-flow bucket (`tat`), least recently used evicted first.
#[map]
pub static SRC_BUCKETS: LruHashMap<SrcKey, u64> = LruHashMap::with_max_entries(MAX_SRC_BUCKETS, 0);

/// The global new-flow bucket (`tat`), shared by every CPU (compare-and-swap).
#[map]
pub static GLOBAL_BUCKET: Array<u64> = Array::with_max_entries(1, 0);

/// Sources that recently echoed a node's cookie → when (coarse clock) they last did.
#[map]
pub static KNOWN_SRCS: LruHashMap<SrcKey, u64> = LruHashMap::with_max_entries(MAX_KNOWN_SRCS, 0);

/// Cookies of nodes' HelloVerifyRequests and HelloRetryRequests by keyed hash, and pending
/// fragmented ClientHellos (`lb_common::cookie`, `cookie.rs`).
#[map]
pub static COOKIES: LruHashMap<u64, u64> = LruHashMap::with_max_entries(DEFAULT_COOKIE_CAPACITY, 0);

/// IP fragments: a datagram's first fragment's decision, for its later fragments
/// (`lb_common::frag`, `frag.rs`).
#[map]
pub static FRAGS: LruHashMap<FragKey, FragRoute> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_CAPACITY, 0);

/// `frag.rs`' key and value, per CPU (not pinned: scratch space only).
#[map]
pub static FRAG_SCRATCH: PerCpuArray<FragScratch> = PerCpuArray::with_max_entries(1, 0);

/// What `FRAG_SCRATCH` holds.
#[repr(C)]
pub struct FragScratch {
    pub key: FragKey,
    pub route: FragRoute,
}

/// The key of `COOKIES`' hash, random, written once by the agent.
#[map]
pub static COOKIE_KEY: Array<CookieKey> = Array::with_max_entries(1, 0);

/// `cookie.rs`' buffers, per CPU (not pinned: scratch space only).
#[map]
pub static COOKIE_SCRATCH: PerCpuArray<CookieScratch> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of [`CookieScratch::buf`].
pub const COOKIE_BUF: usize = 40;

/// What `COOKIE_SCRATCH` holds: the hash input, and bytes read from the packet.
#[repr(C)]
pub struct CookieScratch {
    pub input: CookieInput,
    pub buf: [u8; COOKIE_BUF],
}

/// Prefixes exempt from the per-source limit (IPv4 as IPv4-mapped IPv6).
#[map]
pub static LIMIT_EXEMPT: LpmTrie<ExemptKey, u8> = LpmTrie::with_max_entries(MAX_EXEMPT, 0);

/// The node with this id, if configured: from `NODE_IDS` when its entry is whole, else (a read
/// torn by the agent's update, or an id of three or four bytes) from `NODES`. An entry with
/// no family flag is no node: a torn read cannot clear the flags of a node that has a family
/// before and after the update.
#[inline(always)]
pub fn node(id: u32) -> Option<Node> {
    if id < NODE_ID_SLOTS {
        if let Some(n) = NODE_IDS.get(id) {
            let n = *n;
            if n.flags == 0 {
                return None;
            }
            if n.check == node_check(&n) {
                return Some(n);
            }
        }
    }
    // SAFETY: the value is copied out while the RCU read lock of the program run holds.
    unsafe { NODES.get(id).copied() }
}

/// The packet-too-big answers' rate limit (`too_big.rs`): per CPU, the GCRA bucket's
/// theoretical arrival time on the coarse clock (`lb_common::tunnel::too_big_admit`). Not
/// pinned: an upgrade starts with full buckets.
#[map]
pub static TOO_BIG_BUCKET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
