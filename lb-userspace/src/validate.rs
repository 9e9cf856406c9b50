//! Validation of a parsed config: what serde's types cannot check. Ranges, uniqueness, and
//! whether the datapath can represent the config (stateless reverse NAT needs every node
//! address+port to map back to one VIP). Errors are `(key, problem)`; `Config::parse`, here
//! because it validates, adds the file.

use std::{collections::HashSet, path::Path, time::Duration};

use lb_common::{
    cookie::MAX_COOKIE_CAPACITY, frag::MAX_FRAG_CAPACITY, limits::MAX_EXEMPT,
    tunnel::MAX_SOURCE_BITS, MAX_FLOW_CAPACITY, MAX_IFACES, MAX_NODES, MAX_REVERSE, MAX_VIPS,
};

use crate::{
    config::{limits::Limits, Config, ConfigError, Encap, Forwarding, Vip},
    plan::limits::exempt_key,
};

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        validate(&cfg).map_err(|(key, problem)| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            problem,
        })?;
        Ok(cfg)
    }
}

fn validate(cfg: &Config) -> Result<(), (String, String)> {
    if let Some(l) = &cfg.limits {
        limits(l)?;
    }
    let err = |k: &str, p: String| Err((k.to_owned(), p));
    // At most one a microsecond per CPU: the GCRA's interval must stay a whole number of ns.
    if cfg.icmp.rate == 0 || cfg.icmp.rate > 1_000_000 {
        return err(
            "icmp.rate",
            format!(
                "{} ICMP errors per second and CPU: give 1 to 1000000 (default {})",
                cfg.icmp.rate,
                lb_common::DEFAULT_ICMP_RATE
            ),
        );
    }
    if cfg.interfaces.is_empty() {
        return err(
            "interfaces",
            "list at least one interface to attach to".into(),
        );
    }
    if cfg.interfaces.len() > MAX_IFACES as usize {
        return err("interfaces", format!("at most {MAX_IFACES} interfaces"));
    }
    let mut ifs = HashSet::new();
    for (i, name) in cfg.interfaces.iter().enumerate() {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return err(
                &format!("interfaces[{i}]"),
                format!("{name:?} is not a valid interface name"),
            );
        }
        if !ifs.insert(name) {
            return err(
                &format!("interfaces[{i}]"),
                format!("{name:?} is listed twice"),
            );
        }
    }

    if cfg.vips.is_empty() {
        return err("vips", "list at least one VIP".into());
    }
    if cfg.vips.len() > MAX_VIPS as usize {
        return err("vips", format!("at most {MAX_VIPS} VIP addresses"));
    }
    let mut vip_addrs = HashSet::new();
    for (i, vip) in cfg.vips.iter().enumerate() {
        if !vip_addrs.insert(vip.address) {
            return err(
                &format!("vips[{i}].address"),
                format!(
                    "{} is listed twice; put all its ports in one entry",
                    vip.address
                ),
            );
        }
        if vip.ports.is_empty() {
            return err(
                &format!("vips[{i}].ports"),
                "list at least one port or range".into(),
            );
        }
        tunnel(cfg, i, vip)?;
    }

    let d = &cfg.dtls;
    if !(1..=32).contains(&d.cid_length) {
        return err(
            "dtls.cid_length",
            format!(
                "{} is outside 1..32 (RFC 9146 allows up to 255, cidlb up to 32)",
                d.cid_length
            ),
        );
    }
    if !(1..=4).contains(&d.node_id_length) {
        return err(
            "dtls.node_id_length",
            format!("{} is outside 1..4", d.node_id_length),
        );
    }
    // In u64: `node_id_offset: 4294967295` must not wrap around into a small sum.
    let id_end = u64::from(d.node_id_offset) + u64::from(d.node_id_length);
    if id_end > u64::from(d.cid_length) {
        return err(
            "dtls.node_id_offset",
            format!(
                "node id bytes {}..{id_end} do not fit in a {}-byte CID",
                d.node_id_offset, d.cid_length
            ),
        );
    }

    if let Some(versions) = &d.versions {
        if versions.is_empty() {
            return err(
                "dtls.versions",
                "list \"1.2\" and/or \"1.3\" (the record formats routed by CID), or leave the key out for both".into(),
            );
        }
        for (i, v) in versions.iter().enumerate() {
            if versions[..i].contains(v) {
                return err(
                    &format!("dtls.versions[{i}]"),
                    format!("{} is listed twice", v.name()),
                );
            }
        }
    }

    if cfg.flows.idle_timeout.is_zero() {
        return err("flows.idle_timeout", "must be longer than 0".into());
    }
    if !(1..=MAX_FLOW_CAPACITY).contains(&cfg.flows.capacity) {
        return err(
            "flows.capacity",
            format!(
                "{} is outside 1..{MAX_FLOW_CAPACITY} (the table is preallocated)",
                cfg.flows.capacity
            ),
        );
    }

    if cfg.nodes.is_empty() {
        return err("nodes", "list at least one node".into());
    }
    if cfg.nodes.len() > MAX_NODES as usize {
        return err("nodes", format!("at most {MAX_NODES} nodes"));
    }
    let id_limit = 1u64 << (8 * d.node_id_length);
    let mut ids = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, n) in cfg.nodes.iter().enumerate() {
        if u64::from(n.id) >= id_limit {
            return err(
                &format!("nodes[{i}].id"),
                format!(
                    "{} does not fit in dtls.node_id_length = {} byte(s)",
                    n.id, d.node_id_length
                ),
            );
        }
        if !ids.insert(n.id) {
            return err(
                &format!("nodes[{i}].id"),
                format!("node id {} is used twice", n.id),
            );
        }
        let (v4, v6) = (
            n.addresses.iter().filter(|a| a.is_ipv4()).count(),
            n.addresses.iter().filter(|a| a.is_ipv6()).count(),
        );
        if n.addresses.is_empty() || v4 > 1 || v6 > 1 {
            return err(
                &format!("nodes[{i}].address"),
                "give one address, or one IPv4 and one IPv6".into(),
            );
        }
        for a in &n.addresses {
            if vip_addrs.contains(a) {
                return err(&format!("nodes[{i}].address"), format!("{a} is also a VIP"));
            }
            if !addrs.insert(*a) {
                return err(
                    &format!("nodes[{i}].address"),
                    format!("{a} is used by another node"),
                );
            }
        }
        if !(1..=100).contains(&n.weight) {
            return err(
                &format!("nodes[{i}].weight"),
                format!("{} is outside 1..100", n.weight),
            );
        }
        if n.port == Some(0) {
            return err(
                &format!("nodes[{i}].port"),
                "0 is not a port; leave it out to keep the VIP port".into(),
            );
        }
    }
    for (i, vip) in cfg.vips.iter().enumerate() {
        if !cfg
            .nodes
            .iter()
            .any(|n| n.address_for(vip.address).is_some())
        {
            let fam = if vip.address.is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            };
            return err(
                &format!("vips[{i}].address"),
                format!("no node has an {fam} address to serve {}", vip.address),
            );
        }
    }
    for fam in [true, false] {
        let total: u32 = cfg
            .nodes
            .iter()
            .filter(|n| {
                if fam {
                    n.v4().is_some()
                } else {
                    n.v6().is_some()
                }
            })
            .map(|n| n.weight)
            .sum();
        if total > MAX_NODES {
            return err(
                "nodes",
                format!(
                    "weights of the {} nodes add up to {total}, more than {MAX_NODES}",
                    if fam { "IPv4" } else { "IPv6" }
                ),
            );
        }
    }
    let h = &cfg.health;
    if h.interval.is_zero() || h.timeout.is_zero() {
        return err(
            "health",
            "interval and timeout must be longer than 0".into(),
        );
    }
    if h.timeout > h.interval {
        return err(
            "health.timeout",
            format!(
                "{:?} is longer than the interval {:?}",
                h.timeout, h.interval
            ),
        );
    }
    if h.fall == 0 || h.rise == 0 {
        return err("health", "fall and rise must be at least 1".into());
    }
    if let Some(t) = h.panic_threshold.filter(|&t| t > 100) {
        return err(
            "health.panic_threshold",
            format!("{t} is a percent of the family's active nodes: 0..100 (0: never panic)"),
        );
    }
    let Some(a) = &cfg.announce else {
        return reverse_nat(cfg);
    };
    // 253, 254, 255: the kernel's default, main and local tables, which route packets: a VIP
    // host route via lo there would deliver the VIP's traffic to this box.
    if (253..=255).contains(&a.table) {
        return err(
            "announce.table",
            format!(
                "{} is one of the kernel's own tables (default, main, local), which route \
                 packets; use a table nothing routes by, such as 4242",
                a.table
            ),
        );
    }
    if a.grace.is_zero() {
        return err(
            "announce.grace",
            "must be longer than 0 (the heartbeat is written every second; 10s rides out a restart)"
                .into(),
        );
    }
    reverse_nat(cfg)?;
    Ok(())
}

