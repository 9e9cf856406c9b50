//! Loading the XDP program with the config's constants, attaching it, pinning its maps.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    programs::{ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::names;
use tracing::{info, warn};

use crate::config::{Config, XdpModeCfg};

/// The datapath object built by build.rs (aya-build), embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Every map the datapath has, for pinning.
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
];

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
            let c = CString::new(name.as_str()).map_err(|_| DatapathError::NoInterface {
                index,
                name: name.clone(),
            })?;
            // SAFETY: c is a valid NUL-terminated string.
            match unsafe { libc::if_nametoindex(c.as_ptr()) } {
                0 => Err(DatapathError::NoInterface {
                    index,
                    name: name.clone(),
                }),
                i => Ok(i),
            }
        })
        .collect()
}

/// A loaded (verified) datapath: program and maps in the kernel, nothing attached yet.
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object with the config's load-time constants and flow table size, and has the
    /// kernel verify the program.
    pub fn load(cfg: &Config) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let dp = cfg.dp_config();
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &dp, true)
            .map_max_entries(names::FLOWS, cfg.flows.capacity)
            .load(EBPF_OBJECT)
            .map_err(DatapathError::Object)?;
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

    /// The XDP program.
    pub fn program(&self) -> Result<&Xdp, DatapathError> {
        self.ebpf
            .program(names::PROGRAM)
            .ok_or_else(|| DatapathError::Program(ProgramError::NotLoaded))?
            .try_into()
            .map_err(DatapathError::Program)
    }

    /// Attaches to every interface; with `auto`, native mode where the driver has it, else
    /// generic. Links live as long as this Datapath (dropping it detaches).
    pub fn attach(&mut self, cfg: &Config) -> Result<(), DatapathError> {
        let prog = program_mut(&mut self.ebpf)?;
        for iface in &cfg.interfaces {
            let modes: &[(XdpMode, &'static str)] = match cfg.xdp_mode {
                XdpModeCfg::Native => &[(XdpMode::Driver, "native")],
                XdpModeCfg::Generic => &[(XdpMode::Skb, "generic")],
                XdpModeCfg::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            };
            let mut last = None;
            for (i, (mode, name)) in modes.iter().enumerate() {
                match prog.attach(iface, *mode) {
                    Ok(_) => {
                        info!(interface = %iface, mode = name, "attached XDP program");
                        last = None;
                        break;
                    }
                    Err(source) => {
                        if i + 1 < modes.len() {
                            warn!(interface = %iface, error = %source, "native XDP unavailable, falling back to generic mode");
                        }
                        last = Some(DatapathError::Attach {
                            iface: iface.clone(),
                            mode: name,
                            source,
                        });
                    }
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Pins every map under `dir` (bpftool and `cidlb stats` read them there), replacing stale
    /// pins of an earlier run.
    pub fn pin_maps(&self, dir: &Path) -> Result<(), DatapathError> {
        let perr = |message: String| DatapathError::Pin {
            dir: dir.to_owned(),
            message,
        };
        let parent = dir.parent().unwrap_or(dir);
        if !is_bpffs(parent) && !is_bpffs(dir) {
            return Err(DatapathError::NoBpffs(parent.to_owned()));
        }
        fs::create_dir_all(dir).map_err(|e| perr(e.to_string()))?;
        for name in MAP_NAMES {
            let path = dir.join(name);
            if path.exists() {
                fs::remove_file(&path)
                    .map_err(|e| perr(format!("removing stale {}: {e}", path.display())))?;
            }
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| perr(format!("no map {name} in the object")))?;
            map.pin(&path).map_err(|e| perr(format!("{name}: {e}")))?;
        }
        Ok(())
    }
}

/// Removes the pins `pin_maps` made (and the directory, if then empty).
pub fn unpin_maps(dir: &Path) {
    for name in MAP_NAMES {
        let _ = fs::remove_file(dir.join(name));
    }
    let _ = fs::remove_dir(dir);
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(names::PROGRAM)
        .ok_or_else(|| DatapathError::Program(ProgramError::NotLoaded))?
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
