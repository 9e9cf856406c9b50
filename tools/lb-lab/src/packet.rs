//! Frames built with etherparse, an implementation independent of the datapath: expected
//! outputs are built the same way, so their checksums are computed from scratch, not updated.

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6Header,
    SingleVlanHeader, UdpHeader, VlanId,
};

pub type Mac = [u8; 6];

/// A UDP frame, described field by field.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    /// (TPID, VLAN id) per tag, outermost first.
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 options (multiple of 4 bytes, at most 40).
    pub ipv4_options: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    /// IPv6: insert a Fragment header before UDP.
    pub v6_fragment: bool,
    /// IPv6: insert an empty Hop-by-Hop Options header before UDP.
    pub v6_hop_by_hop: bool,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// IPv4: send with UDP checksum 0 ("none").
    pub zero_udp_checksum: bool,
    /// IPv4: DF set (the default, as Linux sends UDP under path MTU discovery).
    pub dont_fragment: bool,
    /// Override the UDP length field.
    pub udp_len_override: Option<u16>,
}

impl Frame {
    pub fn udp(
        src_mac: Mac,
        dst_mac: Mac,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        payload: &[u8],
    ) -> Self {
        Self {
            src_mac,
            dst_mac,
            vlans: Vec::new(),
            src,
            dst,
            ttl: 64,
            ipv4_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            v6_fragment: false,
            v6_hop_by_hop: false,
            sport,
            dport,
            payload: payload.to_vec(),
            zero_udp_checksum: false,
            dont_fragment: true,
            udp_len_override: None,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let ip_type = if self.src.is_ipv4() {
            EtherType::IPV4
        } else {
            EtherType::IPV6
        };
        let first = self.vlans.first().map_or(ip_type, |v| EtherType(v.0));
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: first,
        }
        .write(&mut out)
        .unwrap();
        for (i, (_, vid)) in self.vlans.iter().enumerate() {
            let next = self.vlans.get(i + 1).map_or(ip_type, |v| EtherType(v.0));
            SingleVlanHeader {
                pcp: Default::default(),
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(*vid).unwrap(),
                ether_type: next,
            }
            .write(&mut out)
            .unwrap();
        }
        let udp_total = 8 + self.payload.len();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = Ipv4Header::new(
                    udp_total as u16,
                    self.ttl,
                    IpNumber::UDP,
                    s.octets(),
                    d.octets(),
                )
                .unwrap();
                ip.identification = 0x1234;
                ip.options = Ipv4Options::try_from(&self.ipv4_options[..]).unwrap();
                ip.total_len += self.ipv4_options.len() as u16;
                ip.dont_fragment = self.dont_fragment;
                if self.more_fragments || self.fragment_offset != 0 {
                    ip.dont_fragment = false;
                    ip.more_fragments = self.more_fragments;
                    ip.fragment_offset = IpFragOffset::try_new(self.fragment_offset).unwrap();
                }
                let mut udp =
                    UdpHeader::with_ipv4_checksum(self.sport, self.dport, &ip, &self.payload)
                        .unwrap();
                if self.zero_udp_checksum {
                    udp.checksum = 0;
                }
                ip.write(&mut out).unwrap();
                self.write_udp(&mut out, udp);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext = if self.v6_fragment || self.v6_hop_by_hop {
                    8
                } else {
                    0
                };
                let next = if self.v6_fragment {
                    IpNumber::IPV6_FRAGMENTATION_HEADER
                } else if self.v6_hop_by_hop {
                    IpNumber::IPV6_HEADER_HOP_BY_HOP
                } else {
                    IpNumber::UDP
                };
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Default::default(),
                    payload_length: (udp_total + ext) as u16,
                    next_header: next,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                let udp = UdpHeader::with_ipv6_checksum(self.sport, self.dport, &ip, &self.payload)
                    .unwrap();
                ip.write(&mut out).unwrap();
                if self.v6_fragment {
                    out.extend_from_slice(&v6_fragment_header(0, true, 7));
                } else if self.v6_hop_by_hop {
                    // next header UDP, length 0, PadN of 4 bytes.
                    out.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
                }
                self.write_udp(&mut out, udp);
            }
            _ => panic!("mixed address families"),
        }
        out
    }

    /// The frame's UDP datagram (header, checksum over the whole payload, and payload) cut
    /// into IP fragments of `chunk` bytes of it each (a multiple of 8; the last takes the
    /// rest), as a sender's kernel fragments it: IPv4 with identification `id` (16 bits), MF
    /// and the offset; IPv6 with a Fragment header right after the fixed header (next header
    /// UDP, the offset, M, identification `id`). Built with etherparse, checksums from scratch.
    pub fn fragments(&self, id: u32, chunk: usize) -> Vec<Vec<u8>> {
        assert!(
            chunk > 0 && chunk.is_multiple_of(8),
            "fragment size {chunk}: a multiple of 8"
        );
        let mut whole = self.clone();
        whole.more_fragments = false;
        whole.fragment_offset = 0;
        whole.v6_fragment = false;
        whole.v6_hop_by_hop = false;
        let b = whole.bytes();
        let l2 = 14 + 4 * self.vlans.len();
        let ip_len = if self.src.is_ipv4() {
            20 + self.ipv4_options.len()
        } else {
            40
        };
        let datagram = &b[l2 + ip_len..];
        let mut out = Vec::new();
        for (i, piece) in datagram.chunks(chunk).enumerate() {
            let off = i * chunk;
            let more = off + piece.len() < datagram.len();
            let offset = IpFragOffset::try_new((off / 8) as u16).unwrap();
            let mut f = b[..l2].to_vec();
            match (self.src, self.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    let mut ip = Ipv4Header::new(
                        piece.len() as u16,
                        self.ttl,
                        IpNumber::UDP,
                        s.octets(),
                        d.octets(),
                    )
                    .unwrap();
                    ip.identification = id as u16;
                    ip.options = Ipv4Options::try_from(&self.ipv4_options[..]).unwrap();
                    ip.total_len += self.ipv4_options.len() as u16;
                    ip.dont_fragment = false;
                    ip.more_fragments = more;
                    ip.fragment_offset = offset;
                    ip.write(&mut f).unwrap();
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    Ipv6Header {
                        traffic_class: 0,
                        flow_label: Default::default(),
                        payload_length: (8 + piece.len()) as u16,
                        next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
                        hop_limit: self.ttl,
                        source: s.octets(),
                        destination: d.octets(),
                    }
                    .write(&mut f)
                    .unwrap();
                    f.extend_from_slice(&v6_fragment_header(off / 8, more, id));
                }
                _ => panic!("mixed address families"),
            }
            f.extend_from_slice(piece);
            out.push(f);
        }
        out
    }

    fn write_udp(&self, out: &mut Vec<u8>, mut udp: UdpHeader) {
        if let Some(l) = self.udp_len_override {
            udp.length = l;
        }
        udp.write(out).unwrap();
        out.extend_from_slice(&self.payload);
    }
}

