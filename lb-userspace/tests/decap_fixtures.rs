//! BPF_PROG_TEST_RUN fixtures for the node side of tunnel mode (lb-ebpf/src/decap.rs): what it
//! strips (IPIP and GUE, both families, GUE carrying either family), what it passes untouched
//! (traffic not to this node's tunnel addresses or port, VLAN-tagged frames), what it drops
//! (a tunnel packet whose inner packet is not the IP it claims). Input frames are what the
//! balancer's fixtures expect it to send (`lb_lab::packet::tunnel_frame`); outputs are built
//! with etherparse, and every counter is checked.

mod common;

use std::net::IpAddr;

use cidlb::{node::Decap, testrun::run_program};
use lb_common::{
    decap::{DECAP_GUE, DECAP_IPIP, DECAP_NAMES, DROP_MALFORMED, PASS_NOT_TUNNEL, PROGRAM},
    xdp::{XDP_DROP, XDP_PASS},
};
use lb_lab::packet::{tunnel_frame, Encap, Frame};

const BALANCER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];
const NODE_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 1];
const NODE4: &str = "203.0.113.11";
const NODE6: &str = "2001:db8:1::11";
const GUE_PORT: u16 = 6080;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The client's packet as the balancer forwarded it (TTL already decremented there).
fn inner(v6: bool) -> Frame {
    let (src, vip) = if v6 {
        ("2001:db8:c::7", "2001:db8:ffff::10")
    } else {
        ("198.51.100.7", "192.0.2.10")
    };
    Frame::udp(
        [0; 6],
        [0; 6],
        ip(src),
        40000,
        ip(vip),
        5684,
        b"\x19\xfe\xfd\x00\x01\x00\x00\x00\x00\x00\x07\x01\xa1\xa2\xa3\xa4\xa5\x00\x04data",
    )
}

/// What the balancer sends node 1: `inner` in `encap` from `outer_src` to `to`.
fn tunnelled(outer_src: &str, to: &str, encap: Encap, inner: &Frame) -> Vec<u8> {
    tunnel_frame(
        BALANCER_MAC,
        NODE_MAC,
        ip(outer_src),
        ip(to),
        0x12345,
        encap,
        inner,
    )
}

/// What the node's stack gets: the inner packet behind the outer frame's MACs.
fn decapsulated(inner: &Frame) -> Vec<u8> {
    let mut f = inner.clone();
    f.src_mac = BALANCER_MAC;
    f.dst_mac = NODE_MAC;
    f.bytes()
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    /// `None`: unchanged.
    output: Option<Vec<u8>>,
    slot: u32,
}

#[test]
fn decapsulation() {
    common::require_root();
    let gue = Encap::Gue {
        sport: 0xc123,
        dport: GUE_PORT,
    };
    let (i4, i6) = (inner(false), inner(true));
    let mut not_ip = i4.clone();
    // A frame whose "inner packet" starts with version 5.
    not_ip.payload = vec![0; 8];
    let mut not_ip_bytes = tunnelled("10.99.0.1", NODE4, gue, &i4);
    not_ip_bytes[14 + 20 + 8] = 0x50;
    let mut tagged = i4.clone();
    tagged.vlans = vec![(0x8100, 7)];
    let cases = vec![
        Case {
            name: "ipip IPv4",
            input: tunnelled("10.99.0.1", NODE4, Encap::Ipip, &i4),
            action: XDP_PASS,
            output: Some(decapsulated(&i4)),
            slot: DECAP_IPIP,
        },
        Case {
            name: "ipip IPv6",
            input: tunnelled("fd99::1", NODE6, Encap::Ipip, &i6),
            action: XDP_PASS,
            output: Some(decapsulated(&i6)),
            slot: DECAP_IPIP,
        },
        Case {
            name: "gue over IPv4",
            input: tunnelled("10.99.0.1", NODE4, gue, &i4),
            action: XDP_PASS,
            output: Some(decapsulated(&i4)),
            slot: DECAP_GUE,
        },
        Case {
            name: "gue over IPv6",
            input: tunnelled("fd99::1", NODE6, gue, &i6),
            action: XDP_PASS,
            output: Some(decapsulated(&i6)),
            slot: DECAP_GUE,
        },
        Case {
            name: "gue over IPv4 carrying IPv6",
            input: tunnelled("10.99.0.1", NODE4, gue, &i6),
            action: XDP_PASS,
            output: Some(decapsulated(&i6)),
            slot: DECAP_GUE,
        },
        Case {
            name: "ipip to another address: not this node's tunnel",
            input: tunnelled("10.99.0.1", "203.0.113.99", Encap::Ipip, &i4),
            action: XDP_PASS,
            output: None,
            slot: PASS_NOT_TUNNEL,
        },
        Case {
            name: "UDP to another port: the node's own traffic",
            input: tunnelled(
                "10.99.0.1",
                NODE4,
                Encap::Gue {
                    sport: 0xc123,
                    dport: 5684,
                },
                &i4,
            ),
            action: XDP_PASS,
            output: None,
            slot: PASS_NOT_TUNNEL,
        },
        Case {
            name: "a client's packet to the node itself",
            input: i4.bytes(),
            action: XDP_PASS,
            output: None,
            slot: PASS_NOT_TUNNEL,
        },
        Case {
            name: "VLAN-tagged",
            input: tagged.bytes(),
            action: XDP_PASS,
            output: None,
            slot: PASS_NOT_TUNNEL,
        },
        Case {
            name: "ipip IPv4 carrying IPv6: malformed",
            input: tunnelled("10.99.0.1", NODE4, Encap::Ipip, &i6),
            action: XDP_DROP,
            output: None,
            slot: DROP_MALFORMED,
        },
        Case {
            name: "gue whose payload is not IP: malformed",
            input: not_ip_bytes,
            action: XDP_DROP,
            output: None,
            slot: DROP_MALFORMED,
        },
    ];
    let mut failed = Vec::new();
    for c in &cases {
        // A fresh program per case: its counters say what this frame did.
        let d = Decap::load(&[ip(NODE4), ip(NODE6)], Some(GUE_PORT))
            .unwrap_or_else(|e| panic!("loading the decapsulation program: {e}"));
        let r = run_program(&d.ebpf, PROGRAM, &c.input, 1, 1).unwrap();
        let want_out = c.output.clone().unwrap_or_else(|| c.input.clone());
        let counters = d.counters().unwrap();
        let mut want_counters = [0u64; 4];
        want_counters[c.slot as usize] = 1;
        if r.action != c.action {
            failed.push(format!("{}: action {} want {}", c.name, r.action, c.action));
        } else if r.output != want_out {
            failed.push(format!(
                "{}: output differs\n  got  {}\n  want {}",
                c.name,
                lb_lab::hex(&r.output),
                lb_lab::hex(&want_out)
            ));
        } else if counters != want_counters {
            failed.push(format!(
                "{}: counters {counters:?} want {want_counters:?} ({DECAP_NAMES:?})",
                c.name
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}
