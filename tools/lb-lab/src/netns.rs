//! Network namespaces made by this process, deleted when their guard drops.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Output},
};

/// A namespace this code created. Deleted on drop unless [`NetNs::keep`] was called.
pub struct NetNs {
    pub name: String,
    keep: bool,
}

impl NetNs {
    /// Creates the namespace `name` (fails if it exists: never adopt one we did not make).
    pub fn named(name: &str) -> Result<Self, String> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
            keep: false,
        };
        ns.ip("link set lo up")?;
        // No duplicate address detection in a lab: link-local and global addresses are usable
        // at once, so neighbour discovery does not stall the first packets.
        for k in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            ns.sysctl(k)?;
        }
        Ok(ns)
    }

    /// Creates a namespace with a unique name (see [`crate::unique_prefix`]).
    pub fn new(tag: &str) -> Self {
        Self::named(&crate::unique_prefix(tag)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// `ip -n NAME <args>`.
    pub fn ip(&self, args: &str) -> Result<(), String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(args.split_whitespace());
        run("ip", &v).map(|_| ())
    }

    /// A command that runs inside the namespace (`ip netns exec`, which also gives it the
    /// namespace's own /sys; use [`NetNs::nsenter`] for a command that must see /sys/fs/bpf).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command that runs inside the namespace but keeps the host's mounts (/sys/fs/bpf).
    pub fn nsenter(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        c
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

    /// Runs a command inside the namespace; its stdout, or what went wrong.
    pub fn must(&self, cmd: &[&str]) -> Result<String, String> {
        let out = self.exec(cmd);
        if !out.status.success() {
            return Err(format!(
                "in netns {}: {cmd:?} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The MAC address of interface `dev` in the namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6], String> {
        let text = self.must(&["cat", &format!("/sys/class/net/{dev}/address")])?;
        let bytes: Result<Vec<u8>, _> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect();
        bytes
            .ok()
            .and_then(|v| <[u8; 6]>::try_from(v).ok())
            .ok_or_else(|| format!("in netns {}: {dev} has no MAC address: {text:?}", self.name))
    }

    pub fn sysctl(&self, kv: &str) -> Result<(), String> {
        self.must(&["sysctl", "-q", "-w", kv]).map(|_| ())
    }

    /// Moves the calling thread into the namespace (for sockets, ifindexes and BPF calls that
    /// act on the caller's namespace). Use a thread of its own.
    pub fn enter(&self) {
        enter(&self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.keep {
            // Interfaces inside go with the namespace.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }
}

/// Moves the calling thread into namespace `name`.
pub fn enter(name: &str) {
    let f = File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("open netns {name}: {e}"));
    // SAFETY: valid fd; CLONE_NEWNET affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// Runs a command; its stdout, or its stderr as the error.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("spawn {cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process killed (and reaped) when the guard drops.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Sends SIGTERM and waits up to `secs` for a clean exit; kills it after that.
    pub fn terminate(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pins the calling thread to one CPU, so per-CPU state (round-robin cursors, counters) is the
/// same from one BPF_PROG_TEST_RUN to the next.
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
