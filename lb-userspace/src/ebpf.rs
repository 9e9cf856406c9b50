//! The embedded eBPF object, the maps it defines, and the error of everything that loads it or
//! writes its maps. Below `datapath` (load, attach, pin) and `provision` (map contents), so
//! neither needs the other for these.

use std::{collections::HashMap as StdHashMap, hash::Hash, path::PathBuf};

use aya::{
    maps::{HashMap, MapData, MapError},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfError, Pod,
};
use lb_common::names;

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
    names::NODE_IDS,
    names::NODE_FILTER,
    names::VIP_TABLE,
    names::LAYOUT,
    lb_common::limits::LIMIT_CFG,
    lb_common::limits::SRC_BUCKETS,
    lb_common::limits::GLOBAL_BUCKET,
    lb_common::limits::KNOWN_SRCS,
    lb_common::limits::LIMIT_EXEMPT,
    names::MAGLEV,
    names::MAGLEV_CTL,
    names::SRC_FILTER,
    names::LOCAL_ADDRS,
    names::VLAN_IFACES,
    lb_common::cookie::COOKIES,
    lb_common::cookie::COOKIE_KEY,
    lb_common::frag::FRAGS,
    lb_common::tunnel::VIP_TUNNEL,
    names::REPLY_DESTS,
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
    #[error("{source}; rolled back: {state}, newly attached interfaces detached again")]
    RolledBack {
        #[source]
        source: Box<DatapathError>,
        state: String,
    },
    #[error(
        "{source}; ROLLBACK FAILED, these links now run the NEW program: {state}. Run `cidlb run` \
         again with a config that works, or `cidlb detach`"
    )]
    RollbackFailed {
        #[source]
        source: Box<DatapathError>,
        state: String,
    },
}

/// The datapath's XDP program in a loaded object.
pub(crate) fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(names::PROGRAM)
        .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
        .try_into()
        .map_err(DatapathError::Program)
}

/// Turns an aya map error on map `name` into the agent's error naming that map.
pub(crate) fn merr(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        message: e.to_string(),
    }
}

/// The map `name` of the loaded object, or an error naming it.
pub(crate) fn map<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, DatapathError> {
    ebpf.map_mut(name).ok_or(DatapathError::Map {
        name,
        message: "not in the eBPF object".into(),
    })
}

/// Inserts every entry of `want` into hash map `name`; returns the keys it holds beyond them.
pub(crate) fn insert_all<K: Pod + Eq + Hash, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &[(K, V)],
) -> Result<Vec<K>, DatapathError> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(merr(name))?;
    let keep: StdHashMap<K, ()> = want.iter().map(|(k, _)| (*k, ())).collect();
    for (k, v) in want {
        m.insert(k, v, 0).map_err(merr(name))?;
    }
    Ok(m.keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains_key(k))
        .collect())
}

/// Removes `keys` from hash map `name`.
pub(crate) fn remove_all<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: Vec<K>,
) -> Result<(), DatapathError> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(merr(name))?;
    for k in keys {
        m.remove(&k).map_err(merr(name))?;
    }
    Ok(())
}

/// A program's load error: the verifier's refusal with its log, or another program error.
pub(crate) fn load_error(e: aya::programs::ProgramError) -> DatapathError {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DatapathError::Verifier {
            io_error,
            log: verifier_log.to_string(),
        },
        e => DatapathError::Program(e),
    }
}
