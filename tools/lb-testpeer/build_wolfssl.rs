//! Builds wolfSSL 5.9.4, the DTLS 1.3 backend, from the tree that the crates.io crate
//! `wolfssl-sys` 5.3.0 ships in `wolfssl-src/` (that crate's own build script is not used).
//!
//! The sources are found like Mbed TLS's (see build.rs): `LB_TESTPEER_WOLFSSL_DIR`, else
//! `cargo metadata` on the side manifest `wolfssl-src/Cargo.toml`, else a registry scan. The
//! tree is copied into the target dir (autogen.sh writes into its source directory; the cargo
//! registry stays untouched), configured with autotools for DTLS 1.3 + CID + PSK, and built
//! as a static library, once per profile (see `build_dir`). A stamp file skips all of it
//! when the same tree and flags were built before (a change to the shim alone recompiles
//! only the shim).
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const CRATE: &str = "wolfssl-sys";
const VERSION: &str = "5.3.0";
const WOLFSSL_VERSION: &str = "5.9.4";

/// `WOLFSSL_STATIC_PSK` is not needed by TLS 1.3 PSK itself; it keeps the PSK suites that
/// TOOLCHAIN.md checked available. Examples, benchmark and crypt tests are not built.
const CFLAGS: &str = "-O2 -DWOLFSSL_STATIC_PSK";
const CONFIGURE: &[&str] = &[
    "--enable-static",
    "--disable-shared",
    "--enable-dtls",
    "--enable-dtls13",
    "--enable-dtlscid",
    "--enable-psk",
    "--enable-aesccm",
    "--enable-aesgcm",
    "--enable-supportedcurves",
    "--enable-sni",
    "--disable-examples",
    "--disable-benchmark",
    "--disable-crypttests",
];

pub fn build() {
    println!("cargo:rerun-if-changed=build_wolfssl.rs");
    println!("cargo:rerun-if-changed=csrc/wolf_shim.c");
    println!("cargo:rerun-if-changed=wolfssl-src/Cargo.toml");
    println!("cargo:rerun-if-changed=wolfssl-src/Cargo.lock");
    println!("cargo:rerun-if-env-changed=LB_TESTPEER_WOLFSSL_DIR");

    let src = find().unwrap_or_else(|msg| {
        panic!(
            "lb-testpeer: cannot locate the wolfSSL {WOLFSSL_VERSION} sources: {msg}\n\
             Fix: run `cargo fetch` once (with network access to crates.io), or set \
             LB_TESTPEER_WOLFSSL_DIR to a wolfSSL {WOLFSSL_VERSION} source tree."
        )
    });
    println!("lb-testpeer: wolfSSL sources: {}", src.display());
    let stamp = format!(
        "{}\n{CFLAGS}\n{}\n{}\n{}\n",
        src.display(),
        CONFIGURE.join(" "),
        env::var("TARGET").unwrap_or_default(),
        env::var("CC").unwrap_or_default()
    );
    let out = build_dir(&stamp);
    let prefix = out.join("install");
    let lib = prefix.join("lib/libwolfssl.a");
    let fresh =
        lib.is_file() && std::fs::read_to_string(out.join("stamp")).ok() == Some(stamp.clone());
    if !fresh {
        let t0 = std::time::Instant::now();
        // Built beside its place, then renamed into it: an interrupted build leaves no
        // half-built tree that a later run would take for a good one.
        let mut tmp = out.clone().into_os_string();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        configure_and_make(&src, &tmp, &tmp.join("install"));
        std::fs::write(tmp.join("stamp"), &stamp).expect("write wolfSSL build stamp");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::rename(&tmp, &out)
            .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), out.display()));
        // Shown with `cargo build -vv`; the cold build time is worth knowing on 2 cores.
        println!(
            "lb-testpeer: wolfSSL built in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
    }
    println!("lb-testpeer: wolfSSL build: {}", out.display());
    let include = prefix.join("include");
    let options = std::fs::read_to_string(include.join("wolfssl/options.h")).unwrap_or_default();
    for need in ["WOLFSSL_DTLS13", "WOLFSSL_DTLS_CID"] {
        assert!(
            options.contains(&format!("#define {need}")),
            "wolfSSL options.h lacks {need}: configure did not enable it (see {})",
            out.join("build/config.log").display()
        );
    }

    // The shim first: GNU ld resolves static archives left to right.
    crate::compile_shim("csrc/wolf_shim.c", &include, "cidlb_wolf_shim");
    println!(
        "cargo:rustc-link-search=native={}",
        prefix.join("lib").display()
    );
    println!("cargo:rustc-link-lib=static=wolfssl");
    println!("cargo:rustc-link-lib=m");
    println!("cargo:rustc-link-lib=pthread");
}

