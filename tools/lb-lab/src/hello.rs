//! DTLS hello messages around the cookie exchange, byte by byte from RFC 6347 (DTLS 1.2) and
//! RFC 9147 / RFC 8446 (DTLS 1.3), for fixtures, the fuzzer and the bench: a client's
//! ClientHello (with a cookie or without), a node's HelloVerifyRequest or HelloRetryRequest,
//! each in one record or cut into fragments.

/// The cookie extension's type (RFC 8446 §4.2.2).
pub const COOKIE_EXT: u16 = 44;

/// ServerHello.random of a HelloRetryRequest: SHA-256 of "HelloRetryRequest" (RFC 8446 §4.1.3).
pub const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// One handshake message: its type, sequence number and body.
#[derive(Clone, Debug)]
pub struct Handshake {
    pub msg_type: u8,
    pub msg_seq: u16,
    pub body: Vec<u8>,
    /// The record's version: FE FD (DTLS 1.2 and 1.3), or FE FF (DTLS 1.0, which a first
    /// ClientHello and a HelloVerifyRequest may carry).
    pub record_version: [u8; 2],
}

fn len24(n: usize) -> [u8; 3] {
    [(n >> 16) as u8, (n >> 8) as u8, n as u8]
}

impl Handshake {
    /// The whole message in one DTLSPlaintext record.
    pub fn record(&self) -> Vec<u8> {
        self.fragment(0, self.body.len())
    }

    /// The record holding bytes `off..off + len` of the message's body as one fragment.
    pub fn fragment(&self, off: usize, len: usize) -> Vec<u8> {
        let mut hs = vec![self.msg_type];
        hs.extend_from_slice(&len24(self.body.len()));
        hs.extend_from_slice(&self.msg_seq.to_be_bytes());
        hs.extend_from_slice(&len24(off));
        hs.extend_from_slice(&len24(len));
        hs.extend_from_slice(&self.body[off..off + len]);
        let mut r = vec![22, self.record_version[0], self.record_version[1]];
        r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, self.msg_seq as u8]);
        r.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        r.extend_from_slice(&hs);
        r
    }

    /// Where the extension of type `ty` starts in the body (its type field), if present.
    pub fn extension_at(&self, ty: u16) -> Option<usize> {
        let mut at = self.extensions_start()?;
        while at + 4 <= self.body.len() {
            let t = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            if t == ty {
                return Some(at);
            }
            at += 4 + u16::from_be_bytes([self.body[at + 2], self.body[at + 3]]) as usize;
        }
        None
    }

    /// Where the first extension starts in the body (after the extensions' length field), for
    /// a ClientHello or a ServerHello.
    pub fn extensions_start(&self) -> Option<usize> {
        let b = &self.body;
        match self.msg_type {
            1 => {
                let sid = *b.get(34)? as usize;
                let mut at = 35 + sid;
                at += 1 + *b.get(at)? as usize;
                at += 2 + u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize;
                at += 1 + *b.get(at)? as usize;
                Some(at + 2)
            }
            2 => Some(35 + *b.get(34)? as usize + 5),
            _ => None,
        }
    }
}

/// Extensions as (type, data).
pub type Extensions = Vec<(u16, Vec<u8>)>;

fn extensions(out: &mut Vec<u8>, exts: &Extensions) {
    let mut e = Vec::new();
    for (ty, data) in exts {
        e.extend_from_slice(&ty.to_be_bytes());
        e.extend_from_slice(&(data.len() as u16).to_be_bytes());
        e.extend_from_slice(data);
    }
    out.extend_from_slice(&(e.len() as u16).to_be_bytes());
    out.extend_from_slice(&e);
}

/// The cookie extension carrying `cookie`.
pub fn cookie_extension(cookie: &[u8]) -> (u16, Vec<u8>) {
    let mut d = (cookie.len() as u16).to_be_bytes().to_vec();
    d.extend_from_slice(cookie);
    (COOKIE_EXT, d)
}

