//! The netns lab: the seed's topology built from network namespaces on one machine.
//!
//! ```text
//!  client ns            balancer ns (cidlb, XDP on lbc + lbnK)          node K ns
//!  c0 198.51.100.7 ─── lbc 198.51.100.1        lbnK 203.0.113.(16K-15) ─── n0 203.0.113.(16K-5)
//!     2001:db8:c::7        2001:db8:c::1           2001:db8:K::1               2001:db8:K::11
//! ```
//! VIPs 192.0.2.10 and 2001:db8:ffff::10 are routed to the balancer by the client's default
//! route; nodes route their replies through the balancer (default route), as in the seed.
//! Everything lives in namespaces this code created; they are deleted when the [`Lab`] drops
//! (unless kept for `cargo xtask lab up`), and traffic never leaves them.

pub mod agent;
pub mod bpftool;
pub mod fib;
pub mod fleet;
pub mod hello;
mod netns;
pub mod packet;
pub mod peer;
pub mod routed;
pub mod sniff;
pub mod trafgen;
pub mod tunnel;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

pub use netns::{enter, pin_to_cpu, run, ChildGuard, NetNs};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
/// The DTLS port the lab balances.
pub const PORT: u16 = 5684;
/// The VIPs with [`PORT`], as clients address them.
pub const VIP4_SOCKET: SocketAddr = SocketAddr::V4(SocketAddrV4::new(VIP4, PORT));
pub const VIP6_SOCKET: SocketAddr = SocketAddr::V6(SocketAddrV6::new(VIP6, PORT, 0, 0));
/// A VIP's address and `port` as the test peer takes it: `192.0.2.10:5684` for `"v4"`,
/// `[2001:db8:ffff::10]:5684` for `"v6"`.
pub fn vip_socket(family: &str, port: u16) -> String {
    match family {
        "v4" => format!("{VIP4}:{port}"),
        _ => format!("[{VIP6}]:{port}"),
    }
}

/// Most nodes the address plan holds (one /28 each in 203.0.113.0/24).
pub const MAX_NODES: usize = 15;

/// Node `k`'s (1-based) IPv4 address.
/// An address literal (a test's own constant; panics naming it if it is not one).
pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an IP address"))
}

/// Bytes as lowercase hex, two digits each (frames in messages, `cidlb explain --hex`).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `text` to a temporary name beside `path`, then renames it over `path`: a reader (the
/// agent watching its config) sees the old file or the new one, never half of one.
pub fn write_then_rename(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

pub fn node4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, (16 * (k - 1) + 11) as u8)
}

/// Node `k`'s (1-based) IPv6 address.
pub fn node6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, k as u16, 0, 0, 0, 0, 0x11)
}

/// The balancer's interface facing node `k`.
pub fn node_iface(k: usize) -> String {
    format!("lbn{k}")
}

/// The client, the balancer, and the nodes.
pub struct Lab {
    pub client: NetNs,
    pub balancer: NetNs,
    pub nodes: Vec<NetNs>,
}

impl Lab {
    /// Builds a lab with `nodes` node namespaces; namespace names start with `prefix`
    /// (`{prefix}c`, `{prefix}b`, `{prefix}n1`...). Unique prefixes keep parallel labs apart.
    pub fn up(prefix: &str, nodes: usize) -> Result<Self, String> {
        if nodes == 0 || nodes > MAX_NODES {
            return Err(format!("a lab holds 1..{MAX_NODES} nodes, not {nodes}"));
        }
        let client = NetNs::named(&format!("{prefix}c"))?;
        let balancer = NetNs::named(&format!("{prefix}b"))?;
        let mut lab = Lab {
            client,
            balancer,
            nodes: Vec::new(),
        };
        for k in 1..=nodes {
            lab.nodes.push(NetNs::named(&format!("{prefix}n{k}"))?);
        }
        lab.wire()?;
        Ok(lab)
    }

