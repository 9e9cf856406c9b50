//! IP fragments of a datagram to a VIP, or of a node's reply: only the first fragment carries
//! the UDP header (and the DTLS record), so the datapath decides on the first and records the
//! decision in `FRAGS` for the later ones, keyed by what every fragment of one datagram shares
//! (RFC 791 §3.2: source, destination, protocol and identification; RFC 8200 §4.5: source,
//! destination and the Fragment header's identification).

use core::mem::size_of;

/// `FRAGS` (LRU hash): [`FragKey`] → [`FragRoute`].
pub const FRAGS: &str = "FRAGS";
/// `FRAG_SCRATCH` (per-CPU array, not pinned): the key and value being built.
pub const FRAG_SCRATCH: &str = "FRAG_SCRATCH";

/// Entries of `FRAGS` unless `limits.fragment_capacity` says otherwise.
pub const DEFAULT_FRAG_CAPACITY: u32 = 8192;
/// Largest `limits.fragment_capacity`.
pub const MAX_FRAG_CAPACITY: u32 = 1 << 20;

/// [`FragRoute::dir`]: a datagram from a client to a VIP.
pub const FRAG_TO_VIP: u8 = 1;
/// [`FragRoute::dir`]: a node's reply to a client.
pub const FRAG_FROM_NODE: u8 = 2;

/// What the fragments of one datagram share: its source and destination as they arrive (the
/// maps' address form, IPv4 in word 0) and the IPv4 identification (16 bits) or the IPv6
/// Fragment header's identification (32), host order. A client's datagram to a VIP and a
/// node's reply never share a key: a VIP's client cannot have a node's address
/// (`drop_src_node`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// What the later fragments take from their first: its UDP ports (wire order), and, to a
/// VIP, the node it went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragRoute {
    /// To a VIP: the node id the first fragment went to. From a node: 0.
    pub node_id: u32,
    pub sport: u16,
    pub dport: u16,
    /// [`FRAG_TO_VIP`] or [`FRAG_FROM_NODE`].
    pub dir: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<FragKey>() == 40);
const _: () = assert!(size_of::<FragRoute>() == 12);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only with explicit padding fields.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragRoute {}
}
