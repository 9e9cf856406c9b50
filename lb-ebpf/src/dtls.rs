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
//! The classifier's semantics, in order:
//! 1. empty payload: by flow.
//! 2. first byte 25 (tls12_cid): with DTLS 1.2 in `dtls.versions` as described above
//!    (version not FE FD: `cid_bad_version`, by flow; shorter than 13 + cid_length:
//!    `drop_cid_truncated`; else a CID record of 13 + cid_length + length bytes); without it:
//!    by flow.
//! 3. first byte 0x20..=0x3f (unified header) with C set and DTLS 1.3 in `dtls.versions`:
//!    UDP payload shorter than 1 + cid_length + (S ? 2 : 1) + (L ? 2 : 0):
//!    `drop_cid13_truncated`; else a CID record (with L: its header plus length bytes; without
//!    L: the rest of the datagram).
//! 4. everything else (plaintext handshake records of either version, unified headers without
//!    C, unified headers with 1.3 not in `dtls.versions`, not DTLS): by flow.
//! 5. A first CID record routes by its node id only if the whole datagram is CID records
//!    naming that node: the records after it are walked (at most [`MAX_RECORDS`] in all), and
//!    a record that is not a CID record of a routed format, names another node, or runs past
//!    the datagram's end, or more records than that, sends the datagram by flow
//!    (`cid_mixed_datagram`), with the new-flow limits. Otherwise a stack that skips records
//!    with an unknown CID would take a handshake (`[CID record naming N][ClientHello]`) on
//!    the node the sender chose, past every limit. By flow rather than dropped: the flow path
//!    is what any other datagram of unknown shape gets, and a node sorts it out.
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
    /// None: a later IP fragment, whose first fragment's node it follows (`frag.rs`).
    Followed,
}

