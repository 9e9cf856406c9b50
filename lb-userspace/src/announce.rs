//! Can this balancer serve its VIPs? The signal a routing daemon announces the VIPs by.
//!
//! cidlb does not speak BGP. `cidlb announce` (a small loop next to `cidlb run`, its own
//! systemd unit) decides once a second, per VIP, whether this balancer can serve it, and while
//! it can keeps a host route for the VIP in the kernel routing table `announce.table`
//! (`dev lo`, `proto static`; the table is not used for forwarding) and a file
//! `announce.state_dir/ready/<vip>`. BIRD learns the route (`protocol kernel { kernel table N;
//! learn; }`) and exports it over BGP; FRR or a check script can follow the file instead
//! (`deploy/bird/`). Ready means all of:
//!
//! - the datapath is attached: a pinned link for every configured interface;
//! - every configured interface is up (IFF_UP and IFF_RUNNING);
//! - the agent is alive: its heartbeat (`state_dir/heartbeat`, rewritten every second by
//!   `cidlb run`) is at most `announce.grace` old on the boot clock (CLOCK_BOOTTIME, with the
//!   boot id: wall-clock steps change nothing). The grace lets an agent restart, or a kill -9
//!   and a restart by systemd, pass without withdrawing: the pinned datapath forwards meanwhile;
//! - the agent finished its first full probe round (the heartbeat says so): before that, its
//!   Maglev table still counts nodes other balancers already hold down. A restarted agent that
//!   finds the previous one's heartbeat fresh and probed carries the round (and the nodes held
//!   down) over (`agent.rs`), and a node added by a reload never un-does the round;
//! - the operator has not put it in maintenance (`cidlb maintenance on`, a file
//!   `state_dir/maintenance`): the VIPs are withdrawn while the datapath keeps forwarding
//!   whatever still arrives.
//!
//! The VIPs are those in the heartbeat (the running config's), so a reload that adds or
//! removes one is followed; `cidlb announce` also re-reads its config file when it changes.
//!
//! All nodes down does NOT withdraw: every balancer sees the same nodes, so withdrawing would
//! take the VIP off the network on every balancer at once and turn a node outage into a routing
//! outage (and back again, in a flap, when a node returns). It is alerted on instead
//! (`deploy/prometheus/cidlb.rules.yml`: all nodes of a family down).

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    config::{Announce, Config},
    datapath::LINKS_DIR,
    linkinfo,
    statedir::{StateDir, StateDirError},
};

/// The agent's heartbeat file under `announce.state_dir`.
pub const HEARTBEAT: &str = "heartbeat";
/// The maintenance switch under `announce.state_dir`.
pub const MAINTENANCE: &str = "maintenance";
/// Per-VIP readiness files under `announce.state_dir`.
pub const READY_DIR: &str = "ready";

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    State(#[from] StateDirError),
    #[error("`ip {args}` failed: {message} (announce.table {table}: is iproute2 installed and are we root?)")]
    Route {
        args: String,
        table: u32,
        message: String,
    },
}

/// What `cidlb run` writes every second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Wall-clock time of the write, milliseconds since the Unix epoch (for people; ages are
    /// measured on `boot_ms`).
    pub unix_ms: u64,
    /// CLOCK_BOOTTIME at the write, in milliseconds: system-wide and monotonic (it counts
    /// suspend too), so a wall-clock step neither keeps a dead agent alive nor withdraws.
    pub boot_ms: u64,
    /// The kernel's boot id: a heartbeat of another boot is never fresh.
    pub boot_id: String,
    pub pid: u32,
    /// The first full probe round is done (always, without health checks), or was carried
    /// over from the previous agent.
    pub probed: bool,
    /// The running config's VIPs: what `cidlb announce` announces.
    pub vips: Vec<IpAddr>,
    /// Nodes the health checks hold down.
    pub down: Vec<u32>,
}

fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// CLOCK_BOOTTIME in milliseconds.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Heartbeat {
    /// A heartbeat of this process, now.
    pub fn now(probed: bool, vips: Vec<IpAddr>, down: Vec<u32>) -> Self {
        Self {
            unix_ms: now_ms(SystemTime::now()),
            boot_ms: boot_ms(),
            boot_id: boot_id(),
            pid: std::process::id(),
            probed,
            vips,
            down,
        }
    }

    /// How old it is on the boot clock; `None` if written in another boot. A heartbeat of
    /// the format before the boot clock (an agent of an older release, during an upgrade) is
    /// aged on the wall clock.
    pub fn age(&self) -> Option<Duration> {
        if self.boot_id.is_empty() {
            return Some(Duration::from_millis(
                now_ms(SystemTime::now()).saturating_sub(self.unix_ms),
            ));
        }
        (self.boot_id == boot_id())
            .then(|| Duration::from_millis(boot_ms().saturating_sub(self.boot_ms)))
    }

    /// Written within `grace` in this boot.
    pub fn fresh(&self, grace: Duration) -> bool {
        self.age().is_some_and(|a| a <= grace)
    }

    fn render(&self) -> String {
        let list = |v: Vec<String>| v.join(",");
        format!(
            "unix_ms={}\nboot_ms={}\nboot_id={}\npid={}\nprobed={}\nvips={}\ndown={}\n",
            self.unix_ms,
            self.boot_ms,
            self.boot_id,
            self.pid,
            u8::from(self.probed),
            list(self.vips.iter().map(ToString::to_string).collect()),
            list(self.down.iter().map(ToString::to_string).collect()),
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let raw = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(str::trim)
        };
        let num = |k: &str| raw(k).and_then(|v| v.parse::<u64>().ok());
        // Absent in the older format: no boot clock, no VIPs, no down nodes.
        let list = |k: &str| -> Option<Vec<String>> {
            Some(
                raw(k)
                    .unwrap_or("")
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )
        };
        Some(Heartbeat {
            unix_ms: num("unix_ms")?,
            boot_ms: num("boot_ms").unwrap_or(0),
            boot_id: raw("boot_id").unwrap_or("").to_owned(),
            pid: u32::try_from(num("pid")?).ok()?,
            probed: num("probed")? == 1,
            vips: list("vips")?
                .iter()
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?,
            down: list("down")?
                .iter()
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?,
        })
    }
}

/// Writes the heartbeat (atomically, never through a symlink: `statedir.rs`).
pub fn write_heartbeat(state_dir: &Path, hb: &Heartbeat) -> Result<(), AnnounceError> {
    let dir = StateDir::open(state_dir)?;
    Ok(dir.write(HEARTBEAT, hb.render().as_bytes())?)
}

/// The heartbeat, if there is a readable one (one of an older format counts as none).
pub fn read_heartbeat(state_dir: &Path) -> Option<Heartbeat> {
    Heartbeat::parse(&std::fs::read_to_string(state_dir.join(HEARTBEAT)).ok()?)
}

/// Is the maintenance switch on?
pub fn in_maintenance(state_dir: &Path) -> bool {
    state_dir.join(MAINTENANCE).exists()
}

/// Turns maintenance on (creates the switch file) or off (removes it).
pub fn set_maintenance(state_dir: &Path, on: bool) -> Result<(), AnnounceError> {
    let dir = StateDir::open(state_dir)?;
    if on {
        dir.write(MAINTENANCE, b"on\n")?;
    } else {
        dir.remove(MAINTENANCE)?;
    }
    Ok(())
}

/// One readiness verdict, with each condition, so a "not ready" says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub attached: bool,
    pub interfaces_up: bool,
    pub agent_alive: bool,
    pub probed: bool,
    pub maintenance: bool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.attached && self.interfaces_up && self.agent_alive && self.probed && !self.maintenance
    }

    /// The failing conditions, for logs ("" when ready).
    pub fn why_not(&self) -> String {
        let mut s = String::new();
        for (bad, what) in [
            (!self.attached, "datapath not attached"),
            (!self.interfaces_up, "an interface is down"),
            (
                !self.agent_alive,
                "agent heartbeat missing or older than the grace",
            ),
            (!self.probed, "first probe round not done"),
            (self.maintenance, "in maintenance"),
        ] {
            if bad {
                if !s.is_empty() {
                    s.push_str(", ");
                }
                s.push_str(what);
            }
        }
        s
    }
}

