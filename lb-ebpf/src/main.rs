//! cidlb datapath: an XDP program that balances DTLS 1.2 and 1.3 traffic by Connection ID.
//!
//! The packet's path through this crate, one file per step:
//! - `parse.rs`   Ethernet (up to two VLAN tags), IPv4 (any IHL) / IPv6, UDP → `Packet`
//! - `vip.rs`     is it for a VIP port, or a reply from a node?
//! - `reply.rs`   is a node's reply genuine (the way the balancer reaches the node)?
//! - `dtls.rs`    the DTLS record header: a tls12_cid record or a DTLS 1.3 unified header yields the node id in its CID
//! - `flow.rs`    everything else is pinned to a node per 5-tuple (LRU table)
//! - `maglev.rs`  a new flow's node with `flows.policy: maglev` (else the round-robin ring)
//! - `limit.rs`   new-flow rate limits (per source, global, known sources first)
//! - `cookie.rs`  known sources: a node's cookie learned from its reply, matched in the ClientHello
//! - `nat.rs`     destination (to a node) or source (reply) rewrite, checksums fixed
//! - `icmp.rs`    a node's ICMP error to a client, un-NATed like its replies
//! - `frag.rs`    IP fragments: the first decides, later ones follow it (`FRAGS`)
//! - `tunnel.rs`  or, for a tunnel VIP, the packet encapsulated to its node (IPIP or GUE)
//! - `too_big.rs` or, too big for the tunnel's path MTU, answered with ICMP frag needed / too big
//! - `forward.rs` bpf_fib_lookup, TTL, MACs, XDP_TX / DEVMAP redirect / pass to the kernel
//! - `stats.rs`   per-CPU counters; `maps.rs` every map
#![no_std]
// `core::arch::asm!` for the one BPF_CMPXCHG in limit.rs (the eBPF crate builds on nightly).
#![feature(asm_experimental_arch)]
#![no_main]

mod cookie;
mod dtls;
mod flow;
mod forward;
mod frag;
mod icmp;
mod limit;
mod maglev;
mod maps;
mod nat;
mod parse;
mod reply;
mod stats;
mod too_big;
mod tunnel;
mod vip;

use aya_ebpf::{macros::xdp, programs::XdpContext, Global};
use lb_common::{Counter, DpConfig};

use crate::{
    forward::NextHop,
    nat::{Rewrite, Side},
    parse::{Packet, Udp, FRAG_FIRST, FRAG_LATER, FRAG_LATER_TO_VIP, FRAG_NONE, L4},
    stats::count,
};
use lb_common::frag::{FRAG_FROM_NODE, FRAG_TO_VIP};

/// Load-time constants, set by the agent with `EbpfLoader::override_global("CONFIG", ..)`.
/// It lives in .rodata, which the kernel freezes, so the verifier reads these as constants
/// and prunes the branches they rule out.
#[no_mangle]
pub static CONFIG: Global<DpConfig> = Global::new(DpConfig::DEFAULT);

/// The program: [`balance`] decides and sends (or drops, or passes); then the step it asked
/// for, if any: the cookie step for a handshake packet (`cookie::after`), the record of a
/// first fragment's node (`frag::commit`), the encapsulation for a tunnel VIP's packet
/// (`tunnel::encap`). All of it inlined into one function: a
/// BPF-to-BPF call costs about 7 ns a packet (`cargo xtask bench`), and since nothing of
/// `balance` is live once it has returned, LLVM gives the steps after it the same stack slots
/// (the whole program takes 456 of its 512 bytes; called as functions, the steps' frames would
/// add to `balance`'s).
#[xdp]
#[inline(always)]
pub fn cidlb(ctx: XdpContext) -> u32 {
    let (action, next) = balance(&ctx);
    match next.then {
        Then::Nothing => action,
        Then::Prove => {
            cookie::after(&ctx, cookie::Hello::Client);
            action
        }
        Then::Learn => {
            cookie::after(&ctx, cookie::Hello::Node);
            action
        }
        Then::Record => {
            frag::commit(next.node);
            action
        }
        Then::Encap | Then::RecordEncap => {
            if next.then == Then::RecordEncap {
                frag::commit(next.node);
            }
            match tunnel::encap(&ctx, next.vip, next.node, next.l4) {
                Ok(()) => action,
                Err(reason) => {
                    count(reason);
                    stats::action_for(reason)
                }
            }
        }
        Then::TooBig => match too_big::answer(&ctx, next.vip, next.node) {
            Ok(()) => aya_ebpf::bindings::xdp_action::XDP_TX,
            Err(reason) => {
                count(reason);
                stats::action_for(reason)
            }
        },
        // Ended in `balance`.
        Then::Pending => action,
    }
}