impl Format {
    /// The counter of a record of this format routed by its CID.
    #[inline(always)]
    pub fn routed(&self) -> Counter {
        match self {
            Format::Tls12Cid => Counter::CidRouted,
            Format::Unified => Counter::Cid13Routed,
            Format::Followed => Counter::FragFollowed,
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

/// Records of one datagram the classifier walks at most. Mbed TLS and wolfSSL put one to
/// three records in a datagram; a constant bound keeps the walk short for the verifier.
pub const MAX_RECORDS: usize = 8;

/// One record as the walk sees it.
enum Record {
    /// A CID record of a routed format: its node id and its size in bytes.
    Cid(u32, Format, usize),
    /// A CID record too short for its header: the counter of a first record.
    Short(Counter),
    /// Type 25 with a version other than FE FD.
    BadVersion,
    /// Anything else.
    Other,
}

/// Classifies the UDP payload (see the module doc for the rules). A first CID record too short
/// for its header is dropped: no node could decrypt it.
#[inline(always)]
pub fn classify(ctx: &XdpContext, udp: &Udp, cfg: &DpConfig) -> Result<Route, Counter> {
    let payload = udp.payload_off();
    let payload_len = udp.payload_len();
    if payload_len < 1 {
        return Ok(Route::Flow);
    }
    // The byte before the payload (the UDP checksum's second) and the payload's first: a
    // two-byte bounds check keeps its form for the verifier, a one-byte one becomes
    // `p >= end` at a variable offset, from which it learns nothing.
    let first: *const [u8; 2] = ptr_at(ctx, payload - 1).ok_or(Counter::DropBadUdpLength)?;
    // SAFETY: ptr_at checked that the bytes lie inside the packet.
    let first = unsafe { (*first)[1] };
    let (id, format, size) = match record(ctx, payload, payload_len, first, cfg)? {
        Record::Cid(id, format, size) => (id, format, size),
        Record::Short(c) => return Err(c),
        Record::BadVersion => {
            count(Counter::CidBadVersion);
            return Ok(Route::Flow);
        }
        Record::Other => return Ok(Route::Flow),
    };
    // One record filling the datagram, the usual case: no walk.
    if size == payload_len || rest_names(ctx, payload, payload_len, size, id, cfg) {
        Ok(Route::Node(id, format))
    } else {
        count(Counter::CidMixedDatagram);
        Ok(Route::Flow)
    }
}

/// Do the records from `off` to the payload's end (`len`) all name node `id`? The first
/// record ended at `off`; at most `MAX_RECORDS` records in all.
#[inline(always)]
fn rest_names(
    ctx: &XdpContext,
    payload: usize,
    len: usize,
    mut off: usize,
    id: u32,
    cfg: &DpConfig,
) -> bool {
    let mut i = 1;
    while i < MAX_RECORDS {
        if off >= len {
            // Exactly at the end: every record named `id`. Past it: the last one ran over.
            return off == len;
        }
        // An XDP frame (no multi-buffer) fits in a page, so `off` < `len` is far below 2^14:
        // the mask changes nothing at run time, and tells the verifier that packet offset
        // plus `off` stays below its 64 KiB limit for variable packet offsets.
        let at = off & 0x3fff;
        if at != off {
            return false;
        }
        // A CID record takes 3 bytes at least (RFC 9146: type, version; RFC 9147: the first
        // byte, a CID, a sequence number): fewer left over are not one. Reading three bytes
        // also keeps the verifier's bounds check (`p + 3 > end`; a one-byte check at a
        // variable offset compiles to `p >= end`, from which it learns nothing).
        if len - at < 3 {
            return false;
        }
        let Some(head) = ptr_at::<[u8; 3]>(ctx, payload + at) else {
            return false;
        };
        // SAFETY: ptr_at checked that the three bytes lie inside the packet.
        let first = unsafe { (*head)[0] };
        match record(ctx, payload + at, len - at, first, cfg) {
            Ok(Record::Cid(next, _, size)) if next == id => off = at + size,
            _ => return false,
        }
        i += 1;
    }
    off == len
}

/// The record at packet offset `at`, whose first byte is `first`, with `rem` (≥ 1) bytes of
/// the UDP payload left from there.
#[inline(always)]
fn record(
    ctx: &XdpContext,
    at: usize,
    rem: usize,
    first: u8,
    cfg: &DpConfig,
) -> Result<Record, Counter> {
    if first == TLS12_CID && cfg.dtls_versions & DTLS_V12 != 0 {
        return record12(ctx, at, rem, cfg);
    }
    if first & (UNIFIED_MASK | UNIFIED_C) == UNIFIED_FIXED | UNIFIED_C
        && cfg.dtls_versions & DTLS_V13 != 0
    {
        let seq = if first & UNIFIED_S != 0 { 2 } else { 1 };
        let with_len = first & UNIFIED_L != 0;
        let header = UNIFIED_CID_OFFSET + cfg.cid_len as usize + seq;
        if rem < header + if with_len { 2 } else { 0 } {
            return Ok(Record::Short(Counter::DropCid13Truncated));
        }
        let id = node_id(
            ctx,
            at + UNIFIED_CID_OFFSET,
            cfg,
            Counter::DropCid13Truncated,
        )?;
        // Without L the record is the rest of the datagram (RFC 9147 §4).
        let size = if with_len {
            header + 2 + read::<2>(ctx, at + header, Counter::DropCid13Truncated)? as usize
        } else {
            rem
        };
        return Ok(Record::Cid(id, Format::Unified, size));
    }
    Ok(Record::Other)
}

/// A record whose first byte is tls12_cid.
#[inline(always)]
fn record12(ctx: &XdpContext, at: usize, rem: usize, cfg: &DpConfig) -> Result<Record, Counter> {
    // Shorter than type + version: not recognisably a tls12_cid record.
    if rem < 3 {
        return Ok(Record::Other);
    }
    let head: *const [u8; 3] = ptr_at(ctx, at).ok_or(Counter::DropBadUdpLength)?;
    // SAFETY: ptr_at checked that the three bytes lie inside the packet.
    let head = unsafe { *head };
    if head[1] != DTLS12[0] || head[2] != DTLS12[1] {
        return Ok(Record::BadVersion);
    }
    let header = HEADER_WITHOUT_CID + cfg.cid_len as usize;
    if rem < header {
        return Ok(Record::Short(Counter::DropCidTruncated));
    }
    let id = node_id(ctx, at + CID_OFFSET, cfg, Counter::DropCidTruncated)?;
    // The length field follows the cid (computed from `at` upwards: an offset below a
    // checked pointer loses the verifier's bounds).
    let len_at = at + CID_OFFSET + cfg.cid_len as usize;
    let len = read::<2>(ctx, len_at, Counter::DropCidTruncated)? as usize;
    Ok(Record::Cid(id, Format::Tls12Cid, header + len))
}

/// The node id inside the cid that starts at packet offset `cid`.
#[inline(always)]
fn node_id(ctx: &XdpContext, cid: usize, cfg: &DpConfig, short: Counter) -> Result<u32, Counter> {
    let at = cid + cfg.node_id_offset as usize;
    // node_id_len is a load-time constant: the verifier keeps one arm, LLVM emits all four.
    match cfg.node_id_len {
        // One byte, read as two and shifted: a CID is always followed by at least one byte of
        // its header (the length field, or the sequence number), and a two-byte bounds check
        // keeps its form for the verifier at a variable offset (a one-byte one becomes
        // `p >= end`, from which the verifier learns no range).
        1 => read::<2>(ctx, at, short).map(|v| v >> 8),
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
