//! The running agent: start (fresh, or adopting a pinned datapath), reload, health checks,
//! metrics. The datapath is pinned, so this process can stop, crash or be upgraded without
//! interrupting forwarding.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::maps::Map;
use lb_common::names;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    announce::{self, Heartbeat},
    config::{Config, Encap, NodeState, Probe},
    datapath::{self, Datapath},
    ebpf::DatapathError,
    health::{self, Tracker},
    host::Host,
    icmp_fanout::Fanout,
    layout,
    metrics::{self, View},
    pinlock::PinLock,
    plan, provision,
    ready::Ready,
    statedir::StateDir,
    upgrade,
};

/// How `cidlb run` ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Decide and count, but pass every packet unchanged (`--shadow`).
    pub shadow: bool,
    /// Remove the pinned datapath on SIGINT/SIGTERM instead of leaving it forwarding.
    pub detach_on_exit: bool,
}

pub struct Agent {
    path: PathBuf,
    opts: RunOptions,
    pub cfg: Config,
    dp: Datapath,
    pub view: Arc<Mutex<View>>,
    /// The host's addresses and VLAN devices as last written (see `host.rs`).
    host: Host,
    /// ICMP errors no node was matched to, sent on to every node of their VIP
    /// (`icmp_fanout`); restarted with each config.
    fanout: Option<Fanout>,
}

fn load_config(path: &Path, shadow: bool) -> anyhow::Result<Config> {
    let mut cfg = Config::load(path)?;
    for w in plan::reverse::reverse_entries(&cfg)
        .1
        .into_iter()
        .chain(cfg.warnings())
    {
        warn!("{}: {w}", path.display());
    }
    cfg.shadow = shadow;
    Ok(cfg)
}

impl Agent {
    /// Loads the config and brings the datapath up: adopting the maps, flows and links pinned
    /// under `pin_dir` if a datapath is there (after checking it has this binary's layout),
    /// creating them otherwise. A failed first start leaves nothing pinned or attached; a failed
    /// adoption leaves the pinned datapath running its previous program.
    ///
    /// `carried_down`: nodes the previous agent's health checks held down (a restart within
    /// `announce.grace`): they start down instead of up.
    pub fn start(path: &Path, opts: RunOptions, carried_down: &[u32]) -> anyhow::Result<Self> {
        let cfg = load_config(path, opts.shadow)?;
        datapath::require_root("cidlb run")?;
        let ifindexes = datapath::resolve_interfaces(&cfg.interfaces)?;
        if let Some(what) = upgrade::recover(&cfg.pin_dir)? {
            warn!(pin_dir = %cfg.pin_dir.display(), "{what}");
        }
        let from_layout = layout::pinned_version(&cfg.pin_dir)?;
        let upgrading = upgrade::needed(&cfg.pin_dir, Some(path))?;
        let adopting = datapath::is_pinned(&cfg.pin_dir);
        let pin_dir = cfg.pin_dir.clone();
        match Self::bring_up(
            path,
            opts,
            cfg,
            &ifindexes,
            adopting,
            upgrading,
            carried_down,
        ) {
            Ok(agent) => Ok(agent),
            Err((e, _)) if upgrading => Err(e.context(format!(
                "upgrading the datapath pinned under {} from layout {} to {} failed; it keeps \
                 forwarding (see above for which program its links run)",
                pin_dir.display(),
                from_layout.unwrap_or(0),
                lb_common::LAYOUT_VERSION,
            ))),
            // The Datapath is dropped by now, which detached the links it had not pinned.
            Err((e, _)) if !adopting => {
                datapath::detach(&pin_dir);
                Err(e.context(format!(
                    "starting cidlb failed; nothing is left attached or pinned under {}",
                    pin_dir.display()
                )))
            }
            Err((e, maps_written)) => Err(e.context(format!(
                "adopting the datapath pinned under {} failed; it keeps running its previous \
                 program{}",
                pin_dir.display(),
                if maps_written {
                    ", but its maps already hold this config (nodes, VIPs, reverse NAT): start \
                     cidlb again with the config it ran before, or fix this one"
                } else {
                    " and its maps are unchanged"
                }
            ))),
        }
    }

