//! Test support shared by the privileged test binaries.
#![allow(dead_code, reason = "each test binary uses part of this module")]

pub mod agent;
pub mod traffic;

pub use lb_lab::require_root;
