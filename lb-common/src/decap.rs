//! The node side of tunnel mode: `lb-ebpf/src/decap.rs`, an XDP program on a node's interface
//! that strips the outer header of the packets balancers tunnel to this node (`tunnel.rs`)
//! and hands the client's packet to the node's stack. Its object, maps and counters.

/// The program's name in its object (`decap` binary of lb-ebpf).
pub const PROGRAM: &str = "cidlb_decap";
/// `DECAP_ADDRS` (hash): the node's addresses balancers tunnel to, [`crate::AddrKey`] → 1.
pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
/// `DECAP_PORTS` (array, 1): the GUE port (wire bytes) the node decapsulates; 0: no GUE.
pub const DECAP_PORTS: &str = "DECAP_PORTS";
/// `DECAP_STATS` (per-CPU array): the counters below.
pub const DECAP_STATS: &str = "DECAP_STATS";

/// Entries of `DECAP_ADDRS`.
pub const MAX_DECAP_ADDRS: u32 = 64;

/// `DECAP_STATS` slots.
pub const DECAP_IPIP: u32 = 0;
pub const DECAP_GUE: u32 = 1;
/// Not addressed to a tunnel of this node (its own traffic, a VLAN-tagged frame): passed
/// untouched.
pub const PASS_NOT_TUNNEL: u32 = 2;
/// To this node's tunnel, but the inner packet is not IP of the version its header says
/// (or shorter than an IP header): dropped.
pub const DROP_MALFORMED: u32 = 3;
pub const DECAP_SLOTS: u32 = 4;

/// The counters' names, by slot.
pub const DECAP_NAMES: [&str; DECAP_SLOTS as usize] = [
    "decap_ipip",
    "decap_gue",
    "pass_not_tunnel",
    "drop_decap_malformed",
];