    /// [`Agent::start`] after the checks; an error also says whether the maps were written.
    fn bring_up(
        path: &Path,
        opts: RunOptions,
        cfg: Config,
        ifindexes: &[u32],
        adopting: bool,
        upgrading: bool,
        carried_down: &[u32],
    ) -> Result<Self, (anyhow::Error, bool)> {
        let pin_dir = cfg.pin_dir.clone();
        // Before any link runs the new program, a failed upgrade removes its own maps and
        // leaves the old datapath as it was.
        let abandon = |e: anyhow::Error| {
            if upgrading {
                upgrade::abandon(&pin_dir);
            }
            (e, false)
        };
        let dp = if upgrading {
            Datapath::load_pinned_in(&cfg, &upgrade::staging(&cfg.pin_dir))
        } else {
            Datapath::load_pinned(&cfg)
        }
        .map_err(|e| abandon(e.into()))?;
        let mut health = Tracker::new(cfg.health.fall, cfg.health.rise);
        health.retain(
            &cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
            cfg.health.fall,
            cfg.health.rise,
        );
        for id in carried_down {
            if let Some(h) = health.nodes.get_mut(id) {
                h.up = false;
            }
        }
        let view = Arc::new(Mutex::new(View {
            pin_dir: cfg.pin_dir.clone(),
            nodes: Vec::new(),
            probe: cfg.health.probe,
            health,
            flow_capacity: cfg.flows.capacity,
            ready: Vec::new(),
            families: Vec::new(),
            panic: [false; 2],
            panic_entered: [0; 2],
        }));
        let mut agent = Agent {
            path: path.to_owned(),
            opts,
            cfg,
            dp,
            view,
            host: Host::default(),
            fanout: None,
        };
        agent.check_capacity();
        let old_flows = pin_dir.join(names::FLOWS);
        if upgrading {
            let n = upgrade::copy_flows(&old_flows, &mut agent.dp.ebpf, true)
                .map_err(|e| abandon(e.into()))?;
            info!(flows = ?n, "upgrade: flows copied to the new layout's table");
        }
        // New interfaces first: if one cannot take the program, nothing else was touched.
        let pending = agent
            .dp
            .attach_new(&agent.cfg)
            .map_err(|e| abandon(e.into()))?;
        agent.apply(ifindexes).map_err(|e| {
            if upgrading {
                abandon(e.into())
            } else {
                (e.into(), true)
            }
        })?;
        if upgrading {
            upgrade::begin_swap(&pin_dir).map_err(|e| abandon(e.into()))?;
        }
        match agent.dp.commit(&agent.cfg, pending) {
            Ok(()) => {}
            // Every link runs the old program again: nothing of the upgrade remains.
            Err(e @ DatapathError::RolledBack { .. }) if upgrading => {
                return Err(abandon(e.into()))
            }
            Err(e) => return Err((e.into(), true)),
        }
        if upgrading {
            upgrade::failpoint("after-swap");
            // The flows the old program made while the links were swapped; then the new maps'
            // pins replace the old ones. A failure here is finished by the next `cidlb run`.
            let n = upgrade::copy_flows(&old_flows, &mut agent.dp.ebpf, false)
                .map_err(|e| (e.into(), true))?;
            upgrade::finish(&pin_dir).map_err(|e| (e.into(), true))?;
            info!(
                flows = ?n,
                layout = lb_common::LAYOUT_VERSION,
                "upgrade: every link runs this program; flows made meanwhile copied; the old \
                 layout's pins replaced"
            );
        }
        agent.publish();
        agent.restart_fanout(ifindexes);
        info!(
            pin_dir = %agent.cfg.pin_dir.display(),
            adopted = adopting,
            shadow = opts.shadow,
            "datapath {}",
            if upgrading {
                "upgraded from another layout: flows kept, counters start fresh"
            } else if adopting {
                "adopted: flows and counters kept"
            } else {
                "created"
            }
        );
        Ok(agent)
    }

