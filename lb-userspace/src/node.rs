//! The node side of tunnel mode: the decapsulation program (`lb-ebpf/src/decap.rs`, its own
//! object) loaded and told which of the node's addresses balancers tunnel to and which GUE
//! port it takes (the fixtures run it with BPF_PROG_TEST_RUN), and `cidlb node up|down|check`,
//! which attach it to a node's interface and set the node up around it.

use std::{fs, net::IpAddr, path::Path, process::Command};

use anyhow::Context;
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        ProgramError, Xdp,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr_key,
    decap::{DECAP_ADDRS, DECAP_PORTS, DECAP_SLOTS, DECAP_STATS, PROGRAM},
    port_wire, AddrKey,
};

use crate::{
    config::node::NodeConfig,
    datapath::{attach_one, is_bpffs, swap_into, PROG_PIN},
    ebpf::{map, merr, DatapathError},
};

/// The decapsulation object. Empty when built with AYA_BUILD_SKIP=1.
static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));

/// A loaded decapsulation program with maps of its own (nothing pinned, nothing attached).
pub struct Decap {
    pub ebpf: Ebpf,
}

impl Decap {
    /// Loads the program and fills its maps: `addrs` are the node's addresses balancers
    /// tunnel to; `gue_port` the UDP port it decapsulates GUE on (`None`: IPIP only).
    pub fn load(addrs: &[IpAddr], gue_port: Option<u16>) -> Result<Self, DatapathError> {
        if DECAP_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .load(DECAP_OBJECT)
            .map_err(DatapathError::Object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
            .try_into()
            .map_err(DatapathError::Program)?;
        prog.load().map_err(crate::ebpf::load_error)?;
        {
            let mut m: HashMap<_, AddrKey, u8> =
                HashMap::try_from(map(&mut ebpf, DECAP_ADDRS)?).map_err(merr(DECAP_ADDRS))?;
            for a in addrs {
                m.insert(addr_key(*a), 1, 0).map_err(merr(DECAP_ADDRS))?;
            }
        }
        let mut ports: Array<_, u16> =
            Array::try_from(map(&mut ebpf, DECAP_PORTS)?).map_err(merr(DECAP_PORTS))?;
        ports
            .set(0, port_wire(gue_port.unwrap_or(0)), 0)
            .map_err(merr(DECAP_PORTS))?;
        Ok(Self { ebpf })
    }

    /// The counters summed over CPUs, by `lb_common::decap` slot.
    pub fn counters(&self) -> Result<[u64; DECAP_SLOTS as usize], DatapathError> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(DECAP_STATS).ok_or(DatapathError::Map {
                name: DECAP_STATS,
                message: "not in the object".into(),
            })?)
            .map_err(merr(DECAP_STATS))?;
        let mut out = [0u64; DECAP_SLOTS as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = stats
                .get(&(i as u32), 0)
                .map_err(merr(DECAP_STATS))?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

/// The pinned link of the node's interface, under `pin_dir`.
const LINK_PIN: &str = "link";

/// `cidlb node up`: loads the decapsulation program with this node's tunnel addresses and GUE
/// port, attaches it to `interface` (replacing the program of a link pinned by an earlier
/// `up`: no moment without one), pins the link, program and counters under `pin_dir`, puts
/// the VIPs on `lo`, and sets the interface's sysctls: `rp_filter` 2 (loose: the client's
/// address arrives from the tunnel, not from where the node routes to it), `arp_ignore` 1 and
/// `arp_announce` 2 (the VIP on `lo` is not answered for, nor used as an ARP source, on the
/// interface).
pub fn up(cfg: &NodeConfig) -> anyhow::Result<()> {
    crate::datapath::require_root("cidlb node up")?;
    let dir = &cfg.pin_dir;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && !is_bpffs(dir) {
        return Err(DatapathError::NoBpffs(parent.to_owned()).into());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut d = Decap::load(&cfg.tunnel_addresses, cfg.gue_port)?;
    let prog: &mut Xdp = d
        .ebpf
        .program_mut(PROGRAM)
        .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
        .try_into()
        .map_err(DatapathError::Program)?;
    let link = dir.join(LINK_PIN);
    if link.exists() {
        swap_into(prog, &link, &cfg.interface)?;
    } else {
        let id = attach_one(prog, &cfg.interface, cfg.xdp_mode)?;
        let fd = FdLink::try_from(prog.take_link(id).map_err(DatapathError::Program)?)
            .map_err(|e| anyhow::anyhow!("{}: not a bpf_link: {e}", cfg.interface))?;
        fd.pin(&link)
            .with_context(|| format!("pinning {}", link.display()))?;
    }
    let prog_pin = dir.join(PROG_PIN);
    let _ = fs::remove_file(&prog_pin);
    prog.pin(&prog_pin)
        .with_context(|| format!("pinning {}", prog_pin.display()))?;
    let stats = dir.join(DECAP_STATS);
    let _ = fs::remove_file(&stats);
    d.ebpf
        .map_mut(DECAP_STATS)
        .ok_or_else(|| anyhow::anyhow!("no {DECAP_STATS} in the object"))?
        .pin(&stats)
        .with_context(|| format!("pinning {}", stats.display()))?;
    for vip in &cfg.vips {
        ip(&["addr", "replace", &host_prefix(*vip), "dev", "lo"])?;
    }
    for (key, value) in sysctls(&cfg.interface) {
        fs::write(&key, value).with_context(|| format!("writing {value} to {key}"))?;
    }
    Ok(())
}

/// `cidlb node down`: detaches the program (the link's pin goes), removes the other pins and
/// the VIPs from `lo`. The sysctls stay as `up` left them.
pub fn down(cfg: &NodeConfig) -> anyhow::Result<()> {
    crate::datapath::require_root("cidlb node down")?;
    for name in [LINK_PIN, PROG_PIN, DECAP_STATS] {
        let _ = fs::remove_file(cfg.pin_dir.join(name));
    }
    let _ = fs::remove_dir(&cfg.pin_dir);
    for vip in &cfg.vips {
        // Gone already is fine.
        let _ = ip(&["addr", "del", &host_prefix(*vip), "dev", "lo"]);
    }
    Ok(())
}

/// `cidlb node check`: what is not as `up` sets it (empty: all is), and the counters.
pub fn check(cfg: &NodeConfig) -> (Vec<String>, Option<[u64; DECAP_SLOTS as usize]>) {
    let mut problems = Vec::new();
    let link = cfg.pin_dir.join(LINK_PIN);
    match PinnedLink::from_pin(&link) {
        Ok(_) => {}
        Err(e) => problems.push(format!(
            "no decapsulation on {}: {} ({e}); run `cidlb node up`",
            cfg.interface,
            link.display()
        )),
    }
    let lo = Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for vip in &cfg.vips {
        if !lo.contains(&format!(" {} ", host_prefix(*vip))) {
            problems.push(format!(
                "{vip} is not on lo: the node's stack would not take the decapsulated packets"
            ));
        }
    }
    for (key, want) in sysctls(&cfg.interface) {
        match fs::read_to_string(&key) {
            Ok(v) if v.trim() == want => {}
            Ok(v) => problems.push(format!("{key} is {}, `up` sets {want}", v.trim())),
            Err(e) => problems.push(format!("{key}: {e}")),
        }
    }
    let counters = (|| {
        let data = MapData::from_pin(cfg.pin_dir.join(DECAP_STATS)).ok()?;
        let m: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).ok()?;
        let mut out = [0u64; DECAP_SLOTS as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = m.get(&(i as u32), 0).ok()?.iter().sum();
        }
        Some(out)
    })();
    (problems, counters)
}

/// The interface's sysctls `up` sets: (path, value).
fn sysctls(interface: &str) -> [(String, &'static str); 3] {
    let conf = |k: &str| format!("/proc/sys/net/ipv4/conf/{interface}/{k}");
    [
        (conf("rp_filter"), "2"),
        (conf("arp_ignore"), "1"),
        (conf("arp_announce"), "2"),
    ]
}

fn host_prefix(a: IpAddr) -> String {
    match a {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !o.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}
