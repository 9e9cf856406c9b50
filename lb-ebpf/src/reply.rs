//! Is a packet from a node's serving address and port a genuine reply? Only then is it
//! un-NATed (or, addressed to this host, passed to the agent's health probes).
//!
//! Without this check the balancer is an open relay: `REVERSE` names only the node's address
//! and port, which anyone can forge, and XDP runs before rp_filter and netfilter. A client
//! forging src = node:5684, dst = any host would get its datagram sent on with the VIP as
//! source, and a forged answer to a health probe could keep a dead node "up".
//!
//! A reply is genuine when it arrives the way the balancer itself reaches the node: the FIB
//! next hop towards the node's address (the packet's source) is
//! - on the interface the frame came in on (for a VLAN-tagged frame, XDP sees the parent
//!   device and the FIB names the VLAN device: the frame's (parent, VLAN id), and for a second
//!   tag (that VLAN device, inner id), must lead through `VLAN_IFACES` to that device; a tag
//!   with no entry is forged), and
//! - the neighbour whose MAC is the frame's Ethernet source.
//!
//! This keeps no per-client state: a reply from a node to a client this balancer never saw
//! (another balancer's client, or a notification the node sends first) is un-NATed too.
//! It relies on symmetric routing between balancer and node (the node's replies come back from
//! its next hop). It does not stop an attacker on the nodes' own L2 segment who also forges
//! the node's MAC, nor, in a one-armed setup where nodes sit behind the same router as the
//! clients, a client whose frames carry that router's MAC.

use aya_ebpf::programs::XdpContext;
use lb_common::{Counter, Reverse, VlanKey};
use network_types::{eth::EthHdr, vlan::VlanHdr};

use crate::{
    forward,
    nat::Addressing,
    parse::{ptr_at, Packet, Udp},
};

/// `Ok` when the packet is a genuine reply from the node `rev` names; else the counter that
/// ends it: `drop_forged_reply`, `drop_reply_no_neigh` (the MAC cannot be checked: fail
/// closed; the agent's health probes and forwarded client traffic keep the node's neighbour
/// entry resolved), or `pass_fwd_disabled` (no FIB answer at all; the kernel, which will not
/// forward it either, delivers it if it is local and drops it otherwise).
#[inline(always)]
pub fn check_origin(
    ctx: &XdpContext,
    pkt: &Packet,
    udp: &Udp,
    rev: &Reverse,
) -> Result<(), Counter> {
    // The way back to the node: the reply's addressing reversed.
    let back = Addressing {
        src: pkt.dst,
        dst: pkt.src,
        sport: udp.dport,
        dport: udp.sport,
    };
    let hop = forward::lookup_node(ctx, pkt, &back, rev.node_slot)?;
    if hop.fwd_disabled() {
        return Err(Counter::PassFwdDisabled);
    }
    if hop.no_neigh() {
        return Err(Counter::DropReplyNoNeigh);
    }
    // Unreachable, blackhole, prohibited, a local address: the balancer does not reach the
    // node, so nothing can come back from it.
    if !hop.resolved() {
        return Err(Counter::DropForgedReply);
    }
    if arrived_on(ctx, pkt, hop.ingress()) != Some(hop.egress()) {
        return Err(Counter::DropForgedReply);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let smac = unsafe { (*eth).src_addr };
    if smac != hop.dmac() {
        return Err(Counter::DropForgedReply);
    }
    Ok(())
}

/// The device a frame arrived on as the kernel names it: the XDP interface for an untagged
/// frame, else the VLAN device of its tags (`VLAN_IFACES`, filled by the agent); `None` for a
/// tag no VLAN device of the balancer carries.
#[inline(always)]
fn arrived_on(ctx: &XdpContext, pkt: &Packet, ingress: u32) -> Option<u32> {
    let mut dev = ingress;
    let mut i = 0;
    while i < 2 {
        if i >= pkt.vlans as usize {
            break;
        }
        let tag: *const VlanHdr = ptr_at(ctx, EthHdr::LEN + i * VlanHdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let tci = unsafe { (*tag).tci };
        let key = VlanKey {
            parent: dev,
            vid: u16::from_be_bytes(tci) & 0x0fff,
            _pad: 0,
        };
        // SAFETY: copied out under the program's RCU read lock.
        dev = unsafe { *crate::maps::VLAN_IFACES.get(key)? };
        i += 1;
    }
    Some(dev)
}
