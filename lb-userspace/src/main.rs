//! `cidlb`: the agent's command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use cidlb::{
    agent::{self, RunOptions},
    config::Config,
    datapath, explain,
    stats::Snapshot,
};
use clap::{Parser, Subcommand};
use tracing::{error, warn};

#[derive(Parser)]
#[command(
    name = "cidlb",
    version,
    about = "XDP load balancer for DTLS 1.2 and 1.3 Connection ID records"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a config file; exit non-zero with file, key and problem if it is wrong.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Bring the datapath up (adopting a pinned one) and manage it until SIGINT/SIGTERM.
    /// SIGHUP or a change to the file reloads the config. On exit the datapath keeps
    /// forwarding unless --detach-on-exit.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Decide and count, but pass every packet to the kernel unchanged.
        #[arg(long)]
        shadow: bool,
        /// On SIGINT/SIGTERM remove the datapath instead of leaving it forwarding.
        #[arg(long)]
        detach_on_exit: bool,
        /// Write this file (atomically) once the datapath is attached and provisioned; remove
        /// it on SIGINT/SIGTERM. Under systemd (NOTIFY_SOCKET) READY=1 is sent as well.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Remove a pinned datapath: detach from every interface, unpin program and maps.
    Detach {
        #[command(flatten)]
        pins: PinDir,
    },
    /// Print the counters of a running datapath from its pinned maps.
    Stats {
        #[command(flatten)]
        pins: PinDir,
        /// Print one JSON object per sample.
        #[arg(long)]
        json: bool,
        /// Show all counters, also those at zero.
        #[arg(long)]
        all: bool,
        /// Repeat every SECS seconds, with per-second rates.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
    /// Announce the VIPs while this balancer can serve them: once a second, keep a host route
    /// per VIP in the kernel table `announce.table` (for BIRD's `protocol kernel { learn; }`)
    /// and a file `announce.state_dir/ready/<vip>`, or withdraw them
    /// (docs/several-balancers.md). Withdraws everything on SIGINT/SIGTERM.
    Announce {
        #[arg(long, short)]
        config: PathBuf,
        /// How often to decide, in milliseconds.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        every_ms: u64,
    },
    /// Put this balancer in maintenance (`on`: `cidlb announce` withdraws its VIPs while the
    /// datapath keeps forwarding what still arrives) or take it out (`off`).
    Maintenance {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// On a node of a tunnel VIP: `up` attaches the decapsulation program to the node's
    /// interface, puts the VIPs on lo and sets the interface's sysctls (again: a running one
    /// is replaced in place); `down` undoes it; `check` says what is not as `up` sets it
    /// (exit 1) and prints the decapsulation counters.
    Node {
        #[arg(value_parser = ["up", "down", "check"])]
        action: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run one packet through the datapath program (BPF_PROG_TEST_RUN) and show the decision.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// A whole Ethernet frame in hex.
        #[arg(long, conflicts_with_all = ["src", "dst"])]
        hex: Option<String>,
        /// Source address:port (with --dst: builds an Ethernet/IP/UDP frame).
        #[arg(long, requires = "dst")]
        src: Option<SocketAddr>,
        #[arg(long, requires = "src")]
        dst: Option<SocketAddr>,
        /// UDP payload in hex (e.g. a DTLS record header: 19fefd0001000000000001 01a1a2a3a4a5 0000).
        #[arg(long, default_value = "")]
        payload: String,
        /// The interface the packet arrives on (default: the first configured one).
        #[arg(long)]
        ingress: Option<String>,
    },
}

/// Where a command finds the pinned datapath: `--pin-dir DIR`, or the `pin_dir` of the config
/// file given to `cidlb run` (`--config FILE`), else the default.
#[derive(clap::Args)]
#[group(multiple = false)]
struct PinDir {
    /// Where the datapath is pinned (the config's pin_dir) [default: /sys/fs/bpf/cidlb].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// The config file `cidlb run` was given: its pin_dir is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl PinDir {
    fn resolve(self) -> anyhow::Result<PathBuf> {
        Ok(match (self.pin_dir, self.config) {
            (Some(dir), _) => dir,
            (None, Some(file)) => cidlb::config::pin_dir_of(&file)?,
            (None, None) => PathBuf::from(cidlb::config::DEFAULT_PIN_DIR),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_json = cli.log_json;
    init_logging(log_json);
    let result = match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Run {
            config,
            shadow,
            detach_on_exit,
            ready_file,
        } => agent::run(
            &config,
            RunOptions {
                shadow,
                detach_on_exit,
            },
            ready_file,
        ),
        Cmd::Detach { pins } => pins.resolve().and_then(|dir| detach(&dir)),
        Cmd::Stats {
            pins,
            json,
            all,
            watch,
        } => pins.resolve().and_then(|dir| stats(&dir, json, all, watch)),
        Cmd::Announce { config, every_ms } => {
            cidlb::announce::run(&config, Duration::from_millis(every_ms.max(10)))
        }
        Cmd::Maintenance { state, config } => maintenance(&config, state == "on"),
        Cmd::Explain {
            config,
            hex,
            src,
            dst,
            payload,
            ingress,
        } => explain_cmd(&config, hex, src, dst, &payload, ingress),
        Cmd::Node { action, config } => node_cmd(&action, &config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Said once: a JSON log line for log collectors, else a plain line for a person.
        Err(e) if log_json => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cidlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    for w in cidlb::plan::reverse::reverse_entries(&cfg)
        .1
        .into_iter()
        .chain(cfg.warnings())
    {
        warn!("{}: {w}", path.display());
    }
    println!(
        "{}: ok ({} interface(s), {} VIP(s), {} node(s))",
        path.display(),
        cfg.interfaces.len(),
        cfg.vips.len(),
        cfg.nodes.len()
    );
    Ok(())
}

fn node_cmd(action: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = cidlb::config::node::NodeConfig::load(path)?;
    match action {
        "up" => {
            cidlb::node::up(&cfg)?;
            println!(
                "{}: decapsulating on {} for {} VIP(s)",
                path.display(),
                cfg.interface,
                cfg.vips.len()
            );
            Ok(())
        }
        "down" => cidlb::node::down(&cfg),
        _ => {
            let (problems, counters) = cidlb::node::check(&cfg);
            if let Some(c) = counters {
                for (name, v) in lb_common::decap::DECAP_NAMES.iter().zip(c) {
                    println!("{name} {v}");
                }
            }
            if problems.is_empty() {
                println!("{}: ok", path.display());
                Ok(())
            } else {
                anyhow::bail!("{}: {}", path.display(), problems.join("; "))
            }
        }
    }
}

fn maintenance(path: &std::path::Path, on: bool) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let dir = &cfg
        .announce
        .as_ref()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no `announce:` section: maintenance is a switch for `cidlb announce`, \
                 which needs one (docs/several-balancers.md)",
                path.display()
            )
        })?
        .state_dir;
    cidlb::announce::set_maintenance(dir, on)?;
    if on {
        println!(
            "maintenance on ({}): `cidlb announce` withdraws the VIPs within a second; the \
             datapath keeps forwarding what still arrives",
            dir.join(cidlb::announce::MAINTENANCE).display()
        );
    } else {
        println!("maintenance off: the VIPs are announced again once this balancer is ready");
    }
    Ok(())
}

fn detach(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    datapath::require_root("cidlb detach")?;
    if !datapath::is_pinned(pin_dir) && !pin_dir.join(datapath::LINKS_DIR).exists() {
        anyhow::bail!("no cidlb datapath is pinned under {}", pin_dir.display());
    }
    let n = datapath::detach(pin_dir);
    println!(
        "detached from {n} interface(s); removed {}",
        pin_dir.display()
    );
    Ok(())
}

fn stats(
    pin_dir: &std::path::Path,
    json: bool,
    all: bool,
    watch: Option<u64>,
) -> anyhow::Result<()> {
    // A datapath of another layout would be misread (or STATS be too short): say so instead.
    cidlb::layout::check(pin_dir, None)?;
    let mut prev: Option<(Snapshot, std::time::Instant)> = None;
    loop {
        let snap = Snapshot::from_pins(pin_dir)?;
        let now = std::time::Instant::now();
        if json {
            println!("{}", snap.render_json());
        } else {
            let rates = prev
                .as_ref()
                .map(|(p, t)| (p, now.duration_since(*t).as_secs_f64()));
            print!("{}", snap.render_text(all, rates));
        }
        let Some(secs) = watch else {
            return Ok(());
        };
        prev = Some((snap, now));
        std::thread::sleep(Duration::from_secs(secs.max(1)));
        if !json {
            println!();
        }
    }
}

fn explain_cmd(
    path: &std::path::Path,
    hex: Option<String>,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    payload: &str,
    ingress: Option<String>,
) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let frame = match (hex, src, dst) {
        (Some(h), _, _) => explain::parse_hex(&h)?,
        (None, Some(s), Some(d)) => explain::frame(s, d, &explain::parse_hex(payload)?)?,
        _ => anyhow::bail!("give a frame with --hex, or --src and --dst (and --payload)"),
    };
    let ingress = ingress.unwrap_or_else(|| cfg.interfaces[0].clone());
    print!("{}", explain::explain(&cfg, &frame, &ingress)?);
    Ok(())
}
