//! cidlb, the agent: config, loading and attaching the XDP datapath, filling its maps, reload,
//! health checks, stats and metrics.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; the integration tests drive the
//! same code against the real kernel.

pub mod agent;
pub mod announce;
pub mod config;
pub mod datapath;
pub mod ebpf;
pub mod explain;
pub mod health;
pub mod host;
pub mod icmp_fanout;
pub mod layout;
pub mod linkinfo;
pub mod metrics;
pub mod node;
pub mod pinlock;
pub mod plan;
pub mod provision;
pub mod ready;
pub mod statedir;
pub mod stats;
pub mod testrun;
pub mod upgrade;
pub mod validate;
