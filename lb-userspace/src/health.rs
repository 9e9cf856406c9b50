//! Node health checks: probes and the fall/rise state machine.
//!
//! A node that is down takes no new flows (it leaves the round-robin ring); its existing flows
//! and CID records keep going to it, since no other node holds their sessions.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

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

/// Does this datagram start with a plaintext DTLS alert record (type 21, version FE xx, a
/// 2-byte alert)? A DTLS 1.3-only server that sends no HelloVerifyRequest answers the probe's
/// DTLS 1.2 ClientHello with a `protocol_version` alert (RFC 8446 §4.2.1), which shows a DTLS
/// stack serving the port as well as a ServerHello does. (A HelloRetryRequest is a ServerHello
/// on the wire, handshake type 2, so [`is_hello_answer`] covers it.)
pub fn is_dtls_alert(d: &[u8]) -> bool {
    d.len() >= 15 && d[0] == 21 && d[1] == 0xfe && u16::from_be_bytes([d[11], d[12]]) >= 2
}

/// Does this datagram show a live DTLS server: a hello answer or an alert?
pub fn is_alive_answer(d: &[u8]) -> bool {
    is_hello_answer(d) || is_dtls_alert(d)
}

/// One probe of `addr`: true if the node answered as alive. ICMP errors are read with their
/// source (IP_RECVERR) and judged by [`icmp_means_down`]; one that does not count is skipped
/// and the probe goes on waiting.
pub async fn probe(kind: Probe, addr: SocketAddr, timeout: Duration) -> bool {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let Ok(sock) = UdpSocket::bind(bind).await else {
        return false;
    };
    if !recv_errors(&sock, addr.is_ipv6()) || sock.connect(addr).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + timeout;
    match kind {
        Probe::None => true,
        Probe::Dtls => {
            let mut random = [0u8; 32];
            random[..8].copy_from_slice(&nanos().to_be_bytes());
            if sock.send(&client_hello(random)).await.is_err() {
                return false;
            }
            // Skip anything that is not a DTLS answer. The socket is connected: only datagrams
            // from the node's serving address and port arrive, and its fresh source port
            // keeps answers to earlier probes out.
            loop {
                match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => return false,
                    Ok(Ok(n)) if is_alive_answer(&buf[..n]) => return true,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) if queued_errors_mean_down(&sock, addr.ip()) => return false,
                    Ok(Err(_)) => {}
                }
            }
        }
        Probe::Udp => {
            if sock.send(b"cidlb health probe").await.is_err() {
                return false;
            }
            // ICMP unreachable arrives as an error on the connected socket; silence (or any
            // answer) within the timeout counts as alive.
            loop {
                match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) | Ok(Ok(_)) => return true,
                    Ok(Err(_)) if queued_errors_mean_down(&sock, addr.ip()) => return false,
                    Ok(Err(_)) => {}
                }
            }
        }
    }
}

/// How a probe reaches a node of a tunnel VIP: encapsulated as the datapath sends clients'
/// packets, so it tests the node's decapsulation as well as its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnelled {
    Ipip,
    /// GUE to this UDP port.
    Gue(u16),
}

/// A DTLS probe through the tunnel: a ClientHello from this host's address towards `node` to
/// the VIP's `vip` address and port, encapsulated to `node` (IPIP from a raw socket, whose
/// outer header the kernel writes; GUE from a UDP socket); alive if the node's server answers
/// from the VIP, straight back to this host. A node whose server is up but whose
/// decapsulation is gone gives no answer: down.
pub async fn probe_tunnel(
    node: IpAddr,
    vip: SocketAddr,
    how: Tunnelled,
    timeout: Duration,
) -> bool {
    let Some(local) = local_towards(node) else {
        return false;
    };
    // The answer's socket, on this host's address; connected, so only the VIP's answers count.
    let Ok(reply) = UdpSocket::bind(SocketAddr::new(local, 0)).await else {
        return false;
    };
    let (Ok(me), Ok(())) = (reply.local_addr(), reply.connect(vip).await) else {
        return false;
    };
    let mut random = [0u8; 32];
    random[..8].copy_from_slice(&nanos().to_be_bytes());
    let Some(inner) = inner_packet(me, vip, &client_hello(random)) else {
        return false;
    };
    let sent = match how {
        Tunnelled::Gue(port) => std::net::UdpSocket::bind(SocketAddr::new(local, 0))
            .and_then(|s| s.send_to(&inner, (node, port)))
            .is_ok(),
        Tunnelled::Ipip => send_ipip(node, &inner),
    };
    if !sent {
        return false;
    }
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, reply.recv(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(n)) if is_alive_answer(&buf[..n]) => return true,
            Ok(_) => {}
        }
    }
}

