//! Readiness: a signal a test harness and a routing daemon can both read, not a log line.
//!
//! `cidlb run --ready-file PATH` writes PATH once the datapath is attached and its maps are
//! provisioned, and removes it on a clean exit (SIGINT/SIGTERM). The file is written to a
//! temporary name beside PATH and renamed into place, so a reader sees either no file or the
//! whole file. A stale file (left by a `kill -9`) is removed when the next agent starts, before
//! anything else, so a reader never takes the old agent's readiness for the new one's.
//!
//! Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) the same moment also sends `READY=1`, and
//! a clean exit sends `STOPPING=1`.
//!
//! The file holds `key=value` lines: `pid` (the agent's process id) and `pin_dir`.

use std::{
    ffi::OsString,
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
};

/// What went wrong with the ready file; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("--ready-file {path}: cannot {what}: {source} (is its directory there and writable?)")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The agent's readiness signal. Does nothing without a path and outside systemd.
#[derive(Debug, Default)]
pub struct Ready {
    path: Option<PathBuf>,
    /// systemd's `NOTIFY_SOCKET`, read once at start.
    notify: Option<OsString>,
    signalled: bool,
}

impl Ready {
    /// Takes the ready file `path` (if any) and removes a stale one left by an earlier agent.
    pub fn new(path: Option<PathBuf>) -> Result<Self, ReadyError> {
        Self::with_notify(path, std::env::var_os("NOTIFY_SOCKET"))
    }

    fn with_notify(path: Option<PathBuf>, notify: Option<OsString>) -> Result<Self, ReadyError> {
        if let Some(p) = &path {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ReadyError::Io {
                        path: p.clone(),
                        what: "remove a stale ready file",
                        source,
                    })
                }
            }
        }
        Ok(Self {
            path,
            notify,
            signalled: false,
        })
    }

    /// The datapath is attached and provisioned: write the file (atomically) and tell systemd.
    pub fn signal(&mut self, pin_dir: &Path) -> Result<(), ReadyError> {
        if let Some(p) = &self.path {
            let mut text = String::new();
            let _ = writeln!(text, "pid={}", std::process::id());
            let _ = writeln!(text, "pin_dir={}", pin_dir.display());
            write_atomically(p, text.as_bytes())?;
        }
        self.notify_systemd("READY=1");
        self.signalled = true;
        Ok(())
    }

    /// A clean exit: remove the file (a missing one is fine) and tell systemd.
    pub fn clear(&mut self) -> Result<(), ReadyError> {
        if !self.signalled {
            return Ok(());
        }
        self.signalled = false;
        self.notify_systemd("STOPPING=1");
        match &self.path {
            Some(p) => match std::fs::remove_file(p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ReadyError::Io {
                    path: p.clone(),
                    what: "remove the ready file",
                    source,
                }),
            },
            None => Ok(()),
        }
    }
}

/// Writes `PATH.tmp.PID`, then renames it to `PATH` (rename is atomic within a filesystem).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReadyError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let err = |what, source| ReadyError::Io {
        path: path.to_owned(),
        what,
        source,
    };
    std::fs::write(&tmp, bytes).map_err(|e| err("write its temporary file", e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err("rename its temporary file into place", e)
    })
}

impl Ready {
    /// sd_notify(3) without libsystemd: one datagram to `NOTIFY_SOCKET` (a path, or `@name` for
    /// the abstract namespace). Best effort: outside systemd there is no socket and nothing
    /// happens.
    fn notify_systemd(&self, state: &str) {
        let Some(sock) = &self.notify else {
            return;
        };
        let sent = (|| -> io::Result<()> {
            use std::os::{
                linux::net::SocketAddrExt as _,
                unix::net::{SocketAddr, UnixDatagram},
            };
            let s = UnixDatagram::unbound()?;
            let addr = match sock.as_encoded_bytes().strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name)?,
                None => SocketAddr::from_pathname(Path::new(sock))?,
            };
            s.send_to_addr(state.as_bytes(), &addr)?;
            Ok(())
        })();
        if let Err(e) = sent {
            tracing::warn!(
                "NOTIFY_SOCKET {}: cannot send {state}: {e}",
                sock.to_string_lossy()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cidlb-ready-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_whole_then_removed_and_a_stale_file_goes_first() {
        let d = dir("cycle");
        let p = d.join("ready");
        std::fs::write(&p, "pid=1\n").unwrap();
        let mut r = Ready::new(Some(p.clone())).unwrap();
        assert!(
            !p.exists(),
            "a stale ready file must go before the datapath is up"
        );
        r.signal(Path::new("/sys/fs/bpf/x")).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            format!("pid={}\npin_dir=/sys/fs/bpf/x\n", std::process::id())
        );
        // Nothing but the file itself is left in the directory (no temporary).
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        r.clear().unwrap();
        assert!(!p.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unwritable_place_is_an_error_naming_the_file() {
        let d = dir("bad");
        let p = d.join("no-such-dir").join("ready");
        let mut r = Ready::new(Some(p.clone())).unwrap();
        let e = r.signal(Path::new("/x")).unwrap_err().to_string();
        std::fs::remove_dir_all(&d).unwrap();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn systemd_gets_ready_over_its_socket() {
        use std::os::unix::net::UnixDatagram;
        let d = dir("notify");
        let sock = d.join("notify.sock");
        let _ = std::fs::remove_file(&sock);
        let rx = UnixDatagram::bind(&sock).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        // The socket is given directly: setting NOTIFY_SOCKET would reach the other tests'
        // agents running in parallel threads.
        let mut r = Ready::with_notify(None, Some(sock.clone().into())).unwrap();
        r.signal(Path::new("/x")).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        r.clear().unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
