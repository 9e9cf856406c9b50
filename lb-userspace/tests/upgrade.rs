//! An upgrade across datapath layouts, under traffic: a real earlier release of cidlb (layout 2,
//! built from git by `cargo xtask test`, see `xtask/src/old.rs`) runs the datapath; this
//! build's `cidlb run` takes it over (`src/upgrade.rs`). No packet of any session may be lost,
//! the flows must be carried, and the old layout's pins must be gone afterwards.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{
    agent::{cidlb, json_counter, AgentProc, Bed},
    traffic::{warm_up, Stream},
};
use lb_lab::{
    agent::{Agent, LogTo},
    packet::{cid_record, handshake_record},
    PORT, VIP4, VIP6,
};

/// The layout-2 release's `cidlb`: `CIDLB_LAYOUT2_BIN`, as `cargo xtask test` sets it.
fn layout2_bin() -> PathBuf {
    let path = std::env::var_os("CIDLB_LAYOUT2_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/old/layout2/target/release/cidlb"
            ))
        });
    assert!(
        path.exists(),
        "{} is missing: run through `cargo xtask test`, which builds the layout-2 release from git",
        path.display()
    );
    path
}

fn cid_to(node: u8) -> impl Fn(u64) -> Vec<u8> + Send + 'static {
    move |seq| {
        cid_record(
            &[node, 0x0d, 0x1e, (seq >> 8) as u8, seq as u8, 0],
            b"application data across the upgrade",
        )
    }
}

#[test]
fn upgrade_from_layout_2_under_traffic_loses_nothing() {
    let bed = Bed::up("ug", 2);
    let (lab, pins) = (&bed.lab, &bed.pins);
    bed.write_config("flows: {policy: round_robin, capacity: 4096}\n");
    let log = LogTo {
        stderr_prefix: Some("[cidlb layout 2] ".into()),
        file: None,
    };
    let old = Agent::start(&layout2_bin(), &lab.balancer, &bed.cfg, &[], &log)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cidlb::layout::pinned_version(&pins.0).expect("LAYOUT readable"),
        Some(2),
        "the old release pins layout 2"
    );
    std::thread::sleep(Duration::from_millis(1000));
    warm_up(&lab.client.name, 2);

    let (every, max) = (Duration::from_millis(4), 4000);
    let vip4 = SocketAddr::from((VIP4, PORT));
    let vip6 = SocketAddr::from((VIP6, PORT));
    let s1 = Stream::start(&lab.client.name, vip4, every, max, cid_to(1));
    let s2 = Stream::start(&lab.client.name, vip4, every, max, cid_to(2));
    let s6 = Stream::start(&lab.client.name, vip6, every, max, cid_to(2));
    let sf = Stream::start(&lab.client.name, vip4, every, max, |_| {
        handshake_record(b"non-CID session record")
    });
    std::thread::sleep(Duration::from_millis(800));

    // The operator's upgrade: the old agent stops (its datapath keeps forwarding), the new
    // one starts on the same config.
    assert!(old.terminate().expect("old agent exits").success());
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let new = AgentProc::start(lab, &bed.cfg, &[]);
    eprintln!("upgrade: ready after {:?}", t.elapsed());
    assert!(
        new.saw("datapath upgraded from another layout"),
        "the new agent must upgrade the layout-2 datapath"
    );
    std::thread::sleep(Duration::from_millis(1000));

    let reports = [
        ("CID node 1", s1.finish(), Some(1)),
        ("CID node 2", s2.finish(), Some(2)),
        ("CID node 2 IPv6", s6.finish(), Some(2)),
        ("non-CID flow", sf.finish(), None),
    ];
    let mut flow_node = None;
    for (name, r, node) in &reports {
        assert!(r.sent > 300, "{name}: only {} sent", r.sent);
        assert!(
            r.lost.is_empty(),
            "{name}: {} of {} lost across the upgrade, first {:?}",
            r.lost.len(),
            r.sent,
            &r.lost[..r.lost.len().min(10)]
        );
        assert_eq!(r.wrong_source, 0, "{name}: answers not from the VIP");
        let nodes: Vec<u32> = r.nodes.keys().copied().collect();
        match node {
            Some(n) => assert_eq!(nodes, [*n], "{name}"),
            None => {
                assert_eq!(nodes.len(), 1, "{name}: the flow moved: {:?}", r.nodes);
                flow_node = Some(nodes[0]);
            }
        }
    }
    eprintln!("upgrade: non-CID flow stayed on node {flow_node:?}");

    // The flow table was carried: the new program (its counters start at zero) never had to
    // create the non-CID session's flow, it found it.
    let json = cidlb(&["stats", "--json", "--pin-dir", pins.0.to_str().unwrap()]);
    assert_eq!(json_counter(&json, "flow_new"), 0, "{json}");
    assert!(json_counter(&json, "flow_hit") > 0, "{json}");

    // The old layout's pins are gone: this layout's maps, the program and the links only.
    assert_eq!(
        cidlb::layout::pinned_version(&pins.0).expect("LAYOUT readable"),
        Some(lb_common::LAYOUT_VERSION)
    );
    cidlb::layout::check(&pins.0, None).expect("the pins are this layout's");
    let mut left: Vec<String> = std::fs::read_dir(&pins.0)
        .expect("pin dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "prog" && n != "links" && !cidlb::ebpf::MAP_NAMES.contains(&n.as_str()))
        .collect();
    left.sort();
    assert!(left.is_empty(), "left behind under the pin dir: {left:?}");
    assert!(new.terminate().expect("exits").success());
}
