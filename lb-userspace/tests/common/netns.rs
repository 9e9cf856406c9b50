//! Network namespaces made by a test and deleted when the guard drops.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A namespace named `cl<tag><pid>x<seq>`: unique per test and process, removed on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "cl{tag}{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n NAME <args>`, panicking with ip's message on failure.
    pub fn ip(&self, args: &str) {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(args.split_whitespace());
        run("ip", &v);
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend_from_slice(cmd);
        Command::new("ip")
            .args(&v)
            .output()
            .expect("spawn ip netns exec")
    }

    /// Runs a command inside the namespace and panics unless it succeeds.
    pub fn must(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "in netns {}: {cmd:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sysctl(&self, kv: &str) {
        self.must(&["sysctl", "-q", "-w", kv]);
    }

    /// Moves the calling thread into the namespace (for socket, ifindex and BPF calls that act
    /// on the caller's namespace). Use it on a thread of its own.
    pub fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        // SAFETY: valid fd; CLONE_NEWNET affects only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Interfaces inside go with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pins the calling thread to one CPU, so per-CPU state (round-robin cursors, counters) is
/// the same from one BPF_PROG_TEST_RUN to the next.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}
