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
//!   `cidlb run`) is at most `announce.grace` old. The grace lets an agent restart, or a kill -9
//!   and a restart by systemd, pass without withdrawing: the pinned datapath forwards meanwhile;
//! - the agent finished its first full probe round (the heartbeat says so): before that, its
//!   Maglev table still counts nodes other balancers already hold down;
//! - the operator has not put it in maintenance (`cidlb maintenance on`, a file
//!   `state_dir/maintenance`): the VIPs are withdrawn while the datapath keeps forwarding
//!   whatever still arrives.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Wall-clock time of the write, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub pid: u32,
    /// The first full probe round is done (always, without health checks).
    pub probed: bool,
}

fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes the heartbeat (atomically, never through a symlink: `statedir.rs`).
pub fn write_heartbeat(state_dir: &Path, probed: bool) -> Result<(), AnnounceError> {
    let dir = StateDir::open(state_dir)?;
    let hb = Heartbeat {
        unix_ms: now_ms(SystemTime::now()),
        pid: std::process::id(),
        probed,
    };
    let text = format!(
        "unix_ms={}\npid={}\nprobed={}\n",
        hb.unix_ms,
        hb.pid,
        u8::from(hb.probed)
    );
    Ok(dir.write(HEARTBEAT, text.as_bytes())?)
}

/// The heartbeat, if there is a readable one.
pub fn read_heartbeat(state_dir: &Path) -> Option<Heartbeat> {
    let text = std::fs::read_to_string(state_dir.join(HEARTBEAT)).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(Heartbeat {
        unix_ms: field("unix_ms")?,
        pid: u32::try_from(field("pid")?).ok()?,
        probed: field("probed")? == 1,
    })
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

/// Is every configured interface's link pinned (the datapath attached)?
pub fn attached(cfg: &Config) -> bool {
    let links = cfg.pin_dir.join(LINKS_DIR);
    cfg.interfaces.iter().all(|i| links.join(i).exists())
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

/// The verdict `cidlb announce` acts on, at wall-clock time `now`.
pub fn evaluate(cfg: &Config, a: &Announce, now: SystemTime) -> Readiness {
    let hb = read_heartbeat(&a.state_dir);
    let grace = u64::try_from(a.grace.as_millis()).unwrap_or(u64::MAX);
    Readiness {
        attached: attached(cfg),
        interfaces_up: interfaces_up(cfg),
        agent_alive: hb.is_some_and(|h| now_ms(now).saturating_sub(h.unix_ms) <= grace),
        probed: hb.is_some_and(|h| h.probed),
        maintenance: in_maintenance(&a.state_dir),
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

/// `cidlb announce`: every `every`, evaluate and apply, until SIGINT/SIGTERM, then withdraw
/// every VIP (an operator stopping the announcer stops the announcement).
pub fn run(path: &Path, every: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    use tracing::{error, info, warn};

    let cfg = Config::load(path)?;
    let a = cfg.announce.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no `announce:` section, so `cidlb run` writes no heartbeat to follow; add one \
             (README: Running several balancers)",
            path.display()
        )
    })?;
    // Refuse a state directory others can write before announcing anything from it.
    StateDir::open(&a.state_dir)?;
    let vips: Vec<IpAddr> = cfg.vips.iter().map(|v| v.address).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(every);
        let mut last: Option<bool> = None;
        info!(
            table = a.table,
            state_dir = %a.state_dir.display(),
            grace_ms = a.grace.as_millis() as u64,
            "cidlb announce running"
        );
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let r = evaluate(&cfg, &a, SystemTime::now());
                    let ready = r.ready();
                    let mut failed = false;
                    for &vip in &vips {
                        if let Err(e) = apply(&a, vip, ready) {
                            error!("{e}");
                            failed = true;
                        }
                    }
                    if last != Some(ready) && !failed {
                        if ready {
                            info!("{}", describe(&vips, &r));
                        } else {
                            warn!("{}", describe(&vips, &r));
                        }
                        last = Some(ready);
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        for &vip in &vips {
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
        write_heartbeat(&dir, false).unwrap();
        let hb = read_heartbeat(&dir).expect("written");
        assert_eq!(hb.pid, std::process::id());
        assert!(!hb.probed);
        write_heartbeat(&dir, true).unwrap();
        assert!(read_heartbeat(&dir).unwrap().probed);
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
