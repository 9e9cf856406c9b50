//! Builds the XDP programs (lb-ebpf) for bpfel-unknown-none with aya-build: every binary of
//! lb-ebpf lands in OUT_DIR under its name, `lb` (the datapath, which `cidlb` embeds) and
//! `bench` (the bench's reference programs, embedded apart by `testrun.rs`) and `decap` (the
//! node side of tunnel mode, `node.rs`).
//!
//! With AYA_BUILD_SKIP=1 (host-only checks such as `cargo clippy` for the host), no eBPF is
//! built: an empty placeholder is written so the crate compiles, and `cidlb run` says so.
//! `cargo xtask package` sets CIDLB_REQUIRE_EBPF=1: then skipping is an error, so no package
//! can carry an empty object (xtask also checks the packaged binary).

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=../lb-common/src");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=CIDLB_REQUIRE_EBPF");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip && env::var("CIDLB_REQUIRE_EBPF").is_ok_and(|v| v == "1") {
        anyhow::bail!(
            "AYA_BUILD_SKIP is set but CIDLB_REQUIRE_EBPF=1 (a package build): the cidlb \
             binary would carry no XDP program; unset AYA_BUILD_SKIP"
        );
    }
    if skip {
        fs::write(out.join("lb"), b"")?;
        fs::write(out.join("bench"), b"")?;
        fs::write(out.join("decap"), b"")?;
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
