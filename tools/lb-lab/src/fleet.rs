//! The scale-out lab (issue #9): two balancers behind an ECMP router that learns the VIPs over
//! BGP, three nodes that each balancer reaches directly and that reply through either, or, in
//! tunnel mode, straight through the router.
//!
//! ```text
//!                               ┌─ uplink B1 (cidlb, BIRD) n1 n2 n3 ─┐
//!  client c0 ─── rc  router ────┤                                     ├── b1/b2 on each node
//!   198.51.100.7      (BIRD,    └─ uplink B2 (cidlb, BIRD) n1 n2 n3 ─┘   (node k: its service
//!                      ECMP) ─ rn1 rn2 rn3 ── r0 on each node             addresses on lo)
//!                              (Replies::Direct only)
//! ```
//! - client ↔ router: 198.51.100.0/24, 2001:db8:c::/64 (the lab's client addresses).
//! - router `rbI` ↔ balancer I `uplink`: 10.0.I.0/30 (.1 router, .2 balancer), fd00:I::/64.
//! - balancer I `nK` ↔ node K `bI`: 172.16.(10I+K).0/30 (.1 balancer, .2 node),
//!   fd1I:K::/64. Node K's service addresses are the lab's `node4(K)`/`node6(K)` on its `lo`;
//!   each balancer routes them via the node's link address.
//! - Nodes: a default route with one next hop per balancer (ECMP, L4 hash, source = service
//!   address); a balancer whose links go down drops out of it at once
//!   (`ignore_routes_with_linkdown`), so replies only take live balancers. With
//!   [`Replies::SameBalancer`] a node sends each reply back through the balancer that brought
//!   its request instead (conntrack marks and a routing table per balancer, as
//!   docs/several-balancers.md shows operators), and the ECMP route serves only what no balancer
//!   brought. With [`Replies::Direct`] (tunnel mode) node K also has a link of its own to the
//!   router, router `rnK` ↔ node `r0`: 10.1.K.0/30 (.1 router, .2 node), fd01:K::/64, and its
//!   default route goes there instead; the balancers' tunnels still arrive on `bI`, which
//!   the balancers reach by XDP_REDIRECT (each node its own interface).
//! - Router: forwarding, `fib_multipath_hash_policy=1` for IPv4 and IPv6; the VIP route is
//!   whatever BIRD installs (`deploy/bird/router.conf`). It counts the VIPs' packets it
//!   forwards, from the nodes' own links and from the balancers ([`Fleet::vip_replies`]).
//!
//! Every namespace is this code's own and is deleted on drop.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use crate::{addr_up, node4, node6, peer_offloads, tunnel, wire_client, ChildGuard, NetNs};

pub const BALANCERS: usize = 2;
pub const NODES: usize = 3;

/// The announce table both balancers' cidlb and BIRD use.
pub const TABLE: u32 = 4242;

/// How the nodes route their replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// By the ECMP default route: a reply takes either balancer by its own hash, not
    /// necessarily the one its request came through. (The nodes still mark connections by
    /// balancer, which routes nothing here, so that [`Fleet::reply_paths`] can count.)
    Ecmp,
    /// Through the balancer that brought the request: every packet from balancer I's MAC
    /// marks its connection I (`CONNMARK --set-mark`, iptables and ip6tables `mangle
    /// PREROUTING`), the mark is copied to the replies (`CONNMARK --restore-mark` in `mangle
    /// OUTPUT`), and `ip rule fwmark I` sends them to table [`reply_table`]`(I)`, whose default
    /// route goes via balancer I. A balancer sees the node's cookie (HelloVerifyRequest,
    /// HelloRetryRequest) only if the reply crosses it, and the client's next ClientHello
    /// comes back through the balancer that brought the first: only this way can that one
    /// prove the client's address (issue #19).
    SameBalancer,
    /// Straight to the client through the router, over a link of each node's own (node K's
    /// `r0` to the router's `rnK`), its default route: tunnel mode (`forwarding: tunnel`),
    /// where the nodes decapsulate, hold the VIPs and answer from them. No balancer carries a
    /// reply; the router counts where the VIPs' packets came from ([`Fleet::vip_replies`]).
    /// The router forwards with `rp_filter` off: it routes the VIPs towards the balancers.
    Direct,
}

/// What [`Fleet::vip_replies`] counted: packets from the VIPs (replies to the client) the
/// router forwarded, by where they came from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VipReplies {
    /// From a node's own link to the client ([`Replies::Direct`]).
    pub from_nodes: u64,
    /// From a balancer, to anywhere: replies a balancer carried (all of them in NAT mode).
    pub from_balancers: u64,
}

