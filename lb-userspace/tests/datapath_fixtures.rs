//! BPF_PROG_TEST_RUN fixtures: the real XDP program, loaded into the kernel and provisioned by
//! the agent's own map code, runs table-driven input frames. Each case asserts the action, the
//! exact output bytes (expected frames are built with etherparse, checksums from scratch) and
//! the exact counters.
//!
//! The program's bpf_fib_lookup needs routes and neighbours: the test builds them in a netns of
//! its own (interfaces with fixed MACs, permanent neighbour entries) and runs the program from
//! a thread inside it, so the output MACs are deterministic.

mod common;
#[path = "fixtures/limits.rs"]
mod limits;

use std::net::IpAddr;

use cidlb::{config::Config, datapath::Datapath, plan, stats::Snapshot};
use lb_common::Counter::{self, *};
use lb_lab::{
    fib::*,
    packet::{assert_checksums, cid_record, handshake_record, unified_record, Frame, Mac},
    pin_to_cpu, NetNs,
};

use lb_common::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

const BASE: &str = r#"
interfaces: [fxc, fxn]
vips:
  - address: 192.0.2.10
    ports: [5684, "20000-20100"]
  - address: "2001:db8:ffff::10"
    ports: [5684]
dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop}
flows: {policy: round_robin, idle_timeout: 30s, capacity: 1024}
nodes:
  - {id: 1, address: [203.0.113.11, "2001:db8:1::11"]}
  - {id: 2, address: [203.0.113.12, "2001:db8:1::12"]}
"#;

/// One packet through the program.
struct Step {
    /// Wait this long before sending (flow idle expiry).
    pause_ms: u64,
    /// Runs on the loaded object before the packet (e.g. to mark the next-hop cache).
    poke: Option<fn(&mut aya::Ebpf)>,
    ingress: &'static str,
    input: Vec<u8>,
    action: u32,
    /// Expected frame after the program; `None`: unchanged.
    output: Option<Vec<u8>>,
}

struct Case {
    name: String,
    config: String,
    steps: Vec<Step>,
    /// Exact value of every counter that must be non-zero besides packets_seen.
    counters: Vec<(Counter, u64)>,
    /// Exact per-node to_node_packets, by node id (nodes not listed: 0).
    to_nodes: Vec<(u32, u64)>,
    /// Exact per-node from_node_packets (un-NATed replies), by node id (nodes not listed: 0).
    from_nodes: Vec<(u32, u64)>,
    /// Changes to the fixture netns for this case only: (apply, undo), each `ip ARGS` or
    /// `sysctl KEY=VALUE`. Undone after the case, whatever its outcome.
    netns: Vec<(String, String)>,
    /// Load in shadow mode (`cidlb run --shadow`).
    shadow: bool,
}

fn case(name: impl Into<String>, steps: Vec<Step>, counters: &[(Counter, u64)]) -> Case {
    Case {
        name: name.into(),
        config: BASE.to_owned(),
        steps,
        counters: counters.to_vec(),
        to_nodes: Vec::new(),
        from_nodes: Vec::new(),
        netns: Vec::new(),
        shadow: false,
    }
}

impl Case {
    fn config(mut self, from: &str, to: &str) -> Self {
        assert!(
            self.config.contains(from),
            "{}: {from:?} not in config",
            self.name
        );
        self.config = self.config.replacen(from, to, 1);
        self
    }
    fn shadow(mut self) -> Self {
        self.shadow = true;
        self
    }
    fn nodes(mut self, n: &[(u32, u64)]) -> Self {
        self.to_nodes = n.to_vec();
        self
    }
    fn replies(mut self, n: &[(u32, u64)]) -> Self {
        self.from_nodes = n.to_vec();
        self
    }
    fn netns(mut self, apply: &str, undo: &str) -> Self {
        self.netns.push((apply.to_owned(), undo.to_owned()));
        self
    }
}

/// From the client to a VIP port, as it arrives on fxc.
fn client(vip: &str, dport: u16, payload: &[u8]) -> Frame {
    let src = if lb_lab::ip(vip).is_ipv4() {
        CLIENT4
    } else {
        CLIENT6
    };
    Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        lb_lab::ip(src),
        40000,
        lb_lab::ip(vip),
        dport,
        payload,
    )
}

/// The frame as forwarded to a node out of fxn: new destination, TTL - 1, MACs from the FIB.
fn to_node(f: &Frame, node: &str, mac: Mac) -> Frame {
    let mut g = f.clone();
    g.dst = lb_lab::ip(node);
    g.ttl -= 1;
    g.src_mac = FXN_MAC;
    g.dst_mac = mac;
    g
}

/// A node's reply as it arrives on fxn, from the node's own MAC.
fn reply(node: &str, sport: u16, client: &str, payload: &[u8]) -> Frame {
    let mac = if node == NODE2_4 || node == NODE2_6 {
        NODE2_MAC
    } else {
        NODE1_MAC
    };
    Frame::udp(
        mac,
        FXN_MAC,
        lb_lab::ip(node),
        sport,
        lb_lab::ip(client),
        40000,
        payload,
    )
}

/// A reply as un-NATed towards the client on fxc: source VIP:port, TTL - 1, MACs from the FIB.
fn unnat(r: &Frame, vip: &str, vip_port: u16) -> Frame {
    let mut q = r.clone();
    q.src = lb_lab::ip(vip);
    q.sport = vip_port;
    q.ttl -= 1;
    q.src_mac = FXC_MAC;
    q.dst_mac = CLIENT_MAC;
    q
}

/// A MAC no neighbour in the fixture netns has: seen in an output only if it came from the
/// next-hop cache the test overwrote.
const MARKER_MAC: Mac = [0x02, 0xee, 0xee, 0xee, 0xee, 0xee];

/// Overwrites the next-hop MAC of every filled `NEXTHOP` entry (all CPUs) with [`MARKER_MAC`].
fn mark_nexthop_cache(ebpf: &mut aya::Ebpf) {
    use aya::maps::{PerCpuArray, PerCpuValues};
    let mut map: PerCpuArray<_, lb_common::NextHop> =
        PerCpuArray::try_from(ebpf.map_mut(lb_common::names::NEXTHOP).expect("NEXTHOP"))
            .expect("NEXTHOP is a per-CPU array");
    let mut marked = 0;
    for i in 0..map.len() {
        let mut vals: Vec<lb_common::NextHop> = map.get(&i, 0).unwrap().iter().copied().collect();
        if vals.iter().all(|v| v.expires_ns == 0) {
            continue;
        }
        for v in vals.iter_mut().filter(|v| v.expires_ns != 0) {
            v.dmac = MARKER_MAC;
            marked += 1;
        }
        map.set(i, PerCpuValues::try_from(vals).unwrap(), 0)
            .unwrap();
    }
    assert!(marked > 0, "no NEXTHOP entry was filled");
}

fn fwd(ingress: &'static str, input: &Frame, output: &Frame, action: u32) -> Step {
    Step {
        pause_ms: 0,
        poke: None,
        ingress,
        input: input.bytes(),
        action,
        output: Some(output.bytes()),
    }
}

/// A client frame arriving on fxc and redirected out of fxn to `node` (MAC `mac`).
fn redirect(input: &Frame, node: &str, mac: Mac) -> Step {
    fwd("fxc", input, &to_node(input, node, mac), XDP_REDIRECT)
}

fn unchanged(ingress: &'static str, input: Vec<u8>, action: u32) -> Step {
    Step {
        pause_ms: 0,
        poke: None,
        ingress,
        input,
        action,
        output: None,
    }
}

