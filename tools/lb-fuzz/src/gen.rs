//! The frames: random bytes; frames built around the balancer's addresses (client to a VIP,
//! node replies genuine and forged, unknown and disabled node ids, several records in one
//! datagram) with IPv4 options, VLAN tags, IPv6 extension headers, bad UDP and IP lengths,
//! odd TTLs and checksums; DTLS 1.3 unified headers of every flag combination, cut around
//! their minimum length; the recorded DTLS 1.2 datagrams (corpus) in those frames; byte
//! mutations of any of them; sweeps of one valid frame truncated at every byte; and IP
//! fragment trains (a datagram cut by a sender's kernel: to a VIP, from a node genuine or
//! forged, in order, shuffled, with fragments lost, identifications reused).
//! Deterministic for a seed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::splitmix::SplitMix64;
use lb_lab::{
    fib::*,
    hello::{self, Handshake, COOKIE_EXT},
    packet::{cid_record, icmp_error, unified_record, Frame, IcmpError, Mac},
};

/// `lb_common::splitmix` with the helpers the generator needs: the same sequence for a seed
/// on every machine.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64(seed ^ 0x5eed_c1d1_b000_0000))
    }
    pub fn next(&mut self) -> u64 {
        self.0.next()
    }
    /// 0..n
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Recorded datagrams, by direction.
pub struct Corpus {
    pub to_server: Vec<Vec<u8>>,
    pub to_client: Vec<Vec<u8>>,
}

impl Corpus {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut c = Corpus {
            to_server: Vec::new(),
            to_client: Vec::new(),
        };
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (dir, hex) = line
                .split_once(' ')
                .ok_or_else(|| format!("corpus line {}: want `c2s|s2c HEX`", i + 1))?;
            let bytes = (0..hex.len() / 2)
                .map(|k| u8::from_str_radix(&hex[2 * k..2 * k + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| format!("corpus line {}: {e}", i + 1))?;
            match dir {
                "c2s" => c.to_server.push(bytes),
                "s2c" => c.to_client.push(bytes),
                _ => return Err(format!("corpus line {}: direction {dir}", i + 1)),
            }
        }
        if c.to_server.is_empty() || c.to_client.is_empty() {
            return Err("corpus holds no datagrams of one direction".into());
        }
        Ok(c)
    }
}

/// Interfaces a frame may arrive on (the fixture namespace's).
pub const INGRESS: [&str; 3] = ["fxc", "fxn", "fxo"];

/// One generated frame and where it arrives.
pub struct Packet {
    pub frame: Vec<u8>,
    pub ingress: &'static str,
    pub kind: &'static str,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Addresses worth hitting: VIPs, nodes (with and without neighbours), clients, the balancer's
/// own, broadcast, multicast, unrouted, loopback; then anything.
fn addr(r: &mut Rng, v4: bool) -> IpAddr {
    if v4 {
        const A: &[&str] = &[
            VIP4,
            "192.0.2.11",
            CLIENT4,
            "198.51.100.50",
            "198.51.100.8",
            "198.51.100.1",
            "198.51.100.255",
            NODE1_4,
            NODE2_4,
            "203.0.113.13",
            "203.0.113.14",
            "203.0.113.1",
            "100.64.0.9",
            "100.64.0.10",
            "127.0.0.1",
            "10.9.9.9",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
        ];
        if r.chance(900) {
            ip(r.pick::<&str>(A))
        } else {
            IpAddr::V4(Ipv4Addr::from(r.next() as u32))
        }
    } else {
        const A: &[&str] = &[
            VIP6,
            "2001:db8:ffff::11",
            CLIENT6,
            "2001:db8:c::8",
            "2001:db8:c::1",
            "2001:db8:c::",
            NODE1_6,
            NODE2_6,
            "2001:db8:1::13",
            "2001:db8:1::1",
            "::1",
            "2001:db8:dead::1",
            "ff02::1",
            "::",
            "fe80::1",
            "fe80::11",
        ];
        if r.chance(900) {
            ip(r.pick::<&str>(A))
        } else {
            let b = r.bytes(16);
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()))
        }
    }
}

fn port(r: &mut Rng) -> u16 {
    const P: &[u16] = &[5684, 5700, 20000, 20050, 20100, 20101, 40000, 40001, 53, 0];
    if r.chance(850) {
        *r.pick(P)
    } else {
        r.next() as u16
    }
}

fn mac(r: &mut Rng) -> Mac {
    const M: &[Mac] = &[
        CLIENT_MAC,
        NODE1_MAC,
        NODE2_MAC,
        ONEARM_MAC,
        FXC_MAC,
        FXN_MAC,
        [2, 0, 0, 0, 0, 9],
    ];
    if r.chance(900) {
        *r.pick(M)
    } else {
        r.bytes(6).try_into().unwrap()
    }
}

/// Node ids worth naming: configured (1, 2, 3, 5, 257, 514), disabled (4, 1028), unknown.
fn node_id_bytes(r: &mut Rng) -> Vec<u8> {
    let id: u32 = *r.pick(&[1, 2, 3, 4, 5, 6, 0, 255, 257, 514, 771, 1028, 0x0102_0304]);
    let mut b = id.to_be_bytes().to_vec();
    if r.chance(300) {
        b = r.bytes(4);
    }
    b
}

/// A CID of 4..8 bytes with a node id somewhere in its first bytes (the configs put it at
/// offset 0, 1 or 2, 1 to 4 bytes long).
fn cid_with_node_id(r: &mut Rng) -> Vec<u8> {
    let mut cid = {
        let n = *r.pick(&[4usize, 5, 6, 8]);
        r.bytes(n)
    };
    let id = node_id_bytes(r);
    let at = *r.pick(&[0usize, 1, 2]);
    let n = *r.pick(&[1usize, 2, 3, 4]);
    for (k, b) in id[4 - n..].iter().enumerate() {
        if let Some(x) = cid.get_mut(at + k) {
            *x = *b;
        }
    }
    cid
}

/// A DTLS 1.3 unified-header record (RFC 9147 §4): every first byte 0x20..=0x3f (each C, S, L
/// and epoch-bits combination), and often cut to a length around its header's minimum
/// (1 + CID + 1|2 + 0|2), where `drop_cid13_truncated` starts or stops.
fn unified(r: &mut Rng) -> Vec<u8> {
    let first = 0x20 | r.below(32) as u8;
    let cid = (first & 0x10 != 0).then(|| cid_with_node_id(r));
    let (seq16, with_len) = (first & 0x08 != 0, first & 0x04 != 0);
    let body = {
        let n = *r.pick(&[0u64, 1, 2, 16, 40]);
        let n = r.below(n + 1) as usize;
        r.bytes(n)
    };
    let mut rec = unified_record(cid.as_deref(), seq16, with_len, &body);
    rec[0] = first;
    if r.chance(400) {
        let min =
            1 + cid.map_or(0, |c| c.len()) + 1 + usize::from(seq16) + 2 * usize::from(with_len);
        // min - 3 ..= min + 1: the configs' CID lengths differ from the record's by up to 4.
        let cut = (min + r.below(5) as usize).saturating_sub(3);
        rec.truncate(cut);
    }
    rec
}