/// Is the datapath attached: for every configured interface a pinned link that the kernel
/// says is attached to that interface (`linkinfo.rs`), not only a pin file? `Err` names the
/// first that is not.
pub fn attachment(cfg: &Config) -> Result<(), String> {
    let links = cfg.pin_dir.join(LINKS_DIR);
    cfg.interfaces.iter().try_for_each(|i| {
        let pin = links.join(i);
        if !pin.exists() {
            return Err(format!("no link pinned for {i} ({})", pin.display()));
        }
        linkinfo::check(&pin, i)
    })
}

/// [`attachment`] as a yes or no.
pub fn attached(cfg: &Config) -> bool {
    attachment(cfg).is_ok()
}

/// Is every configured interface up and running, in this process's network namespace? (Read
/// with SIOCGIFFLAGS on a socket, not from /sys/class/net, which shows the namespace sysfs was
/// mounted in.)
pub fn interfaces_up(cfg: &Config) -> bool {
    // SAFETY: a plain socket(2) call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    let up = cfg.interfaces.iter().all(|name| {
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return false;
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads ifr_name and writes ifr_ifru.ifru_flags of `req`, which
        // lives for the call.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
        // SAFETY: after a successful SIOCGIFFLAGS the union holds the flags.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        rc == 0 && flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
    });
    // SAFETY: fd is ours and open.
    unsafe { libc::close(fd) };
    up
}

/// The verdict `cidlb announce` acts on, and the heartbeat it read. The agent is alive while
/// its heartbeat is at most `announce.grace` old on the boot clock.
pub fn evaluate(cfg: &Config, a: &Announce) -> (Readiness, Option<Heartbeat>) {
    let hb = read_heartbeat(&a.state_dir);
    let r = Readiness {
        attached: attached(cfg),
        interfaces_up: interfaces_up(cfg),
        agent_alive: hb.as_ref().is_some_and(|h| h.fresh(a.grace)),
        probed: hb.as_ref().is_some_and(|h| h.probed),
        maintenance: in_maintenance(&a.state_dir),
    };
    (r, hb)
}

/// The VIPs to announce or withdraw: those of the running agent (its heartbeat, which
/// follows its reloads), else the config's.
pub fn vips_to_serve(cfg: &Config, hb: Option<&Heartbeat>) -> Vec<IpAddr> {
    match hb {
        Some(h) if !h.vips.is_empty() => h.vips.clone(),
        _ => cfg.vips.iter().map(|v| v.address).collect(),
    }
}

/// The verdict the agent itself reports (`cidlb_ready`): it is alive by definition.
pub fn local(cfg: &Config, probed: bool) -> Readiness {
    Readiness {
        attached: attached(cfg),
        interfaces_up: interfaces_up(cfg),
        agent_alive: true,
        probed,
        maintenance: cfg
            .announce
            .as_ref()
            .is_some_and(|a| in_maintenance(&a.state_dir)),
    }
}

