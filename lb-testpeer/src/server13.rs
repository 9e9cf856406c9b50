//! DTLS 1.3 echo server for one cluster node (wolfSSL): the counterpart of server.rs, with the
//! same options, log lines and echo format.
//!
//! One unconnected UDP socket, one thread. Each datagram goes to a session:
//! * a unified-header record with the C bit set (RFC 9147 §4): by the CID at bytes 1..1+L
//!   (our own CID, so L is known);
//! * otherwise (or if the CID is unknown): by the client's address;
//! * unknown address + epoch-0 ClientHello: a new session. wolfSSL answers the first
//!   ClientHello with a HelloRetryRequest carrying a cookie bound to the address; the session
//!   stays keyed by that address until the second ClientHello (which may span two datagrams)
//!   comes back with the cookie.
//!
//! A session's peer address follows the client: whenever a datagram from a different address
//! yields authenticated application data, replies go to the new address ("peer moved").

use crate::ffi;
use crate::server::Opts;
use crate::util::hex;
use crate::wolf::{self, Codes, Conf, Sess};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const CT_HANDSHAKE: u8 = 22;
const HS_CLIENT_HELLO: u8 = 1;
/// DTLSPlaintext header: type(1) version(2) epoch(2) sequence(6) length(2). DTLS 1.3 keeps it
/// for epoch 0 (ClientHello, HelloRetryRequest, ServerHello), RFC 9147 §4.
const PLAINTEXT_HEADER: usize = 13;
/// RFC 9147 §4 unified header, first byte `0 0 1 C S L E E`: the top three bits are 001, C
/// says a connection ID follows the first byte.
const UNIFIED_MASK: u8 = 0xe0;
const UNIFIED_FIXED: u8 = 0x20;
const UNIFIED_C: u8 = 0x10;
/// Incomplete handshakes are dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(20);

struct Session {
    sess: Sess,
    peer: SocketAddr,
    cid: Vec<u8>,
    established: bool,
    announced: bool,
    created: Instant,
    last_rx: Instant,
    /// When wolfSSL's retransmission timer runs out (reset on every datagram we feed).
    timer: Instant,
}

struct Server {
    o: Opts,
    codes: Codes,
    conf: Conf,
    sock: UdpSocket,
    next_id: u64,
    sessions: HashMap<u64, Session>,
    by_addr: HashMap<SocketAddr, u64>,
    by_cid: HashMap<Vec<u8>, u64>,
    buf: Vec<u8>,
}

/// One line on stderr; never panics (e.g. if stderr is a closed pipe).
macro_rules! log {
    ($srv:expr, $($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "[node={}] {}", $srv.o.node_id, format_args!($($arg)*));
    }};
}

/// The CID of a unified-header record carrying one, given our CID length `l`.
fn unified_cid(d: &[u8], l: usize) -> Option<&[u8]> {
    let b = *d.first()?;
    if b & UNIFIED_MASK != UNIFIED_FIXED || b & UNIFIED_C == 0 {
        return None;
    }
    // Shortest CID record: first byte, CID, an 8-bit sequence number, no length field.
    d.get(1..1 + l).filter(|_| d.len() > 1 + l)
}

/// An epoch-0 DTLSPlaintext record carrying (the start of) a ClientHello.
fn is_client_hello(d: &[u8]) -> bool {
    d.len() > PLAINTEXT_HEADER
        && d[0] == CT_HANDSHAKE
        && d[1] == 0xfe
        && d[3] == 0
        && d[4] == 0
        && d[PLAINTEXT_HEADER] == HS_CLIENT_HELLO
}

pub fn run(o: Opts) -> anyhow::Result<()> {
    wolf::global_init()?;
    ffi::install_signal_handlers()?;
    let sock = UdpSocket::bind(o.listen).map_err(|e| anyhow::anyhow!("bind {}: {e}", o.listen))?;
    sock.set_read_timeout(Some(TICK))?;
    let conf = Conf::new(true, &o.psk, &o.psk_identity)?;
    let mut srv = Server {
        codes: wolf::codes(),
        conf,
        sock,
        next_id: 1,
        sessions: HashMap::new(),
        by_addr: HashMap::new(),
        by_cid: HashMap::new(),
        buf: vec![0u8; 65536],
        o,
    };
    log!(
        srv,
        "listening addr={} cid={} cid_len={} node_id_len={} dtls=1.3 wolfssl={}",
        srv.sock.local_addr()?,
        if srv.o.no_cid { "off" } else { "on" },
        srv.o.cid_len,
        srv.o.node_id_len,
        wolf::version()
    );
    srv.serve();
    let n = srv.sessions.len();
    let ids: Vec<u64> = srv.sessions.keys().copied().collect();
    for id in ids {
        if let Some(s) = srv.sessions.get_mut(&id) {
            if s.established {
                s.sess.close_notify();
            }
        }
        srv.remove(id);
    }
    log!(srv, "shutting down sessions={n}");
    Ok(())
}

