//! DTLS 1.3 client sessions (wolfSSL): the counterpart of client.rs, with the same options,
//! messages, echo check and report (client.rs runs the worker threads and prints the report).
//!
//! Handshake requesting a CID (our own CID is empty, so the server's records carry none),
//! then N echoed messages, optionally moving to a new UDP source port every K messages while
//! keeping the same DTLS session. wolfSSL needs no global lock: each session's WOLFSSL object
//! lives on one worker thread.

use crate::client::{
    message, new_socket, parse_echo, run_sessions, wait_readable, Opts, Report, RETRIES, SLICE,
};
use crate::wolf::{self, Conf, Sess};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

macro_rules! errln {
    ($($arg:tt)*) => {{ let _ = writeln!(std::io::stderr(), $($arg)*); }};
}

pub fn run(o: Opts) -> anyhow::Result<bool> {
    wolf::global_init()?;
    let conf = Conf::new(false, &o.psk, &o.psk_identity)?;
    run_sessions(o, conf, session)
}

fn session(o: &Opts, conf: &Conf, rep: &mut Report) -> Result<(), String> {
    let c = wolf::codes();
    let mut sock = new_socket(o.server, o.bind).map_err(|e| format!("socket: {e}"))?;
    rep.local_ports
        .push(sock.local_addr().map(|a| a.port()).unwrap_or(0));
    let mut sess = Sess::new(conf, sock.as_raw_fd(), true)
        .map_err(|e| format!("ssl setup: {}", wolf::strerror(e)))?;
    sess.set_drop_permille(o.drop_permille);
    if !o.no_cid {
        // Request CID use; ours is zero-length (the server sends to us without a CID).
        let r = sess.use_cid(&[]);
        if r != 0 {
            return Err(format!("use_cid: {}", wolf::strerror(r)));
        }
    }

    // Handshake, bounded in time. With non-blocking I/O wolfSSL retransmits only when told
    // that its timer ran out (wolfSSL_dtls_got_timeout); the timer restarts when a datagram
    // arrives. wolfSSL's timer counts whole seconds (1 s, doubling; it gives up past 64 s),
    // so a handshake that loses a few datagrams takes seconds: allow 30 s (the server drops
    // an unfinished handshake after 30 s too).
    let start = Instant::now();
    let hs_deadline = start + (o.timeout * 5).max(Duration::from_secs(30));
    let mut rx = 0;
    let mut timer = start;
    loop {
        let r = sess.handshake();
        if r == 0 {
            break;
        }
        if r != c.want_read && r != c.want_write {
            return Err(format!("handshake failed: {}", wolf::strerror(r)));
        }
        let now = Instant::now();
        if now >= hs_deadline {
            return Err("handshake timeout".into());
        }
        let n = sess.stats()[1];
        if n != rx || timer == start {
            rx = n;
            timer = now + sess.timeout();
        } else if now >= timer {
            let r = sess.got_timeout();
            if r != 0 && r != c.want_read && r != c.want_write {
                return Err(format!("handshake retransmission: {}", wolf::strerror(r)));
            }
            timer = now + sess.timeout();
            continue;
        }
        wait_readable(&sock, (hs_deadline - now).min(timer - now).min(SLICE));
    }
    rep.handshake_ms = start.elapsed().as_millis();
    rep.server_cid = sess.tx_cid();
    rep.suite = sess.ciphersuite();
    if o.debug {
        errln!(
            "session {} handshake done cid={} suite={}",
            rep.session,
            rep.server_cid
                .as_deref()
                .map(crate::util::hex)
                .unwrap_or_default(),
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
        wolf::random(&mut tag).map_err(|e| e.to_string())?;
        let msg = message(rep.session, m, &tag, o.payload_len);
        let mut done = false;
        'attempts: for attempt in 0..=RETRIES {
            if attempt > 0 {
                rep.retries += 1;
            }
            // Write (bounded retries on WANT_WRITE).
            let mut written = false;
            for _ in 0..100 {
                let w = sess.write(&msg);
                if w >= 0 {
                    written = true;
                    break;
                }
                if w != c.want_write && w != c.want_read {
                    return Err(format!("write failed: {}", wolf::strerror(w)));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if !written {
                continue;
            }
            let deadline = Instant::now() + o.timeout;
            loop {
                let r = sess.read(&mut buf);
                if r > 0 {
                    match parse_echo(&buf[..r as usize]) {
                        Some((node, payload)) if payload == msg.as_slice() => {
                            rep.nodes.insert(node);
                            done = true;
                            break 'attempts;
                        }
                        Some(_) if o.debug => {
                            errln!("session {} stale/duplicate echo ignored", rep.session)
                        }
                        None if o.debug => {
                            errln!("session {} unparsable echo ignored", rep.session)
                        }
                        _ => {}
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    continue;
                }
                if r == c.closed {
                    return Err("server sent close_notify".into());
                }
                if r != c.want_read && r != c.want_write {
                    return Err(format!("read failed: {}", wolf::strerror(r)));
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
        }
    }
    if !o.no_close_notify {
        sess.close_notify();
    }
    Ok(())
}
