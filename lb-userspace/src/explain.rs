//! `cidlb explain`: one packet through the datapath program (BPF_PROG_TEST_RUN) and what it did.
//!
//! The program runs as a private copy loaded with the same object and config, with maps of its
//! own, so explaining never touches the live flow table or counters. Its flow table starts
//! empty: a packet that would hit an existing flow is shown as a new flow.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{bail, Context as _};
use aya::maps::Map;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{names, xdp, Counter};

use crate::{config::Config, datapath, datapath::Datapath, stats::Snapshot};

/// Entries of the private flow table a packet is explained with.
pub const EXPLAIN_FLOWS: u32 = 16;

/// Builds an Ethernet/IP/UDP frame from addresses and a payload.
pub fn frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut out = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => eth
            .ipv4(s.ip().octets(), d.ip().octets(), 64)
            .udp(s.port(), d.port())
            .write(&mut out, payload)?,
        (SocketAddr::V6(s), SocketAddr::V6(d)) => eth
            .ipv6(s.ip().octets(), d.ip().octets(), 64)
            .udp(s.port(), d.port())
            .write(&mut out, payload)?,
        _ => bail!("--src and --dst must be the same address family"),
    }
    Ok(out)
}

/// Hex digits (whitespace and `:` between them allowed) to bytes; anything else is an error
/// naming the character, never a panic.
pub fn parse_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut digits = Vec::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c.to_digit(16) {
            Some(d) => digits.push(d as u8),
            None if c.is_whitespace() || c == ':' => {}
            None => bail!("not hex: {c:?} at character {}", i + 1),
        }
    }
    if !digits.len().is_multiple_of(2) {
        bail!("hex input has an odd number of digits");
    }
    Ok(digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect())
}

/// Which DTLS record header the first record of a UDP payload has, and how the configured
/// `dtls.versions` treats it. The datapath (lb-ebpf/src/dtls.rs) decides; this names the
/// format it looked at, for `explain` (the counters show what it then did).
pub fn record_format(cfg: &Config, payload: &[u8]) -> String {
    use crate::config::DtlsVersion;
    let routed = |v: DtlsVersion| cfg.dtls.versions().contains(&v);
    let Some(&b) = payload.first() else {
        return "empty UDP payload: by flow".into();
    };
    match b {
        25 if routed(DtlsVersion::V12) => {
            "DTLS 1.2 tls12_cid record (RFC 9146): node id at payload offset 11 + node_id_offset"
                .into()
        }
        25 => {
            "DTLS 1.2 tls12_cid record (RFC 9146), but dtls.versions leaves out 1.2: by flow".into()
        }
        0x20..=0x3f => {
            let bit = |m: u8| u8::from(b & m != 0);
            let head = format!(
                "DTLS 1.3 unified header (RFC 9147) {b:#04x}: C={} S={} L={} epoch bits {}",
                bit(0x10),
                bit(0x08),
                bit(0x04),
                b & 3
            );
            if b & 0x10 == 0 {
                format!("{head}; no CID: by flow")
            } else if routed(DtlsVersion::V13) {
                format!("{head}; node id at payload offset 1 + node_id_offset")
            } else {
                format!("{head}; dtls.versions leaves out 1.3: by flow")
            }
        }
        22 => "DTLS handshake record (plaintext, e.g. a ClientHello): by flow".into(),
        20 | 21 | 23 => format!("DTLS record type {b} without a CID: by flow"),
        _ => format!("not a DTLS record header (first byte {b:#04x}): by flow"),
    }
}

fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    match SlicedPacket::from_ethernet(frame).ok()?.transport? {
        TransportSlice::Udp(u) => Some(u.payload()),
        _ => None,
    }
}

