//! Readiness per VIP as a routing daemon sees it (issue #9): `cidlb run` and `cidlb announce`
//! in a lab's balancer namespace; the VIP routes in the kernel table `announce.table` (what
//! BIRD learns and exports) follow the datapath, the interfaces, the agent's heartbeat (with
//! its grace), the first probe round and the maintenance switch.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{
    agent::{cidlb, AgentProc, Bed},
    traffic::{body, warm_up, Stream},
};
use lb_lab::{packet::cid_record, ChildGuard, Lab, PORT, VIP4};

const TABLE: u32 = 4242;

/// Removes the test's state directory on drop.
struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Both VIP host routes in the announce table of the balancer namespace?
fn announced(lab: &Lab) -> (bool, bool) {
    // A table with no route yet "does not exist": empty output either way.
    let t = TABLE.to_string();
    let show = |fam: &str| {
        String::from_utf8_lossy(
            &lab.balancer
                .exec(&["ip", fam, "route", "show", "table", &t])
                .stdout,
        )
        .into_owned()
    };
    let (v4, v6) = (show("-4"), show("-6"));
    (
        v4.contains(&lb_lab::VIP4.to_string()),
        v6.contains(&lb_lab::VIP6.to_string()),
    )
}

/// Polls until the announcement is `want` (both families) or `within` passes; returns how
/// long it took, or panics with `what`.
fn wait_announced(lab: &Lab, want: bool, within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let (a, b) = announced(lab);
        if a == want && b == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{what}: announced (v4, v6) = ({a}, {b}) after {within:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` CID records for node 1; how many were echoed.
fn cid_traffic(lab: &Lab, n: u64) -> u64 {
    let s = Stream::start(
        &lab.client.name,
        SocketAddr::from((VIP4, PORT)),
        Duration::from_millis(5),
        n,
        |seq| {
            cid_record(
                &[1, 0xab, 0, 0, (seq >> 8) as u8, seq as u8],
                &body(b"announce", seq),
            )
        },
    );
    std::thread::sleep(Duration::from_millis(5 * n + 300));
    s.finish().received
}

fn announcer(lab: &Lab, cfg: &Path) -> ChildGuard {
    ChildGuard(
        lab.balancer
            .nsenter(env!("CARGO_BIN_EXE_cidlb"))
            .args(["announce", "--every-ms", "200", "--config"])
            .arg(cfg)
            .spawn()
            .expect("spawn cidlb announce"),
    )
}

#[test]
fn vips_are_announced_only_while_the_balancer_can_serve() {
    let bed = Bed::up("an", 2);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let state =
        DirGuard(std::env::temp_dir().join(format!("cidlb-an-state-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&state.0);
    // UDP probes count a silent node as alive after `timeout`: the first round ends ~1 s in.
    let extra = format!(
        "health: {{probe: udp, interval: 1s, timeout: 1s, fall: 3, rise: 1}}\n\
         announce: {{state_dir: {}, table: {TABLE}, grace: 3s}}\n",
        state.0.display()
    );
    std::fs::write(&cfg, lab.cidlb_config(pins.0.to_str().unwrap(), &extra)).unwrap();
    let mut ann = announcer(lab, &cfg);
    let agent = AgentProc::start(lab, &cfg, &[]);

    // Ready (attached, provisioned) but the first probe round is not done: not announced.
    let hb = cidlb::announce::read_heartbeat(&state.0).expect("heartbeat written at start");
    assert!(!hb.probed, "first probe round cannot be done yet: {hb:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        announced(lab),
        (false, false),
        "announced before the first probe round"
    );
    let took = wait_announced(lab, true, Duration::from_secs(5), "after the first round");
    println!("announced {took:?} after the agent was ready");
    assert!(state.0.join("ready").join(VIP4.to_string()).exists());
    warm_up(&lab.client.name, 2);

    // Maintenance: withdrawn, while the datapath keeps forwarding.
    let c = cfg.to_str().unwrap();
    let out = cidlb(&["maintenance", "on", "--config", c]);
    assert!(out.contains("maintenance on"), "{out}");
    wait_announced(lab, false, Duration::from_secs(2), "maintenance on");
    assert!(!state.0.join("ready").join(VIP4.to_string()).exists());
    assert_eq!(
        cid_traffic(lab, 20),
        20,
        "forwarding continues in maintenance"
    );
    cidlb(&["maintenance", "off", "--config", c]);
    wait_announced(lab, true, Duration::from_secs(2), "maintenance off");

    // An interface down: withdrawn; up again: announced.
    let iface = lab.interfaces()[0].clone();
    lab.balancer.ip(&format!("link set {iface} down")).unwrap();
    wait_announced(lab, false, Duration::from_secs(2), "interface down");
    lab.balancer.ip(&format!("link set {iface} up")).unwrap();
    wait_announced(lab, true, Duration::from_secs(5), "interface up again");

    // kill -9 of the agent: the pinned datapath forwards, and within the grace (3 s) nothing
    // is withdrawn; after it, the VIPs are.
    agent.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(announced(lab), (true, true), "withdrawn within the grace");
    assert_eq!(cid_traffic(lab, 20), 20, "the pinned datapath forwards");
    wait_announced(
        lab,
        false,
        Duration::from_secs(6),
        "agent dead past the grace",
    );
    let gone = killed.elapsed();
    // The grace counts from the last heartbeat, written up to 1 s before the kill.
    assert!(
        gone >= Duration::from_secs(2),
        "withdrawn {gone:?} after the kill, before the grace (3 s from the last heartbeat)"
    );

    // A new agent: announced again after its first probe round.
    let agent = AgentProc::start(lab, &cfg, &[]);
    wait_announced(lab, true, Duration::from_secs(5), "agent back");

    // Stopping the announcer withdraws.
    assert!(ann.terminate(5).expect("announce exits").success());
    assert_eq!(
        announced(lab),
        (false, false),
        "announce stopped but routes remain"
    );
    assert!(agent.terminate().expect("exits").success());
}
