//! `announce.state_dir`: where `cidlb run`'s heartbeat, the maintenance switch and the per-VIP
//! ready files live. What is written there decides whether BGP announces the VIPs, so:
//!
//! - the directory must belong to this process's user and be writable by no one else (mode &
//!   0o022 == 0), else it is refused: whoever can write there could forge a heartbeat, flip
//!   maintenance, or plant a symlink that makes the agent (root) overwrite another file;
//! - it is opened once with `O_NOFOLLOW | O_DIRECTORY` (the directory itself may not be a
//!   symlink; its parents may, as with any path an operator configures), and every file in it
//!   is written relative to that descriptor: a temporary created with `O_CREAT | O_EXCL |
//!   O_NOFOLLOW`, then renamed over the name. A symlink planted at either name is replaced,
//!   never followed; a reader sees the old file or the new one, whole.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "announce.state_dir {path}: {why}; refusing it: whoever can write there could forge \
         the heartbeat or the maintenance switch, or plant symlinks (make it root's and not \
         group/world-writable: chown root:root, chmod 0755; or choose another directory)"
    )]
    Unsafe { path: PathBuf, why: String },
    #[error("announce.state_dir {path}: cannot {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An opened, checked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    fd: OwnedFd,
}

fn cstr(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Refuses a directory (given its metadata) that is not ours alone.
fn check(path: &Path, meta: &std::fs::Metadata) -> Result<(), StateDirError> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let why = if !meta.is_dir() {
        Some("not a directory".to_owned())
    } else if meta.uid() != me {
        Some(format!(
            "owned by uid {}, not by this agent's uid {me}",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by group or others (mode {:04o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(StateDirError::Unsafe {
            path: path.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

impl StateDir {
    /// Opens `path` (creating it, mode 0755, if missing) and checks it.
    pub fn open(path: &Path) -> Result<Self, StateDirError> {
        let io = |what| {
            let path = path.to_owned();
            move |source| StateDirError::Io { path, what, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(StateDirError::Unsafe {
                    path: path.to_owned(),
                    why: "is a symlink".into(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(path)
                    .map_err(io("create it"))?;
            }
            Err(e) => return Err(io("read it")(e)),
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("open it"))?;
        check(path, &f.metadata().map_err(io("read it"))?)?;
        Ok(Self {
            path: path.to_owned(),
            fd: f.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The subdirectory `name` (created, mode 0755, if missing), checked as the directory is.
    pub fn subdir(&self, name: &str) -> Result<StateDir, StateDirError> {
        let path = self.path.join(name);
        let io = |what| {
            let path = path.clone();
            move |source| StateDirError::Io { path, what, source }
        };
        let c = cstr(name).map_err(io("name it"))?;
        // SAFETY: mkdirat/openat with our directory descriptor and a NUL-terminated name.
        let fd = unsafe {
            if libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o755) != 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(io("create it")(e));
                }
            }
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io("open it (it must be a directory, not a symlink)")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        check(&path, &f.metadata().map_err(io("read it"))?)?;
        Ok(StateDir { path, fd: f.into() })
    }

    /// Writes `name` whole: a fresh temporary (`O_EXCL | O_NOFOLLOW`, mode 0644), then renamed
    /// over `name` (which replaces a symlink there instead of following it).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StateDirError> {
        let path = self.path.join(name);
        let io = |what| {
            let path = path.clone();
            move |source| StateDirError::Io { path, what, source }
        };
        let c = cstr(name).map_err(io("name it"))?;
        let tmp = cstr(&format!(".{name}.{}.tmp", std::process::id())).map_err(io("name it"))?;
        let dfd = self.fd.as_raw_fd();
        // SAFETY: *at calls with our directory descriptor and NUL-terminated names.
        unsafe {
            // A temporary left by an earlier process with our pid (or planted): unlinking does
            // not follow it.
            libc::unlinkat(dfd, tmp.as_ptr(), 0);
            let fd = libc::openat(
                dfd,
                tmp.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644 as libc::c_uint,
            );
            if fd < 0 {
                return Err(io("create its temporary file")(io::Error::last_os_error()));
            }
            let mut f = File::from_raw_fd(fd);
            if let Err(e) = f.write_all(bytes) {
                libc::unlinkat(dfd, tmp.as_ptr(), 0);
                return Err(io("write it")(e));
            }
            drop(f);
            if libc::renameat(dfd, tmp.as_ptr(), dfd, c.as_ptr()) != 0 {
                let e = io::Error::last_os_error();
                libc::unlinkat(dfd, tmp.as_ptr(), 0);
                return Err(io("rename its temporary file into place")(e));
            }
        }
        Ok(())
    }

    /// Removes `name` (a missing one is fine; a symlink is removed, not followed).
    pub fn remove(&self, name: &str) -> Result<(), StateDirError> {
        let path = self.path.join(name);
        let c = cstr(name).map_err(|source| StateDirError::Io {
            path: path.clone(),
            what: "name it",
            source,
        })?;
        // SAFETY: unlinkat with our directory descriptor and a NUL-terminated name.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                return Err(StateDirError::Io {
                    path,
                    what: "remove it",
                    source: e,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cidlb-statedir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn writes_replace_symlinks_instead_of_following_them() {
        let root = scratch("link");
        let dir = root.join("state");
        let victim = root.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let sd = StateDir::open(&dir).unwrap();
        // Symlinks planted at the file's name and at its temporary's name.
        std::os::unix::fs::symlink(&victim, dir.join("heartbeat")).unwrap();
        std::os::unix::fs::symlink(
            &victim,
            dir.join(format!(".heartbeat.{}.tmp", std::process::id())),
        )
        .unwrap();
        sd.write("heartbeat", b"pid=1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let m = std::fs::symlink_metadata(dir.join("heartbeat")).unwrap();
        assert!(m.file_type().is_file(), "{m:?}");
        assert_eq!(m.mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read_to_string(dir.join("heartbeat")).unwrap(),
            "pid=1\n"
        );
        // Only the file: no temporary left.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // A symlinked subdirectory is refused, and removing a symlink leaves its target.
        std::os::unix::fs::symlink(&root, dir.join("ready")).unwrap();
        assert!(sd.subdir("ready").is_err());
        sd.remove("ready").unwrap();
        sd.subdir("ready")
            .unwrap()
            .write("192.0.2.10", b"ready\n")
            .unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("maintenance")).unwrap();
        sd.remove("maintenance").unwrap();
        sd.remove("maintenance").unwrap();
        assert!(victim.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let root = scratch("mode");
        for mode in [0o777, 0o775, 0o757, 0o1777] {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = StateDir::open(&root).unwrap_err().to_string();
            assert!(e.contains("writable by group or others"), "{mode:o}: {e}");
            assert!(e.contains(&root.display().to_string()), "{e}");
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        StateDir::open(&root).unwrap();
        // A symlink to a good directory is refused too.
        let link = root.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let e = StateDir::open(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        // SAFETY: geteuid has no preconditions.
        let (dir, cleanup) = if unsafe { libc::geteuid() } == 0 {
            let d = scratch("owner");
            let c = CString::new(d.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: chown of a directory we created.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            (d, true)
        } else {
            // Not root: `/` is root's and not group/world-writable.
            (PathBuf::from("/"), false)
        };
        let e = StateDir::open(&dir).unwrap_err().to_string();
        assert!(e.contains("owned by uid"), "{e}");
        if cleanup {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
