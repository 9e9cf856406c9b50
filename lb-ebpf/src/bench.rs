//! Reference program for `cargo xtask bench`, never attached by the agent.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// The floor: an XDP program that only passes the packet. Per-path costs are reported as
/// ratios to this program's cost measured the same way.
#[xdp]
pub fn cidlb_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
