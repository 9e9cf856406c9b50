//! Tunnel mode (docs/forwarding.md "Tunnel mode (direct server return)"): a tunnel VIP's packet keeps its
//! addresses and ports. Its node is chosen as for a NAT VIP; the next hop is looked up towards
//! the node's address, and `forward::send` forwards the packet as it is (TTL decremented, the
//! next hop's MACs) with [`forward::TUNNEL`]'s fallbacks, `extra` being [`overhead`]. Then
//! [`encap`] puts the outer header in front:
//! ```text
//!  ipip, IPv4 (RFC 2003):  Ethernet | IPv4, protocol 4       | the client's IPv4 packet
//!  ipip, IPv6 (RFC 2473):  Ethernet | IPv6, next header 41   | the client's IPv6 packet
//!  gue (variant 1):        Ethernet | outer IP, protocol 17  | UDP to gue_port | inner packet
//! ```
//! - Outer IPv4: version 4, IHL 5, the inner TOS, total length from the inner header's own
//!   length field (Ethernet padding after the packet stays in the frame, outside every
//!   length), identification 0 with DF (an atomic datagram), TTL 64, its header checksum.
//! - Outer IPv6: the inner traffic class, the flow hash's low 20 bits as flow label, hop
//!   limit 64, payload length from the inner header's.
//! - Outer source: `source4` / `source6` with its host bits (`src4_bits` / `src6_bits`, the
//!   address's lowest bits) from the flow hash; destination: the node's address.
//! - GUE: UDP from port 49152 + the flow hash's low 14 bits to `gue_port`. Its checksum is 0
//!   over IPv4 (none). Over IPv6 it is computed without reading the payload: the inner UDP
//!   datagram is taken to sum to what its checksum says (the complement of its pseudo-header's
//!   sum), so a wrong inner checksum makes the outer one wrong alike.
//!
//! The flow hash is written here from its definition (the datapath's `tuple_hash`, a
//! multiply-xor mix; only spreading matters, so it is not the Maglev hash), not called.

use lb_common::{
    tunnel::{Tunnel, ENCAP_GUE, ENCAP_IPIP},
    Counter, Node, FAMILY_V4,
};

use crate::{nat, parse::Packet, vip, Tables};

/// IANA protocol numbers of the outer header.
const PROTO_IPV4_IN_IP: u8 = 4;
const PROTO_IPV6_IN_IP: u8 = 41;
const PROTO_UDP: u8 = 17;

/// The VIP's tunnel (`VIP_TUNNEL` at its bitmap index), if it is in tunnel mode.
pub fn of_vip(t: &Tables, pkt: &Packet) -> Option<Tunnel> {
    let index = vip::index(t, pkt)?;
    t.vip_tunnel
        .get(&index)
        .copied()
        .filter(|x| x.encap == ENCAP_IPIP || x.encap == ENCAP_GUE)
}

/// Bytes the encapsulation adds: an outer IPv4 (20) or IPv6 (40) header, and 8 for GUE's UDP.
pub fn overhead(tun: &Tunnel, pkt: &Packet) -> u32 {
    let ip = if pkt.family == FAMILY_V4 { 20 } else { 40 };
    if tun.encap == ENCAP_GUE {
        ip + 8
    } else {
        ip
    }
}

/// The addressing the next hop is looked up with: the configured outer source as written
/// (before the flow's host bits), the node's address. A node without an address of the
/// packet's family cannot take it.
pub fn addressing(
    pkt: &Packet,
    node: &Node,
    tun: &Tunnel,
) -> Result<([u32; 4], [u32; 4]), Counter> {
    if !crate::flow::has_family(node, pkt.family) {
        return Err(Counter::DropCidNodeFamily);
    }
    Ok(if pkt.family == FAMILY_V4 {
        ([tun.src4, 0, 0, 0], [node.addr4, 0, 0, 0])
    } else {
        (tun.src6, node.addr6)
    })
}

/// The counter of a packet sent through `tun`.
pub fn counter(tun: &Tunnel) -> Counter {
    if tun.encap == ENCAP_GUE {
        Counter::TunnelEncapGue
    } else {
        Counter::TunnelEncapIpip
    }
}

