//! `cargo xtask`: the project's two entry points and their helpers.
//!
//! - `cargo xtask test`   the docs' links, installs what is missing, then fmt, clippy (host +
//!   bpf), every test.
//! - `cargo xtask run -- --config FILE`  builds and runs `cidlb run --config FILE`.
//! - `cargo xtask fuzz [--packets N] [--seed S]`  the datapath against lb-reference.
//! - `cargo xtask setup`  only the installation step; `cargo xtask build` a release build.
//! - `cargo xtask package`  the Debian package, `target/debian/cidlb_<version>_amd64.deb`.
//! - `cargo xtask docs`  the Markdown's relative links and the book's table of contents.

mod demo;
mod docs;
mod lab;
mod old;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker, apt packages, bpffs.
    Setup,
    /// Release build of `cidlb` (with the embedded XDP program).
    Build,
    /// The Debian package (cargo-deb): target/debian/cidlb_<version>_amd64.deb.
    Package {
        /// Then what `cargo xtask test` does with it: install, check, verify the units, one
        /// netns test against /usr/bin/cidlb, purge, and nothing left behind.
        #[arg(long)]
        test: bool,
    },
    /// Build, then run `cidlb run` with the given arguments (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure: per-path kernel cost (BPF_PROG_TEST_RUN) and memory; writes target/bench/.
    Bench {
        /// More repeats and rounds, flow tables up to 1,000,000 (longer).
        #[arg(long)]
        full: bool,
    },
    /// cidlb on a built-in lab with real DTLS 1.2 CID clients and servers: live counters, a
    /// summary, then everything removed.
    Demo,
    /// The netns lab (client, balancer, nodes) for hands-on use: `lab up [--nodes N]`, `lab down`.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Differential fuzzing: frames through the loaded XDP program (BPF_PROG_TEST_RUN) and
    /// through lb-reference; every action, output byte and counter must agree.
    Fuzz {
        #[arg(long, default_value_t = 100_000)]
        packets: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Check the Markdown offline: every relative link and anchor resolves, and docs/README.md
    /// lists every page of the book.
    Docs,
    /// Everything CI checks: the docs' links, setup, rustfmt, clippy (host and bpf), unit,
    /// fixture and netns tests.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Passed to `cargo test` as a test name filter.
        filter: Option<String>,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the lab and leave it up.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Remove the lab.
    Down,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            build_release()
        }
        Cmd::Package { test } => {
            setup::run()?;
            if test {
                package::test()
            } else {
                package::build().map(|_| ())
            }
        }
        Cmd::Run { args } => {
            setup::run()?;
            build_release()?;
            let mut args = args;
            if args.first().map(String::as_str) == Some("--") {
                args.remove(0);
            }
            if !args
                .iter()
                .any(|a| a == "run" || a == "check" || a == "stats")
            {
                args.insert(0, "run".into());
            }
            let bin = target_dir().join("release/cidlb");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("cidlb exited with {status}");
            }
            Ok(())
        }
        Cmd::Docs => docs::check(&root()),
        Cmd::Test { no_lint, filter } => test(no_lint, filter),
        Cmd::Demo => demo::run(),
        Cmd::Bench { full } => bench(full),
        Cmd::Fuzz { packets, seed } => {
            setup::run()?;
            fuzz("--release", packets, seed, None)
        }
        Cmd::Lab { cmd } => {
            setup::run()?;
            match cmd {
                LabCmd::Up { nodes } => lab::up(nodes),
                LabCmd::Down => lab::down(),
            }
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root) or `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
}

/// Runs a command in the workspace root, echoing it; fails with its status.
pub fn sh(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    eprintln!("==> {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("spawning {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn bench(full: bool) -> Result<()> {
    setup::run()?;
    // An interrupted earlier run cannot clean up after itself: remove what it left (bench-only
    // namespace prefixes `cl{bn,bm,tp,te}<pid>x<n>` and `/sys/fs/bpf/cidlb-bench-*` pins).
    for tag in ["clbn", "clbm", "cltp", "clte"] {
        lb_lab::Lab::down(tag);
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("cidlb-bench-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    sh(cargo().args(["build", "--release", "-p", "lb-userspace", "-p", "lb-bench"]))?;
    let out = target_dir().join("bench");
    let mut cmd = Command::new(target_dir().join("release/cidlb-bench"));
    cmd.arg("--out").arg(&out);
    if full {
        cmd.arg("--full");
    }
    sh(&mut cmd)?;
    print!("{}", std::fs::read_to_string(out.join("results.md"))?);
    Ok(())
}

fn build_release() -> Result<()> {
    // A release build never embeds an empty object (lb-userspace/build.rs).
    sh(cargo()
        .args(["build", "--release", "-p", "lb-userspace"])
        .env("CIDLB_REQUIRE_EBPF", "1"))
}

fn test(no_lint: bool, filter: Option<String>) -> Result<()> {
    // Offline and quick: a broken link fails before anything is installed or built.
    docs::check(&root())?;
    setup::run()?;
    if !no_lint {
        sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
        // Host crates; AYA_BUILD_SKIP: clippy does not need the eBPF object, the tests build it.
        sh(cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("AYA_BUILD_SKIP", "1"))?;
        // The eBPF crate, for its own target.
        sh(Command::new("rustup").args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "lb-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // Unit tests need nothing; the fixture and netns tests need root and share kernel state,
    // so they run one at a time.
    // The release the upgrade test starts from (built from git once, then kept).
    let layout2 = old::layout2_cidlb()?;
    let mut t = cargo();
    t.env(old::ENV, &layout2);
    t.args(["test", "--workspace"]);
    if let Some(f) = &filter {
        t.arg(f);
    }
    t.args(["--", "--test-threads=1"]);
    sh(&mut t)?;
    // A short differential fuzz with a fixed seed (the test profile's build is warm): short
    // epochs, so every config runs once (nine: the limits and tunnel configs with their
    // reloads among them).
    if filter.as_deref().is_none_or(|f| "fuzz".contains(f)) {
        fuzz("--profile=dev", 18_000, 1, Some(2_000))?;
    }
    // The Debian package: built, installed, checked, one netns test against /usr/bin/cidlb,
    // purged (always, even on failure), nothing left behind.
    if filter.as_deref().is_none_or(|f| "package".contains(f)) {
        package::test()?;
    }
    Ok(())
}

/// `cidlb-fuzz --packets N --seed S [--epoch E]` (lb-fuzz), built with `profile`.
fn fuzz(profile: &str, packets: u64, seed: u64, epoch: Option<u64>) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "run",
        profile,
        "-p",
        "lb-fuzz",
        "--bin",
        "cidlb-fuzz",
        "--",
        "--packets",
        &packets.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    if let Some(e) = epoch {
        cmd.args(["--epoch", &e.to_string()]);
    }
    sh(&mut cmd)
}
