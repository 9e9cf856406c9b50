//! `cargo xtask package`: the Debian package (cargo-deb, metadata in lb-userspace/Cargo.toml),
//! and the install / check / verify / end-to-end / purge round `cargo xtask test` runs on it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{cargo, root, sh, target_dir};

/// The workspace version (`[workspace.package] version`).
fn version() -> Result<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let mut in_pkg = false;
    for l in text.lines() {
        let l = l.trim();
        if l.starts_with('[') {
            in_pkg = l == "[workspace.package]";
        } else if in_pkg {
            if let Some(v) = l.strip_prefix("version = ") {
                return Ok(v.trim_matches('"').to_owned());
            }
        }
    }
    bail!("no [workspace.package] version in Cargo.toml")
}

/// Builds `cidlb_<version>_amd64.deb` and checks the binary inside carries the XDP object.
/// Returns the package's path.
pub fn build() -> Result<PathBuf> {
    let t0 = Instant::now();
    let deb = target_dir()
        .join("debian")
        .join(format!("cidlb_{}_amd64.deb", version()?));
    let _ = std::fs::remove_file(&deb);
    sh(cargo()
        .args(["deb", "-p", "lb-userspace", "--locked", "--output"])
        .arg(&deb)
        // A package must never carry an empty object (lb-userspace/build.rs refuses).
        .env("CIDLB_REQUIRE_EBPF", "1")
        .env_remove("AYA_BUILD_SKIP"))?;
    ensure!(deb.exists(), "cargo deb wrote no {}", deb.display());
    check_embedded_object(&deb)?;
    eprintln!(
        "==> {} ({} KiB) built and checked in {:.0} s",
        deb.display(),
        std::fs::metadata(&deb)?.len() / 1024,
        t0.elapsed().as_secs_f64()
    );
    Ok(deb)
}

