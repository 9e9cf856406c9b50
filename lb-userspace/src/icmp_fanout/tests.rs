//! The copies' bytes, against packets built from scratch with etherparse (`lb_lab::packet`) at
//! the node's addressing: every checksum the rewrite updates incrementally is computed whole
//! there.

use std::net::IpAddr;

use lb_lab::packet::{icmp_error, Frame, IcmpError};

use super::{Copy, Error, Targets};
use crate::config::tests::parse;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A reply datagram `src:sport → dst:dport` as an IP packet.
fn datagram(src: &str, sport: u16, dst: &str, dport: u16, zero_check: bool) -> Vec<u8> {
    let mut f = Frame::udp(MAC, MAC, ip(src), sport, ip(dst), dport, &[0x17; 100]);
    f.zero_udp_checksum = zero_check;
    f.bytes()[14..].to_vec()
}

/// An ICMP error `from → to`, TTL `ttl`, quoting `quote`, as an IP packet.
fn error(from: &str, to: &str, ttl: u8, kind: IcmpError, quote: &[u8]) -> Vec<u8> {
    icmp_error(MAC, MAC, ip(from), ip(to), ttl, kind, quote)[14..].to_vec()
}

/// NAT VIPs (node 1 with a port of its own), then tunnel VIPs (whose nodes serve the VIP's
/// own ports).
const NODES: &str = r#"
nodes:
  - id: 1
    address: [10.0.0.1, "2001:db8:1::1"]
  - id: 2
    address: 10.0.0.2
  - id: 3
    address: 10.0.0.3
    state: disabled
"#;

