//! Map names, sizes, keys and values.
//!
//! Addresses are `[u32; 4]` holding the wire bytes: an IPv4 address in word 0 (words 1..3 zero),
//! an IPv6 address in all four. Ports are `u16` holding the wire bytes (`u16::from_ne_bytes` of
//! the packet's two bytes). [`FAMILY_V4`] / [`FAMILY_V6`] say which.

use core::mem::size_of;

/// Address family tag inside keys and values (not the kernel's AF_* numbers).
pub const FAMILY_V4: u8 = 4;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u8 = 6;

/// Index of a family in per-family arrays (`RING`, `RING_LEN`, `RR`).
#[inline(always)]
pub const fn family_index(family: u8) -> u32 {
    if family == FAMILY_V6 {
        1
    } else {
        0
    }
}

/// An address in the form the maps hold it (see the module doc): wire bytes in u32 words, and
/// its family tag.
pub fn addr_words(ip: core::net::IpAddr) -> ([u32; 4], u8) {
    match ip {
        core::net::IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        core::net::IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// A port in the form the maps hold it: the wire bytes read as a native u16.
pub const fn port_wire(port: u16) -> u16 {
    port.to_be()
}

/// [`AddrKey`] of an address.
pub fn addr_key(ip: core::net::IpAddr) -> AddrKey {
    let (addr, family) = addr_words(ip);
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// Version of the pinned datapath's layout: which maps exist, their key and value types and
/// sizes, and what their values mean. Bump it whenever any of that changes; `cidlb run` refuses
/// to adopt pins of another layout (see `lb-userspace/src/layout.rs`). Version 0 is what cidlb
/// pinned before it had a `LAYOUT` map. Version 2 is the first that landed: the `LAYOUT`,
/// `NODE_ADDRS`, new-flow limit (`limits.rs`) and Maglev maps (version 1 never left development).
/// Version 3 adds `NODE_IDS`, `NODE_FILTER` and `VIP_TABLE`, and `Node::check`. Version 4 makes
/// `GLOBAL_BUCKET` one bucket shared by every CPU (an array, not a per-CPU array), and adds
/// `SRC_FILTER`, `LOCAL_ADDRS` (impossible sources) and `VLAN_IFACES` (the origin check of
/// tagged replies). Version 5 adds `COOKIES` and `COOKIE_KEY` (known sources proven by the
/// node's cookie, `cookie.rs`). Version 6 adds `REPLY_DESTS` (where ICMP errors about a
/// VIP's flows go, `icmp.rs`) and `FRAGS` (later IP fragments follow their first,
/// `lb_common::frag`), and gives `VIP_TUNNEL`'s value a meaning in what was padding:
/// `Tunnel::mtu` (`tunnel.mtu`; a value pinned by version 5 reads as 0, none).
pub const LAYOUT_VERSION: u32 = 6;

/// Slots of the `STATS` array: room to append counters without changing the pinned layout.
pub const STATS_SLOTS: u32 = 128;

/// Most nodes the datapath can hold (node slots, per-node counters, round-robin ring per family).
pub const MAX_NODES: u32 = 1024;
/// `NODE_FILTER` holds 2^this bits (32 KiB): one set for every node address
/// (`hash::addr_filter_bit`), so that most packets from elsewhere need no `REVERSE` lookup.
pub const NODE_FILTER_BITS_LOG2: u32 = 18;
/// u64 words of `NODE_FILTER`.
pub const NODE_FILTER_WORDS: u32 = 1 << (NODE_FILTER_BITS_LOG2 - 6);
/// `SRC_FILTER` holds 2^this bits (8 KiB): one set for every address no client can have (VIPs,
/// node addresses, the balancer's own; `hash::src_filter_bit`), so a clean source costs one
/// array read on the way to a VIP.
pub const SRC_FILTER_BITS_LOG2: u32 = 16;
/// u64 words of `SRC_FILTER`.
pub const SRC_FILTER_WORDS: u32 = 1 << (SRC_FILTER_BITS_LOG2 - 6);
/// Most balancer addresses in `LOCAL_ADDRS`.
pub const MAX_LOCAL_ADDRS: u32 = 1024;
/// Most VLAN devices in `VLAN_IFACES`.
pub const MAX_VLAN_IFACES: u32 = 4096;
/// `NODE_IDS` slots: node ids below this (one- and two-byte node ids) are found by array index,
/// larger ones in the `NODES` hash.
pub const NODE_ID_SLOTS: u32 = 65536;
/// Most VIP addresses.
pub const MAX_VIPS: u32 = 64;
/// `VIP_TABLE` has 2^this slots (4 per VIP at most).
pub const VIP_TABLE_SLOTS_LOG2: u32 = 8;
/// Slots of `VIP_TABLE`.
pub const VIP_TABLE_SLOTS: u32 = 1 << VIP_TABLE_SLOTS_LOG2;
/// Slots the datapath probes in `VIP_TABLE` (linear probing from `hash::vip_slot`) before it
/// looks the address up in `VIPS`.
pub const VIP_PROBES: u32 = 4;
/// `VipSlot::family` of a slot no VIP ever used: a probe that reaches it stops.
pub const VIP_SLOT_EMPTY: u8 = 0;
/// `VipSlot::family` of a slot whose VIP was removed: probes go on past it.
pub const VIP_SLOT_REMOVED: u8 = 0xff;
/// u64 words of one VIP's port bitmap (65536 ports / 64).
pub const PORT_WORDS: u32 = 1024;
/// Most reverse-NAT entries (node address+port pairs).
pub const MAX_REVERSE: u32 = 65536;
/// Most interfaces in the redirect map.
pub const MAX_IFACES: u32 = 64;
/// Slots of each Maglev table (`flows.policy: maglev`): 65537 = 2^16 + 1, a prime, the
/// agent's `maglev::DEFAULT_SIZE` (at least 64 slots per node for [`MAX_NODES`] nodes).
pub const MAGLEV_SIZE: u32 = 65537;
/// `MAGLEV` holds one table per family and half: `(family index * 2 + half) * MAGLEV_SIZE + slot`.
/// The agent writes the inactive half, then flips `MAGLEV_CTL`: a new flow reads either the
/// whole old table or the whole new one.
pub const MAGLEV_ENTRIES: u32 = 2 * 2 * MAGLEV_SIZE;
/// `MAGLEV_CTL[family index]`: no table (no node takes new flows of that family).
pub const MAGLEV_CTL_EMPTY: u32 = 0;
/// `MAGLEV_CTL[family index]`: half 0 is active ([`MAGLEV_CTL_HALF0`] + 1: half 1).
pub const MAGLEV_CTL_HALF0: u32 = 1;

/// `DpConfig::policy`: new flows take the next node of the per-CPU weighted round-robin ring.
pub const POLICY_ROUND_ROBIN: u32 = 0;
/// `DpConfig::policy`: new flows take `MAGLEV[flow_hash(key) % MAGLEV_SIZE]` of their family.
pub const POLICY_MAGLEV: u32 = 1;

/// Default flow table capacity (overridden from the config at load time).
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;
/// Largest flow table the config accepts. The kernel preallocates it; `cargo xtask bench`
/// measures what it costs.
pub const MAX_FLOW_CAPACITY: u32 = 1 << 24;

/// Map names: the static names in lb-ebpf, pin file names and bpftool names (≤ 15 bytes).
pub mod names {
    pub const PROGRAM: &str = "cidlb";
    /// The empty reference program (bench only).
    pub const FLOOR: &str = "cidlb_floor";
    /// The throughput bench's node sink and ceiling forwarder (bench only).
    pub const SINK_PROG: &str = "cidlb_sink";
    pub const FWD_PROG: &str = "cidlb_fwd";
    pub const SINK: &str = "SINK";
    pub const SINK_NODE: &str = "SINK_NODE";
    pub const FWD: &str = "FWD";
    pub const STATS: &str = "STATS";
    pub const NODE_STATS: &str = "NODE_STATS";
    pub const NODES: &str = "NODES";
    /// Node id → node for ids below [`super::NODE_ID_SLOTS`] (see [`super::Node::check`]).
    pub const NODE_IDS: &str = "NODE_IDS";
    /// VIP addresses by hash, open addressing (see [`super::VipSlot`]).
    pub const VIP_TABLE: &str = "VIP_TABLE";
    /// A bit per node address (see [`super::NODE_FILTER_BITS_LOG2`]).
    pub const NODE_FILTER: &str = "NODE_FILTER";
    pub const RING: &str = "RING";
    pub const RING_LEN: &str = "RING_LEN";
    pub const RR: &str = "RR";
    pub const FLOWS: &str = "FLOWS";
    /// Client flow → the node that last answered it ([`super::ReplyDest`]), sized like `FLOWS`.
    pub const REPLY_DESTS: &str = "REPLY_DESTS";
    pub const VIPS: &str = "VIPS";
    pub const VIP_PORTS: &str = "VIP_PORTS";
    pub const REVERSE: &str = "REVERSE";
    pub const DEVMAP: &str = "DEVMAP";
    pub const NEXTHOP: &str = "NEXTHOP";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Maglev tables of node ids (see [`super::MAGLEV_ENTRIES`]).
    pub const MAGLEV: &str = "MAGLEV";
    /// Per family: which `MAGLEV` half is active (see [`super::MAGLEV_CTL_EMPTY`]).
    pub const MAGLEV_CTL: &str = "MAGLEV_CTL";
    /// A bit per impossible source address (see [`super::SRC_FILTER_BITS_LOG2`]).
    pub const SRC_FILTER: &str = "SRC_FILTER";
    /// The balancer's own addresses (`AddrKey` → 1), kept current by the agent.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// (parent ifindex, VLAN id) → VLAN device ifindex (see [`super::VlanKey`]).
    pub const VLAN_IFACES: &str = "VLAN_IFACES";
    /// One-entry array holding [`super::LAYOUT_VERSION`] of the pinned datapath.
    pub const LAYOUT: &str = "LAYOUT";
    /// Read-only global holding [`super::DpConfig`].
    pub const CONFIG: &str = "CONFIG";
}

/// Load-time constants of the datapath, a read-only global (`CONFIG`) the agent sets with
/// `EbpfLoader::override_global` so the verifier sees constants and prunes dead branches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DpConfig {
    /// CID length in bytes (1..=32).
    pub cid_len: u32,
    /// Offset of the node id inside the CID.
    pub node_id_offset: u32,
    /// Node id length in bytes (1..=4), big-endian.
    pub node_id_len: u32,
    /// 1: a CID naming an unknown node is routed by flow; 0: dropped.
    pub unknown_node_flow: u32,
    /// Flow idle timeout in nanoseconds.
    pub idle_timeout_ns: u64,
    /// A flow's `last_seen_ns` is rewritten when it is older than this (min(1 s, timeout / 8)),
    /// so a busy flow does not write its entry on every packet; see `flow.rs`.
    pub refresh_ns: u64,
    /// 1: shadow mode: decide and count, but pass every packet to the kernel unchanged.
    pub shadow: u32,
    /// How a new flow picks its node: [`POLICY_ROUND_ROBIN`] or [`POLICY_MAGLEV`].
    pub policy: u32,
    /// Record formats routed by CID (config `dtls.versions`): [`DTLS_V12`] | [`DTLS_V13`].
    pub dtls_versions: u32,
    /// ICMP errors about a VIP's flows forwarded to nodes, per second and CPU (config
    /// `icmp.rate`); a burst of a tenth of that (at least one) may go at once. See `icmp.rs`.
    pub icmp_rate: u32,
}

/// The reply path records who answered a client flow (`REPLY_DESTS`) only for a reply whose
/// IP packet is longer than this (IPv4: 576 bytes, the datagram every host must take; IPv6:
/// 1280, its minimum MTU): only such a reply can meet a smaller path MTU, and most replies
/// then pay nothing. Errors about shorter replies pass as before.
pub const REPLY_DEST_MIN_V4: usize = 576;
pub const REPLY_DEST_MIN_V6: usize = 1280;

/// `icmp.rate`'s default: ICMP errors forwarded to nodes per second and CPU.
pub const DEFAULT_ICMP_RATE: u32 = 1000;

/// `REPLY_DESTS` value: the node that last answered a client's flow through this balancer
/// (NAT mode), where an ICMP error about that answer must go (`icmp.rs`). Keyed by the
/// client's [`FlowKey`] (client → VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyDest {
    /// The node's address (IPv4 in word 0), wire bytes.
    pub addr: [u32; 4],
    /// The node's serving port, wire bytes.
    pub port: u16,
    pub _pad: u16,
    /// The node's `NODE_STATS` slot.
    pub node_slot: u32,
}

const _: () = assert!(core::mem::size_of::<ReplyDest>() == 24);

/// `DpConfig::dtls_versions` bit: DTLS 1.2 tls12_cid records (RFC 9146) route by CID.
pub const DTLS_V12: u32 = 1;
/// `DpConfig::dtls_versions` bit: DTLS 1.3 unified-header records with C set (RFC 9147) route by CID.
pub const DTLS_V13: u32 = 2;

impl DpConfig {
    /// Californium's default shape: 6-byte CID, 1-byte node id at offset 0, 30 s idle timeout.
    pub const DEFAULT: Self = Self {
        cid_len: 6,
        node_id_offset: 0,
        node_id_len: 1,
        unknown_node_flow: 0,
        idle_timeout_ns: 30_000_000_000,
        refresh_ns: 1_000_000_000,
        shadow: 0,
        policy: POLICY_MAGLEV,
        dtls_versions: DTLS_V12 | DTLS_V13,
        icmp_rate: DEFAULT_ICMP_RATE,
    };
}

/// Node flags.
pub const NODE_F_V4: u16 = 1;
/// The node has an IPv6 address.
pub const NODE_F_V6: u16 = 2;

/// `NODES` value, keyed by node id (`u32`, host order: the id decoded from the CID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// IPv6 address (valid with [`NODE_F_V6`]).
    pub addr6: [u32; 4],
    /// IPv4 address (valid with [`NODE_F_V4`]).
    pub addr4: u32,
    /// Destination port on the node (wire bytes); 0 keeps the port the client used.
    pub port: u16,
    /// `NODE_F_*`.
    pub flags: u16,
    /// Index into `NODE_STATS`.
    pub slot: u32,
    /// [`crate::hash::node_check`] of the fields above ([`Node::sealed`]). The agent updates a
    /// `NODE_IDS` element in place, so a packet reading it meanwhile may see part of the old
    /// node and part of the new one; the datapath then finds the check wrong and reads the
    /// node from `NODES`, whose entries are replaced whole.
    pub check: u32,
}

