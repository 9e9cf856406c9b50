//! A datagram from a node's serving address and port is a genuine reply only if it arrives the
//! way the balancer reaches the node: on the interface of the FIB's next hop towards the node
//! (for a tagged frame, the VLAN device its tags lead to from the XDP interface), from that
//! next hop's MAC (docs/datapath.md step 5).

use lb_common::{Counter, VlanKey};

use crate::{
    fib::{Fib, FibRc},
    forward,
    parse::Packet,
    State, Tables,
};

pub fn check_origin(
    t: &Tables,
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
    // The device the frame came in on as the kernel names it: each tag leads from its parent
    // device to a VLAN device (`VLAN_IFACES`); a tag no VLAN device carries is forged.
    let mut dev = Some(ingress);
    for i in 0..pkt.vlans as usize {
        let at = 14 + 4 * i;
        let vid = u16::from_be_bytes([f[at], f[at + 1]]) & 0x0fff;
        dev = dev.and_then(|parent| {
            t.vlan_ifaces
                .get(&VlanKey {
                    parent,
                    vid,
                    _pad: 0,
                })
                .copied()
        });
    }
    if dev != Some(hop.ifindex) {
        return Err(Counter::DropForgedReply);
    }
    if f[6..12] != hop.dmac {
        return Err(Counter::DropForgedReply);
    }
    Ok(())
}
