//! DTLS client sessions (1.2 and 1.3): handshake (requesting a CID; our own CID is zero-length), then
//! N echoed messages, optionally moving to a new UDP source port every K messages while
//! keeping the same DTLS session (what a NAT rebinding looks like to the server).
//!
//! Sessions run on `parallel` worker threads; the DTLS library sits behind [`ClientSess`]
//! (ffi.rs: Mbed TLS, DTLS 1.2; wolf.rs: wolfSSL, DTLS 1.3). Waiting for datagrams happens
//! outside the library (peek with a read timeout), so Mbed TLS's global lock is not held then.

use crate::util::{hex, json_str};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Opts {
    pub server: SocketAddr,
    pub sessions: u32,
    pub messages: u32,
    pub rebind_every: Option<u32>,
    /// Pause before each message after the first (pacing, e.g. for a live demo).
    pub interval: Duration,
    pub timeout: Duration,
    pub parallel: u32,
    pub payload_len: usize,
    pub json: bool,
    pub psk: Vec<u8>,
    pub psk_identity: Vec<u8>,
    pub no_cid: bool,
    pub debug: bool,
    pub mbedtls_debug: i32,
    pub drop_permille: u32,
    /// Local address for each session's first socket (default: unspecified, port 0).
    pub bind: Option<SocketAddr>,
    /// Leave without close_notify (the server keeps the session until it expires).
    pub no_close_notify: bool,
    /// End a session once this many of its messages have failed (the rest count as failed):
    /// a session that lost its server does not retry its way through every message.
    pub give_up_after: Option<u32>,
}

/// Like println!/eprintln!, but a closed stdout/stderr is not a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{ let _ = writeln!(std::io::stdout(), $($arg)*); }};
}
macro_rules! errln {
    ($($arg:tt)*) => {{ let _ = writeln!(std::io::stderr(), $($arg)*); }};
}

/// The error a handshake ends with when it ran out of time (the library's timer or ours).
pub(crate) const HANDSHAKE_TIMEOUT: &str = "handshake timeout";

/// Retries of the same message after a timeout (so up to 1 + RETRIES attempts).
const RETRIES: u32 = 3;
/// Longest single wait slice, so Mbed TLS retransmission timers get serviced.
pub(crate) const SLICE: Duration = Duration::from_millis(25);

#[derive(Default, Clone)]
pub struct Report {
    pub session: u32,
    pub ok: u32,
    pub failed: u32,
    pub retries: u32,
    pub rebinds: u32,
    pub nodes: BTreeSet<String>,
    pub server_cid: Option<Vec<u8>>,
    pub handshake_ms: u128,
    pub suite: String,
    pub local_ports: Vec<u16>,
    pub error: Option<String>,
}

impl Report {
    fn success(&self, messages: u32) -> bool {
        self.error.is_none()
            && self.failed == 0
            && self.ok == messages
            && self.nodes.len() <= 1
            && (messages == 0 || self.nodes.len() == 1)
    }
    fn node(&self) -> String {
        match self.nodes.len() {
            0 => "-".into(),
            1 => self.nodes.iter().next().unwrap().clone(),
            _ => self.nodes.iter().cloned().collect::<Vec<_>>().join("+"),
        }
    }
    fn status(&self, messages: u32) -> String {
        if self.success(messages) {
            "ok".into()
        } else if let Some(e) = &self.error {
            e.clone()
        } else if self.nodes.len() > 1 {
            "answered by more than one node".into()
        } else {
            format!("{} message(s) failed", self.failed)
        }
    }
    fn cid_hex(&self) -> String {
        match &self.server_cid {
            Some(c) => hex(c),
            None => String::new(),
        }
    }
    fn json(&self, messages: u32) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| json_str(n)).collect();
        let node = if self.nodes.len() == 1 {
            json_str(&self.node())
        } else {
            "null".into()
        };
        let cid = match &self.server_cid {
            Some(c) => json_str(&hex(c)),
            None => "null".into(),
        };
        let ports: Vec<String> = self.local_ports.iter().map(|p| p.to_string()).collect();
        format!(
            "{{\"session\":{},\"status\":{},\"ok\":{},\"failed\":{},\"retries\":{},\"rebinds\":{},\
             \"node\":{},\"nodes\":[{}],\"server_cid\":{},\"suite\":{},\"handshake_ms\":{},\
             \"local_ports\":[{}],\"error\":{}}}",
            self.session,
            json_str(if self.success(messages) {
                "ok"
            } else {
                "failed"
            }),
            self.ok,
            self.failed,
            self.retries,
            self.rebinds,
            node,
            nodes.join(","),
            cid,
            json_str(&self.suite),
            self.handshake_ms,
            ports.join(","),
            match &self.error {
                Some(e) => json_str(e),
                None => "null".into(),
            }
        )
    }
}

