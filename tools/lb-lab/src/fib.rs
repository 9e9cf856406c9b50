//! A single namespace whose routes and neighbours make `bpf_fib_lookup` deterministic, for
//! BPF_PROG_TEST_RUN (fixtures, bench, explain): two attached veths with fixed MACs (client side
//! `fxc`, node side `fxn`), one that cidlb is not attached to (`fxo`), permanent neighbours.

use crate::{packet::Mac, NetNs};

// Balancer interfaces (in the test netns) and their MACs.
pub const FXC_MAC: Mac = [0x02, 0xcc, 0, 0, 0, 0x01]; // client side
pub const FXN_MAC: Mac = [0x02, 0xcc, 0, 0, 0, 0x02]; // node side
pub const FXO_MAC: Mac = [0x02, 0xcc, 0, 0, 0, 0x03]; // not attached
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x07];
pub const NODE1_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
pub const NODE2_MAC: Mac = [0x02, 0, 0, 0, 0, 0x12];
pub const ONEARM_MAC: Mac = [0x02, 0, 0, 0, 0, 0x50];

pub const VIP4: &str = "192.0.2.10";
pub const VIP6: &str = "2001:db8:ffff::10";
pub const CLIENT4: &str = "198.51.100.7";
pub const CLIENT6: &str = "2001:db8:c::7";
pub const NODE1_4: &str = "203.0.113.11";
pub const NODE2_4: &str = "203.0.113.12";
pub const NODE1_6: &str = "2001:db8:1::11";
pub const NODE2_6: &str = "2001:db8:1::12";

/// Builds the namespace the FIB lookups run against.
pub fn netns(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    for (dev, peer, mac) in [
        ("fxc", "fxcp", FXC_MAC),
        ("fxn", "fxnp", FXN_MAC),
        ("fxo", "fxop", FXO_MAC),
    ] {
        ns.ip(&format!("link add {dev} type veth peer name {peer}"))
            .unwrap();
        ns.ip(&format!("link set {dev} address {}", mac_str(mac)))
            .unwrap();
        ns.ip(&format!("link set {dev} up")).unwrap();
        ns.ip(&format!("link set {peer} up")).unwrap();
    }
    ns.ip("addr add 198.51.100.1/24 dev fxc").unwrap();
    ns.ip("addr add 2001:db8:c::1/64 dev fxc nodad").unwrap();
    ns.ip("addr add 203.0.113.1/24 dev fxn").unwrap();
    ns.ip("addr add 2001:db8:1::1/64 dev fxn nodad").unwrap();
    ns.ip("addr add 100.64.0.1/24 dev fxo").unwrap();
    for (addr, mac, dev) in [
        (CLIENT4, CLIENT_MAC, "fxc"),
        (CLIENT6, CLIENT_MAC, "fxc"),
        ("198.51.100.50", ONEARM_MAC, "fxc"),
        (NODE1_4, NODE1_MAC, "fxn"),
        (NODE2_4, NODE2_MAC, "fxn"),
        (NODE1_6, NODE1_MAC, "fxn"),
        (NODE2_6, NODE2_MAC, "fxn"),
        ("100.64.0.9", [2, 0, 0, 0, 0, 9], "fxo"),
    ] {
        ns.ip(&format!(
            "neigh replace {addr} lladdr {} nud permanent dev {dev}",
            mac_str(mac)
        ))
        .unwrap();
    }
    // 203.0.113.13 (node 3 in some cases) deliberately has no neighbour entry.
    ns.sysctl("net.ipv4.ip_forward=1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding=1").unwrap();
    ns
}

pub fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
