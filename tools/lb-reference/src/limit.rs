//! New-flow rate limits (`limits:`, docs/security.md "New-flow limits"): the step the datapath takes
//! (`lb-ebpf/src/limit.rs`) where a packet would create a flow, before the node is picked.
//!
//! Written from docs/security.md and `lb_common::limits`, not from the datapath:
//! - per source (an IPv4 address, an IPv6 /64), a token bucket of `new_flows_per_source`
//!   and `burst`, skipped for sources in an `exempt` prefix (counted `limit_exempt`);
//! - global, one bucket of `new_flows` and `global_burst` for the balancer, whichever CPUs
//!   the program runs on ([`Buckets::global`]);
//! - `known_reserve` percent of the global burst is for known sources only ([`known`]);
//! - both buckets are checked before either is charged; a packet over one is dropped
//!   (`drop_limit_source`, `drop_limit_global`) and creates no flow.
//!
//! Each bucket is GCRA: its state is a theoretical arrival time `tat` (ns); a flow at `now`
//! fits if `max(tat, now) + interval - now <= tolerance`, and then moves `tat` there. A missing
//! bucket is a full one (`tat` 0).
//!
//! The precise clock: the datapath reads `bpf_ktime_get_ns` inside the run, which the caller
//! knows only as a window (read before and after the run, [`Precise`]). The verdict and the
//! new `tat`s depend on the instant, so when the caller also tells what the kernel did
//! ([`Observed`]) the step looks for an instant inside the window at which this model gives
//! exactly that (same counters, same buckets after); none: [`crate::Outcome::misfit`] says so.

use std::{collections::HashMap, net::IpAddr};

use lb_common::{
    limits::{LimitConfig, SrcKey, LIMIT_F_GLOBAL, LIMIT_F_SOURCE},
    Counter, FAMILY_V6,
};

use crate::{parse::Packet, stats::Outcome, State, Tables};

/// `"COUNT/DURATION"`: `count` new flows per `per_ns` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per_ns: u64,
}

/// The `limits:` keys as configured (docs/configuration.md), defaults already applied by nobody:
/// `None` bursts mean "the rate's count".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub new_flows_per_source: Option<Rate>,
    pub burst: Option<u64>,
    pub new_flows: Option<Rate>,
    pub global_burst: Option<u64>,
    /// Percent (0..=90).
    pub known_reserve: u64,
    pub known_for_ns: u64,
    /// `(prefix address, prefix length)`.
    pub exempt: Vec<(IpAddr, u8)>,
}

/// One GCRA bucket's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
}

/// The limits as the datapath applies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub source: Option<Gcra>,
    /// The global bucket: `tolerance_ns` for known sources.
    pub global: Option<Gcra>,
    /// The global burst minus the known-only reserve, for other sources.
    pub global_unknown_tolerance_ns: u64,
    pub known_ns: u64,
    /// Exempt prefixes as 128-bit values (IPv4 as `::ffff:a.b.c.d`, length + 96, as
    /// `lb_common::limits::ExemptKey` holds them) and their lengths.
    pub exempt: Vec<(u128, u32)>,
}

/// Nanoseconds per flow of `rate`, rounded up: never faster than configured.
fn interval(rate: Rate) -> u64 {
    let ns = u128::from(rate.per_ns);
    u64::try_from(ns.div_ceil(u128::from(rate.count.max(1)))).unwrap_or(u64::MAX)
}

fn as_v6(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from_be_bytes(a.to_ipv6_mapped().octets()),
        IpAddr::V6(a) => u128::from_be_bytes(a.octets()),
    }
}

fn prefix_mask(len: u32) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len.min(128))
    }
}

