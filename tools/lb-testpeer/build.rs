//! Builds the two DTLS backends and their C shims:
//! * Mbed TLS 3.6.5 (DTLS 1.2; sources shipped inside the crates.io crate `mbedtls-rs-sys`
//!   0.3.1) with its upstream default config, plus csrc/shim.c;
//! * wolfSSL 5.9.4 (DTLS 1.3; sources shipped inside `wolfssl-sys` 5.3.0), see
//!   build_wolfssl.rs, plus csrc/wolf_shim.c.
//!
//! How the Mbed TLS sources are found (wolfSSL's the same way, with its own names):
//! (first hit wins)
//!   1. `LB_TESTPEER_MBEDTLS_DIR` = an Mbed TLS 3.6.x source tree (has include/ and library/).
//!   2. `$CARGO metadata` for `mbedtls-src/Cargo.toml`, a never-built manifest (its own
//!      workspace and Cargo.lock) that depends on `mbedtls-rs-sys`: `cargo metadata` (unlike
//!      `cargo build`) downloads + unpacks every locked package for the target platform and
//!      reports its manifest path. This honours CARGO_HOME, source replacement and vendoring.
//!   3. A scan of `$CARGO_HOME/registry/src/*/mbedtls-rs-sys-0.3.1`, then of
//!      `$CARGO_HOME/registry/cache/*/mbedtls-rs-sys-0.3.1.crate` (unpacked into OUT_DIR with tar).
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build_wolfssl.rs"]
mod wolfssl;

const CRATE: &str = "mbedtls-rs-sys";
const VERSION: &str = "0.3.1";
const MBEDTLS_VERSION: &str = "3.6.5";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/shim.c");
    println!("cargo:rerun-if-changed=csrc/dgram.h");
    println!("cargo:rerun-if-changed=mbedtls-src/Cargo.toml");
    println!("cargo:rerun-if-changed=mbedtls-src/Cargo.lock");
    println!("cargo:rerun-if-env-changed=LB_TESTPEER_MBEDTLS_DIR");

    let root = find_mbedtls().unwrap_or_else(|msg| {
        panic!(
            "lb-testpeer: cannot locate the Mbed TLS {MBEDTLS_VERSION} sources: {msg}\n\
             Fix: run `cargo fetch` once (with network access to crates.io), or set \
             LB_TESTPEER_MBEDTLS_DIR to an Mbed TLS 3.6 source tree."
        )
    });
    // Recorded in target/*/build/lb-testpeer-*/output for inspection.
    println!("lb-testpeer: Mbed TLS sources: {}", root.display());
    let include = root.join("include");
    let library = root.join("library");

    // Our shim first: GNU ld resolves static archives left to right.
    compile_shim("csrc/shim.c", &include, "cidlb_shim");

    let mut files: Vec<PathBuf> = std::fs::read_dir(&library)
        .expect("read mbedtls/library")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    files.sort();
    assert!(
        files.len() > 50,
        "too few .c files in {}",
        library.display()
    );
    cc::Build::new()
        .files(&files)
        .include(&include)
        .include(&library)
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .compile("mbedtls_cidlb");

    wolfssl::build();
}

fn is_mbedtls_tree(dir: &Path) -> bool {
    let h = dir.join("include/mbedtls/build_info.h");
    match std::fs::read_to_string(&h) {
        Ok(s) => {
            s.contains(&format!(
                "MBEDTLS_VERSION_STRING         \"{MBEDTLS_VERSION}\""
            )) && dir.join("include/mbedtls/mbedtls_config.h").is_file()
                && dir.join("library/ssl_msg.c").is_file()
        }
        Err(_) => false,
    }
}

fn find_mbedtls() -> Result<PathBuf, String> {
    let mut notes = Vec::new();
    if let Some(d) = env::var_os("LB_TESTPEER_MBEDTLS_DIR") {
        let d = PathBuf::from(d);
        if d.join("include/mbedtls/ssl.h").is_file() && d.join("library/ssl_msg.c").is_file() {
            return Ok(d);
        }
        return Err(format!(
            "LB_TESTPEER_MBEDTLS_DIR={} is not an Mbed TLS tree",
            d.display()
        ));
    }
    match via_cargo_metadata(
        "mbedtls-src/Cargo.toml",
        CRATE,
        VERSION,
        "mbedtls",
        is_mbedtls_tree,
    ) {
        Ok(d) => return Ok(d),
        Err(e) => notes.push(format!("cargo metadata: {e}")),
    }
    match via_registry_scan(CRATE, VERSION, "mbedtls", is_mbedtls_tree) {
        Ok(d) => return Ok(d),
        Err(e) => notes.push(format!("registry scan: {e}")),
    }
    Err(notes.join("; "))
}

