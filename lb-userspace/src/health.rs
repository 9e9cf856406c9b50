//! Node health checks: probes and the fall/rise state machine.
//!
//! A node that is down takes no new flows (it leaves the round-robin ring); its existing flows
//! and CID records keep going to it, since no other node holds their sessions.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use tokio::net::UdpSocket;

use crate::config::Probe;

/// TLS 1.2 cipher suites offered by the probe: PSK and certificate suites that DTLS servers
/// (Californium, Mbed TLS, OpenSSL) commonly enable, so the server gets far enough to answer.
const SUITES: &[u16] = &[
    0xc0a8, // TLS_PSK_WITH_AES_128_CCM_8
    0x00a8, // TLS_PSK_WITH_AES_128_GCM_SHA256
    0x00ae, // TLS_PSK_WITH_AES_128_CBC_SHA256
    0xc037, // TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256
    0xc0ae, // TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8
    0xc02b, // TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    0xc02f, // TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    0xc023, // TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256
    0xc027, // TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256
];

/// A DTLS 1.2 ClientHello in one record (RFC 6347 §4.2.2), with a fresh random.
pub fn client_hello(random: [u8; 32]) -> Vec<u8> {
    let mut body = vec![0xfe, 0xfd];
    body.extend_from_slice(&random);
    body.push(0); // session_id
    body.push(0); // cookie
    body.extend_from_slice(&((SUITES.len() * 2) as u16).to_be_bytes());
    for s in SUITES {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let ext: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x17, 0x00,
        0x1d, // supported_groups: secp256r1, x25519
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04,
        0x01, // signature_algorithms
    ];
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(ext);

    let len24 = |n: usize| [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    let mut hs = vec![1]; // client_hello
    hs.extend_from_slice(&len24(body.len()));
    hs.extend_from_slice(&[0, 0]); // message_seq
    hs.extend_from_slice(&[0, 0, 0]); // fragment_offset
    hs.extend_from_slice(&len24(body.len())); // fragment_length
    hs.extend_from_slice(&body);

    let mut rec = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Does this datagram start with a HelloVerifyRequest (3) or ServerHello (2) record?
pub fn is_hello_answer(d: &[u8]) -> bool {
    d.len() >= 14 && d[0] == 22 && d[1] == 0xfe && matches!(d[13], 2 | 3)
}

/// One probe of `addr`: true if the node answered as alive.
pub async fn probe(kind: Probe, addr: SocketAddr, timeout: Duration) -> bool {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let Ok(sock) = UdpSocket::bind(bind).await else {
        return false;
    };
    if sock.connect(addr).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 2048];
    match kind {
        Probe::None => true,
        Probe::Dtls => {
            let mut random = [0u8; 32];
            random[..8].copy_from_slice(&nanos().to_be_bytes());
            if sock.send(&client_hello(random)).await.is_err() {
                return false;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            // Skip anything that is not an answer to the hello (e.g. a late alert).
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                if is_hello_answer(&buf[..n]) {
                    return true;
                }
            }
            false
        }
        Probe::Udp => {
            if sock.send(b"cidlb health probe").await.is_err() {
                return false;
            }
            // ICMP port/host unreachable arrives as an error on the connected socket; silence
            // (or any answer) within the timeout counts as alive.
            match tokio::time::timeout(timeout, sock.recv(&mut buf)).await {
                Ok(Err(_)) => false,
                Ok(Ok(_)) | Err(_) => true,
            }
        }
    }
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One node's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHealth {
    pub up: bool,
    ok_streak: u32,
    fail_streak: u32,
    pub probes_ok: u64,
    pub probes_failed: u64,
    pub transitions: u64,
}

impl Default for NodeHealth {
    /// A node starts up: it must fail `fall` probes to go down.
    fn default() -> Self {
        Self {
            up: true,
            ok_streak: 0,
            fail_streak: 0,
            probes_ok: 0,
            probes_failed: 0,
            transitions: 0,
        }
    }
}

/// The fall/rise state machine of every node.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub fall: u32,
    pub rise: u32,
    pub nodes: BTreeMap<u32, NodeHealth>,
}

impl Tracker {
    pub fn new(fall: u32, rise: u32) -> Self {
        Self {
            fall,
            rise,
            nodes: BTreeMap::new(),
        }
    }

    /// Keeps the nodes in `ids` (new ones start up), forgets the others.
    pub fn retain(&mut self, ids: &[u32], fall: u32, rise: u32) {
        self.fall = fall;
        self.rise = rise;
        self.nodes.retain(|id, _| ids.contains(id));
        for id in ids {
            self.nodes.entry(*id).or_default();
        }
    }

    pub fn is_up(&self, id: u32) -> bool {
        self.nodes.get(&id).is_none_or(|h| h.up)
    }

    /// Records a probe result; returns the new state if it changed.
    pub fn record(&mut self, id: u32, ok: bool) -> Option<bool> {
        let (fall, rise) = (self.fall, self.rise);
        let h = self.nodes.entry(id).or_default();
        if ok {
            h.probes_ok += 1;
            h.ok_streak += 1;
            h.fail_streak = 0;
            if !h.up && h.ok_streak >= rise {
                h.up = true;
                h.transitions += 1;
                return Some(true);
            }
        } else {
            h.probes_failed += 1;
            h.fail_streak += 1;
            h.ok_streak = 0;
            if h.up && h.fail_streak >= fall {
                h.up = false;
                h.transitions += 1;
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise() {
        let mut t = Tracker::new(3, 2);
        t.retain(&[1], 3, 2);
        assert!(t.is_up(1));
        assert_eq!(t.record(1, false), None);
        assert_eq!(t.record(1, false), None);
        assert_eq!(t.record(1, true), None); // a success resets the streak
        assert_eq!(t.record(1, false), None);
        assert_eq!(t.record(1, false), None);
        assert_eq!(t.record(1, false), Some(false));
        assert!(!t.is_up(1));
        assert_eq!(t.record(1, true), None);
        assert_eq!(t.record(1, true), Some(true));
        assert_eq!(t.nodes[&1].transitions, 2);
        t.retain(&[2], 3, 2);
        assert!(!t.nodes.contains_key(&1) && t.is_up(2));
    }

    #[test]
    fn client_hello_is_well_formed() {
        let h = client_hello([7; 32]);
        assert_eq!(&h[..3], &[22, 0xfe, 0xfd]);
        let rec_len = u16::from_be_bytes([h[11], h[12]]) as usize;
        assert_eq!(rec_len, h.len() - 13);
        assert_eq!(h[13], 1);
        let body_len = ((h[14] as usize) << 16) | ((h[15] as usize) << 8) | h[16] as usize;
        assert_eq!(body_len + 12, rec_len);
        assert!(is_hello_answer(&[
            22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3
        ]));
        assert!(!is_hello_answer(&[
            21, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3
        ]));
    }
}