/// What [`Fleet::reply_paths`] counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplyPaths {
    /// DTLS replies (UDP from the lab's port) to connections a balancer brought.
    pub replies: u64,
    /// Those that left through another balancer.
    pub crossed: u64,
}

/// The routing table a node uses for replies to what balancer `i` (1-based) brought.
pub fn reply_table(i: usize) -> u32 {
    100 + i as u32
}

pub struct Fleet {
    pub client: NetNs,
    pub router: NetNs,
    /// Balancer namespaces, index 0 = balancer 1.
    pub balancers: Vec<NetNs>,
    pub nodes: Vec<NetNs>,
}

/// Balancer `i`'s (1-based) uplink addresses: (its own, the router's).
pub fn uplink4(i: usize) -> (String, String) {
    (format!("10.0.{i}.2"), format!("10.0.{i}.1"))
}

pub fn uplink6(i: usize) -> (String, String) {
    (format!("fd00:{i}::2"), format!("fd00:{i}::1"))
}

/// The IPv4 link between balancer `i` and node `k`: (the balancer's end, the node's).
pub fn pair4(i: usize, k: usize) -> (String, String) {
    let n = 10 * i + k;
    (format!("172.16.{n}.1"), format!("172.16.{n}.2"))
}

fn pair6(i: usize, k: usize) -> (String, String) {
    (format!("fd1{i}:{k}::1"), format!("fd1{i}:{k}::2"))
}

/// Node `k`'s own link to the router ([`Replies::Direct`]): (the router's end, the node's),
/// 10.1.K.0/30 and fd01:K::/64.
fn direct4(k: usize) -> (String, String) {
    (format!("10.1.{k}.1"), format!("10.1.{k}.2"))
}

fn direct6(k: usize) -> (String, String) {
    (format!("fd01:{k}::1"), format!("fd01:{k}::2"))
}

impl Fleet {
    /// Builds the fleet; namespace names start with `prefix`; nodes reply as `replies` says.
    pub fn up(prefix: &str, replies: Replies) -> Result<Self, String> {
        let f = Fleet {
            client: NetNs::named(&format!("{prefix}c"))?,
            router: NetNs::named(&format!("{prefix}r"))?,
            balancers: (1..=BALANCERS)
                .map(|i| NetNs::named(&format!("{prefix}b{i}")))
                .collect::<Result<_, _>>()?,
            nodes: (1..=NODES)
                .map(|k| NetNs::named(&format!("{prefix}n{k}")))
                .collect::<Result<_, _>>()?,
        };
        // A link taken down keeps its IPv6 addresses (as IPv4 does), so it comes back whole.
        for ns in [&f.client, &f.router]
            .into_iter()
            .chain(&f.balancers)
            .chain(&f.nodes)
        {
            ns.sysctl("net.ipv6.conf.default.keep_addr_on_down=1")?;
            ns.sysctl("net.ipv6.conf.all.keep_addr_on_down=1")?;
        }
        f.wire()?;
        f.mark_by_balancer()?;
        tunnel::count_forwarded_from_vips(
            &f.router,
            &[&["-i", "rn+", "-o", "rc"], &["-i", "rb+"]],
        )?;
        match replies {
            Replies::Ecmp => {}
            Replies::SameBalancer => f.reply_through_ingress()?,
            Replies::Direct => f.reply_through_router()?,
        }
        Ok(f)
    }

    /// On every node, for IPv4 and IPv6: every packet from balancer I's MAC marks its
    /// connection I (conntrack's mark only, which routes nothing by itself), and rules in
    /// `mangle POSTROUTING` count the DTLS replies of each balancer's connections and those
    /// of them that leave through another balancer ([`Fleet::reply_paths`]).
    fn mark_by_balancer(&self) -> Result<(), String> {
        let port = crate::PORT.to_string();
        for (ki, n) in self.nodes.iter().enumerate() {
            let k = ki + 1;
            for tool in ["iptables", "ip6tables"] {
                let rule = |args: &[&str]| {
                    let mut cmd = vec![tool, "-t", "mangle", "-A"];
                    cmd.extend(args);
                    n.must(&cmd).map(|_| ())
                };
                for (bi, b) in self.balancers.iter().enumerate() {
                    let i = bi + 1;
                    let mac = b
                        .mac(&format!("n{k}"))?
                        .map(|x| format!("{x:02x}"))
                        .join(":");
                    let (mark, link) = (i.to_string(), format!("b{i}"));
                    rule(&[
                        "PREROUTING",
                        "-m",
                        "mac",
                        "--mac-source",
                        &mac,
                        "-j",
                        "CONNMARK",
                        "--set-mark",
                        &mark,
                    ])?;
                    let reply = [
                        "POSTROUTING",
                        "-p",
                        "udp",
                        "--sport",
                        &port,
                        "-m",
                        "connmark",
                    ];
                    rule(&[&reply[..], &["--mark", &mark]].concat())?;
                    rule(&[&reply[..], &["--mark", &mark, "!", "-o", &link]].concat())?;
                }
            }
        }
        Ok(())
    }

