//! End-to-end tests of the DTLS 1.3 backend (`--dtls 1.3`, wolfSSL) on loopback: a real
//! server process, a real client process, and between them a UDP relay that records every
//! datagram, so the wire format is checked by code that belongs to neither peer.
//! Every loop is bounded; every process and relay started here is stopped.

mod support;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::{assert_client_ok, client, field, session_lines, summary, Server};

/// RFC 8446 §4.1.3: a ServerHello whose random is SHA-256("HelloRetryRequest") is a
/// HelloRetryRequest.
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
/// DTLSPlaintext header (13 bytes), then the DTLS handshake header (12 bytes: type, length,
/// message_seq, fragment_offset, fragment_length), then legacy_version (2) and random (32).
const HS_TYPE: usize = 13;
const HELLO_RANDOM: usize = 13 + 12 + 2;

#[derive(Clone)]
struct Seen {
    /// The client's address as the relay saw it.
    client: SocketAddr,
    to_server: bool,
    data: Vec<u8>,
}

/// A UDP relay on loopback between client and server. It records every datagram in both
/// directions, and gives each client address its own upstream socket (as a NAT does), so a
/// client that moves to a new source port reaches the server from a new port too.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Which server datagrams the relay loses (records, does not forward).
#[derive(Clone, Copy)]
enum Lose {
    Nothing,
    /// The server's first datagram.
    First,
    /// The server's first datagram after the client's first record starting with this byte.
    FirstAfterClient(u8),
}

impl Relay {
    fn start(ip: &str, server: SocketAddr) -> Relay {
        Relay::start_losing(ip, server, Lose::Nothing)
    }

