//! The router never loses a VIP's route (issue 17): two balancers behind a BIRD router (BGP,
//! ECMP; `lb_lab::fleet`, as in scale_out.rs), CID records flowing through them, while
//! balancer 1's agent is restarted (SIGTERM, start), balancer 2's is killed with -9 and started
//! again a second later, and both reload a config that adds a node, then one that adds a VIP.
//! The router's routes are watched for the whole test with `ip monitor route` (not polled):
//! any event for the two VIPs (a next hop lost, a route deleted) fails it, and no record may
//! be lost. The added VIP must reach the router through both balancers.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::traffic::{body, Echo, Stream};
use lb_lab::{
    agent::{Agent, LogTo, PinGuard},
    fleet::{self, bird_config, Bird, Fleet, Replies, BALANCERS, NODES, TABLE},
    node4, node6,
    packet::cid_record,
    write_then_rename, ChildGuard, NetNs, VIP4, VIP4_SOCKET, VIP6, VIP6_SOCKET,
};

const VIP_ADDED: &str = "192.0.2.20";

/// The balancers' config: nodes 1..=`nodes`, and the third VIP if `more_vips`.
fn config(pins: &Path, state: &Path, nodes: usize, more_vips: bool) -> String {
    let ifaces = Fleet::balancer_interfaces().join(", ");
    let extra_vip = if more_vips {
        format!("  - address: {VIP_ADDED}\n    ports: [5690]\n")
    } else {
        String::new()
    };
    let mut s = format!(
        "interfaces: [{ifaces}]\nxdp_mode: native\nvips:\n  - address: {VIP4}\n    ports: [{}]\n  - address: \"{VIP6}\"\n    ports: [{}]\n{extra_vip}health: {{probe: udp, interval: 1s, timeout: 500ms, fall: 3, rise: 1}}\nannounce: {{state_dir: {}, table: {TABLE}, grace: 3s}}\npin_dir: {}\nnodes:\n",
        VIP4_SOCKET.port(),
        VIP6_SOCKET.port(),
        state.display(),
        pins.display(),
    );
    for k in 1..=nodes {
        s.push_str(&format!(
            "  - {{id: {k}, address: [{}, \"{}\"]}}\n",
            node4(k),
            node6(k)
        ));
    }
    s
}

fn start_agent(ns: &NetNs, cfg: &Path, dir: &Path, i: usize) -> Agent {
    Agent::start(
        common::agent::bin(),
        ns,
        cfg,
        &[],
        &LogTo {
            stderr_prefix: None,
            file: Some(dir.join(format!("cidlb-b{i}.log"))),
        },
    )
    .unwrap_or_else(|e| panic!("balancer {i}: {e}"))
}

fn hops(f: &Fleet, vip: &str) -> usize {
    let r = f.router_route(vip);
    if r.trim().is_empty() {
        0
    } else {
        r.matches("nexthop").count().max(1)
    }
}

