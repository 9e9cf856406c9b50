//! The routed lab (tunnel mode, docs/forwarding.md "Tunnel mode"): nodes that do not route through the
//! balancer. Client, balancer and nodes each hang off a router; the router sends the VIPs to
//! the balancer, and the nodes' default route is the router, so their replies go straight to
//! the client. NAT and tunnel mode share it: the router sends what a node sends from its own
//! address to the clients (a NAT VIP's replies, to be un-NATed) to the balancer, and what it
//! sends from a VIP (a tunnel VIP's replies) straight to the client.
//!
//! ```text
//!  client c0 ─── rc ┐
//!                   router ─── rb ──── lbr balancer (cidlb, tunnel VIPs)
//!                   │      └── rbn ─── lbn
//!                   ├─ rn1 ─── n0 node 1 (cidlb node: decapsulation, the VIPs on lo)
//!                   └─ rn2 ─── n0 node 2
//! ```
//! - client ↔ router: the lab's client addresses, as in [`crate::Lab`].
//! - router `rb` ↔ balancer `lbr`: 10.66.0.1/30 ↔ 10.66.0.2, fd66::1/64 ↔ fd66::2; the
//!   router routes the VIPs to the balancer, whose default route is the router.
//! - router `rbn` ↔ balancer `lbn`: 10.67.0.1/30 ↔ 10.67.0.2, fd67::1/64 ↔ fd67::2; the
//!   balancer reaches the nodes' networks through it (a two-armed balancer: its tunnels leave
//!   by XDP_REDIRECT). [`Routed::one_armed`] routes them back out of `lbr` instead (XDP_TX),
//!   which on veth needs an XDP program on the router's `rb` (docs/forwarding.md "Tunnel mode").
//! - router `rnK` ↔ node K's `n0`: the node's addresses of [`crate::Lab`] (`node4(K)`/28,
//!   `node6(K)`/64, the router at .1 and ::1), the nodes' default route the router.
//! - The router forwards with `rp_filter` off: replies come from the VIP, which it routes
//!   towards the balancer.
//! - Policy routing on the router, one rule per node and family: from node K's address, in
//!   from `rnK`, to the client's prefix: table [`NAT_REPLY_TABLE`], whose default route is the
//!   balancer's `lbn`. The rule takes only packets from the node's link, so a reply the
//!   balancer hands back to its kernel cannot loop.
//! - [`VIP4`], [`VIP6`] and [`VIP4_TUNNEL`] (the demo's tunnel VIP beside its NAT ones) are
//!   routed to the balancer.
//!
//! Every namespace is this code's own and is deleted on drop.

use std::net::{IpAddr, Ipv4Addr};

use crate::{
    addr_up, node4, node6, peer_offloads, tunnel, wire_client, wire_node, Lab, NetNs, VIP4, VIP6,
};

/// A second IPv4 VIP the router sends to the balancer: the demo's tunnel VIP beside the NAT
/// ones.
pub const VIP4_TUNNEL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

/// The router's table for NAT replies: its default route is the balancer's `lbn`.
pub const NAT_REPLY_TABLE: u32 = 66;

/// The balancer's interfaces: towards the clients (VIP traffic arrives here), towards the
/// nodes.
pub const BALANCER_IFACE: &str = "lbr";
pub const BALANCER_NODE_IFACE: &str = "lbn";
/// The balancer's addresses: the tunnels' outer source.
pub const BALANCER4: &str = "10.66.0.2";
pub const BALANCER6: &str = "fd66::2";

pub struct Routed {
    /// Client, balancer and nodes, as in the direct lab (so its helpers apply).
    pub lab: Lab,
    pub router: NetNs,
}

impl Routed {
    pub fn up(prefix: &str, nodes: usize) -> Result<Self, String> {
        let lab = Lab {
            client: NetNs::named(&format!("{prefix}c"))?,
            balancer: NetNs::named(&format!("{prefix}b"))?,
            nodes: (1..=nodes)
                .map(|k| NetNs::named(&format!("{prefix}n{k}")))
                .collect::<Result<_, _>>()?,
        };
        let r = Routed {
            lab,
            router: NetNs::named(&format!("{prefix}r"))?,
        };
        r.wire()?;
        Ok(r)
    }

