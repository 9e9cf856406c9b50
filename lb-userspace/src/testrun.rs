//! A private datapath and BPF_PROG_TEST_RUN over it: `cidlb explain`, the fixtures, the fuzzer
//! and the bench load the real program with maps of their own, provision it with the agent's
//! code, and run single frames through it in the kernel. Not used by `cidlb run`.

use aya::{
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::names;

use crate::{
    config::Config,
    datapath::{resolve_interfaces, Datapath},
    ebpf::DatapathError,
    provision::provision,
};

/// The bench's reference programs (`cidlb_floor`, `cidlb_sink`, `cidlb_fwd`) and their maps
/// (`SINK`, `FWD`, a `DEVMAP` of their own): an object apart from the datapath's, so
/// `cidlb run` never loads them. Empty when built with AYA_BUILD_SKIP=1.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

/// What one BPF_PROG_TEST_RUN did.
pub struct PacketRun {
    /// XDP action (1 drop, 2 pass, 3 tx, 4 redirect).
    pub action: u32,
    /// The frame after the program.
    pub output: Vec<u8>,
    /// Kernel-measured average time per run.
    pub per_run: std::time::Duration,
}

/// The bench object loaded (nothing pinned, nothing attached); `sink_node` sets the sink's
/// expected node.
pub fn load_bench_object(sink_node: u8) -> Result<Ebpf, DatapathError> {
    if BENCH_OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    EbpfLoader::new()
        .override_global(names::SINK_NODE, &sink_node, true)
        .load(BENCH_OBJECT)
        .map_err(DatapathError::Object)
}

/// The bench object with its empty program (the floor of the per-path cost) loaded into the
/// kernel, ready for [`run_program`].
pub fn load_floor() -> Result<Ebpf, DatapathError> {
    let mut ebpf = load_bench_object(0)?;
    let prog: &mut Xdp = ebpf
        .program_mut(names::FLOOR)
        .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
        .try_into()
        .map_err(DatapathError::Program)?;
    prog.load().map_err(DatapathError::Program)?;
    Ok(ebpf)
}

impl Datapath {
    /// The datapath with maps of its own (nothing pinned, nothing attached), provisioned from
    /// `cfg` by the agent's own code with every node up; `cfg.interfaces` are the redirect
    /// targets.
    pub fn private(cfg: &Config) -> Result<Self, DatapathError> {
        Self::private_with(cfg, &|_| true)
    }

    /// [`Datapath::private`] with each node's health given by `up(id)`.
    pub fn private_with(cfg: &Config, up: &dyn Fn(u32) -> bool) -> Result<Self, DatapathError> {
        let mut dp = Self::load(cfg)?;
        dp.reprovision(cfg, up)?;
        Ok(dp)
    }

    /// Applies `cfg` to the maps in place, as `cidlb run` does on a reload or a health change.
    pub fn reprovision(
        &mut self,
        cfg: &Config,
        up: &dyn Fn(u32) -> bool,
    ) -> Result<(), DatapathError> {
        let ifindexes = resolve_interfaces(&cfg.interfaces)?;
        provision(&mut self.ebpf, cfg, &ifindexes, up)
    }

    /// The XDP program.
    pub fn program(&self) -> Result<&Xdp, DatapathError> {
        self.ebpf
            .program(names::PROGRAM)
            .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
            .try_into()
            .map_err(DatapathError::Program)
    }

    /// Runs `frame` through the program as if received on `ifindex` (BPF_PROG_TEST_RUN),
    /// `repeat` times on the same buffer (the kernel does not restore it between runs).
    pub fn run_packet(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<PacketRun, DatapathError> {
        self.run_program(names::PROGRAM, frame, ifindex, repeat)
    }

    /// [`Datapath::run_packet`] with another (loaded) program of the object.
    pub fn run_program(
        &self,
        name: &str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<PacketRun, DatapathError> {
        run_program(&self.ebpf, name, frame, ifindex, repeat)
    }
}

/// Runs `frame` through the loaded XDP program `name` of `ebpf` as if received on `ifindex`
/// (BPF_PROG_TEST_RUN), `repeat` times on the same buffer (the kernel does not restore it
/// between runs).
pub fn run_program(
    ebpf: &Ebpf,
    name: &str,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<PacketRun, DatapathError> {
    let prog: &Xdp = ebpf
        .program(name)
        .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
        .try_into()
        .map_err(DatapathError::Program)?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = Vec::with_capacity(24);
    for w in [0u32, frame.len() as u32, 0, ifindex, 0, 0] {
        ctx.extend_from_slice(&w.to_ne_bytes());
    }
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: repeat.max(1),
            ..Default::default()
        })
        .map_err(DatapathError::Program)?;
    out.truncate(r.data_size_out as usize);
    Ok(PacketRun {
        action: r.return_value,
        output: out,
        per_run: r.duration,
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::*;

    fn names<'a>(it: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
        it.map(str::to_owned).collect()
    }

    /// `cidlb run` loads only the datapath object: the bench's programs and maps are not in it,
    /// and they are all in the bench object. Loads both into the kernel (root).
    #[test]
    fn bench_programs_and_maps_live_in_their_own_object() {
        lb_lab::require_root();
        let cfg = Config::parse(
            "interfaces: [lo]\nvips: [{address: 192.0.2.10, ports: [5684]}]\n\
             nodes: [{id: 1, address: 203.0.113.11}]\nflows: {capacity: 16}\n",
            Path::new("test.yaml"),
        )
        .expect("config");
        let dp = Datapath::load(&cfg).expect("load the datapath object");
        let bench = load_bench_object(1).expect("load the bench object");
        let bench_programs = [names::FLOOR, names::SINK_PROG, names::FWD_PROG];
        let bench_maps = [names::SINK, names::FWD];

        let programs = names(dp.ebpf.programs().map(|(n, _)| n));
        let maps = names(dp.ebpf.maps().map(|(n, _)| n));
        assert_eq!(
            programs,
            names([names::PROGRAM].into_iter()),
            "{programs:?}"
        );
        for m in bench_maps {
            assert!(
                !maps.contains(m),
                "the datapath object creates {m}: {maps:?}"
            );
        }

        let programs = names(bench.programs().map(|(n, _)| n));
        let maps = names(bench.maps().map(|(n, _)| n));
        assert_eq!(programs, names(bench_programs.into_iter()), "{programs:?}");
        for m in bench_maps {
            assert!(maps.contains(m), "the bench object lacks {m}: {maps:?}");
        }
    }
}
