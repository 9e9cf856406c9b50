//! DTLS 1.2 client sessions: handshake (requesting a CID; our own CID is zero-length), then
//! N echoed messages, optionally moving to a new UDP source port every K messages while
//! keeping the same DTLS session (what a NAT rebinding looks like to the server).
//!
//! Sessions run on `parallel` worker threads. Mbed TLS calls are serialised by the global
//! lock (ffi::lock); waiting for datagrams happens outside it (peek with a read timeout).

use crate::ffi::{self, Codes, Conf, ConfParams, Sess};
use crate::util::{hex, json_str};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
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

/// Retries of the same message after a timeout (so up to 1 + RETRIES attempts).
pub(crate) const RETRIES: u32 = 3;
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

pub fn run(o: Opts) -> anyhow::Result<bool> {
    let conf = {
        let _g = ffi::lock();
        Conf::new(&ConfParams {
            is_server: false,
            psk: &o.psk,
            identity: &o.psk_identity,
            use_cid: !o.no_cid,
            cid_len: 0,
            // Retransmission timer: initial T/4 (100..1000 ms), doubling up to 2T (1..8 s).
            hs_timeout_ms: hs_timer(o.timeout),
            debug_level: o.mbedtls_debug,
        })?
    };
    run_sessions(o, conf, session_inner)
}

/// Runs `o.sessions` sessions of `session` on `o.parallel` threads, then prints the reports
/// (also used by the DTLS 1.3 client, with its own `C` and `session`). True if all succeeded.
pub(crate) fn run_sessions<C: Send + Sync + 'static>(
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

fn hs_timer(t: Duration) -> (u32, u32) {
    let t = t.as_millis().min(60_000) as u32;
    ((t / 4).clamp(100, 1000), (t * 2).clamp(1000, 8000))
}

/// A connected UDP socket on `bind` or a fresh ephemeral port, same family as the server.
pub(crate) fn new_socket(
    server: SocketAddr,
    bind: Option<SocketAddr>,
) -> std::io::Result<UdpSocket> {
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
pub(crate) fn wait_readable(sock: &UdpSocket, d: Duration) {
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

fn session_inner(o: &Opts, conf: &Conf, rep: &mut Report) -> Result<(), String> {
    let c: Codes = ffi::codes();
    let mut sock = new_socket(o.server, o.bind).map_err(|e| format!("socket: {e}"))?;
    rep.local_ports
        .push(sock.local_addr().map(|a| a.port()).unwrap_or(0));
    let mut sess = {
        let _g = ffi::lock();
        let mut s = Sess::new(conf, sock.as_raw_fd(), true)
            .map_err(|e| format!("ssl setup: {}", ffi::strerror(e)))?;
        s.set_drop_permille(o.drop_permille);
        if !o.no_cid {
            // Request CID use; ours is zero-length (server sends to us without a CID).
            let r = s.set_cid(true, &[]);
            if r != 0 {
                return Err(format!("set_cid: {}", ffi::strerror(r)));
            }
        }
        s
    };

    // Handshake, bounded in time (Mbed TLS retransmits on its own timer).
    let start = Instant::now();
    let hs_deadline = start + (o.timeout * 5).max(Duration::from_secs(10));
    loop {
        let r = {
            let _g = ffi::lock();
            sess.handshake()
        };
        if r == 0 {
            break;
        }
        if r != c.want_read && r != c.want_write {
            return Err(format!("handshake failed: {}", ffi::strerror(r)));
        }
        let now = Instant::now();
        if now >= hs_deadline {
            return Err("handshake timeout".into());
        }
        wait_readable(&sock, (hs_deadline - now).min(SLICE));
    }
    rep.handshake_ms = start.elapsed().as_millis();
    {
        let _g = ffi::lock();
        rep.server_cid = sess.peer_cid();
        rep.suite = sess.ciphersuite();
    }
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
                {
                    let _g = ffi::lock();
                    sess.set_fd(ns.as_raw_fd());
                }
                sock = ns; // old socket closed here
                rep.rebinds += 1;
                rep.local_ports
                    .push(sock.local_addr().map(|a| a.port()).unwrap_or(0));
            }
        }
        {
            let _g = ffi::lock();
            let _ = ffi::random(&mut tag);
        }
        let msg = message(rep.session, m, &tag, o.payload_len);
        let mut done = false;
        'attempts: for attempt in 0..=RETRIES {
            if attempt > 0 {
                rep.retries += 1;
            }
            // Write (bounded retries on WANT_WRITE).
            let mut written = false;
            for _ in 0..100 {
                let w = {
                    let _g = ffi::lock();
                    sess.write(&msg)
                };
                if w >= 0 {
                    written = true;
                    break;
                }
                if w != c.want_write && w != c.want_read {
                    return fail_rest(rep, o, m, format!("write failed: {}", ffi::strerror(w)));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if !written {
                continue;
            }
            let deadline = Instant::now() + o.timeout;
            loop {
                let r = {
                    let _g = ffi::lock();
                    sess.read(&mut buf)
                };
                if r > 0 {
                    let data = &buf[..r as usize];
                    match parse_echo(data) {
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
                if r == c.peer_close_notify {
                    return fail_rest(rep, o, m, "server sent close_notify".into());
                }
                if r != c.want_read && r != c.want_write && r != 0 && r != c.timeout {
                    return fail_rest(rep, o, m, format!("read failed: {}", ffi::strerror(r)));
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
                return fail_rest(
                    rep,
                    o,
                    m,
                    format!("gave up after {} failed messages", rep.failed),
                );
            }
        }
    }
    let _g = ffi::lock();
    if !o.no_close_notify {
        sess.close_notify();
    }
    drop(sess);
    Ok(())
}

/// Aborts the session at message `m` (run_session counts it and the rest as failed).
fn fail_rest(_rep: &mut Report, _o: &Opts, _m: u32, e: String) -> Result<(), String> {
    Err(e)
}

/// Message `m` of `session`: `s<session>-m<m>-<tag hex>`, padded with dots to `payload_len`.
pub(crate) fn message(session: u32, m: u32, tag: &[u8], payload_len: usize) -> Vec<u8> {
    let mut msg = format!("s{session}-m{m}-{}", hex(tag)).into_bytes();
    while msg.len() < payload_len {
        msg.push(b'.');
    }
    msg
}

/// `node=<id> <payload>` -> (id, payload)
pub(crate) fn parse_echo(d: &[u8]) -> Option<(String, &[u8])> {
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
