//! The reference on its own (no kernel): frames built with etherparse (lb-lab), expected
//! outputs built the same way with checksums computed from scratch.

use std::net::IpAddr;

use lb_common::{AddrKey, Counter, Node, NodeAddr, Reverse, ReverseKey, Vip, FAMILY_V4, NODE_F_V4};
use lb_lab::{
    fib::*,
    packet::{assert_checksums, cid_record, Frame},
};
use lb_reference::{
    classify,
    fib::{Link, Route, RouteKind, StaticFib},
    FibRc, State, Tables, XDP_DROP, XDP_PASS, XDP_REDIRECT,
};

const FXC: u32 = 1;
const FXN: u32 = 2;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn w4(s: &str) -> [u32; 4] {
    let IpAddr::V4(a) = ip(s) else { panic!() };
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

fn b16(s: &str) -> [u8; 16] {
    let mut b = [0; 16];
    match ip(s) {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

/// VIP 192.0.2.10:5684, node 1 at 203.0.113.11 behind fxn; the client side on fxc.
fn setup() -> (Tables, StaticFib) {
    let mut t = Tables::default();
    t.vips.insert(
        AddrKey {
            addr: w4(VIP4),
            family: FAMILY_V4,
            _pad: [0; 3],
        },
        Vip { index: 0 },
    );
    let mut words = vec![0u64; 1024];
    words[5684 / 64] |= 1 << (5684 % 64);
    t.vip_ports.insert(0, words);
    t.nodes.insert(
        1,
        Node {
            addr6: [0; 4],
            addr4: w4(NODE1_4)[0],
            port: 0,
            flags: NODE_F_V4,
            slot: 0,
            check: 0,
        },
    );
    t.node_addrs.insert(
        AddrKey {
            addr: w4(NODE1_4),
            family: FAMILY_V4,
            _pad: [0; 3],
        },
        NodeAddr { slot: 0 },
    );
    t.reverse.insert(
        ReverseKey {
            addr: w4(NODE1_4),
            port: 5684u16.to_be(),
            family: FAMILY_V4,
            _pad: 0,
        },
        Reverse {
            vip: w4(VIP4),
            vip_port: 5684u16.to_be(),
            _pad: 0,
            node_slot: 0,
        },
    );
    t.ring = [vec![1], vec![]];
    t.ring_len = [1, 0];
    t.devmap.extend([FXC, FXN]);
    let mut fib = StaticFib::default();
    fib.links.insert(
        FXC,
        Link {
            mac: FXC_MAC,
            mtu: 1500,
            forward4: true,
            forward6: true,
        },
    );
    fib.links.insert(
        FXN,
        Link {
            mac: FXN_MAC,
            mtu: 1500,
            forward4: true,
            forward6: true,
        },
    );
    for (p, dev) in [("198.51.100.0", FXC), ("203.0.113.0", FXN)] {
        fib.routes.push(Route {
            family: FAMILY_V4,
            prefix: b16(p),
            len: 24,
            kind: RouteKind::Unicast,
            dev,
            via: None,
        });
    }
    fib.routes.push(Route {
        family: FAMILY_V4,
        prefix: b16("198.51.100.1"),
        len: 32,
        kind: RouteKind::Local,
        dev: FXC,
        via: None,
    });
    fib.neighbours
        .insert((FXC, FAMILY_V4, b16(CLIENT4)), CLIENT_MAC);
    fib.neighbours
        .insert((FXN, FAMILY_V4, b16(NODE1_4)), NODE1_MAC);
    (t, fib)
}

fn cid(node: u8) -> Vec<u8> {
    cid_record(&[node, 1, 2, 3, 4, 5], b"encrypted")
}

#[test]
fn cid_record_is_forwarded_to_its_node_with_checksums_from_scratch() {
    let (t, fib) = setup();
    let input = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT4),
        40000,
        ip(VIP4),
        5684,
        &cid(1),
    );
    let mut want = input.clone();
    want.dst = ip(NODE1_4);
    want.ttl -= 1;
    want.src_mac = FXN_MAC;
    want.dst_mac = NODE1_MAC;
    let out = classify(&input.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!(out.action, XDP_REDIRECT);
    assert_eq!(out.frame, want.bytes());
    assert_checksums(&out.frame, "forwarded");
    assert_eq!(
        out.counters,
        [
            Counter::PacketsSeen,
            Counter::CidRouted,
            Counter::FwdRedirect
        ]
    );
}

#[test]
fn zero_udp_checksum_stays_zero_and_a_wrong_one_stays_as_wrong() {
    let (t, fib) = setup();
    let mut input = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT4),
        40000,
        ip(VIP4),
        5684,
        &cid(1),
    );
    input.zero_udp_checksum = true;
    let out = classify(&input.bytes(), FXC, &t, &mut State::default(), &fib);
    let udp_check = 14 + 20 + 6;
    assert_eq!(out.frame[udp_check..udp_check + 2], [0, 0]);

    input.zero_udp_checksum = false;
    let mut bad = input.bytes();
    bad[udp_check + 1] ^= 0x40;
    let out = classify(&bad, FXC, &t, &mut State::default(), &fib);
    let good = classify(&input.bytes(), FXC, &t, &mut State::default(), &fib);
    let c = |f: &[u8]| u16::from_be_bytes([f[udp_check], f[udp_check + 1]]);
    // The error of 0x0040 in the input is still there, in ones'-complement arithmetic.
    assert_ne!(c(&out.frame), c(&good.frame));
    let d = (u32::from(c(&good.frame)) + 0xffff - u32::from(c(&out.frame))) % 0xffff;
    let e = (u32::from(c(&input.bytes())) + 0xffff - u32::from(c(&bad))) % 0xffff;
    assert_eq!(d, e);
}

