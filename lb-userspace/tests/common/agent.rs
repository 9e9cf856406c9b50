//! `cidlb run` as a child process in a lab's balancer namespace.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_lab::{ChildGuard, Lab};

/// Removes a pinned datapath when dropped (after the test, whatever happened).
pub struct PinGuard(pub PathBuf);

impl PinGuard {
    /// A pin directory unique to this test process and tag.
    pub fn new(tag: &str) -> Self {
        assert!(
            cidlb::datapath::is_bpffs(Path::new("/sys/fs/bpf")),
            "/sys/fs/bpf is not mounted (cargo xtask test mounts it)"
        );
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/cidlb-test-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        cidlb::datapath::detach(&self.0);
    }
}

pub struct AgentProc {
    pub child: ChildGuard,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub history: std::cell::RefCell<Vec<String>>,
}

impl AgentProc {
    /// Starts `cidlb run --config CONFIG ARGS` in the balancer namespace (nsenter keeps the
    /// host's /sys/fs/bpf) and waits until it reports running.
    pub fn start(lab: &Lab, config: &Path, args: &[&str]) -> Self {
        let mut child = lab
            .balancer
            .nsenter(env!("CARGO_BIN_EXE_cidlb"))
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cidlb");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().expect("stderr piped");
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[cidlb] {line}");
                let _ = tx.send(line);
            }
        });
        let agent = AgentProc {
            child: ChildGuard(child),
            lines: rx,
            history: Default::default(),
        };
        agent
            .wait_for("cidlb running", Duration::from_secs(20))
            .expect("cidlb did not report running within 20 s");
        agent
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.history.borrow_mut().push(l.clone());
                    if l.contains(needle) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Has a line containing `needle` been read already?
    pub fn saw(&self, needle: &str) -> bool {
        self.history.borrow().iter().any(|l| l.contains(needle))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.0.id() as i32, sig) };
    }

    /// kill -9: no cleanup of any kind.
    pub fn kill9(mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    pub fn terminate(mut self) -> Option<ExitStatus> {
        self.child.terminate(10)
    }
}

/// Runs `cidlb` (not `run`) and returns its stdout, panicking on failure.
pub fn cidlb(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_cidlb"))
        .args(args)
        .output()
        .expect("spawn cidlb");
    assert!(
        o.status.success(),
        "cidlb {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A counter from `cidlb stats --json` output.
pub fn json_counter(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} missing in {json}"))
        + key.len();
    json[at..]
        .split([',', '}'])
        .next()
        .unwrap()
        .parse()
        .unwrap()
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
        crate::common::require_root();
        let lab = Lab::up(&lb_lab::unique_prefix(tag), nodes).unwrap_or_else(|e| panic!("{e}"));
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
}
