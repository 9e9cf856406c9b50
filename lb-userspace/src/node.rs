//! The node side of tunnel mode: the decapsulation program (`lb-ebpf/src/decap.rs`, its own
//! object) loaded and told which of the node's addresses balancers tunnel to and which GUE
//! port it takes. The fixtures run it with BPF_PROG_TEST_RUN; attaching it to a node's
//! interface (`cidlb node`) is still to come.

use std::net::IpAddr;

use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr_key,
    decap::{DECAP_ADDRS, DECAP_PORTS, DECAP_SLOTS, DECAP_STATS, PROGRAM},
    port_wire, AddrKey,
};

use crate::ebpf::{map, merr, DatapathError};

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
