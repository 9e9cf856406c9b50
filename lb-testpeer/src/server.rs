//! DTLS 1.2 echo server for one cluster node.
//!
//! One unconnected UDP socket, one thread. Each datagram goes to a session:
//! * first record is a CID record (type 25, version FE FD, long enough): by the CID at
//!   bytes 11..11+L (our own CID, so L is known);
//! * otherwise (or if the CID is unknown): by the client's address;
//! * unknown address + epoch-0 ClientHello: a new session (cookie exchange first: a ClientHello
//!   without a valid cookie gets a HelloVerifyRequest and its session is dropped again).
//!
//! A session's peer address follows the client: whenever a datagram from a different address
//! yields authenticated application data, replies go to the new address ("peer moved").

use crate::ffi::{self, Codes, Conf, ConfParams, Sess};
use crate::util::{addr_bytes, hex};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
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
const CT_TLS12_CID: u8 = 25;
const HS_CLIENT_HELLO: u8 = 1;
const DTLS_HEADER: usize = 13;
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
    records: u64,
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

pub fn run(o: Opts) -> anyhow::Result<()> {
    // Single-threaded: hold the Mbed TLS lock for the server's lifetime.
    let _guard = ffi::lock();
    ffi::install_signal_handlers()?;
    let sock = UdpSocket::bind(o.listen).map_err(|e| anyhow::anyhow!("bind {}: {e}", o.listen))?;
    sock.set_read_timeout(Some(TICK))?;
    let conf = Conf::new(&ConfParams {
        is_server: true,
        psk: &o.psk,
        identity: &o.psk_identity,
        use_cid: !o.no_cid,
        cid_len: o.cid_len,
        hs_timeout_ms: (500, 4000),
        debug_level: o.mbedtls_debug,
    })?;
    let mut srv = Server {
        codes: ffi::codes(),
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
        "listening addr={} cid={} cid_len={} node_id_len={} mbedtls={}",
        srv.sock.local_addr()?,
        if srv.o.no_cid { "off" } else { "on" },
        srv.o.cid_len,
        srv.o.node_id_len,
        ffi::version()
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
        ffi::random(&mut r).is_ok() && (u16::from_be_bytes(r) % 1000) < self.o.drop_permille as u16
    }

    fn on_datagram(&mut self, d: &[u8], from: SocketAddr) {
        if d.len() < DTLS_HEADER {
            if self.o.debug {
                log!(
                    self,
                    "debug drop short datagram from={from} len={}",
                    d.len()
                );
            }
            return;
        }
        let l = self.o.cid_len;
        let mut id = None;
        if !self.o.no_cid
            && d[0] == CT_TLS12_CID
            && d[1] == 0xfe
            && d[2] == 0xfd
            && d.len() >= 11 + l + 2
        {
            id = self.by_cid.get(&d[11..11 + l]).copied();
            if id.is_none() && self.o.debug {
                log!(
                    self,
                    "debug unknown cid={} from={from}",
                    hex(&d[11..11 + l])
                );
            }
        }
        if id.is_none() {
            id = self.by_addr.get(&from).copied();
        }
        let id = match id {
            Some(id) => id,
            None => {
                let is_client_hello = d[0] == CT_HANDSHAKE
                    && d[1] == 0xfe
                    && d[3] == 0
                    && d[4] == 0
                    && d.len() > DTLS_HEADER
                    && d[DTLS_HEADER] == HS_CLIENT_HELLO;
                if !is_client_hello {
                    if self.o.debug {
                        log!(
                            self,
                            "debug drop datagram from unknown peer={from} type={} len={}",
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
                    ffi::strerror(e)
                );
                return None;
            }
        };
        sess.set_peer(from);
        sess.set_drop_permille(0); // server-side drops are simulated in serve()
        let r = sess.set_transport_id(&addr_bytes(&from));
        if r != 0 {
            log!(
                self,
                "session refused peer={from} reason=transport_id {}",
                ffi::strerror(r)
            );
            return None;
        }
        let mut cid = Vec::new();
        if !self.o.no_cid {
            cid = self.fresh_cid()?;
            let r = sess.set_cid(true, &cid);
            if r != 0 {
                log!(
                    self,
                    "session refused peer={from} reason=set_cid {}",
                    ffi::strerror(r)
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
                records: 0,
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
            if ffi::random(&mut cid[b..]).is_err() {
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

    /// Feeds `d` (if any) to session `id` and runs Mbed TLS until it wants more input.
    fn process(&mut self, id: u64, d: Option<&[u8]>, from: SocketAddr) {
        let c = self.codes;
        let node_id = self.o.node_id;
        let debug = self.o.debug;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
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
                if r == 0 {
                    s.established = true;
                    if !s.announced {
                        s.announced = true;
                        log!(self, "session new peer={} id={id}", s.peer);
                    }
                    let s = self.sessions.get_mut(&id).unwrap();
                    let suite = s.sess.ciphersuite();
                    let ms = s.created.elapsed().as_millis();
                    let (peer, cid) = (
                        s.peer,
                        if s.cid.is_empty() {
                            "none".into()
                        } else {
                            hex(&s.cid)
                        },
                    );
                    log!(
                        self,
                        "handshake done peer={peer} id={id} cid={cid} suite={suite} ms={ms}"
                    );
                    continue;
                }
                if r == c.want_read || r == c.want_write {
                    if !s.announced {
                        // Past the cookie check (else HELLO_VERIFY_REQUIRED): a real session.
                        s.announced = true;
                        let peer = s.peer;
                        log!(self, "session new peer={peer} id={id}");
                    }
                    break;
                }
                if r == c.hello_verify_required {
                    if debug {
                        log!(self, "debug hello-verify-request sent peer={from}");
                    }
                    outcome = Some(String::new()); // stateless until the cookie comes back
                    break;
                }
                outcome = Some(format!("handshake failed: {}", ffi::strerror(r)));
                break;
            }
            let r = s.sess.read(&mut buf[..16384]);
            if r > 0 {
                let n = r as usize;
                s.records += 1;
                if from != s.peer {
                    // Authenticated data from a new address: follow the client.
                    let old = s.peer;
                    s.peer = from;
                    s.sess.set_peer(from);
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
                    outcome = Some(format!("write failed: {}", ffi::strerror(w)));
                    break;
                }
                continue;
            }
            if r == c.want_read || r == c.want_write || r == 0 {
                break;
            }
            if r == c.client_reconnect {
                // A new ClientHello with a valid cookie from this session's address (client
                // port reuse): Mbed TLS has reset the context, the ClientHello is still
                // buffered; continue as a fresh handshake on the same context, with a new CID.
                s.established = false;
                s.announced = false;
                s.created = Instant::now();
                s.records = 0;
                let peer = s.peer;
                log!(self, "session reconnect peer={peer} id={id}");
                if !self.o.no_cid {
                    let Some(cid) = self.fresh_cid() else {
                        outcome = Some("no free CID".into());
                        break;
                    };
                    let s = self.sessions.get_mut(&id).unwrap();
                    let r = s.sess.set_cid(true, &cid);
                    if r != 0 {
                        outcome = Some(format!("set_cid: {}", ffi::strerror(r)));
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
            if r == c.peer_close_notify {
                outcome = Some("close_notify".into());
            } else {
                outcome = Some(format!("read failed: {}", ffi::strerror(r)));
            }
            break;
        }
        self.buf = buf;
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
            } else if !s.established && s.sess.timer_state() == 2 {
                retransmit.push((*id, s.peer));
            }
        }
        for (id, peer) in retransmit {
            if self.o.debug {
                log!(self, "debug retransmit timer id={id} peer={peer}");
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
