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
        let made = self_signed(
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            "Warden dev CA (throwaway)",
            "warden dev coordinator",
        )?;
        for (path, pem) in [
            (&key_path, made.key_pem),
            (&cert_path, made.cert_pem),
            (&ca_path, made.ca_pem),
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

/// A CA made here and a server certificate it signed, PEM. The CA's key is
/// not kept: nothing else is ever signed with it, so there is none to steal.
pub struct SelfSigned {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA named `ca_name` and a server certificate for `names` (DNS
/// names or IP addresses) signed by it.
pub fn self_signed(
    names: &[String],
    ca_name: &str,
    server_name: &str,
) -> Result<SelfSigned, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, server_name);
    let server = params.signed_by(&server_key, &ca)?;
    Ok(SelfSigned {
        ca_pem: ca.pem(),
        cert_pem: server.pem(),
        key_pem: server_key.serialize_pem(),
    })
}
