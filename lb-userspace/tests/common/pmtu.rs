//! Path MTU as a node's kernel knows it, and ICMP errors from the client towards a VIP, for
//! the path MTU tests of both forwarding modes (the routed lab).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_lab::{
    packet::{icmp_error, Frame, IcmpError},
    routed::Routed,
    NetNs,
};

/// The path MTU `node`'s kernel has for `client` (`ip route get`'s `mtu`), if it has one.
pub fn node_pmtu(node: &NetNs, client: IpAddr) -> Option<u32> {
    let fam = if client.is_ipv4() { "-4" } else { "-6" };
    let out = node
        .must(&["ip", fam, "route", "get", &client.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

/// Every node forgets the path MTUs it learned.
pub fn forget_pmtu(r: &Routed) {
    for n in &r.lab.nodes {
        n.must(&["ip", "route", "flush", "cache"])
            .and_then(|_| n.must(&["ip", "-6", "route", "flush", "cache"]))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The client says "fragmentation needed" (IPv4) or "packet too big" (IPv6), next-hop MTU
/// `mtu`, about a `vip`:`port` → `client`:`client_port` reply it never got, quoting as much
/// of it as an IPv4 router keeps (576 bytes in all); sent out of its `c0` to the router.
pub fn send_too_big(
    r: &Routed,
    vip: IpAddr,
    port: u16,
    client: IpAddr,
    client_port: u16,
    mtu: u16,
) {
    let client_mac = r.lab.client.mac("c0").unwrap_or_else(|e| panic!("{e}"));
    let router_mac = r.router.mac("rc").unwrap_or_else(|e| panic!("{e}"));
    let reply = Frame::udp(
        router_mac,
        client_mac,
        vip,
        port,
        client,
        client_port,
        &[0x17; 1400],
    );
    let quote = &reply.bytes()[14..][..576 - 28];
    let error = icmp_error(
        client_mac,
        router_mac,
        client,
        vip,
        64,
        IcmpError::TooBig { mtu },
        quote,
    );
    lb_lab::sniff::send(&r.lab.client, "c0", &[error]);
}

/// Each node's path MTU for `client` once every node has `want`, or after 3 s.
pub fn await_pmtu(r: &Routed, client: IpAddr, want: u32) -> Vec<Option<u32>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got: Vec<_> = r.lab.nodes.iter().map(|n| node_pmtu(n, client)).collect();
        if got.iter().all(|m| *m == Some(want)) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
