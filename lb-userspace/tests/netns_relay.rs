//! The reply path is not an open relay (issue #8 §1), with real traffic through `cidlb run` in
//! the lab: frames forged on the client side with a node's address and serving port as source
//! are dropped (`drop_forged_reply`), whatever their destination (another host on the node
//! network, the balancer itself), while genuine replies and a node's server-initiated packet
//! still leave from the VIP.

mod common;

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use common::agent::{cidlb, json_counter, AgentProc, Bed};
use lb_lab::{
    node4, node6,
    packet::{cid_record, Frame},
    CLIENT4, CLIENT6, PORT, VIP4, VIP6,
};

/// Forged frames per (source family, destination).
const FORGED_EACH: usize = 20;
/// The port the forged frames are sent to, where listeners count whatever arrives.
const TARGET_PORT: u16 = 9999;

/// A UDP socket bound inside namespace `ns`.
fn socket_in(ns: &str, bind: &str) -> UdpSocket {
    let (ns, bind) = (ns.to_owned(), bind.to_owned());
    thread::spawn(move || {
        lb_lab::enter(&ns);
        let s = UdpSocket::bind(&bind).unwrap_or_else(|e| panic!("bind {bind} in {ns}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    })
    .join()
    .expect("socket thread")
}

/// An AF_PACKET socket sending raw frames out of `dev` in namespace `ns`.
struct RawSender {
    fd: i32,
    ifindex: i32,
}

impl RawSender {
    fn open(ns: &str, dev: &str) -> Self {
        let (ns, dev) = (ns.to_owned(), dev.to_owned());
        thread::spawn(move || {
            lb_lab::enter(&ns);
            let name = std::ffi::CString::new(dev.clone()).unwrap();
            // SAFETY: a NUL-terminated name; the call only reads it.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            assert!(ifindex > 0, "no interface {dev} in {ns}");
            // SAFETY: plain socket(2); protocol 0: send only, receive nothing.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            RawSender { fd, ifindex }
        })
        .join()
        .expect("raw socket thread")
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: all-zero is a valid sockaddr_ll; the fields set below are what sendto needs.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }
}

impl Drop for RawSender {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// An interface's MAC address, read inside its namespace.
/// Everything `sock` receives until it stays quiet for its read timeout.
fn drain(sock: &UdpSocket) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        got.push((from, buf[..n].to_vec()));
        if got.len() > 1000 {
            break;
        }
    }
    got
}

/// Sends `payload` to `to` until an answer ending in it comes back (bounded); its source.
fn exchange(sock: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<SocketAddr> {
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        sock.send_to(payload, to).ok()?;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if buf[..n].ends_with(payload) {
                return Some(from);
            }
        }
    }
    None
}

#[test]
fn forged_node_replies_are_dropped_and_genuine_ones_still_work() {
    let mut bed = Bed::up("nr", 2);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    bed.write_config("flows: {capacity: 4096}\n");
    let agent = AgentProc::start(lab, &cfg, &[]);
    // veth needs a moment after XDP attach before it forwards.
    thread::sleep(Duration::from_millis(1500));
    let client_ns = lab.client.name.clone();
    let vip4 = SocketAddr::from((VIP4, PORT));
    let vip6 = SocketAddr::from((VIP6, PORT));

    // (b) Real traffic through the VIP, from the client sockets (c) reuses. It also resolves
    // the balancer's neighbour entries for node 1 in both families, which the origin check
    // needs: CID records naming node 1 (a flow-routed datagram could go to either node).
    let c4 = socket_in(&client_ns, "0.0.0.0:0");
    let c6 = socket_in(&client_ns, "[::]:0");
    let real = cid_record(
        &[1, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
        b"real traffic through the VIP",
    );
    for (sock, vip) in [(&c4, vip4), (&c6, vip6)] {
        let from = exchange(sock, vip, &real);
        assert_eq!(from, Some(vip), "echo through {vip}");
    }

    // (a) Forged on the client side: src = node 1's address and serving port, to node 2's
    // address (a listener there) and to the balancer's own client-side address.
    let node2_listener = socket_in(&lab.nodes[1].name, &format!("[::]:{TARGET_PORT}"));
    let balancer_listener = socket_in(&lab.balancer.name, &format!("[::]:{TARGET_PORT}"));
    let client_mac = lab.client.mac("c0").unwrap_or_else(|e| panic!("{e}"));
    let lbc_mac = lab.balancer.mac("lbc").unwrap_or_else(|e| panic!("{e}"));
    let raw = RawSender::open(&client_ns, "c0");
    let targets: [(IpAddr, IpAddr); 4] = [
        (node4(1).into(), node4(2).into()),
        (node6(1).into(), node6(2).into()),
        (node4(1).into(), "198.51.100.1".parse().unwrap()),
        (node6(1).into(), "2001:db8:c::1".parse().unwrap()),
    ];
    let mut forged = 0u64;
    for (src, dst) in targets {
        let f = Frame::udp(
            client_mac,
            lbc_mac,
            src,
            PORT,
            dst,
            TARGET_PORT,
            b"forged node reply",
        );
        for _ in 0..FORGED_EACH {
            raw.send(&f.bytes());
            forged += 1;
            thread::sleep(Duration::from_millis(2));
        }
    }
    let at_node2 = drain(&node2_listener);
    let at_balancer = drain(&balancer_listener);

    // (c) Node 1 sends first, from its serving port, to the client sockets of (b): it must
    // arrive from the VIP. The echo server owns that port; stop it first.
    bed.echo[0].stop();
    let n1 = socket_in(&lab.nodes[0].name, &format!("[::]:{PORT}"));
    let mut notified = Vec::new();
    for (sock, to, vip) in [
        (
            &c4,
            SocketAddr::from((CLIENT4, c4.local_addr().unwrap().port())),
            vip4,
        ),
        (
            &c6,
            SocketAddr::from((CLIENT6, c6.local_addr().unwrap().port())),
            vip6,
        ),
    ] {
        let mut got = None;
        for _ in 0..10 {
            n1.send_to(b"server-initiated notification", to).unwrap();
            if let Some((from, _)) = drain(sock)
                .into_iter()
                .find(|(_, p)| p == b"server-initiated notification")
            {
                got = Some(from);
                break;
            }
        }
        notified.push((to, vip, got));
    }

    let json = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    drop(agent);
    assert!(
        at_node2.is_empty() && at_balancer.is_empty(),
        "forged node replies arrived: {} at node 2 {:?}, {} at the balancer {:?}",
        at_node2.len(),
        at_node2.first(),
        at_balancer.len(),
        at_balancer.first()
    );
    assert_eq!(
        json_counter(&json, "drop_forged_reply"),
        forged,
        "every forged frame counted: {json}"
    );
    for (to, vip, got) in notified {
        assert_eq!(
            got,
            Some(vip),
            "node 1's packet to {to} must arrive from the VIP"
        );
    }
    assert!(json_counter(&json, "reply_unnat") >= 4, "{json}");
}

/// The same forgery while real DTLS 1.2 CID sessions (lb-testpeer on Mbed TLS) rebind through
/// the same balancer: every session keeps working and is answered by the node its CID names,
/// every forged frame is dropped and counted, and none reaches a host.
#[test]
fn forged_node_replies_during_real_dtls_sessions() {
    common::require_root();
    let lab = lb_lab::Lab::up(&lb_lab::unique_prefix("nrd"), 2).unwrap_or_else(|e| panic!("{e}"));
    let bin = common::testpeer();
    let _servers: Vec<lb_lab::ChildGuard> = lab
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            lb_lab::peer::server(&bin, n, i as u32 + 1, &[], None).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let pins = common::agent::PinGuard::new("nrd");
    let cfg = std::env::temp_dir().join(format!("cidlb-nrd-{}.yaml", std::process::id()));
    std::fs::write(&cfg, lab.cidlb_config(&pins.0.display().to_string(), "")).unwrap();
    let agent = AgentProc::start(&lab, &cfg, &[]);
    thread::sleep(Duration::from_millis(1500));

    // The DTLS sessions run in the background: 12 sessions per family, a rebind every 5 records.
    let out4 = std::env::temp_dir().join(format!("cidlb-nrd4-{}.json", std::process::id()));
    let out6 = std::env::temp_dir().join(format!("cidlb-nrd6-{}.json", std::process::id()));
    let args = [
        "--sessions",
        "12",
        "--messages",
        "40",
        "--rebind-every",
        "5",
        "--interval-ms",
        "20",
        "--parallel",
        "12",
    ];
    let mut c4 = lb_lab::peer::spawn_client(
        &bin,
        &lab.client,
        &lb_lab::VIP4_SOCKET.to_string(),
        &args,
        &out4,
    )
    .unwrap();
    let mut c6 = lb_lab::peer::spawn_client(
        &bin,
        &lab.client,
        &lb_lab::VIP6_SOCKET.to_string(),
        &args,
        &out6,
    )
    .unwrap();

    // Meanwhile, forged frames from the client side: src = node 1's serving address and port,
    // to node 2 (a listener counts what arrives) and to the balancer.
    let node2_listener = socket_in(&lab.nodes[1].name, &format!("[::]:{TARGET_PORT}"));
    let client_mac = lab.client.mac("c0").unwrap_or_else(|e| panic!("{e}"));
    let lbc_mac = lab.balancer.mac("lbc").unwrap_or_else(|e| panic!("{e}"));
    let raw = RawSender::open(&lab.client.name, "c0");
    let mut forged = 0u64;
    for round in 0..50 {
        let (src, dst): (IpAddr, IpAddr) = if round % 2 == 0 {
            (node4(1).into(), node4(2).into())
        } else {
            (node6(1).into(), node6(2).into())
        };
        let f = Frame::udp(client_mac, lbc_mac, src, PORT, dst, TARGET_PORT, b"forged");
        for _ in 0..4 {
            raw.send(&f.bytes());
            forged += 1;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let wait = |c: &mut lb_lab::ChildGuard| {
        for _ in 0..600 {
            if let Ok(Some(st)) = c.0.try_wait() {
                return st;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("DTLS client did not finish within 60 s");
    };
    let (s4, s6) = (wait(&mut c4), wait(&mut c6));
    let at_node2 = drain(&node2_listener);
    let json = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    drop(agent);

    for (status, out) in [(s4, &out4), (s6, &out6)] {
        let text = std::fs::read_to_string(out).unwrap();
        let run = lb_lab::peer::ClientRun::parse(&text, status.success())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            run.ok,
            "DTLS sessions failed beside the forgery: {:#}",
            run.summary
        );
        assert_eq!(run.sessions.len(), 12);
        assert!(run.misrouted().is_empty(), "{:?}", run.misrouted());
        for s in &run.sessions {
            assert!(s["rebinds"].as_u64().unwrap() >= 7, "{s}");
        }
        let _ = std::fs::remove_file(out);
    }
    assert!(
        at_node2.is_empty(),
        "forged frames reached node 2: {:?}",
        at_node2.first()
    );
    // Frames forged before the balancer has resolved node 1's neighbour entry (the sessions
    // are only starting) cannot have their MAC checked and are dropped as
    // drop_reply_no_neigh (fail closed); every other one as drop_forged_reply.
    let (forged_drops, no_neigh) = (
        json_counter(&json, "drop_forged_reply"),
        json_counter(&json, "drop_reply_no_neigh"),
    );
    assert_eq!(forged_drops + no_neigh, forged, "{json}");
    assert!(forged_drops >= forged / 2, "{json}");
    assert!(json_counter(&json, "cid_routed") >= 2 * 12 * 40, "{json}");
    let _ = std::fs::remove_file(&cfg);
}
