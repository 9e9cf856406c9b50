//! Types shared by the XDP datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is defined once here: `#[repr(C)]`, `Copy`, explicit padding, no
//! `bool`/enum fields, sizes asserted at compile time. Addresses and ports inside map types are
//! stored exactly as they appear on the wire (network byte order) so the datapath compares and
//! copies them without byte swapping.
#![no_std]

pub mod cookie;
pub mod counters;
pub mod csum;
pub mod decap;
pub mod frag;
pub mod hash;
pub mod limits;
pub mod maps;
pub mod splitmix;
pub mod tunnel;
pub mod xdp;

pub use counters::Counter;
pub use maps::*;