impl Limits {
    /// From the configured keys; `None` when neither rate is set (no limits).
    pub fn new(s: &Settings) -> Option<Self> {
        if s.new_flows_per_source.is_none() && s.new_flows.is_none() {
            return None;
        }
        let source = s.new_flows_per_source.map(|r| {
            let interval_ns = interval(r);
            Gcra {
                interval_ns,
                tolerance_ns: interval_ns.saturating_mul(s.burst.unwrap_or(r.count)),
            }
        });
        let (mut global, mut unknown) = (None, 0);
        if let Some(r) = s.new_flows {
            let interval_ns = interval(r);
            let burst = s.global_burst.unwrap_or(r.count).max(1);
            let reserve = burst * s.known_reserve / 100;
            global = Some(Gcra {
                interval_ns,
                tolerance_ns: interval_ns.saturating_mul(burst),
            });
            unknown = interval_ns.saturating_mul(burst - reserve);
        }
        let exempt = s
            .exempt
            .iter()
            .map(|&(a, len)| {
                let len = u32::from(len) + if a.is_ipv4() { 96 } else { 0 };
                (as_v6(a) & prefix_mask(len), len)
            })
            .collect();
        Some(Self {
            source,
            global,
            global_unknown_tolerance_ns: unknown,
            known_ns: s.known_for_ns,
            exempt,
        })
    }

    /// What `LIMIT_CFG` must hold for these limits (`lb_common::limits::LimitConfig`).
    pub fn limit_config(&self) -> LimitConfig {
        let mut c = LimitConfig {
            known_ns: self.known_ns,
            ..LimitConfig::default()
        };
        if let Some(g) = self.source {
            c.flags |= LIMIT_F_SOURCE;
            c.src_interval_ns = g.interval_ns;
            c.src_tolerance_ns = g.tolerance_ns;
        }
        if let Some(g) = self.global {
            c.flags |= LIMIT_F_GLOBAL;
            c.global_interval_ns = g.interval_ns;
            c.global_tolerance_ns = g.tolerance_ns;
            c.global_unknown_tolerance_ns = self.global_unknown_tolerance_ns;
        }
        c
    }

    fn is_exempt(&self, pkt: &Packet) -> bool {
        let v = src_v6(pkt);
        self.exempt
            .iter()
            .any(|&(p, len)| v & prefix_mask(len) == p)
    }
}

/// The packet's source as a 128-bit value, IPv4 mapped into IPv6.
fn src_v6(pkt: &Packet) -> u128 {
    let mut b = [0u8; 16];
    if pkt.family == FAMILY_V6 {
        for (i, w) in pkt.src.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
    } else {
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&pkt.src[0].to_ne_bytes());
    }
    u128::from_be_bytes(b)
}

/// The bucket key: the IPv4 address, or the IPv6 /64 (the last two words zero).
pub fn src_key(pkt: &Packet) -> SrcKey {
    let mut addr = pkt.src;
    if pkt.family == FAMILY_V6 {
        addr[2] = 0;
        addr[3] = 0;
    }
    SrcKey {
        addr,
        family: pkt.family,
        _pad: [0; 3],
    }
}

/// What the limits remember between packets (`SRC_BUCKETS`, `GLOBAL_BUCKET`, `KNOWN_SRCS`,
/// and the `COOKIES` that prove known sources). Nothing is evicted here: the caller keeps the
/// tables far from full.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buckets {
    pub src: HashMap<SrcKey, u64>,
    pub global: u64,
    /// Source → when it last proved itself (the coarse clock).
    pub known: HashMap<SrcKey, u64>,
    /// `COOKIES`: nodes' cookies learned, and pending fragmented ClientHellos.
    pub cookies: crate::cookie::Cookies,
}

impl Buckets {
    /// A reload that changed the limits: every bucket starts full again (docs/configuration.md: "the buckets
    /// then start full"). Known sources stay known, learned cookies stay.
    pub fn refill(&mut self) {
        self.src.clear();
        self.global = 0;
    }
}

/// The precise clock as the caller knows it for one frame: the program read it at some
/// instant in `lo..=hi`; `kernel` is what the kernel's limit step did, if the caller knows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Precise {
    pub lo: u64,
    pub hi: u64,
    pub kernel: Option<Observed>,
}

