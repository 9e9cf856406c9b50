//! `cidlb`: the agent's command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use cidlb::{
    config::Config,
    datapath::{self, Datapath},
    provision,
    stats::Snapshot,
};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "cidlb",
    version,
    about = "XDP load balancer for DTLS 1.2 Connection ID records"
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
    /// Load the datapath, attach it to the configured interfaces and run until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the counters of a running datapath from its pinned maps.
    Stats {
        /// Where `cidlb run` pinned its maps (the config's pin_dir).
        #[arg(long, default_value = cidlb::config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Show all counters, also those at zero.
        #[arg(long)]
        all: bool,
        /// Repeat every SECS seconds.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let result = match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Run { config } => run(&config),
        Cmd::Stats {
            pin_dir,
            json,
            all,
            watch,
        } => stats(&pin_dir, json, all, watch),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("cidlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
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

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    let cfg = Config::load(path)?;
    for w in cfg.reverse_entries().1 {
        warn!("{}: {w}", path.display());
    }
    Ok(cfg)
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = load_config(path)?;
    println!(
        "{}: ok ({} interface(s), {} VIP(s), {} node(s))",
        path.display(),
        cfg.interfaces.len(),
        cfg.vips.len(),
        cfg.nodes.len()
    );
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = load_config(path)?;
    datapath::require_root("cidlb run")?;
    let ifindexes = datapath::resolve_interfaces(&cfg.interfaces)?;
    let mut dp = Datapath::load(&cfg)?;
    info!(
        cid_length = cfg.dtls.cid_length,
        node_id_offset = cfg.dtls.node_id_offset,
        node_id_length = cfg.dtls.node_id_length,
        flow_capacity = cfg.flows.capacity,
        "XDP program verified and loaded"
    );
    provision::provision(&mut dp.ebpf, &cfg, &ifindexes)?;
    for n in &cfg.nodes {
        info!(node = n.id, addresses = ?n.addresses, port = ?n.port, "node");
    }
    for v in &cfg.vips {
        let ports: Vec<String> = v.ports.iter().map(ToString::to_string).collect();
        info!(vip = %v.address, ports = %ports.join(","), "VIP");
    }
    dp.pin_maps(&cfg.pin_dir)?;
    info!(pin_dir = %cfg.pin_dir.display(), "maps pinned (bpftool map dump pinned {}/STATS)", cfg.pin_dir.display());
    let attached = dp.attach(&cfg);
    if let Err(e) = attached {
        datapath::unpin_maps(&cfg.pin_dir);
        return Err(e.into());
    }
    info!("cidlb running; SIGINT or SIGTERM to stop");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
        anyhow::Ok(())
    })?;
    if let Ok(s) = Snapshot::from_ebpf(&dp.ebpf) {
        info!(
            packets = s.get(lb_common::Counter::PacketsSeen),
            cid_routed = s.get(lb_common::Counter::CidRouted),
            flows_new = s.get(lb_common::Counter::FlowNew),
            "final counters"
        );
    }
    drop(dp); // detaches from every interface
    datapath::unpin_maps(&cfg.pin_dir);
    info!("detached; bye");
    Ok(())
}

fn stats(
    pin_dir: &std::path::Path,
    json: bool,
    all: bool,
    watch: Option<u64>,
) -> anyhow::Result<()> {
    loop {
        let snap = Snapshot::from_pins(pin_dir)?;
        if json {
            println!("{}", snap.render_json());
        } else {
            print!("{}", snap.render_text(all));
        }
        match watch {
            Some(secs) => {
                std::thread::sleep(Duration::from_secs(secs.max(1)));
                if !json {
                    println!();
                }
            }
            None => return Ok(()),
        }
    }
}