/// An IPv6 Fragment header (RFC 8200 §4.5) before UDP: next header 17, reserved, the offset in
/// 8-byte units (13 bits), two reserved bits and M, the identification. Written by hand:
/// etherparse 0.16's `Ipv6FragmentHeader::to_bytes` puts M in the top bit of the fourth byte
/// and the offset's low five bits unshifted below it (the RFC has the offset's low bits on
/// top and M at the bottom), so its first fragments read as later ones.
fn v6_fragment_header(offset8: usize, more: bool, id: u32) -> [u8; 8] {
    let w = ((offset8 as u16) << 3) | u16::from(more);
    let [a, b] = w.to_be_bytes();
    let [c, d, e, f] = id.to_be_bytes();
    [17, 0, a, b, c, d, e, f]
}

/// A DTLS 1.2 tls12_cid record (RFC 9146 §4): type 25, FE FD, epoch 1, sequence, `cid`, length,
/// then `body` as the encrypted content.
pub fn cid_record(cid: &[u8], body: &[u8]) -> Vec<u8> {
    let mut r = vec![25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 7];
    r.extend_from_slice(cid);
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// A DTLS 1.3 protected record with the unified header (RFC 9147 §4): first byte `0b001CSLEE`
/// (C when `cid` is given, S when `seq16`, L when `with_len`, epoch bits 3), then the cid, a
/// sequence number of 1 or 2 bytes, the 2-byte length if L, and `body` as the ciphertext.
pub fn unified_record(cid: Option<&[u8]>, seq16: bool, with_len: bool, body: &[u8]) -> Vec<u8> {
    let mut first = 0x20 | 0x03;
    if cid.is_some() {
        first |= 0x10;
    }
    if seq16 {
        first |= 0x08;
    }
    if with_len {
        first |= 0x04;
    }
    let mut r = vec![first];
    r.extend_from_slice(cid.unwrap_or_default());
    r.extend_from_slice(if seq16 {
        &[0x5a, 0x17][..]
    } else {
        &[0x5a][..]
    });
    if with_len {
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    }
    r.extend_from_slice(body);
    r
}

/// A DTLS 1.2 handshake record header (type 22) with a stand-in ClientHello body.
pub fn handshake_record(body: &[u8]) -> Vec<u8> {
    let mut r = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// Independent check of a frame's IPv4 header and UDP checksums (0 = none is accepted for
/// IPv4 UDP). Panics naming what is wrong.
pub fn assert_checksums(frame: &[u8], what: &str) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame)
        .unwrap_or_else(|e| panic!("{what}: unparsable output: {e}"));
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        return;
    };
    match p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "{what}: IPv4 header checksum"
            );
            let u = udp.to_header();
            if u.checksum != 0 {
                let want = u.calc_checksum_ipv4(&h, udp.payload()).unwrap();
                assert_eq!(u.checksum, want, "{what}: UDP checksum");
            }
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            let u = udp.to_header();
            let want = u.calc_checksum_ipv6(&h, udp.payload()).unwrap();
            assert_eq!(u.checksum, want, "{what}: UDP checksum");
        }
        _ => {}
    }
}

