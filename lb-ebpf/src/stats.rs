//! Counting, not logging, on the hot path: per-CPU arrays the agent sums.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::Counter;

use crate::{maps, parse::Packet};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(v) = maps::STATS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU's program run touches it.
        unsafe { *v += 1 };
    }
}

/// The action for a packet whose processing ended with counter `c`: its name says it.
#[inline(always)]
pub fn action_for(c: Counter) -> u32 {
    match c {
        Counter::DropBadIpHeader
        | Counter::DropFragment
        | Counter::DropBadUdpLength
        | Counter::DropCidTruncated
        | Counter::DropCidUnknownNode
        | Counter::DropCidNodeFamily
        | Counter::DropNoNode
        | Counter::DropForgedReply
        | Counter::DropReplyNoNeigh
        | Counter::DropNodeFragment
        | Counter::DropLimitSource
        | Counter::DropLimitGlobal
        | Counter::DropCid13Truncated => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
pub fn to_node(ctx: &XdpContext, slot: u32) {
    if let Some(s) = maps::NODE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).to_node_packets += 1;
            (*s).to_node_bytes += Packet::frame_len(ctx);
        }
    }
}

#[inline(always)]
pub fn from_node(ctx: &XdpContext, slot: u32) {
    if let Some(s) = maps::NODE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).from_node_packets += 1;
            (*s).from_node_bytes += Packet::frame_len(ctx);
        }
    }
}