/// A VIP's distinct ports as a 65536-bit set (ranges may overlap).
/// Upper bound on counts and bursts: keeps `burst × interval` far from u64 overflow.
const MAX_COUNT: u64 = 1 << 32;

/// What a VIP's `forwarding` and `tunnel` cannot express.
fn tunnel(cfg: &Config, i: usize, vip: &Vip) -> Result<(), (String, String)> {
    let err = |k: &str, p: String| Err((format!("vips[{i}].{k}"), p));
    match (vip.forwarding, &vip.tunnel) {
        (Forwarding::Tunnel, None) => {
            return err(
                "tunnel",
                "forwarding: tunnel needs a tunnel section: encap (ipip or gue) and the outer \
                 source (source4 for an IPv4 VIP, source6 for an IPv6 one)"
                    .into(),
            )
        }
        (Forwarding::Nat, Some(_)) => {
            return err(
                "tunnel",
                "is set, but forwarding is nat (the default): set `forwarding: tunnel`, or remove \
                 the tunnel section"
                    .into(),
            )
        }
        _ => {}
    }
    let Some(t) = vip.tunnel() else {
        return Ok(());
    };
    let (source, key, max) = if vip.address.is_ipv4() {
        (t.source4, "tunnel.source4", 32)
    } else {
        (t.source6, "tunnel.source6", 128)
    };
    let Some(source) = source else {
        return err(
            key,
            format!(
                "{} is encapsulated in an outer header of its own family: set the outer source \
                 address, or a prefix whose host bits follow the flow",
                vip.address
            ),
        );
    };
    if source.addr.is_ipv4() != vip.address.is_ipv4() {
        return err(key, format!("{source} is not of {}'s family", vip.address));
    }
    if max - source.len > MAX_SOURCE_BITS {
        return err(
            key,
            format!(
                "{source} leaves {} host bits to the flow hash; at most {MAX_SOURCE_BITS} (a /{} \
                 or longer)",
                max - source.len,
                max - MAX_SOURCE_BITS
            ),
        );
    }
    match (t.encap, t.gue_port) {
        (Encap::Gue, None | Some(0)) => {
            return err(
                "tunnel.gue_port",
                "encap: gue needs the UDP port the nodes decapsulate on (1..65535)".into(),
            )
        }
        (Encap::Ipip, Some(_)) => {
            return err(
                "tunnel.gue_port",
                "is only for encap: gue (ipip has no UDP header)".into(),
            )
        }
        _ => {}
    }
    if let Some(mtu) = t.mtu {
        // The tunnel must carry the smallest packet a client may send without fragmenting:
        // 1280 bytes over IPv6 (RFC 8200 §5; no packet-too-big below that helps), 576 over
        // IPv4 (RFC 791's datagram every host accepts; Linux takes no path MTU below 552).
        let v6 = vip.address.is_ipv6();
        let over = lb_common::tunnel::overhead(
            match t.encap {
                Encap::Ipip => lb_common::tunnel::ENCAP_IPIP,
                Encap::Gue => lb_common::tunnel::ENCAP_GUE,
            },
            v6,
        );
        let least = over + if v6 { 1280 } else { 576 };
        if usize::from(mtu) < least {
            return err(
                "tunnel.mtu",
                format!(
                    "{mtu} cannot carry a {}-byte {} packet plus the {over}-byte {} encapsulation: \
                     at least {least} (the underlay's path MTU to the nodes)",
                    least - over,
                    if v6 { "IPv6" } else { "IPv4" },
                    match t.encap {
                        Encap::Ipip => "ipip",
                        Encap::Gue => "gue",
                    }
                ),
            );
        }
    }
    if let Some((k, n)) = cfg.nodes.iter().enumerate().find(|(_, n)| n.port.is_some()) {
        return Err((
            format!("nodes[{k}].port"),
            format!(
                "node {} has a port, but {} (vips[{i}]) is in tunnel mode, which delivers the \
                 client's packet unchanged: the node serves the VIP's own ports",
                n.id, vip.address
            ),
        ));
    }
    Ok(())
}