fn targets(vips: &str, nodes: &str) -> Targets {
    let text = format!("interfaces: [eth0]\nvips:\n{vips}{nodes}");
    Targets::new(&parse(&text).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn every_node_of_the_vip_gets_a_copy_but_disabled_ones() {
    let nat = targets(
        r#"
  - address: 192.0.2.10
    ports: [5684]
  - address: "2001:db8::10"
    ports: [5684, 5685]
"#,
        &NODES.replacen(
            "[10.0.0.1, \"2001:db8:1::1\"]",
            "[10.0.0.1, \"2001:db8:1::1\"]\n    port: 6000",
            1,
        ),
    );
    let copies = |t: &Targets, vip: &str, port| t.of(ip(vip), port).map(<[Copy]>::to_vec);
    let n = |node: &str, port| Copy::Nat {
        node: ip(node),
        port,
    };
    assert_eq!(
        copies(&nat, "192.0.2.10", 5684),
        Some(vec![n("10.0.0.1", 6000), n("10.0.0.2", 5684)])
    );
    // Only node 1 has an IPv6 address.
    assert_eq!(
        copies(&nat, "2001:db8::10", 5685),
        Some(vec![n("2001:db8:1::1", 6000)])
    );
    assert_eq!(copies(&nat, "192.0.2.10", 5685), None);

    let tunnel = targets(
        r#"
  - address: 192.0.2.20
    ports: [7000]
    forwarding: tunnel
    tunnel: {encap: gue, gue_port: 6080, source4: 10.0.0.254}
  - address: 192.0.2.30
    ports: [7001]
    forwarding: tunnel
    tunnel: {encap: ipip, source4: 10.0.0.254}
"#,
        NODES,
    );
    let gue = |node: &str| Copy::Gue {
        node: ip(node),
        port: 6080,
    };
    let ipip = |node: &str| Copy::Ipip { node: ip(node) };
    assert_eq!(
        copies(&tunnel, "192.0.2.20", 7000),
        Some(vec![gue("10.0.0.1"), gue("10.0.0.2")])
    );
    assert_eq!(
        copies(&tunnel, "192.0.2.30", 7001),
        Some(vec![ipip("10.0.0.1"), ipip("10.0.0.2")])
    );
}

/// (VIP, node, router, client, ICMP error, quoted UDP checksum 0) cases, both families.
const NAT_CASES: &[(&str, &str, &str, &str, IcmpError, bool)] = &[
    (
        "192.0.2.10",
        "10.0.0.1",
        "198.51.100.1",
        "203.0.113.7",
        IcmpError::TooBig { mtu: 1280 },
        false,
    ),
    (
        "192.0.2.10",
        "10.0.0.1",
        "198.51.100.1",
        "203.0.113.7",
        IcmpError::TooBig { mtu: 1280 },
        true,
    ),
    (
        "192.0.2.10",
        "10.0.0.1",
        "198.51.100.1",
        "203.0.113.7",
        IcmpError::PortUnreachable,
        false,
    ),
    (
        "2001:db8::10",
        "2001:db8:1::1",
        "2001:db8:ff::1",
        "2001:db8:c::7",
        IcmpError::TooBig { mtu: 1280 },
        false,
    ),
    (
        "2001:db8::10",
        "2001:db8:1::1",
        "2001:db8:ff::1",
        "2001:db8:c::7",
        IcmpError::PortUnreachable,
        false,
    ),
];

#[test]
fn a_nat_copy_is_the_error_the_node_would_have_got() {
    for &(vip, node, router, client, kind, zero_check) in NAT_CASES {
        let got = error(
            router,
            vip,
            64,
            kind,
            &datagram(vip, 5684, client, 40000, zero_check),
        );
        let e = Error::parse(&got).expect("an error about a VIP's reply");
        assert_eq!((e.vip, e.port), (ip(vip), 5684));
        assert_eq!(e.client, (ip(client), 40000));
        let want = error(
            router,
            node,
            63,
            kind,
            &datagram(node, 6000, client, 40000, zero_check),
        );
        let copy = Copy::Nat {
            node: ip(node),
            port: 6000,
        };
        assert_eq!(e.copy_for(copy), Some(want), "{vip} {kind:?}");
    }
}

#[test]
fn a_tunnel_copy_is_the_error_as_it_came_and_a_spent_ttl_is_not_sent() {
    let quote = datagram("192.0.2.20", 7000, "203.0.113.7", 40000, false);
    let got = error(
        "198.51.100.1",
        "192.0.2.20",
        1,
        IcmpError::PortUnreachable,
        &quote,
    );
    // Ethernet padding after the IP packet is not part of it.
    let mut padded = got.clone();
    padded.extend_from_slice(&[0; 30]);
    let e = Error::parse(&padded).unwrap();
    let node = ip("10.0.0.1");
    assert_eq!(e.copy_for(Copy::Ipip { node }), Some(got.clone()));
    assert_eq!(e.copy_for(Copy::Gue { node, port: 6080 }), Some(got));
    assert_eq!(e.copy_for(Copy::Nat { node, port: 7000 }), None);
}

#[test]
fn only_errors_about_a_udp_datagram_from_the_vip_are_taken() {
    let reply = datagram("192.0.2.10", 5684, "203.0.113.7", 40000, false);
    let kind = IcmpError::TooBig { mtu: 1280 };
    let good = error("198.51.100.1", "192.0.2.10", 64, kind, &reply);
    assert!(Error::parse(&good).is_some());
    // The quote's source is not the error's destination.
    let other = datagram("192.0.2.11", 5684, "203.0.113.7", 40000, false);
    assert_eq!(
        Error::parse(&error("198.51.100.1", "192.0.2.10", 64, kind, &other)),
        None
    );
    // An error about an ICMP message (the quote's protocol is not UDP).
    let mut about_icmp = reply.clone();
    about_icmp[9] = 1;
    assert_eq!(
        Error::parse(&error("198.51.100.1", "192.0.2.10", 64, kind, &about_icmp)),
        None
    );
    // The quote cut inside the UDP header.
    assert_eq!(
        Error::parse(&error("198.51.100.1", "192.0.2.10", 64, kind, &reply[..26])),
        None
    );
    // Not an error: an echo request (type 8).
    let mut echo = good.clone();
    echo[20] = 8;
    assert_eq!(Error::parse(&echo), None);
    // A fragment of an error.
    let mut frag = good.clone();
    frag[6] |= 0x20;
    assert_eq!(Error::parse(&frag), None);
    assert_eq!(Error::parse(&[]), None);
    assert_eq!(Error::parse(&good[..30]), None);
}
