//! DTLS echo server for one cluster node, DTLS 1.2 (Mbed TLS, ffi.rs) or 1.3 (wolfSSL,
//! wolf.rs) behind [`ServerSess`].
//!
//! One unconnected UDP socket, one thread. Each datagram goes to a session:
//! * a record carrying our CID (so its length L is known): by that CID. DTLS 1.2: record type
//!   25, version FE FD, CID at bytes 11..11+L; DTLS 1.3: unified header with the C bit set
//!   (RFC 9147 §4), CID at bytes 1..1+L;
//! * otherwise (or if the CID is unknown): by the client's address;
//! * unknown address + epoch-0 ClientHello: a new session. The cookie exchange comes first:
//!   Mbed TLS answers a ClientHello without a valid cookie with a HelloVerifyRequest and the
//!   session is dropped again; wolfSSL answers with a HelloRetryRequest carrying a cookie bound
//!   to the address, and the session stays keyed by that address until the second ClientHello
//!   (which may span two datagrams) comes back with the cookie.
//!
//! A session's peer address follows the client: whenever a datagram from a different address
//! yields authenticated application data, replies go to the new address ("peer moved").

use crate::util;
use crate::util::hex;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

pub struct Opts {
    pub listen: SocketAddr,
    pub node_id: u64,
    pub node_id_len: usize,
    pub cid_len: usize,
    pub psk: Vec<u8>,
    pub psk_identity: Vec<u8>,
    pub no_cid: bool,
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    pub debug: bool,
    pub mbedtls_debug: i32,
    pub drop_permille: u32,
}

const CT_HANDSHAKE: u8 = 22;
const HS_CLIENT_HELLO: u8 = 1;
/// DTLSPlaintext header: type(1) version(2) epoch(2) sequence(6) length(2). DTLS 1.3 keeps it
/// for epoch 0 (ClientHello, HelloRetryRequest, ServerHello), RFC 9147 §4.
pub(crate) const PLAINTEXT_HEADER: usize = 13;
/// Incomplete handshakes are dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(20);

/// A handshake step's outcome.
pub(crate) enum Hs {
    Done,
    /// Waiting for the client; `stateful`: past the cookie check, a real session.
    Pending {
        stateful: bool,
    },
    /// A cookie request went out; the session is dropped (stateless until the cookie returns).
    Stateless,
    Failed(String),
}

/// A read's outcome.
pub(crate) enum Rd {
    Data(usize),
    Again,
    /// The client started over from the same address with a valid cookie (Mbed TLS reset the
    /// context and keeps the ClientHello buffered): continue as a fresh handshake.
    Reconnect,
    Closed,
    Failed(String),
}

