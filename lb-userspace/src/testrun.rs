//! BPF_PROG_TEST_RUN over a loaded datapath: the fixtures, `cidlb explain` and the bench run
//! single frames through the real program in the kernel. Not used by `cidlb run`.

use aya::{
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::names;

use crate::datapath::{Datapath, DatapathError, EBPF_OBJECT};

/// What one BPF_PROG_TEST_RUN did.
pub struct PacketRun {
    /// XDP action (1 drop, 2 pass, 3 tx, 4 redirect).
    pub action: u32,
    /// The frame after the program.
    pub output: Vec<u8>,
    /// Kernel-measured average time per run.
    pub per_run: std::time::Duration,
}

/// The embedded object loaded with nothing pinned and a one-entry flow table, for the bench's
/// reference programs (`cidlb_sink`, `cidlb_fwd`); `sink_node` sets the sink's expected node.
pub fn load_bench_object(sink_node: u8) -> Result<Ebpf, DatapathError> {
    if EBPF_OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    EbpfLoader::new()
        .override_global(names::SINK_NODE, &sink_node, true)
        .override_global(names::CONFIG, &lb_common::DpConfig::DEFAULT, true)
        .map_max_entries(names::FLOWS, 1)
        .load(EBPF_OBJECT)
        .map_err(DatapathError::Object)
}

impl Datapath {
    /// Loads the empty reference program from the same object (bench only).
    pub fn load_floor(&mut self) -> Result<(), DatapathError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::FLOOR)
            .ok_or(DatapathError::Program(ProgramError::NotLoaded))?
            .try_into()
            .map_err(DatapathError::Program)?;
        prog.load().map_err(DatapathError::Program)
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

    /// [`Datapath::run_packet`] with another (loaded) program of the object, e.g. the floor.
    pub fn run_program(
        &self,
        name: &str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<PacketRun, DatapathError> {
        let prog: &Xdp = self
            .ebpf
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
}
