//! Installing what a fresh machine lacks. Every step checks first, so a second run is quick.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::sh;

/// bpf-linker's 0.10 line links with rustc's own LLVM, which matches the nightly toolchain;
/// 0.13 wants a system LLVM this machine does not have (see ../shared/TOOLCHAIN.md).
const BPF_LINKER: &str = "bpf-linker@0.10.4";

/// cargo-deb for `cargo xtask package`; 3.8.0 builds with the stable toolchain (rust-version
/// 1.85). Its systemd defaults (enable and start on install) are turned off in
/// lb-userspace/Cargo.toml.
const CARGO_DEB: &str = "3.8.0";

/// Debian packages and the command each provides.
const APT: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("trafgen", "netsniff-ng"),
    // wolfSSL's autogen.sh (lb-testpeer's DTLS 1.3 backend, built from source by its build.rs).
    ("autoreconf", "autoconf"),
    ("automake", "automake"),
    ("libtoolize", "libtool"),
    // The scale-out test's routers and balancers announce VIPs over BGP (deploy/bird).
    ("bird", "bird2"),
    // `promtool check rules` validates deploy/prometheus in CI.
    ("promtool", "prometheus"),
];

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_deb()?;
    apt()?;
    bpffs()?;
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if installed.is_empty() {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    sh(Command::new("cargo").args(["+stable", "install", BPF_LINKER, "--locked"]))
}

fn cargo_deb() -> Result<()> {
    let have = output(Command::new("cargo").args(["deb", "--version"]));
    if have.split_whitespace().any(|w| w == CARGO_DEB) {
        return Ok(());
    }
    sh(Command::new("cargo").args([
        "+stable",
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB,
    ]))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(bin, _)| !ok(Command::new("sh").args(["-c", &format!("command -v {bin}")])))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}; run as root, or: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        });
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("/sys/fs/bpf is not mounted; as root: mount -t bpf bpf /sys/fs/bpf");
    }
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf")?;
    }
    sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