#[test]
fn forged_reply_with_a_client_mac_is_dropped_and_a_genuine_one_unnated() {
    let (t, fib) = setup();
    let genuine = Frame::udp(
        NODE1_MAC,
        FXN_MAC,
        ip(NODE1_4),
        5684,
        ip(CLIENT4),
        40000,
        b"r",
    );
    let out = classify(&genuine.bytes(), FXN, &t, &mut State::default(), &fib);
    assert_eq!(out.action, XDP_REDIRECT);
    let mut want = genuine.clone();
    want.src = ip(VIP4);
    want.ttl -= 1;
    want.src_mac = FXC_MAC;
    want.dst_mac = CLIENT_MAC;
    assert_eq!(out.frame, want.bytes());

    let mut forged = genuine.clone();
    forged.src_mac = CLIENT_MAC;
    let out = classify(&forged.bytes(), FXN, &t, &mut State::default(), &fib);
    assert_eq!(
        (out.action, out.delta(Counter::DropForgedReply)),
        (XDP_DROP, 1)
    );
    let out = classify(&genuine.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!(
        (out.action, out.delta(Counter::DropForgedReply)),
        (XDP_DROP, 1)
    );
}

#[test]
fn every_truncation_of_a_valid_frame_is_counted_and_never_written() {
    let (t, fib) = setup();
    let f = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT4),
        40000,
        ip(VIP4),
        5684,
        &cid(1),
    )
    .bytes();
    for len in 0..f.len() {
        let out = classify(&f[..len], FXC, &t, &mut State::default(), &fib);
        assert_eq!(out.frame, &f[..len], "length {len}");
        let want = if len < 14 + 20 + 8 {
            (XDP_PASS, Counter::PassTruncated)
        } else {
            (XDP_DROP, Counter::DropBadUdpLength)
        };
        assert_eq!((out.action, out.counters[1]), want, "length {len}");
    }
}

#[test]
fn fib_ipv6_scoped_source_or_destination_ends_the_lookup() {
    use lb_reference::Fib;
    let (_, mut fib) = setup();
    fib.routes.push(Route {
        family: 6,
        prefix: b16("2001:db8:1::"),
        len: 64,
        kind: RouteKind::Unicast,
        dev: FXN,
        via: None,
    });
    fib.neighbours.insert((FXN, 6, b16(NODE1_6)), NODE1_MAC);
    let w = |s: &str| {
        let b = b16(s);
        [0, 4, 8, 12].map(|i| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap()))
    };
    let rc = |src: &str, dst: &str| fib.lookup(6, &w(src), &w(dst), FXN, 0).rc;
    assert_eq!(rc(CLIENT6, NODE1_6), FibRc::Success);
    for scoped in ["::1", "fe80::1", "ff02::1"] {
        assert_eq!(rc(scoped, NODE1_6), FibRc::NotFwded, "from {scoped}");
    }
    assert_eq!(
        fib.lookup(6, &w(CLIENT6), &w(NODE1_6), FXN, 1501).rc,
        FibRc::FragNeeded
    );
}

/// `setup()` with both VIPs in tunnel mode: the IPv4 one (index 0) in IPIP from a source
/// prefix, an IPv6 one (index 1, 2001:db8:ffff::10) in GUE to port 6080; node 1 on both
/// families.
fn tunnel_setup() -> (Tables, StaticFib) {
    use lb_common::{
        tunnel::{Tunnel, ENCAP_GUE, ENCAP_IPIP},
        FAMILY_V6, NODE_F_V6,
    };
    let (mut t, mut fib) = setup();
    let w6 = |s: &str| {
        let b = b16(s);
        std::array::from_fn(|i| {
            u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
        })
    };
    t.vips.insert(
        AddrKey {
            addr: w6(VIP6),
            family: FAMILY_V6,
            _pad: [0; 3],
        },
        Vip { index: 1 },
    );
    let mut words = vec![0u64; 1024];
    words[5684 / 64] |= 1 << (5684 % 64);
    t.vip_ports.insert(1, words);
    let n = t.nodes.get_mut(&1).unwrap();
    n.addr6 = w6(NODE1_6);
    n.flags |= NODE_F_V6;
    t.ring = [vec![1], vec![1]];
    t.ring_len = [1, 1];
    t.vip_tunnel.insert(
        0,
        Tunnel {
            src4: w4("10.99.0.0")[0],
            src4_bits: 8,
            encap: ENCAP_IPIP,
            ..Tunnel::default()
        },
    );
    t.vip_tunnel.insert(
        1,
        Tunnel {
            src6: w6("fd99::1"),
            gue_port: 6080u16.to_be(),
            encap: ENCAP_GUE,
            ..Tunnel::default()
        },
    );
    fib.routes.push(Route {
        family: FAMILY_V6,
        prefix: b16("2001:db8:1::"),
        len: 64,
        kind: RouteKind::Unicast,
        dev: FXN,
        via: None,
    });
    fib.neighbours
        .insert((FXN, FAMILY_V6, b16(NODE1_6)), NODE1_MAC);
    (t, fib)
}

