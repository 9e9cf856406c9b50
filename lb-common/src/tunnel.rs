//! Tunnel mode (direct server return): a VIP's encapsulation, as the agent writes it into
//! `VIP_TUNNEL` and the datapath (`lb-ebpf/src/tunnel.rs`) applies it.
//!
//! The node is chosen as in NAT mode; instead of rewriting the destination, the balancer puts
//! the client's packet, as it arrived (IPv4 options included, VLAN tags not: they belong to the
//! ingress link), inside an outer header to the node's address:
//! - `ipip`: IPv4 in IPv4 (RFC 2003, protocol 4) or IPv6 in IPv6 (RFC 2473, next header 41);
//! - `gue`: the same inner packet in UDP to the VIP's GUE port, GUE variant 1 (direct IP
//!   encapsulation: the payload starts with the inner IP header, whose version nibble 4 or 6
//!   makes the GUE variant bits 01), which Linux's `fou`/`gue` decapsulates.
//!
//! The outer source is a configured address, or, for a prefix, that prefix with its host bits
//! taken from the flow's hash, so a node's NIC spreads `ipip` flows over its queues (RSS
//! hashes the outer header); the GUE source port always follows the flow.

use core::mem::size_of;

/// `VIP_TUNNEL` (array, one [`Tunnel`] per VIP bitmap index, `MAX_VIPS`).
pub const VIP_TUNNEL: &str = "VIP_TUNNEL";

/// [`Tunnel::encap`]: NAT mode (no encapsulation).
pub const ENCAP_NONE: u8 = 0;
/// IP in IP (RFC 2003 / RFC 2473).
pub const ENCAP_IPIP: u8 = 1;
/// GUE variant 1 (IP in UDP).
pub const ENCAP_GUE: u8 = 2;

/// IP protocol numbers of the outer header.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_UDP: u8 = 17;

/// Host bits of an outer source prefix that the flow hash may fill, at most.
pub const MAX_SOURCE_BITS: u8 = 16;

/// The flow's hash for the outer header: a prefix source's host bits, the GUE source port and
/// the IPv6 flow label. Only spreading matters here (a node's RSS, the underlay's ECMP), not
/// agreement between balancers, so it is a cheap multiply-xor mix of the addresses' words and
/// the ports (wire order), not the Maglev flow hash.
#[inline(always)]
pub const fn tuple_hash(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16) -> u32 {
    let a = src[0] ^ src[1] ^ src[2] ^ src[3];
    let b = dst[0] ^ dst[1] ^ dst[2] ^ dst[3];
    let mut h = a.wrapping_mul(0x9e37_79b1) ^ b;
    h = h.wrapping_mul(0x85eb_ca6b) ^ (sport as u32 | (dport as u32) << 16);
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// GUE source ports: 49152 + the flow hash's low 14 bits (the dynamic range, RFC 6335).
#[inline(always)]
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    0xc000 | (flow_hash & 0x3fff) as u16
}

/// Bytes the encapsulation adds in front of the inner IP packet.
#[inline(always)]
pub const fn overhead(encap: u8, ipv6: bool) -> usize {
    let ip = if ipv6 { 40 } else { 20 };
    if encap == ENCAP_GUE {
        ip + 8
    } else {
        ip
    }
}

/// The path MTU of a tunnel packet: the smaller of the configured `tunnel.mtu` and the FIB's
/// MTU towards the node's next hop (route or device MTU), each 0 when unknown (0: no limit).
#[inline(always)]
pub const fn path_mtu(configured: u16, fib: u16) -> u16 {
    if configured != 0 && (fib == 0 || configured < fib) {
        configured
    } else {
        fib
    }
}

/// The MTU a packet-too-big answer reports: the path MTU less the encapsulation, `None` when
/// no answer can be right: below IPv4's 68 (RFC 791) or IPv6's 1280 (RFC 8200 §5; the config
/// check refuses a `tunnel.mtu` that low, the FIB's MTU is the underlay's business).
#[inline(always)]
pub const fn inner_mtu(path_mtu: u16, overhead: usize, ipv6: bool) -> Option<u16> {
    let m = path_mtu as usize;
    let min = if ipv6 { MIN_MTU6 } else { MIN_MTU4 };
    if m < overhead + min {
        None
    } else {
        Some((m - overhead) as u16)
    }
}

/// IPv4's smallest MTU (RFC 791) and IPv6's (RFC 8200 §5).
pub const MIN_MTU4: usize = 68;
pub const MIN_MTU6: usize = 1280;

/// The largest ICMP error, quote included: 576 bytes over IPv4 (RFC 1812 §4.3.2.3), 1280 over
/// IPv6 (RFC 4443 §2.4 (c)).
pub const ICMP4_MAX: usize = 576;
pub const ICMP6_MAX: usize = 1280;

