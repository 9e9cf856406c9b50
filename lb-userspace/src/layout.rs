//! Is the datapath pinned under `pin_dir` one this binary can adopt?
//!
//! `cidlb run` adopts the maps pinned under `pin_dir` (that is what makes restarts and upgrades
//! lossless). A binary of another layout must not: with a value struct of another size the
//! kernel writes past the agent's buffer when it iterates a map, or the agent misreads every
//! entry; a `STATS` smaller than the counter list breaks `cidlb stats` and `/metrics`. So before
//! loading with pins, [`check`] reads the pinned `LAYOUT` map (no `LAYOUT` beside a pinned
//! `STATS`: layout 0, what cidlb pinned before it had one) and compares every pinned map's
//! type, key size, value size and max_entries with what the embedded object defines. Only
//! `FLOWS`', `COOKIES`' and `FRAGS`' sizes may differ: a table pinned with another
//! `flows.capacity`, `limits.cookie_capacity` or `limits.fragment_capacity` keeps its size (the documented capacity case). The agent writes [`LAYOUT_VERSION`] into `LAYOUT` on every
//! provision.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapError};
use lb_common::{names, LAYOUT_VERSION};

use crate::ebpf::{EBPF_OBJECT, MAP_NAMES};

/// What an operator does about a refused pin directory.
fn what_to_do(dir: &Path, config: Option<&Path>) -> String {
    let detach = match config {
        Some(file) => format!("cidlb detach --config {}", file.display()),
        None => format!("cidlb detach --pin-dir {}", dir.display()),
    };
    format!(
        "`cidlb run` of this cidlb upgrades it in place while links attach it; otherwise run \
         `{detach}` and start again (flows are lost, CID sessions continue), or go back to the \
         cidlb that pinned it"
    )
}

/// A pinned datapath this binary cannot adopt, or cannot read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "pinned datapath under {dir} has layout {found}, this cidlb expects {LAYOUT_VERSION}: {todo}"
    )]
    Version {
        dir: PathBuf,
        found: u32,
        todo: String,
    },
    #[error(
        "pinned map {path} is {found}, this cidlb (layout {LAYOUT_VERSION}) defines {expected}: {todo}"
    )]
    Shape {
        path: PathBuf,
        found: Shape,
        expected: Shape,
        todo: String,
    },
    #[error(
        "pinned datapath under {dir} lacks map {name}, which layout {LAYOUT_VERSION} has: {todo}"
    )]
    Missing {
        dir: PathBuf,
        name: &'static str,
        todo: String,
    },
    #[error("reading pinned map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("this cidlb's eBPF object has no map {0} (a build problem: rebuild cidlb)")]
    Object(&'static str),
}

/// A map's shape as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "map type {}, key size {}, value size {}, max_entries {}",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

impl Shape {
    /// Equal as far as adopting goes: `FLOWS`, `REPLY_DESTS`, `COOKIES` and `FRAGS` may have
    /// any size.
    fn adoptable(&self, expected: &Shape, name: &str) -> bool {
        let sized_by_config = name == names::FLOWS
            || name == names::REPLY_DESTS
            || name == lb_common::cookie::COOKIES
            || name == lb_common::frag::FRAGS;
        let same_size = sized_by_config || self.max_entries == expected.max_entries;
        self.map_type == expected.map_type
            && self.key_size == expected.key_size
            && self.value_size == expected.value_size
            && same_size
    }
}

/// The shape of every map in [`MAP_NAMES`] as the embedded object defines it.
pub fn expected() -> Result<Vec<(&'static str, Shape)>, LayoutError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|_| LayoutError::Object("(any)"))?;
    MAP_NAMES
        .iter()
        .map(|&name| {
            let m = obj.maps.get(name).ok_or(LayoutError::Object(name))?;
            Ok((
                name,
                Shape {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                },
            ))
        })
        .collect()
}