fn cid(node: u8) -> Vec<u8> {
    cid_record(
        &[node, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5],
        b"encrypted application data",
    )
}

/// A CID record from the client naming no configured node (`p`, to the IPv4 VIP): dropped
/// under `unknown_node: drop`, routed by flow to node 1 under `unknown_node: flow`. `label`
/// prefixes the case names.
fn unknown_node_cases(label: &str, p: &Frame) -> [Case; 2] {
    [
        case(
            format!("{label}unknown node, unknown_node: drop"),
            vec![unchanged("fxc", p.bytes(), XDP_DROP)],
            &[(DropCidUnknownNode, 1)],
        ),
        case(
            format!("{label}unknown node, unknown_node: flow"),
            vec![redirect(p, NODE1_4, NODE1_MAC)],
            &[(CidUnknownNodeFlow, 1), (FlowNew, 1), (FwdRedirect, 1)],
        )
        .config("unknown_node: drop", "unknown_node: flow")
        .nodes(&[(1, 1)]),
    ]
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let hello = handshake_record(b"ClientHello with cookie");

    // --- CID routing ---
    let p = client(VIP4, 5684, &cid(1));
    v.push(
        case(
            "cid to node 1 (IPv4)",
            vec![redirect(&p, NODE1_4, NODE1_MAC)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );
    let p = client(VIP4, 5684, &cid(2));
    v.push(
        case(
            "cid to node 2 (IPv4)",
            vec![redirect(&p, NODE2_4, NODE2_MAC)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(2, 1)]),
    );
    let p = client(VIP6, 5684, &cid(2));
    v.push(
        case(
            "cid to node 2 (IPv6)",
            vec![redirect(&p, NODE2_6, NODE2_MAC)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(2, 1)]),
    );
    let p = client(VIP6, 5684, &cid(1));
    v.push(
        case(
            "cid to node 1 (IPv6)",
            vec![redirect(&p, NODE1_6, NODE1_MAC)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );

    // IPv4 options: IHL 6 and IHL 15 (40 bytes of options, kept intact).
    for (ihl, opts) in [
        (6usize, vec![1u8, 1, 1, 0]),
        (15, [vec![1u8; 39], vec![0]].concat()),
    ] {
        let mut p = client(VIP4, 5684, &cid(1));
        p.ipv4_options = opts;
        v.push(
            case(
                format!("cid to node 1 with IHL {ihl}"),
                vec![redirect(&p, NODE1_4, NODE1_MAC)],
                &[(CidRouted, 1), (FwdRedirect, 1)],
            )
            .nodes(&[(1, 1)]),
        );
    }

    // Node id at offset 2, 2 bytes long, in an 8-byte CID.
    let cfg_from =
        "dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop}";
    let cfg_to = "dtls: {cid_length: 8, node_id_offset: 2, node_id_length: 2, unknown_node: drop}";
    let p = client(
        VIP4,
        5684,
        &cid_record(&[0xee, 0xee, 0x01, 0x02, 9, 9, 9, 9], b"x"),
    );
    v.push(
        case(
            "node id at offset 2, 2 bytes (0x0102)",
            vec![redirect(&p, NODE2_4, NODE2_MAC)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .config(cfg_from, cfg_to)
        .config("{id: 2,", "{id: 258,")
        .nodes(&[(258, 1)]),
    );

    // Unknown node id.
    let p = client(VIP4, 5684, &cid(9));
    v.extend(unknown_node_cases("", &p));

    // DTLS header truncated at every boundary. Shorter than type+version: not a CID record,
    // routed by flow. From type+version up to one byte short of 13 + cid_length: dropped.
    let full = cid(1);
    for len in 0..=full.len().min(13 + 6) {
        let p = client(VIP4, 5684, &full[..len]);
        let c = if len < 3 {
            case(
                format!("DTLS payload of {len} bytes: by flow"),
                vec![redirect(&p, NODE1_4, NODE1_MAC)],
                &[(FlowNew, 1), (FwdRedirect, 1)],
            )
            .nodes(&[(1, 1)])
        } else if len < 13 + 6 {
            case(
                format!("tls12_cid record cut to {len} bytes: dropped"),
                vec![unchanged("fxc", p.bytes(), XDP_DROP)],
                &[(DropCidTruncated, 1)],
            )
        } else {
            case(
                format!("tls12_cid record of exactly {len} bytes (empty content): routed"),
                vec![redirect(&p, NODE1_4, NODE1_MAC)],
                &[(CidRouted, 1), (FwdRedirect, 1)],
            )
            .nodes(&[(1, 1)])
        };
        v.push(c);
    }
    // A record type 25 with a 2-byte CID configured 6: shorter than the CID.
    let p = client(VIP4, 5684, &cid_record(&[2, 0], b""));
    v.push(case(
        "type 25 shorter than the CID",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropCidTruncated, 1)],
    ));

    // Wrong version: type 25 but DTLS 1.0 (FE FF).
    let mut bad = cid(2);
    bad[2] = 0xff;
    let p = client(VIP4, 5684, &bad);
    v.push(
        case(
            "type 25 with version FE FF: by flow",
            vec![redirect(&p, NODE1_4, NODE1_MAC)],
            &[(CidBadVersion, 1), (FlowNew, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );

    // --- VIP ports ---
    for port in [20000u16, 20100] {
        let p = client(VIP4, port, &cid(2));
        v.push(
            case(
                format!("port range edge {port} balanced"),
                vec![redirect(&p, NODE2_4, NODE2_MAC)],
                &[(CidRouted, 1), (FwdRedirect, 1)],
            )
            .nodes(&[(2, 1)]),
        );
    }
    for port in [19999u16, 20101, 5683] {
        let p = client(VIP4, port, &cid(2));
        v.push(case(
            format!("port {port} outside the VIP ports: passed"),
            vec![unchanged("fxc", p.bytes(), XDP_PASS)],
            &[(PassNotVip, 1)],
        ));
    }
    let p = client("192.0.2.11", 5684, &cid(2));
    v.push(case(
        "non-VIP address: passed",
        vec![unchanged("fxc", p.bytes(), XDP_PASS)],
        &[(PassNotVip, 1)],
    ));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 192, 0, 2, 10]);
    v.push(case(
        "ARP: passed",
        vec![unchanged("fxc", arp, XDP_PASS)],
        &[(PassNotIp, 1)],
    ));
    let mut icmp = client(VIP4, 5684, b"").bytes();
    icmp[14 + 9] = 1; // protocol ICMP (header checksum is not the program's business here)
    v.push(case(
        "ICMP to the VIP: passed",
        vec![unchanged("fxc", icmp, XDP_PASS)],
        &[(PassNotUdp, 1)],
    ));
    // BPF_PROG_TEST_RUN refuses input shorter than an Ethernet header, so cut inside IPv4.
    let cut = client(VIP4, 5684, b"").bytes()[..14 + 12].to_vec();
    v.push(case(
        "IPv4 header cut short: passed",
        vec![unchanged("fxc", cut, XDP_PASS)],
        &[(PassTruncated, 1)],
    ));

    // --- Fragments and IPv6 extension headers ---
    let mut p = client(VIP4, 5684, &cid(1));
    p.more_fragments = true;
    v.push(case(
        "IPv4 first fragment to VIP: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropFragment, 1)],
    ));
    let mut p = client(VIP4, 5684, &cid(1));
    p.fragment_offset = 100;
    v.push(case(
        "IPv4 later fragment to VIP: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropFragment, 1)],
    ));
    let mut p = client("192.0.2.99", 5684, &cid(1));
    p.more_fragments = true;
    v.push(case(
        "IPv4 fragment to another address: passed",
        vec![unchanged("fxc", p.bytes(), XDP_PASS)],
        &[(PassNotVip, 1)],
    ));
    let mut p = client(VIP6, 5684, &cid(1));
    p.v6_fragment = true;
    v.push(case(
        "IPv6 fragment header to VIP: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropFragment, 1)],
    ));
    let mut p = client(VIP6, 5684, &cid(1));
    p.v6_hop_by_hop = true;
    v.push(case(
        "IPv6 hop-by-hop header: passed",
        vec![unchanged("fxc", p.bytes(), XDP_PASS)],
        &[(PassIpv6ExtHdr, 1)],
    ));

    // --- VLAN tags: rewritten, then routed by the kernel's VLAN devices ---
    let mut p = client(VIP4, 5684, &cid(2));
    p.vlans = vec![(0x8100, 100)];
    let mut q = p.clone();
    q.dst = lb_lab::ip(NODE2_4);
    v.push(
        case(
            "one VLAN tag: rewritten, passed to the kernel",
            vec![fwd("fxc", &p, &q, XDP_PASS)],
            &[(CidRouted, 1), (FwdKernelVlan, 1)],
        )
        .nodes(&[(2, 1)]),
    );
    let mut p = client(VIP6, 5684, &cid(1));
    p.vlans = vec![(0x88a8, 10), (0x8100, 200)];
    let mut q = p.clone();
    q.dst = lb_lab::ip(NODE1_6);
    v.push(
        case(
            "two VLAN tags (802.1ad + 802.1Q), IPv6",
            vec![fwd("fxc", &p, &q, XDP_PASS)],
            &[(CidRouted, 1), (FwdKernelVlan, 1)],
        )
        .nodes(&[(1, 1)]),
    );

    // --- Checksums ---
    let mut p = client(VIP4, 5684, &cid(1));
    p.zero_udp_checksum = true;
    let q = to_node(&p, NODE1_4, NODE1_MAC);
    v.push(
        case(
            "IPv4 UDP checksum 0 stays 0",
            vec![fwd("fxc", &p, &q, XDP_REDIRECT)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );
    let p = client(VIP4, 20042, &[0xff; 64]);
    v.push(
        case(
            "non-zero checksum, non-DTLS payload",
            vec![redirect(&p, NODE1_4, NODE1_MAC)],
            &[(FlowNew, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );

    // --- Replies: stateless reverse NAT ---
    let r = reply(NODE1_4, 5684, CLIENT4, b"reply record");
    v.push(
        case(
            "reply from node 1 gets the VIP as source (IPv4)",
            vec![fwd("fxn", &r, &unnat(&r, VIP4, 5684), XDP_REDIRECT)],
            &[(ReplyUnnat, 1), (FwdRedirect, 1)],
        )
        .replies(&[(1, 1)]),
    );
    let r = reply(NODE2_6, 5684, CLIENT6, b"reply record");
    v.push(
        case(
            "reply from node 2 gets the VIP as source (IPv6)",
            vec![fwd("fxn", &r, &unnat(&r, VIP6, 5684), XDP_REDIRECT)],
            &[(ReplyUnnat, 1), (FwdRedirect, 1)],
        )
        .replies(&[(2, 1)]),
    );
    let r = reply(NODE1_4, 5999, CLIENT4, b"not from the service port");
    v.push(case(
        "node traffic from another port: passed",
        vec![unchanged("fxn", r.bytes(), XDP_PASS)],
        &[(PassNotVip, 1)],
    ));

    // Node port differs from the VIP port: both directions.
    let p = client(VIP4, 5684, &cid(1));
    let mut q = to_node(&p, NODE1_4, NODE1_MAC);
    q.dport = 6000;
    let r = reply(NODE1_4, 6000, CLIENT4, b"hi");
    let mut rq = r.clone();
    rq.src = lb_lab::ip(VIP4);
    rq.sport = 5684;
    rq.ttl -= 1;
    rq.src_mac = FXC_MAC;
    rq.dst_mac = CLIENT_MAC;
    v.push(
        case(
            "node port 6000: dport rewritten, reply sport restored",
            vec![
                fwd("fxc", &p, &q, XDP_REDIRECT),
                fwd("fxn", &r, &rq, XDP_REDIRECT),
            ],
            &[(CidRouted, 1), (ReplyUnnat, 1), (FwdRedirect, 2)],
        )
        .config("ports: [5684, \"20000-20100\"]", "ports: [5684]")
        .config(
            "{id: 1, address: [203.0.113.11, \"2001:db8:1::11\"]}",
            "{id: 1, address: [203.0.113.11, \"2001:db8:1::11\"], port: 6000}",
        )
        .nodes(&[(1, 1)])
        .replies(&[(1, 1)]),
    );

    // --- Flows: sticky and round robin ---
    let a = client(VIP4, 5684, &hello);
    let mut b = a.clone();
    b.sport = 40001;
    v.push(
        case(
            "a flow's second packet reaches its first packet's node",
            vec![
                redirect(&a, NODE1_4, NODE1_MAC),
                redirect(&b, NODE2_4, NODE2_MAC),
                redirect(&a, NODE1_4, NODE1_MAC),
                redirect(&b, NODE2_4, NODE2_MAC),
            ],
            &[(FlowNew, 2), (FlowHit, 2), (FwdRedirect, 4)],
        )
        .nodes(&[(1, 2), (2, 2)]),
    );
    let steps = (0..6u16)
        .map(|i| {
            let mut p = client(VIP4, 5684, &hello);
            p.sport = 41000 + i;
            let (n, m) = if i % 2 == 0 {
                (NODE1_4, NODE1_MAC)
            } else {
                (NODE2_4, NODE2_MAC)
            };
            redirect(&p, n, m)
        })
        .collect();
    v.push(
        case(
            "round robin spreads new flows 1,2,1,2,1,2",
            steps,
            &[(FlowNew, 6), (FwdRedirect, 6)],
        )
        .nodes(&[(1, 3), (2, 3)]),
    );
    let a = client(VIP6, 5684, &hello);
    v.push(
        case(
            "IPv6 flow is sticky",
            vec![
                redirect(&a, NODE1_6, NODE1_MAC),
                redirect(&a, NODE1_6, NODE1_MAC),
            ],
            &[(FlowNew, 1), (FlowHit, 1), (FwdRedirect, 2)],
        )
        .nodes(&[(1, 2)]),
    );

    // The second packet to a node takes its next hop from the per-CPU cache. To tell a cache
    // hit from a fresh lookup, the test overwrites the cached MAC with a marker no neighbour
    // has: only a cache hit can put it in the output.
    let p = client(VIP4, 5684, &cid(2));
    let q = to_node(&p, NODE2_4, NODE2_MAC);
    let mut marked = q.clone();
    marked.dst_mac = MARKER_MAC;
    let mut mark = fwd("fxc", &p, &marked, XDP_REDIRECT);
    mark.poke = Some(mark_nexthop_cache);
    v.push(
        case(
            "cached next hop is used (marker MAC from the cache)",
            vec![
                fwd("fxc", &p, &q, XDP_REDIRECT),
                mark,
                fwd("fxc", &p, &marked, XDP_REDIRECT),
            ],
            &[(CidRouted, 3), (FwdRedirect, 3)],
        )
        .nodes(&[(2, 3)]),
    );

    // --- Forwarding outcomes ---
    let p = client(VIP4, 5684, &cid(3));
    let mut q = to_node(&p, "198.51.100.50", ONEARM_MAC);
    q.src_mac = FXC_MAC;
    v.push(
        case(
            "node on the ingress interface: XDP_TX",
            vec![fwd("fxc", &p, &q, XDP_TX)],
            &[(CidRouted, 1), (FwdTx, 1)],
        )
        .config("nodes:\n", "nodes:\n  - {id: 3, address: 198.51.100.50}\n")
        .nodes(&[(3, 1)]),
    );
    let p = client(VIP4, 5684, &cid(3));
    let mut q = p.clone();
    q.dst = lb_lab::ip("203.0.113.13");
    v.push(
        case(
            "no neighbour entry: rewritten, passed to resolve",
            vec![fwd("fxc", &p, &q, XDP_PASS)],
            &[(CidRouted, 1), (FwdKernelNoNeigh, 1)],
        )
        .config("nodes:\n", "nodes:\n  - {id: 3, address: 203.0.113.13}\n")
        .nodes(&[(3, 1)]),
    );
    let p = client(VIP4, 5684, &cid(3));
    let mut q = p.clone();
    q.dst = lb_lab::ip("100.64.0.9");
    v.push(
        case(
            "next hop on an interface cidlb is not on: passed",
            vec![fwd("fxc", &p, &q, XDP_PASS)],
            &[(CidRouted, 1), (FwdKernelIface, 1)],
        )
        .config("nodes:\n", "nodes:\n  - {id: 3, address: 100.64.0.9}\n")
        .nodes(&[(3, 1)]),
    );
    let mut p = client(VIP4, 5684, &cid(1));
    p.ttl = 1;
    let mut q = p.clone();
    q.dst = lb_lab::ip(NODE1_4);
    v.push(
        case(
            "TTL 1: rewritten, passed for the ICMP error",
            vec![fwd("fxc", &p, &q, XDP_PASS)],
            &[(CidRouted, 1), (FwdKernelTtl, 1)],
        )
        .nodes(&[(1, 1)]),
    );
    let p = client(VIP6, 5684, &cid(3));
    v.push(
        case(
            "CID names an IPv4-only node over IPv6: dropped",
            vec![unchanged("fxc", p.bytes(), XDP_DROP)],
            &[(CidRouted, 1), (DropCidNodeFamily, 1)],
        )
        .config("nodes:\n", "nodes:\n  - {id: 3, address: 203.0.113.13}\n"),
    );

    // --- Shadow mode: decide and count, change nothing ---
    let p = client(VIP4, 5684, &cid(2));
    let h = client(VIP4, 5684, &hello);
    let r = reply(NODE1_4, 5684, CLIENT4, b"reply record");
    v.push(
        case(
            "shadow mode: counted, passed unchanged",
            vec![
                unchanged("fxc", p.bytes(), XDP_PASS),
                unchanged("fxc", h.bytes(), XDP_PASS),
                unchanged("fxn", r.bytes(), XDP_PASS),
            ],
            &[
                (CidRouted, 1),
                (FlowNew, 1),
                (ReplyUnnat, 1),
                (ShadowPass, 3),
            ],
        )
        .shadow()
        .nodes(&[(1, 1), (2, 1)])
        .replies(&[(1, 1)]),
    );

    // A node answering the balancer itself (a health probe): not a client reply.
    let r = reply(NODE1_4, 5684, "203.0.113.1", b"HelloVerifyRequest");
    v.push(case(
        "node reply to the balancer's own address: passed unchanged",
        vec![unchanged("fxn", r.bytes(), XDP_PASS)],
        &[(PassLocalReply, 1)],
    ));

    // --- Malformed ---
    let mut p = client(VIP4, 5684, &cid(1));
    p.udp_len_override = Some(200);
    v.push(case(
        "UDP length past the frame: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropBadUdpLength, 1)],
    ));
    let mut p = client(VIP4, 5684, &cid(1));
    p.udp_len_override = Some(7);
    v.push(case(
        "UDP length below 8: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropBadUdpLength, 1)],
    ));
    let mut b = client(VIP4, 5684, &cid(1)).bytes();
    b[14] = 0x44; // IHL 4
    v.push(case(
        "IPv4 IHL 4: dropped",
        vec![unchanged("fxc", b, XDP_DROP)],
        &[(DropBadIpHeader, 1)],
    ));
    // Ethernet padding after a short UDP datagram: the UDP length, not the frame, bounds the
    // record. Payload "19 FE FD" + zero padding must not read as a full CID record.
    let p = client(VIP4, 5684, &[25, 0xfe, 0xfd]);
    let mut padded = p.bytes();
    padded.resize(80, 0);
    v.push(case(
        "3-byte tls12_cid header + Ethernet padding: dropped",
        vec![unchanged("fxc", padded, XDP_DROP)],
        &[(DropCidTruncated, 1)],
    ));
    relay_cases(&mut v);
    defect_cases(&mut v);
    limits::limit_cases(&mut v);
    dtls13_cases(&mut v);
    lookup_table_cases(&mut v);
    let p = client(VIP4, 5684, &cid(1));
    let mut torn = redirect(&p, NODE1_4, NODE1_MAC);
    torn.poke = Some(tear_node1);
    v.push(
        case(
            "a NODE_IDS element read torn (check word wrong): the node comes from NODES",
            vec![torn],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );
    v
}

/// Overwrites node 1's `NODE_IDS` element with another address but its old check word: what
/// a packet may read while the agent rewrites the element.
fn tear_node1(ebpf: &mut aya::Ebpf) {
    use aya::maps::Array;
    let mut ids: Array<_, lb_common::Node> =
        Array::try_from(ebpf.map_mut(lb_common::names::NODE_IDS).expect("NODE_IDS"))
            .expect("NODE_IDS is an array");
    let mut n = ids.get(&1, 0).expect("node 1");
    assert_ne!(n.flags, 0, "node 1 is in NODE_IDS");
    n.addr4 = u32::from_ne_bytes([198, 51, 100, 99]);
    ids.set(1, n, 0).expect("write NODE_IDS");
}

/// `VIP_TABLE` (issue #11) with its fallback to `VIPS`. (`NODE_FILTER`, in front of `REVERSE`,
/// is covered by every reply case: without a node's bit its replies pass as not ours.)
fn lookup_table_cases(v: &mut Vec<Case>) {
    use lb_common::{hash::vip_slot, AddrKey, VipSlot, FAMILY_V4, VIP_PROBES, VIP_TABLE_SLOTS};
    let key = |a: IpAddr| {
        let (addr, family) = lb_common::addr_words(a);
        AddrKey {
            addr,
            family,
            _pad: [0; 3],
        }
    };
    // VIP_PROBES addresses whose probe starts where VIP4's does and which the agent places
    // first (they sort before it), so VIP4 finds no slot and only VIPS has it.
    let vip4 = key(lb_lab::ip(VIP4));
    let start = vip_slot(&vip4.addr, FAMILY_V4);
    let taken: Vec<IpAddr> = (0u32..65536)
        .map(|i| IpAddr::from([198, 18, (i >> 8) as u8, i as u8]))
        .filter(|a| {
            let k = key(*a);
            vip_slot(&k.addr, k.family) == start && k < vip4
        })
        .take(VIP_PROBES as usize)
        .collect();
    assert_eq!(taken.len(), VIP_PROBES as usize);
    let want: std::collections::BTreeMap<AddrKey, u32> = taken
        .iter()
        .map(|a| key(*a))
        .chain([vip4])
        .enumerate()
        .map(|(i, k)| (k, i as u32))
        .collect();
    let table = plan::vips::vip_table(&vec![VipSlot::default(); VIP_TABLE_SLOTS as usize], &want);
    assert!(
        !table
            .iter()
            .any(|s| s.family == FAMILY_V4 && s.addr == vip4.addr),
        "VIP4 must fall through to VIPS for this case"
    );
    // Ports of their own: two VIPs of one family may not share a node port.
    let extra: String = taken
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  - address: {a}\n    ports: [{}]\n", 6000 + i))
        .collect();
    let p = client(VIP4, 5684, &cid(1));
    v.push(
        case(
            "a VIP with no VIP_TABLE slot (4 taken before it) is found in VIPS",
            vec![redirect(&p, NODE1_4, NODE1_MAC)],
            &[(CidRouted, 1), (FwdRedirect, 1)],
        )
        .config("vips:\n", &format!("vips:\n{extra}"))
        .nodes(&[(1, 1)]),
    );
    // Not a VIP, though its probe starts at the same slot: passed.
    let other = (0u32..65536)
        .map(|i| IpAddr::from([198, 19, (i >> 8) as u8, i as u8]))
        .find(|a| {
            let k = key(*a);
            vip_slot(&k.addr, k.family) == start
        })
        .expect("an address with the same probe start");
    // To the port of the VIP in the first slot it probes: only a probe that matches on less
    // than the whole address would take it for that VIP.
    let (first, _) = taken
        .iter()
        .enumerate()
        .min_by_key(|(_, a)| key(**a))
        .expect("taken VIPs");
    let q = client(&other.to_string(), 6000 + first as u16, &cid(1));
    v.push(
        case(
            "an address that is no VIP, probing past 4 taken slots, passes",
            vec![unchanged("fxc", q.bytes(), XDP_PASS)],
            &[(PassNotVip, 1)],
        )
        .config("vips:\n", &format!("vips:\n{extra}")),
    );
}

/// A DTLS 1.3 unified-header record whose 6-byte CID names `node`.
fn cid13(node: u8, seq16: bool, with_len: bool) -> Vec<u8> {
    unified_record(
        Some(&[node, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5]),
        seq16,
        with_len,
        b"encrypted DTLS 1.3 application data",
    )
}

/// Issue #12: DTLS 1.3 unified headers (RFC 9147 §4). Node 2 is named where a flow would
/// pick node 1 (the first round-robin pick), so a record routed by flow cannot pass as routed
/// by CID.
fn dtls13_cases(v: &mut Vec<Case>) {
    let dtls = "dtls: {cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop}";
    let with_versions = |list: &str| {
        format!("dtls: {{cid_length: 6, node_id_offset: 0, node_id_length: 1, unknown_node: drop, versions: {list}}}")
    };
    // C set with S and L in all four combinations, over IPv4 and IPv6.
    for (s, l) in [(false, false), (false, true), (true, false), (true, true)] {
        for (vip, node) in [(VIP4, NODE2_4), (VIP6, NODE2_6)] {
            let p = client(vip, 5684, &cid13(2, s, l));
            v.push(
                case(
                    format!(
                        "1.3 unified header C=1 S={} L={} to node 2 ({vip})",
                        s as u8, l as u8
                    ),
                    vec![redirect(&p, node, NODE2_MAC)],
                    &[(Cid13Routed, 1), (FwdRedirect, 1)],
                )
                .nodes(&[(2, 1)]),
            );
        }
    }
    // C clear: by flow, although the byte after the first names node 2.
    let p = client(
        VIP4,
        5684,
        &unified_record(None, true, true, &[2, 2, 2, 2, 2, 2, 2, 2]),
    );
    v.push(
        case(
            "1.3 unified header without CID: by flow",
            vec![redirect(&p, NODE1_4, NODE1_MAC)],
            &[(FlowNew, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(1, 1)]),
    );
    // Truncated, per S/L: one byte short of 1 + cid_length + (S ? 2 : 1) + (L ? 2 : 0) is
    // dropped, exactly that long (no ciphertext: RFC 9147 §4.2.3's 16-byte minimum is the
    // node's to enforce) is routed.
    for (s, l) in [(false, false), (false, true), (true, false), (true, true)] {
        let min = 1 + 6 + if s { 2 } else { 1 } + if l { 2 } else { 0 };
        let full = cid13(2, s, l);
        let mut lens = vec![1, 2, 7, min - 1];
        lens.dedup();
        for len in lens {
            let p = client(VIP4, 5684, &full[..len]);
            v.push(case(
                format!(
                    "1.3 C=1 S={} L={} cut to {len} of {min} header bytes: dropped",
                    s as u8, l as u8
                ),
                vec![unchanged("fxc", p.bytes(), XDP_DROP)],
                &[(DropCid13Truncated, 1)],
            ));
        }
        let p = client(VIP4, 5684, &full[..min]);
        v.push(
            case(
                format!(
                    "1.3 C=1 S={} L={} header only ({min} bytes): routed",
                    s as u8, l as u8
                ),
                vec![redirect(&p, NODE2_4, NODE2_MAC)],
                &[(Cid13Routed, 1), (FwdRedirect, 1)],
            )
            .nodes(&[(2, 1)]),
        );
    }
    // The UDP length decides, not the frame: a 1-byte unified header padded to 80 bytes.
    let mut padded = client(VIP4, 5684, &[0x3f]).bytes();
    padded.resize(80, 0);
    v.push(case(
        "1-byte 1.3 unified header + Ethernet padding: dropped",
        vec![unchanged("fxc", padded, XDP_DROP)],
        &[(DropCid13Truncated, 1)],
    ));
    // Node id at offset 2, 2 bytes, in an 8-byte CID: read at payload offset 1 + 2.
    let p = client(
        VIP6,
        5684,
        &unified_record(
            Some(&[0xee, 0xee, 0x01, 0x02, 9, 9, 9, 9]),
            true,
            false,
            b"x",
        ),
    );
    v.push(
        case(
            "1.3 node id at offset 2, 2 bytes (0x0102)",
            vec![redirect(&p, NODE2_6, NODE2_MAC)],
            &[(Cid13Routed, 1), (FwdRedirect, 1)],
        )
        .config(
            dtls,
            "dtls: {cid_length: 8, node_id_offset: 2, node_id_length: 2, unknown_node: drop}",
        )
        .config("{id: 2,", "{id: 258,")
        .nodes(&[(258, 1)]),
    );
    // Unknown node: same rules and counters as a tls12_cid record.
    let p = client(VIP4, 5684, &cid13(9, true, true));
    v.extend(unknown_node_cases("1.3 ", &p));
    // Disabled node: its CIDs follow unknown_node.
    let p = client(VIP4, 5684, &cid13(2, true, true));
    v.push(
        case(
            "1.3 CID naming a disabled node: dropped",
            vec![unchanged("fxc", p.bytes(), XDP_DROP)],
            &[(DropCidUnknownNode, 1)],
        )
        .config(
            "\"2001:db8:1::12\"]}",
            "\"2001:db8:1::12\"], state: disabled}",
        ),
    );
    // Both formats in one config (explicit versions): each routed by its own CID.
    let p12 = client(VIP4, 5684, &cid(2));
    let p13 = client(VIP6, 5684, &cid13(1, true, true));
    v.push(
        case(
            "1.2 and 1.3 records in one config",
            vec![
                redirect(&p12, NODE2_4, NODE2_MAC),
                redirect(&p13, NODE1_6, NODE1_MAC),
            ],
            &[(CidRouted, 1), (Cid13Routed, 1), (FwdRedirect, 2)],
        )
        .config(dtls, &with_versions("[1.2, \"1.3\"]"))
        .nodes(&[(1, 1), (2, 1)]),
    );
    // versions: ["1.2"]: a 1.3 record naming node 2 goes by flow (node 1), a 1.2 one by CID.
    v.push(
        case(
            "dtls.versions [1.2]: 1.3 record by flow, 1.2 record by CID",
            vec![
                redirect(&p13, NODE1_6, NODE1_MAC),
                redirect(&p12, NODE2_4, NODE2_MAC),
            ],
            &[(FlowNew, 1), (CidRouted, 1), (FwdRedirect, 2)],
        )
        .config(dtls, &with_versions("[\"1.2\"]"))
        .nodes(&[(1, 1), (2, 1)]),
    );
    let p13 = client(VIP4, 5684, &cid13(2, true, true));
    v.push(
        case(
            "dtls.versions [1.2]: 1.3 record naming node 2 by flow",
            vec![redirect(&p13, NODE1_4, NODE1_MAC)],
            &[(FlowNew, 1), (FwdRedirect, 1)],
        )
        .config(dtls, &with_versions("[\"1.2\"]"))
        .nodes(&[(1, 1)]),
    );
    // versions: ["1.3"]: a tls12_cid record naming node 2 goes by flow.
    v.push(
        case(
            "dtls.versions [1.3]: tls12_cid record by flow",
            vec![redirect(&p12, NODE1_4, NODE1_MAC)],
            &[(FlowNew, 1), (FwdRedirect, 1)],
        )
        .config(dtls, &with_versions("[1.3]"))
        .nodes(&[(1, 1)]),
    );
    // The first record decides: a 1.3 CID record naming node 2, then a tls12_cid record
    // naming node 1, in one datagram.
    let p = client(VIP4, 5684, &[cid13(2, true, true), cid(1)].concat());
    v.push(
        case(
            "1.3 record then 1.2 record in one datagram: the first decides",
            vec![redirect(&p, NODE2_4, NODE2_MAC)],
            &[(Cid13Routed, 1), (FwdRedirect, 1)],
        )
        .nodes(&[(2, 1)]),
    );
    // A DTLS 1.3 ClientHello with a post-quantum key share (wolfSSL's default) can be larger
    // than one IP packet: a sender that does not split it into several records (RFC 9147
    // §4.4 asks it to) makes the IP layer fragment it. Fragments carry no (or not the
    // datagram's) UDP header to route by: dropped and counted, as every fragment to a VIP.
    let hello = [
        &[22u8, 0xfe, 0xfd][..],
        &[0; 8],
        &1500u16.to_be_bytes(),
        &[1; 1400],
    ]
    .concat();
    let mut p = client(VIP4, 5684, &hello);
    p.more_fragments = true;
    p.udp_len_override = Some(8 + 1500 + 13);
    v.push(case(
        "IPv4 first fragment of a 1.3 ClientHello too big for one packet: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropFragment, 1)],
    ));
    let mut p = client(VIP6, 5684, &hello);
    p.v6_fragment = true;
    p.udp_len_override = Some(8 + 1500 + 13);
    v.push(case(
        "IPv6 first fragment of a 1.3 ClientHello too big for one packet: dropped",
        vec![unchanged("fxc", p.bytes(), XDP_DROP)],
        &[(DropFragment, 1)],
    ));
}

/// Issue #10: each of these failed before its fix.
fn defect_cases(v: &mut Vec<Case>) {
    // 2. A busy flow outlives a short idle_timeout; an idle one is forgotten. 400ms gives
    // refresh_ns = 50ms: last_seen is refreshed when older than that, and a flow expires once
    // idle > 450ms since last_seen. Packets every 120ms keep it for 720ms (before the fix
    // last_seen was refreshed only after 1s, so the flow expired at 480ms while busy).
    let a = client(VIP4, 5684, &handshake_record(b"ClientHello"));
    let mut steps = vec![redirect(&a, NODE1_4, NODE1_MAC)];
    for _ in 0..6 {
        let mut s = redirect(&a, NODE1_4, NODE1_MAC);
        s.pause_ms = 120;
        steps.push(s);
    }
    // Idle past timeout + refresh: re-pinned by round robin (node 2).
    let mut s = redirect(&a, NODE2_4, NODE2_MAC);
    s.pause_ms = 700;
    steps.push(s);
    v.push(
        case(
            "idle_timeout 400ms: busy flow kept past it, idle flow expires",
            steps,
            &[
                (FlowNew, 2),
                (FlowHit, 6),
                (FlowExpired, 1),
                (FwdRedirect, 8),
            ],
        )
        .config("idle_timeout: 30s", "idle_timeout: 400ms")
        .nodes(&[(1, 7), (2, 1)]),
    );

    // 8. The cached next hop knows the path MTU: an oversized frame goes to the kernel (which
    // fragments or sends ICMP) instead of a redirect the smaller-MTU device would drop.
    for (vip, node) in [(VIP4, NODE1_4), (VIP6, NODE1_6)] {
        let small = client(vip, 5684, &cid(1));
        let big = client(vip, 5684, &cid_record(&[1, 2, 3, 4, 5, 6], &[0x5a; 1300]));
        let mut big_out = big.clone();
        big_out.dst = lb_lab::ip(node);
        v.push(
            case(
                format!("node-side MTU 1280: oversized to {node} passed, cached or not"),
                vec![
                    fwd("fxc", &big, &big_out, XDP_PASS),
                    redirect(&small, node, NODE1_MAC),
                    fwd("fxc", &big, &big_out, XDP_PASS),
                ],
                &[(CidRouted, 3), (FwdKernelMtu, 2), (FwdRedirect, 1)],
            )
            .netns("ip link set fxn mtu 1280", "ip link set fxn mtu 1500")
            .nodes(&[(1, 3)]),
        );
    }
    // An uncached lookup's FRAG_NEEDED (the reply path) is the same outcome.
    let r = reply(NODE1_4, 5684, CLIENT4, &[0x5a; 1300]);
    let mut q = r.clone();
    q.src = lb_lab::ip(VIP4);
    v.push(
        case(
            "client-side MTU 1280: oversized reply passed rewritten",
            vec![fwd("fxn", &r, &q, XDP_PASS)],
            &[(ReplyUnnat, 1), (FwdKernelMtu, 1)],
        )
        .netns("ip link set fxc mtu 1280", "ip link set fxc mtu 1500")
        .replies(&[(1, 1)]),
    );

    // 1. VLAN-tagged replies are looked up too: one to the balancer reaches the probes
    // untouched, one to a client is un-NATed (and routed by the kernel), a forged one dropped.
    let mut r = reply(NODE1_4, 5684, "203.0.113.1", b"HelloVerifyRequest");
    r.vlans = vec![(0x8100, 100)];
    v.push(case(
        "tagged node reply to the balancer's own address: passed unchanged",
        vec![unchanged("fxn", r.bytes(), XDP_PASS)],
        &[(PassLocalReply, 1)],
    ));
    let mut r = reply(NODE2_6, 5684, CLIENT6, b"reply");
    r.vlans = vec![(0x8100, 100)];
    let mut q = r.clone();
    q.src = lb_lab::ip(VIP6);
    v.push(
        case(
            "tagged node reply to a client: un-NATed, passed to the kernel",
            vec![fwd("fxn", &r, &q, XDP_PASS)],
            &[(ReplyUnnat, 1), (FwdKernelVlan, 1)],
        )
        .replies(&[(2, 1)]),
    );
    let mut f = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        lb_lab::ip(NODE1_4),
        5684,
        lb_lab::ip(NODE2_4),
        9999,
        b"forged",
    );
    f.vlans = vec![(0x8100, 100)];
    v.push(case(
        "tagged forged reply with a client's MAC: dropped",
        vec![unchanged("fxc", f.bytes(), XDP_DROP)],
        &[(DropForgedReply, 1)],
    ));
    // Forwarding disabled on the node-side interface: no FIB answer, passed untouched (the
    // kernel delivers the probe answer, and would drop a reply to a client).
    for (node, client_addr, own, sysctl) in [
        (
            NODE1_6,
            CLIENT6,
            "2001:db8:1::1",
            "net.ipv6.conf.fxn.forwarding",
        ),
        (
            NODE1_4,
            CLIENT4,
            "203.0.113.1",
            "net.ipv4.conf.fxn.forwarding",
        ),
    ] {
        let to_client = reply(node, 5684, client_addr, b"reply");
        let to_self = reply(node, 5684, own, b"HelloVerifyRequest");
        v.push(
            case(
                format!("{sysctl}=0: node replies passed untouched"),
                vec![
                    unchanged("fxn", to_client.bytes(), XDP_PASS),
                    unchanged("fxn", to_self.bytes(), XDP_PASS),
                ],
                &[(PassFwdDisabled, 2)],
            )
            .netns(&format!("sysctl {sysctl}=0"), &format!("sysctl {sysctl}=1")),
        );
    }

    // The same with the node's next hop cached (by client traffic arriving on fxc, where
    // forwarding is on): the origin check passes from the cache, and the lookup towards the
    // client, on fxn, finds forwarding disabled.
    let p = client(VIP6, 5684, &cid(1));
    let r = reply(NODE1_6, 5684, CLIENT6, b"reply");
    v.push(
        case(
            "net.ipv6.conf.fxn.forwarding=0, next hop cached: reply passed untouched",
            vec![
                redirect(&p, NODE1_6, NODE1_MAC),
                unchanged("fxn", r.bytes(), XDP_PASS),
            ],
            &[(CidRouted, 1), (FwdRedirect, 1), (PassFwdDisabled, 1)],
        )
        .netns(
            "sysctl net.ipv6.conf.fxn.forwarding=0",
            "sysctl net.ipv6.conf.fxn.forwarding=1",
        )
        .nodes(&[(1, 1)]),
    );

    // 9. Fragments and IPv6 extension headers from a node carry no ports to un-NAT by (later
    // fragments) and would leak the node's address: dropped.
    let mut f = reply(NODE1_4, 5684, CLIENT4, b"first fragment");
    f.more_fragments = true;
    let mut g = reply(NODE1_4, 5684, CLIENT4, b"later fragment");
    g.fragment_offset = 100;
    let mut h = reply(NODE2_6, 5684, CLIENT6, b"fragment header");
    h.v6_fragment = true;
    let mut e = reply(NODE2_6, 5684, CLIENT6, b"hop-by-hop header");
    e.v6_hop_by_hop = true;
    for (what, p) in [
        ("IPv4 first fragment", f),
        ("IPv4 later fragment", g),
        ("IPv6 fragment header", h),
        ("IPv6 hop-by-hop header", e),
    ] {
        v.push(case(
            format!("{what} from a node: dropped"),
            vec![unchanged("fxn", p.bytes(), XDP_DROP)],
            &[(DropNodeFragment, 1)],
        ));
    }
}

/// Only genuine replies are un-NATed (no open relay, issue #8 §1): a frame from a node's
/// serving address and port must arrive the way the balancer reaches that node (the FIB next
/// hop's interface and MAC). Two-armed: clients on fxc, nodes on fxn. One-armed: node 3 on fxc
/// with the clients.
fn relay_cases(v: &mut Vec<Case>) {
    const ONEARM4: &str = "198.51.100.50";
    const ONEARM6: &str = "2001:db8:c::50";
    let one_arm = |c: Case| {
        c.config(
            "nodes:\n",
            "nodes:\n  - {id: 3, address: [198.51.100.50, \"2001:db8:c::50\"]}\n",
        )
        .netns(
            &format!(
                "neigh replace {ONEARM6} lladdr {} nud permanent dev fxc",
                mac_str(ONEARM_MAC)
            ),
            &format!("neigh del {ONEARM6} dev fxc"),
        )
    };

    // Two-armed: forged on the client interface, to a host on the node network and to a node.
    for (node, target, fam) in [
        (NODE1_4, NODE2_4, "IPv4"),
        (NODE1_6, NODE2_6, "IPv6"),
        (NODE1_4, "100.64.0.9", "IPv4, elsewhere"),
    ] {
        let f = Frame::udp(
            CLIENT_MAC,
            FXC_MAC,
            lb_lab::ip(node),
            5684,
            lb_lab::ip(target),
            9999,
            b"forged",
        );
        v.push(case(
            format!("forged reply from {node} on the client side to {target} ({fam}): dropped"),
            vec![unchanged("fxc", f.bytes(), XDP_DROP)],
            &[(DropForgedReply, 1)],
        ));
    }
    // Even with the node's own MAC: it came in on the wrong interface.
    let mut f = reply(NODE1_4, 5684, CLIENT4, b"forged, node MAC");
    f.dst_mac = FXC_MAC;
    v.push(case(
        "forged reply with the node's MAC on the client interface: dropped",
        vec![unchanged("fxc", f.bytes(), XDP_DROP)],
        &[(DropForgedReply, 1)],
    ));
    // On the node interface but from another MAC (node 2's, claiming node 1's address).
    for (node, client) in [(NODE1_4, CLIENT4), (NODE1_6, CLIENT6)] {
        let mut f = reply(node, 5684, client, b"forged, wrong MAC");
        f.src_mac = NODE2_MAC;
        v.push(case(
            format!("reply from {node} with another node's MAC: dropped"),
            vec![unchanged("fxn", f.bytes(), XDP_DROP)],
            &[(DropForgedReply, 1)],
        ));
    }
    // Forged to the balancer itself: must not reach the health probes.
    let f = Frame::udp(
        CLIENT_MAC,
        FXC_MAC,
        lb_lab::ip(NODE1_4),
        5684,
        lb_lab::ip("198.51.100.1"),
        9999,
        b"HelloVerifyRequest",
    );
    v.push(case(
        "forged reply to the balancer's client-side address: dropped",
        vec![unchanged("fxc", f.bytes(), XDP_DROP)],
        &[(DropForgedReply, 1)],
    ));
    let mut f = reply(NODE1_6, 5684, "2001:db8:1::1", b"HelloVerifyRequest");
    f.src_mac = NODE2_MAC;
    v.push(case(
        "forged reply to the balancer's node-side address (wrong MAC): dropped",
        vec![unchanged("fxn", f.bytes(), XDP_DROP)],
        &[(DropForgedReply, 1)],
    ));
    let r = reply(NODE2_6, 5684, "2001:db8:1::1", b"HelloVerifyRequest");
    v.push(case(
        "genuine IPv6 reply to the balancer itself: passed unchanged",
        vec![unchanged("fxn", r.bytes(), XDP_PASS)],
        &[(PassLocalReply, 1)],
    ));

    // Server-initiated: node 2 sends first to a client address and port the balancer never saw.
    let r = Frame::udp(
        NODE2_MAC,
        FXN_MAC,
        lb_lab::ip(NODE2_4),
        5684,
        lb_lab::ip(CLIENT4),
        7001,
        b"notify",
    );
    v.push(
        case(
            "server-initiated packet from node 2 leaves from the VIP",
            vec![fwd("fxn", &r, &unnat(&r, VIP4, 5684), XDP_REDIRECT)],
            &[(ReplyUnnat, 1), (FwdRedirect, 1)],
        )
        .replies(&[(2, 1)]),
    );

    // With the next hop cached (filled by client traffic to node 1): genuine passes, forged not.
    let p = client(VIP4, 5684, &cid(1));
    let r = reply(NODE1_4, 5684, CLIENT4, b"reply");
    let mut f = r.clone();
    f.src_mac = CLIENT_MAC;
    f.dst_mac = FXC_MAC;
    v.push(
        case(
            "cached next hop: genuine reply un-NATed, forged one dropped",
            vec![
                redirect(&p, NODE1_4, NODE1_MAC),
                fwd("fxn", &r, &unnat(&r, VIP4, 5684), XDP_REDIRECT),
                unchanged("fxc", f.bytes(), XDP_DROP),
            ],
            &[
                (CidRouted, 1),
                (ReplyUnnat, 1),
                (FwdRedirect, 2),
                (DropForgedReply, 1),
            ],
        )
        .nodes(&[(1, 1)])
        .replies(&[(1, 1)]),
    );

    // No neighbour entry for the node: its MAC cannot be checked, fail closed.
    let r = Frame::udp(
        NODE1_MAC,
        FXN_MAC,
        lb_lab::ip("203.0.113.13"),
        5684,
        lb_lab::ip(CLIENT4),
        40000,
        b"r",
    );
    v.push(
        case(
            "reply from a node without a neighbour entry: dropped",
            vec![unchanged("fxn", r.bytes(), XDP_DROP)],
            &[(DropReplyNoNeigh, 1)],
        )
        .config("nodes:\n", "nodes:\n  - {id: 3, address: 203.0.113.13}\n"),
    );

    // One-armed: node 3 sits on fxc with the clients.
    for (node, client_addr, vip) in [(ONEARM4, CLIENT4, VIP4), (ONEARM6, CLIENT6, VIP6)] {
        let r = Frame::udp(
            ONEARM_MAC,
            FXC_MAC,
            lb_lab::ip(node),
            5684,
            lb_lab::ip(client_addr),
            40000,
            b"r",
        );
        let mut q = unnat(&r, vip, 5684);
        q.src_mac = FXC_MAC;
        v.push(one_arm(
            case(
                format!("one-armed: genuine reply from {node} un-NATed (XDP_TX)"),
                vec![fwd("fxc", &r, &q, XDP_TX)],
                &[(ReplyUnnat, 1), (FwdTx, 1)],
            )
            .replies(&[(3, 1)]),
        ));
        let mut f = r.clone();
        f.src_mac = CLIENT_MAC;
        v.push(one_arm(case(
            format!("one-armed: forged reply from {node} with a client's MAC: dropped"),
            vec![unchanged("fxc", f.bytes(), XDP_DROP)],
            &[(DropForgedReply, 1)],
        )));
        let mut f = Frame::udp(
            CLIENT_MAC,
            FXC_MAC,
            lb_lab::ip(node),
            5684,
            lb_lab::ip(if vip == VIP4 { NODE2_4 } else { NODE2_6 }),
            9999,
            b"relay?",
        );
        f.ttl = 64;
        v.push(one_arm(case(
            format!("one-armed: forged {node} to node 2's address: dropped"),
            vec![unchanged("fxc", f.bytes(), XDP_DROP)],
            &[(DropForgedReply, 1)],
        )));
    }
}

struct Failure(String);

/// Runs `ip ARGS` or `sysctl KEY=VALUE` in the fixture netns.
fn netns_cmd(ns: &NetNs, cmd: &str) -> Result<(), String> {
    match cmd.strip_prefix("sysctl ") {
        Some(kv) => ns.sysctl(kv),
        None => ns.ip(cmd.strip_prefix("ip ").unwrap_or(cmd)),
    }
}

/// Applies a case's netns changes, runs it, and undoes them (in reverse order) whatever happened.
fn run_case(ns: &NetNs, c: &Case) -> Result<(), Failure> {
    let mut applied = Vec::new();
    let mut result = Ok(());
    for (apply, undo) in &c.netns {
        if let Err(e) = netns_cmd(ns, apply) {
            result = Err(Failure(format!("{}: netns {apply:?}: {e}", c.name)));
            break;
        }
        applied.push(undo);
    }
    if result.is_ok() {
        result = run_steps(c);
    }
    for undo in applied.into_iter().rev() {
        netns_cmd(ns, undo).unwrap_or_else(|e| panic!("{}: undo {undo:?}: {e}", c.name));
    }
    result
}

fn run_steps(c: &Case) -> Result<(), Failure> {
    let fail = |m: String| Failure(format!("{}: {m}", c.name));
    let mut cfg = Config::parse(&c.config, std::path::Path::new("fixture.yaml"))
        .map_err(|e| fail(e.to_string()))?;
    cfg.shadow = c.shadow;
    let mut dp = Datapath::private(&cfg).map_err(|e| fail(e.to_string()))?;
    for (i, s) in c.steps.iter().enumerate() {
        std::thread::sleep(std::time::Duration::from_millis(s.pause_ms));
        if let Some(poke) = s.poke {
            poke(&mut dp.ebpf);
        }
        let ifindex = cidlb::datapath::resolve_interfaces(&[s.ingress.to_owned()])
            .map_err(|e| fail(e.to_string()))?[0];
        let r = dp
            .run_packet(&s.input, ifindex, 1)
            .map_err(|e| fail(format!("step {i}: test_run: {e}")))?;
        let out = r.output;
        if r.action != s.action {
            return Err(fail(format!(
                "step {i}: action {} want {}",
                r.action, s.action
            )));
        }
        let want = s.output.as_ref().unwrap_or(&s.input);
        if &out != want {
            return Err(fail(format!(
                "step {i}: output differs\n got  {}\n want {}",
                lb_lab::hex(&out),
                lb_lab::hex(want)
            )));
        }
        if s.output.is_some() {
            assert_checksums(&out, &c.name);
        }
    }
    let snap = Snapshot::from_ebpf(&dp.ebpf).map_err(|e| fail(e.to_string()))?;
    for &(counter, value) in &snap.counters {
        let want = if counter == PacketsSeen {
            c.steps.len() as u64
        } else {
            c.counters
                .iter()
                .find(|(k, _)| *k == counter)
                .map_or(0, |(_, v)| *v)
        };
        if value != want {
            return Err(fail(format!(
                "counter {} = {value}, want {want}",
                counter.name()
            )));
        }
    }
    // Every configured node, listed or not (not listed: 0).
    let want =
        |list: &[(u32, u64)], id: u32| list.iter().find(|(k, _)| *k == id).map_or(0, |(_, v)| *v);
    for (id, n) in &snap.nodes {
        let (to, from) = (want(&c.to_nodes, *id), want(&c.from_nodes, *id));
        if n.to_node_packets != to || n.from_node_packets != from {
            return Err(fail(format!(
                "node {id}: to_node_packets = {}, from_node_packets = {}, want {to}, {from}",
                n.to_node_packets, n.from_node_packets
            )));
        }
    }
    for (id, _) in c.to_nodes.iter().chain(&c.from_nodes) {
        if !snap.nodes.contains_key(id) {
            return Err(fail(format!("node {id} is listed but not configured")));
        }
    }
    Ok(())
}

#[test]
fn fixtures() {
    common::require_root();
    let ns = lb_lab::fib::netns("fx");
    let cases = cases();
    assert!(
        cases.len() >= 30,
        "the fixture table must hold at least 30 cases, has {}",
        cases.len()
    );
    // A thread of its own inside the netns, pinned to one CPU (per-CPU round-robin cursors).
    let failures: Vec<String> = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            pin_to_cpu(0);
            cases
                .iter()
                .filter_map(|c| run_case(&ns, c).err().map(|f| f.0))
                .collect()
        })
        .join()
        .expect("fixture thread panicked")
    });
    println!("{} fixture cases, {} failed", cases.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} fixture cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
