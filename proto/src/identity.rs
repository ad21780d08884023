//! Key files: an Ed25519 PKCS#8 key in a file only its owner can read.
//! Used for the node key and the coordinator's signing key alike.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::dsse::Signer;

/// Why a key file cannot be used. Messages say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {} is readable by others (mode {mode:04o}); run: chmod 600 {}", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {} is not an Ed25519 PKCS#8 key ({reason}); restore it from backup, or move it aside to create a new identity (the node id will change)", path.display())]
    NotAKey { path: PathBuf, reason: String },
    #[error("key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

/// Largest key file read. An Ed25519 PKCS#8 v2 key is 83 bytes.
pub const MAX_KEY_FILE: u64 = 4096;

/// Loads the key at `path`, or creates it (mode 0600, new parent
/// directories 0700) if there is none. Returns whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Signer, bool), IdentityError> {
    if path.exists() {
        return load(path).map(|s| (s, false));
    }
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io)?;
        }
    }
    let (signer, der) = Signer::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        // Another process created it since we looked: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return load(path).map(|s| (s, false))
        }
        Err(e) => return Err(io(e)),
    };
    if let Err(e) = f.write_all(&der).and_then(|()| f.sync_all()) {
        // A half-written key would read as garbage on the next start.
        let _ = fs::remove_file(path);
        return Err(io(e));
    }
    // Make the new directory entry durable too.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok((signer, true))
}

/// Loads an existing key, refusing one that group or others can read.
pub fn load(path: &Path) -> Result<Signer, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let not_a_key = |reason: String| IdentityError::NotAKey {
        path: path.to_owned(),
        reason,
    };
    // Check the mode and size of the file we read, not of a path that may change.
    let mut f = fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_a_key("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut der = Vec::new();
    (&mut f)
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut der)
        .map_err(io)?;
    if der.is_empty() {
        return Err(not_a_key("the file is empty".into()));
    }
    if der.len() as u64 > MAX_KEY_FILE {
        return Err(not_a_key(format!(
            "the file is over {MAX_KEY_FILE} bytes; an Ed25519 key file is under 100"
        )));
    }
    Signer::from_pkcs8(&der).map_err(|e| not_a_key(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_key_and_loads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.key_id(), b.key_id());
    }

    #[test]
    fn refuses_a_key_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            IdentityError::Permissions { mode: 0o644, .. }
        ));
        assert!(
            msg.contains("mode 0644") && msg.contains("chmod 600"),
            "{msg}"
        );
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load(&path),
            Err(IdentityError::Permissions { .. })
        ));
    }

    #[test]
    fn a_private_key_file_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (s, der) = Signer::generate().unwrap();
        fs::write(&path, der).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap().key_id(), s.key_id());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_or_create(&path).unwrap().0.key_id(), s.key_id());
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.key");
        let err = load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }));
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    }

    #[test]
    fn names_truncated_empty_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        load_or_create(&path).unwrap();
        let der = fs::read(&path).unwrap();
        for (bytes, what) in [
            (&der[..20], "truncated"),
            (&[][..], "empty"),
            (&b"hello"[..], "garbage"),
            (&[0x30; 5000][..], "oversized"),
        ] {
            fs::write(&path, bytes).unwrap();
            let err = load(&path).unwrap_err();
            assert!(
                matches!(err, IdentityError::NotAKey { .. }),
                "{what}: {err}"
            );
            assert!(
                err.to_string().contains("not an Ed25519 PKCS#8 key"),
                "{what}"
            );
        }
    }
}