fn pinned_shape(path: &Path) -> Result<Shape, LayoutError> {
    let read = |source| LayoutError::Read {
        path: path.to_owned(),
        source,
    };
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .map_err(read)?;
    Ok(Shape {
        // An unknown type number reads as "unspecified" (0), which no map of ours has.
        map_type: info.map_type().map_or(0, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// The layout version pinned under `dir`: `None` if nothing is pinned, 0 for a datapath pinned
/// before `LAYOUT` existed.
pub fn pinned_version(dir: &Path) -> Result<Option<u32>, LayoutError> {
    let path = dir.join(names::LAYOUT);
    if !path.exists() {
        let any = MAP_NAMES.iter().any(|n| dir.join(n).exists());
        return Ok(any.then_some(0));
    }
    let read = |source| LayoutError::Read {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(read)?;
    let layout: Array<_, u32> = Array::try_from(Map::Array(data)).map_err(read)?;
    Ok(Some(layout.get(&0, 0).map_err(read)?))
}

/// Refuses a pinned datapath of another layout (see the module doc). `config`: the file the
/// operator gave, named in the advice. Nothing pinned: `Ok`, a fresh start.
pub fn check(dir: &Path, config: Option<&Path>) -> Result<(), LayoutError> {
    let Some(version) = pinned_version(dir)? else {
        return Ok(());
    };
    let todo = || what_to_do(dir, config);
    // A LAYOUT map that reads 0 was created by a cidlb with LAYOUT (layout ≥ 1) that stopped
    // before writing it; the shapes below decide whether it is ours.
    let written = dir.join(names::LAYOUT).exists();
    if version != LAYOUT_VERSION && !(version == 0 && written) {
        return Err(LayoutError::Version {
            dir: dir.to_owned(),
            found: version,
            todo: todo(),
        });
    }
    for (name, expected) in expected()? {
        let path = dir.join(name);
        if !path.exists() {
            return Err(LayoutError::Missing {
                dir: dir.to_owned(),
                name,
                todo: todo(),
            });
        }
        let found = pinned_shape(&path)?;
        if !found.adoptable(&expected, name) {
            return Err(LayoutError::Shape {
                path,
                found,
                expected,
                todo: todo(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_common::{Counter, Node, STATS_SLOTS};

    use super::*;

    #[test]
    fn the_object_defines_what_the_agent_reads() {
        if EBPF_OBJECT.is_empty() {
            // AYA_BUILD_SKIP=1 (host-only lint): there is no object to read.
            return;
        }
        let shapes: std::collections::BTreeMap<_, _> = expected().unwrap().into_iter().collect();
        assert_eq!(shapes[names::STATS].max_entries, STATS_SLOTS);
        assert!(Counter::ALL.len() as u32 <= STATS_SLOTS);
        assert_eq!(shapes[names::NODES].value_size as usize, size_of::<Node>());
        assert_eq!(shapes[names::LAYOUT].max_entries, 1);
        assert_eq!(
            shapes[names::SRC_FILTER].max_entries,
            lb_common::SRC_FILTER_WORDS
        );
        assert_eq!(
            shapes[names::LOCAL_ADDRS].key_size as usize,
            size_of::<lb_common::AddrKey>()
        );
        assert_eq!(
            shapes[names::VLAN_IFACES].key_size as usize,
            size_of::<lb_common::VlanKey>()
        );
    }

    #[test]
    fn only_the_flow_table_may_change_size() {
        let want = Shape {
            map_type: 9,
            key_size: 40,
            value_size: 16,
            max_entries: 1024,
        };
        let bigger = Shape {
            max_entries: 4096,
            ..want
        };
        assert!(bigger.adoptable(&want, names::FLOWS));
        assert!(!bigger.adoptable(&want, names::NODES));
        let wider = Shape {
            value_size: 24,
            ..want
        };
        assert!(!wider.adoptable(&want, names::FLOWS));
    }
}
