//! How a balanced datagram picks its node: the first record of the datagram decides.
//!
//! RFC 9146 §4: a DTLS 1.2 record of type tls12_cid (25), version FE FD, then epoch (2),
//! sequence number (6), the CID (`cid_length` bytes) and the length (2).
//!
//! RFC 9147 §4: a DTLS 1.3 unified header, first byte `001CSLEE` (0x20..=0x3f); with C set the
//! CID (`cid_length` bytes, its length is not on the wire) follows the first byte, then the
//! sequence number (2 bytes with S, else 1) and the length (2 bytes with L, else none).
//!
//! In both, the node id is `node_id_length` big-endian bytes at `node_id_offset` in the CID.
//! Each format routes by CID only when its bit is in `dtls.versions` (`DpConfig::dtls_versions`);
//! otherwise its records go by flow like any other datagram.

use lb_common::{Counter, DpConfig, DTLS_V12, DTLS_V13};

use crate::{parse::Udp, stats::Outcome};

pub enum Route {
    /// The node id from the CID, and the counter a routed record of its format bumps
    /// (`cid_routed` or `cid13_routed`).
    Node(u32, Counter),
    Flow,
}

/// How a balanced datagram (length already checked against the frame) picks its node.
pub fn classify(f: &[u8], udp: &Udp, cfg: &DpConfig, out: &mut Outcome) -> Result<Route, Counter> {
    let p = &f[udp.payload_off()..udp.off + udp.len as usize];
    let Some(&first) = p.first() else {
        return Ok(Route::Flow);
    };
    let (cid_at, routed) = if first == 25 && cfg.dtls_versions & DTLS_V12 != 0 {
        if p.len() < 3 {
            return Ok(Route::Flow);
        }
        if p[1..3] != [0xfe, 0xfd] {
            out.count(Counter::CidBadVersion);
            return Ok(Route::Flow);
        }
        // type, version, epoch, sequence, CID, length.
        if p.len() < 1 + 2 + 2 + 6 + cfg.cid_len as usize + 2 {
            return Err(Counter::DropCidTruncated);
        }
        (11, Counter::CidRouted)
    } else if (0x20..=0x3f).contains(&first)
        && first & 0x10 != 0
        && cfg.dtls_versions & DTLS_V13 != 0
    {
        let seq = if first & 0x08 != 0 { 2 } else { 1 };
        let len = if first & 0x04 != 0 { 2 } else { 0 };
        // first byte, CID, sequence number, length.
        if p.len() < 1 + cfg.cid_len as usize + seq + len {
            return Err(Counter::DropCid13Truncated);
        }
        (1, Counter::Cid13Routed)
    } else {
        return Ok(Route::Flow);
    };
    let at = cid_at + cfg.node_id_offset as usize;
    let id = p[at..at + cfg.node_id_len as usize]
        .iter()
        .fold(0u32, |id, &b| (id << 8) | b as u32);
    Ok(Route::Node(id, routed))
}