fn describe(frame: &[u8], gue: bool) -> String {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return format!("{} bytes, not parsable as Ethernet/IP", frame.len());
    };
    let mut s = String::new();
    if let Some(etherparse::LinkSlice::Ethernet2(e)) = &p.link {
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let _ = write!(s, "eth {} -> {}  ", mac(e.source()), mac(e.destination()));
    }
    describe_ip(&mut s, &p, gue);
    s
}

/// The IP header, UDP ports and checksum; an encapsulated packet (IP in IP, or with `gue`, the
/// datapath having encapsulated it so, UDP whose payload is an IP packet) and then its inner
/// packet.
fn describe_ip(s: &mut String, p: &SlicedPacket<'_>, gue: bool) {
    let udp = match &p.transport {
        Some(TransportSlice::Udp(u)) => Some(u),
        _ => None,
    };
    let (sp, dp, c) = udp
        .map(|u| (u.source_port(), u.destination_port(), u.checksum()))
        .unwrap_or_default();
    let inner: Option<&[u8]> = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            if h.protocol() == etherparse::IpNumber::IPV4 {
                let _ = write!(
                    s,
                    "{} -> {}  ttl {}  ipip",
                    h.source_addr(),
                    h.destination_addr(),
                    h.ttl()
                );
                Some(ip.payload().payload)
            } else {
                let _ = write!(
                    s,
                    "{}:{sp} -> {}:{dp}  ttl {}  udp checksum {c:#06x}",
                    h.source_addr(),
                    h.destination_addr(),
                    h.ttl()
                );
                None
            }
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            if h.next_header() == etherparse::IpNumber::IPV6 {
                let _ = write!(
                    s,
                    "[{}] -> [{}]  hop limit {}  ipip",
                    h.source_addr(),
                    h.destination_addr(),
                    h.hop_limit()
                );
                Some(ip.payload().payload)
            } else {
                let _ = write!(
                    s,
                    "[{}]:{sp} -> [{}]:{dp}  hop limit {}  udp checksum {c:#06x}",
                    h.source_addr(),
                    h.destination_addr(),
                    h.hop_limit()
                );
                None
            }
        }
        _ => {
            s.push_str("not IP");
            None
        }
    };
    // GUE variant 1: the UDP payload starts with an IPv4 or IPv6 header.
    let inner = inner.or_else(|| {
        let pl = udp.filter(|_| gue)?.payload();
        s.push_str("  gue");
        Some(pl)
    });
    if let Some(Ok(q)) = inner.map(SlicedPacket::from_ip) {
        s.push_str("\n          inner: ");
        describe_ip(s, &q, false);
    }
}

