//! Tunnel mode in the labs whose nodes reply through a router, not a balancer
//! ([`crate::routed`], [`crate::fleet`] with [`crate::fleet::Replies::Direct`]): a VIP's tunnel
//! settings, a node's `cidlb node` file, and the router's count of the VIPs' packets it
//! forwards (replies come from the VIP; where the router got them from says whether they
//! crossed a balancer).

use std::{net::IpAddr, path::Path};

use crate::{node4, node6, peer, vip_socket, ChildGuard, NetNs, PORT, VIP4, VIP6};

/// The UDP port the labs' balancers send GUE to and their nodes decapsulate it on.
pub const GUE_PORT: u16 = 6080;

/// A VIP's settings for tunnel mode (the inside of a `vips[]` flow mapping): `encap` (`ipip`
/// or `gue`, the latter to [`GUE_PORT`]) from the balancer's addresses `source4`, `source6`.
pub fn vip_settings(encap: &str, source4: &str, source6: &str) -> String {
    let gue = if encap == "gue" {
        format!(", gue_port: {GUE_PORT}")
    } else {
        String::new()
    };
    format!(
        "forwarding: tunnel, tunnel: {{encap: {encap}, source4: {source4}, source6: \"{source6}\"{gue}}}"
    )
}

/// Node `k`'s `cidlb node` file for `interface` (where the balancers' tunnels arrive): its
/// addresses [`node4`]`(k)`, [`node6`]`(k)`, the tunnel VIPs `vips`, IPIP and GUE on
/// [`GUE_PORT`].
pub fn node_config(interface: &str, k: usize, vips: &[IpAddr], pin_dir: &str) -> String {
    let vips: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
    format!(
        "interface: {interface}\ntunnel_addresses: [{}, \"{}\"]\nvips: [{}]\n\
         gue_port: {GUE_PORT}\npin_dir: {pin_dir}\n",
        node4(k),
        node6(k),
        vips.join(", ")
    )
}

/// Where a tunnel node's DTLS servers listen, and their extra arguments: DTLS 1.2 on
/// [`PORT`] and DTLS 1.3 on the port after it, each bound to each VIP (a wildcard-bound server
/// would answer from the node's own address).
pub const SERVERS: [(&str, u16, &[&str]); 4] = [
    ("v4", PORT, &[]),
    ("v6", PORT, &[]),
    ("v4", PORT + 1, &["--dtls", "1.3"]),
    ("v6", PORT + 1, &["--dtls", "1.3"]),
];

/// Node `k`'s DTLS servers ([`SERVERS`]) in `ns`, with the test peer `bin`.
pub fn servers(bin: &Path, ns: &NetNs, k: usize) -> Result<Vec<ChildGuard>, String> {
    SERVERS
        .iter()
        .map(|(fam, port, extra)| {
            peer::server_at(bin, ns, k as u32, &vip_socket(fam, *port), extra, None)
        })
        .collect()
}

/// Counts, in `router`'s FORWARD chain, the packets from either VIP (iptables for
/// [`VIP4`], ip6tables for [`VIP6`]) that each of `matches` selects (e.g. `&["-o", "rc"]`):
/// one rule per entry and family, appended in order; read with [`forwarded_from_vips`]. The
/// chain must hold no other rules.
pub fn count_forwarded_from_vips(router: &NetNs, matches: &[&[&str]]) -> Result<(), String> {
    for m in matches {
        for (tool, vip) in [
            ("iptables", VIP4.to_string()),
            ("ip6tables", VIP6.to_string()),
        ] {
            let mut cmd = vec![tool, "-A", "FORWARD", "-s", &vip];
            cmd.extend_from_slice(m);
            router.must(&cmd)?;
        }
    }
    Ok(())
}

/// What the rules of [`count_forwarded_from_vips`] counted, in their order, both families
/// summed.
pub fn forwarded_from_vips(router: &NetNs) -> Result<Vec<u64>, String> {
    let mut sums: Vec<u64> = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let out = router.must(&[tool, "-L", "FORWARD", "-nvx"])?;
        // Two header lines, then one line per rule, its packet count first.
        let pkts: Vec<u64> = out
            .lines()
            .skip(2)
            .map(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ok_or_else(|| format!("unexpected {tool} output in {}:\n{out}", router.name))
            })
            .collect::<Result<_, _>>()?;
        if sums.is_empty() {
            sums = vec![0; pkts.len()];
        }
        if pkts.len() != sums.len() {
            return Err(format!(
                "{tool} in {} holds {} FORWARD rules, iptables {}",
                router.name,
                pkts.len(),
                sums.len()
            ));
        }
        for (s, p) in sums.iter_mut().zip(pkts) {
            *s += p;
        }
    }
    Ok(sums)
}
