//! `cidlb run` as a child process in a lab's balancer namespace: this test build's `cidlb`
//! through lb-lab's harness (`lb_lab::agent`), which the demo and the bench share.

use std::{
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::ExitStatus,
};

use lb_lab::{
    agent::{Agent, LogTo},
    Lab,
};

pub use lb_lab::agent::PinGuard;

/// The `cidlb` under test: this test build's, or `CIDLB_BIN` when set (`cargo xtask test`
/// runs `netns_forwarding` once more against the installed package's `/usr/bin/cidlb`).
pub fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("CIDLB_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cidlb")))
    })
}

/// A running `cidlb run` (see [`lb_lab::agent::Agent`], which it derefs to).
pub struct AgentProc(pub Agent);

impl Deref for AgentProc {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        &self.0
    }
}

impl DerefMut for AgentProc {
    fn deref_mut(&mut self) -> &mut Agent {
        &mut self.0
    }
}

impl AgentProc {
    /// Starts `cidlb run --config CONFIG ARGS` in the balancer namespace and waits until its
    /// ready file appears; its log goes to stderr prefixed `[cidlb]`.
    pub fn start(lab: &Lab, config: &Path, args: &[&str]) -> Self {
        let log = LogTo {
            stderr_prefix: Some("[cidlb] ".into()),
            file: None,
        };
        Self(
            Agent::start(bin(), &lab.balancer, config, args, &log)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// kill -9: no cleanup of any kind.
    pub fn kill9(self) {
        self.0.kill9()
    }

    pub fn terminate(self) -> Option<ExitStatus> {
        self.0.terminate()
    }
}

/// Runs `cidlb` (not `run`) and returns its stdout, panicking on failure.
pub fn cidlb(args: &[&str]) -> String {
    lb_lab::agent::cidlb(bin(), args).unwrap_or_else(|e| panic!("{e}"))
}

/// A counter from `cidlb stats --json` output.
pub fn json_counter(json: &str, name: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("stats JSON ({e}): {json}"));
    lb_lab::agent::counter(&v, name).unwrap_or_else(|| panic!("{name} missing in {json}"))
}

/// A lab with `nodes` nodes, its namespace names unique to this test (`tag`); needs root.
pub fn lab_up(tag: &str, nodes: usize) -> Lab {
    crate::common::require_root();
    Lab::up(&lb_lab::unique_prefix(tag), nodes).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes `lab`'s config ([`Lab::cidlb_config`]) with pins under `pins` and `extra` to `cfg`.
pub fn write_lab_config(lab: &Lab, pins: &PinGuard, cfg: &Path, extra: &str) {
    let text = lab.cidlb_config(&pins.0.display().to_string(), extra);
    std::fs::write(cfg, text).unwrap();
}

/// One test's lab: an echo server on every node, a pin directory and a config path. Fields
/// drop in order: servers, pins, then the namespaces.
pub struct Bed {
    pub echo: Vec<crate::common::traffic::Echo>,
    pub pins: PinGuard,
    pub cfg: PathBuf,
    pub lab: Lab,
}

impl Bed {
    pub fn up(tag: &str, nodes: usize) -> Self {
        let lab = lab_up(tag, nodes);
        let dir = std::env::temp_dir().join(format!("cidlb-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let echo = lab
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| crate::common::traffic::Echo::start(&n.name, i + 1, lb_lab::PORT))
            .collect();
        Bed {
            echo,
            pins: PinGuard::new(tag),
            cfg: dir.join("cidlb.yaml"),
            lab,
        }
    }

    /// Writes the lab's config ([`Lab::cidlb_config`]) with this bed's pins and `extra` to
    /// [`Bed::cfg`].
    pub fn write_config(&self, extra: &str) {
        write_lab_config(&self.lab, &self.pins, &self.cfg, extra);
    }
}

/// `cidlb node ACTION --config CONFIG` in a node's namespace (tunnel mode); panics if it fails.
pub fn node_cmd(node: &lb_lab::NetNs, config: &Path, action: &str) {
    let o = node
        .nsenter(bin().to_str().expect("UTF-8 path"))
        .args(["node", action, "--config"])
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("cidlb node {action}: {e}"));
    assert!(
        o.status.success(),
        "cidlb node {action} in {}: {}",
        node.name,
        String::from_utf8_lossy(&o.stderr)
    );
}