    fn wire(&self) -> Result<(), String> {
        let (r, b) = (&self.router, &self.lab.balancer);
        wire_client(r, "rc", &self.lab.client)?;
        r.ip(&format!(
            "link add rb type veth peer name {BALANCER_IFACE} netns {}",
            b.name
        ))?;
        addr_up(r, "rb", "10.66.0.1/30", "fd66::1/64")?;
        addr_up(
            b,
            BALANCER_IFACE,
            &format!("{BALANCER4}/30"),
            &format!("{BALANCER6}/64"),
        )?;
        r.ip(&format!(
            "link add rbn type veth peer name {BALANCER_NODE_IFACE} netns {}",
            b.name
        ))?;
        addr_up(r, "rbn", "10.67.0.1/30", "fd67::1/64")?;
        addr_up(b, BALANCER_NODE_IFACE, "10.67.0.2/30", "fd67::2/64")?;
        // The balancer redirects into lbn: GRO (NAPI) on the router's end.
        peer_offloads(r, "rb")?;
        peer_offloads(r, "rbn")?;
        b.ip("route add default via 10.66.0.1")?;
        b.ip("-6 route add default via fd66::1")?;
        b.ip("route add 203.0.113.0/24 via 10.67.0.1")?;
        r.ip(&format!("route add {VIP4}/32 via {BALANCER4}"))?;
        r.ip(&format!("route add {VIP4_TUNNEL}/32 via {BALANCER4}"))?;
        r.ip(&format!("-6 route add {VIP6}/128 via {BALANCER6}"))?;
        // NAT replies (from a node's own address) go to the balancer, which un-NATs them.
        r.ip(&format!(
            "route add default via 10.67.0.2 dev rbn table {NAT_REPLY_TABLE}"
        ))?;
        r.ip(&format!(
            "-6 route add default via fd67::2 dev rbn table {NAT_REPLY_TABLE}"
        ))?;
        for k in 1..=self.lab.nodes.len() {
            let dev = format!("rn{k}");
            wire_node(r, &dev, &self.lab.nodes[k - 1], k)?;
            b.ip(&format!("-6 route add 2001:db8:{k:x}::/64 via fd67::1"))?;
            // The node's decapsulation is an XDP program too: GRO on the router's end.
            peer_offloads(r, &dev)?;
            r.ip(&format!(
                "rule add iif {dev} from {} to 198.51.100.0/24 lookup {NAT_REPLY_TABLE}",
                node4(k)
            ))?;
            r.ip(&format!(
                "-6 rule add iif {dev} from {} to 2001:db8:c::/64 lookup {NAT_REPLY_TABLE}",
                node6(k)
            ))?;
        }
        r.sysctl("net.ipv4.ip_forward=1")?;
        r.sysctl("net.ipv6.conf.all.forwarding=1")?;
        for k in ["all", "default", "rb", "rbn", "rc"]
            .into_iter()
            .map(str::to_owned)
            .chain((1..=self.lab.nodes.len()).map(|k| format!("rn{k}")))
        {
            r.sysctl(&format!("net.ipv4.conf.{k}.rp_filter=0"))?;
        }
        b.sysctl("net.ipv4.ip_forward=1")?;
        b.sysctl("net.ipv6.conf.all.forwarding=1")
    }

    /// A cidlb config for the balancer: both VIPs ([`VIP4`], [`VIP6`]) forwarded by
    /// `forwarding`: `nat`, or tunnel mode with that encapsulation (`ipip`, or `gue` on
    /// [`tunnel::GUE_PORT`]) from the balancer's addresses; on [`crate::PORT`] (the nodes' DTLS 1.2 servers)
    /// and the port after it (their DTLS 1.3 servers); node K with id K.
    pub fn cidlb_config(&self, pin_dir: &str, forwarding: &str, extra: &str) -> String {
        let ports = [crate::PORT, crate::PORT + 1];
        self.cidlb_config_vips(
            &[
                (IpAddr::V4(VIP4), &ports[..], forwarding),
                (IpAddr::V6(VIP6), &ports[..], forwarding),
            ],
            pin_dir,
            extra,
        )
    }

