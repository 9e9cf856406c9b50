//! Restarts and reloads that do not flap: with `cidlb announce` keeping the VIP routes in
//! `announce.table` (what BIRD learns and exports), a restart of the agent (SIGTERM, start), a
//! kill -9 followed by a start within `announce.grace`, a reload that adds a node and one that
//! adds a VIP never withdraw a VIP route, and CID records flowing all along lose nothing. The
//! table is watched for the whole test with `ip monitor route`, not polled: one `Deleted` line
//! for a VIP fails it.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    agent::{bin, AgentProc, Bed},
    traffic::{body, Stream},
};
use lb_lab::{packet::cid_record, write_then_rename, ChildGuard, Lab, PORT, VIP4, VIP6};

const TABLE: u32 = 4243;
const VIP_ADDED: &str = "192.0.2.20";

struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn table(lab: &Lab) -> String {
    let t = TABLE.to_string();
    ["-4", "-6"]
        .iter()
        .map(|fam| {
            String::from_utf8_lossy(
                &lab.balancer
                    .exec(&["ip", fam, "route", "show", "table", &t])
                    .stdout,
            )
            .into_owned()
        })
        .collect()
}

fn wait_for(lab: &Lab, vips: &[IpAddr], within: Duration, what: &str) {
    let t0 = Instant::now();
    loop {
        let t = table(lab);
        if vips.iter().all(|v| t.contains(&v.to_string())) {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "{what}: table {TABLE} holds only:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ip monitor route` in the balancer namespace; every line it prints is kept.
fn monitor(lab: &Lab) -> (ChildGuard, Arc<Mutex<Vec<String>>>) {
    let mut child = lab
        .balancer
        .nsenter("ip")
        .args(["monitor", "route"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ip monitor");
    let out = child.stdout.take().expect("piped");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(line);
        }
    });
    (ChildGuard(child), lines)
}

#[test]
fn restarts_kills_and_reloads_never_withdraw_a_vip() {
    let bed = Bed::up("ah", 2);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let state =
        DirGuard(std::env::temp_dir().join(format!("cidlb-ah-state-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&state.0);
    let extra = format!(
        "health: {{probe: udp, interval: 1s, timeout: 1s, fall: 3, rise: 1}}\n\
         announce: {{state_dir: {}, table: {TABLE}, grace: 3s}}\n",
        state.0.display()
    );
    let full = lab.cidlb_config(pins.0.to_str().unwrap(), &extra);
    // Node 2 comes with a reload, and so does a third VIP.
    let one_node: String = full
        .lines()
        .filter(|l| !l.starts_with("  - {id: 2,"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(one_node, full);
    let more_vips = full.replace(
        "nodes:\n",
        &format!("  - address: {VIP_ADDED}\n    ports: [5690]\nnodes:\n"),
    );
    write_then_rename(&cfg, &one_node);

    let mut ann = ChildGuard(
        lab.balancer
            .nsenter(bin().to_str().unwrap())
            .args(["announce", "--every-ms", "200", "--config"])
            .arg(&cfg)
            .spawn()
            .expect("spawn cidlb announce"),
    );
    let agent = AgentProc::start(lab, &cfg, &[]);
    let vips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    wait_for(lab, &vips, Duration::from_secs(6), "first probe round");
    let (mut mon, lines) = monitor(lab);
    std::thread::sleep(Duration::from_millis(300));

    // CID records for node 1 all along: 5 ms apart for 14 s.
    let n = 2800;
    let t0 = Instant::now();
    let stream = Stream::start(
        &lab.client.name,
        SocketAddr::from((VIP4, PORT)),
        Duration::from_millis(5),
        n,
        |seq| {
            cid_record(
                &[1, 0x4a, (seq >> 16) as u8, 0, (seq >> 8) as u8, seq as u8],
                &body(b"hitless", seq),
            )
        },
    );

    // A restart: SIGTERM, then a new agent.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(agent.terminate().expect("exits").success());
    let agent = AgentProc::start(lab, &cfg, &[]);
    assert!(
        agent
            .history
            .borrow()
            .iter()
            .any(|l| l.contains("carried over from the previous agent")),
        "the restart did not carry the probe round over"
    );
    std::thread::sleep(Duration::from_millis(1500));

    // kill -9, and a start by hand a second later (within the 3 s grace).
    agent.kill9();
    std::thread::sleep(Duration::from_millis(1000));
    let agent = AgentProc::start(lab, &cfg, &[]);
    std::thread::sleep(Duration::from_millis(1500));

    // A reload that adds node 2 (not probed yet: it must not gate readiness).
    write_then_rename(&cfg, &full);
    std::thread::sleep(Duration::from_millis(2500));
    let hb = cidlb::announce::read_heartbeat(&state.0).expect("heartbeat");
    assert!(hb.probed, "{hb:?}");

    // A reload that adds a VIP: announced once the agent serves it.
    write_then_rename(&cfg, &more_vips);
    let added: IpAddr = VIP_ADDED.parse().unwrap();
    wait_for(lab, &[added], Duration::from_secs(4), "added VIP");

    let left = Duration::from_millis(5 * n + 500).saturating_sub(t0.elapsed());
    std::thread::sleep(left);
    let r = stream.finish();
    mon.terminate(2);
    let withdrawn: Vec<String> = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("Deleted") && l.contains(&format!("table {TABLE}")))
        .cloned()
        .collect();
    println!(
        "records: sent {} echoed {}; route events seen: {}",
        r.sent,
        r.received,
        lines.lock().unwrap().len()
    );
    assert!(withdrawn.is_empty(), "VIP routes withdrawn: {withdrawn:?}");
    // The sender paces itself a little slower than 5 ms: most of the run is enough.
    assert!(r.sent >= n * 9 / 10, "{r:?}");
    assert!(
        r.lost.is_empty(),
        "{} records lost: {:?}",
        r.lost.len(),
        r.lost
    );
    wait_for(
        lab,
        &[vips[0], vips[1], added],
        Duration::from_secs(1),
        "at the end",
    );

    assert!(agent.terminate().expect("exits").success());
    assert!(ann.terminate(5).expect("announce exits").success());
}
