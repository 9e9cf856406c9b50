//! What the agent sends for an ICMP error no node could be matched to: which nodes get a copy
//! ([`Targets`], from the config), and each copy's bytes ([`Error::copy_for`]). Pure: no
//! sockets here, so unit tests reach all of it.
//!
//! The error is an IP packet to a VIP (its outer destination) quoting a UDP datagram from that
//! VIP and one of its ports: a node's reply, as a router or the client saw it. A NAT VIP's
//! nodes sent that reply from their own address and port, so a copy is rewritten as the
//! datapath's `icmp_to_node` rewrites a matched error (`lb-ebpf/src/icmp.rs`): outer
//! destination VIP → node, quoted source VIP:port → node:port, every checksum that covers
//! them, TTL one lower. A tunnel VIP's nodes own the VIP's address: its copy is the error
//! unchanged, encapsulated to the node.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::csum::CsumDelta;

use crate::config::{Config, Encap, NodeState};

/// One node's copy of an error: how it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// NAT VIP: rewritten to the node's address and port, sent as an IP packet to `node`.
    Nat { node: IpAddr, port: u16 },
    /// Tunnel VIP: unchanged, inside IP in IP to `node`.
    Ipip { node: IpAddr },
    /// Tunnel VIP: unchanged, inside GUE (variant 1: the IP packet is the UDP payload) to
    /// `node`'s port `port`.
    Gue { node: IpAddr, port: u16 },
}

/// Every VIP address and port, with the copies an error about it becomes: one per node of
/// that VIP's family that is not disabled. The datapath's `REVERSE` map pairs the same node
/// addresses and ports (`plan::reverse`), and health probes take the same tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    by_vip: BTreeMap<(IpAddr, u16), Vec<Copy>>,
}

impl Targets {
    pub fn new(cfg: &Config) -> Self {
        let mut by_vip = BTreeMap::new();
        for vip in &cfg.vips {
            for range in &vip.ports {
                for port in range.ports() {
                    let copies = cfg
                        .nodes
                        .iter()
                        .filter(|n| n.state != NodeState::Disabled)
                        .filter_map(|n| {
                            let node = n.address_for(vip.address)?;
                            Some(match vip.tunnel() {
                                None => Copy::Nat {
                                    node,
                                    port: n.port.unwrap_or(port),
                                },
                                Some(t) => match (t.encap, t.gue_port) {
                                    (Encap::Gue, Some(port)) => Copy::Gue { node, port },
                                    _ => Copy::Ipip { node },
                                },
                            })
                        })
                        .collect();
                    by_vip.insert((vip.address, port), copies);
                }
            }
        }
        Self { by_vip }
    }

