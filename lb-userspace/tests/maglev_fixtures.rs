//! BPF_PROG_TEST_RUN fixtures for `flows.policy: maglev` (issue #9): the real XDP program,
//! loaded into the kernel and provisioned by the agent's own map code, picks the node of each
//! new flow. The node a frame went to is read from the output frame (parsed with etherparse,
//! not by the datapath), and compared with what the Maglev table built in userspace says.
//!
//! - Two independently loaded programs (separate maps, nothing shared) with the same config,
//!   its nodes listed in different orders, send every new flow to the same node.
//! - With a node held down by health checks, that node's flows go to their deterministic
//!   second choice (`maglev::step_past_down`) and every other flow keeps its node.
//! - Weights are honoured: each node gets flows in proportion to its weight.
//! - The flow table still pins established flows across a table change.

mod common;

use std::{collections::BTreeMap, net::IpAddr};

use cidlb::{config::Config, datapath::Datapath, plan::maglev};
use etherparse::{NetSlice, SlicedPacket};
use lb_common::{addr_words, hash::flow_hash, port_wire, FlowKey, MAGLEV_SIZE};
use lb_lab::{
    fib::*,
    packet::{handshake_record, Frame},
    pin_to_cpu, NetNs,
};

use lb_common::xdp::{XDP_DROP, XDP_REDIRECT, XDP_TX};

/// Four dual-stack nodes, weights 1, 2, 1, 3. Nodes 3 and 4 get neighbour entries in the test's
/// own namespace (the shared FIB netns has only nodes 1 and 2).
const NODES: [(u32, &str, &str, u32); 4] = [
    (1, NODE1_4, NODE1_6, 1),
    (2, NODE2_4, NODE2_6, 2),
    (3, "203.0.113.13", "2001:db8:1::13", 1),
    (4, "203.0.113.14", "2001:db8:1::14", 3),
];

/// The config with the nodes listed in `order` (indices into [`NODES`]).
fn config(order: &[usize]) -> Config {
    let mut s = String::from(
        "interfaces: [fxc, fxn]\nvips:\n  - address: 192.0.2.10\n    ports: [5684]\n  - address: \"2001:db8:ffff::10\"\n    ports: [5684]\nflows: {policy: maglev, idle_timeout: 30s, capacity: 4096}\nnodes:\n",
    );
    for &i in order {
        let (id, a4, a6, w) = NODES[i];
        s.push_str(&format!(
            "  - {{id: {id}, address: [{a4}, \"{a6}\"], weight: {w}}}\n"
        ));
    }
    Config::parse(&s, std::path::Path::new("maglev-fixture.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

/// A loaded, provisioned program with maps of its own.
fn load(cfg: &Config, up: &dyn Fn(u32) -> bool) -> Datapath {
    Datapath::private_with(cfg, up).unwrap_or_else(|e| panic!("load: {e}"))
}

/// The test's new flows: client port `sport` to the VIP of the family, a DTLS handshake record
/// (routed by flow).
fn flow(v6: bool, sport: u16) -> Frame {
    let (src, dst) = if v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
    Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        src.parse().unwrap(),
        sport,
        dst.parse().unwrap(),
        5684,
        &handshake_record(b"client hello"),
    )
}

/// The flow's key as the datapath forms it (wire bytes).
fn key(f: &Frame) -> FlowKey {
    let (src, family) = addr_words(f.src);
    FlowKey {
        src,
        dst: addr_words(f.dst).0,
        sport: port_wire(f.sport),
        dport: port_wire(f.dport),
        family,
        _pad: [0; 3],
    }
}

/// The node id the program sent `f` to, from the output frame's destination address.
fn picked(dp: &Datapath, fxc: u32, f: &Frame) -> u32 {
    let r = dp.run_packet(&f.bytes(), fxc, 1).expect("test_run");
    assert!(
        r.action == XDP_TX || r.action == XDP_REDIRECT,
        "flow from port {}: action {}, want forwarded",
        f.sport,
        r.action
    );
    let p = SlicedPacket::from_ethernet(&r.output).expect("output parses");
    let dst: IpAddr = match p.net.expect("IP") {
        NetSlice::Ipv4(ip) => ip.header().destination_addr().into(),
        NetSlice::Ipv6(ip) => ip.header().destination_addr().into(),
    };
    NODES
        .iter()
        .find(|n| n.1.parse::<IpAddr>().unwrap() == dst || n.2.parse::<IpAddr>().unwrap() == dst)
        .unwrap_or_else(|| panic!("output to {dst}, not a node"))
        .0
}

/// The userspace table for the family, all nodes up but those `down`.
fn expected_table(down: &[u32]) -> Vec<u32> {
    let nodes: Vec<(u32, u32)> = NODES.iter().map(|n| (n.0, n.3)).collect();
    maglev::family_table(&nodes, &|id| !down.contains(&id)).expect("table")
}

const FLOWS_PER_FAMILY: u16 = 700;

#[test]
fn maglev_picks_agree_across_programs_and_health_steps_to_the_second_choice() {
    common::require_root();
    let ns: NetNs = lb_lab::fib::netns("mg");
    for (addr, mac) in [
        ("203.0.113.13", [2, 0, 0, 0, 0, 0x13]),
        ("203.0.113.14", [2, 0, 0, 0, 0, 0x14]),
        ("2001:db8:1::13", [2, 0, 0, 0, 0, 0x13]),
        ("2001:db8:1::14", [2, 0, 0, 0, 0, 0x14]),
    ] {
        ns.ip(&format!(
            "neigh replace {addr} lladdr {} nud permanent dev fxn",
            mac_str(mac)
        ))
        .unwrap();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            pin_to_cpu(0);
            check(&ns);
        })
        .join()
        .expect("maglev fixture failed (see the panic above)")
    });
}

