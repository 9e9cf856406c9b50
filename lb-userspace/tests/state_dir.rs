//! `announce.state_dir` must be this agent's alone (src/statedir.rs): `cidlb run`, `cidlb
//! announce` and `cidlb maintenance` refuse one that others can write, before touching
//! anything, and a symlink planted at the heartbeat's name is replaced, never followed.

mod common;

use std::{os::unix::fs::PermissionsExt as _, process::Output};

use common::agent::{bin, AgentProc, Bed};

fn in_balancer(bed: &Bed, args: &[&str]) -> Output {
    bed.lab
        .balancer
        .nsenter(bin().to_str().unwrap())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_state_dir_others_can_write_is_refused() {
    let bed = Bed::up("sd", 1);
    let state = bed.cfg.with_file_name("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
    bed.write_config(&format!(
        "announce: {{state_dir: {}, grace: 3s}}\n",
        state.display()
    ));
    let cfg = bed.cfg.to_str().unwrap();
    let ready = bed.cfg.with_file_name("ready");
    let want = format!(
        "announce.state_dir {}: writable by group or others (mode 1777); refusing it",
        state.display()
    );
    for args in [
        &[
            "run",
            "--config",
            cfg,
            "--ready-file",
            ready.to_str().unwrap(),
        ][..],
        &["announce", "--config", cfg],
        &["maintenance", "on", "--config", cfg],
    ] {
        let out = in_balancer(&bed, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: {err}");
    }
    assert!(!ready.exists(), "ready file written");
    assert!(
        !bed.pins.0.exists(),
        "pins left under {}",
        bed.pins.0.display()
    );
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "files written"
    );

    // Made safe, with a symlink planted at the heartbeat's name: the agent runs and replaces
    // the link; its target is untouched.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = bed.cfg.with_file_name("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, state.join("heartbeat")).unwrap();
    let agent = AgentProc::start(&bed.lab, &bed.cfg, &[]);
    let hb = std::fs::symlink_metadata(state.join("heartbeat")).unwrap();
    assert!(hb.file_type().is_file(), "{hb:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        cidlb::announce::read_heartbeat(&state).unwrap().pid,
        agent.child.0.id()
    );
    assert!(agent.terminate().expect("exits").success());
    let _ = std::fs::remove_dir_all(&state);
}
