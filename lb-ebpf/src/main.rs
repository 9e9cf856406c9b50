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
mod limit;
mod maglev;
mod maps;
mod nat;
mod parse;
mod reply;
mod stats;
mod vip;

use aya_ebpf::{macros::xdp, programs::XdpContext, Global};
use lb_common::{Counter, DpConfig};

use crate::{
    forward::NextHop,
    nat::Rewrite,
    parse::{Packet, Udp, L4},
    stats::count,
};

/// Load-time constants, set by the agent with `EbpfLoader::override_global("CONFIG", ..)`.
/// It lives in .rodata, which the kernel freezes, so the verifier reads these as constants
/// and prunes the branches they rule out.
#[no_mangle]
pub static CONFIG: Global<DpConfig> = Global::new(DpConfig::DEFAULT);

/// The program: [`balance`] decides and sends (or drops, or passes); a handshake packet it
/// marks then goes through `cookie::after`. Two BPF functions, each with its own stack frame:
/// `balance` takes almost all of the 512 bytes a program and the functions it calls may use
/// together, so the cookie step cannot run inside it.
#[xdp]
pub fn cidlb(ctx: XdpContext) -> u32 {
    let (action, hello) = balance(&ctx);
    if hello != cookie::Hello::None {
        cookie::after(&ctx, hello);
    }
    action
}

/// The action for the packet, and which cookie step it needs.
#[inline(never)]
fn balance(ctx: &XdpContext) -> (u32, cookie::Hello) {
    count(Counter::PacketsSeen);
    let mut hello = cookie::Hello::None;
    let action = match try_lb(ctx, &mut hello) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            // Shadow mode passes what it would refuse at the edge, counted as both.
            if reason.shadow_passes() && CONFIG.load().shadow != 0 {
                count(Counter::ShadowPass);
                return (aya_ebpf::bindings::xdp_action::XDP_PASS, hello);
            }
            stats::action_for(reason)
        }
    };
    (action, hello)
}

/// `Ok(action)`: forwarded, counters already bumped.
/// `Err(counter)`: the counter says what happened and decides the action (pass or drop).
/// `hello`: set for a handshake packet on the flow path (a ClientHello may echo a cookie),
/// whatever its verdict, and for a genuine reply from a node that starts with a handshake
/// record (a cookie request); see `cookie.rs`.
#[inline(always)]
fn try_lb(ctx: &XdpContext, hello: &mut cookie::Hello) -> Result<u32, Counter> {
    let pkt = parse::parse(ctx)?;
    let L4::Udp(udp) = pkt.l4 else {
        return Err(vip::not_udp_verdict(ctx, &pkt));
    };
    let cfg = CONFIG.load();

    let dest = vip::dest(&pkt, udp.dport);
    if let vip::Dest::OtherPort = dest {
        return Err(Counter::DropVipOtherPort);
    }
    if let vip::Dest::Balanced = dest {
        vip::check_source(&pkt)?;
        udp.check_length(ctx)?;
        let node = match dtls::classify(ctx, &udp, &cfg)? {
            dtls::Route::Node(id, format) => match maps::node(id) {
                Some(node) => {
                    count(format.routed());
                    node
                }
                None if cfg.unknown_node_flow != 0 => {
                    count(Counter::CidUnknownNodeFlow);
                    flow::route(&pkt, &udp, &cfg)?
                }
                None => return Err(Counter::DropCidUnknownNode),
            },
            dtls::Route::Flow => {
                if cookie::starts_handshake(ctx, &udp) {
                    *hello = cookie::Hello::Client;
                }
                flow::route(&pkt, &udp, &cfg)?
            }
        };
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
        if cookie::starts_handshake(ctx, &udp) {
            *hello = cookie::Hello::Node;
        }
        count(Counter::ReplyUnnat);
        stats::from_node(ctx, rev.node_slot);
        return finish(ctx, &pkt, &udp, &rw, &hop, &cfg);
    }

    Err(Counter::PassNotVip)
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
    forward::send(ctx, pkt, hop)
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