/// What `limits:` cannot express.
fn limits(l: &Limits) -> Result<(), (String, String)> {
    let err = |k: &str, p: String| Err((format!("limits.{k}"), p));
    if l.new_flows_per_source.is_none() && l.new_flows.is_none() {
        return err(
            "new_flows",
            "set new_flows_per_source, new_flows or both (or remove `limits`)".into(),
        );
    }
    for (key, rate) in [
        ("new_flows_per_source", l.new_flows_per_source),
        ("new_flows", l.new_flows),
    ] {
        if let Some(r) = rate {
            if !(1..=MAX_COUNT).contains(&r.count) {
                return err(key, format!("count {} is outside 1..{MAX_COUNT}", r.count));
            }
            if r.per.is_zero() || r.per > Duration::from_secs(86_400) {
                return err(key, format!("{r}: the duration must be within 1ms..24h"));
            }
        }
    }
    for (key, burst, rate) in [
        ("burst", l.burst, l.new_flows_per_source),
        ("global_burst", l.global_burst, l.new_flows),
    ] {
        match (burst, rate) {
            (Some(_), None) => {
                let of = if key == "burst" {
                    "new_flows_per_source"
                } else {
                    "new_flows"
                };
                return err(
                    key,
                    format!("is set without {of}, which it is the burst of"),
                );
            }
            (Some(b), Some(_)) if !(1..=MAX_COUNT).contains(&b) => {
                return err(key, format!("{b} is outside 1..{MAX_COUNT}"));
            }
            _ => {}
        }
    }
    if l.known_reserve > 90 {
        return err(
            "known_reserve",
            format!(
                "{}% is above 90%: new sources would hardly ever get a flow",
                l.known_reserve
            ),
        );
    }
    if l.known_for.is_zero() {
        return err("known_for", "must be longer than 0".into());
    }
    if !l.exempt.is_empty() && l.new_flows_per_source.is_none() {
        return err(
            "exempt",
            "only skips new_flows_per_source, which is not set".into(),
        );
    }
    if !(1..=MAX_COOKIE_CAPACITY).contains(&l.cookie_capacity) {
        return err(
            "cookie_capacity",
            format!("{} is outside 1..{MAX_COOKIE_CAPACITY}", l.cookie_capacity),
        );
    }
    if !(1..=MAX_FRAG_CAPACITY).contains(&l.fragment_capacity) {
        return err(
            "fragment_capacity",
            format!("{} is outside 1..{MAX_FRAG_CAPACITY}", l.fragment_capacity),
        );
    }
    if l.exempt.len() > MAX_EXEMPT as usize {
        return err("exempt", format!("at most {MAX_EXEMPT} prefixes"));
    }
    let mut seen = HashSet::new();
    for (i, p) in l.exempt.iter().enumerate() {
        let k = exempt_key(*p);
        if !seen.insert((k.prefix_len(), k.data())) {
            return err(&format!("exempt[{i}]"), format!("{p} is listed twice"));
        }
    }
    Ok(())
}

