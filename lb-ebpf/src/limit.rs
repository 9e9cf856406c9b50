//! New-flow rate limits (`limits:`; off unless configured): called by `flow.rs` only where a
//! packet would create a flow, so established flows and CID records are never limited.
//!
//! Two GCRA buckets (see `lb_common::limits`), both checked before either is charged:
//! - per source (IPv4 address, IPv6 /64) in the `SRC_BUCKETS` LRU, skipped for `LIMIT_EXEMPT`
//!   prefixes. Shared by all CPUs and written without atomics: two CPUs racing on one source
//!   can each admit a flow on the same token (at most one extra per CPU per race).
//! - global, one bucket for the whole balancer in `GLOBAL_BUCKET`, updated with a
//!   compare-and-swap, so the configured rate and burst hold whichever CPUs the NIC's queues
//!   steer new flows to (a bucket per CPU holding 1/ncpus of the rate would admit 1/ncpus of
//!   it when one queue takes the whole flood). Only new flows touch it; a CPU that loses the
//!   race [`GLOBAL_TRIES`] times in a row counts the flow as over the limit.
//!
//! Known sources go first: a source that echoed a node's cookie in a ClientHello (`cookie.rs`:
//! it receives what is sent to its address, which a blind spoofer does not) is in
//! `KNOWN_SRCS` for `known_for`. Other sources may only take global tokens while the bucket
//! holds more than the reserve, so under a flood the reserve and its refill go to known
//! sources. A flow's second packet proves nothing (a spoofer can send every tuple twice), and
//! neither flow hits nor CID records make or refresh a known source.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use lb_common::{
    limits::{gcra, LimitConfig, SrcKey, LIMIT_F_GLOBAL, LIMIT_F_SOURCE},
    Counter, FAMILY_V6,
};

use crate::{maps, parse::Packet, stats::count};

/// Compare-and-swap attempts on the global bucket before a new flow is refused. A retry
/// happens only when another CPU admitted a flow in between, so each retry means the bucket
/// moved on; four keep the loop short for the verifier and the flood cheap.
const GLOBAL_TRIES: usize = 4;

#[inline(always)]
fn config() -> Option<LimitConfig> {
    // Copied out: the agent rewrites the one entry whole, and a torn read can only mix the
    // old and the new limits for one packet.
    let cfg = *maps::LIMIT_CFG.get(0)?;
    (cfg.flags != 0).then_some(cfg)
}

/// The bucket key of the packet's source: IPv4 address or IPv6 /64.
#[inline(always)]
fn src_key(pkt: &Packet) -> SrcKey {
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

#[inline(always)]
fn exempt(pkt: &Packet) -> bool {
    let mut data = [0u8; 16];
    let w = |i: usize| pkt.src[i].to_ne_bytes();
    if pkt.family == FAMILY_V6 {
        for i in 0..4 {
            data[4 * i..4 * i + 4].copy_from_slice(&w(i));
        }
    } else {
        // IPv4-mapped IPv6, as the agent stores IPv4 prefixes.
        data[10] = 0xff;
        data[11] = 0xff;
        data[12..16].copy_from_slice(&w(0));
    }
    maps::LIMIT_EXEMPT.get(Key::new(128, data)).is_some()
}

#[inline(always)]
fn known(src: &SrcKey, now: u64, known_ns: u64) -> bool {
    // SAFETY: copied out under the RCU read lock.
    match unsafe { maps::KNOWN_SRCS.get(src) } {
        Some(&seen) => now.saturating_sub(seen) <= known_ns,
        None => false,
    }
}

/// BPF_ATOMIC | BPF_CMPXCHG on a 64-bit word (kernel 5.12+): writes `new` at `ptr` if it holds
/// `old`, and returns what it held. Rust's `AtomicU64::compare_exchange` is not offered for
/// the BPF target, so the one instruction is written out.
///
/// # Safety
/// `ptr` is valid for reads and writes and 8-byte aligned.
#[inline(always)]
unsafe fn cmpxchg(ptr: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    // SAFETY: the caller's; the instruction touches only *ptr and r0.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {n})",
            p = in(reg) ptr,
            n = in(reg) new,
            inout("r0") r0,
            options(nostack),
        );
    }
    r0
}

/// May this packet create a flow? `Err` names the limit it is over (the packet is dropped).
#[inline(always)]
pub fn admit(pkt: &Packet) -> Result<(), Counter> {
    let Some(cfg) = config() else {
        return Ok(());
    };
    // The precise clock, not the coarse one the flow table uses: within one tick (up to 10 ms)
    // the coarse clock stands still, and a bucket whose burst * interval is shorter than that
    // would admit only `burst` flows per tick. Only new flows with limits on pay for it.
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let src = src_key(pkt);
    let mut src_next = None;
    if cfg.flags & LIMIT_F_SOURCE != 0 {
        if exempt(pkt) {
            count(Counter::LimitExempt);
        } else {
            // SAFETY: copied out under the RCU read lock. No entry: a full bucket.
            let tat = unsafe { maps::SRC_BUCKETS.get(src).copied() }.unwrap_or(0);
            src_next = Some(
                gcra(tat, now, cfg.src_interval_ns, cfg.src_tolerance_ns)
                    .ok_or(Counter::DropLimitSource)?,
            );
        }
    }
    if cfg.flags & LIMIT_F_GLOBAL != 0 {
        let slot = maps::GLOBAL_BUCKET
            .get_ptr_mut(0)
            .ok_or(Counter::DropLimitGlobal)?;
        let known = known(&src, now, cfg.known_ns);
        // SAFETY: an array map's value lives as long as the map and is 8-byte aligned.
        let mut tat = unsafe { core::ptr::read_volatile(slot) };
        let mut admitted = None;
        for _ in 0..GLOBAL_TRIES {
            let (next, reserve) = match gcra(
                tat,
                now,
                cfg.global_interval_ns,
                cfg.global_unknown_tolerance_ns,
            ) {
                Some(next) => (next, false),
                None if known => (
                    gcra(tat, now, cfg.global_interval_ns, cfg.global_tolerance_ns)
                        .ok_or(Counter::DropLimitGlobal)?,
                    true,
                ),
                None => return Err(Counter::DropLimitGlobal),
            };
            // SAFETY: as above.
            let seen = unsafe { cmpxchg(slot, tat, next) };
            if seen == tat {
                admitted = Some(reserve);
                break;
            }
            tat = seen;
        }
        if admitted.ok_or(Counter::DropLimitGlobal)? {
            count(Counter::LimitKnownReserve);
        }
    }
    if let Some(next) = src_next {
        // A failed insert (cannot happen for an LRU with preallocated entries) leaves the
        // bucket full: fail open, as an evicted bucket does.
        let _ = maps::SRC_BUCKETS.insert(src, next, 0);
    }
    Ok(())
}

/// Is the global limit, and with it the known sources' reserve, on? Cookies are learned and
/// matched (`cookie.rs`) only then.
#[inline(always)]
pub fn known_sources_on() -> bool {
    config().is_some_and(|c| c.flags & LIMIT_F_GLOBAL != 0)
}

/// A ClientHello echoed a node's cookie: its source is known from now (the coarse clock;
/// `known` compares with the precise one, which is never behind it).
#[inline(always)]
pub fn proven(pkt: &Packet) {
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let _ = maps::KNOWN_SRCS.insert(src_key(pkt), now, 0);
}
