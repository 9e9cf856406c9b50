//! Test support shared by the privileged test binaries: a netns guard and a packet builder.
#![allow(dead_code, reason = "each test binary uses part of this module")]

pub mod netns;
pub mod packet;

/// These tests load BPF programs and make namespaces: without root they fail, loudly, because
/// CI runs as root and a skipped datapath test would hide a broken datapath.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run `cargo xtask test` as root");
    }
}