    fn wire(&self) -> Result<(), String> {
        let b = &self.balancer;
        wire_client(b, "lbc", &self.client)?;
        for (i, n) in self.nodes.iter().enumerate() {
            wire_node(b, &node_iface(i + 1), n, i + 1)?;
        }
        b.sysctl("net.ipv4.ip_forward=1")?;
        b.sysctl("net.ipv6.conf.all.forwarding=1")?;
        Ok(())
    }

    /// The balancer's interfaces, client side first.
    pub fn interfaces(&self) -> Vec<String> {
        let mut v = vec!["lbc".to_owned()];
        v.extend((1..=self.nodes.len()).map(node_iface));
        v
    }

    /// A cidlb config for this lab: both VIPs on [`PORT`], node `k` with id `k`, dual stack.
    /// `extra` is appended verbatim (e.g. `"dtls: {unknown_node: flow}\n"`).
    pub fn cidlb_config(&self, pin_dir: &str, extra: &str) -> String {
        let mut s = format!(
            "# cidlb config for the netns lab\ninterfaces: [{}]\nxdp_mode: native\nvips:\n  - address: {VIP4}\n    ports: [{PORT}]\n  - address: \"{VIP6}\"\n    ports: [{PORT}]\nnodes:\n",
            self.interfaces().join(", ")
        );
        for k in 1..=self.nodes.len() {
            s.push_str(&format!(
                "  - {{id: {k}, address: [{}, \"{}\"]}}\n",
                node4(k),
                node6(k)
            ));
        }
        s.push_str(&format!("pin_dir: {pin_dir}\n"));
        s.push_str(extra);
        s
    }

    /// The balancer the seed runs, in the balancer namespace: with `cid_rules`, an iptables `u32`
    /// match on the tls12_cid header (19 FE FD) and the CID's first byte DNATs a record to that
    /// node; every other new flow is spread by `-m statistic --mode nth` (the seed uses ipvs
    /// round robin; this kernel has no ipvs). conntrack keeps each 5-tuple on its node.
    pub fn seed_iptables(&self, cid_rules: bool) -> Result<(), String> {
        let ipt = |rule: &[String]| {
            let mut args = vec!["iptables", "-t", "nat"];
            args.extend(rule.iter().map(String::as_str));
            self.balancer.must(&args).map(|_| ())
        };
        let words = |s: String| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let n = self.nodes.len();
        ipt(&words("-N DTLS_NAT".into()))?;
        if cid_rules {
            for k in 1..=n {
                let mut rule = words("-A DTLS_NAT -m u32 --u32".into());
                rule.push(format!(
                    "0>>22&0x3C@ 7&0xFFFFFF=0x19FEFD && 0>>22&0x3C@ 16&0xFF={k}"
                ));
                rule.extend(words(format!("-j DNAT --to-destination {}", node4(k))));
                ipt(&rule)?;
            }
        }
        for k in 1..n {
            ipt(&words(format!(
                "-A DTLS_NAT -m statistic --mode nth --every {} --packet 0 -j DNAT --to-destination {}",
                n - k + 1,
                node4(k)
            )))?;
        }
        ipt(&words(format!(
            "-A DTLS_NAT -j DNAT --to-destination {}",
            node4(n)
        )))?;
        ipt(&words(format!(
            "-A PREROUTING -d {VIP4} -p udp --dport {PORT} -j DTLS_NAT"
        )))
    }

    /// Removes [`Lab::seed_iptables`]'s rules and the connections they made.
    pub fn clear_iptables(&self) {
        let b = &self.balancer;
        let _ = b.exec(&["iptables", "-t", "nat", "-F"]);
        let _ = b.exec(&["iptables", "-t", "nat", "-X", "DTLS_NAT"]);
        let _ = b.exec(&["conntrack", "-F"]);
    }

    /// Keeps the namespaces after this value drops (`cargo xtask lab up`).
    pub fn keep(mut self) {
        self.client.keep();
        self.balancer.keep();
        for n in &mut self.nodes {
            n.keep();
        }
    }