    /// The copies an error about `vip`:`port` becomes; `None`: no such VIP port.
    pub fn of(&self, vip: IpAddr, port: u16) -> Option<&[Copy]> {
        self.by_vip.get(&(vip, port)).map(Vec::as_slice)
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// The ICMP header before the quote: type, code, checksum, 4 bytes that depend on the type.
const ICMP_HDR: usize = 8;
const UDP_HDR: usize = 8;

/// An ICMP error about a VIP's UDP datagram, checked and located in its packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The IP packet, cut to its IP length (a frame's padding removed).
    bytes: Vec<u8>,
    /// Offset of the ICMP header (the outer IP header's length).
    icmp: usize,
    /// Offset of the quoted IP header.
    quote: usize,
    /// Offset of the quoted UDP header.
    udp: usize,
    /// The VIP: the outer destination, and the quoted datagram's source.
    pub vip: IpAddr,
    /// The quoted datagram's source port: the VIP port.
    pub port: u16,
    /// The quoted datagram's destination: the client's address and port.
    pub client: (IpAddr, u16),
    /// ICMP type and code.
    pub kind: [u8; 2],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum of `parts`, concatenated (RFC 1071), as the field holds it.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Error {
    /// `packet` (an IP packet, as a packet socket gives it) if it is an ICMP error about a UDP
    /// datagram whose source is the error's destination: destination unreachable (fragmentation
    /// needed among them), time exceeded or parameter problem for IPv4; those and packet too
    /// big for IPv6. Not an error about an ICMP message (its quote is UDP), not a fragment, no
    /// IPv6 extension headers, and at least the quoted UDP header present.
    pub fn parse(packet: &[u8]) -> Option<Self> {
        let version = packet.first()? >> 4;
        let (icmp, vip, quote) = match version {
            4 => {
                let ihl = usize::from(packet[0] & 0xf) * 4;
                if ihl < 20 || packet.len() < ihl + ICMP_HDR {
                    return None;
                }
                let total = usize::from(be16(packet, 2));
                let frag = be16(packet, 6) & 0x3fff; // MF and the offset
                if packet[9] != IPPROTO_ICMP || frag != 0 || total < ihl + ICMP_HDR {
                    return None;
                }
                if !matches!(packet[ihl], 3 | 11 | 12) {
                    return None;
                }
                let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?);
                (ihl, IpAddr::V4(dst), total.min(packet.len()))
            }
            6 => {
                if packet.len() < 40 + ICMP_HDR || packet[6] != IPPROTO_ICMPV6 {
                    return None;
                }
                if !(1..=4).contains(&packet[40]) {
                    return None;
                }
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?);
                let total = 40 + usize::from(be16(packet, 4));
                (40, IpAddr::V6(dst), total.min(packet.len()))
            }
            _ => return None,
        };
        let bytes = packet[..quote].to_vec();
        let q = icmp + ICMP_HDR;
        let (udp, src, client) = match vip {
            IpAddr::V4(_) => {
                let b = bytes.get(q..q + 20)?;
                let qihl = usize::from(b[0] & 0xf) * 4;
                let offset = be16(b, 6) & 0x1fff;
                if b[0] >> 4 != 4 || qihl < 20 || b[9] != IPPROTO_UDP || offset != 0 {
                    return None;
                }
                let src = Ipv4Addr::from(<[u8; 4]>::try_from(&b[12..16]).ok()?);
                let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&b[16..20]).ok()?);
                (q + qihl, IpAddr::V4(src), IpAddr::V4(dst))
            }
            IpAddr::V6(_) => {
                let b = bytes.get(q..q + 40)?;
                if b[0] >> 4 != 6 || b[6] != IPPROTO_UDP {
                    return None;
                }
                let src = Ipv6Addr::from(<[u8; 16]>::try_from(&b[8..24]).ok()?);
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&b[24..40]).ok()?);
                (q + 40, IpAddr::V6(src), IpAddr::V6(dst))
            }
        };
        if bytes.len() < udp + UDP_HDR || src != vip {
            return None;
        }
        Some(Self {
            port: be16(&bytes, udp),
            client: (client, be16(&bytes, udp + 2)),
            kind: [bytes[icmp], bytes[icmp + 1]],
            bytes,
            icmp,
            quote: q,
            udp,
            vip,
        })
    }

    /// The packet to send for `copy`: for a NAT VIP's node, rewritten to its address and port
    /// (`None` if the TTL is spent); for a tunnel VIP's, the error as it came (the caller
    /// encapsulates it).
    pub fn copy_for(&self, copy: Copy) -> Option<Vec<u8>> {
        let Copy::Nat { node, port } = copy else {
            return Some(self.bytes.clone());
        };
        let mut b = self.bytes.clone();
        let (q, u) = (self.quote, self.udp);
        let old_port = be16(&b, u);
        // The quoted UDP checksum covers the quoted source (pseudo-header) and port; IPv4's
        // zero means none.
        let udp_check = be16(&b, u + 6);
        let mut udp_delta = CsumDelta::from_check(udp_check).replace16(old_port, port);
        match (self.vip, node) {
            (IpAddr::V4(vip), IpAddr::V4(n)) => {
                if b[8] <= 1 {
                    return None;
                }
                b[8] -= 1;
                b[16..20].copy_from_slice(&n.octets());
                b[10..12].fill(0);
                let c = checksum(&[&b[..self.icmp]]);
                b[10..12].copy_from_slice(&c.to_be_bytes());
                // The quoted header: its source, and its checksum incrementally (it is as the
                // reply left the balancer, right or wrong).
                let qcheck = CsumDelta::from_check(be16(&b, q + 10))
                    .replace32(u32::from(vip), u32::from(n))
                    .finish();
                b[q + 10..q + 12].copy_from_slice(&qcheck.to_be_bytes());
                b[q + 12..q + 16].copy_from_slice(&n.octets());
                udp_delta = udp_delta.replace32(u32::from(vip), u32::from(n));
            }
            (IpAddr::V6(vip), IpAddr::V6(n)) => {
                if b[7] <= 1 {
                    return None;
                }
                b[7] -= 1;
                b[24..40].copy_from_slice(&n.octets());
                b[q + 8..q + 24].copy_from_slice(&n.octets());
                let words = |a: Ipv6Addr| {
                    let b = a.octets();
                    core::array::from_fn(|i| {
                        u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
                    })
                };
                udp_delta = udp_delta.replace128(&words(vip), &words(n));
            }
            _ => return None,
        }
        b[u..u + 2].copy_from_slice(&port.to_be_bytes());
        if udp_check != 0 || node.is_ipv6() {
            b[u + 6..u + 8].copy_from_slice(&udp_delta.finish_udp().to_be_bytes());
        }
        // The ICMP checksum over the whole message (the packet socket gave all of it);
        // ICMPv6's covers the outer addresses too.
        let i = self.icmp;
        b[i + 2..i + 4].fill(0);
        let c = if node.is_ipv4() {
            checksum(&[&b[i..]])
        } else {
            let len = ((b.len() - i) as u32).to_be_bytes();
            checksum(&[&b[8..40], &len, &[0, 0, 0, IPPROTO_ICMPV6], &b[i..]])
        };
        b[i + 2..i + 4].copy_from_slice(&c.to_be_bytes());
        Some(b)
    }
}
