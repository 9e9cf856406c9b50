//! The DTLS record header: where the Connection ID is parsed.
//!
//! RFC 9146 §4, a DTLS 1.2 record with a CID (content type tls12_cid = 25):
//! ```text
//!  off  len
//!   0    1   content_type = 25 (tls12_cid)
//!   1    2   version = {254, 253} (DTLS 1.2, FE FD)
//!   3    2   epoch
//!   5    6   sequence_number
//!  11    N   cid              N = negotiated CID length (config dtls.cid_length)
//! 11+N   2   length
//! 13+N   …   enc_content
//! ```
//! The node id is `node_id_length` bytes (big-endian) at `node_id_offset` inside the cid, as
//! Californium's DTLS_CONNECTION_ID_NODE puts it at offset 0, one byte.

use aya_ebpf::programs::XdpContext;
use lb_common::{Counter, DpConfig};

use crate::{parse::ptr_at, parse::Udp, stats::count};

/// ContentType tls12_cid (RFC 9146 §3).
pub const TLS12_CID: u8 = 25;
/// ProtocolVersion of DTLS 1.2 on the wire.
pub const DTLS12: [u8; 2] = [0xfe, 0xfd];
/// Bytes of the record header before the cid: type, version, epoch, sequence number.
pub const CID_OFFSET: usize = 11;
/// Bytes of the record header besides the cid: the above plus the length field.
pub const HEADER_WITHOUT_CID: usize = CID_OFFSET + 2;

/// How a balanced packet chooses its node.
pub enum Route {
    /// A tls12_cid record: the node id from its CID.
    Node(u32),
    /// Anything else (handshake, alert, non-CID application data, not DTLS): by flow.
    Flow,
}

/// Classifies the UDP payload. A record type 25 with version FE FD that is too short for the
/// configured CID is dropped: no node could decrypt it.
#[inline(always)]
pub fn classify(ctx: &XdpContext, udp: &Udp, cfg: &DpConfig) -> Result<Route, Counter> {
    let payload = udp.payload_off();
    let payload_len = udp.payload_len();
    // Shorter than type + version: not recognisably a tls12_cid record.
    if payload_len < 3 {
        return Ok(Route::Flow);
    }
    let head: *const [u8; 3] = ptr_at(ctx, payload).ok_or(Counter::DropBadUdpLength)?;
    let head = unsafe { *head };
    if head[0] != TLS12_CID {
        return Ok(Route::Flow);
    }
    if head[1] != DTLS12[0] || head[2] != DTLS12[1] {
        count(Counter::CidBadVersion);
        return Ok(Route::Flow);
    }
    if payload_len < HEADER_WITHOUT_CID + cfg.cid_len as usize {
        return Err(Counter::DropCidTruncated);
    }
    let at = payload + CID_OFFSET + cfg.node_id_offset as usize;
    // node_id_len is a load-time constant: the verifier keeps one arm, LLVM emits all four.
    let id = match cfg.node_id_len {
        1 => read::<1>(ctx, at)?,
        2 => read::<2>(ctx, at)?,
        3 => read::<3>(ctx, at)?,
        _ => read::<4>(ctx, at)?,
    };
    Ok(Route::Node(id))
}

/// `N` big-endian bytes at `off` as a u32.
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, off: usize) -> Result<u32, Counter> {
    // The UDP length was checked against the frame, but the verifier needs its own check.
    let p: *const [u8; N] = ptr_at(ctx, off).ok_or(Counter::DropCidTruncated)?;
    let b = unsafe { *p };
    let mut id = 0u32;
    let mut i = 0;
    while i < N {
        id = (id << 8) | b[i] as u32;
        i += 1;
    }
    Ok(id)
}