/// Which ICMP error [`icmp_error`] builds.
#[derive(Clone, Copy, Debug)]
pub enum IcmpError {
    /// Port unreachable: ICMPv4 type 3 code 3, ICMPv6 type 1 code 4.
    PortUnreachable,
    /// ICMPv4 fragmentation needed (type 3 code 4, RFC 1191) or ICMPv6 packet too big
    /// (type 2, RFC 4443 §3.2), with the MTU that fits.
    TooBig { mtu: u16 },
}

/// An ICMP error `kind` from `src` to `dst` with hop limit `ttl`, quoting `quote` (an IP
/// packet, as much of it as the sender keeps). IPv4 header: TOS 0, identification 0, DF.
/// Built with etherparse, checksums from scratch.
pub fn icmp_error(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    kind: IcmpError,
    quote: &[u8],
) -> Vec<u8> {
    use etherparse::{icmpv4, icmpv6, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type};
    let mut out = Vec::new();
    let ether_type = if src.is_ipv4() {
        EtherType::IPV4
    } else {
        EtherType::IPV6
    };
    Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type,
    }
    .write(&mut out)
    .unwrap();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let code = match kind {
                IcmpError::PortUnreachable => icmpv4::DestUnreachableHeader::Port,
                IcmpError::TooBig { mtu } => {
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }
                }
            };
            let icmp = Icmpv4Header::with_checksum(Icmpv4Type::DestinationUnreachable(code), quote);
            let len = icmp.header_len() + quote.len();
            let ip =
                Ipv4Header::new(len as u16, ttl, IpNumber::ICMP, s.octets(), d.octets()).unwrap();
            ip.write(&mut out).unwrap();
            icmp.write(&mut out).unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ty = match kind {
                IcmpError::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
                }
                IcmpError::TooBig { mtu } => Icmpv6Type::PacketTooBig { mtu: mtu.into() },
            };
            let icmp = Icmpv6Header::with_checksum(ty, s.octets(), d.octets(), quote).unwrap();
            Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: (icmp.header_len() + quote.len()) as u16,
                next_header: IpNumber::IPV6_ICMP,
                hop_limit: ttl,
                source: s.octets(),
                destination: d.octets(),
            }
            .write(&mut out)
            .unwrap();
            icmp.write(&mut out).unwrap();
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(quote);
    out
}

/// How a tunnel VIP's packet is wrapped (see `lb_common::tunnel`).
#[derive(Clone, Copy, Debug)]
pub enum Encap {
    /// IP in IP.
    Ipip,
    /// GUE variant 1: UDP from `sport` to `dport`, then the inner packet.
    Gue { sport: u16, dport: u16 },
}

/// The frame a balancer sends to a tunnel node: Ethernet (`src_mac` → `dst_mac`), the outer
/// IP header from `src` to `dst` (TTL 64; IPv4 with DF, identification 0 and the inner
/// packet's TOS; IPv6 with the flow label `flow_label` and the inner traffic class), the UDP
/// header for GUE (checksum 0 over IPv4, computed over IPv6), then `inner` without its
/// Ethernet header. Built with etherparse, checksums from scratch.
pub fn tunnel_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    dst: IpAddr,
    flow_label: u32,
    encap: Encap,
    inner: &Frame,
) -> Vec<u8> {
    tunnel_bytes(
        src_mac,
        dst_mac,
        src,
        dst,
        flow_label,
        encap,
        &inner.bytes(),
    )
}