    fn start_losing(ip: &str, server: SocketAddr, lose: Lose) -> Relay {
        let front = UdpSocket::bind((ip, 0)).expect("relay bind");
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2, ip) = (seen.clone(), stop.clone(), ip.to_string());
        let thread = std::thread::spawn(move || {
            let mut ups: Vec<(SocketAddr, UdpSocket)> = Vec::new();
            let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            // Armed: the next server datagram is lost.
            let mut armed = matches!(lose, Lose::First);
            let mut done = false;
            // Bounded even if the test forgets to stop it.
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut idle = true;
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    let data = buf[..n].to_vec();
                    if let Lose::FirstAfterClient(b) = lose {
                        if !done && data.first() == Some(&b) {
                            armed = true;
                        }
                    }
                    let i = *by_client.entry(from).or_insert_with(|| {
                        let up = UdpSocket::bind((ip.as_str(), 0)).expect("relay upstream");
                        up.connect(server).unwrap();
                        up.set_nonblocking(true).unwrap();
                        ups.push((from, up));
                        ups.len() - 1
                    });
                    let _ = ups[i].1.send(&data);
                    seen2.lock().unwrap().push(Seen {
                        client: from,
                        to_server: true,
                        data,
                    });
                }
                for (client, up) in &ups {
                    while let Ok(n) = up.recv(&mut buf) {
                        idle = false;
                        let data = buf[..n].to_vec();
                        if armed && !done {
                            armed = false;
                            done = true;
                        } else {
                            let _ = front.send_to(&data, client);
                        }
                        seen2.lock().unwrap().push(Seen {
                            client: *client,
                            to_server: false,
                            data,
                        });
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Relay {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the relay and returns everything it saw, in order.
    fn finish(&mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("relay thread");
        }
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `cidlb-testpeer client --dtls 1.3 --server <server> <args>`, within `limit`.
fn client13(server: &str, args: &[&str], limit: Duration) -> support::Out {
    let mut a = vec!["--dtls", "1.3", "--server", server];
    a.extend_from_slice(args);
    client(&a, limit)
}

/// RFC 9147 §4: unified header `0 0 1 C S L E E`.
fn is_unified(b: u8) -> bool {
    b & 0xe0 == 0x20
}
fn has_cid(b: u8) -> bool {
    is_unified(b) && b & 0x10 != 0
}
fn is_plaintext_handshake(d: &[u8]) -> bool {
    d.len() > HS_TYPE && d[0] == 22 && d[1..3] == [0xfe, 0xfd] && d[3..5] == [0, 0]
}

fn ports(session: &str) -> Vec<u16> {
    let s = session;
    let i = s.find("\"local_ports\":[").expect("local_ports") + 15;
    s[i..i + s[i..].find(']').unwrap()]
        .split(',')
        .map(|p| p.parse().expect("port"))
        .collect()
}

/// What one session looked like on the wire.
#[derive(Default)]
struct Wire {
    client_hellos: Vec<usize>,
    server_hellos: Vec<usize>,
    first_bytes: Vec<u8>,
    epoch2_cid: usize,
    epoch3_cid: usize,
}

/// Checks one session's datagrams: ClientHello, HelloRetryRequest, ClientHello again
/// (plaintext, epoch 0), then only unified-header records with C set and the server's CID
/// at offset 1, whatever source port they come from. The server's records carry no CID
/// (the client's is empty).
///
/// A session is found by its ports, but the kernel may give a port that one session left
/// when it rebound to a later session (seen once in about fifteen runs): records carrying
/// another session's CID (`others`) are that session's, and so is anything on the port
/// before this session's first ClientHello.
fn check_wire(
    seen: &[Seen],
    ports: &[u16],
    cid: &[u8],
    others: &[Vec<u8>],
    messages: u32,
) -> Wire {
    let another_sessions = |s: &Seen| {
        s.to_server
            && is_unified(s.data[0])
            && has_cid(s.data[0])
            && others
                .iter()
                .any(|o| s.data.get(1..1 + o.len()) == Some(&o[..]))
    };
    let mine: Vec<&Seen> = seen
        .iter()
        .filter(|s| ports.contains(&s.client.port()) && !another_sessions(s))
        .skip_while(|s| {
            !(s.to_server
                && s.client.port() == ports[0]
                && is_plaintext_handshake(&s.data)
                && s.data[HS_TYPE] == 1)
        })
        .collect();
    let mut w = Wire::default();
    let first = mine.first().expect("no datagram of this session");
    assert!(
        first.to_server && is_plaintext_handshake(&first.data) && first.data[HS_TYPE] == 1,
        "the session starts with a ClientHello: {}",
        lb_lab::hex(&first.data)
    );
    assert_eq!(first.client.port(), ports[0]);
    let reply = mine.iter().find(|s| !s.to_server).expect("server answered");
    assert!(
        is_plaintext_handshake(&reply.data)
            && reply.data[HS_TYPE] == 2
            && reply.data.get(HELLO_RANDOM..HELLO_RANDOM + 32) == Some(&HRR_RANDOM[..]),
        "the server answers the first ClientHello with a HelloRetryRequest: {}",
        lb_lab::hex(&reply.data)
    );
    let mut handshake_over = false;
    for s in &mine {
        let d = &s.data;
        if !s.to_server {
            if is_plaintext_handshake(d) && d[HS_TYPE] == 2 {
                w.server_hellos.push(d.len());
            } else if handshake_over {
                assert!(
                    is_unified(d[0]) && !has_cid(d[0]),
                    "server records after the hellos: unified header without CID: {}",
                    lb_lab::hex(d)
                );
            }
            continue;
        }
        if !handshake_over && is_plaintext_handshake(d) {
            // The relay records each client port on its own thread, so a plaintext record from
            // a later port can be recorded before the first port's unified records (seen once in
            // a fresh-clone run); only the first port's hellos are counted.
            if s.client.port() == ports[0] {
                w.client_hellos.push(d.len());
            }
            continue;
        }
        handshake_over = true;
        if !w.first_bytes.contains(&d[0]) {
            w.first_bytes.push(d[0]);
        }
        assert!(
            d[0] == 0x3e || d[0] == 0x3f,
            "client record after the hellos: 0x3e (epoch 2) or 0x3f (epoch 3), got {:02x} \
             from port {}: {}",
            d[0],
            s.client.port(),
            lb_lab::hex(d)
        );
        assert_eq!(
            d.get(1..1 + cid.len()),
            Some(cid),
            "the server's CID at offset 1: {}",
            lb_lab::hex(d)
        );
        if d[0] == 0x3e {
            assert_eq!(
                s.client.port(),
                ports[0],
                "epoch 2 is the final handshake flight"
            );
            w.epoch2_cid += 1;
        } else {
            w.epoch3_cid += 1;
        }
    }
    assert!(
        w.client_hellos.len() >= 2,
        "ClientHello, then ClientHello with cookie"
    );
    assert!(
        w.epoch2_cid >= 1,
        "the final flight (epoch 2) carries the CID"
    );
    assert!(
        w.epoch3_cid >= messages as usize,
        "every message is an epoch 3 CID record: {} < {messages}",
        w.epoch3_cid
    );
    // Every source port the client moved to carried CID records.
    for p in &ports[1..] {
        assert!(
            mine.iter()
                .any(|s| s.to_server && s.client.port() == *p && s.data[0] == 0x3f),
            "no epoch 3 CID record from port {p}"
        );
    }
    w
}

/// A session line's server CID as bytes.
fn session_cid(s: &str) -> Vec<u8> {
    let hex = field(s, "server_cid").expect("cid");
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// 3 sessions x 44 messages, rebinding every 4 (10 rebinds each), through the relay.
fn dtls13_rebind_case(ip: &str, node: u64) {
    const SESSIONS: usize = 3;
    const MESSAGES: u32 = 44;
    let mut srv = Server::start(ip, node, &["--dtls", "1.3"]).expect("server start");
    let mut relay = Relay::start(ip, srv.addr);
    let addr = relay.addr.to_string();
    let out = client13(
        &addr,
        &[
            "--sessions",
            &SESSIONS.to_string(),
            "--messages",
            &MESSAGES.to_string(),
            "--rebind-every",
            "4",
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert_client_ok(&out, &srv);
    let seen = relay.finish();
    let sessions = session_lines(&out.stdout);
    assert_eq!(sessions.len(), SESSIONS, "{}", out.stdout);
    let node_s = node.to_string();
    for s in &sessions {
        assert_eq!(field(s, "status"), Some("ok"), "{s}");
        assert_eq!(field(s, "node"), Some(node_s.as_str()), "{s}");
        assert_eq!(field(s, "ok"), Some("44"), "{s}");
        assert_eq!(field(s, "rebinds"), Some("10"), "{s}");
        assert!(field(s, "suite").unwrap().starts_with("TLS13-"), "{s}");
        let cid = field(s, "server_cid").expect("cid");
        assert_eq!(cid.len(), 12, "default CID length 6: {s}");
        assert!(
            cid.starts_with(&format!("{node:02x}")),
            "CID starts with node id: {s}"
        );
        let ports = ports(s);
        assert_eq!(ports.len(), 11, "{s}");
        let cid = session_cid(s);
        let others: Vec<Vec<u8>> = sessions
            .iter()
            .map(|o| session_cid(o))
            .filter(|o| *o != cid)
            .collect();
        let w = check_wire(&seen, &ports, &cid, &others, MESSAGES);
        eprintln!(
            "wire ({ip}): ClientHello datagrams {:?} bytes, server hello datagrams {:?} bytes, \
             client record first bytes after the hellos {:02x?}, epoch 2 CID records {}, \
             epoch 3 CID records {}",
            w.client_hellos, w.server_hellos, w.first_bytes, w.epoch2_cid, w.epoch3_cid
        );
    }
    let sum = summary(&out.stdout);
    assert_eq!(field(sum, "ok"), Some("3"), "{sum}");
    assert_eq!(field(sum, "failed"), Some("0"), "{sum}");
    assert_eq!(field(sum, "rebinds"), Some("30"), "{sum}");
    assert!(
        sum.contains(&format!("\"per_node\":{{\"{node}\":3}}")),
        "{sum}"
    );

    // The server followed every rebinding and ended every session on close_notify.
    let deadline = Instant::now() + Duration::from_secs(3);
    while srv.count("reason=close_notify") < SESSIONS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(srv.count("peer moved"), 30, "{:#?}", srv.log());
    assert_eq!(srv.count("handshake done"), SESSIONS, "{:#?}", srv.log());
    assert_eq!(
        srv.count("reason=close_notify"),
        SESSIONS,
        "{:#?}",
        srv.log()
    );
    assert!(srv.log()[0].contains("dtls=1.3"), "{:?}", srv.log());
    let st = srv.stop().expect("server exits on SIGTERM");
    assert!(st.success(), "server exit status {st:?}");
}

#[test]
fn dtls13_cid_rebinding_ipv4() {
    dtls13_rebind_case("127.0.0.1", 7);
}

#[test]
fn dtls13_cid_rebinding_ipv6() {
    // No IPv6 on loopback is a failure here, not a skip.
    dtls13_rebind_case("::1", 200);
}

#[test]
fn dtls13_custom_cid_layout() {
    // A 2-byte node id in an 8-byte CID.
    let mut srv = Server::start(
        "127.0.0.1",
        0x1234,
        &[
            "--dtls",
            "1.3",
            "--node-id-length",
            "2",
            "--cid-length",
            "8",
        ],
    )
    .expect("server start");
    let addr = srv.addr.to_string();
    let out = client13(
        &addr,
        &["--messages", "2", "--json"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let s = session_lines(&out.stdout)[0];
    let cid = field(s, "server_cid").unwrap();
    assert_eq!(cid.len(), 16, "{s}");
    assert!(cid.starts_with("1234"), "{s}");
    assert_eq!(field(s, "node"), Some("4660"), "{s}");
    assert!(srv.stop().unwrap().success());
}

#[test]
fn dtls13_no_cid() {
    // Without CIDs, records use the unified header with C clear, and the echo still works.
    let mut srv = Server::start("127.0.0.1", 3, &["--dtls", "1.3", "--no-cid"]).unwrap();
    let mut relay = Relay::start("127.0.0.1", srv.addr);
    let addr = relay.addr.to_string();
    let out = client13(
        &addr,
        &["--messages", "5", "--no-cid", "--json"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let s = session_lines(&out.stdout)[0];
    assert_eq!(field(s, "server_cid"), Some("null"), "{s}");
    assert_eq!(field(s, "node"), Some("3"), "{s}");
    let seen = relay.finish();
    let protected: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.to_server && is_unified(s.data[0]))
        .collect();
    assert!(protected.len() >= 5, "{} records", protected.len());
    assert!(
        protected.iter().all(|s| !has_cid(s.data[0])),
        "no CID negotiated, so no C bit"
    );
    assert!(srv
        .log()
        .iter()
        .any(|l| l.contains("handshake done") && l.contains("cid=none")));
    assert!(srv.stop().unwrap().success());
}

#[test]
fn dtls13_server_rejects_dtls12_and_wrong_psk() {
    let mut srv = Server::start("127.0.0.1", 5, &["--dtls", "1.3"]).unwrap();
    let addr = srv.addr.to_string();
    // A DTLS 1.2 client (Mbed TLS), through the relay: no session, a clear failure in bounded
    // time. On the wire the 1.3 server answers the 1.2 ClientHello with a HelloVerifyRequest
    // (what cidlb's `dtls` health probe counts as alive), and the ClientHello with the cookie
    // with a fatal alert.
    let mut relay = Relay::start("127.0.0.1", srv.addr);
    let via = relay.addr.to_string();
    let out = client(
        &[
            "--server",
            &via,
            "--messages",
            "1",
            "--timeout-ms",
            "200",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    let s = session_lines(&out.stdout)[0];
    assert_eq!(field(s, "ok"), Some("0"), "{s}");
    assert_ne!(field(s, "error"), Some("null"), "{s}");
    let replies: Vec<Vec<u8>> = relay
        .finish()
        .into_iter()
        .filter(|s| !s.to_server)
        .map(|s| s.data)
        .collect();
    assert!(
        replies.len() >= 2
            && is_plaintext_handshake(&replies[0])
            && replies[0][HS_TYPE] == 3
            && replies.last().unwrap()[0] == 21,
        "HelloVerifyRequest (handshake type 3), then an alert (type 21): {:02x?}",
        replies.iter().map(|r| lb_lab::hex(r)).collect::<Vec<_>>()
    );
    // A DTLS 1.3 client with the wrong key.
    let out = client13(
        &addr,
        &[
            "--messages",
            "1",
            "--psk",
            "ffff",
            "--timeout-ms",
            "200",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(srv.count("handshake done"), 0, "{:#?}", srv.log());
    // The server still serves a good client.
    let out = client13(&addr, &["--messages", "2"], Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{:#?}", out.stdout, srv.log());
    assert_eq!(srv.count("handshake done"), 1, "{:#?}", srv.log());
    assert!(srv.stop().unwrap().success());
}

#[test]
fn dtls13_lossy_link_retransmits() {
    // Both sides drop 10% of received datagrams: wolfSSL's retransmission timers (driven by
    // the peer's got_timeout calls) must complete every handshake, and message retries must
    // recover nearly every echo. (10%, not the 1.2 test's 15%: wolfSSL's timer counts whole
    // seconds, doubling, so at 15% about one handshake in a thousand ran out of its 30 s when
    // the same flight was lost three or four times.)
    support::lossy_link(&["--dtls", "1.3"], "100");
}

#[test]
fn dtls13_client_port_reuse_reconnects() {
    // wolfSSL: the server sees a ClientHello on an established session's address and starts
    // a new session.
    let mut srv = support::port_reuse_reconnects(&["--dtls", "1.3"], 6);
    assert_eq!(srv.count("handshake done"), 2, "{:#?}", srv.log());
    srv.stop();
}

#[test]
fn dtls13_server_survives_garbage_and_forged_cid_records() {
    // Junk from unknown addresses, and forged records that carry a live session's CID (from
    // a port the session never used): wolfSSL must fail to authenticate them, and the server
    // must drop them without ending the session or following the forger's address.
    let mut srv = Server::start("127.0.0.1", 12, &["--dtls", "1.3"]).unwrap();
    let addr = srv.addr.to_string();
    let client_thread = std::thread::spawn(move || {
        client13(
            &addr,
            &["--messages", "30", "--interval-ms", "30", "--json"],
            Duration::from_secs(60),
        )
    });
    // The session's CID, from the server's `handshake done` line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cid = loop {
        let line = srv.log().into_iter().find(|l| l.contains("handshake done"));
        if let Some(l) = line {
            let i = l.find("cid=").unwrap() + 4;
            let h = &l[i..i + 12];
            break (0..6)
                .map(|k| u8::from_str_radix(&h[2 * k..2 * k + 2], 16).unwrap())
                .collect::<Vec<u8>>();
        }
        assert!(Instant::now() < deadline, "no handshake: {:#?}", srv.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(cid[0], 12);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u32 = 0x1234_5678;
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x3e],
        vec![0x3f, 12],
        vec![0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1],
        vec![0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0],
        vec![0u8; 1500],
    ];
    for n in 0..300 {
        let mut d = Vec::new();
        for _ in 0..(n % 97 + 16) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            d.push(x as u8);
        }
        match n % 3 {
            // A forged epoch 2/3 record with the live CID, 16-bit sequence and length.
            0 | 1 => {
                d[0] = if n % 3 == 0 { 0x3f } else { 0x3e };
                d[1..7].copy_from_slice(&cid);
                let len = (d.len() - 11) as u16;
                d[9..11].copy_from_slice(&len.to_be_bytes());
            }
            _ => d[0] = 0x16,
        }
        junk.push(d);
    }
    for d in &junk {
        let _ = sock.send_to(d, srv.addr);
        std::thread::sleep(Duration::from_micros(500));
    }
    let out = client_thread.join().unwrap();
    assert_client_ok(&out, &srv);
    let s = session_lines(&out.stdout)[0];
    assert_eq!(field(s, "ok"), Some("30"), "{s}");
    assert_eq!(srv.count("peer moved"), 0, "{:#?}", srv.log());
    let deadline = Instant::now() + Duration::from_secs(3);
    while srv.count("session closed") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(srv.count("session closed"), 1, "{:#?}", srv.log());
    assert_eq!(srv.count("reason=close_notify"), 1, "{:#?}", srv.log());
    assert!(
        srv.stop().unwrap().success(),
        "server survives and exits on SIGTERM"
    );
}

#[test]
fn dtls13_lost_hello_retry_request_is_resent() {
    // The server's first datagram, the HelloRetryRequest, is lost: the client's timer must
    // send its first ClientHello again (message_seq 0), and the server must answer it with a
    // new HelloRetryRequest on the same session (wolfSSL keeps no state before the cookie).
    let mut srv = Server::start("127.0.0.1", 8, &["--dtls", "1.3"]).unwrap();
    let mut relay = Relay::start_losing("127.0.0.1", srv.addr, Lose::First);
    let addr = relay.addr.to_string();
    let out = client13(
        &addr,
        &["--messages", "2", "--json"],
        Duration::from_secs(60),
    );
    let seen = relay.finish();
    assert_client_ok(&out, &srv);
    let first_hellos = seen
        .iter()
        .filter(|s| {
            s.to_server
                && is_plaintext_handshake(&s.data)
                && s.data[HS_TYPE] == 1
                && s.data[17..19] == [0, 0]
        })
        .count();
    let retry_requests = seen
        .iter()
        .filter(|s| {
            !s.to_server
                && is_plaintext_handshake(&s.data)
                && s.data.get(HELLO_RANDOM..HELLO_RANDOM + 32) == Some(&HRR_RANDOM[..])
        })
        .count();
    assert_eq!(first_hellos, 2, "the first ClientHello, sent twice");
    assert_eq!(
        retry_requests, 2,
        "one HelloRetryRequest lost, one answered"
    );
    assert_eq!(srv.count("handshake done"), 1, "{:#?}", srv.log());
    assert!(srv.stop().unwrap().success());
}

#[test]
fn dtls13_lost_ack_of_client_finished_is_resent() {
    // The server's first datagram after the client's final flight (epoch 2, 0x3e) is its ACK
    // of the client's Finished (RFC 9147 §7; seen: a 40 B `2f` record). It is lost: the
    // client's timer must resend its Finished, and the server, whose handshake is over,
    // must ACK again, or the client never leaves its handshake.
    let mut srv = Server::start("127.0.0.1", 10, &["--dtls", "1.3"]).unwrap();
    let mut relay = Relay::start_losing("127.0.0.1", srv.addr, Lose::FirstAfterClient(0x3e));
    let addr = relay.addr.to_string();
    let out = client13(
        &addr,
        &["--messages", "3", "--json"],
        Duration::from_secs(60),
    );
    let seen = relay.finish();
    assert_client_ok(&out, &srv);
    let finished = seen
        .iter()
        .filter(|s| s.to_server && s.data[0] == 0x3e)
        .count();
    assert!(finished >= 2, "the client resent its Finished: {finished}");
    let s = session_lines(&out.stdout)[0];
    assert_eq!(field(s, "ok"), Some("3"), "{s}");
    assert!(srv.stop().unwrap().success());
}
