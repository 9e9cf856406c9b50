//! The reference classifier on any frame: no panic, and what any datapath must satisfy: the
//! frame keeps its length, a dropped or passed-untouched frame is unchanged, packets_seen is
//! bumped once, and a forwarded frame names how it left.
#![no_main]

use lb_common::{
    AddrKey, Counter, DpConfig, Node, NodeAddr, Reverse, ReverseKey, Vip, FAMILY_V4, FAMILY_V6,
    MAGLEV_ENTRIES, NODE_F_V4, NODE_F_V6, POLICY_MAGLEV,
};
use lb_reference::{
    fib::{Link, Route, RouteKind, StaticFib},
    State, Tables, XDP_DROP, XDP_REDIRECT, XDP_TX,
};
use libfuzzer_sys::fuzz_target;

fn w4(a: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(a), 0, 0, 0]
}

fn w6(a: [u8; 16]) -> [u32; 4] {
    let mut w = [0; 4];
    for i in 0..4 {
        w[i] = u32::from_ne_bytes(a[4 * i..4 * i + 4].try_into().unwrap());
    }
    w
}

fn v6(last: u8, third: u8) -> [u8; 16] {
    [0x20, 1, 0xd, 0xb8, 0, third, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]
}

/// Two nodes behind interface 2, a client side on interface 1, VIPs on port 5684.
fn setup(cfg_byte: u8) -> (Tables, StaticFib) {
    let mut t = Tables {
        config: Some(DpConfig {
            cid_len: 4 + u32::from(cfg_byte & 3),
            node_id_offset: u32::from(cfg_byte >> 2 & 1),
            node_id_len: 1 + u32::from(cfg_byte >> 3 & 1) * 2,
            unknown_node_flow: u32::from(cfg_byte >> 4 & 1),
            shadow: u32::from(cfg_byte >> 5 & 1),
            policy: u32::from(cfg_byte >> 6 & 1) * POLICY_MAGLEV,
            ..DpConfig::DEFAULT
        }),
        ..Default::default()
    };
    let vip4 = w4([192, 0, 2, 10]);
    let vip6 = w6(v6(0x10, 0xff));
    for (i, (addr, family)) in [(vip4, FAMILY_V4), (vip6, FAMILY_V6)].into_iter().enumerate() {
        let key = AddrKey { addr, family, _pad: [0; 3] };
        t.vips.insert(key, Vip { index: i as u32 });
        let mut words = vec![0u64; 1024];
        words[5684 / 64] |= 1 << (5684 % 64);
        t.vip_ports.insert(i as u32, words);
    }
    for (slot, id) in [1u32, 2].into_iter().enumerate() {
        let n4 = w4([203, 0, 113, 10 + id as u8]);
        let n6 = w6(v6(0x10 + id as u8, 1));
        t.nodes.insert(
            id,
            Node {
                addr6: n6[..].try_into().unwrap(),
                addr4: n4[0],
                port: 0,
                flags: NODE_F_V4 | NODE_F_V6,
                slot: slot as u32,
                _pad: 0,
            },
        );
        for (addr, family, vip) in [(n4, FAMILY_V4, vip4), (n6, FAMILY_V6, vip6)] {
            t.node_addrs.insert(AddrKey { addr, family, _pad: [0; 3] }, NodeAddr { slot: slot as u32 });
            t.reverse.insert(
                ReverseKey { addr, port: 5684u16.to_be(), family, _pad: 0 },
                Reverse { vip, vip_port: 5684u16.to_be(), _pad: 0, node_slot: slot as u32 },
            );
        }
    }
    t.ring = [vec![1, 2], vec![2, 1]];
    t.ring_len = [2, 2];
    // Maglev: IPv4's half 0 and IPv6's half 1 active, slots alternating between nodes 1 and 2.
    t.maglev = (0..MAGLEV_ENTRIES).map(|i| 1 + i % 2).collect();
    t.maglev_ctl = [1, 2];
    t.devmap.extend([1, 2]);
    let mut fib = StaticFib::default();
    for (ifindex, mac) in [(1u32, [2, 0xcc, 0, 0, 0, 1]), (2, [2, 0xcc, 0, 0, 0, 2])] {
        fib.links.insert(ifindex, Link { mac, mtu: 1500, forward4: true, forward6: ifindex == 2 });
    }
    let mut p4 = [0u8; 16];
    p4[..4].copy_from_slice(&[203, 0, 113, 0]);
    fib.routes.push(Route { family: FAMILY_V4, prefix: p4, len: 24, kind: RouteKind::Unicast, dev: 2, via: None });
    p4[..4].copy_from_slice(&[198, 51, 100, 0]);
    fib.routes.push(Route { family: FAMILY_V4, prefix: p4, len: 24, kind: RouteKind::Unicast, dev: 1, via: None });
    fib.routes.push(Route { family: FAMILY_V6, prefix: v6(0, 1), len: 64, kind: RouteKind::Unicast, dev: 2, via: None });
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[203, 0, 113, 11]);
    fib.neighbours.insert((2, FAMILY_V4, a), [2, 0, 0, 0, 0, 0x11]);
    fib.neighbours.insert((2, FAMILY_V6, v6(0x11, 1)), [2, 0, 0, 0, 0, 0x11]);
    (t, fib)
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, frame)) = data.split_first() else {
        return;
    };
    let (t, fib) = setup(head);
    let ingress = 1 + u32::from(head >> 7);
    let mut state = State::default();
    // Twice: the second run meets the flow and next-hop state the first one left.
    for _ in 0..2 {
        let out = lb_reference::classify(frame, ingress, &t, &mut state, &fib);
        assert_eq!(out.frame.len(), frame.len(), "the frame keeps its length");
        assert_eq!(out.delta(Counter::PacketsSeen), 1);
        if out.action == XDP_DROP {
            assert_eq!(out.frame, frame, "a dropped frame is not written");
        }
        match out.action {
            XDP_TX => assert_eq!(out.delta(Counter::FwdTx), 1),
            XDP_REDIRECT => assert_eq!(out.delta(Counter::FwdRedirect), 1),
            _ => {}
        }
    }
});
