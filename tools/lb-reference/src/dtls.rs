//! How a balanced datagram picks its node: by CID when its first record is a CID record and
//! every record of the datagram (at most eight) is a CID record naming the same node; a
//! datagram that starts with a CID record and fails that goes by flow (`cid_mixed_datagram`).
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

/// Records the datapath walks at most in one datagram.
pub const MAX_RECORDS: usize = 8;

/// One record at the start of `p` (the rest of the payload).
enum Record {
    /// A CID record of a routed format: node id, counter when routed, size in bytes.
    Cid(u32, Counter, usize),
    /// Too short for its CID header: the drop counter of a first record.
    Short(Counter),
    BadVersion,
    Other,
}

/// The record at the start of `p`, the bytes of the frame from there (of a first fragment:
/// fewer than the datagram has), with `rem` bytes of the UDP payload left from there. A field
/// the frame does not hold ends the record as too short, with the counter the datapath's
/// failed read gives.
fn record(p: &[u8], rem: usize, cfg: &DpConfig) -> Record {
    let Some(&first) = p.first() else {
        return Record::Other;
    };
    let cid_len = cfg.cid_len as usize;
    // The node id is read as at least two bytes (the datapath's bounds check).
    let id_read = (cfg.node_id_len as usize).max(2);
    let (cid_at, routed, size) = if first == 25 && cfg.dtls_versions & DTLS_V12 != 0 {
        if rem < 3 {
            return Record::Other;
        }
        if p.len() < 3 {
            return Record::Short(Counter::DropBadUdpLength);
        }
        if p[1..3] != [0xfe, 0xfd] {
            return Record::BadVersion;
        }
        // type, version, epoch, sequence, CID, length.
        let header = 1 + 2 + 2 + 6 + cid_len + 2;
        if rem < header {
            return Record::Short(Counter::DropCidTruncated);
        }
        let id_end = 11 + cfg.node_id_offset as usize + id_read;
        if p.len() < id_end.max(header) {
            return Record::Short(Counter::DropCidTruncated);
        }
        let len = u16::from_be_bytes([p[header - 2], p[header - 1]]) as usize;
        (11, Counter::CidRouted, header + len)
    } else if (0x20..=0x3f).contains(&first)
        && first & 0x10 != 0
        && cfg.dtls_versions & DTLS_V13 != 0
    {
        let seq = if first & 0x08 != 0 { 2 } else { 1 };
        let with_len = first & 0x04 != 0;
        // first byte, CID, sequence number, length.
        let header = 1 + cid_len + seq;
        if rem < header + if with_len { 2 } else { 0 } {
            return Record::Short(Counter::DropCid13Truncated);
        }
        if p.len() < 1 + cfg.node_id_offset as usize + id_read {
            return Record::Short(Counter::DropCid13Truncated);
        }
        // Without a length field the record runs to the datagram's end.
        let size = if with_len {
            if p.len() < header + 2 {
                return Record::Short(Counter::DropCid13Truncated);
            }
            header + 2 + u16::from_be_bytes([p[header], p[header + 1]]) as usize
        } else {
            rem
        };
        (1, Counter::Cid13Routed, size)
    } else {
        return Record::Other;
    };
    let at = cid_at + cfg.node_id_offset as usize;
    let id = p[at..at + cfg.node_id_len as usize]
        .iter()
        .fold(0u32, |id, &b| (id << 8) | b as u32);
    Record::Cid(id, routed, size)
}

/// How a balanced datagram (length already checked against the frame) picks its node. Of a
/// first fragment, only the bytes the frame holds are read: the UDP length is the datagram's.
pub fn classify(f: &[u8], udp: &Udp, cfg: &DpConfig, out: &mut Outcome) -> Result<Route, Counter> {
    let len = (udp.len as usize).saturating_sub(8);
    if len == 0 {
        return Ok(Route::Flow);
    }
    let start = udp.payload_off().min(f.len());
    let p = &f[start..f.len().min(udp.payload_off() + len)];
    if p.is_empty() {
        return Err(Counter::DropBadUdpLength);
    }
    let (id, routed, mut off) = match record(p, len, cfg) {
        Record::Cid(id, routed, size) => (id, routed, size),
        Record::Short(c) => return Err(c),
        Record::BadVersion => {
            out.count(Counter::CidBadVersion);
            return Ok(Route::Flow);
        }
        Record::Other => return Ok(Route::Flow),
    };
    let mut records = 1;
    // Each further record's first three bytes must be in the frame.
    while off < len && records < MAX_RECORDS && off + 3 <= p.len() {
        match record(&p[off..], len - off, cfg) {
            Record::Cid(next, _, size) if next == id => off += size,
            _ => break,
        }
        records += 1;
    }
    if off == len {
        Ok(Route::Node(id, routed))
    } else {
        out.count(Counter::CidMixedDatagram);
        Ok(Route::Flow)
    }
}
