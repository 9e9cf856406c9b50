//! Upgrading a pinned datapath of another layout (`LAYOUT_VERSION`) without a detach: no
//! packet lost, flows carried, pin paths unchanged.
//!
//! A binary of another layout cannot adopt the old maps (see `layout.rs`). So it builds its
//! own beside them and moves over:
//! 1. Load this program with its maps pinned under `pin_dir/upgrade/` (all new, empty), and
//!    fill them from the config, as a first start does.
//! 2. Copy the flow table, old to new (flows first: they are what a handshake or a non-CID
//!    session needs to stay on its node; CID records need no state at all). Counters, limit
//!    buckets, known sources and the next-hop cache start fresh.
//! 3. Make the directory `pin_dir/upgrade/swapping`: from here on the upgrade only goes
//!    forward. Swap this program into the pinned links, one at a time (`bpf_link_update`).
//! 4. Copy the flows again, without overwriting: the ones the old program created while the
//!    links were being swapped.
//! 5. Move every new map's pin over the old one (`rename`, atomic on bpffs: a reader of a pin
//!    path always finds a map), remove pins of maps this layout does not have, and the
//!    staging directory.
//!
//! Two generations run at once while the links are swapped (a link per interface): each
//! program sees only its own maps, so neither reads the other's values in the wrong layout.
//! They agree where it matters: CID records go by the CID, replies are un-NATed from the same
//! config, and with `flows.policy: maglev` both pick the same node for a new flow (the same
//! table from the same config). With `round_robin`, a flow whose first packets straddle the
//! swap (within milliseconds) may get another node from each. Flows created by the old program
//! in that window are copied in step 4.
//!
//! A crash is recovered by the next `cidlb run` ([`recover`]) before anything else: staging
//! without `swapping` means no link was touched, so the staging pins are removed and the old
//! datapath runs on as it was; with `swapping`, some links may run the new program, so the
//! recovery goes forward: copy the flows the old program made (not overwriting), then step 5.
//! The new agent then adopts the result like any pinned datapath of its layout.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData},
    Ebpf,
};
use lb_common::{names, Flow, FlowKey};
use tracing::{info, warn};

use crate::{
    datapath::{self, LINKS_DIR, PROG_PIN, UPGRADE_DIR},
    ebpf::{map, merr, DatapathError, MAP_NAMES},
    layout::{self, LayoutError},
};

/// The marker directory of step 3: links may run the new program.
const SWAPPING: &str = "swapping";

/// Where the new maps are pinned during an upgrade.
pub fn staging(dir: &Path) -> PathBuf {
    dir.join(UPGRADE_DIR)
}

/// Is the datapath pinned under `dir` one to upgrade: attached (pinned links) but of another
/// layout? `Ok(false)`: nothing pinned, or this layout (adopt it). Errors that say nothing
/// about the layout (an unreadable map) stay errors.
pub fn needed(dir: &Path, config: Option<&Path>) -> Result<bool, LayoutError> {
    match layout::check(dir, config) {
        Ok(()) => Ok(false),
        Err(
            LayoutError::Version { .. } | LayoutError::Missing { .. } | LayoutError::Shape { .. },
        ) if datapath::is_pinned(dir) && has_links(dir) => Ok(true),
        Err(e) => Err(e),
    }
}

fn has_links(dir: &Path) -> bool {
    fs::read_dir(dir.join(LINKS_DIR)).is_ok_and(|mut d| d.next().is_some())
}

fn perr(dir: &Path, what: &str, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin {
        dir: dir.to_owned(),
        message: format!("{what}: {e}"),
    }
}

/// Finishes or undoes an upgrade a crash interrupted (see the module doc). Returns what it
/// did, for the log; `None`: there was none.
pub fn recover(dir: &Path) -> Result<Option<&'static str>, DatapathError> {
    let stage = staging(dir);
    if !stage.exists() {
        return Ok(None);
    }
    if !stage.join(SWAPPING).exists() {
        abandon(dir);
        return Ok(Some(
            "removed the maps of an upgrade that stopped before any link ran its program; the \
             pinned datapath was never touched",
        ));
    }
    let from = dir.join(names::FLOWS);
    let to = stage.join(names::FLOWS);
    if from.exists() && to.exists() {
        let mut new = open_flows(&to)?;
        match copy_flows_into(&from, &mut new, false) {
            Ok(n) => info!(flows = n, "flows the previous program created copied"),
            Err(e) => warn!(error = %e, "flows of the previous program not copied"),
        }
    }
    finish(dir)?;
    Ok(Some(
        "finished an upgrade that stopped after it began swapping links: the new maps are in \
         place",
    ))
}