impl Node {
    /// The node with its [`Node::check`] set.
    pub const fn sealed(mut self) -> Self {
        self.check = crate::hash::node_check(&self);
        self
    }
}

/// Per-node traffic, a `NODE_STATS` per-CPU value indexed by [`Node::slot`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Packets forwarded from clients to the node.
    pub to_node_packets: u64,
    /// Bytes (whole frames) forwarded from clients to the node.
    pub to_node_bytes: u64,
    /// Reply packets from the node un-NATed to clients.
    pub from_node_packets: u64,
    /// Reply bytes from the node.
    pub from_node_bytes: u64,
}

/// `FLOWS` key: a client's UDP 5-tuple (protocol is always UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `FLOWS` value: the node a flow is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub node_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC at tick resolution) of the last packet.
    pub last_seen_ns: u64,
}

/// An address key: `VIPS` (a VIP) and `NODE_ADDRS` (a node's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `VIP_TABLE` value: a VIP address and its port bitmap index, at the first free slot of its
/// probe sequence (`hash::vip_slot`, then the next ones, wrapping). Slots are never emptied
/// (a removed VIP leaves [`VIP_SLOT_REMOVED`]), and a VIP that finds no free slot within
/// [`VIP_PROBES`] is only in `VIPS`, where the datapath looks after that many occupied slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub addr: [u32; 4],
    /// `FAMILY_V4`, `FAMILY_V6`, [`VIP_SLOT_EMPTY`] or [`VIP_SLOT_REMOVED`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// As `Vip::index`.
    pub index: u32,
}