/// What the session loop below needs from one DTLS library (Mbed TLS for 1.2 in ffi.rs,
/// wolfSSL for 1.3 in wolf.rs). Errors are the session's error text, e.g. `read failed: …`.
pub(crate) trait ClientSess: Sized {
    /// Shared configuration (PSK, CID use), built once, used by every worker thread.
    type Conf: Send + Sync + 'static;
    /// Lower bound of the handshake deadline (the deadline is max(5 × --timeout-ms, this)).
    const MIN_HANDSHAKE: Duration;
    fn conf(o: &Opts) -> anyhow::Result<Self::Conf>;
    /// A session on socket `fd`, with --drop-permille set and a CID requested unless --no-cid.
    fn open(conf: &Self::Conf, fd: RawFd, o: &Opts) -> Result<Self, String>;
    /// One handshake step: Ok(true) once done, Ok(false) while waiting for the server.
    fn handshake(&mut self) -> Result<bool, String>;
    /// While the handshake waits at `now`: the longest wait before the next step, or None
    /// after a retransmission (step again at once).
    fn handshake_wait(&mut self, now: Instant) -> Result<Option<Duration>, String>;
    /// The server's CID and the cipher suite, after the handshake.
    fn negotiated(&mut self) -> (Option<Vec<u8>>, String);
    fn set_fd(&mut self, fd: RawFd);
    fn random(&mut self, buf: &mut [u8]) -> Result<(), String>;
    /// Ok(true) if written, Ok(false) if it has to be tried again.
    fn write(&mut self, msg: &[u8]) -> Result<bool, String>;
    /// Ok(Some(n)): n bytes of application data; Ok(None): nothing yet.
    fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String>;
    /// Ends the session (with close_notify if `notify`).
    fn finish(self, notify: bool);
}

/// Runs the client on backend `S`. True if all sessions succeeded.
pub(crate) fn run<S: ClientSess>(o: Opts) -> anyhow::Result<bool> {
    let conf = S::conf(&o)?;
    run_sessions(o, conf, session::<S>)
}

/// Runs `o.sessions` sessions of `session` on `o.parallel` threads, then prints the reports.
/// True if all succeeded.
fn run_sessions<C: Send + Sync + 'static>(
    o: Opts,
    conf: C,
    session: fn(&Opts, &C, &mut Report) -> Result<(), String>,
) -> anyhow::Result<bool> {
    let o = Arc::new(o);
    let conf = Arc::new(conf);
    let next = Arc::new(AtomicU32::new(0));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let workers = o.parallel.min(o.sessions).max(1);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (o, conf, next, reports) = (o.clone(), conf.clone(), next.clone(), reports.clone());
        handles.push(std::thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= o.sessions {
                break;
            }
            let r = run_session(&o, &*conf, i, session);
            if o.debug {
                errln!("session {i} finished: {}", r.status(o.messages));
            }
            reports.lock().unwrap().push(r);
        }));
    }
    for h in handles {
        if h.join().is_err() {
            anyhow::bail!("a session thread panicked");
        }
    }
    let mut reports = std::mem::take(&mut *reports.lock().unwrap());
    reports.sort_by_key(|r| r.session);
    Ok(print_reports(&o, &reports))
}

