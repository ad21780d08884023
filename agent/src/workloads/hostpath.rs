//! Bind-mount sources resolved on the host, the way Docker will see them.
//!
//! A spec names a source as text; what gets mounted is whatever that text
//! resolves to when Docker mounts it. A renter who can write below an
//! allowed path (its own earlier mount) can plant `ln -s / data/hostroot`
//! and ask for `/srv/data/hostroot`: the text is allowed, the mount is the
//! host. So each source is walked here one component at a time from the
//! allowed path (`openat` with `O_NOFOLLOW`): any symlink below the
//! allowed path is refused, and the mount gets the resolved path, which
//! then holds no symlink Docker could follow. The allowed path itself may
//! be a symlink (the operator's choice); it is resolved and judged as the
//! place it really is.
//!
//! The time between this walk and Docker's mount is closed by policy, not
//! here: the caller refuses a source strictly below a running container's
//! writable mount (`confine::swappable_by`), the only place a renter could
//! swap a directory for a symlink in that time.

use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd, fd::FromRawFd, fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Component, Path, PathBuf},
};

/// Why a source cannot be mounted.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    /// Below no allowed path.
    #[error("host path {path} is not allowed (workload.allowed_host_paths: {allowed})")]
    NotAllowed { path: PathBuf, allowed: String },
    /// A component below the allowed path is a symlink.
    #[error(
        "host path {path} is refused: {link} is a symbolic link (nothing below the allowed path {base} may be one)"
    )]
    Symlink {
        path: PathBuf,
        link: PathBuf,
        base: PathBuf,
    },
    /// A component that must be a directory is something else.
    #[error("host path {path} is refused: {at} is not a directory")]
    NotDirectory { path: PathBuf, at: PathBuf },
    /// The path, or the allowed path it is under, resolves to a protected place.
    #[error("host path {path} is refused: it resolves to {resolved}, and {reason}")]
    Protected {
        path: PathBuf,
        resolved: PathBuf,
        reason: String,
    },
    /// It cannot be opened (missing, permission).
    #[error("host path {path}: cannot open {at}: {source}")]
    Open {
        path: PathBuf,
        at: PathBuf,
        source: io::Error,
    },
}