/// A DTLS-ish UDP payload.
fn payload(r: &mut Rng, c: &Corpus, to_server: bool) -> Vec<u8> {
    let one = |r: &mut Rng| -> Vec<u8> {
        match r.below(10) {
            0 | 1 => {
                let src = if to_server {
                    &c.to_server
                } else {
                    &c.to_client
                };
                r.pick(src).clone()
            }
            2 | 3 => {
                // A DTLS 1.2 CID record.
                let cid = cid_with_node_id(r);
                let body = {
                    let n = r.below(40) as usize;
                    r.bytes(n)
                };
                cid_record(&cid, &body)
            }
            4 => {
                // Type 25 with another version, or cut short.
                let mut v = vec![25, r.next() as u8, r.next() as u8];
                v.extend({
                    let n = r.below(24) as usize;
                    r.bytes(n)
                });
                v
            }
            5 => {
                let n = r.below(4) as usize;
                r.bytes(n)
            }
            6 | 7 => unified(r),
            8 => {
                let mut v = vec![*r.pick(&[20u8, 21, 22, 23, 25, 0x20, 0x30, 0x3f])];
                v.extend({
                    let n = r.below(30) as usize;
                    r.bytes(n)
                });
                v
            }
            _ => {
                let n = r.below(64) as usize;
                r.bytes(n)
            }
        }
    };
    if r.chance(120) {
        return same_node_records(r);
    }
    let mut p = one(r);
    // Several records in one datagram (the last flight of a handshake, coalesced records).
    while r.chance(200) {
        p.extend(one(r));
    }
    p
}

/// Several CID records naming one node (DTLS 1.2 and 1.3 with a length field, the last 1.3
/// one at times without), 1 to 10 of them (the datapath walks 8), at times with a length
/// field off by a few bytes or a foreign record (a handshake, a CID naming another node)
/// among them: `cid_mixed_datagram` against routing by CID.
fn same_node_records(r: &mut Rng) -> Vec<u8> {
    let cid = cid_with_node_id(r);
    let n = 1 + r.below(10) as usize;
    let mut p = Vec::new();
    for i in 0..n {
        let body = {
            let len = r.below(24) as usize;
            r.bytes(len)
        };
        let mut rec = match r.below(12) {
            0..=5 => cid_record(&cid, &body),
            6..=9 => unified_record(Some(&cid), r.chance(500), true, &body),
            10 if i + 1 == n => unified_record(Some(&cid), r.chance(500), false, &body),
            10 => lb_lab::packet::handshake_record(&body),
            _ => cid_record(&cid_with_node_id(r), &body),
        };
        if r.chance(80) {
            // A length field that lies (by a byte or a few, or wildly).
            let at = rec.len() - body.len() - 2;
            let len = u16::from_be_bytes([rec[at], rec[at + 1]]);
            let lie = len.wrapping_add(*r.pick(&[1u16, 2, 0xffff, 0xfffe, 300]));
            rec[at..at + 2].copy_from_slice(&lie.to_be_bytes());
        }
        p.extend(rec);
    }
    if r.chance(50) {
        // Trailing bytes too few for a record header.
        let n = 1 + r.below(6) as usize;
        p.extend(r.bytes(n));
    }
    p
}

