//! Test support shared by the privileged test binaries.
#![allow(dead_code, reason = "each test binary uses part of this module")]

pub mod agent;
pub mod pmtu;
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

/// Attaches an XDP program that passes every packet (the bench object's floor) to `dev` in
/// `ns`, in native mode; it stays attached until the returned object drops. A veth needs one
/// to take frames another veth sends it by XDP_TX: the kernel's veth wakes the receiving
/// end's NAPI after an XDP_TX only if that end runs an XDP program, so without one the frames
/// wait in its ring until other traffic wakes it (docs/forwarding.md, "Tunnel mode").
pub fn xdp_pass(ns: &lb_lab::NetNs, dev: &str) -> aya::Ebpf {
    let (name, dev) = (ns.name.clone(), dev.to_owned());
    std::thread::spawn(move || {
        lb_lab::enter(&name);
        let mut ebpf = cidlb::testrun::load_floor().unwrap_or_else(|e| panic!("{e}"));
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(lb_common::names::FLOOR)
            .expect("the floor program")
            .try_into()
            .expect("an XDP program");
        prog.attach(&dev, aya::programs::XdpMode::Driver)
            .unwrap_or_else(|e| panic!("attaching XDP to {dev} in {name}: {e}"));
        ebpf
    })
    .join()
    .expect("attaching thread")
}
