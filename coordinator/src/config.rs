//! The coordinator's configuration: a TOML file over documented defaults.
//! Unknown keys and bad values are errors naming the key (see `docs/config.md`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The whole coordinator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Holds the signing key, the database and the admin socket by default.
    pub state_dir: PathBuf,
    /// Address the agents' gRPC endpoint listens on (TLS).
    pub listen: SocketAddr,
    /// SQLite database; defaults to `<state_dir>/coordinator.db`.
    pub database: Option<PathBuf>,
    /// Admin unix socket (mode 0600); defaults to `<state_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// The coordinator's Ed25519 signing key; defaults to `<state_dir>/coordinator.key`.
    pub key_file: Option<PathBuf>,
    pub tls: TlsConfig,
    pub leases: LeasesConfig,
}

/// How leases are watched: challenges and the verdict's threshold.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeasesConfig {
    /// Mean time between challenges to each running lease (each gap is drawn
    /// uniformly from half to one and a half of it); 0 sends none.
    #[serde(with = "humantime_serde")]
    pub challenge_interval: std::time::Duration,
    /// How long a node has to put a challenge's nonce in an attestation.
    #[serde(with = "humantime_serde")]
    pub challenge_deadline: std::time::Duration,
    /// Least coverage for a lease's proof to hold.
    pub min_coverage: f64,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        Self {
            challenge_interval: std::time::Duration::from_secs(60),
            challenge_deadline: std::time::Duration::from_secs(30),
            min_coverage: 0.9,
        }
    }
}

/// Server certificate and key, PEM. Required outside `--dev`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Default state directory of a packaged coordinator.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/warden-coordinator";

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            database: None,
            admin_socket: None,
            key_file: None,
            tls: TlsConfig::default(),
            leases: LeasesConfig::default(),
        }
    }
}

impl CoordinatorConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let m = cfg.leases.min_coverage;
        if !(0.0..=1.0).contains(&m) {
            return Err(ConfigError::Invalid {
                key: "leases.min_coverage",
                reason: format!("{m} is not between 0 and 1"),
            });
        }
        if cfg.leases.challenge_deadline.is_zero() {
            return Err(ConfigError::Invalid {
                key: "leases.challenge_deadline",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(cfg)
    }

    /// The TLS certificate and key paths, which production needs.
    pub fn tls_paths(&self) -> Result<(PathBuf, PathBuf), ConfigError> {
        let cert = self.tls.cert.clone().ok_or(ConfigError::Invalid {
            key: "tls.cert",
            reason: "is required (a PEM certificate for the agents' endpoint); or run with --dev for throwaway certificates".into(),
        })?;
        let key = self.tls.key.clone().ok_or(ConfigError::Invalid {
            key: "tls.key",
            reason: "is required (the PEM private key of tls.cert)".into(),
        })?;
        Ok((cert, key))
    }

    pub fn database_path(&self) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| self.state_dir.join("coordinator.db"))
    }

    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.sock"))
    }

    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("coordinator.key"))
    }

    /// The lock that keeps one coordinator per state directory.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join(warden_state::lock::LOCK_FILE)
    }

    /// The lock that keeps one coordinator per database: beside it, named after it.
    pub fn database_lock_path(&self) -> PathBuf {
        with_suffix(&self.database_path(), ".lock")
    }

    /// Refuses an admin socket on one of the coordinator's own files (the
    /// socket would replace it), whether or not the file exists yet.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        let socket = self.admin_socket_path();
        let database = self.database_path();
        let own = [
            (self.state_dir.clone(), "state directory"),
            (database.clone(), "database"),
            (with_suffix(&database, "-wal"), "database's write-ahead log"),
            (
                with_suffix(&database, "-shm"),
                "database's shared memory file",
            ),
            (self.key_path(), "signing key"),
            (self.lock_path(), "lock file"),
            (self.database_lock_path(), "database's lock file"),
        ];
        match own.iter().find(|(p, _)| *p == socket) {
            Some((_, what)) => Err(ConfigError::Invalid {
                key: "admin_socket",
                reason: format!(
                    "{} is the coordinator's {what}; give the socket a path of its own (default <state_dir>/admin.sock)",
                    socket.display()
                ),
            }),
            None => Ok(()),
        }
    }
}

/// `path` with `suffix` appended to its last component.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = CoordinatorConfig::parse("", "t").unwrap();
        assert_eq!(c.listen.port(), 7443);
        assert_eq!(
            c.database_path(),
            PathBuf::from("/var/lib/warden-coordinator/coordinator.db")
        );
        assert!(matches!(
            c.tls_paths(),
            Err(ConfigError::Invalid {
                key: "tls.cert",
                ..
            })
        ));
    }

    #[test]
    fn an_admin_socket_on_the_database_or_the_key_is_refused() {
        for (socket, what) in [
            ("/s/coordinator.db", "database"),
            ("/s/coordinator.key", "signing key"),
            ("/s/coordinator.db-wal", "write-ahead log"),
        ] {
            let c = CoordinatorConfig::parse(
                &format!("state_dir = \"/s\"\nadmin_socket = \"{socket}\"\n"),
                "c.toml",
            )
            .unwrap();
            let e = c.check_paths().unwrap_err().to_string();
            assert!(e.contains("`admin_socket`"), "{e}");
            assert!(e.contains(socket) && e.contains(what), "{e}");
        }
        let c = CoordinatorConfig::parse("state_dir = \"/s\"\n", "c.toml").unwrap();
        c.check_paths().unwrap();
    }

    #[test]
    fn unknown_key_and_bad_address_are_named() {
        let e = CoordinatorConfig::parse("[tls]\ncertificate = \"x\"\n", "c.toml").unwrap_err();
        assert!(e.to_string().contains("unknown field `certificate`"), "{e}");
        let e = CoordinatorConfig::parse("listen = \"nowhere\"\n", "c.toml").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }
}
