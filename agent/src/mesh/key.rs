//! The node's mesh key: an X25519 private key, separate from its Ed25519
//! signing key, in the state directory with mode 0600. Written as `wg`
//! writes keys (standard base64 and a newline), so `wg pubkey < mesh.key`
//! works on it.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use rand::RngCore;

/// Why the mesh key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshKeyError {
    #[error("mesh key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mesh key {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("mesh key {path} is not a WireGuard key (a base64 line of 32 bytes): move it away to get a new one")]
    NotAKey { path: PathBuf },
}

/// Loads the key, or makes one (mode 0600) if there is none; the bool says
/// whether it was made.
pub fn load_or_create(path: &Path) -> Result<([u8; 32], bool), MeshKeyError> {
    let io = |source| MeshKeyError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(MeshKeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            let text = std::fs::read_to_string(path).map_err(io)?;
            let bytes = B64
                .decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| MeshKeyError::NotAKey {
                    path: path.to_owned(),
                })?;
            Ok((bytes, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            // Clamped as X25519 wants it (as `wg genkey` does).
            key[0] &= 248;
            key[31] = (key[31] & 127) | 64;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{}\n", B64.encode(key)).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_0600_then_loaded_and_bad_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.key");
        let (k1, made) = load_or_create(&path).unwrap();
        assert!(made);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (k2, made) = load_or_create(&path).unwrap();
        assert!(!made);
        assert_eq!(k1, k2);
        assert_eq!(k1[0] & 7, 0, "clamped");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(load_or_create(&path)
            .unwrap_err()
            .to_string()
            .contains("not a WireGuard key"));
    }

    #[test]
    fn wg_reads_the_same_public_key() {
        // `wg pubkey` (wireguard-tools, which the test command installs) agrees with ours.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.key");
        let (key, _) = load_or_create(&path).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("wg pubkey < {}", path.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wg pubkey failed (install wireguard-tools): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(theirs, B64.encode(crate::mesh::device::public_of(key)));
    }
}
