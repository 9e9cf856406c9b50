//! The README's quick start, run as it is written, in the netns lab: its config
//! (`docs/quickstart.yaml`, with the lab's interfaces and node addresses for the example's,
//! and a pin directory of the test's own), then each line of its command block, in the
//! balancer's namespace, with the config's path for `/etc/cidlb/cidlb.yaml`. Real DTLS 1.2
//! and 1.3 clients with CIDs (lb-testpeer) talk to the VIP meanwhile, and what README says the
//! commands show is checked: `cidlb check` exits 0, `cidlb run` forwards, `cidlb stats --watch`
//! shows `cid_routed` growing, `cidlb explain` names node 1, and Ctrl-C (SIGINT) takes the
//! datapath off again.

mod common;

use std::{
    io::Read,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::agent::{bin, lab_up, PinGuard};
use lb_lab::{node4, peer, ChildGuard, VIP4};

const README: &str = include_str!("../../README.md");
const CONFIG: &str = include_str!("../../docs/quickstart.yaml");
/// lb-testpeer's DTLS 1.3 backend (wolfSSL).
const DTLS13: &[&str] = &["--dtls", "1.3"];

/// The body of README's fenced block between `<!-- {marker}` and `<!-- end {marker} -->`.
fn block(marker: &str) -> &'static str {
    let (_, after) = README
        .split_once(&format!("<!-- {marker}"))
        .unwrap_or_else(|| panic!("README has no `<!-- {marker}` marker"));
    let (inside, _) = after
        .split_once(&format!("<!-- end {marker} -->"))
        .unwrap_or_else(|| panic!("README has no `<!-- end {marker} -->`"));
    let body = inside.split_once("```").map_or("", |(_, b)| b);
    let body = body.split_once('\n').map_or("", |(_, b)| b);
    body.rsplit_once("```").map_or("", |(b, _)| b)
}

/// `text` with `from` replaced, which must be there.
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the quick start no longer has {from:?}"
    );
    text.replacen(from, to, 1)
}

/// A command line of the block, its comment cut off, as words.
fn words(line: &str, config: &Path) -> Vec<String> {
    let command = line.split(" #").next().unwrap_or("").trim();
    command
        .split_whitespace()
        .map(|w| match w {
            "/etc/cidlb/cidlb.yaml" => config.display().to_string(),
            "cidlb" => bin().display().to_string(),
            w => w.to_owned(),
        })
        .collect()
}