/// What the server loop needs from one DTLS library. Error texts are log reasons.
pub(crate) trait ServerSess: Sized {
    type Conf;
    /// Held for the server's lifetime (Mbed TLS's global lock).
    type Guard;
    /// Shorter datagrams are dropped unread.
    const MIN_DATAGRAM: usize;
    /// A ClientHello from the address of an established session ends it and starts a new one
    /// (wolfSSL); Mbed TLS reports it as [`Rd::Reconnect`] instead.
    const NEW_SESSION_ON_CLIENT_HELLO: bool;
    fn setup(o: &Opts) -> anyhow::Result<(Self::Guard, Self::Conf)>;
    /// The tail of the `listening` line naming the library.
    fn library() -> String;
    /// The CID of a record that carries one, given our CID length `l`.
    fn record_cid(d: &[u8], l: usize) -> Option<&[u8]>;
    fn random(buf: &mut [u8]) -> bool;
    /// A session on socket `fd` for `peer`, with our `cid` (empty: none). Err: refusal reason.
    fn open(conf: &Self::Conf, fd: RawFd, peer: SocketAddr, cid: &[u8]) -> Result<Self, String>;
    /// Hands over one datagram; false if it was not accepted.
    fn feed(&mut self, d: &[u8]) -> bool;
    fn handshake(&mut self) -> Hs;
    fn ciphersuite(&mut self) -> String;
    fn read(&mut self, buf: &mut [u8]) -> Rd;
    /// The library's result, and an error if it failed.
    fn write(&mut self, d: &[u8]) -> (i32, Option<String>);
    fn set_peer(&mut self, peer: SocketAddr) -> Result<(), String>;
    /// A new CID after [`Rd::Reconnect`].
    fn set_cid(&mut self, cid: &[u8]) -> Result<(), String>;
    fn close_notify(&mut self);
    /// At a tick, during the handshake: resends the last flight if its timer ran out and
    /// returns Some(debug detail); `process` then runs the session.
    fn retransmit_due(&mut self, now: Instant) -> Option<String>;
    /// Called before `process` feeds a session, and after (Some: a debug detail).
    fn begin(&mut self) {}
    fn end(&mut self, _established: bool) -> Option<String> {
        None
    }
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

struct Session<S> {
    sess: S,
    peer: SocketAddr,
    cid: Vec<u8>,
    established: bool,
    announced: bool,
    created: Instant,
    last_rx: Instant,
}

struct Server<S: ServerSess> {
    o: Opts,
    conf: S::Conf,
    sock: UdpSocket,
    next_id: u64,
    sessions: HashMap<u64, Session<S>>,
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

pub(crate) fn run<S: ServerSess>(o: Opts) -> anyhow::Result<()> {
    let (_guard, conf) = S::setup(&o)?;
    util::install_stop_handlers()?;
    let sock = UdpSocket::bind(o.listen).map_err(|e| anyhow::anyhow!("bind {}: {e}", o.listen))?;
    sock.set_read_timeout(Some(TICK))?;
    let mut srv = Server::<S> {
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
        "listening addr={} cid={} cid_len={} node_id_len={} {}",
        srv.sock.local_addr()?,
        if srv.o.no_cid { "off" } else { "on" },
        srv.o.cid_len,
        srv.o.node_id_len,
        S::library()
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

impl<S: ServerSess> Server<S> {
    fn serve(&mut self) {
        let mut dgram = vec![0u8; 65536];
        let mut next_tick = Instant::now() + TICK;
        while !util::stop_requested() {
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
        S::random(&mut r) && (u16::from_be_bytes(r) % 1000) < self.o.drop_permille as u16
    }

    fn on_datagram(&mut self, d: &[u8], from: SocketAddr) {
        if d.len() < S::MIN_DATAGRAM.max(1) {
            if self.o.debug {
                log!(
                    self,
                    "debug drop short datagram from={from} len={}",
                    d.len()
                );
            }
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
            if let Some(cid) = S::record_cid(d, self.o.cid_len) {
                id = self.by_cid.get(cid).copied();
                if id.is_none() && self.o.debug {
                    log!(self, "debug unknown cid={} from={from}", hex(cid));
                }
            }
        }
        if id.is_none() {
            id = self.by_addr.get(&from).copied();
            // The same address starts over (client port reuse): a fresh session, fresh CID.
            if let Some(old) = id.filter(|_| S::NEW_SESSION_ON_CLIENT_HELLO) {
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
        let cid = if self.o.no_cid {
            Vec::new()
        } else {
            self.fresh_cid()?
        };
        let sess = match S::open(&self.conf, self.sock.as_raw_fd(), from, &cid) {
            Ok(s) => s,
            Err(reason) => {
                log!(self, "session refused peer={from} reason={reason}");
                return None;
            }
        };
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
            if !S::random(&mut cid[b..]) {
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

    /// Feeds `d` (if any) to session `id` and runs the library until it wants more input.
    fn process(&mut self, id: u64, d: Option<&[u8]>, from: SocketAddr) {
        let node_id = self.o.node_id;
        let debug = self.o.debug;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.sess.begin();
        if let Some(d) = d {
            if !s.sess.feed(d) {
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
                let hs = s.sess.handshake();
                if matches!(hs, Hs::Done | Hs::Pending { stateful: true }) && !s.announced {
                    // Past the cookie check: a real session.
                    s.announced = true;
                    let peer = s.peer;
                    log!(self, "session new peer={peer} id={id}");
                }
                let s = self.sessions.get_mut(&id).unwrap();
                match hs {
                    Hs::Done => {
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
                    Hs::Pending { .. } => {}
                    Hs::Stateless => {
                        if debug {
                            log!(self, "debug hello-verify-request sent peer={from}");
                        }
                        outcome = Some(String::new()); // stateless until the cookie comes back
                    }
                    Hs::Failed(e) => outcome = Some(e),
                }
                break;
            }
            match s.sess.read(&mut buf[..16384]) {
                Rd::Data(n) => {
                    if from != s.peer {
                        // Authenticated data from a new address: follow the client.
                        let old = s.peer;
                        s.peer = from;
                        if let Err(e) = s.sess.set_peer(from) {
                            outcome = Some(e);
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
                    let (w, err) = s.sess.write(&reply);
                    if debug {
                        let peer = s.peer;
                        log!(self, "debug record id={id} peer={peer} len={n} write={w}");
                    }
                    if err.is_some() {
                        outcome = err;
                        break;
                    }
                    continue;
                }
                Rd::Again => break,
                Rd::Reconnect => {
                    s.established = false;
                    s.announced = false;
                    s.created = Instant::now();
                    let peer = s.peer;
                    log!(self, "session reconnect peer={peer} id={id}");
                    if !self.o.no_cid {
                        let Some(cid) = self.fresh_cid() else {
                            outcome = Some("no free CID".into());
                            break;
                        };
                        let s = self.sessions.get_mut(&id).unwrap();
                        if let Err(e) = s.sess.set_cid(&cid) {
                            outcome = Some(e);
                            break;
                        }
                        let old = std::mem::replace(&mut s.cid, cid.clone());
                        if self.by_cid.get(&old) == Some(&id) {
                            self.by_cid.remove(&old);
                        }
                        self.by_cid.insert(cid, id);
                    }
                    continue;
                }
                Rd::Closed => outcome = Some("close_notify".into()),
                Rd::Failed(e) => outcome = Some(e),
            }
            break;
        }
        self.buf = buf;
        if let Some(s) = self.sessions.get_mut(&id) {
            if let Some(detail) = s.sess.end(s.established) {
                if debug {
                    log!(self, "debug handshake id={id}{detail}");
                }
            }
        }
        if let Some(reason) = outcome {
            if let Some(s) = self.sessions.get(&id) {
                if !reason.is_empty() {
                    log!(
                        self,
                        "session closed peer={} id={id} reason={reason}",
                        s.peer
                    );
                }
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
            } else if !s.established {
                // Not after the handshake: wolfSSL would keep an error from a timeout there
                // and end the session at the next read.
                if let Some(detail) = s.sess.retransmit_due(now) {
                    retransmit.push((*id, s.peer, detail));
                }
            }
        }
        for (id, peer, detail) in retransmit {
            if self.o.debug {
                log!(self, "debug retransmit timer id={id} peer={peer}{detail}");
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
    use super::is_client_hello;

    #[test]
    fn client_hello_detection() {
        let mut ch = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100, 1, 0, 0];
        assert!(is_client_hello(&ch));
        ch[4] = 1; // epoch 1
        assert!(!is_client_hello(&ch));
        assert!(!is_client_hello(&ch[..13]));
    }
}