fn hash_of(f: &Frame) -> u32 {
    let b = |a: IpAddr| match a {
        IpAddr::V4(x) => x.octets().to_vec(),
        IpAddr::V6(x) => x.octets().to_vec(),
    };
    lb_reference::tunnel::flow_hash(
        &b(f.src),
        &b(f.dst),
        f.sport.to_be_bytes(),
        f.dport.to_be_bytes(),
    )
}

#[test]
fn tunnel_vips_encapsulate_as_etherparse_builds_it_and_drop_what_they_cannot_send() {
    use lb_lab::packet::{tunnel_frame, Encap};
    let (t, fib) = tunnel_setup();
    // IPIP over IPv4, the outer source's last byte from the flow hash.
    let c = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT4),
        40000,
        ip(VIP4),
        5684,
        &cid(1),
    );
    let mut inner = c.clone();
    inner.ttl -= 1;
    let h = hash_of(&c);
    let src = std::net::Ipv4Addr::new(10, 99, 0, h as u8);
    let want = tunnel_frame(
        FXN_MAC,
        NODE1_MAC,
        IpAddr::V4(src),
        ip(NODE1_4),
        h,
        Encap::Ipip,
        &inner,
    );
    let out = classify(&c.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!((out.action, &out.frame), (XDP_REDIRECT, &want));
    assert_eq!(out.delta(Counter::TunnelEncapIpip), 1);
    assert_eq!(out.delta(Counter::FwdRedirect), 1);

    // GUE over IPv6: flow label, source port and the UDP checksum (etherparse sums the
    // whole inner packet; the reference never reads the payload).
    let c6 = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT6),
        40001,
        ip(VIP6),
        5684,
        &cid(1),
    );
    let mut inner6 = c6.clone();
    inner6.ttl -= 1;
    let h6 = hash_of(&c6);
    let gue = Encap::Gue {
        sport: 0xc000 | (h6 & 0x3fff) as u16,
        dport: 6080,
    };
    let want6 = tunnel_frame(
        FXN_MAC,
        NODE1_MAC,
        ip("fd99::1"),
        ip(NODE1_6),
        h6,
        gue,
        &inner6,
    );
    let out = classify(&c6.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!((out.action, &out.frame), (XDP_REDIRECT, &want6));
    assert_eq!(out.delta(Counter::TunnelEncapGue), 1);

    // Too big once encapsulated (1481 + 20 > 1500): answered from the VIP with fragmentation
    // needed, MTU 1480, quoting 548 bytes (576 in all), where NAT would pass it.
    let mut big = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT4),
        40000,
        ip(VIP4),
        5684,
        &cid_record(&[1, 1, 2, 3, 4, 5], &vec![7; 1481 - 28 - 19]),
    );
    let out = classify(&big.bytes(), FXC, &t, &mut State::default(), &fib);
    let answer = lb_lab::packet::icmp_error(
        FXC_MAC,
        CLIENT_MAC,
        ip(VIP4),
        ip(CLIENT4),
        64,
        lb_lab::packet::IcmpError::TooBig { mtu: 1480 },
        &big.bytes()[14..14 + 548],
    );
    assert_eq!((out.action, &out.frame), (lb_reference::XDP_TX, &answer));
    assert_eq!(out.delta(Counter::IcmpTooBigSent), 1);
    // Without DF: dropped unanswered.
    big.dont_fragment = false;
    let out = classify(&big.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!(
        (out.action, out.delta(Counter::DropTunnelTooBig)),
        (XDP_DROP, 1)
    );
    let fits = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        ip(CLIENT4),
        40000,
        ip(VIP4),
        5684,
        &cid_record(&[1, 1, 2, 3, 4, 5], &vec![7; 1480 - 28 - 19]),
    );
    let out = classify(&fits.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!(out.delta(Counter::TunnelEncapIpip), 1);
    // TTL 1: to the kernel, unencapsulated.
    let mut ttl1 = c.clone();
    ttl1.ttl = 1;
    let out = classify(&ttl1.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &ttl1.bytes()));
    assert_eq!(out.delta(Counter::FwdKernelTtl), 1);
    // A VLAN tag: dropped.
    let mut tagged = c.clone();
    tagged.vlans = vec![(0x8100, 7)];
    let out = classify(&tagged.bytes(), FXC, &t, &mut State::default(), &fib);
    assert_eq!(
        (out.action, out.delta(Counter::DropTunnelVlan)),
        (XDP_DROP, 1)
    );
}