fn check(_ns: &NetNs) {
    let fxc = cidlb::datapath::resolve_interfaces(&["fxc".to_owned()]).unwrap()[0];
    let all_up = |_: u32| true;
    let a = load(&config(&[0, 1, 2, 3]), &all_up);
    let b = load(&config(&[3, 1, 0, 2]), &all_up);
    let table = expected_table(&[]);
    let stepped = expected_table(&[3]);
    assert_eq!(table.len(), MAGLEV_SIZE as usize);

    let flows: Vec<Frame> = [false, true]
        .into_iter()
        .flat_map(|v6| (0..FLOWS_PER_FAMILY).map(move |i| flow(v6, 30000 + i)))
        .collect();
    let mut per_node: BTreeMap<u32, u64> = BTreeMap::new();
    let mut on_3 = 0;
    for f in &flows {
        let slot = (flow_hash(&key(f)) % MAGLEV_SIZE) as usize;
        let (pa, pb) = (picked(&a, fxc, f), picked(&b, fxc, f));
        assert_eq!(
            pa, pb,
            "port {} ({}): two programs with the same config disagree",
            f.sport, f.src
        );
        assert_eq!(
            pa, table[slot],
            "port {} ({}): the program's pick is not the table's slot {slot}",
            f.sport, f.src
        );
        *per_node.entry(pa).or_default() += 1;
        on_3 += u64::from(pa == 3);
    }
    // Weights 1:2:1:3 of 1400 flows: 200, 400, 200, 600 expected; binomial spread is ~±20,
    // the hash is fixed, so these bounds are deterministic and loose only against noise.
    for (id, want) in [(1, 200.0), (2, 400.0), (3, 200.0), (4, 600.0)] {
        let got = per_node.get(&id).copied().unwrap_or(0) as f64;
        assert!(
            (got - want).abs() < want * 0.2,
            "node {id} got {got} of {} flows, want about {want} (weights 1:2:1:3): {per_node:?}",
            flows.len()
        );
    }
    assert!(on_3 >= 100, "too few flows on node 3 to test its step");

    // A third program, node 3 held down by its health checks: node 3's flows go to their
    // second choice, every other flow stays.
    let c = load(&config(&[2, 0, 3, 1]), &|id| id != 3);
    let mut moved = 0;
    for f in &flows {
        let slot = (flow_hash(&key(f)) % MAGLEV_SIZE) as usize;
        let pc = picked(&c, fxc, f);
        if table[slot] == 3 {
            assert_ne!(pc, 3, "port {}: a down node took a new flow", f.sport);
            assert_eq!(
                pc, stepped[slot],
                "port {}: not the deterministic second choice",
                f.sport
            );
            moved += 1;
        } else {
            assert_eq!(
                pc, table[slot],
                "port {} ({}): a flow of a healthy node moved on a health change",
                f.sport, f.src
            );
        }
    }
    assert_eq!(moved, on_3);

    // Program a pinned every flow: with node 3 now down there too, established flows keep
    // their node (the flow table pins them), and a new flow of node 3's takes the second choice.
    let mut a = a;
    // What a health change costs the agent: both families' tables built and written.
    let t = std::time::Instant::now();
    a.reprovision(&config(&[0, 1, 2, 3]), &|id| id != 3)
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "provision with the Maglev tables (2 x 65537 slots): {:?}",
        t.elapsed()
    );
    for f in &flows {
        let slot = (flow_hash(&key(f)) % MAGLEV_SIZE) as usize;
        assert_eq!(
            picked(&a, fxc, f),
            table[slot],
            "port {}: an established flow moved on a table change",
            f.sport
        );
    }
    let fresh = (0..2000u16)
        .map(|i| flow(false, 50000 + i))
        .find(|f| table[(flow_hash(&key(f)) % MAGLEV_SIZE) as usize] == 3)
        .expect("some new flow hashes to node 3");
    let slot = (flow_hash(&key(&fresh)) % MAGLEV_SIZE) as usize;
    assert_eq!(picked(&a, fxc, &fresh), stepped[slot]);

    // Panic mode: with every node down, health is ignored for new flows (the default
    // health.panic_threshold), so each flow goes where the all-up table sends it; with
    // panic_threshold 0 the same flows are dropped (drop_no_node).
    let none_up = |_: u32| false;
    let panicking = load(&config(&[0, 1, 2, 3]), &none_up);
    let mut strict = config(&[0, 1, 2, 3]);
    strict.health.panic_threshold = Some(0);
    let strict = load(&strict, &none_up);
    for f in flows.iter().take(50) {
        let slot = (flow_hash(&key(f)) % MAGLEV_SIZE) as usize;
        assert_eq!(
            picked(&panicking, fxc, f),
            table[slot],
            "port {}: in panic mode a new flow takes the all-up table's node",
            f.sport
        );
        let r = strict.run_packet(&f.bytes(), fxc, 1).expect("test_run");
        assert_eq!(
            r.action, XDP_DROP,
            "port {}: no panic, no node: dropped",
            f.sport
        );
    }
}