fn print_reports(o: &Opts, reports: &[Report]) -> bool {
    let n = o.messages;
    let ok_sessions = reports.iter().filter(|r| r.success(n)).count();
    let failed_sessions = reports.len() - ok_sessions;
    let rebinds: u32 = reports.iter().map(|r| r.rebinds).sum();
    let msgs_ok: u64 = reports.iter().map(|r| r.ok as u64).sum();
    let msgs_failed: u64 = reports.iter().map(|r| r.failed as u64).sum();
    let retries: u64 = reports.iter().map(|r| r.retries as u64).sum();
    let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
    for r in reports.iter().filter(|r| r.nodes.len() == 1) {
        *per_node.entry(r.node()).or_default() += 1;
    }
    if o.json {
        for r in reports {
            outln!("{}", r.json(n));
        }
        let pn: Vec<String> = per_node
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_str(k)))
            .collect();
        outln!(
            "{{\"summary\":{{\"sessions\":{},\"ok\":{ok_sessions},\"failed\":{failed_sessions},\
             \"rebinds\":{rebinds},\"messages_ok\":{msgs_ok},\"messages_failed\":{msgs_failed},\
             \"retries\":{retries},\"per_node\":{{{}}}}}}}",
            reports.len(),
            pn.join(",")
        );
    } else {
        outln!(
            "{:>7}  {:<6} {:>9} {:>6} {:>7} {:<18} {:>6}  status",
            "session",
            "node",
            "ok/total",
            "failed",
            "rebinds",
            "server_cid",
            "hs_ms"
        );
        for r in reports {
            outln!(
                "{:>7}  {:<6} {:>9} {:>6} {:>7} {:<18} {:>6}  {}",
                r.session,
                r.node(),
                format!("{}/{}", r.ok, n),
                r.failed,
                r.rebinds,
                if r.server_cid.is_some() {
                    r.cid_hex()
                } else {
                    "(no cid)".into()
                },
                r.handshake_ms,
                r.status(n)
            );
        }
        let pn: Vec<String> = per_node.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outln!(
            "summary: sessions={} ok={ok_sessions} failed={failed_sessions} rebinds={rebinds} \
             messages_ok={msgs_ok} messages_failed={msgs_failed} retries={retries} per_node: {}",
            reports.len(),
            if pn.is_empty() {
                "-".into()
            } else {
                pn.join(" ")
            }
        );
    }
    failed_sessions == 0
}

/// A connected UDP socket on `bind` or a fresh ephemeral port, same family as the server.
fn new_socket(server: SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = bind.unwrap_or_else(|| {
        if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        }
    });
    let s = UdpSocket::bind(bind)?;
    s.connect(server)?;
    Ok(s)
}

/// Blocks (outside the Mbed TLS lock) until a datagram is readable or `d` passed.
fn wait_readable(sock: &UdpSocket, d: Duration) {
    let d = d.max(Duration::from_millis(1));
    if sock.set_read_timeout(Some(d)).is_err() {
        std::thread::sleep(d);
        return;
    }
    let mut b = [0u8; 1];
    match sock.peek(&mut b) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Err(e) if e.kind() == ErrorKind::Interrupted => {}
        // e.g. ECONNREFUSED (ICMP port unreachable): reported once, then cleared; don't spin.
        Err(_) => std::thread::sleep(d.min(SLICE)),
    }
}

fn run_session<C>(
    o: &Opts,
    conf: &C,
    idx: u32,
    session: fn(&Opts, &C, &mut Report) -> Result<(), String>,
) -> Report {
    let mut rep = Report {
        session: idx,
        ..Default::default()
    };
    if let Err(e) = session(o, conf, &mut rep) {
        rep.error = Some(e);
        // Messages never attempted (e.g. after a failed handshake) count as failed.
        rep.failed = o.messages - rep.ok;
    }
    rep
}

