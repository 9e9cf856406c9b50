//! `deploy/` cannot rot: the Prometheus rules pass `promtool check rules` and their own
//! `promtool test rules` cases, and every cidlb metric (and `reason` label value) the Grafana
//! dashboard and the rules name is one the agent's `/metrics` really exports.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use cidlb::{
    config::{NodeState, Probe},
    health::Tracker,
    metrics::{render, View},
    stats::Snapshot,
};
use lb_common::Counter;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) {
    let dir = deploy().join("prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (Debian package `prometheus`; `cargo xtask setup` installs it)")
        });
    assert!(
        out.status.success(),
        "promtool {args:?} in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_tests() {
    promtool(&["check", "rules", "cidlb.rules.yml"]);
    promtool(&["test", "rules", "cidlb.rules.test.yml"]);
}

/// Everything the agent's `/metrics` can show: every family (health probes on, flows counted)
/// with every counter as a `reason`.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut snap = Snapshot::default();
    for &c in Counter::ALL {
        snap.counters.push((c, 0));
    }
    snap.nodes.insert(1, lb_common::NodeStats::default());
    let mut health = Tracker::new(3, 2);
    health.retain(&[1], 3, 2);
    let view = View {
        pin_dir: PathBuf::new(),
        nodes: vec![(1, NodeState::Active)],
        probe: Probe::Dtls,
        health,
        flow_capacity: 1024,
        ready: vec![("192.0.2.10".parse().unwrap(), true)],
        families: vec![(1, true, true)],
        panic: [false; 2],
        panic_entered: [0; 2],
    };
    let text = render(&view, &snap, Some((1, Duration::from_secs(1))));
    let families = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let reasons = Counter::ALL.iter().map(|c| c.name().to_owned()).collect();
    (families, reasons)
}

/// `cidlb_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("cidlb_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// `reason="x"` literals in a PromQL expression.
fn reason_literals(expr: &str) -> Vec<String> {
    expr.split("reason=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_owned())
        .collect()
}

fn json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" || k == "query" || k == "definition" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_owned());
                    }
                }
                json_exprs(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn dashboard_and_rules_name_only_metrics_the_agent_exports() {
    let (families, reasons) = exported();
    assert!(families.contains("cidlb_ready"), "{families:?}");

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/cidlb.json")).unwrap(),
    )
    .expect("dashboard is JSON");
    let mut dash_exprs = Vec::new();
    json_exprs(&dash, &mut dash_exprs);

    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy().join("prometheus/cidlb.rules.yml")).unwrap(),
    )
    .expect("rules are YAML");
    let rule_exprs: Vec<String> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| {
            r["expr"]
                .as_str()
                .expect("every rule has an expr")
                .to_owned()
        })
        .collect();

    let mut used = BTreeSet::new();
    let mut bad = Vec::new();
    for (file, exprs) in [
        ("grafana/cidlb.json", &dash_exprs),
        ("prometheus/cidlb.rules.yml", &rule_exprs),
    ] {
        assert!(!exprs.is_empty(), "{file}: no expressions found");
        for e in exprs {
            for m in metric_names(e) {
                if !families.contains(&m) {
                    bad.push(format!("{file}: {m} is not exported (in {e:?})"));
                }
                used.insert((file, m));
            }
            for r in reason_literals(e) {
                if !reasons.contains(&r) {
                    bad.push(format!("{file}: reason {r:?} is not a counter (in {e:?})"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "deploy/ drifted from /metrics:\n{}",
        bad.join("\n")
    );
    // The dashboard covers what the issue asks: per-node traffic, per-reason drops, flows,
    // health, readiness.
    for m in [
        "cidlb_node_packets_total",
        "cidlb_packets_total",
        "cidlb_flows",
        "cidlb_node_up",
        "cidlb_ready",
    ] {
        assert!(
            used.contains(&("grafana/cidlb.json", m.to_owned())),
            "the dashboard does not show {m}"
        );
    }
}
