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
    traffic::{body, warm_up, Stream},
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
            &body(b"application data across the upgrade", seq),
        )
    }
}

/// A lab with the layout-2 release running the datapath and four sequence-numbered streams
/// through it (CID records to nodes 1 and 2, over IPv4 and IPv6, and a non-CID session).
struct Upgrading {
    streams: Vec<(&'static str, Stream, Option<u32>)>,
    bed: Bed,
}

impl Upgrading {
    fn up(tag: &str) -> Self {
        let bed = Bed::up(tag, 2);
        bed.write_config("flows: {policy: round_robin, capacity: 4096}\n");
        let log = LogTo {
            stderr_prefix: Some("[cidlb layout 2] ".into()),
            file: None,
        };
        let old = Agent::start(&layout2_bin(), &bed.lab.balancer, &bed.cfg, &[], &log)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cidlb::layout::pinned_version(&bed.pins.0).expect("LAYOUT readable"),
            Some(2),
            "the old release pins layout 2"
        );
        std::thread::sleep(Duration::from_millis(1000));
        warm_up(&bed.lab.client.name, 2);
        let (every, max) = (Duration::from_millis(4), 4000);
        let vip4 = SocketAddr::from((VIP4, PORT));
        let vip6 = SocketAddr::from((VIP6, PORT));
        let ns = &bed.lab.client.name;
        let streams = vec![
            (
                "CID node 1",
                Stream::start(ns, vip4, every, max, cid_to(1)),
                Some(1),
            ),
            (
                "CID node 2",
                Stream::start(ns, vip4, every, max, cid_to(2)),
                Some(2),
            ),
            (
                "CID node 2 IPv6",
                Stream::start(ns, vip6, every, max, cid_to(2)),
                Some(2),
            ),
            (
                "non-CID flow",
                Stream::start(ns, vip4, every, max, |seq| {
                    handshake_record(&body(b"non-CID session record", seq))
                }),
                None,
            ),
        ];
        std::thread::sleep(Duration::from_millis(800));
        // The operator's upgrade: the old agent stops (its datapath keeps forwarding).
        assert!(old.terminate().expect("old agent exits").success());
        std::thread::sleep(Duration::from_millis(300));
        Upgrading { streams, bed }
    }

    /// The new agent's work is done: every stream lost nothing and kept its node; the flow
    /// table was carried; only this layout's pins are left.
    fn check(self, new: AgentProc) {
        std::thread::sleep(Duration::from_millis(1000));
        let pins = &self.bed.pins.0;
        for (name, s, node) in self.streams {
            let r = s.finish();
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
                Some(n) => assert_eq!(nodes, [n], "{name}"),
                None => assert_eq!(nodes.len(), 1, "{name}: the flow moved: {:?}", r.nodes),
            }
        }
        // The flow table was carried: the new program (its counters start at zero) never had
        // to create the non-CID session's flow, it found it.
        let json = cidlb(&["stats", "--json", "--pin-dir", pins.to_str().unwrap()]);
        assert_eq!(json_counter(&json, "flow_new"), 0, "{json}");
        assert!(json_counter(&json, "flow_hit") > 0, "{json}");
        // The old layout's pins are gone: this layout's maps, the program and the links only.
        assert_eq!(
            cidlb::layout::pinned_version(pins).expect("LAYOUT readable"),
            Some(lb_common::LAYOUT_VERSION)
        );
        cidlb::layout::check(pins, None).expect("the pins are this layout's");
        let mut left: Vec<String> = std::fs::read_dir(pins)
            .expect("pin dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n != "prog" && n != "links" && !cidlb::ebpf::MAP_NAMES.contains(&n.as_str())
            })
            .collect();
        left.sort();
        assert!(left.is_empty(), "left behind under the pin dir: {left:?}");
        assert!(new.terminate().expect("exits").success());
    }
}

#[test]
fn upgrade_from_layout_2_under_traffic_loses_nothing() {
    let u = Upgrading::up("ug");
    let t = Instant::now();
    let new = AgentProc::start(&u.bed.lab, &u.bed.cfg, &[]);
    eprintln!("upgrade: ready after {:?}", t.elapsed());
    assert!(
        new.saw("datapath upgraded from another layout"),
        "the new agent must upgrade the layout-2 datapath"
    );
    u.check(new);
}

/// The new agent dies right after its program took over the links (before the second flow
/// copy and the pin moves): traffic goes on, and the next `cidlb run` finishes the upgrade.
#[test]
fn an_upgrade_cut_short_after_the_link_swap_is_finished_by_the_next_start() {
    let u = Upgrading::up("uc");
    let status = u
        .bed
        .lab
        .balancer
        .nsenter(common::agent::bin().to_str().unwrap())
        .args(["run", "--config"])
        .arg(&u.bed.cfg)
        .env("CIDLB_UPGRADE_FAILPOINT", "after-swap")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the agent");
    assert!(!status.success(), "the agent must die at the failpoint");
    let stage = u.bed.pins.0.join("upgrade");
    assert!(
        stage.join("swapping").exists(),
        "cut short after the swap: the staging maps and the marker are there"
    );
    std::thread::sleep(Duration::from_millis(500));
    let new = AgentProc::start(&u.bed.lab, &u.bed.cfg, &[]);
    assert!(
        new.saw("finished an upgrade that stopped after it began swapping links"),
        "the next start must finish the upgrade"
    );
    assert!(new.saw("datapath adopted"), "and then adopt the result");
    assert!(!stage.exists(), "no staging left");
    u.check(new);
}
