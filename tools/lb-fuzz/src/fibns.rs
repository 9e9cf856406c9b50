//! The FIB of the test's own namespace, as the reference needs it: links, routes and
//! neighbours read once with `ip -json` (the namespace holds permanent neighbours only, and
//! nothing in the run changes them).

use std::collections::HashMap;

use anyhow::{bail, Context as _, Result};
use lb_common::{FAMILY_V4, FAMILY_V6};
use lb_lab::NetNs;
use lb_reference::fib::{Link, Route, RouteKind, StaticFib};
use serde_json::Value;

fn json(ns: &NetNs, args: &[&str]) -> Result<Vec<Value>> {
    let mut cmd = vec!["ip", "-json"];
    cmd.extend_from_slice(args);
    let out = ns.must(&cmd).map_err(anyhow::Error::msg)?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("ip {args:?}: not JSON"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn mac(s: &str) -> Result<[u8; 6]> {
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC: {s}");
    }
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC: {s}"))?;
    }
    Ok(m)
}

/// An address or prefix (`default`, `a.b.c.d`, `x::y/64`) as bytes and length.
fn prefix(s: &str, family: u8) -> Result<([u8; 16], u8)> {
    let mut b = [0u8; 16];
    if s == "default" {
        return Ok((b, 0));
    }
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>()?)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr.parse().with_context(|| format!("bad address {s}"))?;
    match ip {
        std::net::IpAddr::V4(a) if family == FAMILY_V4 => {
            b[..4].copy_from_slice(&a.octets());
            Ok((b, len.unwrap_or(32)))
        }
        std::net::IpAddr::V6(a) if family == FAMILY_V6 => {
            b.copy_from_slice(&a.octets());
            Ok((b, len.unwrap_or(128)))
        }
        _ => bail!("{s}: wrong family"),
    }
}

pub fn read(ns: &NetNs) -> Result<StaticFib> {
    let mut fib = StaticFib::default();
    let mut index = HashMap::new();
    for l in json(ns, &["link", "show"])? {
        let name = l["ifname"]
            .as_str()
            .context("link without ifname")?
            .to_owned();
        let ifindex = l["ifindex"].as_u64().context("link without ifindex")? as u32;
        let fwd = |key: String| -> Result<bool> {
            let v = ns
                .must(&["sysctl", "-n", &key])
                .map_err(anyhow::Error::msg)?;
            Ok(v.trim() == "1")
        };
        fib.links.insert(
            ifindex,
            Link {
                mac: mac(l["address"].as_str().unwrap_or("00:00:00:00:00:00"))?,
                mtu: l["mtu"].as_u64().context("link without mtu")? as u32,
                forward4: fwd(format!("net.ipv4.conf.{name}.forwarding"))?,
                forward6: fwd(format!("net.ipv6.conf.{name}.forwarding"))?,
            },
        );
        index.insert(name, ifindex);
    }
    for (family, flag) in [(FAMILY_V4, "-4"), (FAMILY_V6, "-6")] {
        for r in json(ns, &[flag, "route", "show", "table", "all"])? {
            let kind = match r["type"].as_str().unwrap_or("unicast") {
                "unicast" => RouteKind::Unicast,
                "local" => RouteKind::Local,
                "broadcast" => RouteKind::Broadcast,
                "multicast" => RouteKind::Multicast,
                "anycast" => RouteKind::Anycast,
                "blackhole" => RouteKind::Blackhole,
                "unreachable" => RouteKind::Unreachable,
                "prohibit" => RouteKind::Prohibit,
                other => bail!("route type {other} is not modelled: {r}"),
            };
            let (p, len) = prefix(r["dst"].as_str().context("route without dst")?, family)?;
            let dev = r["dev"]
                .as_str()
                .and_then(|d| index.get(d))
                .copied()
                .unwrap_or(0);
            let via = match r["gateway"].as_str() {
                Some(g) => Some(prefix(g, family)?.0),
                None => None,
            };
            fib.routes.push(Route {
                family,
                prefix: p,
                len,
                kind,
                dev,
                via,
            });
        }
        for n in json(ns, &[flag, "neigh", "show"])? {
            let valid = n["state"].as_array().is_some_and(|s| {
                s.iter().any(|x| {
                    matches!(
                        x.as_str(),
                        Some("PERMANENT" | "REACHABLE" | "STALE" | "DELAY" | "PROBE" | "NOARP")
                    )
                })
            });
            let (Some(dst), Some(dev), Some(ll)) =
                (n["dst"].as_str(), n["dev"].as_str(), n["lladdr"].as_str())
            else {
                continue;
            };
            if valid {
                let dev = *index.get(dev).context("neighbour on unknown device")?;
                fib.neighbours
                    .insert((dev, family, prefix(dst, family)?.0), mac(ll)?);
            }
        }
    }
    Ok(fib)
}
