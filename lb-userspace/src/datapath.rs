//! Loading the XDP program with the config's constants, pinning its maps, program and links so
//! the datapath outlives the agent, and attaching it.
//!
//! Layout under `pin_dir`: one file per map (`STATS`, `FLOWS`, ...), `prog`, and `links/IFACE`,
//! a bpf_link per interface. The kernel keeps a pinned link attached and its program running
//! while no process holds it, so stopping, upgrading or crashing the agent does not interrupt
//! forwarding; `cidlb detach` removes the pins, which detaches.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::names;
use tracing::{info, warn};

use crate::config::{Config, XdpModeCfg};

/// The datapath object built by build.rs (aya-build), embedded in the binary.
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Every map the datapath has, as pinned.
pub const MAP_NAMES: &[&str] = &[
    names::STATS,
    names::NODE_STATS,
    names::NODES,
    names::RING,
    names::RING_LEN,
    names::RR,
    names::FLOWS,
    names::VIPS,
    names::VIP_PORTS,
    names::REVERSE,
    names::DEVMAP,
    names::NEXTHOP,
    names::NODE_ADDRS,
    names::LAYOUT,
];

/// The program's pin (for bpftool); the links hold the program anyway.
pub const PROG_PIN: &str = "prog";
/// Directory of the per-interface link pins.
pub const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this cidlb was built with AYA_BUILD_SKIP=1 and holds no XDP program; rebuild without it"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Object(#[source] EbpfError),
    #[error(
        "the kernel verifier rejected the XDP program: {io_error}\n--- verifier log ---\n{log}"
    )]
    Verifier {
        io_error: std::io::Error,
        log: String,
    },
    #[error("{0} needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it with sudo or as root")]
    NotRoot(&'static str),
    #[error("interfaces[{index}]: no interface named {name:?} on this host (see `ip link`)")]
    NoInterface { index: usize, name: String },
    #[error("attaching XDP to {iface} in {mode} mode failed: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{0} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` (or set pin_dir)")]
    NoBpffs(PathBuf),
    #[error("map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("pinning under {dir}: {message}")]
    Pin { dir: PathBuf, message: String },
    #[error("program: {0}")]
    Program(#[source] ProgramError),
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &'static str) -> Result<(), DatapathError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DatapathError::NotRoot(what));
    }
    Ok(())
}

/// The ifindex of each configured interface, in config order.
pub fn resolve_interfaces(names: &[String]) -> Result<Vec<u32>, DatapathError> {
    names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let missing = || DatapathError::NoInterface {
                index,
                name: name.clone(),
            };
            let c = CString::new(name.as_str()).map_err(|_| missing())?;
            // SAFETY: c is a valid NUL-terminated string.
            match unsafe { libc::if_nametoindex(c.as_ptr()) } {
                0 => Err(missing()),
                i => Ok(i),
            }
        })
        .collect()
}

