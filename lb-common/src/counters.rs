//! What happened to a packet: one per-CPU counter per outcome, indexed by [`Counter`].
//!
//! The datapath increments these; the agent sums them over CPUs and prints them under the names
//! below (Prometheus labels, `cidlb stats`, docs/security.md). Several counters can describe one packet:
//! `packets_seen` counts everything, a routing counter says how the node was chosen, and a
//! forwarding counter says how it left.

/// `name` starts with `drop_` (a `const fn`, so [`Counter::drops`] is decided at compile time).
const fn is_drop_name(name: &str) -> bool {
    let (n, p) = (name.as_bytes(), b"drop_");
    if n.len() < p.len() {
        return false;
    }
    let mut i = 0;
    while i < p.len() {
        if n[i] != p[i] {
            return false;
        }
        i += 1;
    }
    true
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// Index into the `STATS` per-CPU array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];
            /// Number of counters (at most `STATS_SLOTS`, the `STATS` map size).
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable name, used in CLI output, metrics and docs.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)+ }
            }

            /// Does a packet whose processing ends with this counter get dropped? Its name says
            /// it: `drop_*` drops, every other counter that ends a packet passes it to the
            /// kernel. Each arm is a constant evaluated at compile time, so the datapath gets a
            /// bit test, and a new `drop_*` counter cannot be forgotten in a hand-kept list.
            pub const fn drops(self) -> bool {
                match self { $(Counter::$variant => { const D: bool = is_drop_name($name); D })+ }
            }

            /// One-line description of what the counter means.
            pub const fn help(self) -> &'static str {
                match self { $(Counter::$variant => concat!($($doc),+),)+ }
            }
        }
    };
}

