//! A datagram from a node's serving address and port is a genuine reply only if it arrives the
//! way the balancer reaches the node: on the interface of the FIB's next hop towards the node
//! (unless VLAN-tagged), from that next hop's MAC (README step 5).

use lb_common::Counter;

use crate::{
    fib::{Fib, FibRc},
    forward,
    parse::Packet,
    State,
};

pub fn check_origin(
    fib: &dyn Fib,
    state: &mut State,
    f: &[u8],
    pkt: &Packet,
    ingress: u32,
    slot: u32,
) -> Result<(), Counter> {
    // The way back to the node: the reply's addressing reversed.
    let hop = forward::lookup_node(fib, state, f, pkt, (&pkt.dst, &pkt.src), ingress, slot);
    match hop.rc {
        FibRc::Success => {}
        FibRc::FwdDisabled => return Err(Counter::PassFwdDisabled),
        FibRc::NoNeigh => return Err(Counter::DropReplyNoNeigh),
        _ => return Err(Counter::DropForgedReply),
    }
    if pkt.vlans == 0 && hop.ifindex != ingress {
        return Err(Counter::DropForgedReply);
    }
    if f[6..12] != hop.dmac {
        return Err(Counter::DropForgedReply);
    }
    Ok(())
}