/// Extracts `usr/bin/cidlb` from the package and fails unless it holds a BPF ELF object with
/// sections (an `AYA_BUILD_SKIP` build embeds zero bytes).
fn check_embedded_object(deb: &Path) -> Result<()> {
    let dir = target_dir().join("debian/check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
    let bin = std::fs::read(dir.join("usr/bin/cidlb")).context("usr/bin/cidlb in the package")?;
    let _ = std::fs::remove_dir_all(&dir);
    let found = embedded_bpf_objects(&bin);
    ensure!(
        !found.is_empty(),
        "{}: usr/bin/cidlb holds no eBPF object (built with AYA_BUILD_SKIP?)",
        deb.display()
    );
    eprintln!(
        "    usr/bin/cidlb embeds {} eBPF object(s): {:?} bytes",
        found.len(),
        found
    );
    Ok(())
}

/// The sizes of the BPF ELF objects (EM_BPF, 64-bit little-endian, with sections) embedded in
/// `bin`, judged by their headers: the section table must lie inside `bin`.
fn embedded_bpf_objects(bin: &[u8]) -> Vec<usize> {
    const EM_BPF: u16 = 247;
    let u16_at = |p: usize| bin.get(p..p + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |p: usize| {
        bin.get(p..p + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let mut out = Vec::new();
    let mut i = 1; // offset 0 is the host binary itself
    while let Some(off) = bin[i..].windows(4).position(|w| w == b"\x7fELF") {
        let p = i + off;
        i = p + 4;
        if bin.get(p + 4..p + 6) != Some(&[2, 1]) || u16_at(p + 18) != Some(EM_BPF) {
            continue;
        }
        let (Some(shoff), Some(shentsize), Some(shnum)) =
            (u64_at(p + 0x28), u16_at(p + 0x3a), u16_at(p + 0x3c))
        else {
            continue;
        };
        let end = shoff as usize + usize::from(shentsize) * usize::from(shnum);
        if shnum > 1 && shentsize == 64 && p + end <= bin.len() {
            out.push(end);
        }
    }
    out
}

/// Undoes an install whatever happens: `dpkg --purge` on drop.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "cidlb"]).status();
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// What the host shows that a package could leave: routes, XDP on its interfaces, pins.
fn host_state() -> Result<String> {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        s += &output(Command::new("ip").args([fam, "route", "show", "table", "all"]))?;
    }
    s += &output(Command::new("ip").args(["-o", "link", "show"]))?
        .lines()
        .filter(|l| l.contains("xdp"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(s)
}

/// `cargo xtask test`'s package round: build, `dpkg -i`, `cidlb check` on the installed
/// config, `systemd-analyze verify` on the installed units, `netns_forwarding` against
/// `/usr/bin/cidlb`, `dpkg --purge`, and nothing left behind.
pub fn test() -> Result<()> {
    let t0 = Instant::now();
    // A package left by an interrupted run would hide what this one installs.
    if Command::new("dpkg")
        .args(["-s", "cidlb"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        sh(Command::new("dpkg").args(["--purge", "cidlb"]))?;
    }
    let deb = build()?;
    let built = t0.elapsed();
    let before = host_state()?;
    let installed = Installed;
    sh(Command::new("dpkg").arg("-i").arg(&deb))?;
    let files: Vec<PathBuf> = output(Command::new("dpkg").args(["-L", "cidlb"]))?
        .lines()
        .map(PathBuf::from)
        .collect();
    let unit = |name: &str| {
        files
            .iter()
            .find(|f| f.ends_with(name))
            .cloned()
            .with_context(|| format!("{name} is not in the package"))
    };
    let units = [unit("cidlb.service")?, unit("cidlb-announce.service")?];

    // Installing starts nothing and enables nothing.
    for u in ["cidlb.service", "cidlb-announce.service"] {
        let wants = Path::new("/etc/systemd/system/multi-user.target.wants").join(u);
        ensure!(
            !wants.exists(),
            "installing enabled {u} ({})",
            wants.display()
        );
    }
    ensure!(
        !Path::new("/sys/fs/bpf/cidlb").exists(),
        "installing created /sys/fs/bpf/cidlb"
    );
    let out = output(Command::new("/usr/bin/cidlb").args([
        "check",
        "--config",
        "/etc/cidlb/cidlb.yaml",
    ]))?;
    eprintln!("    {}", out.trim());
    sh(Command::new("systemd-analyze").arg("verify").args(&units))?;

    // One end-to-end test against the installed binary.
    sh(cargo()
        .args([
            "test",
            "-p",
            "lb-userspace",
            "--test",
            "netns_forwarding",
            "--",
            "--test-threads=1",
        ])
        .env("CIDLB_BIN", "/usr/bin/cidlb"))?;

    drop(installed);
    ensure!(
        Command::new("dpkg")
            .args(["-s", "cidlb"])
            .output()?
            .stdout
            .is_empty(),
        "cidlb is still known to dpkg after --purge"
    );
    let left: Vec<&PathBuf> = files
        .iter()
        .filter(|f| {
            f.symlink_metadata().is_ok_and(|m| !m.is_dir())
                || f.starts_with("/etc/cidlb")
                || f.starts_with("/usr/share/cidlb")
                || f.starts_with("/usr/share/doc/cidlb")
        })
        .filter(|f| f.exists())
        .collect();
    ensure!(left.is_empty(), "dpkg --purge left {left:?}");
    for p in ["/etc/cidlb", "/run/cidlb", "/sys/fs/bpf/cidlb"] {
        ensure!(!Path::new(p).exists(), "dpkg --purge left {p}");
    }
    let after = host_state()?;
    ensure!(
        before == after,
        "routes or XDP on the host changed across install and purge:\nbefore:\n{before}\nafter:\n{after}"
    );
    eprintln!(
        "==> package round passed in {:.0} s (build {:.0} s, install/check/verify/e2e/purge {:.0} s)",
        t0.elapsed().as_secs_f64(),
        built.as_secs_f64(),
        (t0.elapsed() - built).as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_embedded_bpf_object_and_nothing_in_its_absence() {
        // A fake BPF ELF header: section table of 3 entries of 64 bytes at offset 64.
        let mut obj = vec![0u8; 64 + 3 * 64];
        obj[..4].copy_from_slice(b"\x7fELF");
        obj[4] = 2;
        obj[5] = 1;
        obj[18..20].copy_from_slice(&247u16.to_le_bytes());
        obj[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        obj[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        obj[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        let mut bin = b"\x7fELF host binary ...".to_vec();
        assert!(embedded_bpf_objects(&bin).is_empty());
        bin.extend_from_slice(&obj);
        assert_eq!(embedded_bpf_objects(&bin), vec![64 + 3 * 64]);
        // Truncated: the section table would run past the end.
        bin.truncate(bin.len() - 1);
        assert!(embedded_bpf_objects(&bin).is_empty());
    }
}