/// `VIPS` value: which port bitmap in `VIP_PORTS` belongs to the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip {
    /// Bitmap index: words `index * PORT_WORDS ..` of `VIP_PORTS`.
    pub index: u32,
}

/// `NODE_ADDRS` value: the node that owns an address (for packets from a node's address that
/// carry no port, such as fragments).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAddr {
    /// The node's `NODE_STATS` slot.
    pub slot: u32,
}

/// `REVERSE` key: where a node's replies come from (node address and source port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// `REVERSE` value: the VIP address and port a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverse {
    pub vip: [u32; 4],
    pub vip_port: u16,
    pub _pad: u16,
    /// The replying node's `NODE_STATS` slot.
    pub node_slot: u32,
}

/// `VLAN_IFACES` key: a VLAN device by its parent device and VLAN id, as a tagged frame shows
/// them (XDP runs on the parent; the FIB names the VLAN device). A device stacked on another
/// VLAN device (802.1ad + 802.1Q) has that device as its parent. Value: the VLAN device's
/// ifindex (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VlanKey {
    pub parent: u32,
    /// The 12-bit VLAN id (host order).
    pub vid: u16,
    pub _pad: u16,
}

/// `SINK` slots of the bench's node sink.
pub const SINK_PACKETS: u32 = 0;
pub const SINK_BYTES: u32 = 1;
pub const SINK_MISROUTED: u32 = 2;
pub const SINK_SLOTS: u32 = 3;

