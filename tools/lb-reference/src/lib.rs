//! A reference classifier for the cidlb datapath, in plain Rust.
//!
//! Given a frame, the interface it came in on, the datapath's map contents ([`Tables`]), the
//! mutable state the program keeps ([`State`]: flow table, round-robin cursors) and the FIB's
//! answers ([`Fib`]), [`classify`] computes what the XDP program must do: the action, the frame
//! it leaves behind, and every counter it bumps. `cargo xtask fuzz` runs the same frames through
//! the loaded program (BPF_PROG_TEST_RUN) and compares all three.
//!
//! It shares only `lb_common`'s types with the datapath: every byte offset, check, checksum and
//! decision is written again here, from docs/datapath.md's description and the RFCs, one module per
//! datapath step (named like `lb-ebpf/src`). What it cannot know is held still by its caller:
//! - one pinned CPU, so the per-CPU round-robin cursors are [`State::rr`];
//! - flow table below capacity and `idle_timeout` far away: no flow is evicted or expires;
//! - the next-hop cache (`NEXTHOP`) is modelled, with the kernel's clock given by the caller
//!   ([`State::now_ns`]), who runs no frame while an entry is about to expire;
//! - new-flow rate limits (`limit.rs`) read the precise clock, which the caller knows only as
//!   a window around the run ([`State::precise`]); the source buckets and known sources are
//!   never evicted (the caller keeps their LRU maps far from full) and no source stops being
//!   known during a run (`known_for` far longer);
//! - known sources are made only by the cookie step (`cookie.rs`, after the verdict, with the
//!   global limit on): a node's HelloVerifyRequest or HelloRetryRequest learned on the reply
//!   path, a ClientHello echoing it from the same address and port, DTLS 1.3 cookie
//!   extensions followed into a later fragment. `COOKIES` is never evicted either; it is
//!   hashed with the kernel's `COOKIE_KEY` ([`Tables::cookie_key`]), and the times it and a
//!   proof write are the coarse clock the caller gives ([`State::now_ns`]), which the caller
//!   does not compare.
//!
//! The Maglev tables are built here too (`maglev.rs`, from the node ids and weights of the
//! config), not read from the kernel: the caller compares them with what the agent wrote.

pub mod cookie;
pub mod dtls;
pub mod fib;
pub mod flow;
pub mod forward;
pub mod frag;
pub mod icmp;
pub mod limit;
pub mod maglev;
pub mod nat;
pub mod parse;
pub mod reply;
pub mod stats;
pub mod too_big;
pub mod tunnel;
pub mod vip;

use std::collections::{BTreeMap, HashMap, HashSet};

use lb_common::{
    AddrKey, Counter, DpConfig, FlowKey, Node, NodeAddr, Reverse, ReverseKey, Vip, VlanKey,
};

pub use fib::{Fib, FibAnswer, FibRc};
pub use stats::Outcome;

/// XDP actions (uapi `enum xdp_action`).
pub use lb_common::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