    /// Writes the maps from the current config and node health.
    fn apply(&mut self, ifindexes: &[u32]) -> Result<(), DatapathError> {
        let health = self
            .view
            .lock()
            .map(|v| v.health.clone())
            .unwrap_or_default();
        provision::provision(&mut self.dp.ebpf, &self.cfg, ifindexes, &|id| {
            health.is_up(id)
        })?;
        self.note_panic(&health);
        Ok(())
    }

    /// Logs and counts a family entering or leaving panic mode (`plan::nodes::panic`), as the
    /// maps just written have it.
    fn note_panic(&self, health: &Tracker) {
        let now = plan::nodes::panic(&self.cfg, &|id| health.is_up(id));
        let Ok(mut v) = self.view.lock() else {
            return;
        };
        for (fi, family) in ["IPv4", "IPv6"].into_iter().enumerate() {
            match (v.panic[fi], now[fi]) {
                (false, true) => {
                    v.panic_entered[fi] += 1;
                    warn!(
                        family,
                        threshold = ?self.cfg.health.panic_threshold,
                        "panic mode: too few nodes pass their health checks; health is ignored \
                         for this family's new flows until enough are up again"
                    );
                }
                (true, false) => {
                    info!(family, "panic mode over: health applies to new flows again")
                }
                _ => {}
            }
        }
        v.panic = now;
    }

    /// Keeps the neighbour entries towards the nodes of tunnel VIPs resolved: the datapath
    /// drops a tunnel packet whose next hop has none (`drop_tunnel_no_neigh`; the kernel cannot
    /// take it and resolve it, as it does for a NAT packet). An empty datagram to each such
    /// node's address, port 9 (discard), makes the kernel resolve the next hop and keep it
    /// (a stale entry still serves the FIB lookup). Called every few seconds.
    fn keep_tunnel_neighbours(&self) {
        let tunnelled: Vec<IpAddr> = self
            .cfg
            .vips
            .iter()
            .filter(|v| v.tunnel().is_some())
            .map(|v| v.address)
            .collect();
        let mut sent = std::collections::HashSet::new();
        for node in &self.cfg.nodes {
            for vip in &tunnelled {
                let Some(addr) = node.address_for(*vip) else {
                    continue;
                };
                if !sent.insert(addr) {
                    continue;
                }
                let any: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                if let Ok(s) = std::net::UdpSocket::bind(any) {
                    let _ = s.send_to(&[], (addr, 9));
                }
            }
        }
    }

    /// Rewrites `LOCAL_ADDRS`, `SRC_FILTER` and `VLAN_IFACES` if the host's addresses or VLAN
    /// devices changed since the last look (called every second).
    fn refresh_host(&mut self) {
        let now = Host::read();
        if now == self.host {
            return;
        }
        match provision::host(&mut self.dp.ebpf, &self.cfg, &now) {
            Ok(()) => {
                info!(
                    addresses = now.addrs.len(),
                    vlans = now.vlans.len(),
                    "host addresses or VLAN devices changed: maps updated"
                );
                self.host = now;
            }
            Err(e) => error!("updating the host's addresses and VLAN devices: {e}"),
        }
    }

    /// Stops the ICMP fan-out of the previous config and starts this one's. A socket that
    /// cannot be opened leaves it off, logged: the datapath forwards as before.
    fn restart_fanout(&mut self, ifindexes: &[u32]) {
        self.fanout = None;
        match Fanout::start(&self.cfg, ifindexes) {
            Ok(f) => self.fanout = f,
            Err(e) => error!(
                "ICMP errors no node was matched to stay with the kernel (not sent on to the \
                 VIP's nodes): {e:#}"
            ),
        }
    }

    fn publish(&self) {
        if let Ok(mut v) = self.view.lock() {
            v.nodes = self.cfg.nodes.iter().map(|n| (n.id, n.state)).collect();
            v.families = self
                .cfg
                .nodes
                .iter()
                .map(|n| (n.id, n.v4().is_some(), n.v6().is_some()))
                .collect();
            v.probe = self.cfg.health.probe;
            let ids: Vec<u32> = self.cfg.nodes.iter().map(|n| n.id).collect();
            v.health
                .retain(&ids, self.cfg.health.fall, self.cfg.health.rise);
        }
    }

