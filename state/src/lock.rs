//! One process per directory: an exclusive `flock` on a lock file, held as
//! long as the [`DirLock`] lives. The kernel drops it when the process dies,
//! SIGKILL included, so a crash never blocks the restart; the file itself
//! stays (removing it would let two processes lock two different files).
//! The holder writes its pid into the file, so the next one can say who
//! holds it.

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::unix::{
        fs::{FileExt, OpenOptionsExt, PermissionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
    time::Duration,
};

/// The lock file every Warden directory lock uses.
pub const LOCK_FILE: &str = "warden.lock";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} is in use: its lock file {} is held by {holder}; stop that process first (two processes on the same state would corrupt it)", path.display())]
    Held {
        path: PathBuf,
        /// What the lock protects ("the state directory /var/lib/warden").
        what: String,
        holder: Holder,
    },
    #[error("lock file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lock file {} is {kind}, not a regular file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
}

/// Who holds a lock, as its file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder(pub Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("a process that has not written its pid yet"),
        }
    }
}

/// An exclusive lock on a file, released when dropped or when the process ends.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    _file: File,
}

impl DirLock {
    /// Takes the lock on `path` (created mode 0600 if missing, never through
    /// a link), without waiting: if another process holds it, the error
    /// names the file, `what` it protects and the holder's pid.
    pub fn acquire(path: &Path, what: impl Into<String>) -> Result<DirLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        // Not truncated on open: the holder's pid must survive a failed attempt.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => LockError::NotAFile {
                    path: path.to_owned(),
                    kind: "a symbolic link",
                },
                _ => io(e),
            })?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(LockError::NotAFile {
                path: path.to_owned(),
                kind: crate::kind_of(meta.file_type()),
            });
        }
        loop {
            // SAFETY: the descriptor is open for the whole call.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    return Err(LockError::Held {
                        path: path.to_owned(),
                        what: what.into(),
                        holder: Holder(holder_pid(&mut file)),
                    })
                }
                _ => return Err(io(e)),
            }
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            .and_then(|()| {
                if meta.permissions().mode() & 0o777 != 0o600 {
                    file.set_permissions(std::fs::Permissions::from_mode(0o600))
                } else {
                    Ok(())
                }
            })
            .map_err(io)?;
        Ok(DirLock {
            path: path.to_owned(),
            _file: file,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid in a held lock's file. The holder writes it just after taking
/// the lock, so an empty file is read again a few times before giving up
/// (the message then says the pid is unknown; the refusal stands).
fn holder_pid(file: &mut File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file
            .try_clone()
            .and_then(|mut f| {
                use std::io::Seek;
                f.rewind()?;
                f.take(64).read_to_string(&mut text)
            })
            .is_ok()
        {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_file_and_the_holder() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(LOCK_FILE);
        let first = DirLock::acquire(&path, "the state directory X").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to the open file, so a second open in this
        // process conflicts just as another process's would.
        let e = DirLock::acquire(&path, "the state directory X").unwrap_err();
        match &e {
            LockError::Held { holder, .. } => {
                assert_eq!(*holder, Holder(Some(std::process::id())))
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.starts_with("the state directory X is in use"), "{msg}");
        // The refused attempt left the holder's pid in place.
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(first);
        let again = DirLock::acquire(&path, "the state directory X").unwrap();
        assert_eq!(again.path(), path);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_stale_pid_from_a_dead_holder_does_not_block() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(LOCK_FILE);
        std::fs::write(&path, "999999999\n").unwrap();
        let l = DirLock::acquire(&path, "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(l.path()).unwrap(),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn a_link_at_the_lock_path_is_refused_and_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = t.path().join(LOCK_FILE);
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = DirLock::acquire(&path, "x").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