/// The kernel's side of one frame's limit step: its limit counters and its buckets after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `SRC_BUCKETS[src_key]` after the frame (None: no entry).
    pub src_tat: Option<u64>,
    /// `GLOBAL_BUCKET` after the frame.
    pub global_tat: u64,
    /// `limit_exempt`, `limit_known_reserve`, `drop_limit_source`, `drop_limit_global`.
    pub counters: [u64; 4],
}

/// Is `key` a known source at `now`? It is for `known_for` after its last proof ([`proven`]).
pub fn known(b: &Buckets, key: &SrcKey, now: u64, known_ns: u64) -> bool {
    b.known
        .get(key)
        .is_some_and(|&seen| now.saturating_sub(seen) <= known_ns)
}

/// A ClientHello echoed a node's cookie (`cookie.rs`): its source is known from the coarse
/// clock's `now` (`State::now_ns`). A flow's second packet proves nothing: flow hits and CID
/// records neither make nor refresh a known source.
pub fn proven(state: &mut State, pkt: &Packet) {
    state.limits.known.insert(src_key(pkt), state.now_ns);
}

/// GCRA: the bucket's next `tat` if a flow at `now` fits within `tolerance`.
fn gcra(tat: u64, now: u64, g: Gcra, tolerance: u64) -> Option<u64> {
    let next = tat.max(now).saturating_add(g.interval_ns);
    (next - now <= tolerance).then_some(next)
}

/// One instant's answer: the verdict, the counters besides the verdict, the buckets after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Step {
    verdict: Result<(), Counter>,
    exempt: bool,
    reserve: bool,
    src_tat: Option<u64>,
    global_tat: u64,
}

impl Step {
    fn counters(&self) -> [u64; 4] {
        let v = |c| u64::from(self.verdict == Err(c));
        [
            u64::from(self.exempt),
            u64::from(self.reserve),
            v(Counter::DropLimitSource),
            v(Counter::DropLimitGlobal),
        ]
    }

    fn fits(&self, k: &Observed) -> bool {
        self.counters() == k.counters
            && self.src_tat == k.src_tat
            && self.global_tat == k.global_tat
    }
}

fn step(l: &Limits, b: &Buckets, key: &SrcKey, exempt: bool, now: u64) -> Step {
    let old_src = b.src.get(key).copied();
    let mut s = Step {
        verdict: Ok(()),
        exempt: false,
        reserve: false,
        src_tat: old_src,
        global_tat: b.global,
    };
    let mut src_next = None;
    if let Some(g) = l.source {
        if exempt {
            s.exempt = true;
        } else {
            match gcra(old_src.unwrap_or(0), now, g, g.tolerance_ns) {
                Some(n) => src_next = Some(n),
                None => {
                    s.verdict = Err(Counter::DropLimitSource);
                    return s;
                }
            }
        }
    }
    if let Some(g) = l.global {
        let next = match gcra(b.global, now, g, l.global_unknown_tolerance_ns) {
            Some(n) => n,
            None if known(b, key, now, l.known_ns) => {
                match gcra(b.global, now, g, g.tolerance_ns) {
                    Some(n) => {
                        s.reserve = true;
                        n
                    }
                    None => {
                        s.verdict = Err(Counter::DropLimitGlobal);
                        return s;
                    }
                }
            }
            None => {
                s.verdict = Err(Counter::DropLimitGlobal);
                return s;
            }
        };
        s.global_tat = next;
    }
    if src_next.is_some() {
        s.src_tat = src_next;
    }
    s
}