    /// A pinned flow table (and cookie table) keeps its size; say so if the config asks for
    /// another.
    fn check_capacity(&mut self) {
        let size = |name: &str| match self.dp.ebpf.map(name) {
            Some(Map::LruHashMap(m)) => m.info().ok().map(|i| i.max_entries()),
            _ => None,
        };
        if let Some(actual) = size(lb_common::cookie::COOKIES) {
            if actual != self.cfg.cookie_capacity() {
                warn!(
                    configured = self.cfg.cookie_capacity(),
                    actual,
                    "limits.cookie_capacity differs from the pinned cookie table's size; it \
                     keeps its size until `cidlb detach` and a fresh start"
                );
            }
        }
        if let Some(actual) = size(lb_common::frag::FRAGS) {
            if actual != self.cfg.fragment_capacity() {
                warn!(
                    configured = self.cfg.fragment_capacity(),
                    actual,
                    "limits.fragment_capacity differs from the pinned fragment table's size; \
                     it keeps its size until `cidlb detach` and a fresh start"
                );
            }
        }
        if let Some(actual) = size(names::FLOWS) {
            if actual != self.cfg.flows.capacity {
                warn!(
                    configured = self.cfg.flows.capacity,
                    actual,
                    "flows.capacity differs from the pinned flow table's size; it keeps its size \
                     (and its flows) until `cidlb detach` and a fresh start"
                );
            }
            if let Ok(mut v) = self.view.lock() {
                v.flow_capacity = actual;
            }
        }
    }

