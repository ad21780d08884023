//! Throwaway TLS material for development and tests: a CA and a server
//! certificate for `localhost` and 127.0.0.1, made with rcgen.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::TlsPem;

/// Why dev TLS material could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum DevTlsError {
    #[error("dev TLS file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dir(#[from] warden_state::dir::DirError),
    #[error("generating dev certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Dev TLS files: a CA and a server certificate for `localhost` and 127.0.0.1.
pub struct DevTls {
    pub ca_cert: PathBuf,
    pub server: TlsPem,
}

/// Creates the dev CA and server certificate in `dir` (a private directory,
/// files mode 0600), or reuses them so a restarted dev coordinator is still
/// trusted by agents already configured.
pub fn ensure(dir: &Path) -> Result<DevTls, DevTlsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DevTlsError::Io { path, source }
    };
    warden_state::dir::ensure_private(dir)?;
    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    if !(ca_path.exists() && cert_path.exists() && key_path.exists()) {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Warden dev CA (throwaway)");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let server_key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "warden dev coordinator");
        let server = params.signed_by(&server_key, &ca)?;
        for (path, pem) in [
            (&key_path, server_key.serialize_pem()),
            (&cert_path, server.pem()),
            (&ca_path, ca.pem()),
        ] {
            warden_state::file::write_private(path, pem.as_bytes()).map_err(io(path))?;
        }
    }
    Ok(DevTls {
        server: TlsPem {
            cert: fs::read(&cert_path).map_err(io(&cert_path))?,
            key: fs::read(&key_path).map_err(io(&key_path))?,
        },
        ca_cert: ca_path,
    })
}
