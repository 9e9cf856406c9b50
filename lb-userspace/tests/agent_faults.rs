//! The agent under the faults an operator meets: commands given the config file `run` was
//! given, pins of another layout, reloads and first starts that fail halfway, `/metrics` under
//! a flood of idle connections: the real `cidlb` binary against the kernel, each test in a
//! netns lab of its own. And a health probe facing forged ICMP (raw sockets on loopback).

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{
    agent::{cidlb, json_counter, AgentProc, Bed},
    traffic::{body, warm_up, Stream},
};
use lb_lab::{packet::cid_record, ChildGuard, Lab, PORT, VIP4};

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
                &body(b"fault test", seq),
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

/// The kernel releases an unpinned bpf_link from a workqueue: poll briefly.
fn no_xdp_within_2s(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let links = xdp_links(lab);
        if !links.contains("xdp") {
            return;
        }
        assert!(Instant::now() < deadline, "XDP still attached:\n{links}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-node bed whose agent attached, carried traffic and stopped cleanly, leaving its
/// pinned datapath running without an agent.
fn agent_came_and_went(tag: &str) -> Bed {
    let bed = Bed::up(tag, 1);
    bed.write_config("");
    let agent = AgentProc::start(&bed.lab, &bed.cfg, &[]);
    std::thread::sleep(Duration::from_millis(1000));
    warm_up(&bed.lab.client.name, 1);
    assert!(agent.terminate().expect("exits").success());
    bed
}

#[test]
fn stats_and_detach_take_the_config_file() {
    let bed = agent_came_and_went("cf");
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    // The agent stopped; the pinned datapath keeps forwarding and counting.
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
    no_xdp_within_2s(lab);
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

/// The XDP program id on each of the balancer's interfaces (`ip link show`).
fn xdp_prog_ids(lab: &Lab) -> BTreeMap<String, u32> {
    let mut ids = BTreeMap::new();
    let mut iface = String::new();
    for line in xdp_links(lab).lines() {
        if line.starts_with(|c: char| c.is_ascii_digit()) {
            iface = line
                .split(": ")
                .nth(1)
                .unwrap_or("")
                .split('@')
                .next()
                .unwrap_or("")
                .to_owned();
        } else if let Some(rest) = line.trim().strip_prefix("prog/xdp id ") {
            ids.insert(
                iface.clone(),
                rest.split(' ').next().unwrap().parse().unwrap(),
            );
        }
    }
    ids
}

/// `bpftool map dump` of the pinned maps that hold configuration (not traffic).
fn config_maps(pin_dir: &Path) -> BTreeMap<&'static str, String> {
    [
        "NODES",
        "RING",
        "RING_LEN",
        "VIPS",
        "REVERSE",
        "NODE_ADDRS",
        "DEVMAP",
        "LAYOUT",
    ]
    .into_iter()
    .map(|m| {
        let o = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(pin_dir.join(m))
            .output()
            .expect("bpftool");
        assert!(
            o.status.success(),
            "bpftool dump {m}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (m, String::from_utf8_lossy(&o.stdout).into_owned())
    })
    .collect()
}

/// `cidlb run` that is expected to give up: its exit code (None: still running after 20 s,
/// then killed) and stderr.
fn run_expecting_failure(lab: &Lab, cfg: &Path) -> (Option<i32>, String) {
    let err = cfg.with_extension("stderr");
    let child = lab
        .balancer
        .nsenter(env!("CARGO_BIN_EXE_cidlb"))
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn cidlb");
    let mut guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            guard.terminate(5);
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (code, std::fs::read_to_string(&err).unwrap_or_default())
}

/// `cidlb stats` refuses pins of another layout (it would misread them), naming the map and
/// what to do.
fn assert_stats_refuses(cfg: &str, want: &[String]) {
    let o = Command::new(env!("CARGO_BIN_EXE_cidlb"))
        .args(["stats", "--config", cfg])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    for w in want {
        assert!(err.contains(w.as_str()), "lacks {w:?}:\n{err}");
    }
}

/// Pins of another layout: `cidlb stats` refuses them; `cidlb run` upgrades them in place
/// while they forward (`src/upgrade.rs`; `tests/upgrade.rs` does it from a real release under
/// traffic); pins of another layout that nothing attaches are refused.
#[test]
fn pins_of_another_layout_are_upgraded_by_run_and_refused_by_stats() {
    let bed = agent_came_and_went("ly");
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let c = cfg.display().to_string();
    let todo = "and start again (flows are lost, CID sessions continue)";

    // NODES as a binary with a 24-byte node value would have pinned it (this one's is 32).
    let nodes = pins.0.join("NODES");
    let wrong_nodes = || {
        std::fs::remove_file(&nodes).unwrap();
        lb_lab::run(
            "bpftool",
            &[
                "map",
                "create",
                nodes.to_str().unwrap(),
                "type",
                "hash",
                "key",
                "4",
                "value",
                "24",
                "entries",
                "1024",
                "name",
                "NODES",
            ],
        )
        .unwrap();
    };
    wrong_nodes();
    assert_stats_refuses(
        &c,
        &[
            format!(
                "pinned map {} is map type 1, key size 4, value size 24, max_entries 1024",
                nodes.display()
            ),
            "defines map type 1, key size 4, value size 32, max_entries 1024".to_owned(),
            "`cidlb run` of this cidlb upgrades it in place".to_owned(),
            todo.to_owned(),
        ],
    );
    let agent = AgentProc::start(lab, &cfg, &[]);
    assert!(agent.saw("datapath upgraded from another layout"));
    assert_eq!(cid_traffic(lab, 20), 20, "forwarding after the upgrade");
    cidlb::layout::check(&pins.0, None).expect("this layout's pins now");
    assert!(agent.terminate().expect("exits").success());

    // No LAYOUT beside a pinned STATS: what cidlb pinned before it had one (layout 0).
    std::fs::remove_file(pins.0.join("LAYOUT")).unwrap();
    assert_stats_refuses(
        &c,
        &[format!(
            "pinned datapath under {} has layout 0, this cidlb expects {}: `cidlb run` of this cidlb upgrades it in place",
            pins.0.display(),
            lb_common::LAYOUT_VERSION
        )],
    );
    let agent = AgentProc::start(lab, &cfg, &[]);
    assert!(agent.saw("datapath upgraded from another layout"));
    assert_eq!(cid_traffic(lab, 20), 20, "forwarding after the upgrade");
    assert!(agent.terminate().expect("exits").success());

    // Another layout's pins that no link attaches (links removed: nothing runs them) are not
    // a datapath to take over: refused, with what to do.
    for e in std::fs::read_dir(pins.0.join("links")).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    wrong_nodes();
    let (code, err) = run_expecting_failure(lab, &cfg);
    assert_eq!(code, Some(1), "cidlb run must refuse: {err}");
    assert!(
        err.contains("value size 24")
            && err.contains(&format!("run `cidlb detach --config {c}` {todo}")),
        "{err}"
    );
}

/// An interface without native XDP in the balancer namespace: a bridge (this kernel has no
/// `dummy` driver; a bridge has no XDP driver hook either).
fn add_dummy(lab: &Lab) -> &'static str {
    lab.balancer.ip("link add cldmy0 type bridge").unwrap();
    lab.balancer.ip("link set cldmy0 up").unwrap();
    "cldmy0"
}

#[test]
fn failed_first_start_leaves_nothing_behind() {
    let bed = Bed::up("fs", 1);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let dummy = add_dummy(lab);
    let text = lab.cidlb_config(pins.0.to_str().unwrap(), "");
    let ifs = format!("interfaces: [{}]", lab.interfaces().join(", "));
    assert!(text.contains(&ifs) && text.contains("xdp_mode: native"));
    lb_lab::write_then_rename(
        &cfg,
        &text.replace(
            &ifs,
            &format!("interfaces: [{}, {dummy}]", lab.interfaces().join(", ")),
        ),
    );
    let (code, err) = run_expecting_failure(lab, &cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("attaching XDP to {dummy} in native mode failed")),
        "{err}"
    );
    assert!(err.contains("nothing is left attached or pinned"), "{err}");
    assert!(
        !pins.0.exists(),
        "pins left behind under {}",
        pins.0.display()
    );
    no_xdp_within_2s(lab);
}

#[test]
fn failed_reload_keeps_the_old_program_and_maps() {
    let bed = Bed::up("rb", 1);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let dummy = add_dummy(lab);
    let good = lab.cidlb_config(pins.0.to_str().unwrap(), "");
    lb_lab::write_then_rename(&cfg, &good);
    let agent = AgentProc::start(lab, &cfg, &["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(1000));
    warm_up(&lab.client.name, 1);
    let progs = xdp_prog_ids(lab);
    assert_eq!(progs.len(), 2, "{progs:?}");
    let maps = config_maps(&pins.0);

    // Adds an interface without native XDP, changes a load-time constant (a new program) and
    // a node's weight (new map contents).
    let ifs = format!("interfaces: [{}]", lab.interfaces().join(", "));
    let bad = good
        .replace(
            &ifs,
            &format!("interfaces: [{}, {dummy}]", lab.interfaces().join(", ")),
        )
        .replace("\"]}\n", "\"], weight: 3}\n")
        + "dtls: {cid_length: 8}\n";
    assert!(bad.contains("weight: 3"), "{bad}");
    lb_lab::write_then_rename(&cfg, &bad);
    agent.signal(libc::SIGHUP);
    let line = agent
        .wait_for("reload rejected", Duration::from_secs(10))
        .expect("the reload must fail");
    assert!(
        line.contains(&format!("attaching XDP to {dummy} in native mode failed")),
        "{line}"
    );
    assert!(line.contains("the running config stays"), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(xdp_prog_ids(lab), progs, "a link runs another program");
    assert_eq!(config_maps(&pins.0), maps, "the maps changed");
    assert_eq!(cid_traffic(lab, 20), 20, "traffic must keep flowing");

    // The agent still applies a good config.
    lb_lab::write_then_rename(&cfg, &good.replace("\"]}\n", "\"], weight: 3}\n"));
    agent.signal(libc::SIGHUP);
    agent
        .wait_for("config reloaded", Duration::from_secs(10))
        .expect("a good reload after the failed one");
    assert_ne!(config_maps(&pins.0)["RING_LEN"], maps["RING_LEN"]);
    let progs = xdp_prog_ids(lab);
    let maps = config_maps(&pins.0);

    // A failure after the maps were written and links swapped: the bridge's link pin is not a
    // link (a map sits there), so swapping it fails after lbc and lbn1 took the new program.
    let bogus = pins.0.join("links").join(dummy);
    lb_lab::run(
        "bpftool",
        &[
            "map",
            "create",
            bogus.to_str().unwrap(),
            "type",
            "array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "bogus",
        ],
    )
    .unwrap();
    lb_lab::write_then_rename(
        &cfg,
        &(good.replace(
            &ifs,
            &format!("interfaces: [{}, {dummy}]", lab.interfaces().join(", ")),
        ) + "dtls: {cid_length: 8}\n"),
    );
    agent.signal(libc::SIGHUP);
    let line = agent
        .wait_for("reload rejected", Duration::from_secs(10))
        .expect("the reload must fail");
    for want in [
        "the running config stays: its maps were written back",
        "rolled back: the 2 link(s) already swapped run the previous program again",
    ] {
        assert!(line.contains(want), "lacks {want:?}: {line}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(xdp_prog_ids(lab), progs, "a link runs another program");
    assert_eq!(config_maps(&pins.0), maps, "the maps were not written back");
    assert_eq!(cid_traffic(lab, 20), 20, "traffic must keep flowing");
    std::fs::remove_file(&bogus).unwrap();
    assert!(agent.terminate().expect("exits").success());
}

/// One GET /metrics from inside the balancer namespace: the body if the answer was 200.
fn try_scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut c =
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))
            .ok()?;
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.starts_with("HTTP/1.1 200 OK\r\n")
        .then(|| s.split_once("\r\n\r\n").unwrap().1.to_owned())
}

#[test]
fn metrics_survive_a_flood_of_idle_connections() {
    const ADDR: &str = "127.0.0.1:9105";
    const IDLE: usize = 1100;
    let bed = Bed::up("mf", 1);
    let (lab, pins, cfg) = (&bed.lab, &bed.pins, bed.cfg.clone());
    let text = lab.cidlb_config(
        pins.0.to_str().unwrap(),
        &format!("stats: {{prometheus: \"{ADDR}\"}}\n"),
    );
    lb_lab::write_then_rename(&cfg, &text);
    let agent = AgentProc::start(lab, &cfg, &["--detach-on-exit"]);
    // The agent as systemd starts it: a soft limit of 1024 descriptors.
    let limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: prlimit on our own child with a valid rlimit; the old limit is not read.
    let rc = unsafe {
        libc::prlimit(
            agent.child.0.id() as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // This process holds the idle connections: room for them.
    let mut mine = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut mine), 0);
        mine.rlim_cur = mine.rlim_max.min(8192);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &mine), 0);
    }
    assert!(
        mine.rlim_cur as usize > IDLE + 100,
        "hard limit too low: {}",
        mine.rlim_max
    );
    assert!(
        try_scrape_in(lab, ADDR, Duration::from_secs(5)).is_some(),
        "no /metrics before the flood"
    );

    let name = lab.balancer.name.clone();
    let (scrape, opened) = std::thread::spawn(move || {
        lb_lab::enter(&name);
        let mut idle = Vec::new();
        for _ in 0..IDLE {
            if let Ok(c) = std::net::TcpStream::connect_timeout(
                &ADDR.parse().unwrap(),
                Duration::from_millis(500),
            ) {
                idle.push(c);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        // With every idle connection still open, a scrape gets through within a few seconds.
        let t0 = Instant::now();
        let mut body = None;
        while body.is_none() && t0.elapsed() < Duration::from_secs(6) {
            body = try_scrape(ADDR);
            if body.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let opened = idle.len();
        drop(idle);
        (body.map(|b| (b, t0.elapsed())), opened)
    })
    .join()
    .unwrap();
    assert!(opened > 1000, "only {opened} connections opened");
    let (body, took) =
        scrape.expect("no /metrics answer within 6 s while the idle connections stay open");
    eprintln!("scrape answered after {took:?} with {opened} idle connections open");
    assert!(
        body.contains("cidlb_packets_total{reason=\"packets_seen\"}"),
        "{body}"
    );
    assert!(
        body.contains("\ncidlb_flows ") && body.contains("\ncidlb_flows_age_seconds "),
        "{body}"
    );
    // The agent's own loop is alive: it reloads.
    agent.signal(libc::SIGHUP);
    agent
        .wait_for("config reloaded", Duration::from_secs(10))
        .expect("the agent must still reload");
    assert!(
        try_scrape_in(lab, ADDR, Duration::from_secs(5)).is_some(),
        "no /metrics after the flood"
    );
    assert!(agent.terminate().expect("exits").success());
}

/// [`try_scrape`] from the balancer namespace, retried until `within`.
fn try_scrape_in(lab: &Lab, addr: &'static str, within: Duration) -> Option<String> {
    let name = lab.balancer.name.clone();
    std::thread::spawn(move || {
        lb_lab::enter(&name);
        let t0 = Instant::now();
        loop {
            if let Some(b) = try_scrape(addr) {
                return Some(b);
            }
            if t0.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .join()
    .unwrap()
}

/// The local port of this process's UDP socket connected to 127.0.0.1:`to`, from /proc.
fn probe_source_port(to: u16) -> Option<u16> {
    let want = format!("0100007F:{to:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .ok()?
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&want.as_str()))
                .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
                .flatten()
        })
}

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends, from `from` (a loopback address), an ICMP port unreachable about a UDP datagram
/// 127.0.0.1:`sport` → 127.0.0.1:`dport`.
fn forge_port_unreachable(from: [u8; 4], sport: u16, dport: u16) {
    let mut inner = vec![
        0x45, 0, 0, 36, 0, 1, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
    ];
    let c = csum(&inner);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    inner.extend_from_slice(&sport.to_be_bytes());
    inner.extend_from_slice(&dport.to_be_bytes());
    inner.extend_from_slice(&[0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&inner);
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let sin = |a: [u8; 4]| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a),
        },
        sin_zero: [0; 8],
    };
    let (src, dst) = (sin(from), sin([127, 0, 0, 1]));
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a raw ICMP socket we own, bound and used with valid sockaddr_in values and a
    // buffer that outlives the call; closed at the end.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        assert_eq!(libc::bind(fd, (&raw const src).cast(), len), 0);
        let n = libc::sendto(
            fd,
            icmp.as_ptr().cast(),
            icmp.len(),
            0,
            (&raw const dst).cast(),
            len,
        );
        assert_eq!(
            n as usize,
            icmp.len(),
            "{}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

/// One UDP probe of a silent 127.0.0.1 port while ICMP port unreachables about it arrive from
/// `from`: the probe's verdict.
fn probe_under_forged_icmp(from: [u8; 4]) -> bool {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let forger = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            if let Some(sport) = probe_source_port(port).filter(|p| *p != port) {
                forge_port_unreachable(from, sport, port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let alive = rt.block_on(cidlb::health::probe(
        cidlb::config::Probe::Udp,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(1000),
    ));
    forger.join().unwrap();
    alive
}

#[test]
fn health_probe_ignores_port_unreachable_from_elsewhere() {
    common::require_root();
    // From the probed address itself: the node says nothing listens. Down.
    assert!(
        !probe_under_forged_icmp([127, 0, 0, 1]),
        "a port unreachable from the node itself must fail the probe"
    );
    // The same message from another address (off the node): forged or misrouted. Ignored;
    // the port stays silent, so the node counts as alive.
    assert!(
        probe_under_forged_icmp([127, 0, 0, 5]),
        "a port unreachable from another address failed the probe"
    );
}