/// The flow hash of the outer header, from the inner packet's addresses and UDP ports as on
/// the wire. Each address is folded to one 32-bit word (the XOR of its 32-bit words, each
/// loaded little-endian, as the BPF machine loads wire bytes); the ports are loaded the same
/// way, source port in the low half. Then: `h = (a·0x9e3779b1) ^ b`, `h = (h·0x85ebca6b) ^
/// ports`, `h = h·0xc2b2ae35`, `h ^ (h >> 16)` (32-bit wrapping products).
pub fn flow_hash(src: &[u8], dst: &[u8], sport: [u8; 2], dport: [u8; 2]) -> u32 {
    let fold = |a: &[u8]| {
        a.chunks(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .fold(0, |x, w| x ^ w)
    };
    let ports = u32::from(u16::from_le_bytes(sport)) | u32::from(u16::from_le_bytes(dport)) << 16;
    let mut h = fold(src).wrapping_mul(0x9e37_79b1) ^ fold(dst);
    h = h.wrapping_mul(0x85eb_ca6b) ^ ports;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `base` (wire bytes, 4 or 16) with its lowest `bits` bits taken from `hash`.
fn outer_source(base: &[u8], bits: u8, hash: u32) -> Vec<u8> {
    let mut a = base.to_vec();
    let n = a.len();
    let low = u32::from_be_bytes([a[n - 4], a[n - 3], a[n - 2], a[n - 1]]);
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX >> (32 - u32::from(bits.min(32)))
    };
    a[n - 4..].copy_from_slice(&((low & !mask) | (hash & mask)).to_be_bytes());
    a
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// The frame `f` (forwarded by `forward::send`: untagged, TTL decremented, the next hop's
/// MACs) with the outer header of `tun` to `node` between its Ethernet header and the inner
/// packet. `udp_off`: where the inner UDP header starts; `ports`: its ports as on the wire
/// (a later fragment has no UDP header: its first's, and GUE over IPv6, which would read it,
/// drops fragments).
pub fn encap(
    f: &[u8],
    pkt: &Packet,
    udp_off: usize,
    ports: [[u8; 2]; 2],
    node: &Node,
    tun: &Tunnel,
) -> Vec<u8> {
    let v4 = pkt.family == FAMILY_V4;
    let ip = &f[pkt.l3..];
    let be16 = |at: usize| u32::from(u16::from_be_bytes([ip[at], ip[at + 1]]));
    let (src, dst) = if v4 {
        (&ip[12..16], &ip[16..20])
    } else {
        (&ip[8..24], &ip[24..40])
    };
    let hash = flow_hash(src, dst, ports[0], ports[1]);
    // The inner packet's length by its own header: IPv4 total length, IPv6 payload + 40.
    let inner_len = if v4 { be16(2) } else { 40 + be16(4) };
    let gue = tun.encap == ENCAP_GUE;
    // Length fields are 16 bits on the wire: a length past 65535 (a lying inner header with no
    // MTU to stop it) wraps, as a 16-bit store does.
    let udp_len = (8 + inner_len) as u16;
    let mut outer = Vec::with_capacity(48);
    if v4 {
        let proto = if gue { PROTO_UDP } else { PROTO_IPV4_IN_IP };
        let total = (20 + if gue { 8 } else { 0 } + inner_len) as u16;
        outer.extend_from_slice(&[0x45, ip[1]]);
        outer.extend_from_slice(&total.to_be_bytes());
        outer.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        outer.extend(outer_source(&tun.src4.to_ne_bytes(), tun.src4_bits, hash));
        outer.extend_from_slice(&node.addr4.to_ne_bytes());
        // RFC 791: the complement of the header's sum; a sum of zero is written as 0.
        let c = ((0xffff - nat::sum(&outer)) % 0xffff) as u16;
        outer[10..12].copy_from_slice(&c.to_be_bytes());
        if gue {
            outer.extend_from_slice(&gue_sport(hash).to_be_bytes());
            outer.extend_from_slice(&tun.gue_port.to_ne_bytes());
            outer.extend_from_slice(&udp_len.to_be_bytes());
            // RFC 768: zero, no checksum.
            outer.extend_from_slice(&[0, 0]);
        }
    } else {
        let tc = (ip[0] << 4) | (ip[1] >> 4);
        let label = hash & 0x000f_ffff;
        let payload = if gue { udp_len } else { inner_len as u16 };
        outer.extend_from_slice(&[
            0x60 | (tc >> 4),
            (tc << 4) | (label >> 16) as u8,
            (label >> 8) as u8,
            label as u8,
        ]);
        outer.extend_from_slice(&payload.to_be_bytes());
        outer.push(if gue { PROTO_UDP } else { PROTO_IPV6_IN_IP });
        outer.push(64);
        outer.extend(outer_source(&words(&tun.src6), tun.src6_bits, hash));
        outer.extend(words(&node.addr6));
        if gue {
            let mut u = Vec::with_capacity(8);
            u.extend_from_slice(&gue_sport(hash).to_be_bytes());
            u.extend_from_slice(&tun.gue_port.to_ne_bytes());
            u.extend_from_slice(&udp_len.to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            let c = gue_checksum6(&outer, &u, ip, udp_off - pkt.l3);
            u[6..8].copy_from_slice(&c.to_be_bytes());
            outer.extend(u);
        }
    }
    let mut g = f[..pkt.l3].to_vec();
    g.extend(outer);
    g.extend_from_slice(&f[pkt.l3..]);
    g
}

/// GUE's UDP source port: 49152 + the hash's low 14 bits (the dynamic range, RFC 6335).
fn gue_sport(hash: u32) -> u16 {
    49152 + (hash & 0x3fff) as u16
}

/// The outer UDP checksum over IPv6 (RFC 8200 §8.1): pseudo-header (outer addresses, the
/// outer UDP length, next header 17), the outer UDP header, the inner IPv6 header, and the
/// inner UDP datagram as its checksum claims it sums: the complement of its own
/// pseudo-header's sum (inner addresses, the inner UDP length field, 17). Zero is sent as
/// 0xffff.
fn gue_checksum6(outer: &[u8], udp_hdr: &[u8], inner: &[u8], inner_udp: usize) -> u16 {
    let outer_pseudo =
        nat::sum(&outer[8..40]) + nat::sum(&[0, PROTO_UDP]) + nat::sum(&udp_hdr[4..6]);
    let inner_pseudo = nat::sum(&inner[8..40])
        + nat::sum(&[0, PROTO_UDP])
        + nat::sum(&inner[inner_udp + 4..inner_udp + 6]);
    let inner_datagram = 0xffff - inner_pseudo % 0xffff;
    let total =
        (outer_pseudo + nat::sum(udp_hdr) + nat::sum(&inner[..40]) + inner_datagram) % 0xffff;
    (0xffff - total) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values worked out by hand (Python) from the definition above, not taken from the
    /// datapath: 198.51.100.7:40000 → 192.0.2.10:5684, and [fd99::2]:1 → [2001:db8::1]:2.
    #[test]
    fn flow_hash_matches_worked_values() {
        assert_eq!(
            flow_hash(
                &[198, 51, 100, 7],
                &[192, 0, 2, 10],
                40000u16.to_be_bytes(),
                5684u16.to_be_bytes()
            ),
            HASH4
        );
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[1] = 0x99;
        a[15] = 2;
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        b[15] = 1;
        assert_eq!(flow_hash(&a, &b, [0, 1], [0, 2]), HASH6);
    }

    const HASH4: u32 = 0x731e_7f08;
    const HASH6: u32 = 0xe6f0_efcb;

    #[test]
    fn outer_source_replaces_only_the_host_bits() {
        assert_eq!(
            outer_source(&[10, 99, 0, 0], 8, 0xdead_beef),
            vec![10, 99, 0, 0xef]
        );
        assert_eq!(
            outer_source(&[10, 99, 0, 0], 16, 0xdead_beef),
            vec![10, 99, 0xbe, 0xef]
        );
        assert_eq!(
            outer_source(&[10, 99, 1, 2], 0, 0xdead_beef),
            vec![10, 99, 1, 2]
        );
        let mut six = [0u8; 16];
        six[0] = 0xfd;
        six[15] = 0x10;
        let mut want = six;
        want[14] = 0x0e;
        want[15] = 0xef;
        assert_eq!(outer_source(&six, 12, 0xdead_beef), want.to_vec());
        assert_eq!(gue_sport(0x1234_5678), 0xc000 | 0x1678);
    }
}