fn prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn ip(table: u32, args: &[&str]) -> Result<(), AnnounceError> {
    let out = Command::new("ip").args(args).output();
    let fail = |message: String| AnnounceError::Route {
        args: args.join(" "),
        table,
        message,
    };
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(fail(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Announces (`ready`) or withdraws one VIP: its route in `announce.table` (if set) and its
/// file `state_dir/ready/<vip>`.
pub fn apply(a: &Announce, vip: IpAddr, ready: bool) -> Result<(), AnnounceError> {
    let dir = StateDir::open(&a.state_dir)?.subdir(READY_DIR)?;
    if ready {
        dir.write(&vip.to_string(), b"ready\n")?;
    } else {
        dir.remove(&vip.to_string())?;
    }
    let t = a.table;
    if t == 0 {
        return Ok(());
    }
    let (fam, p, table) = (
        if vip.is_ipv4() { "-4" } else { "-6" },
        prefix(vip),
        t.to_string(),
    );
    if ready {
        ip(
            t,
            &[
                fam, "route", "replace", &p, "dev", "lo", "table", &table, "proto", "static",
            ],
        )
    } else {
        // Withdrawn already is fine: `ip route del` of a missing route fails, so look first.
        let listed = Command::new("ip")
            .args([fam, "route", "show", "table", &table, &p])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(true);
        if listed {
            ip(t, &[fam, "route", "del", &p, "table", &table])
        } else {
            Ok(())
        }
    }
}

/// A one-line summary of a verdict for the log.
pub fn describe(vips: &[IpAddr], r: &Readiness) -> String {
    let mut s = String::new();
    let list: Vec<String> = vips.iter().map(ToString::to_string).collect();
    let _ = write!(s, "VIPs {}", list.join(", "));
    if r.ready() {
        s.push_str(": ready, announced");
    } else {
        let _ = write!(s, ": not ready ({}), withdrawn", r.why_not());
    }
    s
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `cidlb announce`: every `every`, evaluate and apply, until SIGINT/SIGTERM, then withdraw
/// every VIP (an operator stopping the announcer stops the announcement). The VIPs are the
/// running agent's (from its heartbeat): a VIP added by a reload is announced once the agent
/// serves it, and one removed is withdrawn. The config file is re-read when it changes
/// (interfaces, pin_dir, the announce section); a bad one is logged and the last good one
/// stays.
pub fn run(path: &Path, every: Duration) -> anyhow::Result<()> {
    use std::collections::BTreeSet;
    use tokio::signal::unix::{signal, SignalKind};
    use tracing::{error, info, warn};

    let no_section = |path: &Path| {
        anyhow::anyhow!(
            "{}: no `announce:` section, so `cidlb run` writes no heartbeat to follow; add one \
             (docs/several-balancers.md)",
            path.display()
        )
    };
    let mut cfg = Config::load(path)?;
    let mut a = cfg.announce.clone().ok_or_else(|| no_section(path))?;
    // Refuse a state directory others can write before announcing anything from it.
    StateDir::open(&a.state_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(every);
        let mut last: Option<(bool, Vec<IpAddr>)> = None;
        // VIPs possibly announced (withdrawn when they leave the served set).
        let mut announced: BTreeSet<IpAddr> = BTreeSet::new();
        let mut seen = mtime(path);
        info!(
            table = a.table,
            state_dir = %a.state_dir.display(),
            grace_ms = a.grace.as_millis() as u64,
            "cidlb announce running"
        );
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = mtime(path);
                    if now != seen {
                        seen = now;
                        match Config::load(path).map_err(anyhow::Error::from).and_then(|c| {
                            let na = c.announce.clone().ok_or_else(|| no_section(path))?;
                            StateDir::open(&na.state_dir)?;
                            Ok((c, na))
                        }) {
                            Ok((c, na)) => {
                                if na.table != a.table || na.state_dir != a.state_dir {
                                    // Withdraw from where they were announced before moving.
                                    for &vip in &announced {
                                        if let Err(e) = apply(&a, vip, false) {
                                            error!("{e}");
                                        }
                                    }
                                    announced.clear();
                                }
                                info!(file = %path.display(), "config reloaded");
                                cfg = c;
                                a = na;
                            }
                            Err(e) => error!("config reload rejected, the last good one stays: {e:#}"),
                        }
                    }
                    let (r, hb) = evaluate(&cfg, &a);
                    let ready = r.ready();
                    let vips = vips_to_serve(&cfg, hb.as_ref());
                    let mut failed = false;
                    for &vip in &vips {
                        if let Err(e) = apply(&a, vip, ready) {
                            error!("{e}");
                            failed = true;
                        }
                    }
                    let gone: Vec<IpAddr> =
                        announced.iter().filter(|v| !vips.contains(v)).copied().collect();
                    for vip in gone {
                        match apply(&a, vip, false) {
                            Ok(()) => {
                                info!(vip = %vip, "VIP no longer served by the agent: withdrawn");
                                announced.remove(&vip);
                            }
                            Err(e) => {
                                error!("{e}");
                                failed = true;
                            }
                        }
                    }
                    if ready {
                        announced.extend(vips.iter().copied());
                    } else {
                        announced.retain(|v| !vips.contains(v));
                    }
                    let state = Some((ready, vips.clone()));
                    if last != state && !failed {
                        if ready {
                            info!("{}", describe(&vips, &r));
                        } else if let Err(why) = attachment(&cfg) {
                            warn!("{}: {why}", describe(&vips, &r));
                        } else {
                            warn!("{}", describe(&vips, &r));
                        }
                        last = state;
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let (_, hb) = evaluate(&cfg, &a);
        let mut all: BTreeSet<IpAddr> = vips_to_serve(&cfg, hb.as_ref()).into_iter().collect();
        all.extend(announced);
        for vip in all {
            apply(&a, vip, false)?;
        }
        info!("cidlb announce stopped: VIPs withdrawn");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_round_trips_and_ages() {
        let dir = std::env::temp_dir().join(format!("cidlb-hb-{}", std::process::id()));
        let vip: IpAddr = "2001:db8::10".parse().unwrap();
        write_heartbeat(&dir, &Heartbeat::now(false, vec![], vec![])).unwrap();
        let hb = read_heartbeat(&dir).expect("written");
        assert_eq!(hb.pid, std::process::id());
        assert!(!hb.probed && hb.vips.is_empty() && hb.down.is_empty());
        assert!(hb.fresh(Duration::from_secs(1)), "{hb:?}");
        write_heartbeat(&dir, &Heartbeat::now(true, vec![vip], vec![3, 7])).unwrap();
        let hb = read_heartbeat(&dir).unwrap();
        assert!(hb.probed);
        assert_eq!((hb.vips, hb.down), (vec![vip], vec![3, 7]));
        // Age is on the boot clock: a heartbeat whose wall-clock time is far in the future or
        // the past ages the same; one of another boot is never fresh.
        let mut old = Heartbeat::now(true, vec![], vec![]);
        old.unix_ms += 3_600_000;
        assert!(old.fresh(Duration::from_secs(1)));
        old.boot_ms = old.boot_ms.saturating_sub(5_000);
        old.unix_ms -= 7_200_000;
        assert!(!old.fresh(Duration::from_secs(3)) && old.fresh(Duration::from_secs(10)));
        old.boot_id = "another-boot".into();
        assert!(!old.fresh(Duration::from_secs(3600)));
        // The older format (no boot clock): aged on the wall clock.
        let wall = now_ms(SystemTime::now());
        std::fs::write(
            dir.join(HEARTBEAT),
            format!("unix_ms={wall}\npid=2\nprobed=1\n"),
        )
        .unwrap();
        let hb = read_heartbeat(&dir).expect("older format");
        assert!(hb.probed && hb.vips.is_empty() && hb.fresh(Duration::from_secs(5)));
        std::fs::write(dir.join(HEARTBEAT), "unix_ms=1\npid=2\nprobed=1\n").unwrap();
        assert!(!read_heartbeat(&dir).unwrap().fresh(Duration::from_secs(5)));
        assert!(!in_maintenance(&dir));
        set_maintenance(&dir, true).unwrap();
        assert!(in_maintenance(&dir));
        set_maintenance(&dir, false).unwrap();
        set_maintenance(&dir, false).unwrap();
        assert!(!in_maintenance(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ready_needs_every_condition() {
        let all = Readiness {
            attached: true,
            interfaces_up: true,
            agent_alive: true,
            probed: true,
            maintenance: false,
        };
        assert!(all.ready());
        assert_eq!(all.why_not(), "");
        for r in [
            Readiness {
                attached: false,
                ..all
            },
            Readiness {
                interfaces_up: false,
                ..all
            },
            Readiness {
                agent_alive: false,
                ..all
            },
            Readiness {
                probed: false,
                ..all
            },
            Readiness {
                maintenance: true,
                ..all
            },
        ] {
            assert!(!r.ready(), "{r:?}");
            assert!(!r.why_not().is_empty());
        }
    }
}