/// A loaded (verified) datapath: program and maps in the kernel.
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Loads with maps of its own (nothing pinned, nothing shared): fixtures, `cidlb explain`.
    pub fn load(cfg: &Config) -> Result<Self, DatapathError> {
        Self::load_with(cfg, None)
    }

    /// Loads with maps shared through `cfg.pin_dir`: maps already pinned there are reused
    /// (flows, counters and node tables survive restarts, upgrades and reloads), missing ones
    /// are created and pinned.
    pub fn load_pinned(cfg: &Config) -> Result<Self, DatapathError> {
        let dir = &cfg.pin_dir;
        let parent = dir.parent().unwrap_or(dir);
        if !is_bpffs(parent) && !is_bpffs(dir) {
            return Err(DatapathError::NoBpffs(parent.to_owned()));
        }
        fs::create_dir_all(dir).map_err(|e| DatapathError::Pin {
            dir: dir.clone(),
            message: e.to_string(),
        })?;
        Self::load_with(cfg, Some(dir))
    }

    fn load_with(cfg: &Config, pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let dp = cfg.dp_config();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::CONFIG, &dp, true)
            .map_max_entries(names::FLOWS, cfg.flows.capacity);
        if let Some(dir) = pin_dir {
            for name in MAP_NAMES {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Object)?;
        let prog = program_mut(&mut ebpf)?;
        prog.load().map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => DatapathError::Verifier {
                io_error,
                log: verifier_log.to_string(),
            },
            e => DatapathError::Program(e),
        })?;
        Ok(Self { ebpf })
    }

    /// Attaches to every configured interface through a bpf_link pinned at
    /// `pin_dir/links/IFACE`. An interface that already has a pinned link gets this program
    /// swapped in atomically (`bpf_link_update`: every packet sees the old or the new program);
    /// others are attached fresh (with `auto`: native mode where the driver has it, else
    /// generic). Links of interfaces no longer in the config are unpinned, which detaches them.
    pub fn attach(&mut self, cfg: &Config) -> Result<(), DatapathError> {
        let links_dir = cfg.pin_dir.join(LINKS_DIR);
        let perr = |message: String| DatapathError::Pin {
            dir: links_dir.clone(),
            message,
        };
        fs::create_dir_all(&links_dir).map_err(|e| perr(e.to_string()))?;
        let prog = program_mut(&mut self.ebpf)?;
        for iface in &cfg.interfaces {
            let path = links_dir.join(iface);
            if path.exists() {
                let pinned = PinnedLink::from_pin(&path)
                    .map_err(|e| perr(format!("{}: {e}", path.display())))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| perr(format!("{}: {e}", path.display())))?;
                prog.attach_to_link(link)
                    .map_err(|source| DatapathError::Attach {
                        iface: iface.clone(),
                        mode: "existing link",
                        source,
                    })?;
                info!(interface = %iface, "program replaced on the pinned link");
                continue;
            }
            let id = attach_one(prog, iface, cfg.xdp_mode)?;
            let link = prog.take_link(id).map_err(DatapathError::Program)?;
            let fd = FdLink::try_from(link)
                .map_err(|e| perr(format!("{iface}: not a bpf_link: {e}")))?;
            fd.pin(&path)
                .map_err(|e| perr(format!("{}: {e}", path.display())))?;
        }
        if let Ok(entries) = fs::read_dir(&links_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !cfg.interfaces.contains(&name) && fs::remove_file(e.path()).is_ok() {
                    info!(interface = %name, "detached (no longer in the config)");
                }
            }
        }
        let prog_pin = cfg.pin_dir.join(PROG_PIN);
        let _ = fs::remove_file(&prog_pin);
        prog.pin(&prog_pin)
            .map_err(|e| perr(format!("{}: {e}", prog_pin.display())))?;
        Ok(())
    }
}

fn attach_one(prog: &mut Xdp, iface: &str, mode: XdpModeCfg) -> Result<XdpLinkId, DatapathError> {
    let modes: &[(XdpMode, &'static str)] = match mode {
        XdpModeCfg::Native => &[(XdpMode::Driver, "native")],
        XdpModeCfg::Generic => &[(XdpMode::Skb, "generic")],
        XdpModeCfg::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
    };
    let mut last = None;
    for (i, (mode, name)) in modes.iter().enumerate() {
        match prog.attach(iface, *mode) {
            Ok(id) => {
                info!(interface = %iface, mode = name, "attached XDP program");
                return Ok(id);
            }
            Err(source) => {
                if i + 1 < modes.len() {
                    warn!(interface = %iface, error = %source, "native XDP unavailable, falling back to generic mode");
                }
                last = Some(DatapathError::Attach {
                    iface: iface.to_owned(),
                    mode: name,
                    source,
                });
            }
        }
    }
    Err(last.expect("at least one mode"))
}

/// Is a datapath pinned under `dir`?
pub fn is_pinned(dir: &Path) -> bool {
    dir.join(names::STATS).exists()
}

/// Removes everything pinned under `dir`: the links first (detaching the program from every
/// interface), then the program and the maps. Returns how many links were removed.
pub fn detach(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(entries) = fs::read_dir(dir.join(LINKS_DIR)) {
        for e in entries.flatten() {
            if fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    let _ = fs::remove_dir(dir.join(LINKS_DIR));
    let _ = fs::remove_file(dir.join(PROG_PIN));
    for name in MAP_NAMES {
        let _ = fs::remove_file(dir.join(name));
    }
    let _ = fs::remove_dir(dir);
    n
}

pub(crate) fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(names::PROGRAM)
        .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
        .try_into()
        .map_err(DatapathError::Program)
}

/// Is `path` on a bpf filesystem?
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}