/// Where the wolfSSL build lives. Not in OUT_DIR: cargo gives the build script a new OUT_DIR
/// per profile and per command (build, test, clippy), and a cold `cargo xtask test` would
/// build wolfSSL three times (a minute or more each on 2 cores). The profile's directory of
/// the target dir (`<target>/<profile>`, three levels above OUT_DIR =
/// `<target>/<profile>/build/<pkg>-<hash>/out`) is shared by all of them; the key names the
/// sources and flags. `cargo clean` removes it. Falls back to OUT_DIR for another layout.
fn build_dir(stamp: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    stamp.hash(&mut h);
    let name = format!("lb-testpeer-wolfssl-{WOLFSSL_VERSION}-{:016x}", h.finish());
    match out_dir.ancestors().nth(3) {
        Some(profile)
            if out_dir
                .parent()
                .and_then(|p| p.parent())
                .is_some_and(|b| b.ends_with("build")) =>
        {
            profile.join(name)
        }
        _ => out_dir.join(name),
    }
}

fn run(cmd: &mut Command, what: &str, log: &Path) {
    let f = std::fs::File::create(log).expect("create build log");
    let f2 = f.try_clone().expect("dup build log");
    let st = cmd
        .stdout(f)
        .stderr(f2)
        .status()
        .unwrap_or_else(|e| panic!("lb-testpeer: cannot run {what}: {e}"));
    if !st.success() {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "lb-testpeer: wolfSSL {what} failed ({st}); log: {}\n{}\n\
             Needs autoconf, automake, libtool and a C compiler (`cargo xtask setup` installs \
             them).",
            log.display(),
            tail.join("\n")
        );
    }
}

fn configure_and_make(src: &Path, out: &Path, prefix: &Path) {
    let tree = out.join("src");
    let build = out.join("build");
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(&build).expect("create wolfSSL build dir");
    run(
        Command::new("cp").arg("-a").arg(src).arg(&tree),
        "copy of the source tree",
        &out.join("cp.log"),
    );
    run(
        Command::new("sh").arg("./autogen.sh").current_dir(&tree),
        "autogen.sh",
        &out.join("autogen.log"),
    );
    run(
        Command::new(tree.join("configure"))
            .args(CONFIGURE)
            .arg(format!("--prefix={}", prefix.display()))
            .env("CFLAGS", CFLAGS)
            .current_dir(&build),
        "configure",
        &out.join("configure.log"),
    );
    let jobs = env::var("NUM_JOBS").unwrap_or_else(|_| "2".into());
    run(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            .arg("install")
            // A jobserver inherited from cargo would be fine, but plain -jN keeps it simple.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("CARGO_MAKEFLAGS")
            .current_dir(&build),
        "make",
        &out.join("make.log"),
    );
    // The copied tree (~145 MB) has served its purpose; build/ keeps config.log.
    let _ = std::fs::remove_dir_all(&tree);
}

fn is_wolfssl_tree(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("wolfssl/version.h")).is_ok_and(|s| {
        s.contains(&format!(
            "#define LIBWOLFSSL_VERSION_STRING \"{WOLFSSL_VERSION}\""
        ))
    }) && dir.join("autogen.sh").is_file()
        && dir.join("src/dtls13.c").is_file()
}

fn find() -> Result<PathBuf, String> {
    let mut notes = Vec::new();
    if let Some(d) = env::var_os("LB_TESTPEER_WOLFSSL_DIR") {
        let d = PathBuf::from(d);
        if is_wolfssl_tree(&d) {
            return Ok(d);
        }
        return Err(format!(
            "LB_TESTPEER_WOLFSSL_DIR={} is not a wolfSSL {WOLFSSL_VERSION} tree",
            d.display()
        ));
    }
    match super::via_cargo_metadata(
        "wolfssl-src/Cargo.toml",
        CRATE,
        VERSION,
        "wolfssl-src",
        is_wolfssl_tree,
    ) {
        Ok(d) => return Ok(d),
        Err(e) => notes.push(format!("cargo metadata: {e}")),
    }
    match super::via_registry_scan(CRATE, VERSION, "wolfssl-src", is_wolfssl_tree) {
        Ok(d) => return Ok(d),
        Err(e) => notes.push(format!("registry scan: {e}")),
    }
    Err(notes.join("; "))
}