/// What `balance` asks the entry to do after it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Nothing,
    /// A handshake record to a VIP port on the flow path: a ClientHello may echo a cookie.
    Prove,
    /// A genuine reply from a node starting with a handshake record: a cookie request.
    Learn,
    /// Encapsulate to the node (a tunnel VIP; the packet is otherwise forwarded already).
    Encap,
    /// Too big for the tunnel: answer the client (`too_big.rs`), nothing written yet.
    TooBig,
    /// A first fragment to a VIP, before its node is chosen (its key is in `FRAG_SCRATCH`).
    /// Decided in `balance` rather than kept in a register: live across the DTLS walk, a flag
    /// took stack the program does not have.
    Pending,
    /// A first fragment to a VIP, forwarded (or passed on) to `node`: record it for the later
    /// fragments (`frag::commit`).
    Record,
    /// Both: a tunnel VIP's first fragment.
    RecordEncap,
}

/// What follows `balance` for this packet, as `try_lb` finds it.
struct Next {
    then: Then,
    /// For `Encap`: the VIP's index, its UDP header's offset (0: a later fragment, which has
    /// none; `frag.rs` kept its first's ports) and the node's id. For `TooBig`: the
    /// encapsulation's bytes in `vip`, the tunnel's path MTU in `node`.
    vip: u32,
    l4: u32,
    node: u32,
}

/// The action for the packet, and the step after it.
#[inline(always)]
fn balance(ctx: &XdpContext) -> (u32, Next) {
    count(Counter::PacketsSeen);
    let mut next = Next {
        then: Then::Nothing,
        vip: 0,
        l4: 0,
        node: 0,
    };
    let action = match try_lb(ctx, &mut next) {
        Ok(action) => action,
        Err(reason) => {
            // (Tested first: most packets ask for nothing after.)
            if next.then != Then::Nothing {
                next.then = match next.then {
                    // Only a forwarded packet is encapsulated; a first fragment not routed is
                    // not recorded.
                    Then::Encap | Then::Pending => Then::Nothing,
                    // A first fragment is recorded unless dropped: passed on (rewritten to the
                    // kernel, or unchanged in shadow mode), its later fragments follow it.
                    Then::Record | Then::RecordEncap if !reason.drops() => Then::Record,
                    Then::Record | Then::RecordEncap => Then::Nothing,
                    then => then,
                };
            }
            count(reason);
            // Shadow mode passes what it would refuse at the edge, counted as both.
            if reason.shadow_passes() && CONFIG.load().shadow != 0 {
                count(Counter::ShadowPass);
                aya_ebpf::bindings::xdp_action::XDP_PASS
            } else {
                stats::action_for(reason)
            }
        }
    };
    (action, next)
}

