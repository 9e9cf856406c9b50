//! An earlier release of cidlb, built from git, for the upgrade test: `cidlb run` of this tree
//! must take over a datapath that release pinned (another layout) without losing a packet.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{root, sh};

/// The last commit of datapath layout 2 (the one before `NODE_IDS`, layout 3).
pub const LAYOUT2_COMMIT: &str = "6646f497091fa9e87674aa0f4b2dfd63362f841b";

/// The environment variable the upgrade test reads the old binary's path from.
pub const ENV: &str = "CIDLB_LAYOUT2_BIN";

/// Where the old release is built; kept between runs, so it is built once.
fn dir() -> PathBuf {
    root().join("target/old/layout2")
}

/// The old release's `cidlb` binary, built from [`LAYOUT2_COMMIT`] if it is not there yet
/// (`git archive` of the commit, then `cargo build --release -p lb-userspace` with a target
/// directory of its own; about 3 minutes on 2 cores).
pub fn layout2_cidlb() -> Result<PathBuf> {
    let dir = dir();
    let bin = dir.join("target/release/cidlb");
    if bin.exists() {
        return Ok(bin);
    }
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let archive = Command::new("git")
        .current_dir(root())
        .args(["archive", "--format=tar", LAYOUT2_COMMIT])
        .output()
        .context("running git archive")?;
    if !archive.status.success() {
        bail!(
            "git archive {LAYOUT2_COMMIT} failed (the upgrade test needs the repository's \
             history; a shallow clone lacks it): {}",
            String::from_utf8_lossy(&archive.stderr).trim()
        );
    }
    untar(&archive.stdout, &src)?;
    sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "--manifest-path",
            ])
            .arg(src.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env_remove("AYA_BUILD_SKIP"),
    )
    .context("building the layout-2 release")?;
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

fn untar(tar: &[u8], into: &Path) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("tar")
        .args(["-x", "-C"])
        .arg(into)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running tar")?;
    child
        .stdin
        .take()
        .context("tar's stdin")?
        .write_all(tar)
        .context("writing to tar")?;
    let st = child.wait()?;
    if !st.success() {
        bail!("tar -x failed with {st}");
    }
    Ok(())
}
