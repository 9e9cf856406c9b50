//! One agent per `pin_dir`: `cidlb run` holds an exclusive `flock` on the pin directory itself
//! for as long as it runs.
//!
//! Two agents on one pin directory (the service and a manual run) would write the same maps,
//! the inactive Maglev half among them, and undo each other's nodes. bpffs holds pinned objects
//! and directories only (a regular lock file there fails with EPERM), but `flock` works on the
//! directory's own descriptor (`O_RDONLY | O_DIRECTORY`). The lock goes with the process: a
//! kill -9 releases it, so there is never a stale lock to clean up.
//!
//! The holder's pid is written beside it for operators, in `/run/cidlb/pins/<pin dir, escaped
//! as systemd-escape --path does>.pid`; a refused agent names the pid from that file, or from
//! `/proc/locks` when the file is missing. `stats`, `explain` and `announce` only read, and
//! take no lock.

use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use crate::datapath::is_bpffs;

/// Where the holders' pid files live.
pub const PID_DIR: &str = "/run/cidlb/pins";

#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error(
        "pin_dir {dir}: another cidlb run holds it ({holder}); stop that one first \
         (`systemctl stop cidlb`, or kill that pid): two agents on one datapath undo each \
         other's maps. `cidlb stats`, `explain` and `announce` need no lock"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("pin_dir {dir}: cannot {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "pin_dir {dir}: its parent is not a bpf filesystem (mount -t bpf bpf /sys/fs/bpf, \
         or choose a pin_dir under it)"
    )]
    NoBpffs { dir: PathBuf },
}

/// The held lock: released (and the pid file removed) when dropped.
#[derive(Debug)]
pub struct PinLock {
    dir: PathBuf,
    /// Holds the flock; closing it releases the lock.
    _fd: File,
    pid_file: PathBuf,
    /// This lock created the (empty) directory: removed again on drop if still empty.
    created: bool,
}

/// `/sys/fs/bpf/cidlb` → `sys-fs-bpf-cidlb`, as `systemd-escape --path` (so distinct
/// directories get distinct names: `-` and other bytes become `\xNN`).
pub fn escape(dir: &Path) -> String {
    let s = dir.as_os_str().as_encoded_bytes();
    let trimmed: Vec<&[u8]> = s.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
    let mut out = String::new();
    for (i, comp) in trimmed.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in comp.iter().enumerate() {
            if b.is_ascii_alphanumeric() || b == b'_' || (b == b'.' && !(i == 0 && j == 0)) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// The pid file for `dir`.
pub fn pid_file(dir: &Path) -> PathBuf {
    Path::new(PID_DIR).join(format!("{}.pid", escape(dir)))
}

impl PinLock {
    /// Takes the lock on `dir` (creating the directory if missing), or fails at once naming
    /// the holder. Nothing else is touched before the lock is held.
    pub fn acquire(dir: &Path) -> Result<Self, PinLockError> {
        let io = |what| {
            let dir = dir.to_owned();
            move |source| PinLockError::Io { dir, what, source }
        };
        let mut created = false;
        if !dir.exists() {
            let parent = dir.parent().unwrap_or(dir);
            if !is_bpffs(parent) {
                return Err(PinLockError::NoBpffs {
                    dir: dir.to_owned(),
                });
            }
            match std::fs::create_dir(dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create it")(e)),
            }
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io("open it"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(PinLockError::Held {
                    dir: dir.to_owned(),
                    holder: holder(dir, &fd),
                });
            }
            return Err(io("lock it")(e));
        }
        let pid_file = pid_file(dir);
        let lock = PinLock {
            dir: dir.to_owned(),
            _fd: fd,
            pid_file,
            created,
        };
        lock.write_pid_file()?;
        Ok(lock)
    }

    fn write_pid_file(&self) -> Result<(), PinLockError> {
        let io = |what| {
            let dir = self.dir.clone();
            move |source| PinLockError::Io { dir, what, source }
        };
        std::fs::create_dir_all(PID_DIR).map_err(io("create /run/cidlb/pins"))?;
        let tmp = self
            .pid_file
            .with_extension(format!("tmp.{}", std::process::id()));
        let text = format!(
            "pid={}\npin_dir={}\n",
            std::process::id(),
            self.dir.display()
        );
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .and_then(|mut f| io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(io("write its pid file"))?;
        std::fs::rename(&tmp, &self.pid_file).map_err(io("write its pid file"))
    }
}

impl Drop for PinLock {
    fn drop(&mut self) {
        // Only our own pid file: a later holder's is not ours to remove.
        let mine = format!("pid={}", std::process::id());
        if std::fs::read_to_string(&self.pid_file).is_ok_and(|t| t.lines().any(|l| l == mine)) {
            let _ = std::fs::remove_file(&self.pid_file);
        }
        if self.created {
            // Fails (ENOTEMPTY) unless the start failed before pinning anything.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// "pid N" of the lock's holder: from its pid file, else from /proc/locks (the flock on this
/// directory's inode), else "pid unknown".
fn holder(dir: &Path, fd: &File) -> String {
    let from_file = std::fs::read_to_string(pid_file(dir)).ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("pid=").map(|p| p.trim().to_owned()))
    });
    if let Some(pid) = from_file.filter(|p| Path::new("/proc").join(p).exists()) {
        return format!("pid {pid}");
    }
    let from_locks = fd.metadata().ok().and_then(|m| {
        let want = format!(
            "{:02x}:{:02x}:{}",
            libc::major(m.dev()),
            libc::minor(m.dev()),
            m.ino()
        );
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        // `1: FLOCK  ADVISORY  WRITE 1234 00:1f:56 0 EOF`: the device is major:minor in hex.
        locks.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
                .then(|| f[4].to_owned())
        })
    });
    match from_locks {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_is_systemd_escape_path() {
        assert_eq!(escape(Path::new("/sys/fs/bpf/cidlb")), "sys-fs-bpf-cidlb");
        assert_eq!(
            escape(Path::new("/sys/fs/bpf/cidlb-test-a")),
            "sys-fs-bpf-cidlb\\x2dtest\\x2da"
        );
        assert_ne!(escape(Path::new("/a-b")), escape(Path::new("/a/b")));
        assert_eq!(escape(Path::new("/")), "-");
    }
}
