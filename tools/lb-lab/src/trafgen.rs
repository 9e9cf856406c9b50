//! trafgen (netsniff-ng, not part of cidlb) as the lab drives it: the send-buffer shim it needs
//! inside a netns, and a child guard that stops it and the worker it forks. Shared by
//! `cargo xtask bench` (throughput) and the flood tests.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::NetNs;

/// An LD_PRELOAD shim that gives trafgen's AF_PACKET socket a large send buffer. Inside a
/// netns the wmem sysctls trafgen would raise are read-only, and with the default buffer a
/// backed-up veth ring makes it abort ("Flushing TX_RING failed: Resource temporarily
/// unavailable"). Built with the system C compiler.
const SNDBUF_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/socket.h>
int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real(domain, type, protocol);
    if (fd >= 0 && domain == 17 /* AF_PACKET */) {
        int size = 64 << 20;
        setsockopt(fd, SOL_SOCKET, 32 /* SO_SNDBUFFORCE */, &size, sizeof size);
    }
    return fd;
}
"#;

/// Compiles the shim into `dir/sndbuf.so`.
pub fn build_shim(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("sndbuf.c");
    let lib = dir.join("sndbuf.so");
    std::fs::write(&src, SNDBUF_SHIM).map_err(|e| format!("{}: {e}", src.display()))?;
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .status()
        .map_err(|e| format!("running cc for the trafgen send-buffer shim: {e}"))?;
    if !st.success() {
        return Err("compiling the trafgen send-buffer shim failed".into());
    }
    Ok(lib)
}

/// A running trafgen; dropping it stops it.
pub struct Trafgen {
    child: Option<Child>,
    err: PathBuf,
}

impl Trafgen {
    /// Starts `trafgen --dev DEV --conf CONF --cpus 1 ARGS` in `ns`, on CPU `cpu`, with the
    /// shim; its stderr goes to `err`.
    pub fn start(
        ns: &NetNs,
        dev: &str,
        conf: &Path,
        shim: &Path,
        cpu: usize,
        args: &[&str],
        err: &Path,
    ) -> Result<Self, String> {
        let errf = std::fs::File::create(err).map_err(|e| format!("{}: {e}", err.display()))?;
        let child = Command::new("taskset")
            .args(["-c", &cpu.to_string(), "ip", "netns", "exec", &ns.name])
            .args(["trafgen", "--dev", dev, "--conf"])
            .arg(conf)
            .args(["--cpus", "1", "-Q", "-C"])
            .args(args)
            .env("LD_PRELOAD", shim)
            .stdout(Stdio::null())
            .stderr(errf)
            .spawn()
            .map_err(|e| format!("starting trafgen in netns {}: {e}", ns.name))?;
        Ok(Self {
            child: Some(child),
            err: err.to_owned(),
        })
    }

    /// Waits up to `timeout` for a trafgen started with `-n` to finish (stops it after
    /// that); returns whether it exited successfully in time, and its stderr.
    pub fn wait(mut self, timeout: std::time::Duration) -> (bool, String) {
        let deadline = std::time::Instant::now() + timeout;
        let mut ok = false;
        if let Some(child) = self.child.as_mut() {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(st)) = child.try_wait() {
                    ok = st.success();
                    self.child = None;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        self.kill();
        (ok, std::fs::read_to_string(&self.err).unwrap_or_default())
    }

    /// Is it still sending?
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops trafgen and the worker it forks (SIGKILL to both); returns what it printed.
    pub fn stop(mut self) -> String {
        self.kill();
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        for c in children_of(pid) {
            for g in children_of(c) {
                // SAFETY: signalling a process this guard started (trafgen's worker).
                unsafe { libc::kill(g, libc::SIGKILL) };
            }
            // SAFETY: as above (`ip netns exec` execs trafgen, which forks its worker).
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Trafgen {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pids whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .ok()
                        .and_then(|st| {
                            st.rsplit(')')
                                .next()
                                .and_then(|rest| rest.split_whitespace().nth(1))
                                .and_then(|v| v.parse::<i32>().ok())
                        })
                        == Some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A trafgen packet config: IPv4 UDP frames to `dst:dport` carrying `payload`, each from a
/// random source address in 10.0.0.0/8 (24 random bits per packet: N packets come from about
/// N - N²/2²⁵ distinct sources) and a random source port, IP checksum computed per packet, UDP
/// checksum 0 (none, valid for IPv4).
pub fn spoofed_udp_flood(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    dst: std::net::Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> String {
    let hex = |b: &[u8]| -> String {
        b.iter()
            .map(|x| format!("{x:#04x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let udp_len = (8 + payload.len()) as u16;
    let ip_len = 20 + udp_len;
    let d = dst.octets();
    format!(
        "{{\n  {}, {}, 0x08, 0x00,\n  0x45, 0x00, {}, 0x00, 0x00, 0x40, 0x00, 64, 17, csumip(14, 33),\n  \
         10, drnd(), drnd(), drnd(),\n  {},\n  drnd(), drnd(), {}, {}, 0x00, 0x00,\n  {}\n}}\n",
        hex(&dst_mac),
        hex(&src_mac),
        hex(&ip_len.to_be_bytes()),
        hex(&d),
        hex(&dport.to_be_bytes()),
        hex(&udp_len.to_be_bytes()),
        hex(payload),
    )
}