/// What the datapath's maps hold (read back after provisioning) and its load-time constants.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub config: Option<DpConfig>,
    /// `NODES`: node id → node.
    pub nodes: HashMap<u32, Node>,
    /// `VIPS`.
    pub vips: HashMap<AddrKey, Vip>,
    /// `VIP_PORTS`: bitmap index → the 1024 words of that VIP's port bitmap.
    pub vip_ports: HashMap<u32, Vec<u64>>,
    /// `VIP_TUNNEL`: bitmap index → that VIP's encapsulation (absent or `ENCAP_NONE`: NAT).
    pub vip_tunnel: HashMap<u32, lb_common::tunnel::Tunnel>,
    /// `REVERSE`.
    pub reverse: HashMap<ReverseKey, Reverse>,
    /// `NODE_ADDRS`.
    pub node_addrs: HashMap<AddrKey, NodeAddr>,
    /// `RING` cut to `RING_LEN`, per family index (0 IPv4, 1 IPv6). `ring_len` is kept apart
    /// because the datapath checks it against `MAX_NODES` before reading the ring.
    pub ring: [Vec<u32>; 2],
    pub ring_len: [u32; 2],
    /// `MAGLEV`, whole: `(family index * 2 + half) * MAGLEV_SIZE + slot` → node id, as
    /// [`maglev::Maglev`] builds it.
    pub maglev: Vec<u32>,
    /// `MAGLEV_CTL`, per family index: 0 no table, 1 half 0 active, 2 half 1 active.
    pub maglev_ctl: [u32; 2],
    /// `limits:` as the datapath applies them on the CPU the frames run on; `None`: no limits.
    pub limits: Option<limit::Limits>,
    /// `DEVMAP`: the interfaces cidlb is attached to.
    pub devmap: HashSet<u32>,
    /// `LOCAL_ADDRS`: the balancer's own addresses.
    pub local_addrs: HashSet<AddrKey>,
    /// `VLAN_IFACES`: (parent ifindex, VLAN id) → VLAN device ifindex.
    pub vlan_ifaces: HashMap<VlanKey, u32>,
    /// `COOKIE_KEY`: the key of the cookies' hash (`cookie.rs`).
    pub cookie_key: lb_common::cookie::CookieKey,
}

impl Tables {
    pub fn config(&self) -> DpConfig {
        self.config.unwrap_or(DpConfig::DEFAULT)
    }
}

/// What the program changes as it runs, on the one CPU it runs on.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// `RR` cursors, per family index.
    pub rr: [u32; 2],
    /// `FLOWS`: 5-tuple → node id.
    pub flows: HashMap<FlowKey, u32>,
    /// `NEXTHOP`: node slot * 2 + family index → cached next hop.
    pub nexthop: HashMap<u32, forward::CachedHop>,
    /// The kernel's coarse clock (CLOCK_MONOTONIC_COARSE) when the frame runs, for `NEXTHOP`'s
    /// expiry and the times `COOKIES` and `KNOWN_SRCS` record. The caller sets it, and runs no
    /// frame while a cached entry is about to expire.
    pub now_ns: u64,
    /// The precise clock (`bpf_ktime_get_ns`) for the frame about to run, and what the kernel's
    /// limit step did with it if the caller knows: see `limit.rs`.
    pub precise: limit::Precise,
    /// The new-flow limits' buckets, known sources and cookies.
    pub limits: limit::Buckets,
    /// `REPLY_DESTS`: client flow → the node that last answered it (never evicted: the
    /// caller keeps it far from full, as `FLOWS`).
    pub reply_dests: HashMap<FlowKey, lb_common::ReplyDest>,
    /// `ICMP_TAT` of the one CPU: the next ICMP error's theoretical arrival time.
    pub icmp_tat: u64,
    /// `TOO_BIG_BUCKET` (of the one CPU): when the packet-too-big answers' bucket is full
    /// again (`too_big.rs`).
    pub too_big_tat: u64,
    /// `FRAGS`: first fragments recorded for their later ones (`frag.rs`).
    pub frags: HashMap<lb_common::frag::FragKey, lb_common::frag::FragRoute>,
}

/// Runs one frame received on `ingress` through the reference: the datapath's `balance`
/// (the verdict), then the cookie step for a packet it marked (`cookie::after`).
pub fn classify(
    frame: &[u8],
    ingress: u32,
    tables: &Tables,
    state: &mut State,
    fib: &dyn Fib,
) -> Outcome {
    let mut out = Outcome::new(frame);
    let mut hello = cookie::Hello::None;
    let mut first: Option<First> = None;
    out.count(Counter::PacketsSeen);
    match try_lb(
        frame, ingress, tables, state, fib, &mut out, &mut hello, &mut first,
    ) {
        Ok(action) => {
            out.action = action;
            if let Some(f) = first.filter(|f| f.routed) {
                frag::record(
                    state,
                    &f.pkt,
                    &f.udp,
                    lb_common::frag::FRAG_TO_VIP,
                    f.node_id,
                );
            }
        }
        Err(reason) => {
            // A first fragment to a VIP, once routed, is recorded unless it is dropped.
            if let Some(f) = first.filter(|f| f.routed && !reason.drops()) {
                frag::record(
                    state,
                    &f.pkt,
                    &f.udp,
                    lb_common::frag::FRAG_TO_VIP,
                    f.node_id,
                );
            }
            out.count(reason);
            out.action = stats::action_for(reason);
            // Shadow mode passes what the edge would refuse (docs/security.md, "Hostile input").
            if vip::refused_at_edge(reason) && tables.config().shadow != 0 {
                out.count(Counter::ShadowPass);
                out.action = XDP_PASS;
            }
        }
    }
    cookie::after(tables, state, &mut out, hello);
    out
}

