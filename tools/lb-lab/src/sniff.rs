//! Raw frames in and out of a namespace's interfaces (AF_PACKET), for tests that follow
//! single packets through the fleet: send crafted frames, capture what an interface sees,
//! bounded in time.

use std::time::{Duration, Instant};

use crate::NetNs;

/// A captured frame: the interface's index, whether the namespace sent it (`PACKET_OUTGOING`)
/// or received it, and its bytes.
#[derive(Clone, Debug)]
pub struct Seen {
    pub ifindex: u32,
    pub outgoing: bool,
    pub frame: Vec<u8>,
}

fn packet_socket() -> i32 {
    // SAFETY: plain socket(2); ETH_P_ALL in network byte order, as packet(7) asks.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// Captures every frame on every interface of `ns` for `span` (from a thread of its own that
/// enters the namespace), while `during` runs on the calling thread (started once the socket
/// is open). Returns what `during` returned and the frames.
pub fn capture<T>(ns: &NetNs, span: Duration, during: impl FnOnce() -> T) -> (T, Vec<Seen>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let name = ns.name.clone();
    let t = std::thread::spawn(move || {
        crate::enter(&name);
        let fd = packet_socket();
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: a timeval of the right size for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        ready_tx.send(()).unwrap();
        let mut seen = Vec::new();
        let t0 = Instant::now();
        let mut buf = vec![0u8; 65536];
        while t0.elapsed() < span {
            // SAFETY: zeroed sockaddr_ll is valid; recvfrom fills at most its size.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and sll outlive the call; sizes given.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n > 0 {
                seen.push(Seen {
                    ifindex: sll.sll_ifindex as u32,
                    outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
                    frame: buf[..n as usize].to_vec(),
                });
            }
        }
        // SAFETY: our fd, closed once.
        unsafe { libc::close(fd) };
        seen
    });
    ready_rx.recv().expect("capture thread started");
    let out = during();
    (out, t.join().expect("capture thread"))
}

/// Sends `frames` out of `dev` in `ns`, as they are.
pub fn send(ns: &NetNs, dev: &str, frames: &[Vec<u8>]) {
    let (name, dev, frames) = (ns.name.clone(), dev.to_owned(), frames.to_vec());
    std::thread::spawn(move || {
        crate::enter(&name);
        let fd = packet_socket();
        let c = std::ffi::CString::new(dev.clone()).unwrap();
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(ifindex != 0, "no interface {dev} in {name}");
        for f in &frames {
            // SAFETY: zeroed sockaddr_ll is valid; the fields set are those packet(7) needs.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: f and sll outlive the call; sizes given.
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n,
                f.len() as isize,
                "send on {dev}: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: our fd, closed once.
        unsafe { libc::close(fd) };
    })
    .join()
    .expect("send thread");
}

/// Does `frame` contain `needle`?
pub fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}