    /// [`Replies::Direct`]: a link from every node to the router, the node's default routes
    /// through it (replacing the ECMP route through the balancers), and `rp_filter` off on
    /// the router, which gets the VIPs' replies from the nodes though it routes the VIPs to
    /// the balancers.
    fn reply_through_router(&self) -> Result<(), String> {
        let r = &self.router;
        for (ki, n) in self.nodes.iter().enumerate() {
            let k = ki + 1;
            let ((r4, n4), (r6, n6)) = (direct4(k), direct6(k));
            r.ip(&format!(
                "link add rn{k} type veth peer name r0 netns {}",
                n.name
            ))?;
            addr_up(
                r,
                &format!("rn{k}"),
                &format!("{r4}/30"),
                &format!("{r6}/64"),
            )?;
            addr_up(n, "r0", &format!("{n4}/30"), &format!("{n6}/64"))?;
            // The replies' checksums in full: no XDP program rewrites them on this path, but
            // one leaving a node with a partial checksum would reach the client so.
            peer_offloads(n, "r0")?;
            n.ip(&format!(
                "route replace default via {r4} dev r0 src {}",
                node4(k)
            ))?;
            n.ip(&format!(
                "-6 route replace default via {r6} dev r0 src {}",
                node6(k)
            ))?;
        }
        let links = String::from_utf8_lossy(&r.exec(&["ls", "/proc/sys/net/ipv4/conf"]).stdout)
            .into_owned();
        for dev in links.split_whitespace() {
            r.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter=0"))?;
        }
        Ok(())
    }

    /// The router's count of the VIPs' packets it forwarded, by where they came from (iptables
    /// and ip6tables FORWARD rules, set up with the fleet).
    pub fn vip_replies(&self) -> Result<VipReplies, String> {
        match tunnel::forwarded_from_vips(&self.router)?[..] {
            [from_nodes, from_balancers] => Ok(VipReplies {
                from_nodes,
                from_balancers,
            }),
            ref other => Err(format!("the router counts {other:?}, not two rules")),
        }
    }

    /// DTLS replies the nodes sent to connections a balancer brought, and how many of them
    /// left through the other balancer, summed over nodes and both families.
    pub fn reply_paths(&self) -> Result<ReplyPaths, String> {
        let mut sum = ReplyPaths::default();
        for n in &self.nodes {
            for tool in ["iptables", "ip6tables"] {
                let out = n.must(&[tool, "-t", "mangle", "-L", "POSTROUTING", "-nvx"])?;
                // Two header lines, then per balancer: its replies, those that crossed.
                let pkts: Vec<u64> = out
                    .lines()
                    .skip(2)
                    .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                    .collect();
                if pkts.len() != 2 * BALANCERS {
                    return Err(format!("unexpected {tool} output in {}:\n{out}", n.name));
                }
                for pair in pkts.chunks(2) {
                    sum.replies += pair[0];
                    sum.crossed += pair[1];
                }
            }
        }
        Ok(sum)
    }

    /// Switches the nodes to [`Replies::SameBalancer`] (a fleet built with
    /// [`Replies::Ecmp`] can be switched while running; new replies follow at once): each
    /// reply takes its connection's mark (`CONNMARK --restore-mark` in `mangle OUTPUT`), and
    /// `ip rule fwmark I` sends it to [`reply_table`]`(I)`.
    pub fn reply_through_ingress(&self) -> Result<(), String> {
        for (ki, n) in self.nodes.iter().enumerate() {
            let k = ki + 1;
            for tool in ["iptables", "ip6tables"] {
                n.must(&[
                    tool,
                    "-t",
                    "mangle",
                    "-A",
                    "OUTPUT",
                    "-j",
                    "CONNMARK",
                    "--restore-mark",
                ])?;
            }
            for i in 1..=BALANCERS {
                let t = reply_table(i);
                n.ip(&format!("rule add fwmark {i} lookup {t}"))?;
                n.ip(&format!("-6 rule add fwmark {i} lookup {t}"))?;
                self.reply_routes(i, k)?;
            }
        }
        Ok(())
    }