    /// Deletes every namespace whose name starts with `prefix` (`cargo xtask lab down`).
    pub fn down(prefix: &str) -> usize {
        let list = run("ip", &["netns", "list"]).unwrap_or_default();
        let mut n = 0;
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(prefix) && run("ip", &["netns", "del", name]).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// Gives `dev` in `ns` an IPv4 and an IPv6 address (`addr/len`; no DAD, the lab's addresses
/// are unique by construction, and a tentative address would fail the first sends) and brings
/// it up.
fn addr_up(ns: &NetNs, dev: &str, v4: &str, v6: &str) -> Result<(), String> {
    ns.ip(&format!("addr add {v4} dev {dev}"))?;
    ns.ip(&format!("addr add {v6} dev {dev} nodad"))?;
    ns.ip(&format!("link set {dev} up"))
}

/// Node `k`'s link, shared by [`Lab`] and [`routed::Routed`]: veth `gw_dev` in `gw` (the
/// node's gateway, .1 of its /28 and ::1 of its /64) to `n0` in `node` ([`node4`],
/// [`node6`]), with the node's default routes through `gw`.
fn wire_node(gw: &NetNs, gw_dev: &str, node: &NetNs, k: usize) -> Result<(), String> {
    let gw4 = Ipv4Addr::new(203, 0, 113, (16 * (k - 1) + 1) as u8);
    gw.ip(&format!(
        "link add {gw_dev} type veth peer name n0 netns {}",
        node.name
    ))?;
    addr_up(
        gw,
        gw_dev,
        &format!("{gw4}/28"),
        &format!("2001:db8:{k:x}::1/64"),
    )?;
    addr_up(
        node,
        "n0",
        &format!("{}/28", node4(k)),
        &format!("{}/64", node6(k)),
    )?;
    node.ip(&format!("route add default via {gw4}"))?;
    node.ip(&format!("-6 route add default via 2001:db8:{k:x}::1"))?;
    peer_offloads(node, "n0")
}

/// The client's link, shared by [`Lab`] and [`fleet::Fleet`]: veth `gw_dev` in `gw` (the
/// client's gateway, 198.51.100.1 and 2001:db8:c::1) to `c0` in `client` ([`CLIENT4`],
/// [`CLIENT6`]), with the client's default routes through `gw`.
fn wire_client(gw: &NetNs, gw_dev: &str, client: &NetNs) -> Result<(), String> {
    gw.ip(&format!(
        "link add {gw_dev} type veth peer name c0 netns {}",
        client.name
    ))?;
    addr_up(gw, gw_dev, "198.51.100.1/24", "2001:db8:c::1/64")?;
    addr_up(
        client,
        "c0",
        &format!("{CLIENT4}/24"),
        &format!("{CLIENT6}/64"),
    )?;
    client.ip("route add default via 198.51.100.1")?;
    client.ip("-6 route add default via 2001:db8:c::1")?;
    peer_offloads(client, "c0")
}

/// A veth peer facing an XDP interface: full checksums on send (no offload that leaves a
/// partial checksum for the XDP program to rewrite), GRO on receive (native XDP_REDIRECT into
/// a veth needs NAPI on its peer, which GRO enables).
fn peer_offloads(ns: &NetNs, dev: &str) -> Result<(), String> {
    ns.must(&["ethtool", "-K", dev, "tx", "off", "tso", "off", "gro", "on"])
        .map(|_| ())
}

/// Fails loudly without root: CI runs as root, so a skipped datapath test would hide a broken
/// datapath.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run `cargo xtask test` as root");
    }
}

/// A namespace-name prefix unique to this process and call: `cl{tag}{pid}x{seq}`, or with
/// `CIDLB_LAB_PREFIX` in place of `cl` when set (people sharing a machine tell their
/// namespaces apart by it).
pub fn unique_prefix(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{tag}{}x{}",
        std::env::var("CIDLB_LAB_PREFIX").unwrap_or_else(|_| "cl".into()),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