impl Server {
    fn serve(&mut self) {
        let mut dgram = vec![0u8; 65536];
        let mut next_tick = Instant::now() + TICK;
        while !ffi::stop_requested() {
            match self.sock.recv_from(&mut dgram) {
                Ok((n, from)) => {
                    if self.o.drop_permille > 0 && self.sim_drop() {
                        if self.o.debug {
                            log!(self, "debug simulated drop from={from} len={n}");
                        }
                    } else {
                        let d = dgram[..n].to_vec();
                        self.on_datagram(&d, from);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    log!(self, "recv error: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.tick(now);
            }
        }
    }

    fn sim_drop(&mut self) -> bool {
        let mut r = [0u8; 2];
        wolf::random(&mut r).is_ok() && (u16::from_be_bytes(r) % 1000) < self.o.drop_permille as u16
    }

    fn on_datagram(&mut self, d: &[u8], from: SocketAddr) {
        if d.is_empty() {
            return;
        }
        if self.o.debug {
            log!(
                self,
                "debug datagram from={from} len={} first={:02x}",
                d.len(),
                d[0]
            );
        }
        let mut id = None;
        if !self.o.no_cid {
            if let Some(cid) = unified_cid(d, self.o.cid_len) {
                id = self.by_cid.get(cid).copied();
                if id.is_none() && self.o.debug {
                    log!(self, "debug unknown cid={} from={from}", hex(cid));
                }
            }
        }
        if id.is_none() {
            id = self.by_addr.get(&from).copied();
            // The same address starts over (client port reuse): a fresh session, fresh CID.
            if let Some(old) = id {
                if is_client_hello(d) && self.sessions.get(&old).is_some_and(|s| s.established) {
                    log!(self, "session reconnect peer={from} id={old}");
                    self.remove(old);
                    id = None;
                }
            }
        }
        let id = match id {
            Some(id) => id,
            None => {
                if !is_client_hello(d) {
                    if self.o.debug {
                        log!(
                            self,
                            "debug drop datagram from unknown peer={from} first={:02x} len={}",
                            d[0],
                            d.len()
                        );
                    }
                    return;
                }
                match self.new_session(from) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        self.process(id, Some(d), from);
    }

    fn new_session(&mut self, from: SocketAddr) -> Option<u64> {
        if self.sessions.len() >= self.o.max_sessions {
            log!(self, "session refused peer={from} reason=max_sessions");
            return None;
        }
        let mut sess = match Sess::new(&self.conf, self.sock.as_raw_fd(), false) {
            Ok(s) => s,
            Err(e) => {
                log!(
                    self,
                    "session refused peer={from} reason=setup {}",
                    wolf::strerror(e)
                );
                return None;
            }
        };
        if sess.set_peer(from) != 0 {
            log!(self, "session refused peer={from} reason=set_peer");
            return None;
        }
        let mut cid = Vec::new();
        if !self.o.no_cid {
            cid = self.fresh_cid()?;
            let r = sess.use_cid(&cid);
            if r != 0 {
                log!(
                    self,
                    "session refused peer={from} reason=use_cid {}",
                    wolf::strerror(r)
                );
                return None;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let now = Instant::now();
        if !cid.is_empty() {
            self.by_cid.insert(cid.clone(), id);
        }
        self.by_addr.insert(from, id);
        self.sessions.insert(
            id,
            Session {
                sess,
                peer: from,
                cid,
                established: false,
                announced: false,
                created: now,
                last_rx: now,
                timer: now,
            },
        );
        Some(id)
    }

    /// [node id as B big-endian bytes][random], unique among live sessions.
    fn fresh_cid(&mut self) -> Option<Vec<u8>> {
        let b = self.o.node_id_len;
        let l = self.o.cid_len;
        let mut cid = vec![0u8; l];
        let be = self.o.node_id.to_be_bytes();
        cid[..b].copy_from_slice(&be[8 - b..]);
        for _ in 0..32 {
            if wolf::random(&mut cid[b..]).is_err() {
                break;
            }
            if !self.by_cid.contains_key(&cid) {
                return Some(cid);
            }
        }
        log!(self, "session refused reason=no_free_cid");
        None
    }

    fn remove(&mut self, id: u64) {
        if let Some(s) = self.sessions.remove(&id) {
            if self.by_addr.get(&s.peer) == Some(&id) {
                self.by_addr.remove(&s.peer);
            }
            if !s.cid.is_empty() && self.by_cid.get(&s.cid) == Some(&id) {
                self.by_cid.remove(&s.cid);
            }
        }
    }

    /// Feeds `d` (if any) to session `id` and runs wolfSSL until it wants more input.
    fn process(&mut self, id: u64, d: Option<&[u8]>, from: SocketAddr) {
        let c = self.codes;
        let node_id = self.o.node_id;
        let debug = self.o.debug;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let tx0 = s.sess.stats()[0];
        if let Some(d) = d {
            if s.sess.feed(d) != 0 {
                return;
            }
            s.last_rx = Instant::now();
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut outcome: Option<String> = None; // Some(reason) = remove the session
        for _ in 0..256 {
            let Some(s) = self.sessions.get_mut(&id) else {
                break;
            };
            if !s.established {
                let r = s.sess.handshake();
                if !s.announced && s.sess.is_stateful() {
                    // Past the cookie check: a real session.
                    s.announced = true;
                    let peer = s.peer;
                    log!(self, "session new peer={peer} id={id}");
                }
                let s = self.sessions.get_mut(&id).unwrap();
                if r == 0 {
                    s.established = true;
                    let suite = s.sess.ciphersuite();
                    let ms = s.created.elapsed().as_millis();
                    let peer = s.peer;
                    let cid = if s.cid.is_empty() {
                        "none".into()
                    } else {
                        hex(&s.cid)
                    };
                    log!(
                        self,
                        "handshake done peer={peer} id={id} cid={cid} suite={suite} ms={ms}"
                    );
                    continue;
                }
                if r == c.want_read || r == c.want_write {
                    break;
                }
                outcome = Some(format!("handshake failed: {}", wolf::strerror(r)));
                break;
            }
            let r = s.sess.read(&mut buf[..16384]);
            if r > 0 {
                let n = r as usize;
                if from != s.peer {
                    // Authenticated data from a new address: follow the client.
                    let old = s.peer;
                    s.peer = from;
                    if s.sess.set_peer(from) != 0 {
                        outcome = Some(format!("set_peer {from} failed"));
                        break;
                    }
                    if self.by_addr.get(&old) == Some(&id) {
                        self.by_addr.remove(&old);
                    }
                    self.by_addr.insert(from, id);
                    let s = self.sessions.get(&id).unwrap();
                    log!(
                        self,
                        "peer moved old={old} new={from} id={id} cid={}",
                        hex(&s.cid)
                    );
                }
                let s = self.sessions.get_mut(&id).unwrap();
                let mut reply = format!("node={node_id} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let w = s.sess.write(&reply);
                if debug {
                    let peer = s.peer;
                    log!(self, "debug record id={id} peer={peer} len={n} write={w}");
                }
                if w < 0 && w != c.want_write {
                    outcome = Some(format!("write failed: {}", wolf::strerror(w)));
                    break;
                }
                continue;
            }
            if r == c.want_read || r == c.want_write {
                break;
            }
            outcome = Some(if r == c.closed {
                "close_notify".into()
            } else {
                format!("read failed: {}", wolf::strerror(r))
            });
            break;
        }
        self.buf = buf;
        if let Some(s) = self.sessions.get_mut(&id) {
            s.timer = Instant::now() + s.sess.timeout();
            if debug && !s.established {
                let sent = s.sess.stats()[0] - tx0;
                let stateful = s.sess.is_stateful();
                log!(
                    self,
                    "debug handshake id={id} sent={sent} stateful={stateful}"
                );
            }
        }
        if let Some(reason) = outcome {
            if let Some(s) = self.sessions.get(&id) {
                log!(
                    self,
                    "session closed peer={} id={id} reason={reason}",
                    s.peer
                );
            }
            self.remove(id);
        }
    }

    fn tick(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut retransmit = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            let idle = now.duration_since(s.last_rx);
            if (!s.established && now.duration_since(s.created) > HANDSHAKE_TIMEOUT)
                || idle > self.o.idle_timeout
            {
                expired.push((*id, s.peer, idle));
            } else if !s.established && now >= s.timer {
                // wolfSSL resends its last flight. Not after the handshake: an error from a
                // timeout there would stick to the session and end it at the next read.
                let tx = s.sess.stats()[0];
                let r = s.sess.got_timeout();
                let sent = s.sess.stats()[0] - tx;
                retransmit.push((*id, s.peer, r, sent));
            }
        }
        for (id, peer, r, sent) in retransmit {
            if self.o.debug {
                log!(
                    self,
                    "debug retransmit timer id={id} peer={peer} r={r} datagrams={sent}"
                );
            }
            self.process(id, None, peer);
        }
        for (id, peer, idle) in expired {
            let hs = self.sessions.get(&id).is_some_and(|s| s.established);
            log!(
                self,
                "session expired peer={peer} id={id} idle_s={} established={hs}",
                idle.as_secs()
            );
            self.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_client_hello, unified_cid};

    #[test]
    fn unified_header_cid() {
        // 0x3e: 001 C=1 S=1 L=1 epoch 2; CID 01aabbccddee, then seq and length.
        let rec = [0x3e, 1, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0, 5, 0, 17];
        assert_eq!(unified_cid(&rec, 6), Some(&rec[1..7]));
        // C clear (0x2e), DTLSCiphertext without CID; a 1.2 CID record (type 25); too short.
        assert_eq!(unified_cid(&[0x2e, 1, 2, 3, 4, 5, 6, 7, 8], 6), None);
        assert_eq!(
            unified_cid(&[0x19, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1], 6),
            None
        );
        assert_eq!(unified_cid(&rec[..7], 6), None);
        assert_eq!(unified_cid(&[], 6), None);
    }

    #[test]
    fn client_hello_detection() {
        let mut ch = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100, 1, 0, 0];
        assert!(is_client_hello(&ch));
        ch[4] = 1; // epoch 1
        assert!(!is_client_hello(&ch));
        assert!(!is_client_hello(&ch[..13]));
    }
}