    /// Re-reads the config file and applies it in place. On any error the running config and
    /// datapath stay as they were: a new program is attached to new interfaces before anything
    /// else changes; if writing the maps or swapping the links fails after that, the links get
    /// the previous program back, new interfaces are detached again, and the maps are rewritten
    /// from the running config. The error says so, or says exactly what could not be restored.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let new = load_config(&self.path, self.opts.shadow)?;
        if new.pin_dir != self.cfg.pin_dir {
            anyhow::bail!(
                "{}: pin_dir: cannot change from {} while running; restart cidlb to move the datapath",
                self.path.display(),
                self.cfg.pin_dir.display()
            );
        }
        let ifindexes = datapath::resolve_interfaces(&new.interfaces)?;
        let relink = new.dp_config() != self.cfg.dp_config()
            || new.interfaces != self.cfg.interfaces
            || new.xdp_mode != self.cfg.xdp_mode;
        let mut maps_written = false;
        let old = std::mem::replace(&mut self.cfg, new);
        let result: anyhow::Result<()> = if relink {
            // New load-time constants: a new program over the same pinned maps, swapped into
            // the pinned links atomically.
            (|| {
                let mut dp = Datapath::load_pinned(&self.cfg)?;
                let pending = dp.attach_new(&self.cfg)?;
                let previous = std::mem::replace(&mut self.dp, dp);
                maps_written = true;
                let r = self
                    .apply(&ifindexes)
                    .and_then(|()| self.dp.commit(&self.cfg, pending));
                if r.is_err() {
                    // Dropping the new program detaches the interfaces it alone was attached to.
                    self.dp = previous;
                }
                Ok(r?)
            })()
        } else {
            maps_written = true;
            self.apply(&ifindexes).map_err(anyhow::Error::from)
        };
        if let Err(e) = result {
            self.cfg = old;
            if !maps_written {
                return Err(e.context("the running config stays; nothing was changed"));
            }
            let restored =
                datapath::resolve_interfaces(&self.cfg.interfaces).and_then(|ifs| self.apply(&ifs));
            return Err(match restored {
                Ok(()) => e.context("the running config stays: its maps were written back"),
                Err(r) => e.context(format!(
                    "writing the running config's maps back failed too ({r}); the links run \
                     the previous program over maps partly written from the new config: fix \
                     the config and reload, or restart cidlb"
                )),
            });
        }
        self.check_capacity();
        self.publish();
        self.restart_fanout(&ifindexes);
        info!(
            relinked = relink,
            nodes = self.cfg.nodes.len(),
            "config reloaded"
        );
        Ok(())
    }

    /// Applies a node's health change: only the node table and rings change.
    fn health_changed(&mut self) -> Result<(), DatapathError> {
        let health = self
            .view
            .lock()
            .map(|v| v.health.clone())
            .unwrap_or_default();
        provision::nodes_and_rings(&mut self.dp.ebpf, &self.cfg, &|id| health.is_up(id))?;
        self.note_panic(&health);
        Ok(())
    }

    /// Writes the heartbeat `cidlb announce` follows (with the running config's VIPs and the
    /// nodes held down) and the per-VIP readiness `/metrics` shows. `probed`: nodes with a
    /// probe result since start. `round_done` latches: once every node was probed (or the
    /// round was carried over from the previous agent), a node added by a reload does not
    /// gate readiness again. A failing write is logged once (and its end), not every second.
    fn heartbeat(
        &self,
        probed: &std::collections::HashSet<u32>,
        round_done: &mut bool,
        failing: &mut bool,
    ) {
        if !*round_done {
            *round_done = self.cfg.health.probe == Probe::None
                || self
                    .probe_targets()
                    .iter()
                    .all(|(id, _)| probed.contains(id));
        }
        let round_done = *round_done;
        let down: Vec<u32> = self
            .view
            .lock()
            .map(|v| {
                v.health
                    .nodes
                    .iter()
                    .filter(|(_, h)| !h.up)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        let vips = self.cfg.vips.iter().map(|v| v.address).collect();
        let written = match &self.cfg.announce {
            Some(a) => {
                announce::write_heartbeat(&a.state_dir, &Heartbeat::now(round_done, vips, down))
            }
            None => Ok(()),
        };
        match written {
            Ok(()) if *failing => {
                info!("heartbeat written again");
                *failing = false;
            }
            Ok(()) => {}
            Err(e) if !*failing => {
                error!("{e}; `cidlb announce` will withdraw the VIPs after announce.grace");
                *failing = true;
            }
            Err(_) => {}
        }
        let ready = announce::local(&self.cfg, round_done).ready();
        if let Ok(mut v) = self.view.lock() {
            v.ready = self.cfg.vips.iter().map(|x| (x.address, ready)).collect();
        }
    }

    /// The nodes to probe, and how. A node of a tunnel VIP is probed through the tunnel, at
    /// the first tunnel VIP it has an address for (a DTLS probe: it tests the decapsulation
    /// too); any other node at its own address.
    fn probe_targets(&self) -> Vec<(u32, Target)> {
        self.cfg
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Disabled)
            .filter_map(|n| {
                let port = self.cfg.probe_port(n);
                let tunnelled = self.cfg.vips.iter().find_map(|v| {
                    let t = v.tunnel()?;
                    let node = n.address_for(v.address)?;
                    let how = match (t.encap, t.gue_port) {
                        (Encap::Gue, Some(p)) => health::Tunnelled::Gue(p),
                        _ => health::Tunnelled::Ipip,
                    };
                    Some(Target::Tunnel {
                        node,
                        vip: SocketAddr::new(v.address, port),
                        how,
                    })
                });
                let target = match tunnelled {
                    Some(t) if self.cfg.health.probe == Probe::Dtls => t,
                    _ => Target::Direct(SocketAddr::new(n.v4().or(n.v6())?, port)),
                };
                Some((n.id, target))
            })
            .collect()
    }
}

/// Where a node's probe goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The node's own address and the probe port.
    Direct(SocketAddr),
    /// Through the tunnel to `node`, for the VIP's address and the probe port.
    Tunnel {
        node: IpAddr,
        vip: SocketAddr,
        how: health::Tunnelled,
    },
}