counters! {
    /// Every packet the program saw.
    PacketsSeen = "packets_seen",
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed to the kernel untouched.
    PassNotIp = "pass_not_ip",
    /// Ethernet/VLAN/IP header cut short: passed to the kernel, which drops it.
    PassTruncated = "pass_truncated",
    /// IP but not UDP: passed to the kernel untouched.
    PassNotUdp = "pass_not_udp",
    /// UDP neither to a VIP port nor from a node: passed to the kernel untouched.
    PassNotVip = "pass_not_vip",
    /// IPv6 with extension headers (other than a fragment header to a VIP), not from a node: passed to the kernel.
    PassIpv6ExtHdr = "pass_ipv6_ext_hdr",
    /// IPv4 header length below 5 words: dropped.
    DropBadIpHeader = "drop_bad_ip_header",
    /// An IPv6 first fragment to a VIP whose Fragment header is followed by anything but UDP (an extension header, ICMPv6, ...): dropped.
    DropFragment = "drop_fragment",
    /// UDP length field below 8 or past the end of the packet (to a VIP): dropped.
    DropBadUdpLength = "drop_bad_udp_length",
    /// tls12_cid record routed by the node id in its CID.
    CidRouted = "cid_routed",
    /// tls12_cid record (type 25, version FE FD) too short to hold the CID: dropped.
    DropCidTruncated = "drop_cid_truncated",
    /// CID names a node that is not configured (unknown_node: drop): dropped.
    DropCidUnknownNode = "drop_cid_unknown_node",
    /// CID names a node that is not configured (unknown_node: flow): routed by flow instead.
    CidUnknownNodeFlow = "cid_unknown_node_flow",
    /// CID names a node without an address of the packet's family: dropped.
    DropCidNodeFamily = "drop_cid_node_family",
    /// Record type 25 with a version other than DTLS 1.2 (FE FD): routed by flow.
    CidBadVersion = "cid_bad_version",
    /// Packet of a known flow sent to the flow's node.
    FlowHit = "flow_hit",
    /// New flow pinned to a node by round robin.
    FlowNew = "flow_new",
    /// Flow idle past idle_timeout (within refresh_ns after it; or its node gone): re-pinned, also counted in flow_new.
    FlowExpired = "flow_expired",
    /// Flow table update failed: packet forwarded, flow not remembered.
    FlowInsertFailed = "flow_insert_failed",
    /// No active node of the packet's address family: dropped.
    DropNoNode = "drop_no_node",
    /// Reply from a node: source rewritten to the VIP (stateless reverse NAT).
    ReplyUnnat = "reply_unnat",
    /// Genuine reply from a node's serving port to this host itself (health probe answers): passed unchanged.
    PassLocalReply = "pass_local_reply",
    /// Shadow mode: routed and counted, then passed to the kernel unchanged.
    ShadowPass = "shadow_pass",
    /// TTL / hop limit would expire: passed rewritten to the kernel, which answers with ICMP.
    FwdKernelTtl = "fwd_kernel_ttl",
    /// Forwarded out of the interface it came in on (XDP_TX).
    FwdTx = "fwd_tx",
    /// Forwarded to another attached interface (DEVMAP redirect).
    FwdRedirect = "fwd_redirect",
    /// No neighbour entry for the next hop yet: passed rewritten to the kernel to resolve it.
    FwdKernelNoNeigh = "fwd_kernel_no_neigh",
    /// FIB lookup did not give a direct next hop: passed rewritten to the kernel.
    FwdKernelFib = "fwd_kernel_fib",
    /// Next hop is on an interface cidlb is not attached to: passed rewritten to the kernel.
    FwdKernelIface = "fwd_kernel_iface",
    /// VLAN-tagged packet: rewritten and passed to the kernel, which routes it via its VLAN devices.
    FwdKernelVlan = "fwd_kernel_vlan",
    /// From a node's serving address and port, but not the way the balancer reaches that node (other ingress interface, or a source MAC that is not the node's next hop): dropped, not un-NATed (no open relay).
    DropForgedReply = "drop_forged_reply",
    /// From a node's serving address and port while the balancer has no neighbour entry for the node, so its MAC cannot be checked: dropped (fail closed).
    DropReplyNoNeigh = "drop_reply_no_neigh",
    /// From a node's serving address and port, arriving on an interface with forwarding disabled: passed to the kernel untouched (delivered if local, else dropped).
    PassFwdDisabled = "pass_fwd_disabled",
    /// Larger than the path MTU towards its next hop: passed rewritten to the kernel, which fragments it or answers ICMP.
    FwdKernelMtu = "fwd_kernel_mtu",
    /// From a node's address: a first fragment not from a serving port (`REVERSE`), an IPv6 first fragment whose Fragment header is not followed by UDP, or IPv6 with other extension headers: dropped (it cannot be un-NATed, and would leak the node's address).
    DropNodeFragment = "drop_node_fragment",
    /// New flow over its source's limit (`limits.new_flows_per_source`, per IPv4 address or IPv6 /64): dropped, not in the flow table.
    DropLimitSource = "drop_limit_source",
    /// New flow over the global limit (`limits.new_flows`): dropped, not in the flow table.
    DropLimitGlobal = "drop_limit_global",
    /// New flow from a known source (one that recently echoed a node's cookie) admitted from the reserve other sources cannot take (`limits.known_reserve`).
    LimitKnownReserve = "limit_known_reserve",
    /// New flow from a `limits.exempt` prefix: no per-source limit (the global one still applies).
    LimitExempt = "limit_exempt",
    /// DTLS 1.3 unified-header record with a CID (first byte 0b001CSLEE, C set) routed by the node id in its CID (the 1.3 twin of cid_routed).
    Cid13Routed = "cid13_routed",
    /// DTLS 1.3 unified-header record with C set, shorter than 1 + cid_length + sequence number (1 or 2) + length field (0 or 2): dropped (the 1.3 twin of drop_cid_truncated).
    DropCid13Truncated = "drop_cid13_truncated",
    /// UDP to a VIP address on a port no VIP balances: dropped (the kernel would route it back to the upstream router, a loop).
    DropVipOtherPort = "drop_vip_other_port",
    /// To a VIP address but not UDP (TCP, ICMP echo and every ICMP that is not an error or IPv6 neighbour discovery, other protocols), or UDP behind IPv6 extension headers: dropped (the kernel would route it back to the upstream router, a loop).
    DropVipOtherProto = "drop_vip_other_proto",
    /// A datagram whose first record is a CID record, but which holds a record that is not a CID record naming the same node, more records than the datapath walks (8), or a record running past its end: routed by flow (with the new-flow limits), not by CID.
    CidMixedDatagram = "cid_mixed_datagram",
    /// To a VIP port from a VIP address (spoofed: the node's reply would be un-NATed to the VIP and loop): dropped.
    DropSrcVip = "drop_src_vip",
    /// To a VIP port from a node's address (spoofed, or a node using the VIP: one node would answer another through the balancer): dropped.
    DropSrcNode = "drop_src_node",
    /// To a VIP port from one of the balancer's own addresses (spoofed; `LOCAL_ADDRS`, kept current by the agent): dropped.
    DropSrcLocal = "drop_src_local",
    /// A node's HelloVerifyRequest (DTLS 1.2) or HelloRetryRequest (DTLS 1.3) on its way to a client: its cookie recorded in `COOKIES` (with `limits.new_flows` on).
    CookieLearned = "cookie_learned",
    /// A ClientHello that echoed a cookie recorded for its address and port: its source (IPv4 address, IPv6 /64) is known for `limits.known_for`.
    KnownSrcProven = "known_src_proven",
    /// A ClientHello whose cookie matches none recorded for its address and port (forged, from another address or port, learned by another balancer, or evicted): its source is not made known.
    CookieUnproven = "cookie_unproven",
    /// To a node of a tunnel VIP (`forwarding: tunnel`), encapsulated IP in IP (RFC 2003 / RFC 2473).
    TunnelEncapIpip = "tunnel_encap_ipip",
    /// To a node of a tunnel VIP, encapsulated in UDP (GUE variant 1).
    TunnelEncapGue = "tunnel_encap_gue",
    /// To a node of a tunnel VIP without a neighbour entry for its next hop: dropped (the kernel cannot take the packet in place: unencapsulated it would route it back to the VIP, encapsulated it would see its own source). The agent's health probes keep nodes' neighbours resolved.
    DropTunnelNoNeigh = "drop_tunnel_no_neigh",
    /// To a node of a tunnel VIP with no direct next hop on an attached interface (no route, blackhole, unreachable, another interface): dropped.
    DropTunnelFib = "drop_tunnel_fib",
    /// To a tunnel VIP, VLAN-tagged: dropped (the datapath encapsulates untagged frames only).
    DropTunnelVlan = "drop_tunnel_vlan",
    /// To a node of a tunnel VIP, larger than the tunnel's path MTU once encapsulated, and no answer can help: IPv4 without DF (the balancer does not fragment, and the sender does no path MTU discovery), or a path MTU below the encapsulation plus 68 (IPv4) / 1280 (IPv6) bytes: dropped unanswered.
    DropTunnelTooBig = "drop_tunnel_too_big",
    /// ICMP error from a node about a client's datagram to a VIP (port unreachable, ...): outer source and quoted destination rewritten to the VIP and its port, checksums fixed (NAT mode).
    ReplyIcmpUnnat = "reply_icmp_unnat",
    /// ICMP error to a VIP about a node's reply (fragmentation needed, packet too big, unreachable, ...): sent on to the node that answered the flow last (`REPLY_DESTS`), outer destination and quoted source rewritten to the node's address and port (NAT mode).
    IcmpToNode = "icmp_to_node",
    /// ICMP error to a VIP about a reply no recent answer of a node's explains (a tunnel VIP's, or one forgotten): passed to the kernel as before.
    PassIcmpNoNode = "pass_icmp_no_node",
    /// ICMP error for a node over `icmp.rate` on this CPU: dropped.
    DropIcmpRatelimited = "drop_icmp_ratelimited",
    /// To a node of a tunnel VIP, larger than the tunnel's path MTU once encapsulated (IPv4 with DF, or IPv6): answered with ICMP fragmentation needed / packet too big from the VIP, carrying the MTU that fits (XDP_TX); the packet is not forwarded.
    IcmpTooBigSent = "icmp_too_big_sent",
    /// As icmp_too_big_sent, but over the answers' rate limit (200 a second per CPU, bursts of 20): dropped unanswered.
    DropIcmpTooBigLimited = "drop_icmp_too_big_limited",
    /// First fragment of a datagram to a VIP port (IPv4 MF with offset 0, or an IPv6 Fragment header with offset 0): balanced by its content like any datagram; unless it is dropped, its node is recorded in `FRAGS` for the later fragments.
    FragFirst = "frag_first",
    /// Later fragment (offset not zero) to a VIP: sent to its first fragment's node (`FRAGS`), rewritten or encapsulated alike.
    FragFollowed = "frag_followed",
    /// Later fragment to a VIP with no first fragment recorded (it came first, its first was dropped, or its entry was evicted): dropped.
    DropFragUnknown = "drop_frag_unknown",
    /// First fragment of a node's reply: un-NATed (also counted in reply_unnat) and recorded in `FRAGS` for the later fragments.
    ReplyFragFirst = "reply_frag_first",
    /// Later fragment of a node's reply: origin-checked, source rewritten to the VIP its first fragment's entry names.
    ReplyFragUnnat = "reply_frag_unnat",
    /// Later fragment from a node's address with no first fragment recorded (it came first, its first was dropped or not from a serving port, or its entry was evicted): dropped.
    DropReplyFragUnknown = "drop_reply_frag_unknown",
    /// Fragment to a tunnel VIP encapsulated in GUE over IPv6: dropped (the outer UDP checksum, which IPv6 requires, is derived from the inner datagram's, which a fragment does not carry whole).
    DropFragGue6 = "drop_frag_gue6",
    /// Counted by the agent, not the datapath: an ICMP error to a VIP about one of its ports' replies that no node could be matched to (`pass_icmp_no_node`, a tunnel VIP's, a VLAN-tagged one), seen on an attached interface on its way to the kernel: the agent sent a copy to every node of the VIP (rewritten for a NAT VIP, encapsulated for a tunnel VIP). Counted once per error.
    IcmpFanout = "icmp_fanout",
    /// Counted by the agent: an error as icmp_fanout, over `icmp.rate` a second, or about the same flow (VIP port, client address and port) with the same type and code as one sent on in the last second: not sent on.
    IcmpFanoutLimited = "icmp_fanout_limited",
}

impl Counter {
    /// A refusal at the edge (traffic to a VIP that cannot be balanced, or from a source that
    /// cannot be real): in shadow mode the packet is counted under this counter and
    /// `shadow_pass`, and passed, as shadow mode passes everything it would forward.
    pub const fn shadow_passes(self) -> bool {
        matches!(
            self,
            Counter::DropVipOtherPort
                | Counter::DropVipOtherProto
                | Counter::DropSrcVip
                | Counter::DropSrcNode
                | Counter::DropSrcLocal
        )
    }
}

// Appending a counter must not change the pinned STATS map's size (the layout version).
const _: () = assert!(Counter::COUNT <= crate::maps::STATS_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counters_drop_and_no_other() {
        assert!(Counter::DropCid13Truncated.drops() && Counter::DropForgedReply.drops());
        for c in Counter::ALL {
            assert_eq!(c.drops(), c.name().starts_with("drop_"), "{}", c.name());
        }
        assert!(!Counter::PassLocalReply.drops() && !Counter::FwdKernelMtu.drops());
    }

    #[test]
    fn names_are_unique_and_indices_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert!(!c.help().is_empty());
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), d.name());
            }
        }
    }
}
