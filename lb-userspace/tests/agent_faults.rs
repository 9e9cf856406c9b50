//! The agent under the faults an operator meets: commands given the config file `run` was
//! given, pins of another layout, reloads and first starts that fail halfway, `/metrics` under
//! a flood of idle connections. Every test runs the real `cidlb` binary against the kernel in a
//! netns lab of its own.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use common::{
    agent::{cidlb, json_counter, AgentProc, Bed},
    traffic::{warm_up, Stream},
};
use lb_lab::{packet::cid_record, Lab, PORT, VIP4};

fn write(path: &Path, text: &str) {
    // Write then rename: the agent never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `n` CID records for node 1 from one client socket; returns how many were echoed.
fn cid_traffic(lab: &Lab, n: u64) -> u64 {
    let s = Stream::start(
        &lab.client.name,
        SocketAddr::from((VIP4, PORT)),
        Duration::from_millis(5),
        n,
        |seq| {
            cid_record(
                &[1, 0xfa, 0x17, 0, (seq >> 8) as u8, seq as u8],
                b"fault test",
            )
        },
    );
    std::thread::sleep(Duration::from_millis(5 * n + 300));
    let r = s.finish();
    assert_eq!(r.sent, n, "{r:?}");
    r.received
}

fn xdp_links(lab: &Lab) -> String {
    lab.balancer.must(&["ip", "link", "show"]).unwrap()
}

#[test]
fn stats_and_detach_take_the_config_file() {
    let bed = Bed::up("cf", 1);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    write(&cfg, &lab.cidlb_config(pins.0.to_str().unwrap(), ""));
    let agent = AgentProc::start(lab, &cfg, &[]);
    std::thread::sleep(Duration::from_millis(1000));
    warm_up(&lab.client.name, 1);
    // The agent stops; the pinned datapath keeps forwarding and counting.
    assert!(agent.terminate().expect("exits").success());
    let echoed = cid_traffic(lab, 20);
    assert_eq!(echoed, 20);

    let c = cfg.to_str().unwrap();
    let by_config = cidlb(&["stats", "--json", "--config", c]);
    let by_dir = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    assert!(json_counter(&by_config, "cid_routed") >= 20, "{by_config}");
    assert_eq!(
        json_counter(&by_config, "cid_routed"),
        json_counter(&by_dir, "cid_routed")
    );
    let text = cidlb(&["stats", "-c", c]);
    assert!(text.contains("cid_routed"), "{text}");

    let out = cidlb(&["detach", "--config", c]);
    assert!(out.contains("detached from 2 interface(s)"), "{out}");
    assert!(
        !pins.0.exists(),
        "detach --config left {}",
        pins.0.display()
    );
    let links = xdp_links(lab);
    assert!(!links.contains("xdp"), "XDP still attached:\n{links}");
    // Nothing pinned any more: a clear error naming the directory.
    let o: Output = Command::new(env!("CARGO_BIN_EXE_cidlb"))
        .args(["detach", "--config", c])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(&format!(
            "no cidlb datapath is pinned under {}",
            pins.0.display()
        )),
        "{e}"
    );
}