fn port_set(vip: &Vip) -> Vec<u64> {
    let mut words = vec![0u64; 1024];
    for range in &vip.ports {
        for p in range.ports() {
            words[usize::from(p) / 64] |= 1 << (p % 64);
        }
    }
    words
}

/// The lowest port in both sets.
fn common_port(a: &[u64], b: &[u64]) -> Option<u16> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| *x & *y != 0)
        .map(|(i, (x, y))| (i * 64) as u16 + (x & y).trailing_zeros() as u16)
}

/// Stateless reverse NAT: `REVERSE` is keyed by node address and port alone, so each such
/// pair can carry one VIP as the replies' source. Two VIPs of one family that map onto the
/// same node address+port would leave the clients of one of them dropping every reply: refused.
/// (Several ports of ONE VIP onto one node port only warn: see `plan::reverse::reverse_entries`.)
/// Then the entries are counted, by arithmetic, before anything enumerates them.
fn reverse_nat(cfg: &Config) -> Result<(), (String, String)> {
    let sets: Vec<Vec<u64>> = cfg.vips.iter().map(port_set).collect();
    for (i, a) in cfg.vips.iter().enumerate() {
        for (j, b) in cfg.vips.iter().enumerate().skip(i + 1) {
            // A tunnel VIP's replies leave the node from the VIP itself: no reverse NAT.
            if a.address.is_ipv4() != b.address.is_ipv4()
                || a.tunnel().is_some()
                || b.tunnel().is_some()
            {
                continue;
            }
            for (k, n) in cfg.nodes.iter().enumerate() {
                let Some(addr) = n.address_for(a.address) else {
                    continue;
                };
                let (port, why, fix) = match n.port {
                    Some(p) => (
                        p,
                        format!("nodes[{k}].port sends every port of both to port {p}"),
                        format!(
                            "leave out nodes[{k}].port and give the two VIPs different ports, or serve each VIP from nodes of its own"
                        ),
                    ),
                    None => match common_port(&sets[i], &sets[j]) {
                        Some(p) => (
                            p,
                            format!("both balance port {p} and nodes[{k}] has no `port`"),
                            "give the two VIPs different ports, or serve each VIP from nodes of its own"
                                .to_owned(),
                        ),
                        None => continue,
                    },
                };
                return Err((
                    format!("vips[{j}]"),
                    format!(
                        "{} (vips[{j}]) and {} (vips[{i}]) both map onto node {} ({addr} port {port}): {why}. \
                         Replies are un-NATed by node address and port alone, so all of that node's replies \
                         would carry one VIP as their source and the other VIP's clients would drop them; \
                         {fix}",
                        b.address, a.address, n.id
                    ),
                ));
            }
        }
    }
    let ports: Vec<u64> = sets
        .iter()
        .map(|s| s.iter().map(|w| u64::from(w.count_ones())).sum())
        .collect();
    let mut total = 0u64;
    for n in &cfg.nodes {
        for (vi, vip) in cfg.vips.iter().enumerate() {
            if n.address_for(vip.address).is_some() {
                // With `port`, every port of the VIP maps onto one entry; without, one per port.
                // VIPs of one family share no entry (refused above), so this sum is exact.
                total += if n.port.is_some() { 1 } else { ports[vi] };
            }
        }
    }
    if total > u64::from(MAX_REVERSE) {
        return Err((
            "vips".to_owned(),
            format!(
                "{total} node×port pairs exceed the limit of {MAX_REVERSE}: balance fewer ports, \
                 or give the nodes a `port`"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::config::tests::{parse, with, SEED};

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "cid_length: 6",
                "cid_length: 40",
                &["test.yaml", "dtls.cid_length", "40"],
            ),
            (
                "node_id_length: 1",
                "node_id_length: 5",
                &["dtls.node_id_length"],
            ),
            (
                "node_id_offset: 0",
                "node_id_offset: 6",
                &["dtls.node_id_offset", "do not fit"],
            ),
            (
                "unknown_node: drop",
                "unknown_node: maybe",
                &["test.yaml", "unknown_node", "maybe"],
            ),
            ("xdp_mode: auto", "xdp_mode: turbo", &["xdp_mode", "turbo"]),
            (
                "idle_timeout: 30s",
                "idle_timeout: soon",
                &["idle_timeout", "soon"],
            ),
            (
                "idle_timeout: 30s",
                "idle_timeout: 0s",
                &["flows.idle_timeout"],
            ),
            ("capacity: 1048576", "capacity: 0", &["flows.capacity"]),
            (
                "\"20000-20100\"",
                "\"20100-20000\"",
                &["ports", "ends before it starts"],
            ),
            ("\"20000-20100\"", "70000", &["ports", "70000"]),
            (
                "address: 192.0.2.10",
                "address: 192.0.2.300",
                &["vips", "address"],
            ),
            ("- id: 1", "- id: 2", &["nodes[1].id", "used twice"]),
            ("- id: 1", "- id: 256", &["nodes[0].id", "does not fit"]),
            (
                "address: 192.168.178.124",
                "address: 192.168.178.123",
                &["nodes[1].address", "another node"],
            ),
            (
                "address: 192.168.178.124",
                "address: 192.0.2.10",
                &["nodes[1].address", "also a VIP"],
            ),
            (
                "interfaces: [eth0, eth1]",
                "interfaces: []",
                &["interfaces", "at least one"],
            ),
            (
                "interfaces: [eth0, eth1]",
                "interfaces: [eth0, eth0]",
                &["interfaces[1]", "twice"],
            ),
            ("pin_dir:", "pin_drr:", &["unknown field", "pin_drr"]),
            (
                "pin_dir:",
                "announce: {table: 254}\npin_dir:",
                &["announce.table", "254", "4242"],
            ),
            (
                "pin_dir:",
                "announce: {grace: 0s}\npin_dir:",
                &["announce.grace"],
            ),
            (
                "pin_dir:",
                "announce: {tabel: 1}\npin_dir:",
                &["unknown field", "tabel"],
            ),
            (
                "policy: round_robin",
                "policy: hash",
                &["policy", "hash", "maglev"],
            ),
        ];
        for (from, to, want) in cases {
            let text = with(from, to);
            let e = parse(&text).expect_err(&format!("{to:?} should be rejected"));
            for w in *want {
                assert!(e.contains(w), "error for {to:?} lacks {w:?}: {e}");
            }
        }
    }

    #[test]
    fn node_id_offset_cannot_overflow() {
        // 4294967295 + 1 wraps to 0 in u32 arithmetic (and panics in debug builds).
        for off in ["4294967295", "4294967294"] {
            let e = parse(&with(
                "node_id_offset: 0",
                &format!("node_id_offset: {off}"),
            ))
            .expect_err("an offset past the CID must be refused");
            assert!(
                e.contains("dtls.node_id_offset") && e.contains("do not fit in a 6-byte CID"),
                "{e}"
            );
        }
    }

    #[test]
    fn two_vips_of_one_family_on_one_node_port_are_refused() {
        let second = "  - address: 192.0.2.20\n    ports: [5684]\n";
        let two = with("dtls:", &format!("{second}dtls:"));
        // Node 1 has `port: 5684`: both VIPs map onto 192.168.178.123 port 5684.
        let e = parse(&two).expect_err("two VIPs onto one node port");
        for want in [
            "vips[1]",
            "192.0.2.20",
            "192.0.2.10",
            "node 1 (192.168.178.123 port 5684)",
            "leave out nodes[0].port",
        ] {
            assert!(e.contains(want), "lacks {want:?}: {e}");
        }
        // No node has `port`: the VIPs share port 5684, so node 2 port 5684 is claimed twice.
        let no_port = two.replace("    port: 5684\n", "");
        let e = parse(&no_port).expect_err("two VIPs share a port on a node without `port`");
        for want in [
            "192.0.2.20 (vips[1]) and 192.0.2.10 (vips[0])",
            "node 1 (192.168.178.123 port 5684)",
            "both balance port 5684",
            "give the two VIPs different ports",
        ] {
            assert!(e.contains(want), "lacks {want:?}: {e}");
        }
        // Disjoint ports, no node `port`: every reply maps back to one VIP.
        let disjoint = no_port.replace(
            "192.0.2.20\n    ports: [5684]",
            "192.0.2.20\n    ports: [5685]",
        );
        parse(&disjoint).unwrap_or_else(|e| panic!("{e}"));
        // One IPv4 and one IPv6 VIP on the same port never share a reverse entry.
        let dual = with(
            "dtls:",
            "  - address: \"2001:db8::10\"\n    ports: [5684]\ndtls:",
        )
        .replace(
            "address: 192.168.178.124",
            "address: [192.168.178.124, \"2001:db8::2\"]",
        );
        parse(&dual).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn reverse_entries_are_counted_before_they_are_enumerated() {
        let mut text = String::from(
            "interfaces: [e]\nvips: [{address: 192.0.2.1, ports: [\"1-65535\"]}]\nnodes:\n",
        );
        for k in 1..=200u32 {
            text.push_str(&format!(
                "  - {{id: {k}, address: 10.0.{}.{}}}\n",
                k / 256,
                k % 256
            ));
        }
        text = text.replace("interfaces", "dtls: {node_id_length: 2}\ninterfaces");
        let t0 = Instant::now();
        let e = parse(&text).expect_err("200 nodes x 65535 ports is over the limit");
        assert!(
            e.contains("13107000 node×port pairs exceed the limit of 65536"),
            "{e}"
        );
        // Enumerating 13 million entries first takes many seconds.
        assert!(t0.elapsed().as_millis() < 1000, "took {:?}", t0.elapsed());
    }

    fn with_limits(l: &str) -> Result<super::Config, String> {
        parse(&format!("{SEED}limits:\n{l}"))
    }

    #[test]
    fn limits_errors_name_file_key_and_problem() {
        let cases: &[(&str, &[&str])] = &[
            ("  burst: 3\n", &["test.yaml", "limits.new_flows", "set"]),
            (
                "  new_flows: \"20000/1s\"\n  burst: 3\n",
                &["limits.burst", "without new_flows_per_source"],
            ),
            (
                "  new_flows_per_source: \"20 per second\"\n",
                &[
                    "test.yaml",
                    "new_flows_per_source",
                    "20 per second",
                    "not a rate",
                ],
            ),
            ("  new_flows: \"0/1s\"\n", &["limits.new_flows", "count 0"]),
            ("  new_flows: \"5/0s\"\n", &["limits.new_flows", "duration"]),
            (
                "  new_flows_per_source: \"20/1s\"\n  burst: 0\n",
                &["limits.burst", "0 is outside"],
            ),
            (
                "  new_flows: \"20/1s\"\n  known_reserve: 95\n",
                &["limits.known_reserve", "95%"],
            ),
            (
                "  new_flows: \"20/1s\"\n  exempt: [10.0.0.0/8]\n",
                &["limits.exempt", "new_flows_per_source"],
            ),
            (
                "  new_flows_per_source: \"20/1s\"\n  exempt: [10.0.0.0/33]\n",
                &["exempt", "10.0.0.0/33", "outside 0..32"],
            ),
            (
                "  new_flows_per_source: \"20/1s\"\n  exempt: [10.0.0.0/8, 10.9.0.0/8]\n",
                &["limits.exempt[1]", "twice"],
            ),
            (
                "  new_flows: \"20/1s\"\n  known_for: soon\n",
                &["limits", "known_for", "soon"],
            ),
            (
                "  new_flows: \"20/1s\"\n  cookie_capacity: 0\n",
                &["limits.cookie_capacity", "0 is outside"],
            ),
            (
                "  new_flows: \"20/1s\"\n  fragment_capacity: 0\n",
                &["limits.fragment_capacity", "0 is outside"],
            ),
            (
                "  new_flows: \"20/1s\"\n  rate: 5\n",
                &["unknown field", "rate"],
            ),
        ];
        for (l, want) in cases {
            let e = with_limits(l).expect_err(&format!("{l:?} should be rejected"));
            for w in *want {
                assert!(e.contains(w), "error for {l:?} lacks {w:?}: {e}");
            }
        }
        assert!(parse(SEED).unwrap().limits.is_none());
    }

    #[test]
    fn tunnel_errors_name_the_key_and_what_to_do() {
        // SEED's node 1 has a port, which tunnel mode cannot honour: leave it out.
        let base = with("    port: 5684\n", "");
        let vip = "    ports: [5684, \"20000-20100\"]\n";
        let cases: &[(&str, &[&str])] = &[
            ("    forwarding: tunnel\n", &["vips[0].tunnel", "needs a tunnel section"]),
            (
                "    tunnel: {encap: ipip, source4: 10.9.0.1}\n",
                &["vips[0].tunnel", "forwarding is nat"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: ipip, source6: \"fd00::1\"}\n",
                &["vips[0].tunnel.source4", "outer source"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: ipip, source4: \"fd00::1\"}\n",
                &["vips[0].tunnel.source4", "not of 192.0.2.10's family"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: ipip, source4: 10.0.0.0/8}\n",
                &["vips[0].tunnel.source4", "24 host bits", "at most 16"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: gue, source4: 10.9.0.1}\n",
                &["vips[0].tunnel.gue_port", "needs the UDP port"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: ipip, source4: 10.9.0.1, gue_port: 6080}\n",
                &["vips[0].tunnel.gue_port", "only for encap: gue"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: gue, source4: 10.9.0.1, gue_port: 6080, mtu: 603}\n",
                &["vips[0].tunnel.mtu", "603", "at least 604"],
            ),
            (
                "    forwarding: tunnel\n    tunnel: {encap: vxlan, source4: 10.9.0.1}\n",
                &["vxlan", "ipip", "gue"],
            ),
        ];
        for (t, want) in cases {
            let e = parse(&base.replace(vip, &format!("{vip}{t}")))
                .expect_err(&format!("{t:?} should be rejected"));
            for w in *want {
                assert!(e.contains(w), "error for {t:?} lacks {w:?}: {e}");
            }
        }
        // A node port: named, with the reason.
        let e = parse(&SEED.replace(
            vip,
            &format!(
                "{vip}    forwarding: tunnel\n    tunnel: {{encap: ipip, source4: 10.9.0.1}}\n"
            ),
        ))
        .expect_err("a node port with a tunnel VIP");
        assert!(
            e.contains("nodes[0].port") && e.contains("unchanged"),
            "{e}"
        );
        let ok = parse(&base.replace(
            vip,
            &format!("{vip}    forwarding: tunnel\n    tunnel: {{encap: gue, source4: 10.9.0.0/24, gue_port: 6080, mtu: 604}}\n"),
        ))
        .unwrap();
        assert_eq!(ok.vips[0].tunnel().and_then(|t| t.mtu), Some(604));
    }
}
