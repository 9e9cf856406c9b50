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
//!
//! RFC 9147 §4, a DTLS 1.3 protected record, the unified header (DTLSCiphertext):
//! ```text
//!  off        len
//!   0          1   0 0 1 C S L E E   fixed bits 001 (0x20..=0x3f); C: CID present;
//!                                    S: 16-bit sequence number (else 8); L: length present;
//!                                    EE: low two bits of the epoch
//!   1          N   cid               only with C; N = dtls.cid_length (not on the wire)
//!  1+N       1|2   sequence number   (encrypted; S)
//!   …        0|2   length            (L)
//! ```
//! So the node id sits at `1 + node_id_offset` where DTLS 1.2's sits at `11 + node_id_offset`.
//!
//! The classifier's semantics, in order (the first record of the datagram decides; records
//! after it are never looked at, as a node handles a whole datagram anyway):
//! 1. empty payload: by flow.
//! 2. first byte 25 (tls12_cid): with DTLS 1.2 in `dtls.versions` as described above
//!    (version not FE FD: `cid_bad_version`, by flow; shorter than 13 + cid_length:
//!    `drop_cid_truncated`; else by node id, `cid_routed`); without it: by flow.
//! 3. first byte 0x20..=0x3f (unified header) with C set and DTLS 1.3 in `dtls.versions`:
//!    UDP payload shorter than 1 + cid_length + (S ? 2 : 1) + (L ? 2 : 0):
//!    `drop_cid13_truncated`; else by node id, `cid13_routed`.
//! 4. everything else (plaintext handshake records of either version, unified headers without
//!    C, unified headers with 1.3 not in `dtls.versions`, not DTLS): by flow.
//!
//! The node id found is then looked up as for either format: an unknown or disabled node
//! follows `dtls.unknown_node` (`drop_cid_unknown_node` / `cid_unknown_node_flow`).
//!
//! RFC 9147 §4.2.3's minimum (record number encryption samples 16 bytes of ciphertext;
//! receivers must reject shorter records) is not applied here: a short record is sent to the
//! node its CID names, which rejects it as it rejects any record that fails deprotection. The
//! balancer only drops what it cannot route.

use aya_ebpf::programs::XdpContext;
use lb_common::{Counter, DpConfig, DTLS_V12, DTLS_V13};

use crate::{parse::ptr_at, parse::Udp, stats::count};

/// ContentType tls12_cid (RFC 9146 §3).
pub const TLS12_CID: u8 = 25;
/// ProtocolVersion of DTLS 1.2 on the wire.
pub const DTLS12: [u8; 2] = [0xfe, 0xfd];
/// Bytes of the record header before the cid: type, version, epoch, sequence number.
pub const CID_OFFSET: usize = 11;
/// Bytes of the record header besides the cid: the above plus the length field.
pub const HEADER_WITHOUT_CID: usize = CID_OFFSET + 2;

/// Unified header: the top three bits of the first byte are `001` (RFC 9147 §4).
pub const UNIFIED_MASK: u8 = 0xe0;
pub const UNIFIED_FIXED: u8 = 0x20;
/// Unified header flags.
pub const UNIFIED_C: u8 = 0x10;
pub const UNIFIED_S: u8 = 0x08;
pub const UNIFIED_L: u8 = 0x04;
/// The cid of a unified header starts right after its first byte.
pub const UNIFIED_CID_OFFSET: usize = 1;

/// Which record format named the node.
pub enum Format {
    /// DTLS 1.2 tls12_cid record (RFC 9146).
    Tls12Cid,
    /// DTLS 1.3 unified header with C set (RFC 9147).
    Unified,
}

impl Format {
    /// The counter of a record of this format routed by its CID.
    #[inline(always)]
    pub fn routed(&self) -> Counter {
        match self {
            Format::Tls12Cid => Counter::CidRouted,
            Format::Unified => Counter::Cid13Routed,
        }
    }
}

