//! Builds the XDP programs (lb-ebpf) for bpfel-unknown-none with aya-build: every binary of
//! lb-ebpf lands in OUT_DIR under its name, `lb` (the datapath, which `cidlb` embeds) and
//! `bench` (the bench's reference programs, embedded apart by `testrun.rs`).
//!
//! With AYA_BUILD_SKIP=1 (host-only checks such as `cargo clippy` for the host), no eBPF is
//! built: an empty placeholder is written so the crate compiles, and `cidlb run` says so.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=../lb-common/src");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out.join("lb"), b"")?;
        fs::write(out.join("bench"), b"")?;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
