//! ICMP errors to a VIP that no node could be matched to, sent on by the agent to every node
//! of the VIP (XDP cannot clone a packet).
//!
//! The datapath sends an error about a NAT VIP's reply to the node that last sent a long reply
//! to that client (`REPLY_DESTS`, `lb-ebpf/src/icmp.rs`). It passes to the kernel the errors
//! it cannot match: about a reply too short to be recorded, a flow whose entry is gone, a
//! tunnel VIP's replies (which never cross the balancer), and VLAN-tagged errors (which the
//! datapath leaves alone to stay within the verifier's budget). A packet socket per attached
//! interface and family sees those on their way into the kernel (a classic BPF filter keeps
//! only ICMP errors); an error whose outer destination is a VIP and whose quote is a UDP
//! datagram from that VIP and one of its ports goes to each of the VIP's nodes
//! ([`copies`]): rewritten for a NAT VIP and sent from a raw socket, unchanged and
//! encapsulated for a tunnel VIP. At most `icmp.rate` errors a second, and one error about
//! a flow (VIP port, client address and port, ICMP type and code) a second; counted in
//! `STATS` as `icmp_fanout` and `icmp_fanout_limited`. Not in shadow mode, where the old rules still
//! forward.

mod copies;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{names, Counter};
use tracing::{info, warn};

pub use self::copies::{Copy, Error, Targets};
use crate::{config::Config, health};

