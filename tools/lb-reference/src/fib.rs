//! What `bpf_fib_lookup` answers (net/core/filter.c, `bpf_ipv{4,6}_fib_lookup`), from a
//! namespace's links, routes and neighbours.

use std::collections::HashMap;

use lb_common::FAMILY_V4;

/// `BPF_FIB_LKUP_RET_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FibRc {
    Success,
    Blackhole,
    Unreachable,
    Prohibit,
    /// No route, or a route that is not unicast (local, broadcast, multicast, anycast).
    NotFwded,
    FwdDisabled,
    FragNeeded,
    NoNeigh,
}

#[derive(Clone, Copy, Debug)]
pub struct FibAnswer {
    pub rc: FibRc,
    /// Egress interface (with `Success`, `NoNeigh`).
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// With `FragNeeded`: the MTU.
    pub mtu: u16,
}

impl FibAnswer {
    fn rc(rc: FibRc) -> Self {
        Self {
            rc,
            ifindex: 0,
            smac: [0; 6],
            dmac: [0; 6],
            mtu: 0,
        }
    }
}

pub trait Fib {
    /// A lookup from `src` to `dst` (address words as in `lb_common`), as if received on
    /// `ingress`, with `tot_len` compared with the route's MTU.
    fn lookup(
        &self,
        family: u8,
        src: &[u32; 4],
        dst: &[u32; 4],
        ingress: u32,
        tot_len: u16,
    ) -> FibAnswer;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    Unicast,
    Local,
    Broadcast,
    Multicast,
    Anycast,
    Blackhole,
    Unreachable,
    Prohibit,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub family: u8,
    /// Prefix as wire bytes (IPv4 in the first 4).
    pub prefix: [u8; 16],
    pub len: u8,
    pub kind: RouteKind,
    pub dev: u32,
    /// Gateway, if any (its neighbour entry gives the MAC).
    pub via: Option<[u8; 16]>,
}

#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 / IPv6 forwarding on this interface.
    pub forward4: bool,
    pub forward6: bool,
}

/// A namespace's FIB as tables: one route per prefix (the first one given wins a tie), local
/// and main tables searched together by longest prefix (what the kernel does without policy
/// rules: no route of the local table overlaps a longer one of the main table here).
#[derive(Clone, Debug, Default)]
pub struct StaticFib {
    pub links: HashMap<u32, Link>,
    pub routes: Vec<Route>,
    /// (interface, family, address) → MAC, for neighbours in a valid state.
    pub neighbours: HashMap<(u32, u8, [u8; 16]), [u8; 6]>,
}

const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Loopback, link-local (fe80::/10) or multicast (ff00::/8): IPv6 addresses of a scope
/// smaller than global.
fn scoped(a: &[u8; 16]) -> bool {
    *a == LOOPBACK6 || a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
}

/// An address's bytes from `lb_common` words.
pub fn addr_bytes(family: u8, w: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = if family == FAMILY_V4 { 1 } else { 4 };
    for i in 0..n {
        b[4 * i..4 * i + 4].copy_from_slice(&w[i].to_ne_bytes());
    }
    b
}

fn matches(prefix: &[u8; 16], len: u8, a: &[u8; 16]) -> bool {
    let full = (len / 8) as usize;
    if prefix[..full] != a[..full] {
        return false;
    }
    let rest = len % 8;
    rest == 0 || (prefix[full] ^ a[full]) & (0xffu8 << (8 - rest)) == 0
}

impl Fib for StaticFib {
    fn lookup(
        &self,
        family: u8,
        src: &[u32; 4],
        dst: &[u32; 4],
        ingress: u32,
        tot_len: u16,
    ) -> FibAnswer {
        let v4 = family == FAMILY_V4;
        let (s, a) = (addr_bytes(family, src), addr_bytes(family, dst));
        // IPv6 first: "link local addresses are never forwarded" — a source or destination
        // that is loopback, link-local or multicast (rt6_need_strict) ends the lookup before
        // anything else, forwarding included. (Found by cargo xtask fuzz.)
        if !v4 && (scoped(&s) || scoped(&a)) {
            return FibAnswer::rc(FibRc::NotFwded);
        }
        let forwarding =
            self.links
                .get(&ingress)
                .is_some_and(|l| if v4 { l.forward4 } else { l.forward6 });
        if !forwarding {
            return FibAnswer::rc(FibRc::FwdDisabled);
        }
        let mut best: Option<&Route> = None;
        for r in self.routes.iter().filter(|r| r.family == family) {
            if matches(&r.prefix, r.len, &a) && best.is_none_or(|b| r.len > b.len) {
                best = Some(r);
            }
        }
        let Some(r) = best else {
            return FibAnswer::rc(FibRc::NotFwded);
        };
        match r.kind {
            RouteKind::Unicast => {}
            RouteKind::Blackhole => return FibAnswer::rc(FibRc::Blackhole),
            RouteKind::Unreachable => return FibAnswer::rc(FibRc::Unreachable),
            RouteKind::Prohibit => return FibAnswer::rc(FibRc::Prohibit),
            _ => return FibAnswer::rc(FibRc::NotFwded),
        }
        let Some(link) = self.links.get(&r.dev) else {
            return FibAnswer::rc(FibRc::NotFwded);
        };
        // The MTU check comes before the neighbour lookup.
        if u32::from(tot_len) > link.mtu {
            return FibAnswer {
                mtu: link.mtu.min(u32::from(u16::MAX)) as u16,
                ..FibAnswer::rc(FibRc::FragNeeded)
            };
        }
        let hop = r.via.unwrap_or(a);
        let mut ans = FibAnswer {
            ifindex: r.dev,
            smac: link.mac,
            ..FibAnswer::rc(FibRc::NoNeigh)
        };
        if let Some(mac) = self.neighbours.get(&(r.dev, family, hop)) {
            ans.rc = FibRc::Success;
            ans.dmac = *mac;
        }
        ans
    }
}