/// Extensions a client sends besides the cookie: supported_groups, signature_algorithms,
/// supported_versions (DTLS 1.3), and a key share of `key_share` bytes (wolfSSL's
/// post-quantum one makes its ClientHello span two datagrams).
pub fn client_extensions(key_share: usize) -> Extensions {
    vec![
        (10, vec![0, 4, 0, 0x17, 0, 0x1d]),
        (13, vec![0, 4, 4, 3, 8, 4]),
        (43, vec![2, 0xfe, 0xfc]),
        (51, {
            let mut d = ((key_share + 4) as u16).to_be_bytes().to_vec();
            d.extend_from_slice(&[0x11, 0xec]);
            d.extend_from_slice(&(key_share as u16).to_be_bytes());
            d.extend((0..key_share).map(|i| (i * 13) as u8));
            d
        }),
    ]
}

/// A ClientHello: DTLS 1.2 with `cookie` in its cookie field (message 1 when the cookie is
/// not empty), and `exts` after the cipher suites and compression methods.
pub fn client_hello(session_id: &[u8], cookie: &[u8], exts: &Extensions) -> Handshake {
    let mut b = vec![0xfe, 0xfd];
    b.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    b.push(session_id.len() as u8);
    b.extend_from_slice(session_id);
    b.push(cookie.len() as u8);
    b.extend_from_slice(cookie);
    b.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0x13, 0x01]); // two cipher suites
    b.extend_from_slice(&[1, 0]); // compression: null
    extensions(&mut b, exts);
    Handshake {
        msg_type: 1,
        msg_seq: u16::from(!cookie.is_empty()),
        body: b,
        record_version: [0xfe, 0xfd],
    }
}

/// A DTLS 1.3 second ClientHello (message 1): an empty legacy cookie, and `exts` (put the
/// cookie extension where the test wants it).
pub fn client_hello13(exts: &Extensions) -> Handshake {
    let mut h = client_hello(&[0x33; 32], &[], exts);
    h.msg_seq = 1;
    h
}

/// A HelloVerifyRequest (RFC 6347 §4.2.1) carrying `cookie`, server_version `version`.
pub fn hello_verify_request(version: [u8; 2], cookie: &[u8]) -> Handshake {
    let mut b = version.to_vec();
    b.push(cookie.len() as u8);
    b.extend_from_slice(cookie);
    Handshake {
        msg_type: 3,
        msg_seq: 0,
        body: b,
        record_version: version,
    }
}

/// A HelloRetryRequest (RFC 9147 §5.1): a ServerHello whose random is [`HRR_RANDOM`], with
/// `exts` (supported_versions, key_share and the cookie extension, in any order).
pub fn hello_retry_request(session_id: &[u8], exts: &Extensions) -> Handshake {
    let mut b = vec![0xfe, 0xfd];
    b.extend_from_slice(&HRR_RANDOM);
    b.push(session_id.len() as u8);
    b.extend_from_slice(session_id);
    b.extend_from_slice(&[0x13, 0x01, 0]); // cipher suite, compression
    extensions(&mut b, exts);
    Handshake {
        msg_type: 2,
        msg_seq: 0,
        body: b,
        record_version: [0xfe, 0xfd],
    }
}

/// A HelloRetryRequest's usual extensions around `cookie`.
pub fn hrr_extensions(cookie: &[u8]) -> Extensions {
    vec![
        (43, vec![0xfe, 0xfc]),
        (51, vec![0, 0x1d]),
        cookie_extension(cookie),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_found_where_they_were_put() {
        let mut exts = client_extensions(1200);
        exts.push(cookie_extension(&[9; 40]));
        let ch = client_hello13(&exts);
        let at = ch.extension_at(COOKIE_EXT).unwrap();
        assert_eq!(&ch.body[at + 4..at + 6], &[0, 40]);
        assert_eq!(&ch.body[at + 6..at + 46], &[9; 40]);
        let hrr = hello_retry_request(&[], &hrr_extensions(&[7; 20]));
        let at = hrr.extension_at(COOKIE_EXT).unwrap();
        assert_eq!(&hrr.body[at + 6..], &[7; 20]);
        // A fragment's header says where it lies.
        let f = ch.fragment(100, 50);
        assert_eq!(&f[13 + 6..13 + 12], &[0, 0, 100, 0, 0, 50]);
        assert_eq!(f.len(), 13 + 12 + 50);
    }
}