/// `argv` in the balancer's namespace (nsenter: it keeps the host's /sys/fs/bpf).
fn on_balancer(lab: &lb_lab::Lab, argv: &[String]) -> Command {
    let mut c = lab.balancer.nsenter(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// What `child` printed on stdout within `span`; then it is killed.
fn output_for(mut child: Child, span: Duration) -> String {
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    std::thread::sleep(span);
    let _ = child.kill();
    let _ = child.wait();
    reader.join().expect("reader")
}

/// README shows docs/quickstart.yaml as it is, and `cidlb check`'s validation takes it without
/// a warning. (No root needed.)
#[test]
fn the_readme_quick_start_config_is_the_checked_file() {
    assert_eq!(
        block("quickstart.yaml"),
        CONFIG,
        "README's quick start config differs from docs/quickstart.yaml"
    );
    let cfg = cidlb::config::Config::parse(CONFIG, Path::new("docs/quickstart.yaml"))
        .unwrap_or_else(|e| panic!("cidlb check refuses the quick start: {e}"));
    assert_eq!(cfg.warnings(), Vec::<String>::new());
}

#[test]
fn the_readme_quick_start_runs_as_written() {
    let lab = lab_up("qs", 2);
    let pins = PinGuard::new("qs");
    let dir = std::env::temp_dir().join(format!("cidlb-qs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cidlb.yaml");
    let mut text = swap(
        CONFIG,
        "interfaces: [eth0]",
        &format!("interfaces: [{}]", lab.interfaces().join(", ")),
    );
    text = swap(&text, "address: 192.0.2.10", &format!("address: {VIP4}"));
    text = swap(&text, "203.0.113.11", &node4(1).to_string());
    text = swap(&text, "203.0.113.12", &node4(2).to_string());
    text.push_str(&format!("pin_dir: {}\n", pins.0.display()));
    std::fs::write(&config, &text).unwrap();
    let lines: Vec<&str> = block("quickstart commands")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut agent: Option<ChildGuard> = None;
    let mut ran = Vec::new();
    for line in lines {
        let argv = words(line, &config);
        let what = argv.get(1).cloned().unwrap_or_default();
        ran.push(format!(
            "{} {what}",
            line.split_whitespace().next().unwrap_or("")
        ));
        match (line.split_whitespace().next(), what.as_str()) {
            (Some("sysctl"), _) | (Some("cidlb"), "check") => {
                let out = on_balancer(&lab, &argv).output().expect("spawn");
                assert!(
                    out.status.success(),
                    "`{line}`: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            (Some("cidlb"), "run") => {
                agent = Some(ChildGuard(
                    on_balancer(&lab, &argv).spawn().expect("spawn cidlb run"),
                ));
                // Up once its links are pinned (the README's reader sees its log say so).
                let deadline = Instant::now() + Duration::from_secs(30);
                while !pins.0.join("links").is_dir() {
                    assert!(
                        Instant::now() < deadline,
                        "`{line}`: no links pinned in 30 s"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            (Some("cidlb"), "stats") => {
                // DTLS 1.2 and 1.3 CID sessions that rebind, while stats watches.
                let watch = on_balancer(&lab, &argv)
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn cidlb stats");
                // The VIP's one port: DTLS 1.2 servers (Mbed TLS) on the nodes, then 1.3
                // ones (wolfSSL).
                for dtls in [&[][..], DTLS13] {
                    let _servers: Vec<_> = (1..=2u32)
                        .map(|k| {
                            let n = &lab.nodes[k as usize - 1];
                            peer::server(&common::testpeer(), n, k, dtls, None)
                        })
                        .collect::<Result<_, _>>()
                        .unwrap_or_else(|e| panic!("{e}"));
                    let server = format!("{VIP4}:{}", lb_lab::PORT);
                    let mut args =
                        vec!["--sessions", "4", "--messages", "6", "--rebind-every", "2"];
                    args.extend(dtls);
                    let run = peer::client(&common::testpeer(), &lab.client, &server, &args)
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert!(run.ok, "{server} {dtls:?}: {:#}", run.summary);
                    assert!(run.misrouted().is_empty(), "{:?}", run.misrouted());
                }
                let shown = output_for(watch, Duration::from_millis(1500));
                let cid_routed = shown
                    .lines()
                    .rev()
                    .find_map(|l| {
                        let mut w = l.split_whitespace();
                        (w.next() == Some("cid_routed")).then(|| w.next()?.parse::<u64>().ok())?
                    })
                    .unwrap_or_else(|| panic!("`{line}` shows no cid_routed:\n{shown}"));
                assert!(cid_routed >= 24, "`{line}`:\n{shown}");
            }
            (Some("cidlb"), "explain") => {
                let out = on_balancer(&lab, &argv).output().expect("spawn");
                let said = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "`{line}`: {said}");
                assert!(
                    said.lines()
                        .any(|l| l.starts_with("node:") && l.ends_with(" 1 (sent to it)")),
                    "`{line}` does not send it to node 1:\n{said}"
                );
            }
            _ => panic!("the quick start has a command this test does not know: `{line}`"),
        }
    }
    assert_eq!(
        ran,
        [
            "sysctl -w",
            "cidlb check",
            "cidlb run",
            "cidlb stats",
            "cidlb explain"
        ],
        "the quick start's commands changed: teach this test the new ones"
    );
    // Ctrl-C: with --detach-on-exit the datapath comes off.
    let mut agent = agent.expect("cidlb run started");
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGINT) };
    let status = agent.0.wait().expect("wait for cidlb run");
    assert!(status.success(), "cidlb run after Ctrl-C: {status}");
    assert!(
        !pins.0.join("links").exists(),
        "links still pinned after Ctrl-C"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
