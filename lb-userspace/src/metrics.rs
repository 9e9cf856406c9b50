//! Prometheus `/metrics`: counters from the pinned maps (the same numbers `cidlb stats` shows),
//! flow table occupancy, node states and health.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{names, Flow, FlowKey};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{info, warn};

use crate::{
    config::{NodeState, Probe},
    health::Tracker,
    stats::Snapshot,
};

/// What the agent shares with the metrics endpoint.
#[derive(Debug, Clone)]
pub struct View {
    pub pin_dir: PathBuf,
    pub nodes: Vec<(u32, NodeState)>,
    pub probe: Probe,
    pub health: Tracker,
    pub flow_capacity: u32,
    /// Per VIP: can this balancer serve it (`announce::local`), as the agent last judged.
    pub ready: Vec<(std::net::IpAddr, bool)>,
    /// Per node id: has an IPv4 address, has an IPv6 address.
    pub families: Vec<(u32, bool, bool)>,
    /// Per family (IPv4, IPv6): in panic mode now (`plan::nodes::panic`), and how often it
    /// entered it since the agent started.
    pub panic: [bool; 2],
    pub panic_entered: [u64; 2],
}

/// Renders the text exposition format (version 0.0.4).
/// `flows`: the flow table's last count and its age.
pub fn render(view: &View, snap: &Snapshot, flows: Option<(u64, Duration)>) -> String {
    let mut out = String::new();
    let fam = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    fam(
        &mut out,
        "cidlb_packets_total",
        "counter",
        "Packets by what the datapath did with them (docs/security.md: What each counter means).",
    );
    for (c, v) in &snap.counters {
        let _ = writeln!(out, "cidlb_packets_total{{reason=\"{}\"}} {v}", c.name());
    }
    fam(
        &mut out,
        "cidlb_node_packets_total",
        "counter",
        "Packets forwarded to (client traffic) and from (replies) each node.",
    );
    for (id, n) in &snap.nodes {
        let _ = writeln!(
            out,
            "cidlb_node_packets_total{{node=\"{id}\",direction=\"to_node\"}} {}",
            n.to_node_packets
        );
        let _ = writeln!(
            out,
            "cidlb_node_packets_total{{node=\"{id}\",direction=\"from_node\"}} {}",
            n.from_node_packets
        );
    }
    fam(
        &mut out,
        "cidlb_node_bytes_total",
        "counter",
        "Bytes (whole frames) forwarded to and from each node.",
    );
    for (id, n) in &snap.nodes {
        let _ = writeln!(
            out,
            "cidlb_node_bytes_total{{node=\"{id}\",direction=\"to_node\"}} {}",
            n.to_node_bytes
        );
        let _ = writeln!(
            out,
            "cidlb_node_bytes_total{{node=\"{id}\",direction=\"from_node\"}} {}",
            n.from_node_bytes
        );
    }
    if let Some((f, age)) = flows {
        fam(
            &mut out,
            "cidlb_flows",
            "gauge",
            "Entries in the flow table, as last counted (see cidlb_flows_age_seconds).",
        );
        let _ = writeln!(out, "cidlb_flows {f}");
        fam(
            &mut out,
            "cidlb_flows_age_seconds",
            "gauge",
            "Seconds since cidlb_flows was counted (every 10 s, in the background).",
        );
        let _ = writeln!(out, "cidlb_flows_age_seconds {:.3}", age.as_secs_f64());
    }
    fam(
        &mut out,
        "cidlb_flow_capacity",
        "gauge",
        "Size of the flow table (LRU).",
    );
    let _ = writeln!(out, "cidlb_flow_capacity {}", view.flow_capacity);
    fam(
        &mut out,
        "cidlb_ready",
        "gauge",
        "1 if this balancer can serve the VIP: datapath attached, interfaces up, first probe round done, not in maintenance (what `cidlb announce` announces, besides the agent's heartbeat).",
    );
    for (vip, ready) in &view.ready {
        let _ = writeln!(out, "cidlb_ready{{vip=\"{vip}\"}} {}", u8::from(*ready));
    }
    fam(
        &mut out,
        "cidlb_node_state",
        "gauge",
        "1 for the node's configured state.",
    );
    for (id, st) in &view.nodes {
        for (name, s) in [
            ("active", NodeState::Active),
            ("draining", NodeState::Draining),
            ("disabled", NodeState::Disabled),
        ] {
            let _ = writeln!(
                out,
                "cidlb_node_state{{node=\"{id}\",state=\"{name}\"}} {}",
                u8::from(*st == s)
            );
        }
    }
    fam(
        &mut out,
        "cidlb_node_up",
        "gauge",
        "1 if the node passes its health checks (always 1 without health checks).",
    );
    for (id, _) in &view.nodes {
        let _ = writeln!(
            out,
            "cidlb_node_up{{node=\"{id}\"}} {}",
            u8::from(view.health.is_up(*id))
        );
    }
    fam(
        &mut out,
        "cidlb_family_nodes",
        "gauge",
        "Nodes not disabled that have an address of the family.",
    );
    fam(
        &mut out,
        "cidlb_family_nodes_up",
        "gauge",
        "Of cidlb_family_nodes, those up (0 with cidlb_family_nodes > 0: the family's new flows are dropped, drop_no_node).",
    );
    for (name, v6) in [("ipv4", false), ("ipv6", true)] {
        let serving: Vec<u32> = view
            .families
            .iter()
            .filter(|(_, has4, has6)| if v6 { *has6 } else { *has4 })
            .map(|(id, _, _)| *id)
            .filter(|id| {
                view.nodes
                    .iter()
                    .any(|(n, st)| n == id && *st != NodeState::Disabled)
            })
            .collect();
        let up = serving.iter().filter(|id| view.health.is_up(**id)).count();
        let _ = writeln!(
            out,
            "cidlb_family_nodes{{family=\"{name}\"}} {}",
            serving.len()
        );
        let _ = writeln!(out, "cidlb_family_nodes_up{{family=\"{name}\"}} {up}");
    }
    fam(
        &mut out,
        "cidlb_panic_mode",
        "gauge",
        "1 while the family is in panic mode: fewer of its active nodes are up than health.panic_threshold (default: none), so health is ignored for its new flows.",
    );
    for (fi, name) in ["ipv4", "ipv6"].into_iter().enumerate() {
        let _ = writeln!(
            out,
            "cidlb_panic_mode{{family=\"{name}\"}} {}",
            u8::from(view.panic[fi])
        );
    }
    fam(
        &mut out,
        "cidlb_panic_mode_entered_total",
        "counter",
        "Times the family entered panic mode since the agent started.",
    );
    for (fi, name) in ["ipv4", "ipv6"].into_iter().enumerate() {
        let _ = writeln!(
            out,
            "cidlb_panic_mode_entered_total{{family=\"{name}\"}} {}",
            view.panic_entered[fi]
        );
    }
    if view.probe != Probe::None {
        fam(
            &mut out,
            "cidlb_health_probes_total",
            "counter",
            "Health probes by result.",
        );
        for (id, h) in &view.health.nodes {
            let _ = writeln!(
                out,
                "cidlb_health_probes_total{{node=\"{id}\",result=\"ok\"}} {}",
                h.probes_ok
            );
            let _ = writeln!(
                out,
                "cidlb_health_probes_total{{node=\"{id}\",result=\"failed\"}} {}",
                h.probes_failed
            );
        }
        fam(
            &mut out,
            "cidlb_health_transitions_total",
            "counter",
            "Up/down changes of each node.",
        );
        for (id, h) in &view.health.nodes {
            let _ = writeln!(
                out,
                "cidlb_health_transitions_total{{node=\"{id}\"}} {}",
                h.transitions
            );
        }
    }
    out
}

