//! What a packet did: the action, the frame left behind, the counters bumped.

use lb_common::Counter;

use crate::{NodeDeltas, XDP_DROP, XDP_PASS};

/// The reference's verdict on one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    /// The frame after the program (the input if nothing was written).
    pub frame: Vec<u8>,
    /// Every counter bumped, in order (a counter may appear more than once).
    pub counters: Vec<Counter>,
    /// Per-node traffic by `NODE_STATS` slot.
    pub nodes: NodeDeltas,
    /// A step whose input the caller observed in the kernel (the limits' buckets) found no way
    /// to agree with it: why. A disagreement even when everything else matches.
    pub misfit: Option<String>,
}

impl Outcome {
    pub fn new(frame: &[u8]) -> Self {
        Self {
            action: XDP_PASS,
            frame: frame.to_vec(),
            counters: Vec::new(),
            nodes: NodeDeltas::new(),
            misfit: None,
        }
    }

    pub fn count(&mut self, c: Counter) {
        self.counters.push(c);
    }

    /// How many times `c` was bumped.
    pub fn delta(&self, c: Counter) -> u64 {
        self.counters.iter().filter(|&&k| k == c).count() as u64
    }

    pub fn to_node(&mut self, slot: u32, bytes: u64) {
        let s = self.nodes.entry(slot).or_default();
        s.to_node_packets += 1;
        s.to_node_bytes += bytes;
    }

    pub fn from_node(&mut self, slot: u32, bytes: u64) {
        let s = self.nodes.entry(slot).or_default();
        s.from_node_packets += 1;
        s.from_node_bytes += bytes;
    }
}

/// A packet ended by counter `c` is dropped if the counter's name says so, else passed
/// (docs/security.md: `drop_*` frames are dropped; `pass_*`, `fwd_kernel_*` and `shadow_pass` go to the
/// kernel).
pub fn action_for(c: Counter) -> u32 {
    if c.name().starts_with("drop_") {
        XDP_DROP
    } else {
        XDP_PASS
    }
}