/// A probe result: (generation, node id, alive).
type ProbeResult = (u64, u32, bool);

fn spawn_probes(
    agent: &Agent,
    generation: u64,
    tx: &mpsc::Sender<ProbeResult>,
) -> Vec<JoinHandle<()>> {
    let h = agent.cfg.health.clone();
    if h.probe == Probe::None {
        return Vec::new();
    }
    agent
        .probe_targets()
        .into_iter()
        .map(|(id, target)| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(h.interval);
                loop {
                    tick.tick().await;
                    let ok = match target {
                        Target::Direct(addr) => health::probe(h.probe, addr, h.timeout).await,
                        Target::Tunnel { node, vip, how } => {
                            health::probe_tunnel(node, vip, how, h.timeout).await
                        }
                    };
                    if tx.send((generation, id, ok)).await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect()
}

fn spawn_metrics(agent: &Agent) -> Option<JoinHandle<()>> {
    let addr = agent.cfg.stats.prometheus?;
    let view = agent.view.clone();
    Some(tokio::spawn(async move {
        if let Err(e) = metrics::serve(addr, view).await {
            error!("{e:#}");
        }
    }))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Re-writes a previous agent's heartbeat (fresh, same VIPs and nodes held down) once a second
/// until dropped: the restart's bridge, while the new agent loads and adopts the pinned
/// datapath that keeps forwarding meanwhile.
struct HeartbeatBridge {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeartbeatBridge {
    fn start(state_dir: PathBuf, previous: &Heartbeat) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (flag, vips, down) = (stop.clone(), previous.vips.clone(), previous.down.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let hb = Heartbeat::now(true, vips.clone(), down.clone());
                if let Err(e) = announce::write_heartbeat(&state_dir, &hb) {
                    warn!("{e}");
                }
                // Checked every 100 ms, written every second.
                for _ in 0..10 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HeartbeatBridge {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `cidlb run`: start, then serve signals, file changes and health probes until SIGINT/SIGTERM.
/// `ready_file` (`--ready-file`) is written once the datapath is up and removed on a clean exit
/// (see `ready.rs`).
pub fn run(path: &Path, opts: RunOptions, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    // One agent per pin_dir, decided before anything is touched (the ready file, the
    // heartbeat, the maps): a second one refuses, naming the holder (pinlock.rs).
    let first = Config::load(path)?;
    datapath::require_root("cidlb run")?;
    let lock = PinLock::acquire(&first.pin_dir)?;
    // A state directory others can write is refused (statedir.rs), not warned about.
    if let Some(a) = &first.announce {
        StateDir::open(&a.state_dir)?;
    }
    let mut ready = Ready::new(ready_file)?;
    // A restart (a datapath is pinned, and the previous agent's heartbeat is at most
    // announce.grace old and says its probe round was done) carries the round and the nodes
    // held down over: the VIPs stay announced throughout. A first start, or one after the
    // previous agent was dead longer than the grace, writes a heartbeat that says "first
    // probe round not done" before anything is attached, so a previous agent's heartbeat
    // cannot get the VIPs announced before this agent has probed its nodes.
    let previous: Option<Heartbeat> = first.announce.as_ref().and_then(|a| {
        let hb = announce::read_heartbeat(&a.state_dir)?;
        let age = hb.age()?;
        (datapath::is_pinned(&first.pin_dir) && hb.probed && age <= a.grace).then(|| {
            info!(
                previous_pid = hb.pid,
                heartbeat_age_ms = age.as_millis() as u64,
                down = ?hb.down,
                "restart: probe round and node health carried over from the previous agent"
            );
            hb
        })
    });
    // Meanwhile the pinned datapath keeps forwarding for the previous agent's VIPs, and
    // loading the program takes seconds (the verifier): its heartbeat is kept fresh until
    // this agent writes its own, so a restart never withdraws a route.
    let bridge = first
        .announce
        .as_ref()
        .zip(previous.as_ref())
        .map(|(a, hb)| HeartbeatBridge::start(a.state_dir.clone(), hb));
    let carried: Option<Vec<u32>> = previous.map(|hb| hb.down);
    if let (Some(a), None) = (&first.announce, &carried) {
        let hb = Heartbeat::now(false, Vec::new(), Vec::new());
        if let Err(e) = announce::write_heartbeat(&a.state_dir, &hb) {
            warn!("{e}");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let started = Agent::start(path, opts, carried.as_deref().unwrap_or_default());
        drop(bridge);
        let mut agent = started?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, mut rx) = mpsc::channel::<ProbeResult>(256);
        let mut generation = 0u64;
        let mut probes = spawn_probes(&agent, generation, &tx);
        let mut metrics_task = spawn_metrics(&agent);
        let mut seen = mtime(path);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        info!("cidlb running; SIGHUP (or editing the config) reloads, SIGINT/SIGTERM stops");
        // Nodes probed at least once since this agent started: ready to be announced only
        // after a full round (see announce.rs). The first heartbeat is written before the
        // ready file, so a reader of one finds the other.
        let mut probed_ids = std::collections::HashSet::new();
        let mut round_done = carried.is_some();
        let mut heartbeat_failing = false;
        agent.heartbeat(&probed_ids, &mut round_done, &mut heartbeat_failing);
        ready.signal(&agent.cfg.pin_dir)?;
        loop {
            let reload = tokio::select! {
                _ = hup.recv() => {
                    info!("SIGHUP: reloading");
                    true
                }
                _ = tick.tick() => {
                    agent.heartbeat(&probed_ids, &mut round_done, &mut heartbeat_failing);
                    agent.refresh_host();
                    if ticks.is_multiple_of(5) {
                        agent.keep_tunnel_neighbours();
                    }
                    ticks += 1;
                    let now = mtime(path);
                    if now != seen {
                        seen = now;
                        info!(file = %path.display(), "config file changed: reloading");
                        true
                    } else {
                        false
                    }
                }
                Some((g, id, ok)) = rx.recv() => {
                    if g == generation {
                        probed_ids.insert(id);
                        let change = agent.view.lock().ok().and_then(|mut v| v.health.record(id, ok));
                        if let Some(up) = change {
                            match agent.health_changed() {
                                Err(e) => error!("applying node {id}'s health: {e}"),
                                Ok(()) if up => info!(node = id, "node up: takes new flows again"),
                                Ok(()) => warn!(node = id, "node down: no new flows until it recovers"),
                            }
                        }
                    }
                    false
                }
                _ = term.recv() => { info!("SIGTERM"); break; }
                _ = int.recv() => { info!("SIGINT"); break; }
            };
            if reload {
                let old_metrics = agent.cfg.stats.prometheus;
                // Taken before the file is read: a write racing with this reload is seen
                // (and reloaded) on the next tick, never mistaken for the version just read.
                let before = mtime(path);
                match agent.reload() {
                    Ok(()) => {
                        seen = before;
                        for p in probes.drain(..) {
                            p.abort();
                        }
                        generation += 1;
                        probes = spawn_probes(&agent, generation, &tx);
                        if agent.cfg.stats.prometheus != old_metrics {
                            if let Some(m) = metrics_task.take() {
                                m.abort();
                            }
                            metrics_task = spawn_metrics(&agent);
                        }
                    }
                    Err(e) => {
                        // This version of the file was judged: not retried on the next tick
                        // (a retry would write and roll back the maps again), only once the
                        // file changes again.
                        seen = before;
                        error!("reload rejected: {e:#}");
                    }
                }
            }
        }
        // Not ready any more before the datapath may go: a reader withdraws first.
        ready.clear()?;
        for p in probes {
            p.abort();
        }
        let pin_dir = agent.cfg.pin_dir.clone();
        drop(agent);
        if opts.detach_on_exit {
            let n = datapath::detach(&pin_dir);
            info!(links = n, "detached and unpinned");
        } else {
            info!(pin_dir = %pin_dir.display(), "exiting; the datapath keeps forwarding (cidlb detach removes it)");
        }
        drop(lock);
        anyhow::Ok(())
    })
}
