//! RFC 9146 §4: a DTLS 1.2 record of type tls12_cid (25), version FE FD, then epoch (2),
//! sequence number (6), the CID (`cid_length` bytes) and the length (2). The node id is
//! `node_id_length` big-endian bytes at `node_id_offset` in the CID.
//!
//! DTLS 1.3 unified headers (RFC 9147 §4) would be a second branch of [`classify`].

use lb_common::{Counter, DpConfig};

use crate::{parse::Udp, stats::Outcome};

pub enum Route {
    Node(u32),
    Flow,
}

/// How a balanced datagram (length already checked against the frame) picks its node.
pub fn classify(f: &[u8], udp: &Udp, cfg: &DpConfig, out: &mut Outcome) -> Result<Route, Counter> {
    let p = &f[udp.payload_off()..udp.off + udp.len as usize];
    if p.len() < 3 || p[0] != 25 {
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
    let at = 11 + cfg.node_id_offset as usize;
    let id = p[at..at + cfg.node_id_len as usize]
        .iter()
        .fold(0u32, |id, &b| (id << 8) | b as u32);
    Ok(Route::Node(id))
}