/// Packet-too-big answers, per CPU: a GCRA bucket (`TOO_BIG_BUCKET`, the theoretical arrival
/// time on the coarse clock) admitting one answer every `TOO_BIG_INTERVAL_NS` (200 a second
/// per CPU) with bursts of `TOO_BIG_BURST`. Constants, not configuration: like the kernel's own
/// `icmp_msgs_per_sec`, this only keeps a flood of large packets from turning the balancer
/// into an ICMP source.
pub const TOO_BIG_BUCKET: &str = "TOO_BIG_BUCKET";
pub const TOO_BIG_INTERVAL_NS: u64 = 5_000_000;
pub const TOO_BIG_BURST: u64 = 20;

/// The GCRA step of [`TOO_BIG_BUCKET`]: the bucket's new value if an answer may go now.
#[inline(always)]
pub const fn too_big_admit(tat: u64, now: u64) -> Option<u64> {
    crate::limits::gcra(
        tat,
        now,
        TOO_BIG_INTERVAL_NS,
        TOO_BIG_BURST * TOO_BIG_INTERVAL_NS,
    )
}

/// `VIP_TUNNEL` value. All zero: NAT mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tunnel {
    /// IPv6 outer source (wire bytes), for IPv6 VIPs.
    pub src6: [u32; 4],
    /// IPv4 outer source (wire bytes), for IPv4 VIPs.
    pub src4: u32,
    /// GUE destination port (wire bytes).
    pub gue_port: u16,
    /// `ENCAP_*`.
    pub encap: u8,
    /// Low bits of `src4` / `src6` replaced by the flow hash (0: the address as it is).
    pub src4_bits: u8,
    pub src6_bits: u8,
    pub _pad: u8,
    /// `tunnel.mtu`: the underlay's path MTU to the nodes (outer packet bytes, host order;
    /// 0: not configured, the FIB's MTU alone). See [`path_mtu`].
    pub mtu: u16,
}

impl Tunnel {
    /// The IPv4 outer source for a flow: `src4` with its low `src4_bits` bits from the hash.
    #[inline(always)]
    pub fn source4(&self, flow_hash: u32) -> u32 {
        let base = u32::from_be(self.src4);
        let mask = low_mask(self.src4_bits);
        ((base & !mask) | (flow_hash & mask)).to_be()
    }

    /// The IPv6 outer source for a flow: `src6` with its low `src6_bits` bits from the hash.
    #[inline(always)]
    pub fn source6(&self, flow_hash: u32) -> [u32; 4] {
        let mut a = self.src6;
        let base = u32::from_be(a[3]);
        let mask = low_mask(self.src6_bits);
        a[3] = ((base & !mask) | (flow_hash & mask)).to_be();
        a
    }
}

/// The low `bits` bits set (`bits` ≤ [`MAX_SOURCE_BITS`]).
#[inline(always)]
const fn low_mask(bits: u8) -> u32 {
    if bits == 0 {
        0
    } else {
        (1u32 << (bits & 31)) - 1
    }
}

const _: () = assert!(size_of::<Tunnel>() == 28);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only with explicit padding fields.
    unsafe impl aya::Pod for super::Tunnel {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_take_the_flow_hash_in_their_host_bits_only() {
        let t = Tunnel {
            src4: u32::from_be_bytes([10, 9, 0, 0]).to_be(),
            src4_bits: 8,
            src6: [0x2001_0db8u32.to_be(), 0, 0, 0x0000_1000u32.to_be()],
            src6_bits: 4,
            ..Tunnel::default()
        };
        assert_eq!(
            u32::from_be(t.source4(0xdead_beef)).to_be_bytes(),
            [10, 9, 0, 0xef]
        );
        assert_eq!(u32::from_be(t.source6(0xdead_beef)[3]), 0x0000_100f);
        let single = Tunnel {
            src4: 0x0102_0304,
            ..Tunnel::default()
        };
        assert_eq!(single.source4(0xffff_ffff), 0x0102_0304);
        assert_eq!(gue_source_port(0x1234_5678), 0xc000 | 0x1678);
        assert_eq!(overhead(ENCAP_GUE, true), 48);
        assert_eq!(overhead(ENCAP_IPIP, false), 20);
    }

    #[test]
    fn path_mtu_is_the_smaller_known_one() {
        assert_eq!(path_mtu(0, 0), 0);
        assert_eq!(path_mtu(1400, 0), 1400);
        assert_eq!(path_mtu(0, 1500), 1500);
        assert_eq!(path_mtu(1400, 1500), 1400);
        assert_eq!(path_mtu(1500, 1400), 1400);
        assert_eq!(inner_mtu(1327, 48, true), None);
        assert_eq!(inner_mtu(1328, 48, true), Some(1280));
        assert_eq!(inner_mtu(1400, 20, false), Some(1380));
        assert_eq!(inner_mtu(87, 20, false), None);
    }

    #[test]
    fn too_big_bucket_admits_a_burst_then_the_rate() {
        let now = 1_000_000_000;
        let mut tat = 0;
        for _ in 0..TOO_BIG_BURST {
            tat = too_big_admit(tat, now).expect("within the burst");
        }
        assert_eq!(too_big_admit(tat, now), None);
        assert!(too_big_admit(tat, now + TOO_BIG_INTERVAL_NS).is_some());
    }
}