/// Instants in `lo..=hi` at which the answer can change or that the kernel's buckets pin: the
/// ends, each bucket's threshold (`tat + interval - tolerance`), and `tat_after - interval`
/// for each bucket the kernel charged. Between two of them every answer is the same.
fn candidates(l: &Limits, b: &Buckets, key: &SrcKey, p: &Precise) -> Vec<u64> {
    let mut v = vec![p.lo, p.hi];
    let old_src = b.src.get(key).copied().unwrap_or(0);
    if let Some(g) = l.source {
        v.push((old_src + g.interval_ns).saturating_sub(g.tolerance_ns));
        if let Some(t) = p.kernel.and_then(|k| k.src_tat) {
            v.push(t.saturating_sub(g.interval_ns));
        }
    }
    if let Some(g) = l.global {
        for tol in [g.tolerance_ns, l.global_unknown_tolerance_ns] {
            v.push((b.global + g.interval_ns).saturating_sub(tol));
        }
        if let Some(k) = p.kernel {
            v.push(k.global_tat.saturating_sub(g.interval_ns));
        }
    }
    let cutoff = b
        .known
        .get(key)
        .map(|&seen| seen.saturating_add(l.known_ns));
    v.extend(cutoff.into_iter().flat_map(|c| [c, c.saturating_add(1)]));
    v.retain(|&t| (p.lo..=p.hi).contains(&t));
    v.sort_unstable();
    v.dedup();
    v
}