/// [`tunnel_frame`] around an inner frame given as bytes (Ethernet header included, and
/// dropped), such as one of [`Frame::fragments`].
pub fn tunnel_bytes(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    dst: IpAddr,
    flow_label: u32,
    encap: Encap,
    inner: &[u8],
) -> Vec<u8> {
    let inner_bytes = inner[14..].to_vec();
    let mut out = Vec::new();
    let (v6, proto) = match (src, encap) {
        (IpAddr::V4(_), Encap::Ipip) => (false, IpNumber::IPV4),
        (IpAddr::V6(_), Encap::Ipip) => (true, IpNumber::IPV6),
        (IpAddr::V4(_), Encap::Gue { .. }) => (false, IpNumber::UDP),
        (IpAddr::V6(_), Encap::Gue { .. }) => (true, IpNumber::UDP),
    };
    Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: if v6 { EtherType::IPV6 } else { EtherType::IPV4 },
    }
    .write(&mut out)
    .unwrap();
    let udp_len = 8 + inner_bytes.len();
    let ip_payload = match encap {
        Encap::Ipip => inner_bytes.len(),
        Encap::Gue { .. } => udp_len,
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip =
                Ipv4Header::new(ip_payload as u16, 64, proto, s.octets(), d.octets()).unwrap();
            ip.identification = 0;
            ip.dscp = etherparse::Ipv4Dscp::try_new(inner_bytes[1] >> 2).unwrap();
            ip.ecn = etherparse::Ipv4Ecn::try_new(inner_bytes[1] & 3).unwrap();
            ip.dont_fragment = true;
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut out).unwrap();
            if let Encap::Gue { sport, dport } = encap {
                let udp = UdpHeader {
                    source_port: sport,
                    destination_port: dport,
                    length: udp_len as u16,
                    checksum: 0,
                };
                udp.write(&mut out).unwrap();
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let tc = (inner_bytes[0] << 4) | (inner_bytes[1] >> 4);
            let ip = Ipv6Header {
                traffic_class: tc,
                flow_label: etherparse::Ipv6FlowLabel::try_new(flow_label & 0xf_ffff).unwrap(),
                payload_length: ip_payload as u16,
                next_header: proto,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            ip.write(&mut out).unwrap();
            if let Encap::Gue { sport, dport } = encap {
                UdpHeader::with_ipv6_checksum(sport, dport, &ip, &inner_bytes)
                    .unwrap()
                    .write(&mut out)
                    .unwrap();
            }
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(&inner_bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fragments put back together are the datagram; offsets, flags and ids as asked.
    #[test]
    fn fragments_reassemble_to_the_datagram() {
        for (src, dst) in [
            ("198.51.100.7", "192.0.2.10"),
            ("2001:db8::7", "2001:db8::10"),
        ] {
            let f = Frame::udp(
                [2; 6],
                [4; 6],
                src.parse().unwrap(),
                40000,
                dst.parse().unwrap(),
                5684,
                &[0x5c; 150],
            );
            let whole = f.bytes();
            let v4 = f.src.is_ipv4();
            let hdr = if v4 { 14 + 20 } else { 14 + 48 };
            let frags = f.fragments(0x4d2, 64);
            assert_eq!(frags.len(), 3);
            let mut datagram = Vec::new();
            for (i, g) in frags.iter().enumerate() {
                let (off, more, id) = if v4 {
                    let w = u16::from_be_bytes([g[20], g[21]]);
                    (
                        w & 0x1fff,
                        w & 0x2000 != 0,
                        u16::from_be_bytes([g[18], g[19]]) as u32,
                    )
                } else {
                    assert_eq!((g[20], g[54]), (44, 17), "next headers");
                    let w = u16::from_be_bytes([g[56], g[57]]);
                    (
                        w >> 3,
                        w & 1 != 0,
                        u32::from_be_bytes([g[58], g[59], g[60], g[61]]),
                    )
                };
                assert_eq!(
                    (off as usize, more, id),
                    (i * 8, i < 2, 0x4d2),
                    "fragment {i}"
                );
                datagram.extend_from_slice(&g[hdr..]);
            }
            assert_eq!(datagram, whole[hdr - if v4 { 0 } else { 8 }..]);
        }
    }
}
