//! `cidlb run` as a child process in a lab namespace: the one "start cidlb and wait until it is
//! ready" of the tree, shared by the tests, `cargo xtask demo` and the bench.
//!
//! The agent is started with `nsenter --net` (not `ip netns exec`, which mounts a fresh /sys and
//! so hides the host's /sys/fs/bpf where the datapath is pinned) and `--ready-file`. Readiness
//! is that file appearing with the child's pid in it, not a log line. The binary is a parameter:
//! tests pass `env!("CARGO_BIN_EXE_cidlb")`, the demo and the bench their release build.

use std::{
    cell::RefCell,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{ChildGuard, NetNs};

/// How long [`Agent::start`] waits for the ready file by default. Creating a 16M-entry flow
/// table takes seconds; a verifier rejection or a bad config ends the wait at once (the child
/// exits).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Removes a pinned datapath when dropped (after the test, whatever happened): unlinking the
/// pinned bpf_links detaches the program, unlinking the maps frees them once nothing holds them.
pub struct PinGuard(pub PathBuf);

impl PinGuard {
    /// A pin directory under /sys/fs/bpf unique to this process and tag. Panics (a test needs
    /// it) if bpffs is not mounted there.
    pub fn new(tag: &str) -> Self {
        assert!(
            bpffs_mounted(),
            "/sys/fs/bpf is not mounted: `mount -t bpf bpf /sys/fs/bpf` (cargo xtask test mounts it)"
        );
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/cidlb-test-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Is a bpf filesystem mounted at /sys/fs/bpf?
pub fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
        })
    })
}

/// Where the agent's log goes besides [`Agent::wait_for`].
#[derive(Clone, Debug, Default)]
pub struct LogTo {
    /// Echo every line to stderr with this prefix (tests: shown when a test fails).
    pub stderr_prefix: Option<String>,
    /// Append every line to this file (the demo's target/demo/cidlb.log).
    pub file: Option<PathBuf>,
}

/// A running `cidlb run`, killed (and reaped) when dropped.
pub struct Agent {
    pub child: ChildGuard,
    lines: mpsc::Receiver<String>,
    /// Every log line read so far.
    pub history: RefCell<Vec<String>>,
    /// The `--ready-file` this agent was given.
    pub ready_file: PathBuf,
    /// From spawn to the ready file.
    pub start_time: Duration,
}

fn ready_path() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "cidlb-ready-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Agent {
    /// Starts `BIN run ARGS --config CONFIG --ready-file F` in `ns` and waits (up to
    /// [`READY_TIMEOUT`]) until F holds the child's pid. Fails with the log's last lines if the
    /// child exits first or the time runs out.
    pub fn start(
        bin: &Path,
        ns: &NetNs,
        config: &Path,
        args: &[&str],
        log: &LogTo,
    ) -> Result<Self, String> {
        Self::start_within(bin, ns, config, args, log, READY_TIMEOUT)
    }

    /// [`Agent::start`] with another timeout.
    pub fn start_within(
        bin: &Path,
        ns: &NetNs,
        config: &Path,
        args: &[&str],
        log: &LogTo,
        timeout: Duration,
    ) -> Result<Self, String> {
        let ready_file = ready_path();
        // Never mistake an earlier agent's file for this one's readiness.
        let _ = std::fs::remove_file(&ready_file);
        let started = Instant::now();
        let mut child = ns
            .nsenter(bin.to_str().ok_or("cidlb path is not UTF-8")?)
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_file)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {} in netns {}: {e}", bin.display(), ns.name))?;
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().expect("stderr piped");
        let log = log.clone();
        std::thread::spawn(move || {
            let mut file = log.file.as_ref().and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            });
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(p) = &log.stderr_prefix {
                    eprintln!("{p}{line}");
                }
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child: ChildGuard(child),
            lines: rx,
            history: Default::default(),
            ready_file,
            start_time: Duration::ZERO,
        };
        let deadline = started + timeout;
        loop {
            agent.drain();
            if agent.is_ready() {
                agent.start_time = started.elapsed();
                return Ok(agent);
            }
            if let Ok(Some(status)) = agent.child.0.try_wait() {
                // Let the reader thread deliver the last lines (the error) first.
                std::thread::sleep(Duration::from_millis(100));
                agent.drain();
                return Err(format!(
                    "cidlb run exited with {status} before it was ready; its log:\n{}",
                    agent.tail(20)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "cidlb run not ready within {timeout:?} (no ready file {}); its log:\n{}",
                    agent.ready_file.display(),
                    agent.tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Does the ready file exist and name this agent's pid?
    pub fn is_ready(&self) -> bool {
        let want = format!("pid={}", self.child.0.id());
        std::fs::read_to_string(&self.ready_file).is_ok_and(|t| t.lines().any(|l| l == want))
    }

    fn drain(&self) {
        while let Ok(l) = self.lines.try_recv() {
            self.history.borrow_mut().push(l);
        }
    }

    /// The last `n` log lines read so far.
    pub fn tail(&self, n: usize) -> String {
        let h = self.history.borrow();
        h[h.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for a log line containing `needle` (lines already read are not searched: see
    /// [`Agent::saw`]).
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

    /// Has the agent logged a line containing `needle`? Lines written before the ready file
    /// may still be on their way through the pipe when [`Agent::start`] returns, so a line not
    /// read yet is waited for briefly.
    pub fn saw(&self, needle: &str) -> bool {
        self.drain();
        self.history.borrow().iter().any(|l| l.contains(needle))
            || self.wait_for(needle, Duration::from_secs(1)).is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.0.id() as i32, sig) };
    }

    /// kill -9: no cleanup of any kind by the agent (its ready file stays, as after a crash;
    /// the harness then removes it so nothing is left in /tmp).
    pub fn kill9(mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let _ = std::fs::remove_file(&self.ready_file);
    }

    /// SIGTERM, then up to 10 s for a clean exit; `None` if it had to be killed.
    pub fn terminate(mut self) -> Option<ExitStatus> {
        self.child.terminate(10)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A child still running here is killed next (ChildGuard): its ready file is ours to
        // remove. One that exited (terminate) keeps whatever it left, for the caller to check.
        if matches!(self.child.0.try_wait(), Ok(None)) {
            let _ = std::fs::remove_file(&self.ready_file);
        }
    }
}

/// Runs `BIN ARGS` (not `run`) on the host; its stdout, or what went wrong.
pub fn cidlb(bin: &Path, args: &[&str]) -> Result<String, String> {
    let o = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    if !o.status.success() {
        return Err(format!(
            "cidlb {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `cidlb stats --json --pin-dir PIN_DIR`, parsed: `{"counters": {name: n}, "nodes": {id: {..}}}`.
pub fn stats(bin: &Path, pin_dir: &Path) -> Result<Value, String> {
    let pin = pin_dir.to_str().ok_or("pin dir is not UTF-8")?;
    let out = cidlb(bin, &["stats", "--json", "--pin-dir", pin])?;
    serde_json::from_str(&out).map_err(|e| format!("cidlb stats --json gave bad JSON ({e}): {out}"))
}

/// A counter of [`stats`]' output; `None` if the output has no such counter.
pub fn counter(stats: &Value, name: &str) -> Option<u64> {
    stats["counters"][name].as_u64()
}
