//! Unix sockets that only their owner may use, bound without destroying
//! anything: the path may be free, or hold a stale socket (one no process
//! answers on, left by a crash); anything else — a file, a directory, a
//! link, a live socket — is an error naming the path and what is there.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {} is {kind}, not a socket: refusing to remove it; point the setting at a path of its own", path.display())]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("socket {} is in use: a live process answers on it (is another instance running?)", path.display())]
    InUse { path: PathBuf },
    #[error("socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The socket's file, removed when dropped if it is still the one bound
/// here (a later process may have replaced it; that one is left alone).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time: an inode number alone is soon reused.
    id: (u64, u64, i64, i64),
}

fn identity(m: &fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && identity(&m) == self.id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a listening socket at `path`, mode 0600 (a missing parent is made
/// 0700), after removing a stale socket there. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile), SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if fs::symlink_metadata(parent).is_err() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io)?;
        }
    }
    remove_stale(path)?;
    let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    let meta = fs::symlink_metadata(path).map_err(io)?;
    let file = SocketFile {
        path: path.to_owned(),
        id: identity(&meta),
    };
    std_listener.set_nonblocking(true).map_err(io)?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(io)?;
    Ok((listener, file))
}

/// Clears the way for a bind: nothing there, or a socket nobody answers on
/// (removed). A live socket or anything that is not a socket is an error.
pub fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
            kind: crate::kind_of(meta.file_type()),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        // Nobody listens: left by a process that died.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        // A full backlog (EAGAIN) means a live listener too.
        Err(e) if e.kind() == ErrorKind::WouldBlock => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn a_regular_file_a_directory_and_a_link_are_refused_and_untouched() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("node.key");
        fs::write(&key, "secret").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let e = bind(&key).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{msg}");
        assert!(
            msg.contains(key.to_str().unwrap()) && msg.contains("is a regular file"),
            "{msg}"
        );
        assert_eq!(fs::read(&key).unwrap(), b"secret");
        assert_eq!(mode(&key), 0o600);

        let dir = t.path().join("spool");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("seg"), "x").unwrap();
        let msg = bind(&dir).unwrap_err().to_string();
        assert!(msg.contains("is a directory"), "{msg}");
        assert!(dir.join("seg").exists());

        let link = t.path().join("agent.sock");
        symlink(&key, &link).unwrap();
        let msg = bind(&link).unwrap_err().to_string();
        assert!(msg.contains("is a symbolic link"), "{msg}");
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(fs::read(&key).unwrap(), b"secret");
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_keeps_answering() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.sock");
        let (live, _file) = bind(&p).unwrap();
        let e = bind(&p).unwrap_err();
        assert!(matches!(e, SocketError::InUse { .. }), "{e}");
        assert!(e.to_string().contains(p.to_str().unwrap()));
        // The first listener still owns the path.
        let client = tokio::net::UnixStream::connect(&p).await.unwrap();
        let (_server, _) = live.accept().await.unwrap();
        drop(client);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_new_one_is_0600() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("run/admin.sock");
        {
            // A process that died leaves its socket file behind.
            let (l, f) = bind(&p).unwrap();
            std::mem::forget(f);
            drop(l);
        }
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_socket());
        let (l, f) = bind(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&t.path().join("run")), 0o700);
        let _c = tokio::net::UnixStream::connect(&p).await.unwrap();
        l.accept().await.unwrap();
        drop(f);
        assert!(!p.exists(), "the socket file is removed with its guard");
    }

    #[tokio::test]
    async fn a_guard_leaves_a_socket_that_replaced_its_own() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.sock");
        let (l1, f1) = bind(&p).unwrap();
        drop(l1);
        // Someone else's socket took the path since.
        fs::remove_file(&p).unwrap();
        let (_l2, _f2) = bind(&p).unwrap();
        drop(f1);
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_socket());
    }
}