    /// A cidlb config for the balancer with these VIPs: (address, ports, forwarding as in
    /// [`Routed::cidlb_config`]); node K with id K.
    pub fn cidlb_config_vips(
        &self,
        vips: &[(IpAddr, &[u16], &str)],
        pin_dir: &str,
        extra: &str,
    ) -> String {
        let mut s = format!(
            "interfaces: [{BALANCER_IFACE}, {BALANCER_NODE_IFACE}]\nxdp_mode: native\nvips:\n"
        );
        for (address, ports, forwarding) in vips {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            let how = match *forwarding {
                "nat" => "forwarding: nat".to_owned(),
                encap => tunnel::vip_settings(encap, BALANCER4, BALANCER6),
            };
            s.push_str(&format!(
                "  - {{address: \"{address}\", ports: [{}], {how}}}\n",
                ports.join(", ")
            ));
        }
        s.push_str("nodes:\n");
        for k in 1..=self.lab.nodes.len() {
            s.push_str(&format!(
                "  - {{id: {k}, address: [{}, \"{}\"]}}\n",
                node4(k),
                node6(k)
            ));
        }
        s.push_str(&format!("pin_dir: {pin_dir}\n{extra}"));
        s
    }

    /// Makes the balancer one-armed: it reaches the nodes' networks through `lbr` (the router's
    /// `rb`) as well, so what it sends them leaves by XDP_TX, back out of the interface it came
    /// in on, as on a balancer with one link.
    pub fn one_armed(&self) -> Result<(), String> {
        let b = &self.lab.balancer;
        b.ip("route replace 203.0.113.0/24 via 10.66.0.1")?;
        for k in 1..=self.lab.nodes.len() {
            b.ip(&format!("-6 route replace 2001:db8:{k:x}::/64 via fd66::1"))?;
        }
        Ok(())
    }

    /// Makes the balancer's kernel resolve its next hops (the router's `rb` and `rbn`): a
    /// tunnel packet whose next hop has no neighbour entry is dropped, not handed to the
    /// kernel, and a lab without health checks sends nothing else that would resolve it.
    pub fn resolve_balancer_next_hops(&self) -> Result<(), String> {
        let name = self.lab.balancer.name.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            crate::enter(&name);
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for hop in ["10.66.0.1:9", "10.67.0.1:9"] {
                s.send_to(b"resolve", hop)?;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            Ok(())
        })
        .join()
        .map_err(|_| "the resolving thread panicked".to_owned())?
        .map_err(|e| format!("resolving the balancer's next hops: {e}"))
    }

    /// Counts, on the router, the packets from `source` (an address or prefix of either
    /// family) it forwards out of `rb` (to the balancer), `rbn` (to the balancer's node side)
    /// and `rc` (to the client): iptables / ip6tables FORWARD rules, read by
    /// [`Routed::forwarded`].
    pub fn count_forwarded(&self, source: &str) -> Result<(), String> {
        let tool = if source.contains(':') {
            "ip6tables"
        } else {
            "iptables"
        };
        for dev in ["rb", "rbn", "rc"] {
            self.router
                .must(&[tool, "-A", "FORWARD", "-s", source, "-o", dev])?;
        }
        Ok(())
    }

    /// Packets from `source` (as given to [`Routed::count_forwarded`]) the router forwarded
    /// out of `dev`.
    pub fn forwarded(&self, source: &str, dev: &str) -> Result<u64, String> {
        let tool = if source.contains(':') {
            "ip6tables"
        } else {
            "iptables"
        };
        let out = self.router.must(&[tool, "-L", "FORWARD", "-nvx"])?;
        // The listing shows a /32 or /128 as the bare address.
        let shown = source
            .strip_suffix("/32")
            .or_else(|| source.strip_suffix("/128"))
            .unwrap_or(source);
        Ok(out
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            // pkts bytes target prot opt in out source destination (ip6tables: no opt)
            .filter(|f| f.contains(&dev) && f.contains(&shown))
            .filter_map(|f| f[0].parse::<u64>().ok())
            .sum())
    }

    /// Node K's `cidlb node` file for [`VIP4`] and [`VIP6`].
    pub fn node_config(&self, k: usize, pin_dir: &str) -> String {
        self.node_config_vips(k, &[IpAddr::V4(VIP4), IpAddr::V6(VIP6)], pin_dir)
    }

    /// Node K's `cidlb node` file for the tunnel VIPs `vips`.
    pub fn node_config_vips(&self, k: usize, vips: &[IpAddr], pin_dir: &str) -> String {
        tunnel::node_config("n0", k, vips, pin_dir)
    }
}