/// `FWD` value of the bench's ceiling forwarder: where every packet goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdTarget {
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

/// Lifetime of a cached next hop (`NEXTHOP`): a neighbour's new MAC is used within this time.
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

/// `NEXTHOP` per-CPU value, indexed by `node slot * 2 + family index`: the FIB result for the
/// node's address, so most packets to a node skip `bpf_fib_lookup`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_ktime_get_coarse_ns()` after which the entry is stale; 0 = empty.
    pub expires_ns: u64,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Path MTU towards the next hop (route or device MTU), for the check `bpf_fib_lookup`
    /// would make; 0 = unknown (no check).
    pub mtu: u16,
    pub _pad: [u8; 6],
}

const _: () = {
    assert!(size_of::<NextHop>() == 32);
    assert!(size_of::<FwdTarget>() == 16);
    assert!(size_of::<DpConfig>() == 48);
    assert!(size_of::<Node>() == 32);
    assert!(size_of::<NodeStats>() == 32);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<Flow>() == 16);
    assert!(size_of::<AddrKey>() == 20);
    assert!(size_of::<Vip>() == 4);
    assert!(size_of::<VipSlot>() == 24);
    assert!(size_of::<NodeAddr>() == 4);
    assert!(size_of::<ReverseKey>() == 20);
    assert!(size_of::<Reverse>() == 24);
    assert!(size_of::<VlanKey>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers with explicit padding
    // fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::DpConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReplyDest {}
    unsafe impl aya::Pod for super::Node {}
    unsafe impl aya::Pod for super::NodeStats {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::Vip {}
    unsafe impl aya::Pod for super::VipSlot {}
    unsafe impl aya::Pod for super::NodeAddr {}
    unsafe impl aya::Pod for super::ReverseKey {}
    unsafe impl aya::Pod for super::Reverse {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::FwdTarget {}
    unsafe impl aya::Pod for super::VlanKey {}
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
