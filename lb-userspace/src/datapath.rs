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
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::names;
use tracing::{info, warn};

use crate::{
    config::{Config, XdpModeCfg},
    ebpf::{program_mut, DatapathError, EBPF_OBJECT, MAP_NAMES},
    linkinfo,
};

/// The program's pin (for bpftool); the links hold the program anyway.
pub const PROG_PIN: &str = "prog";
/// Directory of the per-interface link pins.
pub const LINKS_DIR: &str = "links";
/// Directory of a new layout's maps while an upgrade moves over to them (`upgrade.rs`).
pub const UPGRADE_DIR: &str = "upgrade";

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
        Self::load_pinned_in(cfg, &cfg.pin_dir)
    }

    /// [`Datapath::load_pinned`] with the maps pinned under `dir` instead of `cfg.pin_dir`
    /// (an upgrade builds the new layout's maps beside the old ones: `upgrade.rs`).
    pub fn load_pinned_in(cfg: &Config, dir: &Path) -> Result<Self, DatapathError> {
        let parent = dir.parent().unwrap_or(dir);
        if !is_bpffs(parent) && !is_bpffs(dir) {
            return Err(DatapathError::NoBpffs(parent.to_owned()));
        }
        fs::create_dir_all(dir).map_err(|e| DatapathError::Pin {
            dir: dir.to_owned(),
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
            .map_max_entries(names::FLOWS, cfg.flows.capacity)
            .map_max_entries(names::REPLY_DESTS, cfg.flows.capacity)
            .map_max_entries(lb_common::cookie::COOKIES, cfg.cookie_capacity())
            .map_max_entries(lb_common::frag::FRAGS, cfg.fragment_capacity());
        if let Some(dir) = pin_dir {
            for name in MAP_NAMES {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Object)?;
        let prog = program_mut(&mut ebpf)?;
        prog.load().map_err(crate::ebpf::load_error)?;
        Ok(Self { ebpf })
    }

    /// Attaches to every configured interface through a bpf_link pinned at
    /// `pin_dir/links/IFACE`: [`Datapath::attach_new`], then [`Datapath::commit`].
    pub fn attach(&mut self, cfg: &Config) -> Result<(), DatapathError> {
        let pending = self.attach_new(cfg)?;
        self.commit(cfg, pending)
    }

    /// Step 1 of attaching: interfaces without a pinned link get this program attached fresh
    /// (with `auto`: native mode where the driver has it, else generic), NOT pinned yet. The
    /// links belong to this program: dropping the [`Datapath`] detaches them, so a caller that
    /// fails before [`Datapath::commit`] leaves those interfaces as they were. If one interface
    /// fails, the ones attached before it are detached again.
    pub fn attach_new(&mut self, cfg: &Config) -> Result<Pending, DatapathError> {
        let links_dir = cfg.pin_dir.join(LINKS_DIR);
        let prog = program_mut(&mut self.ebpf)?;
        let mut fresh = Vec::new();
        for iface in &cfg.interfaces {
            let pin = links_dir.join(iface);
            if pin.exists() {
                // A pinned link whose device was deleted (ifindex 0) or recreated under the
                // same name (another ifindex) forwards nothing: attach afresh; `commit`
                // replaces the pin. Unreadable: keep it, as before.
                match (linkinfo::xdp_ifindex(&pin), linkinfo::ifindex(iface)) {
                    (Ok(have), Some(want)) if have != want => warn!(
                        interface = %iface,
                        link_ifindex = have,
                        ifindex = want,
                        "the pinned link is not attached to this interface any more (device \
                         deleted or recreated): attaching afresh"
                    ),
                    _ => continue,
                }
            }
            match attach_one(prog, iface, cfg.xdp_mode) {
                Ok(id) => fresh.push((iface.clone(), id)),
                Err(e) => {
                    for (iface, id) in fresh {
                        if prog.detach(id).is_ok() {
                            info!(interface = %iface, "detached again (attaching another interface failed)");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(Pending { fresh })
    }

    /// Step 2: swaps this program into every pinned link (`bpf_link_update`: each packet sees
    /// the old or the new program) and pins the fresh links. If any of it fails, the links
    /// already swapped get the previous program back (the one pinned at `pin_dir/prog`), the
    /// fresh links are detached, and the error says whether that rollback succeeded. Once all
    /// links are in place, links of interfaces no longer in the config are unpinned (which
    /// detaches them) and this program is pinned as `prog`.
    pub fn commit(&mut self, cfg: &Config, pending: Pending) -> Result<(), DatapathError> {
        let links_dir = cfg.pin_dir.join(LINKS_DIR);
        let perr = |message: String| DatapathError::Pin {
            dir: links_dir.clone(),
            message,
        };
        let prog = program_mut(&mut self.ebpf)?;
        let mut swapped: Vec<&str> = Vec::new();
        let mut pinned: Vec<PathBuf> = Vec::new();
        let fresh_names: Vec<String> = pending.fresh.iter().map(|(f, _)| f.clone()).collect();
        let mut fresh = pending.fresh;
        let result = (|| {
            fs::create_dir_all(&links_dir).map_err(|e| perr(e.to_string()))?;
            for iface in &cfg.interfaces {
                if fresh_names.contains(iface) {
                    continue;
                }
                swap_into(prog, &links_dir.join(iface), iface)?;
                swapped.push(iface);
                info!(interface = %iface, "program replaced on the pinned link");
            }
            while let Some((iface, id)) = fresh.pop() {
                let path = links_dir.join(&iface);
                // A pin here is a defunct link's (see `attach_new`): replaced.
                let _ = fs::remove_file(&path);
                // Taken from the program: if pinning fails, dropping `fd` detaches it.
                let link = prog.take_link(id).map_err(DatapathError::Program)?;
                let fd = FdLink::try_from(link)
                    .map_err(|e| perr(format!("{iface}: not a bpf_link: {e}")))?;
                fd.pin(&path)
                    .map_err(|e| perr(format!("{}: {e}", path.display())))?;
                pinned.push(path);
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Fresh links: unpin what was pinned, detach what was not (an un-pinned link whose
            // last fd closes is detached by the kernel).
            for path in &pinned {
                let _ = fs::remove_file(path);
            }
            for (_, id) in fresh {
                let _ = prog.detach(id);
            }
            let restored = restore(&cfg.pin_dir, &links_dir, &swapped);
            return Err(rolled_back(e, swapped.len(), restored));
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

/// Interfaces [`Datapath::attach_new`] attached and [`Datapath::commit`] will pin.
#[must_use = "commit the pending links, or drop the Datapath to detach them"]
pub struct Pending {
    fresh: Vec<(String, XdpLinkId)>,
}

/// Puts `prog` into the link pinned at `path`.
pub(crate) fn swap_into(prog: &mut Xdp, path: &Path, iface: &str) -> Result<(), DatapathError> {
    let perr = |message: String| DatapathError::Pin {
        dir: path.to_owned(),
        message,
    };
    let pinned = PinnedLink::from_pin(path).map_err(|e| perr(e.to_string()))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| perr(e.to_string()))?;
    prog.attach_to_link(link)
        .map_err(|source| DatapathError::Attach {
            iface: iface.to_owned(),
            mode: "existing link",
            source,
        })?;
    Ok(())
}

/// Gives the links of `ifaces` back the program pinned at `pin_dir/prog` (the one they ran
/// before this attach). Returns what could not be restored.
fn restore(pin_dir: &Path, links_dir: &Path, ifaces: &[&str]) -> Result<(), String> {
    if ifaces.is_empty() {
        return Ok(());
    }
    let prog_pin = pin_dir.join(PROG_PIN);
    let mut old =
        Xdp::from_pin(&prog_pin, aya_obj::programs::XdpAttachType::Interface).map_err(|e| {
            format!(
                "the previous program ({}) cannot be opened: {e}",
                prog_pin.display()
            )
        })?;
    let mut failed = Vec::new();
    for iface in ifaces {
        if let Err(e) = swap_into(&mut old, &links_dir.join(iface), iface) {
            failed.push(format!("{iface}: {e}"));
        } else {
            info!(interface = %iface, "previous program restored on the pinned link");
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

fn rolled_back(e: DatapathError, swapped: usize, restored: Result<(), String>) -> DatapathError {
    match restored {
        Ok(()) => DatapathError::RolledBack {
            source: Box::new(e),
            state: if swapped == 0 {
                "no link was changed".to_owned()
            } else {
                format!("the {swapped} link(s) already swapped run the previous program again")
            },
        },
        Err(what) => DatapathError::RollbackFailed {
            source: Box::new(e),
            state: what,
        },
    }
}

pub(crate) fn attach_one(
    prog: &mut Xdp,
    iface: &str,
    mode: XdpModeCfg,
) -> Result<XdpLinkId, DatapathError> {
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
    let _ = fs::remove_dir_all(dir.join(UPGRADE_DIR));
    let _ = fs::remove_file(dir.join(PROG_PIN));
    for name in MAP_NAMES {
        let _ = fs::remove_file(dir.join(name));
    }
    let _ = fs::remove_dir(dir);
    n
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