/// Counts the pinned flow table's entries (walks the keys, one syscall each: bounded by its
/// capacity, and slow at a large one; [`FlowCount`] runs it in the background).
pub fn count_flows(pin_dir: &std::path::Path) -> Option<u64> {
    let data = MapData::from_pin(pin_dir.join(names::FLOWS)).ok()?;
    let flows: HashMap<_, FlowKey, Flow> = HashMap::try_from(Map::LruHashMap(data)).ok()?;
    Some(flows.keys().filter(Result::is_ok).count() as u64)
}

/// Most `/metrics` connections served at once; more are answered 503 and closed at once, so a
/// flood of (idle) connections can neither exhaust the agent's file descriptors nor its memory.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the flow table is counted (off the agent's thread; see [`FlowCount`]).
pub const FLOW_COUNT_EVERY: Duration = Duration::from_secs(10);

/// The flow table's entry count, refreshed by a background thread: counting walks every key
/// with one syscall each (a million at the default capacity), far too slow for a scrape, and
/// it must never run on the agent's only runtime thread (reloads, signals, probes).
#[derive(Clone, Default)]
pub struct FlowCount(Arc<Mutex<Option<(u64, Instant)>>>);

impl FlowCount {
    /// The last count and its age.
    pub fn get(&self) -> Option<(u64, Duration)> {
        let (n, at) = (*self.0.lock().ok()?)?;
        Some((n, at.elapsed()))
    }

