//! End-to-end tests on loopback: a real server process and a real client process.
//! Every loop is bounded; every server started here is stopped (SIGTERM, then SIGKILL).

mod support;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use support::*;

/// IPv6 loopback is a capability the suite requires: without it the IPv6 case would prove
/// nothing, so its absence is a failure that says what to fix, never a silent pass.
fn require_ipv6_loopback() {
    if let Err(e) = UdpSocket::bind("[::1]:0") {
        panic!(
            "cannot bind [::1]:0 ({e}): this host has no IPv6 loopback; enable IPv6 \
             (sysctl net.ipv6.conf.lo.disable_ipv6=0) to run the IPv6 peer test"
        );
    }
}

/// 5 sessions x 20 messages, rebinding every 5: all echoes from our node, server saw moves.
fn cid_rebind_case(ip: &str, node: u64) {
    let mut srv = Server::start(ip, node, &[]).expect("server start");
    let addr = srv.addr.to_string();
    let out = client(
        &[
            "--server",
            &addr,
            "--sessions",
            "5",
            "--messages",
            "20",
            "--rebind-every",
            "5",
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert_client_ok(&out, &srv);
    let sessions = session_lines(&out.stdout);
    assert_eq!(sessions.len(), 5, "{}", out.stdout);
    let node_s = node.to_string();
    for s in &sessions {
        assert_eq!(field(s, "status"), Some("ok"), "{s}");
        assert_eq!(field(s, "node"), Some(node_s.as_str()), "{s}");
        assert_eq!(field(s, "ok"), Some("20"), "{s}");
        assert_eq!(field(s, "rebinds"), Some("3"), "{s}");
        let cid = field(s, "server_cid").expect("cid");
        assert_eq!(cid.len(), 12, "default CID length 6: {s}");
        assert!(
            cid.starts_with(&format!("{node:02x}")),
            "CID starts with node id: {s}"
        );
    }
    let sum = summary(&out.stdout);
    assert_eq!(field(sum, "sessions"), Some("5"));
    assert_eq!(field(sum, "ok"), Some("5"));
    assert_eq!(field(sum, "failed"), Some("0"));
    assert_eq!(field(sum, "rebinds"), Some("15"));
    assert!(
        sum.contains(&format!("\"per_node\":{{\"{node}\":5}}")),
        "{sum}"
    );

    // The server followed every rebinding (the client's reply arrived on the new port).
    let deadline = Instant::now() + Duration::from_secs(3);
    while srv.count("peer moved") < 15 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(srv.count("peer moved"), 15, "{:#?}", srv.log());
    assert_eq!(srv.count("handshake done"), 5, "{:#?}", srv.log());
    let st = srv.stop().expect("server exits on SIGTERM");
    assert!(st.success(), "server exit status {st:?}");
}

#[test]
fn cid_rebinding_ipv4() {
    cid_rebind_case("127.0.0.1", 7);
}

#[test]
fn cid_rebinding_ipv6() {
    require_ipv6_loopback();
    cid_rebind_case("::1", 200);
}

#[test]
fn no_cid_plain_dtls() {
    let mut srv = Server::start("127.0.0.1", 3, &["--no-cid"]).expect("server start");
    let addr = srv.addr.to_string();
    let out = client(
        &[
            "--server",
            &addr,
            "--sessions",
            "3",
            "--messages",
            "10",
            "--no-cid",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    for s in session_lines(&out.stdout) {
        assert_eq!(field(s, "status"), Some("ok"), "{s}");
        assert_eq!(field(s, "node"), Some("3"), "{s}");
        assert_eq!(field(s, "server_cid"), Some("null"), "{s}");
    }
    assert!(srv
        .log()
        .iter()
        .any(|l| l.contains("handshake done") && l.contains("cid=none")));
    assert!(srv.stop().unwrap().success());
}

#[test]
fn cid_client_against_no_cid_server_falls_back() {
    // The client asks for a CID, the server does not negotiate one: plain DTLS still works.
    let mut srv = Server::start("127.0.0.1", 4, &["--no-cid"]).expect("server start");
    let addr = srv.addr.to_string();
    let out = client(
        &[
            "--server",
            &addr,
            "--sessions",
            "1",
            "--messages",
            "3",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        field(session_lines(&out.stdout)[0], "server_cid"),
        Some("null")
    );
    srv.stop();
}

#[test]
fn rebinding_without_cid_fails_cleanly() {
    // Without a CID the server cannot recognise the moved client: the client must report
    // failure (exit 1) in bounded time, not hang.
    let mut srv = Server::start("127.0.0.1", 5, &["--no-cid"]).expect("server start");
    let addr = srv.addr.to_string();
    let out = client(
        &[
            "--server",
            &addr,
            "--sessions",
            "1",
            "--messages",
            "4",
            "--rebind-every",
            "2",
            "--no-cid",
            "--timeout-ms",
            "100",
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    let s = session_lines(&out.stdout)[0];
    assert_eq!(field(s, "ok"), Some("2"), "{s}");
    assert_eq!(field(s, "failed"), Some("2"), "{s}");
    assert_eq!(srv.count("peer moved"), 0);
    srv.stop();
}

#[test]
fn custom_cid_layout_and_wrong_psk() {
    // 2-byte node id in an 8-byte CID.
    let mut srv = Server::start(
        "127.0.0.1",
        0x1234,
        &["--node-id-length", "2", "--cid-length", "8"],
    )
    .unwrap();
    let addr = srv.addr.to_string();
    let out = client(
        &["--server", &addr, "--messages", "2", "--json"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let cid = field(session_lines(&out.stdout)[0], "server_cid")
        .unwrap()
        .to_string();
    assert_eq!(cid.len(), 16);
    assert!(cid.starts_with("1234"), "{cid}");

    // A client with the wrong key must fail the handshake, and the server must survive it.
    let out = client(
        &[
            "--server",
            &addr,
            "--messages",
            "2",
            "--psk",
            "ffff",
            "--timeout-ms",
            "200",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    let out = client(
        &["--server", &addr, "--messages", "2"],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "server still serves after a bad client: {}",
        out.stdout
    );
    assert!(srv.stop().unwrap().success());
}

#[test]
fn lossy_link_retransmits() {
    // Server and client each drop 15% of received datagrams. Mbed TLS's handshake timers
    // must complete every handshake, and message retries must recover nearly every echo
    // (a message fails only if all 4 attempts lose a datagram: ~0.6%, so allow a few).
    support::lossy_link(&[], "150");
}

#[test]
fn server_survives_garbage() {
    let mut srv = Server::start("127.0.0.1", 11, &[]).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x19],
        vec![0x19, 0xfe, 0xfd],
        vec![
            0x19, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 11, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4, 5,
        ],
        vec![0x16, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0],
        vec![0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1],
        vec![0x17; 200],
        vec![0u8; 1500],
    ];
    // A deterministic pseudo-random spray.
    let mut x: u32 = 0x1234_5678;
    for n in 0..200 {
        let mut d = Vec::new();
        for _ in 0..(n % 97 + 1) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            d.push(x as u8);
        }
        if n % 3 == 0 {
            d[0] = 0x19;
        }
        if n % 3 == 1 {
            d[0] = 0x16;
        }
        junk.push(d);
    }
    for d in &junk {
        let _ = sock.send_to(d, srv.addr);
    }
    let addr = srv.addr.to_string();
    let out = client(
        &["--server", &addr, "--sessions", "2", "--messages", "5"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{:#?}", out.stdout, srv.log());
    let st = srv.stop().expect("server still alive and exits on SIGTERM");
    assert!(st.success());
}

#[test]
fn client_port_reuse_reconnects() {
    // Mbed TLS reports the new ClientHello on a live session as CLIENT_RECONNECT.
    let mut srv = support::port_reuse_reconnects(&[], 6);
    srv.stop();
}