/// A UDP frame around the balancer: client to VIP, node reply (genuine or forged), or any
/// addressing, with the header variations of issue #8 §3.
fn structured(r: &mut Rng, c: &Corpus) -> Packet {
    let v4 = r.chance(550);
    let (src, dst, sport, dport, smac, dmac, ingress, kind, to_server);
    match r.below(5) {
        0..=2 => {
            // Client to a VIP.
            src = addr(r, v4);
            dst = if r.chance(900) {
                ip(if v4 { VIP4 } else { VIP6 })
            } else {
                addr(r, v4)
            };
            sport = port(r);
            dport = *r.pick(&[5684u16, 5684, 20000, 20100, 20101, 5700]);
            smac = mac(r);
            dmac = FXC_MAC;
            ingress = *r.pick(&["fxc", "fxc", "fxn", "fxo"]);
            kind = "client";
            to_server = true;
        }
        3 => {
            // A node's reply, genuine (its MAC, on fxn) or forged.
            let (n, nmac) = *r.pick(&[
                (if v4 { NODE1_4 } else { NODE1_6 }, NODE1_MAC),
                (if v4 { NODE2_4 } else { NODE2_6 }, NODE2_MAC),
                (
                    if v4 { "203.0.113.13" } else { "2001:db8:1::13" },
                    [2, 0, 0, 0, 0, 0x13],
                ),
                (if v4 { "198.51.100.50" } else { CLIENT6 }, ONEARM_MAC),
                (if v4 { "203.0.113.14" } else { NODE1_6 }, NODE1_MAC),
            ]);
            src = ip(n);
            dst = addr(r, v4);
            sport = *r.pick(&[5684u16, 5684, 5700, 20000, 20100, 40000]);
            dport = port(r);
            smac = if r.chance(700) { nmac } else { mac(r) };
            dmac = FXN_MAC;
            ingress = if n == "198.51.100.50" {
                *r.pick(&["fxc", "fxc", "fxn"])
            } else {
                *r.pick(&["fxn", "fxn", "fxn", "fxc", "fxo"])
            };
            kind = "reply";
            to_server = false;
        }
        _ => {
            src = addr(r, v4);
            dst = addr(r, v4);
            sport = port(r);
            dport = port(r);
            smac = mac(r);
            dmac = mac(r);
            ingress = *r.pick(&INGRESS);
            kind = "any";
            to_server = r.chance(500);
        }
    }
    let p = payload(r, c, to_server);
    let mut f = Frame::udp(smac, dmac, src, sport, dst, dport, &p);
    if r.chance(150) {
        f.vlans = (0..1 + r.below(3))
            .map(|_| (*r.pick(&[0x8100u16, 0x88a8]), r.below(4095) as u16 + 1))
            .collect();
    }
    f.ttl = *r.pick(&[64u8, 64, 64, 1, 0, 2, 255]);
    if v4 {
        if r.chance(100) {
            let words = 1 + r.below(10) as usize;
            // NOP options, or random bytes (the datapath skips whatever IHL says).
            f.ipv4_options = if r.chance(500) {
                vec![1; 4 * words]
            } else {
                r.bytes(4 * words)
            };
        }
        if r.chance(40) {
            f.more_fragments = r.chance(500);
            f.fragment_offset = r.below(100) as u16;
        }
        f.zero_udp_checksum = r.chance(100);
    } else {
        f.v6_fragment = r.chance(30);
        f.v6_hop_by_hop = !f.v6_fragment && r.chance(40);
    }
    if r.chance(60) {
        f.udp_len_override = Some(*r.pick(&[0u16, 7, 8, 9, 11, 3000, 65535]));
    }
    let mut frame = f.bytes();
    let l3 = 14 + 4 * f.vlans.len();
    if v4 {
        if r.chance(40) {
            // Total length past the path MTU (the datapath trusts the header, not the frame).
            let tl = *r.pick(&[1501u16, 9000, 65535, 0]);
            frame[l3 + 2..l3 + 4].copy_from_slice(&tl.to_be_bytes());
        }
        if r.chance(20) {
            // IHL below 5 or above what the frame holds.
            frame[l3] = 0x40 | r.below(16) as u8;
        }
    } else {
        if f.v6_hop_by_hop && r.chance(500) {
            // Routing, destination options, AH, mobility, HIP, shim6, experimental, or any.
            frame[l3 + 6] = *r.pick(&[43u8, 60, 51, 135, 139, 140, 253, 254, 59, 6]);
        }
        if r.chance(40) {
            let pl = *r.pick(&[1461u16, 9000, 65535, 0]);
            frame[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
        }
    }
    let hdr_chain = !v4 && (f.v6_hop_by_hop || f.v6_fragment);
    if r.chance(70) && !hdr_chain && frame.len() > l3 + 40 {
        // Not UDP: TCP, ICMP (errors, echo, neighbour discovery; the type in the first byte of
        // what was the UDP header), or another protocol. To a VIP only ICMP errors and neighbour
        // discovery pass; the rest is dropped (`drop_vip_other_proto`).
        let proto = *r.pick(&[6u8, 1, 58, 1, 58, 47, 132]);
        frame[if v4 { l3 + 9 } else { l3 + 6 }] = proto;
        let l4 = if v4 {
            l3 + 20 + f.ipv4_options.len()
        } else {
            l3 + 40
        };
        if l4 < frame.len() {
            frame[l4] = *r.pick(&[
                0u8, 3, 4, 5, 8, 11, 12, 13, 1, 2, 127, 128, 129, 133, 135, 136, 137, 138, 200,
            ]);
        }
    }
    if r.chance(50) {
        // A wrong UDP checksum (the datapath keeps it exactly as wrong).
        let at = frame.len() - p.len() - 2;
        let x = r.next() as u8;
        frame[at] ^= x;
    }
    Packet {
        frame,
        ingress,
        kind,
    }
}

/// A node's ICMP error to a client (issue #21): about the client's datagram to one of its
/// ports (as the node received it: to the node's address), or about its own datagram, or
/// quoting another client's; genuine (its MAC, on fxn) or forged; the quote whole or cut
/// (at the classic IP header + 8 bytes, or anywhere); every error type, and others.
fn node_icmp_error(r: &mut Rng, c: &Corpus) -> Packet {
    let v4 = r.chance(550);
    let (node, nmac) = *r.pick(&[
        (if v4 { NODE1_4 } else { NODE1_6 }, NODE1_MAC),
        (if v4 { NODE2_4 } else { NODE2_6 }, NODE2_MAC),
        (
            if v4 { "203.0.113.13" } else { "2001:db8:1::13" },
            [2, 0, 0, 0, 0, 0x13],
        ),
        (
            if v4 {
                "198.51.100.50"
            } else {
                "2001:db8:c::50"
            },
            ONEARM_MAC,
        ),
    ]);
    let client = if r.chance(900) {
        ip(if v4 { CLIENT4 } else { CLIENT6 })
    } else {
        addr(r, v4)
    };
    let mut q = Frame::udp(
        mac(r),
        FXN_MAC,
        client,
        port(r),
        ip(node),
        // The VIPs' ports (the IPv6 VIP has only 5684), and one no VIP takes.
        if v4 {
            *r.pick(&[5684u16, 5684, 20000, 20050, 20101, 5700])
        } else {
            *r.pick(&[5684u16, 5684, 5684, 5700])
        },
        &payload(r, c, true),
    );
    q.ttl = 63;
    q.zero_udp_checksum = v4 && r.chance(100);
    if v4 && r.chance(50) {
        q.ipv4_options = vec![1; 4 * (1 + r.below(3) as usize)];
    }
    if r.chance(50) {
        // About the node's own datagram, or another client's.
        std::mem::swap(&mut q.src, &mut q.dst);
    } else if r.chance(50) {
        q.src = addr(r, v4);
    }
    if v4 && r.chance(30) {
        q.more_fragments = true;
        q.fragment_offset = r.below(3) as u16;
    }
    let whole = q.bytes()[14..].to_vec();
    let keep = match r.below(10) {
        0..=5 => whole.len(),
        6..=7 => (if v4 { 28 + q.ipv4_options.len() } else { 48 }).min(whole.len()),
        _ => r.below(whole.len() as u64 + 1) as usize,
    };
    let to = if r.chance(950) { client } else { addr(r, v4) };
    let smac = if r.chance(800) { nmac } else { mac(r) };
    let mut frame = icmp_error(
        smac,
        FXN_MAC,
        ip(node),
        to,
        64,
        IcmpError::PortUnreachable,
        &whole[..keep],
    );
    let l3 = 14;
    let icmp = if v4 { l3 + 20 } else { l3 + 40 };
    if r.chance(500) {
        // Another type: time exceeded, parameter problem, packet too big, or one that is no
        // error (echo, redirect, source quench, neighbour discovery, another family's error).
        // The checksum is the node's business, not ours.
        frame[icmp] = if v4 {
            *r.pick(&[11u8, 12, 11, 12, 0, 1, 2, 4, 5, 8])
        } else {
            *r.pick(&[2u8, 3, 4, 2, 3, 4, 0, 5, 128, 129, 135])
        };
    }
    if r.chance(50) {
        frame[icmp + 2] ^= r.next() as u8;
    }
    if v4 && r.chance(30) {
        // A later fragment of an ICMP message: no ICMP header.
        frame[l3 + 6] = 0x20;
        frame[l3 + 7] = 1 + r.below(8) as u8;
    }
    Packet {
        frame,
        ingress: r.pick::<&str>(&["fxn", "fxn", "fxn", "fxn", "fxc", "fxo"]),
        kind: "node icmp",
    }
}

/// A node's reply to a client (as [`structured`]'s genuine replies), and a router's ICMP error
/// to the VIP about it as the client's side saw it (VIP:port → client:port), to follow it
/// (issue #21): too big or unreachable, from the client side's router or anyone, whole or cut,
/// now and then about another flow, or about an ICMP message.
fn reply_and_error(r: &mut Rng, c: &Corpus) -> (Packet, Packet) {
    let v4 = r.chance(550);
    let (node, nmac) = *r.pick(&[
        (if v4 { NODE1_4 } else { NODE1_6 }, NODE1_MAC),
        (if v4 { NODE2_4 } else { NODE2_6 }, NODE2_MAC),
    ]);
    let client = if r.chance(900) {
        ip(if v4 { CLIENT4 } else { CLIENT6 })
    } else {
        addr(r, v4)
    };
    let cport = port(r);
    let sport = if v4 {
        *r.pick(&[5684u16, 5684, 20000, 20050])
    } else {
        5684
    };
    // Mostly long enough to be recorded (IPv4 over 576 bytes, IPv6 over 1280), now and then
    // at or around the threshold, or short.
    let mut body = payload(r, c, false);
    let long = *r.pick(&[1300usize, 1400, 1300, 549, 548, 1233, 1232, 0]);
    if body.len() < long {
        body.resize(long, 0x17);
    }
    let reply = Frame::udp(nmac, FXN_MAC, ip(node), sport, client, cport, &body);
    let vip = ip(if v4 { VIP4 } else { VIP6 });
    let mut seen = reply.clone();
    seen.src = if r.chance(950) { vip } else { addr(r, v4) };
    seen.ttl = 63;
    if r.chance(50) {
        seen.dport = port(r);
    }
    let mut quoted = seen.bytes()[14..].to_vec();
    if r.chance(30) {
        quoted[if v4 { 9 } else { 6 }] = if v4 { 1 } else { 58 };
    }
    let keep = match r.below(10) {
        0..=6 => quoted.len(),
        7..=8 => (if v4 { 28 } else { 48 }).min(quoted.len()),
        _ => r.below(quoted.len() as u64 + 1) as usize,
    };
    let router = ip(if v4 { "198.51.100.1" } else { "2001:db8:c::1" });
    let from = if r.chance(800) { router } else { addr(r, v4) };
    let kind = if r.chance(700) {
        IcmpError::TooBig {
            mtu: *r.pick(&[1280u16, 1400, 576, 0]),
        }
    } else {
        IcmpError::PortUnreachable
    };
    let to = if r.chance(950) { vip } else { addr(r, v4) };
    let error = icmp_error(mac(r), FXC_MAC, from, to, 64, kind, &quoted[..keep]);
    (
        Packet {
            frame: reply.bytes(),
            ingress: "fxn",
            kind: "reply",
        },
        Packet {
            frame: error,
            ingress: r.pick::<&str>(&["fxc", "fxc", "fxc", "fxn", "fxo"]),
            kind: "icmp to vip",
        },
    )
}

/// Identifications of fragment trains: a few reused (trains of one sender collide), or any.
fn frag_id(r: &mut Rng) -> u32 {
    if r.chance(300) {
        *r.pick(&[1u32, 2, 0x1234, 7])
    } else {
        r.next() as u32
    }
}

/// A datagram cut into IP fragments as its sender's kernel cuts it ([`Frame::fragments`]): a
/// client's to a VIP port (CID or not, of the corpus), or a node's reply, genuine or forged;
/// sent in order, shuffled, or with fragments lost, now and then one mutated or arriving on
/// another interface. Returns the first frame to send; the rest go to `queued` (popped from
/// the end).
fn fragment_train(r: &mut Rng, c: &Corpus, queued: &mut Vec<Packet>) -> Packet {
    let v4 = r.chance(550);
    let to_vip = r.chance(650);
    let mut body = payload(r, c, to_vip);
    if r.chance(500) {
        // Large enough for several fragments whatever the corpus gave.
        let more = r.below(300) as usize;
        body.extend(r.bytes(more));
    }
    let (f, ingress) = if to_vip {
        let dst = if r.chance(900) {
            ip(if v4 { VIP4 } else { VIP6 })
        } else {
            addr(r, v4)
        };
        let dport = *r.pick(&[5684u16, 5684, 5684, 20000, 5700]);
        let f = Frame::udp(mac(r), FXC_MAC, addr(r, v4), port(r), dst, dport, &body);
        (f, *r.pick(&["fxc", "fxc", "fxc", "fxc", "fxn"]))
    } else {
        let (n, nmac) = *r.pick(&[
            (if v4 { NODE1_4 } else { NODE1_6 }, NODE1_MAC),
            (if v4 { NODE2_4 } else { NODE2_6 }, NODE2_MAC),
            (if v4 { NODE1_4 } else { NODE1_6 }, NODE1_MAC),
        ]);
        let smac = if r.chance(850) { nmac } else { mac(r) };
        let sport = *r.pick(&[5684u16, 5684, 5684, 5700]);
        let f = Frame::udp(smac, FXN_MAC, ip(n), sport, addr(r, v4), port(r), &body);
        (f, *r.pick(&["fxn", "fxn", "fxn", "fxn", "fxc"]))
    };
    let mut f = f;
    f.ttl = *r.pick(&[64u8, 64, 64, 64, 1]);
    f.zero_udp_checksum = v4 && r.chance(100);
    let datagram = 8 + f.payload.len();
    let chunk = 8 * (1 + r.below((datagram as u64 / 8).max(1))) as usize;
    let mut frames = f.fragments(frag_id(r), chunk);
    match r.below(10) {
        0 | 1 => shuffle(r, &mut frames),
        2 => {
            let at = r.below(frames.len() as u64) as usize;
            frames.remove(at);
        }
        _ => {}
    }
    let mut train: Vec<Packet> = frames
        .into_iter()
        .map(|frame| Packet {
            frame,
            ingress: if r.chance(30) {
                r.pick::<&str>(&INGRESS)
            } else {
                ingress
            },
            kind: "fragment",
        })
        .collect();
    if r.chance(50) && !train.is_empty() {
        let at = r.below(train.len() as u64) as usize;
        let p = std::mem::replace(
            &mut train[at],
            Packet {
                frame: Vec::new(),
                ingress: "fxc",
                kind: "fragment",
            },
        );
        train[at] = mutate(r, p);
    }
    if train.is_empty() {
        return structured(r, c);
    }
    let first = train.remove(0);
    train.reverse();
    queued.extend(train);
    first
}

fn mutate(r: &mut Rng, mut p: Packet) -> Packet {
    for _ in 0..1 + r.below(4) {
        if p.frame.is_empty() {
            break;
        }
        let at = r.below(p.frame.len() as u64) as usize;
        match r.below(5) {
            0 | 1 => p.frame[at] ^= 1 << r.below(8),
            2 => p.frame[at] = r.next() as u8,
            3 => {
                let b = r.next() as u8;
                p.frame.insert(at, b);
            }
            _ => {
                p.frame.remove(at);
            }
        }
    }
    p.kind = "mutated";
    p
}

/// Sources of the limits configs' clients (`Stream::with_limits`): few enough that their
/// buckets run dry. Some in the configs' exempt prefixes (100.64.0.0/10, 2001:db8:cafe::/48),
/// two in one IPv6 /64 (one bucket), and an IPv4-mapped IPv6 address inside an exempt IPv4
/// prefix (the exempt trie holds IPv4 prefixes as IPv4-mapped IPv6).
const LIMIT_SOURCES: &[&str] = &[
    CLIENT4,
    "198.51.100.8",
    "198.51.100.9",
    "203.0.113.77",
    "10.9.9.9",
    "100.64.0.9",
    "100.127.255.254",
    "100.128.0.1",
    CLIENT6,
    "2001:db8:c::8",
    "2001:db8:c:1::9",
    "2001:db8:cafe::1",
    "2001:db8:caff::1",
    "::ffff:100.64.0.10",
];

/// A client of a limits config: a source from [`LIMIT_SOURCES`] (or, now and then, one never
/// seen before) to a VIP port, from a handful of source ports (flows that repeat: their
/// sources become known) or from any (a new flow nearly every time).
fn limited_client(r: &mut Rng, c: &Corpus) -> Packet {
    let src = if r.chance(950) {
        ip(r.pick::<&str>(LIMIT_SOURCES))
    } else {
        let v4 = r.chance(600);
        addr(r, v4)
    };
    let v4 = src.is_ipv4();
    // 192.0.2.11: the VIP the churn reloads add and remove (ports 5685 and 30000; VIPs of one
    // family share no port).
    let (dst, dport) = match (v4, r.below(10)) {
        (true, 0..=6) => (VIP4, *r.pick(&[5684u16, 5684, 20000, 20100])),
        (true, _) => ("192.0.2.11", *r.pick(&[5685u16, 30000, 5684])),
        (false, _) => (VIP6, 5684),
    };
    let dst = ip(dst);
    let sport = if r.chance(400) {
        *r.pick(&[40000u16, 40001, 40002])
    } else {
        r.next() as u16
    };
    let p = if r.chance(500) {
        r.pick(&c.to_server).clone()
    } else {
        payload(r, c, true)
    };
    let f = Frame::udp(CLIENT_MAC, FXC_MAC, src, sport, dst, dport, &p);
    Packet {
        frame: f.bytes(),
        ingress: "fxc",
        kind: "limited client",
    }
}

/// A cookie a node's reply carried to a client (`cookie_reply`), for ClientHellos to echo.
struct Issued {
    client: IpAddr,
    port: u16,
    cookie: Vec<u8>,
    /// In a HelloRetryRequest (DTLS 1.3), else a HelloVerifyRequest.
    v13: bool,
}

/// Cookies issued lately: the ClientHellos pick among these.
const ISSUED: usize = 48;

/// Clients of the cookie exchanges: mostly ones the balancer routes replies to (on the
/// client side), now and then any of the limits stream's sources.
fn cookie_client(r: &mut Rng) -> IpAddr {
    const ROUTED: &[&str] = &[
        CLIENT4,
        "198.51.100.8",
        "198.51.100.9",
        CLIENT6,
        "2001:db8:c::8",
        "2001:db8:c::9",
    ];
    ip(if r.chance(800) {
        r.pick::<&str>(ROUTED)
    } else {
        r.pick::<&str>(LIMIT_SOURCES)
    })
}

/// Client ports of the cookie exchanges (few, so right and wrong ports both come up).
const COOKIE_PORTS: &[u16] = &[40000, 40001, 40002];

/// Some extensions a ClientHello or HelloRetryRequest may carry besides the cookie (types
/// that mean nothing to the datapath: it walks them by their lengths).
fn other_extensions(r: &mut Rng, n: usize) -> hello::Extensions {
    (0..n)
        .map(|_| {
            let ty = *r.pick(&[0u16, 10, 13, 16, 21, 41, 42, 45, 51, 0xfe0d, 0x1234, 43]);
            let len = r.below(12) as usize;
            (ty, r.bytes(len))
        })
        .collect()
}

fn shuffle<T>(r: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = r.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// A node's cookie request on its way to a client of the limits stream (node 1 or 2, its MAC,
/// on the node side: genuine, as the other generated replies): a HelloVerifyRequest (server
/// and record version FE FD or FE FF, now and then another) or a HelloRetryRequest (its
/// extensions in any order, a session id echo of 0..32 bytes, now and then a plain
/// ServerHello's random or no cookie), whole, or only a fragment of it; at times with bytes
/// after the record or a UDP length that lies.
fn cookie_reply(r: &mut Rng, issued: &mut Vec<Issued>) -> Packet {
    let client = cookie_client(r);
    let v4 = client.is_ipv4();
    let port = *r.pick(COOKIE_PORTS);
    let (node, nmac) = *r.pick(&[
        (if v4 { NODE1_4 } else { NODE1_6 }, NODE1_MAC),
        (if v4 { NODE2_4 } else { NODE2_6 }, NODE2_MAC),
    ]);
    let cookie = {
        let n = 1 + r.below(64) as usize;
        r.bytes(n)
    };
    let v13 = r.chance(500);
    let mut h = if v13 {
        let mut exts = hello::hrr_extensions(&cookie);
        let extra = r.below(4) as usize;
        exts.extend(other_extensions(r, extra));
        if r.chance(30) {
            exts.retain(|(ty, _)| *ty != COOKIE_EXT);
        }
        shuffle(r, &mut exts);
        let sid = {
            let any = r.below(33) as usize;
            let n = *r.pick(&[0usize, 0, 32, any, 33]);
            r.bytes(n)
        };
        let mut h = hello::hello_retry_request(&sid, &exts);
        if r.chance(30) {
            // A ServerHello, not a HelloRetryRequest.
            let at = 2 + r.below(32) as usize;
            h.body[at] ^= 1;
        }
        h
    } else {
        let version = *r.pick(&[
            [0xfe, 0xfd],
            [0xfe, 0xfd],
            [0xfe, 0xfd],
            [0xfe, 0xff],
            [0xfe, 0xff],
            [0xfe, 0xfe],
            [1, 0],
        ]);
        hello::hello_verify_request(version, &cookie)
    };
    if r.chance(100) {
        h.record_version = *r.pick(&[[0xfe, 0xfd], [0xfe, 0xff], [0xfe, 0xfe], [3, 3]]);
    }
    let len = h.body.len();
    let mut payload = match r.below(20) {
        // A fragment at an offset (never learned), or the first part only.
        0 => {
            let at = 1 + r.below(len as u64 - 1) as usize;
            h.fragment(at, len - at)
        }
        1 => {
            let cut = r.below(len as u64) as usize;
            h.fragment(0, cut)
        }
        _ => h.record(),
    };
    if r.chance(50) {
        // Epoch 1: not a handshake in the clear.
        payload[4] = 1;
    }
    trailer(r, &mut payload);
    let mut f = Frame::udp(nmac, FXN_MAC, ip(node), 5684, client, port, &payload);
    f.udp_len_override = udp_len_lie(r, payload.len());
    let mut frame = f.bytes();
    if r.chance(30) {
        // Cut short: the UDP length (not checked on the reply path) runs past the frame.
        let cut = 1 + r.below(40) as usize;
        frame.truncate(frame.len().saturating_sub(cut).max(14));
    }
    if issued.len() == ISSUED {
        issued.remove(0);
    }
    issued.push(Issued {
        client,
        port,
        cookie,
        v13,
    });
    Packet {
        frame,
        ingress: "fxn",
        kind: "cookie reply",
    }
}

/// Now and then, bytes after the first record: another record or a few stray bytes.
fn trailer(r: &mut Rng, payload: &mut Vec<u8>) {
    if r.chance(120) {
        let n = r.below(40) as usize;
        let mut t = r.bytes(n);
        if let Some(b) = t.first_mut() {
            *b = *r.pick(&[22u8, 22, 25, 0]);
        }
        payload.extend(t);
    }
}

/// Now and then, a UDP length field that lies (below the header, a byte short or long, or
/// far past the frame).
fn udp_len_lie(r: &mut Rng, payload: usize) -> Option<u16> {
    let real = payload as u16 + 8;
    r.chance(40).then(|| {
        *r.pick(&[
            0,
            7,
            8,
            9,
            real.wrapping_sub(1),
            real.wrapping_add(1),
            real.wrapping_add(300),
            65535,
        ])
    })
}

/// A ClientHello to a VIP from a client of the limits stream, echoing a recent cookie: from
/// the address and port it was sent to, from another address (at times in the same IPv6 /64)
/// or port, or with the cookie changed (a byte past the 32 hashed ones changes nothing; its
/// length does). DTLS 1.2 (the cookie field) or DTLS 1.3 (the cookie extension among others,
/// in any place, now and then behind more extensions than the datapath walks), whole or cut
/// into two fragments (anywhere, often around the cookie extension), the second one sent
/// next (or before the first, or with another message sequence number).
fn cookie_hello(r: &mut Rng, issued: &[Issued], queued: &mut Vec<Packet>) -> Packet {
    let (mut client, mut port, mut cookie, v13) = match issued.len() {
        0 => {
            let n = 1 + r.below(64) as usize;
            (
                cookie_client(r),
                *r.pick(COOKIE_PORTS),
                r.bytes(n),
                r.chance(500),
            )
        }
        n => {
            // Mostly one of the last few.
            let back = if r.chance(700) {
                r.below(4)
            } else {
                r.below(n as u64)
            } as usize;
            let i = &issued[n - 1 - back.min(n - 1)];
            (i.client, i.port, i.cookie.clone(), i.v13)
        }
    };
    let how = match r.below(20) {
        0..=11 => "right",
        12 | 13 => "another address",
        14 | 15 => "another port",
        _ => "changed cookie",
    };
    match how {
        "another address" => {
            let v4 = client.is_ipv4();
            client = loop {
                let a = cookie_client(r);
                if a.is_ipv4() == v4 && a != client || r.chance(100) {
                    break a;
                }
            };
        }
        "another port" => port = port.wrapping_add(1 + r.below(3) as u16),
        "changed cookie" => match r.below(4) {
            0 => cookie.push(r.next() as u8),
            1 if cookie.len() > 1 => {
                cookie.pop();
            }
            _ => {
                let at = r.below(cookie.len() as u64) as usize;
                cookie[at] ^= 1 << r.below(8);
            }
        },
        _ => {}
    }
    let v13 = if r.chance(900) { v13 } else { !v13 };
    let h: Handshake = if v13 {
        let any = r.below(1200) as usize;
        let key_share = *r.pick(&[32usize, 200, 600, 1100, any]);
        let mut exts = hello::client_extensions(key_share);
        if r.chance(100) {
            // More extensions than the datapath walks.
            let n = 20 + r.below(10) as usize;
            exts.extend(other_extensions(r, n));
        } else {
            let n = r.below(4) as usize;
            exts.extend(other_extensions(r, n));
        }
        let at = r.below(exts.len() as u64 + 1) as usize;
        exts.insert(at, hello::cookie_extension(&cookie));
        hello::client_hello13(&exts)
    } else {
        let sid = {
            let any = r.below(33) as usize;
            let n = *r.pick(&[0usize, 32, any]);
            r.bytes(n)
        };
        let n = r.below(80) as usize;
        hello::client_hello(&sid, &cookie, &hello::client_extensions(n))
    };
    let len = h.body.len();
    let v4 = client.is_ipv4();
    let (dst, dport) = if v4 {
        (VIP4, *r.pick(&[5684u16, 5684, 20000]))
    } else {
        (VIP6, 5684)
    };
    let frame = |r: &mut Rng, mut payload: Vec<u8>| {
        trailer(r, &mut payload);
        let mut f = Frame::udp(CLIENT_MAC, FXC_MAC, client, port, ip(dst), dport, &payload);
        if r.chance(20) {
            // Ethernet padding: a UDP length shorter than the frame.
            f.udp_len_override = Some((payload.len() + 8 - r.below(4) as usize) as u16);
        }
        Packet {
            frame: f.bytes(),
            ingress: "fxc",
            kind: if v4 {
                "cookie hello"
            } else {
                "cookie hello (IPv6)"
            },
        }
    };
    if r.chance(450) {
        return frame(r, h.record());
    }
    // Two fragments: cut anywhere, around the cookie extension, or in the key share.
    let cookie_at = h.extension_at(COOKIE_EXT);
    let ext_start = h.extensions_start().unwrap_or(len);
    let cut = match (r.below(10), cookie_at) {
        // DTLS 1.3: among the extensions before the cookie's (the key share, mostly), or
        // right at the cookie extension's header: followed into the second fragment.
        (0..=3, Some(at)) if v13 && at >= ext_start => {
            ext_start + r.below((at - ext_start) as u64 + 1) as usize
        }
        (4, Some(at)) if v13 => at,
        // Around the cookie extension (or the 1.2 cookie field): cut headers and cookies.
        (5 | 6, Some(at)) => (at + r.below(14) as usize).saturating_sub(4),
        // Around the extensions' length field, or before it (the session id, the cipher
        // suites, the compression methods).
        (7, _) => (ext_start + r.below(7) as usize).saturating_sub(5),
        (8, _) => 30 + r.below(ext_start.saturating_sub(30) as u64 + 1) as usize,
        _ => r.below(len as u64) as usize,
    }
    .clamp(1, len - 1);
    let first = h.fragment(0, cut);
    let mut second = h.clone();
    if r.chance(50) {
        second.msg_seq = second.msg_seq.wrapping_add(1);
    }
    let second = second.fragment(cut, len - cut);
    let (now, later) = if r.chance(100) {
        (second, first)
    } else {
        (first, second)
    };
    let now = frame(r, now);
    let later = frame(r, later);
    if r.chance(950) {
        queued.push(later);
    }
    now
}

/// The tunnel configs' VIPs by family: tunnel mode first, NAT mode second (they switch in a
/// reload of one of them).
const TUNNEL_CLIENT_VIPS: [[&str; 2]; 2] = [[VIP4, "192.0.2.11"], [VIP6, "2001:db8:ffff::11"]];

/// A client of the tunnel configs: to a tunnel VIP (mostly) or a NAT VIP beside it, a CID
/// record or DTLS 1.3 unified header naming a node (configured, disabled, without a
/// neighbour, one-armed, behind an interface cidlb is not on, unknown), a handshake or any
/// payload by flow, from a few source ports (flows that repeat) or any (new flows). Now and
/// then sized around the path MTU once encapsulated (an inner packet of 1440 to 1500 bytes;
/// the configs' `tunnel.mtu` of 1460 / 1480 and fxn's 1500), without DF (IPv4), with a TOS / traffic class and flow label, IPv4 options, a VLAN tag, TTL 0 to 2, Ethernet
/// padding after the IP packet, an IP length that lies, a zero or wrong UDP checksum, or
/// arriving on the node side or the interface with forwarding off.
fn tunnel_client(r: &mut Rng, c: &Corpus) -> Packet {
    let v4 = r.chance(500);
    let src = ip(if v4 {
        r.pick::<&str>(&[CLIENT4, CLIENT4, "198.51.100.8", "10.9.9.9", "100.64.0.10"])
    } else {
        r.pick::<&str>(&[
            CLIENT6,
            CLIENT6,
            "2001:db8:c::8",
            "2001:db8:dead::1",
            "2001:db8:c:1::9",
        ])
    });
    let vips = TUNNEL_CLIENT_VIPS[usize::from(!v4)];
    let dst = ip(if r.chance(750) { vips[0] } else { vips[1] });
    let dport = *r.pick(&[5684u16, 5684, 5684, 20000, 20100, 5685]);
    let sport = if r.chance(500) {
        *r.pick(&[40000u16, 40001, 40002])
    } else {
        r.next() as u16
    };
    // Node ids of the tunnel configs' one-byte ids: 1, 2 (neighbours on the node side), 3 (no
    // neighbour), 4 (disabled), 5 (client side), 6 (behind fxo), 7 and 0 (unknown).
    let node = *r.pick(&[1u8, 1, 2, 2, 3, 4, 5, 6, 7, 0]);
    let cid = {
        let mut c = r.bytes(6);
        c[0] = node;
        c
    };
    let body = |r: &mut Rng| {
        let n = r.below(48) as usize;
        r.bytes(n)
    };
    let mut p = match r.below(10) {
        0..=3 => cid_record(&cid, &body(r)),
        4 => {
            let b = body(r);
            unified_record(Some(&cid), r.chance(500), r.chance(500), &b)
        }
        5 | 6 => r.pick(&c.to_server).clone(),
        7 => lb_lab::packet::handshake_record(&body(r)),
        8 => same_node_records(r),
        _ => payload(r, c, true),
    };
    let hdr = if v4 { 20 } else { 40 };
    if r.chance(120) {
        // An inner packet of 1440..=1500 bytes: around where IPv4 IPIP (1480), IPv4 GUE (1472),
        // IPv6 IPIP (1460) and IPv6 GUE (1452) stop fitting fxn's MTU of 1500. A CID record
        // keeps its length field right.
        let l3 = 1440 + r.below(61) as usize;
        let want = l3 - hdr - 8;
        p = if r.chance(700) && want > 19 {
            cid_record(&cid, &r.bytes(want - 19))
        } else {
            let mut q = p;
            q.resize(want, 0);
            q
        };
    }
    let mut f = Frame::udp(CLIENT_MAC, FXC_MAC, src, sport, dst, dport, &p);
    // IPv4 without DF now and then (too big for the tunnel, it is dropped unanswered).
    f.dont_fragment = !(v4 && r.chance(200));
    let ingress = if r.chance(900) {
        "fxc"
    } else {
        *r.pick(&["fxn", "fxo"])
    };
    if r.chance(40) {
        f.vlans = vec![(*r.pick(&[0x8100u16, 0x88a8]), 1 + r.below(4094) as u16)];
    }
    f.ttl = *r.pick(&[64u8, 64, 64, 64, 64, 64, 64, 2, 1, 0, 255]);
    if v4 {
        if r.chance(50) {
            let words = 1 + r.below(10) as usize;
            f.ipv4_options = vec![1; 4 * words];
        }
        f.zero_udp_checksum = r.chance(50);
    }
    let mut frame = f.bytes();
    let l3 = 14 + 4 * f.vlans.len();
    if r.chance(50) {
        // A wrong UDP checksum (the IPv6 GUE checksum is as wrong).
        let at = frame.len() - p.len() - 2;
        frame[at] ^= 1 + r.below(255) as u8;
    }
    if r.chance(300) {
        // TOS / traffic class and flow label (the outer header copies the class).
        let tos = r.next() as u8;
        if v4 {
            frame[l3 + 1] = tos;
        } else {
            let label = r.next() as u32 & 0xf_ffff;
            frame[l3] = 0x60 | (tos >> 4);
            frame[l3 + 1] = (tos << 4) | (label >> 16) as u8;
            frame[l3 + 2] = (label >> 8) as u8;
            frame[l3 + 3] = label as u8;
        }
    }
    if r.chance(30) {
        // An IP length that lies (the outer lengths follow the inner header's).
        let at = if v4 { l3 + 2 } else { l3 + 4 };
        let len = u16::from_be_bytes([frame[at], frame[at + 1]]);
        let lie = len.wrapping_add(*r.pick(&[1u16, 0xffff, 8, 0xfff0, 1500]));
        frame[at..at + 2].copy_from_slice(&lie.to_be_bytes());
    }
    if v4 {
        ipv4_checksum(&mut frame, l3);
    }
    if r.chance(50) {
        // Ethernet padding after the IP packet.
        let n = 1 + r.below(24) as usize;
        frame.extend(r.bytes(n));
    }
    Packet {
        frame,
        ingress,
        kind: if v4 {
            "tunnel client"
        } else {
            "tunnel client (IPv6)"
        },
    }
}

/// The IPv4 header checksum at `l3` written again, from scratch.
fn ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let mut s: u32 = frame[l3..l3 + ihl]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    frame[l3 + 10..l3 + 12].copy_from_slice(&(!(s as u16)).to_be_bytes());
}

/// The packet stream: `next` yields frames until the caller stops.
pub struct Stream<'a> {
    rng: Rng,
    /// Half the frames from [`limited_client`] (the limits configs' stream).
    limits: bool,
    /// Half the frames from [`tunnel_client`], and some of the cookie exchange (the tunnel
    /// configs' stream).
    tunnels: bool,
    corpus: &'a Corpus,
    /// A frame being swept through every truncation: (frame, ingress, next length).
    sweep: Option<(Vec<u8>, &'static str, usize)>,
    /// Every recorded datagram in a valid frame of each family (client to VIP on fxc, node 1's
    /// reply on fxn), swept in turn.
    valid: Vec<(Vec<u8>, &'static str)>,
    next_valid: usize,
    /// The limits stream's cookies issued lately, and the frame it sends next (the second
    /// fragment of a ClientHello).
    issued: Vec<Issued>,
    queued: Vec<Packet>,
}

impl<'a> Stream<'a> {
    pub fn new(seed: u64, corpus: &'a Corpus) -> Self {
        let mut valid = Vec::new();
        for (vip, client, node) in [(VIP4, CLIENT4, NODE1_4), (VIP6, CLIENT6, NODE1_6)] {
            for d in &corpus.to_server {
                let f = Frame::udp(CLIENT_MAC, FXC_MAC, ip(client), 40000, ip(vip), 5684, d);
                valid.push((f.bytes(), "fxc"));
            }
            for d in &corpus.to_client {
                let f = Frame::udp(NODE1_MAC, FXN_MAC, ip(node), 5684, ip(client), 40000, d);
                valid.push((f.bytes(), "fxn"));
            }
        }
        Self {
            rng: Rng::new(seed),
            limits: false,
            tunnels: false,
            corpus,
            sweep: None,
            valid,
            next_valid: 0,
            issued: Vec::new(),
            queued: Vec::new(),
        }
    }

    /// The limits configs' stream: its own sequence for the seed (so the other configs'
    /// frames stay what they were), half of it clients from few sources.
    pub fn with_limits(seed: u64, corpus: &'a Corpus) -> Self {
        let mut s = Self::new(seed ^ 0x4c49_4d49_5453_0000, corpus);
        s.limits = true;
        s
    }

    /// The tunnel configs' stream: its own sequence for the seed, half of it clients of the
    /// tunnel and NAT VIPs, a tenth of the rest the cookie exchange.
    pub fn with_tunnels(seed: u64, corpus: &'a Corpus) -> Self {
        let mut s = Self::new(seed ^ 0x5455_4e4e_454c_0000, corpus);
        s.tunnels = true;
        s
    }

    /// (sweeps of recorded-datagram frames started, how many such frames there are).
    pub fn valid_sweeps(&self) -> (usize, usize) {
        (self.next_valid, self.valid.len())
    }

    pub fn next_packet(&mut self) -> Packet {
        if let Some((frame, ingress, len)) = &mut self.sweep {
            let p = Packet {
                frame: frame[..*len].to_vec(),
                ingress,
                kind: "truncated",
            };
            *len += 1;
            if *len >= frame.len() {
                self.sweep = None;
            }
            return p;
        }
        if let Some(p) = self.queued.pop() {
            return p;
        }
        let r = &mut self.rng;
        if self.limits && r.chance(500) {
            return limited_client(r, self.corpus);
        }
        // The cookie exchange (limits stream only): a node's cookie request to a client, or a
        // ClientHello echoing one.
        if self.tunnels && r.chance(500) {
            let p = tunnel_client(r, self.corpus);
            return if r.chance(100) { mutate(r, p) } else { p };
        }
        if (self.limits && r.chance(400)) || (self.tunnels && r.chance(100)) {
            return if r.chance(400) {
                cookie_reply(r, &mut self.issued)
            } else {
                cookie_hello(r, &self.issued, &mut self.queued)
            };
        }
        if r.chance(40) {
            let (reply, error) = reply_and_error(r, self.corpus);
            self.queued.push(if r.chance(100) {
                mutate(r, error)
            } else {
                error
            });
            return reply;
        }
        if r.chance(50) {
            let p = node_icmp_error(r, self.corpus);
            return if r.chance(100) { mutate(r, p) } else { p };
        }
        match r.below(100) {
            0..=4 => {
                let n = r.below(120) as usize;
                Packet {
                    frame: r.bytes(n),
                    ingress: r.pick::<&str>(&INGRESS),
                    kind: "random",
                }
            }
            5 => {
                // Every truncation of one valid frame, from the empty frame up: the next
                // recorded datagram in its frame, or a structured frame.
                self.sweep = Some(if r.chance(500) {
                    let (f, ingress) = self.valid[self.next_valid % self.valid.len()].clone();
                    self.next_valid += 1;
                    (f, ingress, 0)
                } else {
                    let p = structured(r, self.corpus);
                    (p.frame, p.ingress, 0)
                });
                self.next_packet()
            }
            6..=35 => {
                let p = structured(r, self.corpus);
                mutate(r, p)
            }
            36..=43 => fragment_train(r, self.corpus, &mut self.queued),
            _ => structured(r, self.corpus),
        }
    }
}
