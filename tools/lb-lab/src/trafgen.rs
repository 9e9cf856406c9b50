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

    /// Gives trafgen and the workers it forked SCHED_FIFO priority `prio`: a real-time thread
    /// has no timer slack, so a rate (`-b`), which trafgen keeps by sleeping between packets,
    /// comes out near what was asked.
    pub fn realtime(&self, prio: i32) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let pid = child.id() as i32;
        let p = libc::sched_param {
            sched_priority: prio,
        };
        for t in std::iter::once(pid)
            .chain(children_of(pid))
            .flat_map(|c| std::iter::once(c).chain(children_of(c)))
        {
            // SAFETY: a plain syscall on a process this guard started.
            unsafe { libc::sched_setscheduler(t, libc::SCHED_FIFO, &p) };
        }
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

/// Where a spoofed flood's packets come from (all in 10.0.0.0/8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spoofed {
    /// A random address in 10.0.0.0/8 and a random port per packet: 24 random bits of
    /// address, so N packets come from about N - N²/2²⁵ distinct sources, and 5-tuples (40
    /// random bits) practically never repeat.
    Random,
    /// [`POOL_SOURCES`] addresses (10.0.0-7.1-125), each sending many 5-tuples, and every
    /// 5-tuple sent `repeat` times in a row, as a blind attacker repeats a tuple to make its
    /// flow look established. Deterministic: one trafgen run sends the same tuples in the same
    /// order every time: run one generator with it (two would send the same tuples).
    Pool { repeat: usize },
}

/// How many source addresses [`Spoofed::Pool`] draws from.
pub const POOL_SOURCES: usize = 8 * 125;

/// How many distinct 5-tuples [`Spoofed::Pool`] sends before its sequence starts over:
/// lcm(8, 125, 256, 253) = 256 × 125 × 253, the periods of its four byte counters (8 divides
/// 256; 125 = 5³, 256 = 2⁸ and 253 = 11 × 23 share no factor). Send at most this many times
/// `repeat` packets, or tuples recur later than their repeats.
pub const POOL_TUPLES: u64 = 256 * 125 * 253;

/// A trafgen packet config: IPv4 UDP frames to `dst:dport` carrying `payload`, from spoofed
/// sources as `from` says, IP checksum computed per packet, UDP checksum 0 (none, valid for
/// IPv4).
///
/// For [`Spoofed::Pool`] the config holds `repeat` identical packet templates. trafgen sends
/// its templates in turn, and each template steps its own `dinc` counters once per packet it
/// sends, so identical templates stay in step and send each tuple `repeat` times in a row.
/// Every counter steps by one per packet: address bytes 3 and 4 run through 8 and 125 values
/// (coprime: 1,000 distinct addresses), the source port's bytes through 256 and 253 (never
/// port 0), so a
/// source sends a new tuple every [`POOL_SOURCES`] tuples and no tuple recurs within
/// [`POOL_TUPLES`].
pub fn spoofed_udp_flood(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    dst: std::net::Ipv4Addr,
    dport: u16,
    payload: &[u8],
    from: Spoofed,
) -> String {
    let hex = |b: &[u8]| -> String {
        b.iter()
            .map(|x| format!("{x:#04x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (src, sport, templates) = match from {
        Spoofed::Random => ("10, drnd(), drnd(), drnd()", "drnd(), drnd()", 1),
        Spoofed::Pool { repeat } => (
            "10, 0, dinc(0, 7), dinc(1, 125)",
            "dinc(0, 0xff), dinc(1, 253)",
            repeat.max(1),
        ),
    };
    let udp_len = (8 + payload.len()) as u16;
    let ip_len = 20 + udp_len;
    let d = dst.octets();
    let template = format!(
        "{{\n  {}, {}, 0x08, 0x00,\n  0x45, 0x00, {}, 0x00, 0x00, 0x40, 0x00, 64, 17, csumip(14, 33),\n  \
         {src},\n  {},\n  {sport}, {}, {}, 0x00, 0x00,\n  {}\n}}\n",
        hex(&dst_mac),
        hex(&src_mac),
        hex(&ip_len.to_be_bytes()),
        hex(&d),
        hex(&dport.to_be_bytes()),
        hex(&udp_len.to_be_bytes()),
        hex(payload),
    );
    template.repeat(templates)
}

#[cfg(test)]
mod tests {
    use super::{spoofed_udp_flood, Spoofed, POOL_SOURCES, POOL_TUPLES};

    fn conf(from: Spoofed) -> String {
        spoofed_udp_flood(
            [2; 6],
            [4; 6],
            crate::VIP4,
            crate::PORT,
            &[0x16, 0xfe],
            from,
        )
    }

    #[test]
    fn a_pool_flood_repeats_one_template_so_tuples_repeat() {
        let text = conf(Spoofed::Pool { repeat: 3 });
        let templates: Vec<&str> = text.split_inclusive("}\n").collect();
        assert_eq!(templates.len(), 3, "{text}");
        assert!(templates.iter().all(|t| *t == templates[0]), "{text}");
        // Counters only: a random byte would make the copies differ.
        assert!(!text.contains("drnd"), "{text}");
        assert!(templates[0].contains("10, 0, dinc(0, 7), dinc(1, 125)"));
    }

    /// The number of values each `dinc(min, max)` of a template runs through, in order.
    fn counter_periods(template: &str) -> Vec<u64> {
        template
            .split("dinc(")
            .skip(1)
            .map(|rest| {
                let args = &rest[..rest.find(')').expect("dinc(...)")];
                let v: Vec<u64> = args
                    .split(',')
                    .map(|a| {
                        let a = a.trim();
                        match a.strip_prefix("0x") {
                            Some(h) => u64::from_str_radix(h, 16).unwrap(),
                            None => a.parse().unwrap(),
                        }
                    })
                    .collect();
                v[1] - v[0] + 1
            })
            .collect()
    }

    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    /// Every counter steps once per packet, so the tuple sequence repeats after the lcm of the
    /// counters' periods, and the addresses after the lcm of the address bytes' periods.
    #[test]
    fn a_pool_flood_has_its_sources_and_tuples() {
        let p = counter_periods(&conf(Spoofed::Pool { repeat: 1 }));
        assert_eq!(
            p.len(),
            4,
            "address bytes 3 and 4, port bytes 1 and 2: {p:?}"
        );
        let lcm = |v: &[u64]| v.iter().fold(1, |a, &x| a / gcd(a, x) * x);
        assert_eq!(lcm(&p[..2]), POOL_SOURCES as u64);
        assert_eq!(
            p[0] * p[1],
            POOL_SOURCES as u64,
            "address bytes not coprime: {p:?}"
        );
        assert_eq!(lcm(&p), POOL_TUPLES, "{p:?}");
    }

    #[test]
    fn a_random_flood_is_one_template() {
        let text = conf(Spoofed::Random);
        assert_eq!(text.matches("}\n").count(), 1, "{text}");
        assert!(text.contains("10, drnd(), drnd(), drnd()"), "{text}");
    }
}
