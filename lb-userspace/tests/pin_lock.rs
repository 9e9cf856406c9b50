//! One agent per pin_dir (src/pinlock.rs): a second `cidlb run` on the same pin directory
//! refuses before it touches anything (its ready file, the heartbeat, the maps) and names the
//! holder's pid; the first keeps running and forwarding; read-only commands are unaffected; a
//! kill -9 leaves no stale lock. The real `cidlb` binary in a netns lab.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    agent::{bin, cidlb, json_counter, AgentProc, Bed},
    traffic::{body, Stream},
};
use lb_lab::{packet::cid_record, PORT, VIP4};

/// `n` CID records for node 1; returns how many were echoed.
fn echoed(bed: &Bed, n: u64) -> u64 {
    let s = Stream::start(
        &bed.lab.client.name,
        SocketAddr::from((VIP4, PORT)),
        Duration::from_millis(5),
        n,
        |seq| {
            cid_record(
                &[1, 0x10, 0xc4, 0, (seq >> 8) as u8, seq as u8],
                &body(b"lock", seq),
            )
        },
    );
    std::thread::sleep(Duration::from_millis(5 * n + 300));
    s.finish().received
}

#[test]
fn a_second_agent_on_one_pin_dir_refuses_and_names_the_holder() {
    let bed = Bed::up("lk", 1);
    let state = bed.cfg.with_file_name("state");
    bed.write_config(&format!(
        "announce: {{state_dir: {}, grace: 3s}}\n",
        state.display()
    ));
    let cfg = bed.cfg.to_str().unwrap();
    let mut first = AgentProc::start(&bed.lab, &bed.cfg, &[]);
    let pid = first.child.0.id();
    let pid_file = cidlb::pinlock::pid_file(&bed.pins.0);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("pid={pid}\npin_dir={}\n", bed.pins.0.display())
    );
    assert_eq!(echoed(&bed, 20), 20);
    let hb = cidlb::announce::read_heartbeat(&state).expect("heartbeat");
    assert_eq!(hb.pid, pid);

    // The second agent's own ready file holds a sentinel: it must not be touched either.
    let ready2 = bed.cfg.with_file_name("ready2");
    std::fs::write(&ready2, "sentinel\n").unwrap();
    let out = bed
        .lab
        .balancer
        .nsenter(bin().to_str().unwrap())
        .args(["run", "--config", cfg, "--ready-file"])
        .arg(&ready2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("holds it (pid {pid})")), "{err}");
    assert!(err.contains(&bed.pins.0.display().to_string()), "{err}");
    assert_eq!(err.matches("cidlb:").count(), 1, "said once: {err}");
    assert_eq!(std::fs::read_to_string(&ready2).unwrap(), "sentinel\n");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("pid={pid}\npin_dir={}\n", bed.pins.0.display()),
        "the holder's pid file changed"
    );
    // The heartbeat is still only the first agent's (written every second).
    for _ in 0..3 {
        assert_eq!(cidlb::announce::read_heartbeat(&state).unwrap().pid, pid);
        std::thread::sleep(Duration::from_millis(400));
    }

    // The first keeps running, ready and forwarding; stats and explain need no lock.
    assert!(
        matches!(first.0.child.0.try_wait(), Ok(None)),
        "first agent died"
    );
    assert!(first.is_ready(), "first agent's ready file is gone");
    assert_eq!(echoed(&bed, 20), 20);
    let stats = cidlb(&["stats", "--json", "--config", cfg]);
    assert!(json_counter(&stats, "cid_routed") >= 40, "{stats}");
    let explained = bed
        .lab
        .balancer
        .nsenter(bin().to_str().unwrap())
        .args([
            "explain",
            "--config",
            cfg,
            "--src",
            "198.51.100.7:40000",
            "--dst",
            &format!("{VIP4}:{PORT}"),
            "--payload",
            "19fefd0001000000000001011a2a3a4a5a0000",
        ])
        .output()
        .unwrap();
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );

    // kill -9 releases the lock with the process: the next agent starts (adopting the pins).
    first.kill9();
    let next = AgentProc::start(&bed.lab, &bed.cfg, &[]);
    let next_pid = next.child.0.id();
    assert!(std::fs::read_to_string(&pid_file)
        .unwrap()
        .starts_with(&format!("pid={next_pid}\n")));
    assert_eq!(echoed(&bed, 20), 20);
    assert!(next.terminate().expect("exits").success());
    assert!(!pid_file.exists(), "a clean exit removes its pid file");
    let _ = std::fs::remove_dir_all(&state);
}