/// A first fragment to a VIP port, as `try_lb` saw it: recorded once it is routed (to
/// `node_id`) unless dropped (the datapath's `Then::Record`).
struct First {
    pkt: parse::Packet,
    udp: parse::Udp,
    routed: bool,
    node_id: u32,
}

/// The datapath's `try_lb`, step by step. `out.frame` is the frame as rewritten so far.
/// `hello`: which cookie step the packet needs once its verdict is made (`cookie.rs`).
/// `first`: a first fragment to a VIP port, to record once the verdict is made.
#[expect(
    clippy::too_many_arguments,
    reason = "the datapath's try_lb plus the reference's inputs and after-steps"
)]
fn try_lb(
    frame: &[u8],
    ingress: u32,
    t: &Tables,
    state: &mut State,
    fib: &dyn Fib,
    out: &mut Outcome,
    hello: &mut cookie::Hello,
    first: &mut Option<First>,
) -> Result<u32, Counter> {
    use parse::{FRAG_FIRST, FRAG_LATER, FRAG_NONE};
    const LATER_TO_VIP: u8 = FRAG_LATER + lb_common::frag::FRAG_TO_VIP;
    let mut pkt = parse::parse(frame, t)?;
    let cfg = t.config();
    // A later fragment takes its first's ports for the UDP header it lacks (`frag.rs`).
    let mut followed = None;
    let udp = match pkt.udp {
        Some(udp) => udp,
        None if pkt.frag == FRAG_LATER => {
            let (udp, frag, r) = frag::first(state, &pkt);
            pkt.frag = frag;
            followed = r;
            udp
        }
        None => {
            if let Some(q) = icmp::quote(frame, &pkt).filter(|_| pkt.vlans == 0) {
                // From the node the quote went to, about a client's datagram to its serving port.
                let from_node = q.dst == pkt.src;
                if let Some(rev) = vip::reverse(t, &pkt, q.dport).filter(|_| from_node) {
                    reply::check_origin(t, fib, state, frame, &pkt, ingress, rev.node_slot)?;
                    let hop = forward::lookup(fib, frame, &pkt, (&rev.vip, &pkt.dst), ingress);
                    if hop.rc == FibRc::NotFwded {
                        return Err(Counter::PassLocalReply);
                    }
                    if hop.rc == FibRc::FwdDisabled {
                        return Err(Counter::PassFwdDisabled);
                    }
                    out.count(Counter::ReplyIcmpUnnat);
                    out.from_node(rev.node_slot, frame.len() as u64);
                    if cfg.shadow != 0 {
                        return Err(Counter::ShadowPass);
                    }
                    out.frame = icmp::unnat(frame, &pkt, &q, &rev);
                    return forward::send(t, &pkt, &hop, &forward::TO_KERNEL, 0, out);
                }
                // To a VIP, about the reply of the node that last answered that client flow.
                if let Some(dest) = icmp::reply_dest(t, state, &pkt, &q) {
                    icmp::admit(&cfg, state)?;
                    let hop = forward::lookup_node(
                        fib,
                        state,
                        frame,
                        &pkt,
                        (&pkt.src, &dest.addr),
                        ingress,
                        dest.node_slot,
                    );
                    out.count(Counter::IcmpToNode);
                    out.to_node(dest.node_slot, frame.len() as u64);
                    if cfg.shadow != 0 {
                        return Err(Counter::ShadowPass);
                    }
                    out.frame = icmp::to_node(frame, &pkt, &q, &dest);
                    return forward::send(t, &pkt, &hop, &forward::TO_KERNEL, 0, out);
                }
                if vip::to_vip(t, &pkt) {
                    return Err(Counter::PassIcmpNoNode);
                }
            }
            return Err(vip::not_udp_verdict(t, frame, &pkt));
        }
    };

    let to_vip = vip::to_vip(t, &pkt);
    // To a VIP, a later fragment follows a first that went to one, or nowhere: not to another
    // port, and not into the source checks (below).
    if to_vip && !vip::is_vip_port(t, &pkt, udp.dport) {
        if pkt.frag >= FRAG_LATER && pkt.frag != LATER_TO_VIP {
            return Err(Counter::DropFragUnknown);
        }
        return Err(Counter::DropVipOtherPort);
    }
    if to_vip {
        vip::check_source(t, &pkt)?;
        parse::check_udp_length(frame, &udp, pkt.frag)?;
        if pkt.frag == FRAG_FIRST {
            out.count(Counter::FragFirst);
            *first = Some(First {
                pkt,
                udp,
                routed: false,
                node_id: 0,
            });
        }
        let route = match followed {
            _ if pkt.frag < FRAG_LATER => dtls::classify(frame, &udp, &cfg, out)?,
            Some(r) if pkt.frag == LATER_TO_VIP => {
                dtls::Route::Node(r.node_id, Counter::FragFollowed)
            }
            // A first that went elsewhere, or none.
            _ => return Err(Counter::DropFragUnknown),
        };
        let (node_id, node) = match route {
            dtls::Route::Node(id, routed) => match t.nodes.get(&id) {
                Some(node) => {
                    out.count(routed);
                    (id, *node)
                }
                // The first's node is gone.
                None if pkt.frag == LATER_TO_VIP => return Err(Counter::DropFragUnknown),
                None if cfg.unknown_node_flow != 0 => {
                    out.count(Counter::CidUnknownNodeFlow);
                    flow::route(t, state, &pkt, &udp, out)?
                }
                None => return Err(Counter::DropCidUnknownNode),
            },
            dtls::Route::Flow => {
                // An IP-fragmented ClientHello is not walked for a cookie.
                if pkt.frag == FRAG_NONE && cookie::starts_handshake(frame, &udp) {
                    *hello = cookie::Hello::Client;
                }
                flow::route(t, state, &pkt, &udp, out)?
            }
        };
        if let Some(f) = first.as_mut() {
            f.routed = true;
            f.node_id = node_id;
        }
        if let Some(tun) = tunnel::of_vip(t, &pkt) {
            // GUE over IPv6 derives its checksum from the inner datagram's.
            if tun.encap == lb_common::tunnel::ENCAP_GUE
                && pkt.family == lb_common::FAMILY_V6
                && pkt.frag != FRAG_NONE
            {
                return Err(Counter::DropFragGue6);
            }
            let (src, dst) = tunnel::addressing(&pkt, &node, &tun)?;
            let mut hop =
                forward::lookup_node(fib, state, frame, &pkt, (&src, &dst), ingress, node.slot);
            // The tunnel's path MTU: tunnel.mtu where it is smaller, or the FIB's is unknown.
            if tun.mtu != 0 && (hop.mtu == 0 || tun.mtu < hop.mtu) {
                hop.mtu = tun.mtu;
            }
            out.to_node(node.slot, frame.len() as u64);
            if cfg.shadow != 0 {
                return Err(Counter::ShadowPass);
            }
            // From here on the datapath's next step is the encapsulation, which takes the
            // place of the cookie step, whether the packet is sent or not.
            *hello = cookie::Hello::None;
            let extra = tunnel::overhead(&tun, &pkt);
            let ports = [udp.sport.to_ne_bytes(), udp.dport.to_ne_bytes()];
            let action = match forward::send(t, &pkt, &hop, &forward::TUNNEL, extra, out) {
                Err(Counter::DropTunnelTooBig) => {
                    return too_big::answer(frame, &pkt, state, extra, hop.mtu, out)
                }
                sent => sent?,
            };
            out.frame = tunnel::encap(&out.frame, &pkt, udp.off, ports, &node, &tun);
            out.count(tunnel::counter(&tun));
            return Ok(action);
        }
        let rw = nat::Rewrite::to_node(&pkt, &udp, &node)?;
        let hop = forward::lookup_node(
            fib,
            state,
            frame,
            &pkt,
            (&pkt.src, &rw.dst(&pkt)),
            ingress,
            node.slot,
        );
        out.to_node(node.slot, frame.len() as u64);
        return finish(frame, &pkt, &udp, &rw, &hop, &cfg, t, out);
    }

    if let Some(rev) = vip::reverse(t, &pkt, udp.sport) {
        reply::check_origin(t, fib, state, frame, &pkt, ingress, rev.node_slot)?;
        let rw = nat::Rewrite::to_client(&rev);
        let hop = forward::lookup(fib, frame, &pkt, (&rev.vip, &pkt.dst), ingress);
        if hop.rc == FibRc::NotFwded {
            return Err(Counter::PassLocalReply);
        }
        if hop.rc == FibRc::FwdDisabled {
            return Err(Counter::PassFwdDisabled);
        }
        if pkt.frag == FRAG_NONE && cookie::starts_handshake(frame, &udp) {
            *hello = cookie::Hello::Node;
        }
        out.count(if pkt.frag >= FRAG_LATER {
            Counter::ReplyFragUnnat
        } else {
            Counter::ReplyUnnat
        });
        // A node's first fragment is recorded as soon as it is un-NATed.
        if pkt.frag == FRAG_FIRST {
            out.count(Counter::ReplyFragFirst);
            frag::record(state, &pkt, &udp, lb_common::frag::FRAG_FROM_NODE, 0);
        }
        out.from_node(rev.node_slot, frame.len() as u64);
        // Who answered the client flow, if the reply is too long for the family's smallest
        // path (written only when it changes; the reference keeps the latest either way).
        let min = if pkt.family == lb_common::FAMILY_V4 {
            lb_common::REPLY_DEST_MIN_V4
        } else {
            lb_common::REPLY_DEST_MIN_V6
        };
        if frame.len() - pkt.l3 > min {
            state.reply_dests.insert(
                FlowKey {
                    src: pkt.dst,
                    dst: rev.vip,
                    sport: udp.dport,
                    dport: rev.vip_port,
                    family: pkt.family,
                    _pad: [0; 3],
                },
                lb_common::ReplyDest {
                    addr: pkt.src,
                    port: udp.sport,
                    _pad: 0,
                    node_slot: rev.node_slot,
                },
            );
        }
        return finish(frame, &pkt, &udp, &rw, &hop, &cfg, t, out);
    }

    // A node's fragment that is not a reply's: a first from another port, or a later one
    // whose first was not recorded.
    if pkt.frag != FRAG_NONE && vip::from_node_addr(t, &pkt) {
        return Err(if pkt.frag == FRAG_FIRST {
            Counter::DropNodeFragment
        } else {
            Counter::DropReplyFragUnknown
        });
    }
    Err(Counter::PassNotVip)
}

#[expect(
    clippy::too_many_arguments,
    reason = "mirrors the datapath's finish() plus the reference's inputs"
)]
fn finish(
    frame: &[u8],
    pkt: &parse::Packet,
    udp: &parse::Udp,
    rw: &nat::Rewrite,
    hop: &forward::Hop,
    cfg: &DpConfig,
    t: &Tables,
    out: &mut Outcome,
) -> Result<u32, Counter> {
    if cfg.shadow != 0 {
        return Err(Counter::ShadowPass);
    }
    out.frame = rw.apply(frame, pkt, udp);
    forward::send(t, pkt, hop, &forward::TO_KERNEL, 0, out)
}

/// Per-node traffic the reference expects, by `NODE_STATS` slot.
pub type NodeDeltas = BTreeMap<u32, lb_common::NodeStats>;
