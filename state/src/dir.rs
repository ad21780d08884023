//! Private directories: mode 0700, owned by this process's user. A state
//! directory someone else made is refused rather than used, since
//! everything written there could be redirected or read. A symbolic link
//! is followed only if root or this user owns it (systemd's `DynamicUser=`
//! reaches `/var/lib/private/NAME` through a root-owned `/var/lib/NAME`);
//! one another user planted, in a shared `/tmp` say, is refused.

use std::{
    ffi::CString,
    fs::{self, DirBuilder, OpenOptions},
    os::unix::{
        ffi::{OsStrExt, OsStringExt},
        fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

/// Why a directory cannot be used as a private one.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is a symbolic link owned by uid {owner}, neither this process's user nor root: it may point anywhere; name the real directory instead", path.display())]
    Symlink { path: PathBuf, owner: u32 },
    #[error("{} is {kind}, not a directory", path.display())]
    NotADirectory { path: PathBuf, kind: &'static str },
    #[error("directory {} belongs to uid {owner}, not to this process's uid {uid}: someone else made it, so what it holds cannot be trusted; remove it or choose another directory", path.display())]
    Foreign { path: PathBuf, owner: u32, uid: u32 },
}

/// Makes `path` a private directory: creates it (and missing parents, mode
/// 0700) if needed; refuses a link that neither root nor this user owns,
/// something not a directory, or a directory another user owns; and sets
/// mode 0700. The owner check and the chmod are made on the opened
/// directory, so what is checked is what is changed.
pub fn ensure_private(path: &Path) -> Result<(), DirError> {
    let io = |source| DirError::Io {
        path: path.to_owned(),
        source,
    };
    if let Err(e) = DirBuilder::new().recursive(true).mode(0o700).create(path) {
        // Something is there that is not a directory: the checks below say what.
        if fs::symlink_metadata(path).is_err() {
            return Err(io(e));
        }
    }
    let uid = effective_uid();
    let link = fs::symlink_metadata(path).map_err(io)?;
    if link.file_type().is_symlink() && link.uid() != uid && link.uid() != 0 {
        return Err(DirError::Symlink {
            path: path.to_owned(),
            owner: link.uid(),
        });
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| match fs::metadata(path).map(|m| m.file_type()) {
            Ok(t) if !t.is_dir() => DirError::NotADirectory {
                path: path.to_owned(),
                kind: crate::kind_of(t),
            },
            _ => io(e),
        })?;
    let meta = dir.metadata().map_err(io)?;
    if meta.uid() != uid {
        return Err(DirError::Foreign {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        dir.set_permissions(fs::Permissions::from_mode(0o700))
            .map_err(io)?;
    }
    Ok(())
}

/// Makes a new private directory `parent/prefixXXXXXX` with a random,
/// unpredictable suffix (mkdtemp): nobody can have prepared it.
pub fn fresh_private(parent: &Path, prefix: &str) -> Result<PathBuf, DirError> {
    let io = |source| DirError::Io {
        path: parent.to_owned(),
        source,
    };
    let template = parent.join(format!("{prefix}XXXXXX")).into_os_string();
    let mut buf = CString::new(template.into_vec())
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?
        .into_bytes_with_nul();
    // SAFETY: buf is a NUL-terminated template that mkdtemp rewrites in place.
    let made = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(io(std::io::Error::last_os_error()));
    }
    buf.pop();
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&buf)))
}

/// This process's effective uid: the owner of what it creates.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_directory_and_its_parents_are_made_0700() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        ensure_private(&d).unwrap();
        assert_eq!(mode(&t.path().join("a")), 0o700);
        assert_eq!(mode(&d), 0o700);
        // An existing one of ours is tightened.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn a_link_another_user_owns_is_refused_and_its_target_untouched() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
        let link = t.path().join("link");
        symlink(&victim, &link).unwrap();
        // Planted by nobody (65534); tests run as root.
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let e = ensure_private(&link).unwrap_err();
        assert!(matches!(e, DirError::Symlink { owner: 65534, .. }), "{e}");
        assert!(
            e.to_string().contains("symbolic link owned by uid 65534"),
            "{e}"
        );
        assert_eq!(mode(&victim), 0o755);
    }

    #[test]
    fn a_link_of_our_own_is_followed_as_systemd_dynamic_user_lays_it_out() {
        // /var/lib/NAME -> private/NAME, the link root's, the directory ours.
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("private/coord")).unwrap();
        let link = t.path().join("coord");
        symlink("private/coord", &link).unwrap();
        ensure_private(&link).unwrap();
        assert_eq!(mode(&t.path().join("private/coord")), 0o700);
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        // Followed to a directory another user owns: refused all the same.
        std::os::unix::fs::chown(t.path().join("private/coord"), Some(65534), None).unwrap();
        let e = ensure_private(&link).unwrap_err();
        assert!(matches!(e, DirError::Foreign { owner: 65534, .. }), "{e}");
    }

    #[test]
    fn a_file_is_refused_naming_what_it_is() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, "x").unwrap();
        let e = ensure_private(&f).unwrap_err().to_string();
        assert!(e.contains("is a regular file, not a directory"), "{e}");
        assert_eq!(fs::read(&f).unwrap(), b"x");
    }

    #[test]
    fn a_directory_another_user_owns_is_refused_and_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        // Tests run as root (docs: the suite needs it); 65534 is nobody.
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let e = ensure_private(&d).unwrap_err();
        assert!(matches!(e, DirError::Foreign { owner: 65534, .. }), "{e}");
        assert!(e.to_string().contains("uid 65534"), "{e}");
        assert_eq!(mode(&d), 0o777);
    }

    #[test]
    fn fresh_directories_are_new_private_and_distinct() {
        let t = tempfile::tempdir().unwrap();
        let a = fresh_private(t.path(), "warden-dev.").unwrap();
        let b = fresh_private(t.path(), "warden-dev.").unwrap();
        assert_ne!(a, b);
        assert!(a
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("warden-dev."));
        assert_eq!(mode(&a), 0o700);
        assert!(fs::read_dir(&a).unwrap().next().is_none());
    }
}