fn session<S: ClientSess>(o: &Opts, conf: &S::Conf, rep: &mut Report) -> Result<(), String> {
    let mut sock = new_socket(o.server, o.bind).map_err(|e| format!("socket: {e}"))?;
    rep.local_ports
        .push(sock.local_addr().map(|a| a.port()).unwrap_or(0));
    let mut sess = S::open(conf, sock.as_raw_fd(), o)?;

    // Handshake, bounded in time. A library that gives up on a flight (its retransmission
    // timer at its maximum) starts over from a new port while time is left, as real clients
    // retry a handshake.
    let start = Instant::now();
    let hs_deadline = start + (o.timeout * 5).max(S::MIN_HANDSHAKE);
    loop {
        match sess.handshake() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) if e.starts_with(HANDSHAKE_TIMEOUT) && o.bind.is_none() => {
                if Instant::now() >= hs_deadline {
                    return Err(e);
                }
                drop(sess);
                sock = new_socket(o.server, o.bind).map_err(|e| format!("socket: {e}"))?;
                rep.local_ports
                    .push(sock.local_addr().map(|a| a.port()).unwrap_or(0));
                sess = S::open(conf, sock.as_raw_fd(), o)?;
                continue;
            }
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if now >= hs_deadline {
            return Err(HANDSHAKE_TIMEOUT.into());
        }
        if let Some(wait) = sess.handshake_wait(now)? {
            wait_readable(&sock, (hs_deadline - now).min(wait).min(SLICE));
        }
    }
    rep.handshake_ms = start.elapsed().as_millis();
    (rep.server_cid, rep.suite) = sess.negotiated();
    if o.debug {
        errln!(
            "session {} handshake done cid={} suite={}",
            rep.session,
            rep.cid_hex(),
            rep.suite
        );
    }

    let mut tag = [0u8; 4];
    let mut buf = vec![0u8; 16384];
    for m in 0..o.messages {
        if m > 0 && !o.interval.is_zero() {
            std::thread::sleep(o.interval);
        }
        if let Some(k) = o.rebind_every {
            if m > 0 && m % k == 0 {
                // New source port, same DTLS session: a NAT rebinding as the server sees it.
                let ns = new_socket(o.server, None).map_err(|e| format!("rebind socket: {e}"))?;
                sess.set_fd(ns.as_raw_fd());
                sock = ns; // old socket closed here
                rep.rebinds += 1;
                rep.local_ports
                    .push(sock.local_addr().map(|a| a.port()).unwrap_or(0));
            }
        }
        sess.random(&mut tag)?;
        let msg = message(rep.session, m, &tag, o.payload_len);
        let mut done = false;
        'attempts: for attempt in 0..=RETRIES {
            if attempt > 0 {
                rep.retries += 1;
            }
            // Write (bounded retries on WANT_WRITE).
            let mut written = false;
            for _ in 0..100 {
                if sess.write(&msg)? {
                    written = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if !written {
                continue;
            }
            let deadline = Instant::now() + o.timeout;
            loop {
                if let Some(n) = sess.read(&mut buf)? {
                    match parse_echo(&buf[..n]) {
                        Some((node, payload)) if payload == msg.as_slice() => {
                            rep.nodes.insert(node);
                            done = true;
                            break 'attempts;
                        }
                        Some(_) => {
                            if o.debug {
                                errln!("session {} stale/duplicate echo ignored", rep.session);
                            }
                        }
                        None => {
                            if o.debug {
                                errln!("session {} unparsable echo ignored", rep.session);
                            }
                        }
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    continue;
                }
                let now = Instant::now();
                if now >= deadline {
                    if o.debug {
                        errln!(
                            "session {} message {} attempt {} timed out",
                            rep.session,
                            m,
                            attempt
                        );
                    }
                    break;
                }
                wait_readable(&sock, (deadline - now).min(SLICE));
            }
        }
        if done {
            rep.ok += 1;
        } else {
            rep.failed += 1;
            if o.give_up_after.is_some_and(|k| rep.failed >= k) {
                return Err(format!("gave up after {} failed messages", rep.failed));
            }
        }
    }
    sess.finish(!o.no_close_notify);
    Ok(())
}

/// Message `m` of `session`: `s<session>-m<m>-<tag hex>`, padded with dots to `payload_len`.
fn message(session: u32, m: u32, tag: &[u8], payload_len: usize) -> Vec<u8> {
    let mut msg = format!("s{session}-m{m}-{}", hex(tag)).into_bytes();
    while msg.len() < payload_len {
        msg.push(b'.');
    }
    msg
}

/// `node=<id> <payload>` -> (id, payload)
fn parse_echo(d: &[u8]) -> Option<(String, &[u8])> {
    let rest = d.strip_prefix(b"node=")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let id = std::str::from_utf8(&rest[..sp]).ok()?;
    if id.is_empty() || id.len() > 32 {
        return None;
    }
    Some((id.to_string(), &rest[sp + 1..]))
}

#[cfg(test)]
mod tests {
    use super::parse_echo;
    #[test]
    fn echo_parsing() {
        assert_eq!(
            parse_echo(b"node=7 hello"),
            Some(("7".to_string(), &b"hello"[..]))
        );
        assert_eq!(parse_echo(b"node=7 "), Some(("7".to_string(), &b""[..])));
        assert_eq!(parse_echo(b"node= x"), None);
        assert_eq!(parse_echo(b"nod=7 x"), None);
        assert_eq!(parse_echo(b"node=7"), None);
    }
}
