//! Reaching a PostgreSQL database: where it is, who we are, and TLS
//! checked against the operator's CA on every hop that leaves the host (a
//! Unix socket or a loopback address may go without).

use std::{fmt, net::IpAddr, path::Path, sync::Arc, time::Duration};

use postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer},
};

use super::{db::Conn, StoreError};

/// A PostgreSQL database and how to reach it.
#[derive(Clone)]
pub struct PostgresTarget {
    config: postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl PostgresTarget {
    /// `url` is a `postgres://user@host:port/dbname` URL or a libpq
    /// `key=value` string; `ca_cert` the PEM file of the CA that signed
    /// the server's certificate (TLS is then required, and the server's
    /// name checked); `password` overrides any in `url`.
    pub fn new(
        url: &str,
        ca_cert: Option<&Path>,
        password: Option<&str>,
    ) -> Result<Self, StoreError> {
        let bad = |why: String| StoreError::PostgresConfig { why };
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| bad(format!("postgres.url does not parse ({e})")))?;
        if config.get_hosts().is_empty() {
            return Err(bad("postgres.url names no host".into()));
        }
        if config.get_dbname().is_none() {
            return Err(bad("postgres.url names no database".into()));
        }
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("warden-coordinator");
        let tls = match ca_cert {
            Some(ca) => {
                config.ssl_mode(SslMode::Require);
                Some(MakeRustlsConnect::new(client_config(ca)?))
            }
            None => {
                if let Some(remote) = config.get_hosts().iter().find(|h| !on_this_host(h)) {
                    return Err(bad(format!(
                        "the database at {} is reached over the network, so postgres.ca_cert must name the PEM file of the CA that signed its server certificate (TLS on every hop); only a Unix socket or a loopback address may go without",
                        show_host(remote)
                    )));
                }
                config.ssl_mode(SslMode::Disable);
                None
            }
        };
        Ok(Self { config, tls })
    }

    /// A new connection (with the statement cache of its own).
    pub(crate) fn connect(&self) -> Result<Conn, StoreError> {
        let client = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        };
        client.map(Conn::postgres).map_err(|e| StoreError::Connect {
            target: self.to_string(),
            source: e.into(),
        })
    }

    /// This target with `options` passed to the server (e.g. `-c
    /// search_path=x`): how tests give each their own schema.
    pub fn with_options(mut self, options: &str) -> Self {
        self.config.options(options);
        self
    }
}

/// What the target is shown as in logs and errors: never the password.
impl fmt::Display for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let host = c.get_hosts().first().map(show_host).unwrap_or_default();
        let port = c.get_ports().first().copied().unwrap_or(5432);
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            c.get_user().unwrap_or(""),
            host,
            port,
            c.get_dbname().unwrap_or("")
        )
    }
}

fn show_host(h: &Host) -> String {
    match h {
        Host::Tcp(name) => name.clone(),
        Host::Unix(path) => path.display().to_string(),
    }
}

/// A Unix socket or a loopback name or address: traffic that never leaves
/// the host.
fn on_this_host(h: &Host) -> bool {
    match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// TLS that trusts only the operator's CA.
fn client_config(ca: &Path) -> Result<rustls::ClientConfig, StoreError> {
    let bad = |why: String| StoreError::PostgresConfig {
        why: format!("postgres.ca_cert {}: {why}", ca.display()),
    };
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| bad(e.to_string()))?;
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(r: Result<PostgresTarget, StoreError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(t) => panic!("accepted {t}"),
        }
    }

    #[test]
    fn a_database_across_the_network_needs_tls() {
        let msg = why(PostgresTarget::new(
            "postgres://warden@db.example:5432/warden",
            None,
            None,
        ));
        assert!(
            msg.contains("db.example") && msg.contains("postgres.ca_cert"),
            "{msg}"
        );
        for local in [
            "postgres://warden@localhost/warden",
            "postgres://warden@127.0.0.1:5433/warden",
            "postgres://warden@[::1]/warden",
            "host=/run/postgresql user=warden dbname=warden",
        ] {
            PostgresTarget::new(local, None, None).unwrap_or_else(|e| panic!("{local}: {e}"));
        }
    }

    #[test]
    fn shown_without_its_password_and_bad_urls_say_what_is_wrong() {
        let t = PostgresTarget::new(
            "postgres://warden:hunter2@127.0.0.1:5433/coord",
            None,
            Some("other"),
        )
        .unwrap();
        assert_eq!(t.to_string(), "postgres://warden@127.0.0.1:5433/coord");
        assert!(
            why(PostgresTarget::new("postgres://w@127.0.0.1", None, None))
                .contains("names no database")
        );
        assert!(why(PostgresTarget::new("nonsense=", None, None)).contains("postgres.url"));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "").unwrap();
        let msg = why(PostgresTarget::new(
            "postgres://w@db.example/coord",
            Some(&empty),
            None,
        ));
        assert!(
            msg.contains("ca.pem") && msg.contains("no certificate"),
            "{msg}"
        );
    }

    #[test]
    fn a_server_whose_certificate_another_ca_signed_is_not_used() {
        let (Ok(url), Ok(ca)) = (
            std::env::var("WARDEN_TEST_POSTGRES"),
            std::env::var("WARDEN_TEST_POSTGRES_CA"),
        ) else {
            return; // needs the test PostgreSQL (scripts/test.sh)
        };
        // An impostor's CA: the real server's certificate does not chain to it.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other-ca.pem");
        let made = crate::devtls::self_signed(&["localhost".into()], "impostor", "x").unwrap();
        std::fs::write(&other, made.ca_pem).unwrap();
        let (url2, other2) = (url.clone(), other.clone());
        let refused = std::thread::spawn(move || {
            PostgresTarget::new(&url2, Some(&other2), None)
                .unwrap()
                .connect()
                .err()
                .map(|e| e.to_string())
        })
        .join()
        .unwrap()
        .expect("connected with a CA that did not sign the server's certificate");
        assert!(refused.contains("postgres://warden@localhost"), "{refused}");
        assert!(refused.to_lowercase().contains("certificate"), "{refused}");
        // The right CA connects.
        let ok = std::thread::spawn(move || {
            PostgresTarget::new(&url, Some(std::path::Path::new(&ca)), None)
                .unwrap()
                .connect()
                .is_ok()
        })
        .join()
        .unwrap();
        assert!(ok);
    }
}