/// How a balanced packet chooses its node.
pub enum Route {
    /// A CID record: the node id from its CID.
    Node(u32, Format),
    /// Anything else (handshake, alert, non-CID application data, not DTLS): by flow.
    Flow,
}

/// Classifies the UDP payload (see the module doc for the rules). A CID record too short for
/// its header is dropped: no node could decrypt it.
#[inline(always)]
pub fn classify(ctx: &XdpContext, udp: &Udp, cfg: &DpConfig) -> Result<Route, Counter> {
    let payload = udp.payload_off();
    let payload_len = udp.payload_len();
    if payload_len < 1 {
        return Ok(Route::Flow);
    }
    let first: *const u8 = ptr_at(ctx, payload).ok_or(Counter::DropBadUdpLength)?;
    // SAFETY: ptr_at checked that the byte lies inside the packet.
    let first = unsafe { *first };
    if first == TLS12_CID && cfg.dtls_versions & DTLS_V12 != 0 {
        return classify12(ctx, payload, payload_len, cfg);
    }
    if first & (UNIFIED_MASK | UNIFIED_C) == UNIFIED_FIXED | UNIFIED_C
        && cfg.dtls_versions & DTLS_V13 != 0
    {
        let seq = if first & UNIFIED_S != 0 { 2 } else { 1 };
        let len = if first & UNIFIED_L != 0 { 2 } else { 0 };
        if payload_len < UNIFIED_CID_OFFSET + cfg.cid_len as usize + seq + len {
            return Err(Counter::DropCid13Truncated);
        }
        let id = node_id(
            ctx,
            payload + UNIFIED_CID_OFFSET,
            cfg,
            Counter::DropCid13Truncated,
        )?;
        return Ok(Route::Node(id, Format::Unified));
    }
    Ok(Route::Flow)
}

/// A record whose first byte is tls12_cid.
#[inline(always)]
fn classify12(
    ctx: &XdpContext,
    payload: usize,
    payload_len: usize,
    cfg: &DpConfig,
) -> Result<Route, Counter> {
    // Shorter than type + version: not recognisably a tls12_cid record.
    if payload_len < 3 {
        return Ok(Route::Flow);
    }
    let head: *const [u8; 3] = ptr_at(ctx, payload).ok_or(Counter::DropBadUdpLength)?;
    // SAFETY: ptr_at checked that the three bytes lie inside the packet.
    let head = unsafe { *head };
    if head[1] != DTLS12[0] || head[2] != DTLS12[1] {
        count(Counter::CidBadVersion);
        return Ok(Route::Flow);
    }
    if payload_len < HEADER_WITHOUT_CID + cfg.cid_len as usize {
        return Err(Counter::DropCidTruncated);
    }
    let id = node_id(ctx, payload + CID_OFFSET, cfg, Counter::DropCidTruncated)?;
    Ok(Route::Node(id, Format::Tls12Cid))
}

/// The node id inside the cid that starts at packet offset `cid`.
#[inline(always)]
fn node_id(ctx: &XdpContext, cid: usize, cfg: &DpConfig, short: Counter) -> Result<u32, Counter> {
    let at = cid + cfg.node_id_offset as usize;
    // node_id_len is a load-time constant: the verifier keeps one arm, LLVM emits all four.
    match cfg.node_id_len {
        1 => read::<1>(ctx, at, short),
        2 => read::<2>(ctx, at, short),
        3 => read::<3>(ctx, at, short),
        _ => read::<4>(ctx, at, short),
    }
}

/// `N` big-endian bytes at `off` as a u32.
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, off: usize, short: Counter) -> Result<u32, Counter> {
    // The UDP length was checked against the frame, but the verifier needs its own check.
    let p: *const [u8; N] = ptr_at(ctx, off).ok_or(short)?;
    // SAFETY: ptr_at checked that the N bytes lie inside the packet.
    let b = unsafe { *p };
    let mut id = 0u32;
    let mut i = 0;
    while i < N {
        id = (id << 8) | b[i] as u32;
        i += 1;
    }
    Ok(id)
}
