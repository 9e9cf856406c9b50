//! UDP traffic for the netns tests: echo servers on the nodes and sequence-numbered streams
//! from the client, so every lost packet is seen.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

/// A UDP echo server in node `k`'s namespace answering `node=<k> ` + payload, padded with zeros
/// to N bytes when the payload ends in `pad=N` (N up to [`MAX_PAD`]: a large reply).
pub struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

/// The largest reply [`Echo`] pads to.
pub const MAX_PAD: usize = 4000;

/// The reply size a payload asks [`Echo`] for with its `pad=N` suffix.
fn padded_to(payload: &[u8]) -> Option<usize> {
    let at = payload.windows(4).rposition(|w| w == b"pad=")?;
    let n: usize = std::str::from_utf8(&payload[at + 4..]).ok()?.parse().ok()?;
    Some(n.min(MAX_PAD))
}

impl Echo {
    pub fn start(ns_name: &str, k: usize, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (name, flag) = (ns_name.to_owned(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            lb_lab::enter(&name);
            let s = UdpSocket::bind(("::", port)).expect("bind echo");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let _ = ready_tx.send(());
            let mut buf = [0u8; 2048];
            let mut served = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if let Ok((len, from)) = s.recv_from(&mut buf) {
                    let mut out = format!("node={k} ").into_bytes();
                    out.extend_from_slice(&buf[..len]);
                    if let Some(n) = padded_to(&buf[..len]) {
                        out.resize(n.max(out.len()), 0);
                    }
                    let _ = s.send_to(&out, from);
                    served += 1;
                }
            }
            served
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server did not start");
        Echo {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the server (its socket closes: the node answers ICMP port unreachable).
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().map_or(0, |h| h.join().unwrap_or(0))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a stream saw.
#[derive(Debug, Default)]
pub struct StreamReport {
    pub sent: u64,
    pub received: u64,
    /// Sequence numbers never answered.
    pub lost: Vec<u64>,
    /// Which nodes answered, and how often.
    pub nodes: BTreeMap<u32, u64>,
    /// Answers from an address other than the VIP.
    pub wrong_source: u64,
}

/// Sends `make(seq)` every `interval` from one socket in the client namespace and collects
/// echoes, until stopped. Bounded: at most `max` packets.
/// A record body for a [`Stream`] datagram: `text`, then the sequence number (8 bytes, big
/// endian), which the stream reads back from the end of the node's echo. It goes inside the
/// record, so the datagram is one whole record: cidlb routes by CID only a datagram whose
/// records all name one node, and bytes after a record are not one.
pub fn body(text: &[u8], seq: u64) -> Vec<u8> {
    [text, &seq.to_be_bytes()].concat()
}

pub struct Stream {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<StreamReport>>,
}

impl Stream {
    pub fn start(
        client_ns: &str,
        vip: SocketAddr,
        interval: Duration,
        max: u64,
        make: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (name, flag) = (client_ns.to_owned(), stop.clone());
        let handle = thread::spawn(move || {
            lb_lab::enter(&name);
            let bind = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(bind).expect("bind client");
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let rx = s.try_clone().unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let done2 = done.clone();
            let receiver = thread::spawn(move || {
                let mut seen = BTreeSet::new();
                let mut nodes = BTreeMap::new();
                let mut wrong = 0;
                let mut buf = [0u8; 2048];
                rx.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let mut quiet_after_done = 0;
                loop {
                    match rx.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            if from != vip {
                                wrong += 1;
                            }
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let node = text
                                .strip_prefix("node=")
                                .and_then(|t| t.split(' ').next())
                                .and_then(|t| t.parse().ok());
                            if let (Some(node), true) = (node, n >= 8) {
                                let seq = u64::from_be_bytes(buf[n - 8..n].try_into().unwrap());
                                if seen.insert(seq) {
                                    *nodes.entry(node).or_insert(0) += 1;
                                }
                            }
                        }
                        Err(_) => {
                            if done2.load(Ordering::Relaxed) {
                                quiet_after_done += 1;
                                if quiet_after_done > 25 {
                                    break;
                                }
                            }
                        }
                    }
                }
                (seen, nodes, wrong)
            });
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) && sent < max {
                let p = make(sent);
                debug_assert!(p.ends_with(&sent.to_be_bytes()), "see `body`");
                let _ = s.send_to(&p, vip);
                sent += 1;
                thread::sleep(interval);
            }
            done.store(true, Ordering::Relaxed);
            let (seen, nodes, wrong_source) = receiver.join().unwrap();
            StreamReport {
                sent,
                received: seen.len() as u64,
                lost: (0..sent).filter(|q| !seen.contains(q)).collect(),
                nodes,
                wrong_source,
            }
        });
        Stream {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> StreamReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("once")
            .join()
            .expect("stream thread")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Exchanges a few CID records with every node over both VIPs until each answers, so that
/// neighbour entries exist before a measured stream starts. Panics if a node never answers.
pub fn warm_up(client_ns: &str, nodes: usize) {
    let name = client_ns.to_owned();
    thread::spawn(move || {
        lb_lab::enter(&name);
        for vip in [SocketAddr::from((lb_lab::VIP4, lb_lab::PORT)), SocketAddr::from((lb_lab::VIP6, lb_lab::PORT))] {
            let s = UdpSocket::bind(if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            for k in 1..=nodes as u8 {
                let rec = lb_lab::packet::cid_record(&[k, 0xee, 0xee, 0xee, 0xee, 0xee], b"warm-up");
                let mut buf = [0u8; 512];
                let answered = (0..25).any(|_| {
                    let _ = s.send_to(&rec, vip);
                    matches!(s.recv_from(&mut buf), Ok((n, _)) if buf[..n].starts_with(format!("node={k} ").as_bytes()))
                });
                assert!(answered, "node {k} never answered over {vip} during warm-up");
            }
        }
    })
    .join()
    .expect("warm-up");
}