/// Resolves `source` below one of `allowed` without following a symlink
/// below it; returns the path to give Docker. `danger` judges the resolved
/// allowed path and the result (`confine::host_path_danger`).
pub fn resolve(
    source: &Path,
    allowed: &[PathBuf],
    danger: impl Fn(&Path) -> Option<String>,
) -> Result<PathBuf, HostPathError> {
    let Some(base) = allowed.iter().find(|b| source.starts_with(b)) else {
        return Err(HostPathError::NotAllowed {
            path: source.to_owned(),
            allowed: if allowed.is_empty() {
                "none".into()
            } else {
                allowed
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    };
    let open_err = |at: &Path, source_err: io::Error| HostPathError::Open {
        path: source.to_owned(),
        at: at.to_owned(),
        source: source_err,
    };
    let real_base = std::fs::canonicalize(base).map_err(|e| open_err(base, e))?;
    let protected = |resolved: &Path| {
        danger(resolved).map(|reason| HostPathError::Protected {
            path: source.to_owned(),
            resolved: resolved.to_owned(),
            reason,
        })
    };
    if let Some(e) = protected(&real_base) {
        return Err(e);
    }
    let mut dir = open_path(&real_base, None, true).map_err(|e| open_err(&real_base, e))?;
    let mut resolved = real_base.clone();
    let rest: Vec<_> = source
        .strip_prefix(base)
        .unwrap_or(Path::new(""))
        .components()
        .collect();
    for (i, c) in rest.iter().enumerate() {
        let Component::Normal(name) = c else {
            // `..` is refused by the textual check before this; `.` and
            // repeated slashes never reach here as components.
            return Err(open_err(
                &resolved,
                io::Error::new(io::ErrorKind::InvalidInput, "`..` in a mount source"),
            ));
        };
        resolved.push(name);
        let last = i + 1 == rest.len();
        let fd =
            open_path(Path::new(name), Some(&dir), false).map_err(|e| open_err(&resolved, e))?;
        let mode = fstat_mode(&fd).map_err(|e| open_err(&resolved, e))?;
        match mode & libc::S_IFMT {
            libc::S_IFLNK => {
                return Err(HostPathError::Symlink {
                    path: source.to_owned(),
                    link: resolved,
                    base: base.clone(),
                })
            }
            libc::S_IFDIR => {}
            _ if last => {}
            _ => {
                return Err(HostPathError::NotDirectory {
                    path: source.to_owned(),
                    at: resolved,
                })
            }
        }
        dir = fd;
    }
    if let Some(e) = protected(&resolved) {
        return Err(e);
    }
    Ok(resolved)
}

/// `open(path, O_PATH)` (relative to `dir` when given), never following a
/// final symlink unless `follow`: a symlink opens as itself, to be seen by
/// `fstat`.
fn open_path(path: &Path, dir: Option<&OwnedFd>, follow: bool) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `c` is a valid C string for the call's duration; the result is
    // checked before it is owned.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat_mode(fd: &OwnedFd) -> io::Result<libc::mode_t> {
    // SAFETY: fstat writes into the zeroed struct; the fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn no_danger(_: &Path) -> Option<String> {
        None
    }

    #[test]
    fn a_plain_path_below_an_allowed_one_resolves_to_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap().join("data");
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::write(base.join("a/file"), b"x").unwrap();
        let allowed = vec![base.clone()];
        for rel in ["", "a", "a/b", "a/file", "a//b/"] {
            let src = PathBuf::from(format!("{}/{rel}", base.display()));
            let got = resolve(&src, &allowed, no_danger).unwrap();
            assert_eq!(got, base.join(rel.replace("//", "/").trim_end_matches('/')));
        }
    }

    #[test]
    fn a_symlink_anywhere_below_the_allowed_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap().join("data");
        std::fs::create_dir_all(base.join("real/sub")).unwrap();
        // What the audit's lease planted: a link to the host's root.
        symlink("/", base.join("hostroot")).unwrap();
        symlink("/var/run", base.join("hostrun")).unwrap();
        // A relative link inside the allowed path is refused too: links are
        // resolved by whoever mounts, at mount time.
        symlink("real", base.join("alias")).unwrap();
        let allowed = vec![base.clone()];
        for rel in ["hostroot", "hostroot/etc", "hostrun", "alias/sub"] {
            let err = resolve(&base.join(rel), &allowed, no_danger).unwrap_err();
            assert!(matches!(err, HostPathError::Symlink { .. }), "{rel}: {err}");
            assert!(err.to_string().contains("is a symbolic link"), "{err}");
        }
        // A file where a directory must be.
        std::fs::write(base.join("f"), b"").unwrap();
        let err = resolve(&base.join("f/x"), &allowed, no_danger).unwrap_err();
        assert!(matches!(err, HostPathError::NotDirectory { .. }), "{err}");
        let err = resolve(&base.join("missing"), &allowed, no_danger).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
        let err = resolve(Path::new("/etc"), &allowed, no_danger).unwrap_err();
        assert!(matches!(err, HostPathError::NotAllowed { .. }), "{err}");
    }

    #[test]
    fn an_allowed_path_that_is_a_link_is_judged_where_it_leads() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("disk1/data")).unwrap();
        symlink(root.join("disk1/data"), root.join("data")).unwrap();
        symlink("/", root.join("everything")).unwrap();
        // The operator's link is followed; the mount gets the real place.
        let got = resolve(&root.join("data"), &[root.join("data")], no_danger).unwrap();
        assert_eq!(got, root.join("disk1/data"));
        // And judged there: a link to `/` is the whole host.
        let danger = |p: &Path| {
            crate::workloads::confine::host_path_danger(
                p,
                &root.join("state"),
                &root.join("docker.sock"),
            )
        };
        let err = resolve(&root.join("everything"), &[root.join("everything")], danger)
            .unwrap_err()
            .to_string();
        assert!(err.contains("resolves to /,"), "{err}");
        assert!(err.contains("whole file system"), "{err}");
    }
}