fn wait_hops(f: &Fleet, vip: &str, want: usize, within: Duration, what: &str) {
    let t0 = Instant::now();
    while hops(f, vip) != want {
        assert!(
            t0.elapsed() < within,
            "{what}: router route to {vip} after {within:?}:\n{}",
            f.router_route(vip)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_router_keeps_the_vip_through_restarts_kills_and_reloads() {
    common::require_root();
    let prefix = lb_lab::unique_prefix("fh");
    // Replies by ECMP: any balancer un-NATs a node's reply (scale_out.rs runs the other
    // layout, replies through the balancer that brought the request).
    let f = Fleet::up(&prefix, Replies::Ecmp).unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("cidlb-{prefix}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _echo: Vec<Echo> = f
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Echo::start(&n.name, i + 1, VIP4_SOCKET.port()))
        .collect();

    let _router_bird = fleet::start_router_bird(&f, &dir, &common::deploy_bird("router.conf"))
        .unwrap_or_else(|e| panic!("{e}"));

    // Each balancer: cidlb run, cidlb announce and BIRD; nodes 1 and 2 at first.
    let mut pins = Vec::new();
    let mut cfgs = Vec::new();
    let mut states = Vec::new();
    let mut agents = Vec::new();
    let mut _rest = Vec::new();
    for i in 1..=BALANCERS {
        let ns = &f.balancers[i - 1];
        let pin = PinGuard::new(&format!("fh{i}"));
        let state = dir.join(format!("state-b{i}"));
        let cfg = dir.join(format!("cidlb-b{i}.yaml"));
        write_then_rename(&cfg, &config(&pin.0, &state, NODES - 1, false));
        let ((l4, p4), (l6, p6)) = (fleet::uplink4(i), fleet::uplink6(i));
        let conf = bird_config(
            &common::deploy_bird("balancer.conf"),
            &[
                ("ROUTER_ID", l4.clone()),
                ("LOCAL4", l4),
                ("PEER4", p4),
                ("LOCAL6", l6),
                ("PEER6", p6),
                ("CIDLB_TABLE", TABLE.to_string()),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let bird = Bird::start(ns, &dir, &format!("b{i}"), &conf).unwrap_or_else(|e| panic!("{e}"));
        agents.push(Some(start_agent(ns, &cfg, &dir, i)));
        let announce = ChildGuard(
            ns.nsenter(common::agent::bin().to_str().unwrap())
                .args(["announce", "--every-ms", "200", "--config"])
                .arg(&cfg)
                .stderr(std::fs::File::create(dir.join(format!("announce-b{i}.log"))).unwrap())
                .spawn()
                .expect("spawn cidlb announce"),
        );
        _rest.push((announce, bird));
        pins.push(pin);
        cfgs.push(cfg);
        states.push(state);
    }
    for vip in [VIP4.to_string(), VIP6.to_string()] {
        wait_hops(
            &f,
            &vip,
            2,
            Duration::from_secs(20),
            "both balancers announced",
        );
    }
    std::thread::sleep(Duration::from_millis(1000));

    // The router's routes, from here to the end.
    let mut mon = f
        .router
        .nsenter("ip")
        .args(["monitor", "route"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ip monitor");
    let out = mon.stdout.take().expect("piped");
    let mon = ChildGuard(mon);
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            ev.lock().unwrap().push(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    // CID records for node 1, 10 ms apart, through both balancers (ECMP by source port: one
    // socket, one balancer; the restarts hit both in turn).
    let n = 1800;
    let t0 = Instant::now();
    let stream = Stream::start(
        &f.client.name,
        VIP4_SOCKET,
        Duration::from_millis(10),
        n,
        |seq| {
            cid_record(
                &[1, 0x5f, (seq >> 16) as u8, 0, (seq >> 8) as u8, seq as u8],
                &body(b"fleet", seq),
            )
        },
    );
    let at = |secs: u64| {
        if let Some(d) = (t0 + Duration::from_secs(secs)).checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };

    // Balancer 1: a restart.
    at(1);
    let a = agents[0].take().expect("agent 1");
    assert!(a.terminate().expect("exits").success());
    agents[0] = Some(start_agent(&f.balancers[0], &cfgs[0], &dir, 1));
    // Balancer 2: kill -9, started again a second later.
    at(4);
    agents[1].take().expect("agent 2").kill9();
    std::thread::sleep(Duration::from_millis(1000));
    agents[1] = Some(start_agent(&f.balancers[1], &cfgs[1], &dir, 2));
    // Both: a reload that adds node 3, then one that adds a VIP.
    at(8);
    for i in 0..BALANCERS {
        write_then_rename(&cfgs[i], &config(&pins[i].0, &states[i], NODES, false));
    }
    at(11);
    for i in 0..BALANCERS {
        write_then_rename(&cfgs[i], &config(&pins[i].0, &states[i], NODES, true));
    }
    wait_hops(&f, VIP_ADDED, 2, Duration::from_secs(10), "the added VIP");

    at(19);
    let r = stream.finish();
    drop(mon);
    let about_vips: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|l| {
            let l = l.strip_prefix("Deleted ").unwrap_or(l);
            l.starts_with(&format!("{VIP4} ")) || l.starts_with(&format!("{VIP6} "))
        })
        .cloned()
        .collect();
    let logs: String = (1..=BALANCERS)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("announce-b{i}.log"))).unwrap_or_default()
        })
        .collect();
    assert!(
        about_vips.is_empty(),
        "the router's VIP routes changed: {about_vips:?}\nannounce logs:\n{logs}"
    );
    assert!(r.sent >= n * 9 / 10, "{r:?}");
    assert!(
        r.lost.is_empty(),
        "{} records lost: {:?}",
        r.lost.len(),
        r.lost
    );
    for vip in [VIP4.to_string(), VIP6.to_string()] {
        assert_eq!(hops(&f, &vip), 2, "{}", f.router_route(&vip));
    }
    let carried: usize = (1..=BALANCERS)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("cidlb-b{i}.log")))
                .unwrap_or_default()
                .matches("carried over from the previous agent")
                .count()
        })
        .sum();
    assert_eq!(carried, 2, "both restarts carry the probe round over");
    for a in agents.into_iter().flatten() {
        let _ = a.terminate();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
