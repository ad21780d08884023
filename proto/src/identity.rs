//! Key files: an Ed25519 PKCS#8 key in a file only its owner can read.
//! Used for the node key and the coordinator's signing key alike.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
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

/// Loads the key at `path`, or creates it (mode 0600, parent 0700) if
/// there is none. Returns whether it was created.
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
            fs::create_dir_all(parent).map_err(io)?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
    }
    let (signer, der) = Signer::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(&der).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok((signer, true))
}

/// Loads an existing key, refusing one that group or others can read.
pub fn load(path: &Path) -> Result<Signer, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let der = fs::read(path).map_err(io)?;
    if der.is_empty() {
        return Err(IdentityError::NotAKey {
            path: path.to_owned(),
            reason: "the file is empty".into(),
        });
    }
    Signer::from_pkcs8(&der).map_err(|e| IdentityError::NotAKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
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
    fn names_truncated_empty_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        load_or_create(&path).unwrap();
        let der = fs::read(&path).unwrap();
        for (bytes, what) in [
            (&der[..20], "truncated"),
            (&[][..], "empty"),
            (&b"hello"[..], "garbage"),
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