/// `Ok(action)`: forwarded, counters already bumped.
/// `Err(counter)`: the counter says what happened and decides the action (pass or drop).
/// `next`: `Prove` for a handshake packet on the flow path (a ClientHello may echo a
/// cookie), whatever its verdict; `Learn` for a genuine reply from a node that starts with a
/// handshake record (a cookie request), see `cookie.rs`; `Encap` for a tunnel VIP's packet.
#[inline(always)]
fn try_lb(ctx: &XdpContext, next: &mut Next) -> Result<u32, Counter> {
    let mut pkt = parse::parse(ctx)?;
    let cfg = CONFIG.load();
    let udp = match pkt.l4 {
        L4::Udp(udp) => udp,
        // A later fragment: its first's ports stand in for the UDP header it lacks, and
        // `pkt.frag` says which way the first went, if it was recorded (`frag.rs`).
        _ if pkt.frag == FRAG_LATER => {
            let (udp, frag) = frag::first(ctx, &pkt);
            pkt.frag = frag;
            udp
        }
        _ => {
            // Untagged frames only: a VLAN-tagged one leaves through the kernel anyway, and
            // walking this branch for every tag layout took the verifier past its budget.
            if let Some(q) = icmp::quote(ctx, &pkt).filter(|_| pkt.vlans == 0) {
                // From the node the quote is addressed to, about a client's datagram.
                if q.dst == pkt.src {
                    if let Some(rev) = vip::reverse(&pkt, q.udp.dport) {
                        return icmp_from_node(ctx, &pkt, &q, &rev, &cfg);
                    }
                }
                // To a VIP, about a node's reply.
                if let Some(dest) = icmp::reply_dest(&pkt, &q) {
                    return icmp_to_node(ctx, &pkt, &q, &dest, &cfg);
                }
                if vip::is_vip(&pkt) {
                    return Err(Counter::PassIcmpNoNode);
                }
            }
            return Err(vip::not_udp_verdict(ctx, &pkt));
        }
    };

    let dest = vip::dest(&pkt, udp.dport);
    // To a VIP, a later fragment follows a first that went to one, or nowhere (its stand-in
    // port 0 is no VIP port).
    if let vip::Dest::OtherPort = dest {
        if pkt.frag >= FRAG_LATER && pkt.frag != FRAG_LATER_TO_VIP {
            return Err(Counter::DropFragUnknown);
        }
        return Err(Counter::DropVipOtherPort);
    }
    if let vip::Dest::Balanced(vip) = dest {
        vip::check_source(&pkt)?;
        udp.check_length(ctx, pkt.frag)?;
        if pkt.frag == FRAG_FIRST {
            count(Counter::FragFirst);
            frag::prepare(ctx, &pkt, FRAG_TO_VIP, &udp);
            next.then = Then::Pending;
        }
        let route = if pkt.frag < FRAG_LATER {
            dtls::classify(ctx, &udp, &cfg)?
        } else if pkt.frag == FRAG_LATER_TO_VIP {
            dtls::Route::Node(frag::first_node(), dtls::Format::Followed)
        } else {
            return Err(Counter::DropFragUnknown);
        };
        let (id, node) = match route {
            dtls::Route::Node(id, format) => match maps::node(id) {
                Some(node) => {
                    count(format.routed());
                    (id, node)
                }
                // The first's node is gone.
                None if matches!(format, dtls::Format::Followed) => {
                    return Err(Counter::DropFragUnknown)
                }
                None if cfg.unknown_node_flow != 0 => {
                    count(Counter::CidUnknownNodeFlow);
                    flow::route(&pkt, &udp, &cfg)?
                }
                None => return Err(Counter::DropCidUnknownNode),
            },
            dtls::Route::Flow => {
                // An IP-fragmented ClientHello is not walked for a cookie (DTLS fragments its
                // handshake messages itself: IP fragments are not what a client sends).
                if cookie::starts_handshake(ctx, &udp) && next.then == Then::Nothing {
                    next.then = Then::Prove;
                }
                flow::route(&pkt, &udp, &cfg)?
            }
        };
        if next.then == Then::Pending {
            next.then = Then::Record;
            next.node = id;
        }
        // A tunnel VIP's node answers the client directly: no cookie can be learned from its
        // replies, so its ClientHellos are never checked for one (`Encap` replaces `Prove`).
        if let Some(t) = tunnel::of_vip(vip) {
            tunnel::check_fragment(&pkt, &udp, next.then == Then::Record, t)?;
            let to = tunnel::addressing(&pkt, &udp, &node, t)?;
            let mut hop = forward::lookup_node(ctx, &pkt, &to, node.slot)?;
            hop.limit_mtu(t.mtu);
            stats::to_node(ctx, node.slot);
            if cfg.shadow != 0 {
                return Err(Counter::ShadowPass);
            }
            *next = Next {
                then: if next.then == Then::Record {
                    Then::RecordEncap
                } else {
                    Then::Encap
                },
                vip,
                l4: udp.off as u32,
                node: id,
            };
            let over = tunnel::overhead(t, &pkt);
            return match forward::send(ctx, &pkt, &hop, &forward::TUNNEL, over) {
                // Answered after `balance` (`too_big.rs`), which counts what it does.
                Err(Counter::DropTunnelTooBig) => {
                    *next = Next {
                        then: Then::TooBig,
                        vip: over,
                        l4: 0,
                        node: hop.mtu(),
                    };
                    Ok(aya_ebpf::bindings::xdp_action::XDP_DROP)
                }
                sent => sent,
            };
        }
        let rw = Rewrite::to_node(&pkt, &udp, &node)?;
        let hop = forward::lookup_node(ctx, &pkt, &rw.addressing(&pkt, &udp), node.slot)?;
        stats::to_node(ctx, node.slot);
        return finish(ctx, &pkt, &udp, &rw, &hop, &cfg);
    }

    if let Some(rev) = vip::reverse(&pkt, udp.sport) {
        // Before anything else, including the "addressed to this host" check below: a forged
        // reply must neither be relayed with the VIP as source nor answer a health probe.
        reply::check_origin(ctx, &pkt, &udp, &rev)?;
        let rw = Rewrite::to_client(&rev);
        let hop = forward::lookup(ctx, &pkt, &rw.addressing(&pkt, &udp))?;
        // Addressed to this host (the agent's health probes): not a reply to a client.
        if hop.is_local() {
            return Err(Counter::PassLocalReply);
        }
        // No FIB answer (forwarding disabled on the ingress interface): untouched, so a
        // probe answer still reaches the agent (the kernel drops it if it is not local).
        if hop.fwd_disabled() {
            return Err(Counter::PassFwdDisabled);
        }
        if pkt.frag == FRAG_NONE && cookie::starts_handshake(ctx, &udp) {
            next.then = Then::Learn;
        }
        count(if pkt.frag >= FRAG_LATER {
            Counter::ReplyFragUnnat
        } else {
            Counter::ReplyUnnat
        });
        if pkt.frag == FRAG_FIRST {
            count(Counter::ReplyFragFirst);
            frag::prepare(ctx, &pkt, FRAG_FROM_NODE, &udp);
            frag::commit(0);
        }
        stats::from_node(ctx, rev.node_slot);
        icmp::remember(ctx, &pkt, &udp, &rev);
        return finish(ctx, &pkt, &udp, &rw, &hop, &cfg);
    }

    // A node's fragment that is not a reply's: its first from another port (the node's own
    // traffic, whose later fragments cannot be told from a reply's), or a later one whose
    // first was not recorded.
    if pkt.frag != FRAG_NONE && vip::from_node_addr(&pkt) {
        return Err(if pkt.frag == FRAG_FIRST {
            Counter::DropNodeFragment
        } else {
            Counter::DropReplyFragUnknown
        });
    }
    Err(Counter::PassNotVip)
}