/// This host's address the kernel would send from towards `node`.
fn local_towards(node: IpAddr) -> Option<IpAddr> {
    let any: SocketAddr = if node.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect((node, 9)).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// The client packet a probe puts in the tunnel: IP and UDP headers from `from` to `to`
/// (checksums computed), then `payload`.
fn inner_packet(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    use etherparse::{IpNumber, Ipv4Header, Ipv6Header, UdpHeader};
    let mut out = Vec::new();
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Header::new(
                (8 + payload.len()) as u16,
                64,
                IpNumber::UDP,
                s.octets(),
                d.octets(),
            )
            .ok()?;
            let udp = UdpHeader::with_ipv4_checksum(from.port(), to.port(), &ip, payload).ok()?;
            ip.write(&mut out).ok()?;
            udp.write(&mut out).ok()?;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: (8 + payload.len()) as u16,
                next_header: IpNumber::UDP,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            let udp = UdpHeader::with_ipv6_checksum(from.port(), to.port(), &ip, payload).ok()?;
            ip.write(&mut out).ok()?;
            udp.write(&mut out).ok()?;
        }
        _ => return None,
    }
    out.extend_from_slice(payload);
    Some(out)
}

/// Sends `inner` to `node` inside IP in IP from a raw socket of protocol 4 (IPv4) or 41
/// (IPv6): the kernel writes the outer header.
pub(crate) fn send_ipip(node: IpAddr, inner: &[u8]) -> bool {
    let (family, proto) = if node.is_ipv4() {
        (libc::AF_INET, 4)
    } else {
        (libc::AF_INET6, 41)
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return false;
    }
    let sa: SocketAddr = (node, 0).into();
    let (storage, len) = sockaddr(&sa);
    // SAFETY: our fd; `storage` holds a valid sockaddr of `len` bytes; `inner` outlives the call.
    let n = unsafe {
        libc::sendto(
            fd,
            inner.as_ptr().cast(),
            inner.len(),
            0,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    // SAFETY: our fd, closed once.
    unsafe { libc::close(fd) };
    n == inner.len() as isize
}

pub(crate) fn sockaddr(sa: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the variant written is the one `len` says.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Does an ICMP error about a probe of `node` say the node is down? `offender`: the ICMP
/// message's source.
///
/// - Port (or protocol) unreachable: only the node itself knows nothing listens on the port,
///   so it counts only from the node's own address. From anywhere else it is forged or
///   misrouted, and ignored.
/// - Host (IPv6: address) unreachable: said by the last router before the node when the node
///   does not answer ARP/ND, so it counts from any source on the path.
/// - Anything else (net unreachable, administratively prohibited, packet too big, time
///   exceeded): says nothing certain about the node; ignored.
pub fn icmp_means_down(icmp_type: u8, code: u8, offender: Option<IpAddr>, node: IpAddr) -> bool {
    let from_node = offender == Some(node);
    match (node.is_ipv6(), icmp_type, code) {
        (false, 3, 2 | 3) | (true, 1, 4) => from_node,
        (false, 3, 1) | (true, 1, 3) => true,
        _ => false,
    }
}

/// Asks the kernel to queue ICMP errors for `sock` with their source (IP_RECVERR).
fn recv_errors(sock: &UdpSocket, v6: bool) -> bool {
    let (level, opt) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::SOL_IP, libc::IP_RECVERR)
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Drains the socket's error queue; true if one of the queued ICMP errors means `node` is down
/// ([`icmp_means_down`]). An error that is not an ICMP message (nothing queued, a local
/// error) counts as down, as it did before the errors were read.
fn queued_errors_mean_down(sock: &UdpSocket, node: IpAddr) -> bool {
    let fd = sock.as_raw_fd();
    let mut any = false;
    let mut down = false;
    for _ in 0..16 {
        let mut data = [0u8; 64];
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: fd is a valid socket, msg points at buffers we own.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        // SAFETY: msg was filled by recvmsg; CMSG_* walk within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg points at a complete header inside `control`.
            let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
            let ours = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
            if ours {
                // SAFETY: IP(V6)_RECVERR data is a sock_extended_err followed by the offender's
                // sockaddr (SO_EE_OFFENDER), both inside the control buffer.
                let (ee, offender) = unsafe {
                    let ee_ptr = libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>();
                    let ee = ee_ptr.read_unaligned();
                    let addr = ee_ptr
                        .add(1)
                        .cast::<libc::sockaddr_storage>()
                        .read_unaligned();
                    (ee, sockaddr_ip(&addr))
                };
                any = true;
                let icmp = ee.ee_origin == libc::SO_EE_ORIGIN_ICMP
                    || ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6;
                down |= icmp && icmp_means_down(ee.ee_type, ee.ee_code, offender, node);
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
        }
    }
    down || !any
}

fn sockaddr_ip(sa: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a = unsafe { &*(std::ptr::from_ref(sa).cast::<libc::sockaddr_in>()) };
            Some(IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a = unsafe { &*(std::ptr::from_ref(sa).cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::from(a.sin6_addr.s6_addr))
        }
        _ => None,
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
    fn icmp_errors_count_only_from_who_can_know() {
        let node4: IpAddr = "203.0.113.11".parse().unwrap();
        let router4: IpAddr = "203.0.113.1".parse().unwrap();
        let elsewhere4: IpAddr = "198.51.100.66".parse().unwrap();
        let node6: IpAddr = "2001:db8:1::11".parse().unwrap();
        let router6: IpAddr = "2001:db8:1::1".parse().unwrap();
        // (type, code, offender, node, down?)
        let cases = [
            // Port unreachable: only from the node itself.
            (3, 3, Some(node4), node4, true),
            (3, 3, Some(router4), node4, false),
            (3, 3, Some(elsewhere4), node4, false),
            (3, 3, None, node4, false),
            (1, 4, Some(node6), node6, true),
            (1, 4, Some(router6), node6, false),
            // Protocol unreachable: as port unreachable.
            (3, 2, Some(node4), node4, true),
            (3, 2, Some(elsewhere4), node4, false),
            // Host / address unreachable: from a router on the path too.
            (3, 1, Some(router4), node4, true),
            (3, 1, Some(node4), node4, true),
            (1, 3, Some(router6), node6, true),
            // Says nothing certain about the node.
            (3, 0, Some(router4), node4, false), // net unreachable
            (3, 13, Some(router4), node4, false), // administratively prohibited
            (3, 4, Some(router4), node4, false), // fragmentation needed
            (11, 0, Some(router4), node4, false), // time exceeded
            (2, 0, Some(router6), node6, false), // packet too big
            (1, 1, Some(router6), node6, false), // administratively prohibited
            // ICMPv4 numbers on an IPv6 node mean something else (type 3 = time exceeded).
            (3, 3, Some(node6), node6, false),
        ];
        for (t, c, from, node, want) in cases {
            assert_eq!(
                icmp_means_down(t, c, from, node),
                want,
                "type {t} code {c} from {from:?} about {node}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_on_loopback_fails_the_probe() {
        // Bind then drop: nothing listens on the port, the kernel answers port unreachable
        // from 127.0.0.1 itself, which is the probed address.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        assert!(!probe(Probe::Udp, addr, Duration::from_millis(500)).await);
        assert!(!probe(Probe::Dtls, addr, Duration::from_millis(500)).await);
        let open = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = open.local_addr().unwrap();
        assert!(probe(Probe::Udp, addr, Duration::from_millis(300)).await);
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

    #[test]
    fn alerts_count_as_alive() {
        // wolfSSL 5.9.4 DTLS 1.3-only server, to a DTLS 1.2 ClientHello with its cookie: fatal
        // protocol_version (lb-testpeer README, seen on the wire).
        let alert = [21, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 2, 70];
        assert!(is_dtls_alert(&alert) && is_alive_answer(&alert));
        assert!(!is_hello_answer(&alert));
        // Cut short, another record type, not DTLS: not an answer.
        assert!(!is_alive_answer(&alert[..14]));
        let mut app = alert;
        app[0] = 23;
        assert!(!is_alive_answer(&app));
        assert!(!is_alive_answer(b"cidlb health probe echo"));
        // A HelloVerifyRequest and a ServerHello / HelloRetryRequest still count.
        for t in [2, 3] {
            assert!(is_alive_answer(&[
                22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, t
            ]));
        }
    }
}
