//! A pin file is not an attachment: when an interface is deleted and recreated under the same
//! name (a VLAN or bond a network manager rebuilds), the pinned bpf_link is left detached.
//! `cidlb announce` reads each link's ifindex from the kernel (src/linkinfo.rs) and keeps the
//! VIPs withdrawn; a restarted agent attaches afresh and they are announced again.

mod common;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use common::agent::{bin, AgentProc, Bed};
use lb_lab::{write_then_rename, ChildGuard, Lab, VIP4, VIP6};

const TABLE: u32 = 4244;

fn announced(lab: &Lab) -> bool {
    let t = TABLE.to_string();
    let show = |fam: &str| {
        String::from_utf8_lossy(
            &lab.balancer
                .exec(&["ip", fam, "route", "show", "table", &t])
                .stdout,
        )
        .into_owned()
    };
    show("-4").contains(&VIP4.to_string()) && show("-6").contains(&IpAddr::V6(VIP6).to_string())
}

fn wait(lab: &Lab, want: bool, within: Duration, what: &str) {
    let t0 = Instant::now();
    while announced(lab) != want {
        assert!(
            t0.elapsed() < within,
            "{what}: announced != {want} after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn veth(lab: &Lab) {
    lab.balancer
        .ip("link add alx0 type veth peer name alx1")
        .unwrap();
    lab.balancer.ip("link set alx1 up").unwrap();
    lab.balancer.ip("link set alx0 up").unwrap();
}

#[test]
fn a_recreated_interface_is_not_attached_until_the_agent_attaches_again() {
    let bed = Bed::up("al", 1);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let state = cfg.with_file_name("state");
    veth(lab);
    let text = lab
        .cidlb_config(
            pins.0.to_str().unwrap(),
            &format!(
                "announce: {{state_dir: {}, table: {TABLE}, grace: 3s}}\n",
                state.display()
            ),
        )
        .replace("interfaces: [", "interfaces: [alx0, ");
    write_then_rename(&cfg, &text);
    let mut ann = ChildGuard(
        lab.balancer
            .nsenter(bin().to_str().unwrap())
            .args(["announce", "--every-ms", "200", "--config"])
            .arg(&cfg)
            .spawn()
            .expect("spawn cidlb announce"),
    );
    let agent = AgentProc::start(lab, &cfg, &[]);
    wait(lab, true, Duration::from_secs(5), "agent up");

    // The device goes and comes back under the same name: the pin file stays, the link is
    // detached. Withdrawn, and it stays so although every interface is up again.
    lab.balancer.ip("link del alx0").unwrap();
    veth(lab);
    wait(lab, false, Duration::from_secs(3), "device recreated");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2000) {
        assert!(
            !announced(lab),
            "announced again with a detached link for alx0"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pins.0.join("links/alx0").exists(),
        "the stale pin is expected to stay"
    );

    // A restarted agent replaces the defunct link: announced again.
    assert!(agent.terminate().expect("exits").success());
    let agent = AgentProc::start(lab, &cfg, &[]);
    assert!(
        agent
            .history
            .borrow()
            .iter()
            .any(|l| l.contains("attaching afresh") && l.contains("alx0")),
        "the agent did not replace the defunct link"
    );
    wait(lab, true, Duration::from_secs(5), "agent attached afresh");
    let links = lab.balancer.must(&["ip", "link", "show", "alx0"]).unwrap();
    assert!(links.contains("xdp"), "{links}");

    assert!(agent.terminate().expect("exits").success());
    assert!(ann.terminate(5).expect("announce exits").success());
    let _ = std::fs::remove_dir_all(&state);
}
