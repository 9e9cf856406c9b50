//! Reference programs for `cargo xtask bench`, in an object of their own (the `bench` binary of
//! this crate, embedded apart from the datapath's `lb`): `cidlb run` never loads them and
//! never creates their maps. The empty program (floor of the per-path cost), a counting sink
//! for the nodes and a minimal forwarder (the ceiling of the throughput bench).
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, PerCpuArray},
    programs::XdpContext,
    Global,
};
use lb_common::{FwdTarget, MAX_IFACES, SINK_BYTES, SINK_MISROUTED, SINK_PACKETS, SINK_SLOTS};
use network_types::eth::EthHdr;

/// The floor: an XDP program that only passes the packet. Per-path costs are reported as
/// ratios to this program's cost measured the same way.
#[xdp]
pub fn cidlb_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A pointer to `T` at `off` bytes into the frame, if all of `T` lies inside it: the one bounds
/// check the verifier needs per read (the datapath's `parse::ptr_at`; this object does not link
/// the datapath's modules).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if ctx.data() + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((ctx.data() + off) as *mut T)
}

/// The ceiling forwarder's redirect target (its own map, named like the datapath's).
#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

/// Sink counters: packets, bytes, CID records naming another node, then one slot per value of
/// the CID's first byte (`SINK_SLOTS + byte`).
#[map]
static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(SINK_SLOTS + 256, 0);

/// The node id a sink expects in the CIDs it receives (set at load time).
#[no_mangle]
static SINK_NODE: Global<u8> = Global::new(0);

/// Where the ceiling forwarder sends everything.
#[map]
static FWD: Array<FwdTarget> = Array::with_max_entries(1, 0);

#[inline(always)]
fn bump(slot: u32, by: u64) {
    if let Some(v) = SINK.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *v += by };
    }
}

/// A node's traffic sink for the throughput bench: counts and drops untagged IPv4 UDP, checking
/// the CID's node byte of a tls12_cid record (IHL 5). Everything else (ARP above all, which the
/// balancer needs to reach the node) goes to the kernel.
#[xdp]
pub fn cidlb_sink(ctx: XdpContext) -> u32 {
    // Ethernet type at 12, IPv4 protocol at 23.
    let Some(h) = ptr_at::<[u8; 24]>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { *h };
    if h[12] != 0x08 || h[13] != 0x00 || h[23] != 17 {
        return xdp_action::XDP_PASS;
    }
    bump(SINK_PACKETS, 1);
    bump(SINK_BYTES, (ctx.data_end() - ctx.data()) as u64);
    // Ethernet 14 + IPv4 20 + UDP 8 = 42: record type at 42, the CID's first byte at 53.
    if let Some(p) = ptr_at::<[u8; 12]>(&ctx, 42) {
        // SAFETY: bounds checked by ptr_at.
        let b = unsafe { *p };
        if b[0] == 25 {
            bump(SINK_SLOTS + b[11] as u32, 1);
            if b[11] != SINK_NODE.load() {
                bump(SINK_MISROUTED, 1);
            }
        }
    }
    xdp_action::XDP_DROP
}

/// The ceiling of the throughput bench: sets MACs and redirects every packet to one interface,
/// with no parsing, lookups or rewrites.
#[xdp]
pub fn cidlb_fwd(ctx: XdpContext) -> u32 {
    let Some(t) = FWD.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = t.dmac;
        (*eth).src_addr = t.smac;
    }
    DEVMAP
        .redirect(t.ifindex, 0)
        .unwrap_or(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this only satisfies the compiler.
    loop {}
}

// bpf_redirect_map is a GPL-only helper.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