/// May this packet create a flow? `Err` names the limit it is over. Bumps `limit_exempt` and
/// `limit_known_reserve` and charges the buckets as the datapath does.
pub fn admit(
    t: &Tables,
    state: &mut State,
    pkt: &Packet,
    out: &mut Outcome,
) -> Result<(), Counter> {
    let Some(l) = &t.limits else {
        return Ok(());
    };
    let key = src_key(pkt);
    let exempt = l.source.is_some() && l.is_exempt(pkt);
    let p = state.precise;
    let s = match p.kernel {
        None => step(l, &state.limits, &key, exempt, p.lo),
        Some(k) => {
            let at = candidates(l, &state.limits, &key, &p);
            let fit = at
                .iter()
                .map(|&now| step(l, &state.limits, &key, exempt, now))
                .find(|s| s.fits(&k));
            match fit {
                Some(s) => s,
                None => {
                    let s = step(l, &state.limits, &key, exempt, p.lo);
                    let at_hi = step(l, &state.limits, &key, exempt, p.hi);
                    out.misfit = Some(format!(
                        "limit step for source {key:?}: no instant in the clock window \
                         [{}, {}] gives the kernel's result. counters [exempt, reserve, \
                         drop_source, drop_global], source tat, global tat: kernel {:?} {:?} {}; \
                         reference at the window's start {:?} {:?} {} (before: {:?} {}), at its \
                         end {:?} {:?} {}",
                        p.lo,
                        p.hi,
                        k.counters,
                        k.src_tat,
                        k.global_tat,
                        s.counters(),
                        s.src_tat,
                        s.global_tat,
                        state.limits.src.get(&key),
                        state.limits.global,
                        at_hi.counters(),
                        at_hi.src_tat,
                        at_hi.global_tat,
                    ));
                    s
                }
            }
        }
    };
    if s.exempt {
        out.count(Counter::LimitExempt);
    }
    if s.reserve {
        out.count(Counter::LimitKnownReserve);
    }
    if let Some(tat) = s.src_tat {
        state.limits.src.insert(key, tat);
    }
    state.limits.global = s.global_tat;
    s.verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(v4: [u8; 4]) -> Packet {
        Packet {
            family: lb_common::FAMILY_V4,
            vlans: 0,
            l3: 14,
            src: [u32::from_ne_bytes(v4), 0, 0, 0],
            dst: [0; 4],
            udp: None,
            icmp: None,
            frag: 0,
            frag_id: 0,
        }
    }

    fn settings() -> Settings {
        Settings {
            new_flows_per_source: Some(Rate {
                count: 10,
                per_ns: 1_000_000_000,
            }),
            burst: Some(3),
            new_flows: Some(Rate {
                count: 1000,
                per_ns: 1_000_000_000,
            }),
            global_burst: Some(40),
            known_reserve: 50,
            known_for_ns: 600_000_000_000,
            exempt: vec![("100.64.0.0".parse().unwrap(), 10)],
        }
    }

    #[test]
    fn derived_config_is_one_global_bucket() {
        let l = Limits::new(&settings()).unwrap();
        assert_eq!(l.source.unwrap().interval_ns, 100_000_000);
        assert_eq!(l.source.unwrap().tolerance_ns, 300_000_000);
        // 1000/s for the balancer: 1 ms apart; all 40 for known sources, 20 for anyone.
        assert_eq!(l.global.unwrap().interval_ns, 1_000_000);
        assert_eq!(l.global.unwrap().tolerance_ns, 40_000_000);
        assert_eq!(l.global_unknown_tolerance_ns, 20_000_000);
        assert!(Limits::new(&Settings::default()).is_none());
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_exempt_ones_skip_it() {
        let l = Limits::new(&settings()).unwrap();
        let t = Tables {
            limits: Some(l),
            ..Default::default()
        };
        let mut st = State::default();
        let now = 10_000_000_000;
        st.precise = Precise {
            lo: now,
            hi: now,
            kernel: None,
        };
        let p = pkt([198, 51, 100, 7]);
        let mut out = Outcome::new(&[]);
        for _ in 0..3 {
            assert_eq!(admit(&t, &mut st, &p, &mut out), Ok(()));
        }
        assert_eq!(
            admit(&t, &mut st, &p, &mut out),
            Err(Counter::DropLimitSource)
        );
        st.precise.lo += 100_000_000;
        assert_eq!(admit(&t, &mut st, &p, &mut out), Ok(()));
        let cgnat = pkt([100, 64, 0, 9]);
        for _ in 0..5 {
            assert_eq!(admit(&t, &mut st, &cgnat, &mut out), Ok(()));
        }
        assert_eq!(out.delta(Counter::LimitExempt), 5);
    }

    #[test]
    fn the_reserve_is_for_known_sources() {
        let mut s = settings();
        s.new_flows_per_source = None;
        s.burst = None;
        s.exempt.clear();
        let t = Tables {
            limits: Limits::new(&s),
            ..Default::default()
        };
        let mut st = State::default();
        st.precise.lo = 10_000_000_000;
        let (a, b) = (pkt([198, 51, 100, 7]), pkt([198, 51, 100, 8]));
        let mut out = Outcome::new(&[]);
        // 20 tokens for anyone, then only known sources get the other 20.
        for _ in 0..20 {
            assert_eq!(admit(&t, &mut st, &a, &mut out), Ok(()));
        }
        assert_eq!(
            admit(&t, &mut st, &a, &mut out),
            Err(Counter::DropLimitGlobal)
        );
        proven(&mut st, &b);
        for _ in 0..20 {
            assert_eq!(admit(&t, &mut st, &b, &mut out), Ok(()));
        }
        assert_eq!(out.delta(Counter::LimitKnownReserve), 20);
        assert_eq!(
            admit(&t, &mut st, &b, &mut out),
            Err(Counter::DropLimitGlobal)
        );
    }

    #[test]
    fn a_kernel_result_that_fits_no_instant_is_a_misfit() {
        let t = Tables {
            limits: Limits::new(&settings()),
            ..Default::default()
        };
        let mut st = State::default();
        let now = 10_000_000_000;
        let p = pkt([198, 51, 100, 7]);
        // Admitted at some instant in the window: the kernel's tats pin it.
        st.precise = Precise {
            lo: now,
            hi: now + 1000,
            kernel: Some(Observed {
                src_tat: Some(now + 500 + 100_000_000),
                global_tat: now + 500 + 1_000_000,
                counters: [0; 4],
            }),
        };
        let mut out = Outcome::new(&[]);
        assert_eq!(admit(&t, &mut st, &p, &mut out), Ok(()));
        assert_eq!(out.misfit, None);
        assert_eq!(st.limits.global, now + 500 + 1_000_000);
        // A source bucket that did not refill (tat from the epoch, not from now).
        let q = pkt([198, 51, 100, 8]);
        st.precise.kernel = Some(Observed {
            src_tat: Some(100_000_000),
            global_tat: now + 500 + 2_000_000,
            counters: [0; 4],
        });
        let _ = admit(&t, &mut st, &q, &mut out);
        assert!(out.misfit.is_some());
    }
}