    /// Counts the flows pinned under `pin_dir` now and then every `every`, until `stop`.
    pub fn spawn(&self, pin_dir: PathBuf, every: Duration, stop: Arc<AtomicBool>) {
        let cell = self.0.clone();
        let spawned = std::thread::Builder::new()
            .name("cidlb-flows".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(n) = count_flows(&pin_dir) {
                        if let Ok(mut c) = cell.lock() {
                            *c = Some((n, Instant::now()));
                        }
                    }
                    let next = Instant::now() + every;
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("metrics: cannot start the flow counting thread ({e}); cidlb_flows stays absent");
        }
    }
}

/// Stops the flow counting thread when `serve` ends (or its task is aborted).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Serves `/metrics` on `addr` until the task is dropped. At most [`MAX_CONNECTIONS`] at once,
/// each bounded by [`IO_TIMEOUT`]; an accept error (e.g. EMFILE) is logged and waited out, it
/// never ends the server.
pub async fn serve(addr: SocketAddr, view: Arc<Mutex<View>>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("stats.prometheus: cannot listen on {addr}: {e}"))?;
    info!(%addr, "serving Prometheus metrics on /metrics");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let flows = FlowCount::default();
    let pin_dir = view.lock().map(|v| v.pin_dir.clone()).unwrap_or_default();
    flows.spawn(pin_dir, FLOW_COUNT_EVERY, stop);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_complaint: Option<Instant> = None;
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                if last_complaint.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(error = %e, "metrics: accepting a connection failed; retrying");
                    last_complaint = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Never blocks: the answer fits in the socket buffer of a fresh connection.
            let _ = conn.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        };
        let (view, flows) = (view.clone(), flows.clone());
        tokio::spawn(async move {
            let _slot = slot;
            handle(conn, view, flows).await;
        });
    }
}

async fn handle(mut conn: TcpStream, view: Arc<Mutex<View>>, flows: FlowCount) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        let v = view.lock().map(|v| v.clone()).ok();
        match v {
            // Reading the pinned counters is a few hundred syscalls: off the runtime thread.
            Some(v) => tokio::task::spawn_blocking(move || match Snapshot::from_pins(&v.pin_dir) {
                Ok(snap) => ("200 OK", render(&v, &snap, flows.get())),
                Err(e) => {
                    warn!("metrics: {e:#}");
                    ("503 Service Unavailable", format!("{e:#}\n"))
                }
            })
            .await
            .unwrap_or(("500 Internal Server Error", String::new())),
            None => ("500 Internal Server Error", String::new()),
        }
    } else {
        ("404 Not Found", "try /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use lb_common::Counter;

    use super::*;

    #[test]
    fn renders_families_with_help_and_type() {
        let mut snap = Snapshot::default();
        for &c in Counter::ALL {
            snap.counters.push((c, 1));
        }
        snap.nodes.insert(
            1,
            lb_common::NodeStats {
                to_node_packets: 5,
                ..Default::default()
            },
        );
        let mut health = Tracker::new(3, 2);
        health.retain(&[1], 3, 2);
        let view = View {
            pin_dir: PathBuf::new(),
            nodes: vec![(1, NodeState::Draining)],
            probe: Probe::Dtls,
            health,
            flow_capacity: 1024,
            ready: vec![("192.0.2.10".parse().unwrap(), true)],
            families: vec![(1, true, false)],
            panic: [true, false],
            panic_entered: [2, 0],
        };
        let text = render(&view, &snap, Some((3, Duration::from_millis(2500))));
        assert!(text.contains("# TYPE cidlb_packets_total counter\n"));
        assert!(text.contains("cidlb_packets_total{reason=\"cid_routed\"} 1\n"));
        assert!(text.contains("cidlb_node_packets_total{node=\"1\",direction=\"to_node\"} 5\n"));
        assert!(text.contains("cidlb_node_state{node=\"1\",state=\"draining\"} 1\n"));
        assert!(text.contains("cidlb_node_up{node=\"1\"} 1\n"));
        assert!(text.contains("cidlb_ready{vip=\"192.0.2.10\"} 1\n"));
        assert!(text.contains("cidlb_family_nodes{family=\"ipv4\"} 1\n"));
        assert!(text.contains("cidlb_family_nodes{family=\"ipv6\"} 0\n"));
        assert!(text.contains("cidlb_panic_mode{family=\"ipv4\"} 1\n"));
        assert!(text.contains("cidlb_panic_mode{family=\"ipv6\"} 0\n"));
        assert!(text.contains("cidlb_panic_mode_entered_total{family=\"ipv4\"} 2\n"));
        assert!(text.contains("cidlb_flows 3\n"));
        assert!(text.contains("cidlb_flows_age_seconds 2.500\n"));
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} used before its TYPE");
            }
        }
    }
}