    /// Node `k`'s default routes via balancer `i` in [`reply_table`]`(i)` (both 1-based).
    fn reply_routes(&self, i: usize, k: usize) -> Result<(), String> {
        let n = &self.nodes[k - 1];
        let t = reply_table(i);
        n.ip(&format!(
            "route replace default via {} dev b{i} src {} table {t}",
            pair4(i, k).0,
            node4(k)
        ))?;
        n.ip(&format!(
            "-6 route replace default via {} dev b{i} src {} table {t}",
            pair6(i, k).0,
            node6(k)
        ))
    }

    /// Whether the nodes reply through the balancer that brought the request (their
    /// `ip rule`s say so).
    fn replies_same_balancer(&self) -> bool {
        let rules = String::from_utf8_lossy(&self.nodes[0].exec(&["ip", "rule", "show"]).stdout)
            .into_owned();
        rules.contains(&format!("lookup {}", reply_table(1)))
    }

    fn wire(&self) -> Result<(), String> {
        let r = &self.router;
        wire_client(r, "rc", &self.client)?;
        for k in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // L4 hash: each client flow (5-tuple) takes one balancer.
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            r.sysctl(k)?;
        }
        for (bi, b) in self.balancers.iter().enumerate() {
            let i = bi + 1;
            let ((b4, r4), (b6, r6)) = (uplink4(i), uplink6(i));
            r.ip(&format!(
                "link add rb{i} type veth peer name uplink netns {}",
                b.name
            ))?;
            addr_up(
                r,
                &format!("rb{i}"),
                &format!("{r4}/30"),
                &format!("{r6}/64"),
            )?;
            peer_offloads(r, &format!("rb{i}"))?;
            addr_up(b, "uplink", &format!("{b4}/30"), &format!("{b6}/64"))?;
            b.ip(&format!("route add default via {r4}"))?;
            b.ip(&format!("-6 route add default via {r6}"))?;
            b.sysctl("net.ipv4.ip_forward=1")?;
            b.sysctl("net.ipv6.conf.all.forwarding=1")?;
            for (ki, n) in self.nodes.iter().enumerate() {
                let k = ki + 1;
                let ((bl4, nl4), (bl6, nl6)) = (pair4(i, k), pair6(i, k));
                b.ip(&format!(
                    "link add n{k} type veth peer name b{i} netns {}",
                    n.name
                ))?;
                addr_up(
                    b,
                    &format!("n{k}"),
                    &format!("{bl4}/30"),
                    &format!("{bl6}/64"),
                )?;
                b.ip(&format!("route add {}/32 via {nl4} dev n{k}", node4(k)))?;
                b.ip(&format!("-6 route add {}/128 via {nl6} dev n{k}", node6(k)))?;
                addr_up(
                    n,
                    &format!("b{i}"),
                    &format!("{nl4}/30"),
                    &format!("{nl6}/64"),
                )?;
                peer_offloads(n, &format!("b{i}"))?;
            }
        }
        for (ki, n) in self.nodes.iter().enumerate() {
            let k = ki + 1;
            n.ip(&format!("addr add {}/32 dev lo", node4(k)))?;
            n.ip(&format!("addr add {}/128 dev lo", node6(k)))?;
            for s in [
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.ignore_routes_with_linkdown=1",
                "net.ipv6.conf.all.ignore_routes_with_linkdown=1",
            ] {
                n.sysctl(s)?;
            }
            let hops4: Vec<String> = (1..=BALANCERS)
                .map(|i| format!("nexthop via {} dev b{i}", pair4(i, k).0))
                .collect();
            let hops6: Vec<String> = (1..=BALANCERS)
                .map(|i| format!("nexthop via {} dev b{i}", pair6(i, k).0))
                .collect();
            n.ip(&format!(
                "route add default src {} {}",
                node4(k),
                hops4.join(" ")
            ))?;
            n.ip(&format!(
                "-6 route add default src {} {}",
                node6(k),
                hops6.join(" ")
            ))?;
        }
        Ok(())
    }

    /// A balancer's XDP interfaces: the uplink, then one per node.
    pub fn balancer_interfaces() -> Vec<String> {
        let mut v = vec!["uplink".to_owned()];
        v.extend((1..=NODES).map(|k| format!("n{k}")));
        v
    }

    /// Cuts every link of balancer `i` (1-based) at the far end (`up` false: the router's and
    /// the nodes' ends go down, so the balancer sees its carrier go) or restores them. The
    /// router's BGP session to it times out (hold time), and the nodes' ECMP routes skip it.
    ///
    /// Taking a node's link down deletes the routes through it, and the single-hop default in
    /// the node's [`reply_table`] does not come back with the link (the ECMP route's hop
    /// does): with [`Replies::SameBalancer`] it is put back here, as an operator's interface
    /// configuration would.
    pub fn set_balancer_links(&self, i: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        self.router.ip(&format!("link set rb{i} {state}"))?;
        let same = self.replies_same_balancer();
        for (ki, n) in self.nodes.iter().enumerate() {
            n.ip(&format!("link set b{i} {state}"))?;
            if up && same {
                self.reply_routes(i, ki + 1)?;
            }
        }
        Ok(())
    }

    /// The router's kernel route to `vip` (`ip route show`), e.g. to count its next hops.
    pub fn router_route(&self, vip: &str) -> String {
        let fam = if vip.contains(':') { "-6" } else { "-4" };
        String::from_utf8_lossy(&self.router.exec(&["ip", fam, "route", "show", vip]).stdout)
            .into_owned()
    }
}

