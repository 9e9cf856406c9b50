//! The running agent: start (fresh, or adopting a pinned datapath), reload, health checks,
//! metrics. The datapath is pinned, so this process can stop, crash or be upgraded without
//! interrupting forwarding.

use std::{
    net::SocketAddr,
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
    announce,
    config::{Config, NodeState, Probe},
    datapath::{self, Datapath},
    ebpf::DatapathError,
    health::{self, Tracker},
    host::Host,
    layout,
    metrics::{self, View},
    plan, provision,
    ready::Ready,
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
    pub fn start(path: &Path, opts: RunOptions) -> anyhow::Result<Self> {
        let cfg = load_config(path, opts.shadow)?;
        datapath::require_root("cidlb run")?;
        let ifindexes = datapath::resolve_interfaces(&cfg.interfaces)?;
        layout::check(&cfg.pin_dir, Some(path))?;
        let adopting = datapath::is_pinned(&cfg.pin_dir);
        let pin_dir = cfg.pin_dir.clone();
        match Self::bring_up(path, opts, cfg, &ifindexes, adopting) {
            Ok(agent) => Ok(agent),
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
    ) -> Result<Self, (anyhow::Error, bool)> {
        let dp = Datapath::load_pinned(&cfg).map_err(|e| (e.into(), false))?;
        let mut health = Tracker::new(cfg.health.fall, cfg.health.rise);
        health.retain(
            &cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
            cfg.health.fall,
            cfg.health.rise,
        );
        let view = Arc::new(Mutex::new(View {
            pin_dir: cfg.pin_dir.clone(),
            nodes: Vec::new(),
            probe: cfg.health.probe,
            health,
            flow_capacity: cfg.flows.capacity,
            ready: Vec::new(),
            families: Vec::new(),
        }));
        let mut agent = Agent {
            path: path.to_owned(),
            opts,
            cfg,
            dp,
            view,
            host: Host::default(),
        };
        agent.check_capacity();
        // New interfaces first: if one cannot take the program, nothing else was touched.
        let pending = agent
            .dp
            .attach_new(&agent.cfg)
            .map_err(|e| (e.into(), false))?;
        agent.apply(ifindexes).map_err(|e| (e.into(), true))?;
        agent
            .dp
            .commit(&agent.cfg, pending)
            .map_err(|e| (e.into(), true))?;
        agent.publish();
        info!(
            pin_dir = %agent.cfg.pin_dir.display(),
            adopted = adopting,
            shadow = opts.shadow,
            "datapath {}", if adopting { "adopted: flows and counters kept" } else { "created" }
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
        })
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

    /// A pinned flow table keeps its size; say so if the config asks for another.
    fn check_capacity(&mut self) {
        let actual = match self.dp.ebpf.map(names::FLOWS) {
            Some(Map::LruHashMap(m)) => m.info().ok().map(|i| i.max_entries()),
            _ => None,
        };
        if let Some(actual) = actual {
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
        provision::nodes_and_rings(&mut self.dp.ebpf, &self.cfg, &|id| health.is_up(id)).map(|_| ())
    }

    /// Writes the heartbeat `cidlb announce` follows and the per-VIP readiness `/metrics`
    /// shows. `probed`: nodes with a probe result since start. A failing write is logged once
    /// (and its end), not every second.
    fn heartbeat(&self, probed: &std::collections::HashSet<u32>, failing: &mut bool) {
        let round_done = self.cfg.health.probe == Probe::None
            || self
                .probe_targets()
                .iter()
                .all(|(id, _)| probed.contains(id));
        let written = match &self.cfg.announce {
            Some(a) => announce::write_heartbeat(&a.state_dir, round_done),
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

    /// The nodes to probe: address and port.
    fn probe_targets(&self) -> Vec<(u32, SocketAddr)> {
        self.cfg
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Disabled)
            .filter_map(|n| {
                let ip = n.v4().or(n.v6())?;
                Some((n.id, SocketAddr::new(ip, self.cfg.probe_port(n))))
            })
            .collect()
    }
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
        .map(|(id, addr)| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(h.interval);
                loop {
                    tick.tick().await;
                    let ok = health::probe(h.probe, addr, h.timeout).await;
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

/// `cidlb run`: start, then serve signals, file changes and health probes until SIGINT/SIGTERM.
/// `ready_file` (`--ready-file`) is written once the datapath is up and removed on a clean exit
/// (see `ready.rs`).
pub fn run(path: &Path, opts: RunOptions, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut ready = Ready::new(ready_file)?;
    // Before anything is attached: a heartbeat that says "first probe round not done", so a
    // previous agent's heartbeat (still within announce.grace after a restart) cannot get the
    // VIPs announced before this agent has probed its nodes.
    if let Some(a) = Config::load(path).ok().and_then(|c| c.announce) {
        if let Err(e) = announce::write_heartbeat(&a.state_dir, false) {
            warn!("{e}");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut agent = Agent::start(path, opts)?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, mut rx) = mpsc::channel::<ProbeResult>(256);
        let mut generation = 0u64;
        let mut probes = spawn_probes(&agent, generation, &tx);
        let mut metrics_task = spawn_metrics(&agent);
        let mut seen = mtime(path);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        info!("cidlb running; SIGHUP (or editing the config) reloads, SIGINT/SIGTERM stops");
        // Nodes probed at least once since this agent started: ready to be announced only
        // after a full round (see announce.rs). The first heartbeat is written before the
        // ready file, so a reader of one finds the other.
        let mut probed_ids = std::collections::HashSet::new();
        let mut heartbeat_failing = false;
        agent.heartbeat(&probed_ids, &mut heartbeat_failing);
        ready.signal(&agent.cfg.pin_dir)?;
        loop {
            let reload = tokio::select! {
                _ = hup.recv() => {
                    info!("SIGHUP: reloading");
                    true
                }
                _ = tick.tick() => {
                    agent.heartbeat(&probed_ids, &mut heartbeat_failing);
                    agent.refresh_host();
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
        anyhow::Ok(())
    })
}