/// The running fan-out: a thread, stopped and joined when dropped.
pub struct Fanout {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fanout {
    /// Starts listening on the attached interfaces `ifindexes` for `cfg`'s VIPs. `None` in
    /// shadow mode; an error if a socket cannot be opened.
    pub fn start(cfg: &Config, ifindexes: &[u32]) -> anyhow::Result<Option<Self>> {
        if cfg.shadow || cfg.vips.is_empty() {
            return Ok(None);
        }
        let listen = ifindexes
            .iter()
            .flat_map(|&i| [listener(i, false), listener(i, true)])
            .collect::<std::io::Result<Vec<_>>>()?;
        let send = Senders::open()?;
        let stats = open_stats(&cfg.pin_dir)?;
        let targets = Targets::new(cfg);
        let rate = cfg.icmp.rate;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("icmp-fanout".into())
            .spawn(move || serve(&listen, &send, stats, &targets, rate, &flag))?;
        Ok(Some(Self {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Keeps only ICMP errors: IPv4 protocol 1 with type 3, 11 or 12; IPv6 next header 58 with
/// type 1 to 4 (a packet socket of `SOCK_DGRAM` filters from the IP header).
fn filter(v6: bool) -> Vec<libc::sock_filter> {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const LDB_IND: u16 = 0x50; // BPF_LD | BPF_B | BPF_IND
    const LDX_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH: X = 4 * (P[k] & 0xf)
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGT: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    if v6 {
        vec![
            op(LDB_ABS, 0, 0, 6),
            op(JEQ, 0, 4, 58),
            op(LDB_ABS, 0, 0, 40),
            op(JGT, 2, 0, 4),
            op(JEQ, 1, 0, 0),
            op(RET, 0, 0, 0xffff),
            op(RET, 0, 0, 0),
        ]
    } else {
        vec![
            op(LDB_ABS, 0, 0, 9),
            op(JEQ, 0, 6, 1),
            op(LDX_MSH, 0, 0, 0),
            op(LDB_IND, 0, 0, 0),
            op(JEQ, 2, 0, 3),
            op(JEQ, 1, 0, 11),
            op(JEQ, 0, 1, 12),
            op(RET, 0, 0, 0xffff),
            op(RET, 0, 0, 0),
        ]
    }
}

fn last_error<T>() -> std::io::Result<T> {
    Err(std::io::Error::last_os_error())
}

/// A packet socket for IPv4 or IPv6 packets received on `ifindex`, non-blocking, filtered.
fn listener(ifindex: u32, v6: bool) -> std::io::Result<OwnedFd> {
    let proto = (if v6 { libc::ETH_P_IPV6 } else { libc::ETH_P_IP } as u16).to_be();
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return last_error();
    }
    // SAFETY: a new descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let code = filter(v6);
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `code`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if r != 0 {
        return last_error();
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return last_error();
    }
    Ok(fd)
}

/// The sockets copies leave by: raw IP sockets that send whole packets (`IPPROTO_RAW`: the
/// header as written, its source the error's), and UDP sockets for GUE.
struct Senders {
    raw4: OwnedFd,
    raw6: OwnedFd,
    gue4: UdpSocket,
    gue6: UdpSocket,
}

impl Senders {
    fn open() -> std::io::Result<Self> {
        let raw = |family| {
            // SAFETY: plain socket(2).
            let fd = unsafe {
                libc::socket(
                    family,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_RAW,
                )
            };
            if fd < 0 {
                return last_error();
            }
            // SAFETY: a new descriptor, owned from here on.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Ok(Self {
            raw4: raw(libc::AF_INET)?,
            raw6: raw(libc::AF_INET6)?,
            gue4: UdpSocket::bind("0.0.0.0:0")?,
            gue6: UdpSocket::bind("[::]:0")?,
        })
    }

    /// Sends `packet` as `copy` says; the error is the send's own.
    fn send(&self, copy: Copy, packet: &[u8]) -> std::io::Result<()> {
        match copy {
            Copy::Nat { node, .. } => {
                let fd = if node.is_ipv4() {
                    &self.raw4
                } else {
                    &self.raw6
                };
                let (sa, len) = health::sockaddr(&SocketAddr::new(node, 0));
                // SAFETY: our fd; `sa` holds a valid sockaddr of `len` bytes; `packet`
                // outlives the call.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&sa as *const libc::sockaddr_storage).cast(),
                        len,
                    )
                };
                match n {
                    n if n < 0 => last_error(),
                    n if n as usize == packet.len() => Ok(()),
                    n => Err(std::io::Error::other(format!(
                        "sent {n} of {} bytes",
                        packet.len()
                    ))),
                }
            }
            Copy::Ipip { node } => match health::send_ipip(node, packet) {
                true => Ok(()),
                false => Err(std::io::Error::other("the IPIP raw socket refused it")),
            },
            Copy::Gue { node, port } => {
                let s = if node.is_ipv4() {
                    &self.gue4
                } else {
                    &self.gue6
                };
                s.send_to(packet, (node, port)).map(|_| ())
            }
        }
    }
}

fn open_stats(pin_dir: &Path) -> anyhow::Result<PerCpuArray<MapData, u64>> {
    let path = pin_dir.join(names::STATS);
    let map =
        MapData::from_pin(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    Ok(PerCpuArray::try_from(Map::PerCpuArray(map))?)
}

/// Adds `n` to counter `c` (in CPU 0's slot: the datapath never bumps these two).
fn bump(stats: &mut PerCpuArray<MapData, u64>, c: Counter, n: u64) {
    let result = stats.get(&(c as u32), 0).and_then(|values| {
        let mut v: Vec<u64> = values.to_vec();
        v[0] += n;
        let values = PerCpuValues::try_from(v).map_err(aya::maps::MapError::from)?;
        stats.set(c as u32, values, 0)
    });
    if let Err(e) = result {
        warn!("counting {}: {e}", c.name());
    }
}

/// Errors sent on in the last second, by what they are about: one is sent on once. A router
/// that answers each packet of a flow sends the same error many times, and where the VIP is
/// not one of this host's addresses the kernel routes a passed error back upstream, from where
/// it returns until its TTL runs out.
#[derive(Default)]
struct Recent {
    seen: std::collections::HashMap<About, Instant>,
}

/// What an error is about: the VIP and port, the client's address and port, ICMP type and code.
type About = (IpAddr, u16, (IpAddr, u16), [u8; 2]);

impl Recent {
    const WINDOW: Duration = Duration::from_secs(1);
    const MAX: usize = 4096;

    /// Is `e` the first of its kind within the window? (Remembers it if so.)
    fn first(&mut self, e: &Error) -> bool {
        let now = Instant::now();
        let key = (e.vip, e.port, e.client, e.kind);
        if self
            .seen
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < Self::WINDOW)
        {
            return false;
        }
        if self.seen.len() >= Self::MAX {
            self.seen
                .retain(|_, at| now.duration_since(*at) < Self::WINDOW);
            if self.seen.len() >= Self::MAX {
                self.seen.clear();
            }
        }
        self.seen.insert(key, now);
        true
    }
}

/// Errors a second, with a second's worth as the burst.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn serve(
    listen: &[OwnedFd],
    send: &Senders,
    mut stats: PerCpuArray<MapData, u64>,
    targets: &Targets,
    rate: u32,
    stop: &AtomicBool,
) {
    let mut bucket = Bucket {
        rate: f64::from(rate),
        tokens: f64::from(rate),
        at: Instant::now(),
    };
    let mut pollfds: Vec<libc::pollfd> = listen
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut recent = Recent::default();
    let mut buf = vec![0u8; 2048];
    info!(
        sockets = listen.len(),
        "ICMP errors no node was matched to: sent on to every node of their VIP"
    );
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `pollfds` is a valid array of its length.
        let r = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as _, 200) };
        if r <= 0 {
            continue;
        }
        let (mut sent, mut limited) = (0, 0);
        for p in &pollfds {
            if p.revents == 0 {
                continue;
            }
            // At most 64 a socket per wake-up: one busy interface cannot starve the rest.
            for _ in 0..64 {
                let Some(n) = receive(p.fd, &mut buf) else {
                    break;
                };
                let Some(error) = Error::parse(&buf[..n]) else {
                    continue;
                };
                let Some(copies) = targets.of(error.vip, error.port) else {
                    continue;
                };
                if !recent.first(&error) || !bucket.take() {
                    limited += 1;
                    continue;
                }
                for &c in copies {
                    if let Some(packet) = error.copy_for(c) {
                        if let Err(e) = send.send(c, &packet) {
                            warn!(copy = ?c, "sending an ICMP error on: {e}");
                        }
                    }
                }
                sent += 1;
            }
        }
        if sent > 0 {
            bump(&mut stats, Counter::IcmpFanout, sent);
        }
        if limited > 0 {
            bump(&mut stats, Counter::IcmpFanoutLimited, limited);
        }
    }
}

/// One packet received for this host (not one sent, or one for another host) on `fd`, whole;
/// `None` when there is none left.
fn receive(fd: i32, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `buf` and `sll` are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return None;
        }
        let n = n as usize;
        if n <= buf.len() && sll.sll_pkttype == libc::PACKET_HOST {
            return Some(n);
        }
    }
}

#[cfg(test)]
mod tests;