/// Crash-recovery tests stop the agent dead at a named point of the upgrade: the environment
/// variable `CIDLB_UPGRADE_FAILPOINT` names it, and the agent aborts there (as a kill -9 or a
/// power cut would). Unset in production.
pub fn failpoint(name: &str) {
    if std::env::var_os("CIDLB_UPGRADE_FAILPOINT").is_some_and(|v| v == name) {
        warn!(failpoint = name, "upgrade failpoint: aborting");
        std::process::abort();
    }
}

/// Step 3's marker: from here on, [`recover`] goes forward.
pub fn begin_swap(dir: &Path) -> Result<(), DatapathError> {
    let m = staging(dir).join(SWAPPING);
    fs::create_dir_all(&m).map_err(|e| perr(&m, "marking the link swap", e))
}

/// Removes the staging maps (the old datapath was not touched, or was restored).
pub fn abandon(dir: &Path) {
    let _ = fs::remove_dir_all(staging(dir));
}

/// Step 5: every staging pin replaces the old one of its name; old pins of maps this layout
/// does not have go; the staging directory goes.
pub fn finish(dir: &Path) -> Result<(), DatapathError> {
    let stage = staging(dir);
    for name in MAP_NAMES {
        let from = stage.join(name);
        if from.exists() {
            fs::rename(&from, dir.join(name))
                .map_err(|e| perr(dir, &format!("moving the new {name} into place"), e))?;
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = name == PROG_PIN || MAP_NAMES.contains(&name.as_str());
            if !keep && e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    fs::remove_dir_all(&stage).map_err(|e| perr(&stage, "removing the staging pins", e))
}

fn open_flows(path: &Path) -> Result<HashMap<MapData, FlowKey, Flow>, DatapathError> {
    let data = MapData::from_pin(path).map_err(merr(names::FLOWS))?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(merr(names::FLOWS))
}

/// Copies the flows pinned at `from` (an old layout's `FLOWS`) into `ebpf`'s `FLOWS`;
/// `overwrite: false` keeps entries the new table has. Returns how many were written. The
/// key and value types have not changed since layout 2; a table whose sizes differ is not
/// copied (an error says so, and its flows are lost: CID sessions continue, handshakes in
/// flight start over).
pub fn copy_flows(from: &Path, ebpf: &mut Ebpf, overwrite: bool) -> Result<u64, DatapathError> {
    let mut to: HashMap<&mut MapData, FlowKey, Flow> =
        HashMap::try_from(map(ebpf, names::FLOWS)?).map_err(merr(names::FLOWS))?;
    copy_flows_into(from, &mut to, overwrite)
}

fn copy_flows_into<T: std::borrow::BorrowMut<MapData>>(
    from: &Path,
    to: &mut HashMap<T, FlowKey, Flow>,
    overwrite: bool,
) -> Result<u64, DatapathError> {
    let data = MapData::from_pin(from).map_err(merr(names::FLOWS))?;
    let info = data.info().map_err(merr(names::FLOWS))?;
    let (k, v) = (size_of::<FlowKey>() as u32, size_of::<Flow>() as u32);
    if info.key_size() != k || info.value_size() != v {
        return Err(DatapathError::Map {
            name: names::FLOWS,
            message: format!(
                "the pinned flow table has key/value sizes {}/{}, this cidlb {k}/{v}: its flows \
                 are not carried over",
                info.key_size(),
                info.value_size()
            ),
        });
    }
    let old: HashMap<MapData, FlowKey, Flow> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(merr(names::FLOWS))?;
    // BPF_NOEXIST: an entry the new program already made is newer than the old one.
    let flags = if overwrite { 0 } else { 1 };
    let mut n = 0;
    // One key at a time (aya 0.14 has no batch operations): memory stays flat whatever the
    // table's size. An entry evicted or expired between the key walk and its lookup is gone.
    for entry in old.iter() {
        let Ok((key, flow)) = entry else { continue };
        match to.insert(key, flow, flags) {
            Ok(()) => n += 1,
            Err(_) if !overwrite => {} // exists: keep the new one
            Err(e) => return Err(merr(names::FLOWS)(e)),
        }
    }
    Ok(n)
}