/// An ICMP error from a node about a client's datagram to a VIP (`icmp.rs`): origin-checked
/// and un-NATed like the node's replies.
#[inline(always)]
fn icmp_from_node(
    ctx: &XdpContext,
    pkt: &Packet,
    q: &icmp::Quote,
    rev: &lb_common::Reverse,
    cfg: &DpConfig,
) -> Result<u32, Counter> {
    let reply = q.reply();
    reply::check_origin(ctx, pkt, &reply, rev)?;
    let rw = Rewrite::to_client(rev);
    let hop = forward::lookup(ctx, pkt, &rw.addressing(pkt, &reply))?;
    // About a health probe of this host's: the agent's socket takes it as it is.
    if hop.is_local() {
        return Err(Counter::PassLocalReply);
    }
    if hop.fwd_disabled() {
        return Err(Counter::PassFwdDisabled);
    }
    count(Counter::ReplyIcmpUnnat);
    stats::from_node(ctx, rev.node_slot);
    if cfg.shadow != 0 {
        return Err(Counter::ShadowPass);
    }
    icmp::rewrite(
        ctx,
        pkt,
        q,
        Side::Src,
        pkt.src,
        rw.addr,
        reply.sport,
        rw.port,
    )?;
    forward::send(ctx, pkt, &hop, &forward::TO_KERNEL, 0)
}

/// An ICMP error to a VIP about a node's reply (`icmp.rs`): on to the node that answered the
/// flow last, rate-limited.
#[inline(always)]
fn icmp_to_node(
    ctx: &XdpContext,
    pkt: &Packet,
    q: &icmp::Quote,
    dest: &lb_common::ReplyDest,
    cfg: &DpConfig,
) -> Result<u32, Counter> {
    icmp::admit(cfg)?;
    let to = nat::Addressing {
        src: pkt.src,
        dst: dest.addr,
        sport: q.udp.dport,
        dport: dest.port,
    };
    let hop = forward::lookup_node(ctx, pkt, &to, dest.node_slot)?;
    count(Counter::IcmpToNode);
    stats::to_node(ctx, dest.node_slot);
    if cfg.shadow != 0 {
        return Err(Counter::ShadowPass);
    }
    icmp::rewrite(
        ctx,
        pkt,
        q,
        Side::Dst,
        pkt.dst,
        dest.addr,
        q.udp.sport,
        dest.port,
    )?;
    forward::send(ctx, pkt, &hop, &forward::TO_KERNEL, 0)
}

/// Rewrites and sends, unless in shadow mode, where the decision is only counted.
#[inline(always)]
fn finish(
    ctx: &XdpContext,
    pkt: &Packet,
    udp: &Udp,
    rw: &Rewrite,
    hop: &NextHop,
    cfg: &DpConfig,
) -> Result<u32, Counter> {
    if cfg.shadow != 0 {
        return Err(Counter::ShadowPass);
    }
    rw.apply(ctx, pkt, udp)?;
    forward::send(ctx, pkt, hop, &forward::TO_KERNEL, 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this only satisfies the compiler.
    loop {}
}

// bpf_fib_lookup and bpf_redirect_map are GPL-only helpers.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