/// Runs `frame` as if received on `ingress` and returns a report.
pub fn explain(cfg: &Config, frame: &[u8], ingress: &str) -> anyhow::Result<String> {
    datapath::require_root("cidlb explain")?;
    let ifindex = datapath::resolve_interfaces(&[ingress.to_owned()])?[0];
    // One packet needs a tiny flow table, not the configured one the kernel would preallocate
    // (up to 1.9 GiB at the largest `flows.capacity`).
    let mut cfg = cfg.clone();
    cfg.flows.capacity = EXPLAIN_FLOWS;
    let cfg = &cfg;
    let dp = Datapath::private(cfg)?;
    let flow_entries = match dp.ebpf.map(names::FLOWS) {
        Some(Map::LruHashMap(m)) => m.info().ok().map(|i| i.max_entries()),
        _ => None,
    };
    let r = dp
        .run_packet(frame, ifindex, 1)
        .context("BPF_PROG_TEST_RUN")?;
    let out = r.output;
    let snap = Snapshot::from_ebpf(&dp.ebpf)?;
    let what = match r.action {
        xdp::XDP_DROP => " (dropped)",
        xdp::XDP_PASS => " (to the kernel)",
        xdp::XDP_TX => " (out of the interface it came in on)",
        xdp::XDP_REDIRECT => " (out of another attached interface)",
        _ => "",
    };
    let action = format!("{}{what}", xdp::name(r.action).unwrap_or("unknown"));
    let mut s = String::new();
    let _ = writeln!(s, "action:   {action}");
    let fired: Vec<&str> = snap
        .counters
        .iter()
        .filter(|(c, v)| *v > 0 && *c != Counter::PacketsSeen)
        .map(|(c, _)| c.name())
        .collect();
    let _ = writeln!(s, "counters: {}", fired.join(", "));
    if let Some(p) = udp_payload(frame) {
        let _ = writeln!(s, "format:   {}", record_format(cfg, p));
    }
    if fired.contains(&Counter::CidMixedDatagram.name()) {
        let _ = writeln!(
            s,
            "records:  not every record is a CID record naming that node (or more than 8, or one runs past the end): by flow"
        );
    }
    for c in [
        Counter::DropSrcVip,
        Counter::DropSrcNode,
        Counter::DropSrcLocal,
    ] {
        if fired.contains(&c.name()) {
            let _ = writeln!(s, "source:   {}", c.help().trim());
        }
    }
    for (id, n) in &snap.nodes {
        if n.to_node_packets > 0 {
            let _ = writeln!(s, "node:     {id} (sent to it)");
        }
        if n.from_node_packets > 0 {
            let _ = writeln!(s, "node:     {id} (its reply, un-NATed)");
        }
    }
    if let Some(n) = flow_entries {
        let _ = writeln!(
            s,
            "flows:    a private, empty table of {n} entries (the live one is not touched)"
        );
    }
    let _ = writeln!(s, "before:   {}", describe(frame, false));
    if out != frame {
        let gue = fired.contains(&Counter::TunnelEncapGue.name());
        let _ = writeln!(s, "after:    {}", describe(&out, gue));
    } else {
        let _ = writeln!(s, "after:    unchanged");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_formats_named() {
        let parse = |extra: &str| {
            Config::parse(
                &format!("interfaces: [e]\nvips: [{{address: 192.0.2.1, ports: [1]}}]\nnodes: [{{id: 1, address: 10.0.0.1}}]\n{extra}"),
                std::path::Path::new("t.yaml"),
            )
            .unwrap()
        };
        let both = parse("");
        let only12 = parse("dtls: {versions: [1.2]}\n");
        let f = |c: &Config, p: &[u8]| record_format(c, p);
        assert!(f(&both, &[0x3f, 1]).starts_with(
            "DTLS 1.3 unified header (RFC 9147) 0x3f: C=1 S=1 L=1 epoch bits 3; node id at"
        ));
        assert!(f(&both, &[0x2c]).contains("C=0 S=1 L=1 epoch bits 0; no CID: by flow"));
        assert!(f(&only12, &[0x3f]).ends_with("dtls.versions leaves out 1.3: by flow"));
        assert!(f(&both, &[25, 0xfe, 0xfd]).starts_with("DTLS 1.2 tls12_cid record"));
        assert!(f(&only12, &[25]).ends_with("node_id_offset"));
        assert!(f(&both, &[22]).starts_with("DTLS handshake record"));
        assert!(f(&both, &[0x40]).contains("not a DTLS record header (first byte 0x40)"));
        assert_eq!(f(&both, &[]), "empty UDP payload: by flow");
    }

    #[test]
    fn hex_input_errors_instead_of_panicking() {
        assert_eq!(parse_hex("19 fe:FD").unwrap(), [0x19, 0xfe, 0xfd]);
        // "aéa": 'é' is two bytes in UTF-8; slicing by byte pairs panicked on it.
        let e = parse_hex("aéa").unwrap_err().to_string();
        assert!(e.contains("not hex: 'é' at character 2"), "{e}");
        assert!(parse_hex("abc")
            .unwrap_err()
            .to_string()
            .contains("odd number"));
        assert!(parse_hex("zz")
            .unwrap_err()
            .to_string()
            .contains("not hex: 'z'"));
    }
}