/// `$CARGO metadata` on the never-built side manifest `manifest` (relative to this crate):
/// the directory `subdir` of the locked package `krate` `version`, if `is_tree` accepts it.
fn via_cargo_metadata(
    manifest: &str,
    krate: &str,
    version: &str,
    subdir: &str,
    is_tree: fn(&Path) -> bool,
) -> Result<PathBuf, String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join(manifest);
    let target = env::var("TARGET").unwrap_or_default();
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "metadata",
        "--format-version",
        "1",
        "--locked",
        "--manifest-path",
    ])
    .arg(&manifest);
    if !target.is_empty() {
        cmd.args(["--filter-platform", &target]);
    }
    if env::var_os("CARGO_NET_OFFLINE").is_some_and(|v| v == "true") {
        cmd.arg("--offline");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "failed: {}",
            err.trim().lines().last().unwrap_or("")
        ));
    }
    let json = String::from_utf8_lossy(&out.stdout);
    // Minimal scan instead of a JSON parser: every "manifest_path":"..." value; keep the one
    // that is `krate` `version` and carries the expected source tree.
    let key = "\"manifest_path\":\"";
    let mut rest: &str = &json;
    while let Some(i) = rest.find(key) {
        rest = &rest[i + key.len()..];
        let Some(end) = rest.find('"') else { break };
        let path = rest[..end].replace("\\\\", "\\");
        rest = &rest[end..];
        let m = PathBuf::from(&path);
        let Some(dir) = m.parent() else { continue };
        let Ok(toml) = std::fs::read_to_string(&m) else {
            continue;
        };
        if toml.contains(&format!("name = \"{krate}\""))
            && toml.contains(&format!("version = \"{version}\""))
            && is_tree(&dir.join(subdir))
        {
            return Ok(dir.join(subdir));
        }
    }
    Err(format!("{krate} {version} not in the metadata output"))
}

fn cargo_home() -> Option<PathBuf> {
    if let Some(h) = env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(h));
    }
    env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo"))
}

/// The offline fallback: `subdir` of `krate`-`version` in the registry's unpacked sources, or
/// unpacked from its cached .crate into OUT_DIR.
fn via_registry_scan(
    krate: &str,
    version: &str,
    subdir: &str,
    is_tree: fn(&Path) -> bool,
) -> Result<PathBuf, String> {
    let home = cargo_home().ok_or("no CARGO_HOME/HOME")?;
    let name = format!("{krate}-{version}");
    let subdirs = |d: PathBuf| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    for idx in subdirs(home.join("registry/src")) {
        let cand = idx.join(&name).join(subdir);
        if is_tree(&cand) {
            return Ok(cand);
        }
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for idx in subdirs(home.join("registry/cache")) {
        let krate = idx.join(format!("{name}.crate"));
        if !krate.is_file() {
            continue;
        }
        let dest = out_dir.join(format!("{subdir}-crate"));
        let cand = dest.join(&name).join(subdir);
        if is_tree(&cand) {
            return Ok(cand);
        }
        std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(&krate)
            .arg("-C")
            .arg(&dest)
            .status()
            .map_err(|e| format!("tar: {e}"))?;
        if st.success() && is_tree(&cand) {
            return Ok(cand);
        }
        return Err(format!("extracting {} failed", krate.display()));
    }
    Err(format!(
        "{name} neither in {0}/registry/src nor {0}/registry/cache",
        home.display()
    ))
}

/// Compiles one C shim (csrc/, with csrc/dgram.h) against a library's headers in `include`,
/// as the static library `name`. Call it before the library's own archives are linked.
fn compile_shim(file: &str, include: &std::path::Path, name: &str) {
    cc::Build::new()
        .file(file)
        .include(include)
        .opt_level(2)
        .debug(false)
        .flag_if_supported("-Wall")
        .flag_if_supported("-Wextra")
        .flag_if_supported("-Wno-unused-parameter")
        .compile(name);
}
