//! Test support shared by the privileged test binaries.
#![allow(dead_code, reason = "each test binary uses part of this module")]

pub mod agent;
pub mod traffic;

pub use lb_lab::require_root;

/// The DTLS test peer binary (`cidlb-testpeer`), built by `cargo test --workspace`.
pub fn testpeer() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .join("cidlb-testpeer");
    assert!(
        p.exists(),
        "{} is missing: run through `cargo xtask test` (or `cargo build -p lb-testpeer`)",
        p.display()
    );
    p
}