/// `deploy/bird/*.conf` with its `define NAME = VALUE;` lines replaced by `values`. Every name
/// in `values` must be defined in the file (a renamed define fails loudly).
pub fn bird_config(template: &Path, values: &[(&str, String)]) -> Result<String, String> {
    let text =
        std::fs::read_to_string(template).map_err(|e| format!("{}: {e}", template.display()))?;
    let mut out = String::new();
    let mut seen = Vec::new();
    for line in text.lines() {
        let name = line
            .strip_prefix("define ")
            .and_then(|l| l.split_whitespace().next());
        match name.and_then(|n| values.iter().find(|(k, _)| *k == n)) {
            Some((k, v)) => {
                out.push_str(&format!("define {k} = {v};\n"));
                seen.push(*k);
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, _) in values {
        if !seen.contains(k) {
            return Err(format!("{}: no `define {k}`", template.display()));
        }
    }
    Ok(out)
}

/// BIRD 2 in the foreground in `ns` with `config` (written to `dir`), its control socket in
/// `dir`; killed when the guard drops.
/// The router's BIRD, from `template` (`deploy/bird/router.conf`) with its `define` lines set
/// to this fleet's addresses: both balancers' uplinks, IPv4 and IPv6.
pub fn start_router_bird(f: &Fleet, dir: &Path, template: &Path) -> Result<Bird, String> {
    let (b1_4, r1_4) = uplink4(1);
    let (b2_4, r2_4) = uplink4(2);
    let (b1_6, r1_6) = uplink6(1);
    let (b2_6, r2_6) = uplink6(2);
    let conf = bird_config(
        template,
        &[
            ("ROUTER_ID", r1_4.clone()),
            ("B1_LOCAL4", r1_4),
            ("B1_PEER4", b1_4),
            ("B1_LOCAL6", r1_6),
            ("B1_PEER6", b1_6),
            ("B2_LOCAL4", r2_4),
            ("B2_PEER4", b2_4),
            ("B2_LOCAL6", r2_6),
            ("B2_PEER6", b2_6),
        ],
    )?;
    Bird::start(&f.router, dir, "router", &conf)
}

pub struct Bird {
    pub child: ChildGuard,
    pub socket: PathBuf,
}

impl Bird {
    pub fn start(ns: &NetNs, dir: &Path, name: &str, config: &str) -> Result<Self, String> {
        let conf = dir.join(format!("{name}.conf"));
        // Log to stderr (the file below) as well as wherever the config says.
        let config = format!("log stderr all;\n{config}");
        std::fs::write(&conf, config).map_err(|e| format!("{}: {e}", conf.display()))?;
        let socket = dir.join(format!("{name}.ctl"));
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = ns
            .command("bird")
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "spawn bird in netns {} (Debian package bird2): {e}",
                    ns.name
                )
            })?;
        Ok(Self {
            child: ChildGuard(child),
            socket,
        })
    }

    /// `birdc -s SOCKET ARGS` output.
    pub fn ctl(&self, args: &[&str]) -> String {
        std::process::Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("birdc: {e}"))
    }
}
