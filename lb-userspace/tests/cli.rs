//! The `cidlb` binary's operator-facing failures: clear messages and non-zero exits.

mod common;

use std::process::{Command, Output};

fn cidlb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cidlb"))
        .args(args)
        .output()
        .expect("spawn cidlb")
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("cidlb-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const GOOD: &str = "interfaces: [cidlbnosuch0]\nvips: [{address: 192.0.2.10, ports: [5684]}]\nnodes: [{id: 1, address: 203.0.113.11}]\npin_dir: /sys/fs/bpf/cidlb-cli-test\n";

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cidlb.yaml");
    let o = cidlb(&["check", "--config", example]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (1 interface(s), 1 VIP(s), 2 node(s))"));
}

#[test]
fn check_warns_without_dtls_versions_and_accepts_unquoted_versions() {
    // Issue #12: the default routes DTLS 1.3 records by CID, which they were not before.
    let p = write("noversions.yaml", GOOD);
    let o = cidlb(&["check", "--config", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("WARN")
            && e.contains("noversions.yaml")
            && e.contains("dtls.versions is not set"),
        "{e}"
    );
    let p = write(
        "versions.yaml",
        &GOOD.replace("pin_dir", "dtls: {versions: [1.2, 1.3]}\npin_dir"),
    );
    let o = cidlb(&["check", "--config", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("dtls.versions"), "{}", stderr(&o));
    let p = write(
        "badversions.yaml",
        &GOOD.replace("pin_dir", "dtls: {versions: [1.2, 1.4]}\npin_dir"),
    );
    let o = cidlb(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("badversions.yaml")
            && stderr(&o).contains("\"1.4\" is not a DTLS version"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_names_file_key_and_problem() {
    let p = write("bad.yaml", &GOOD.replace("id: 1", "id: 300"));
    let o = cidlb(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    // Said once, as a plain line (with --log-json: one JSON line, below).
    assert_eq!(e.matches("nodes[0].id").count(), 1, "{e}");
    assert!(
        e.contains(p.to_str().unwrap()) && e.contains("nodes[0].id") && e.contains("does not fit"),
        "{e}"
    );
    let o = cidlb(&["check", "--config", "/nonexistent/cidlb.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/cidlb.yaml: cannot read"),
        "{}",
        stderr(&o)
    );
    let p = write("yaml.yaml", "interfaces: [a\n");
    let o = cidlb(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("line"), "{}", stderr(&o));
}

#[test]
fn run_names_a_missing_interface() {
    common::require_root();
    let p = write("noif.yaml", GOOD);
    let o = cidlb(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("interfaces[0]: no interface named \"cidlbnosuch0\""),
        "{e}"
    );
}

#[test]
fn run_without_root_says_so() {
    common::require_root();
    let p = write("noroot.yaml", GOOD);
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // Drop to nobody for this one command.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_cidlb"))
        .args(["run", "--config", p.to_str().unwrap()])
        .output()
        .expect("spawn setpriv");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs root"), "{}", stderr(&o));
}

#[test]
fn log_json_gives_json_lines() {
    let p = write("json.yaml", &GOOD.replace("id: 1", "id: 300"));
    let o = Command::new(env!("CARGO_BIN_EXE_cidlb"))
        .args(["--log-json", "check", "--config", p.to_str().unwrap()])
        .output()
        .unwrap();
    let line = stderr(&o)
        .lines()
        .find(|l| l.starts_with('{'))
        .map(str::to_owned)
        .expect("a JSON log line");
    assert!(
        line.contains("\"level\":\"ERROR\"") && line.contains("nodes[0].id"),
        "{line}"
    );
    assert_eq!(
        stderr(&o).matches("nodes[0].id").count(),
        1,
        "{}",
        stderr(&o)
    );
}

#[test]
fn explain_loads_a_tiny_flow_table_and_rejects_bad_hex() {
    common::require_root();
    // A 4 Mi-entry flow table would be preallocated (~480 MiB) just to run one packet.
    let p = write(
        "explain.yaml",
        &GOOD
            .replace("cidlbnosuch0", "lo")
            .replace("pin_dir", "flows: {capacity: 4194304}\npin_dir"),
    );
    // One client datagram to the IPv4 VIP, its UDP payload in hex.
    let explain = |payload: &str| {
        cidlb(&[
            "explain",
            "--config",
            p.to_str().unwrap(),
            "--src",
            "198.51.100.7:40000",
            "--dst",
            "192.0.2.10:5684",
            "--payload",
            payload,
        ])
    };
    let t0 = std::time::Instant::now();
    let o = explain("19fefd000100000000000101a1a2a3a4a50000");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    // The size as the kernel reports it for the loaded map.
    assert!(
        out.contains("flows:    a private, empty table of 16 entries"),
        "{out}"
    );
    assert!(out.contains("counters: cid_routed"), "{out}");
    assert!(out.contains("format:   DTLS 1.2 tls12_cid record"), "{out}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));

    // A DTLS 1.3 unified header with a CID naming node 1 (issue #12): routed by its CID, and
    // the format says which header matched.
    let o = explain("3f01a1a2a3a4a55a170004abcdabcd");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.lines()
            .any(|l| l.starts_with("counters:") && l.contains("cid13_routed")),
        "{out}"
    );
    assert!(out.contains("node:     1 (sent to it)"), "{out}");
    assert!(
        out.contains("format:   DTLS 1.3 unified header (RFC 9147) 0x3f: C=1 S=1 L=1"),
        "{out}"
    );

    let o = cidlb(&["explain", "--config", p.to_str().unwrap(), "--hex", "aéa"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not hex: 'é'"), "{}", stderr(&o));
}
