//! Test support shared by the privileged test binaries.
#![allow(dead_code, reason = "each test binary uses part of this module")]

pub mod agent;
pub mod traffic;

pub use lb_lab::require_root;

/// A file of `deploy/bird/` (the BIRD configs the fleet tests run as they ship).
pub fn deploy_bird(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/bird")
        .join(file)
}

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
