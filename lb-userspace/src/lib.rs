//! cidlb, the agent: config, loading and attaching the XDP datapath, filling its maps, stats.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; the integration tests drive the
//! same code against the real kernel.

pub mod config;
pub mod datapath;
pub mod provision;
pub mod stats;
