//! The coordinator's configuration: a TOML file over documented defaults.
//! Unknown keys and bad values are errors naming the key (see `docs/config.md`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::store::PostgresTarget;

/// Why a configuration could not be used: the one type the agent and the
/// coordinator share, so a config error reads the same from both.
pub use warden_state::config::ConfigError;

/// The whole coordinator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Holds the signing key, the database and the admin socket by default.
    pub state_dir: PathBuf,
    /// Address the agents' gRPC endpoint listens on (TLS).
    pub listen: SocketAddr,
    /// SQLite database; defaults to `<state_dir>/coordinator.db`. Not
    /// with `[postgres]`.
    pub database: Option<PathBuf>,
    /// A PostgreSQL database instead of SQLite: what replicas share.
    pub postgres: Option<PostgresConfig>,
    /// Admin unix socket (mode 0600); defaults to `<state_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// The coordinator's Ed25519 signing key; defaults to `<state_dir>/coordinator.key`.
    pub key_file: Option<PathBuf>,
    pub tls: TlsConfig,
    pub leases: LeasesConfig,
    pub enrollment: EnrollmentConfig,
    pub limits: LimitsConfig,
    pub clusters: ClustersConfig,
    pub work_challenge: WorkChallengeConfig,
}

/// `[work_challenge]`: proof that nodes' GPUs are real and the claimed
/// model (docs/attestation.md#work-challenge). Off by default: when on,
/// a GPU is offered to renters only once a challenge passed on it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkChallengeConfig {
    pub enabled: bool,
    /// A passed GPU is challenged again this long after.
    #[serde(with = "humantime_serde")]
    pub interval: std::time::Duration,
    /// A failed one is challenged again this long after.
    #[serde(with = "humantime_serde")]
    pub retry: std::time::Duration,
    /// Share of the GPU's memory the challenge's matrices fill (0 to 1].
    pub fill: f64,
    /// Upper bound on the matrix side (a multiple of 64).
    pub max_n: u32,
    /// GPU time the claimed model should spend on one challenge.
    #[serde(with = "humantime_serde")]
    pub target: std::time::Duration,
    /// Added to every deadline: container start and the answer's upload.
    #[serde(with = "humantime_serde")]
    pub allowance: std::time::Duration,
    /// The deadline allows this many times the claimed model's time (≥ 1).
    pub slack: f64,
    /// Tiles opened per round (1 to 64).
    pub spot_tiles: u32,
    /// int8 TOPS assumed for a model not in the table.
    pub unknown_tops: f64,
}

impl Default for WorkChallengeConfig {
    fn default() -> Self {
        let p = warden_proto::workproof::sizing::Policy::default();
        Self {
            enabled: false,
            interval: std::time::Duration::from_secs(3600),
            retry: std::time::Duration::from_secs(300),
            fill: p.fill,
            max_n: p.max_n,
            target: p.target,
            allowance: p.allowance,
            slack: p.slack,
            spot_tiles: p.spot_tiles,
            unknown_tops: p.unknown_tops,
        }
    }
}

impl WorkChallengeConfig {
    /// The gate's settings.
    pub fn settings(&self) -> crate::workgate::Settings {
        crate::workgate::Settings {
            interval: self.interval,
            retry: self.retry,
            sizing: warden_proto::workproof::sizing::Policy {
                fill: self.fill,
                max_n: self.max_n,
                target: self.target,
                allowance: self.allowance,
                slack: self.slack,
                spot_tiles: self.spot_tiles,
                unknown_tops: self.unknown_tops,
            },
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if !(self.fill > 0.0 && self.fill <= 1.0) {
            return bad(
                "work_challenge.fill",
                format!("{} is not in (0, 1]", self.fill),
            );
        }
        if self.max_n < 64 || self.max_n > warden_proto::workproof::MAX_N {
            return bad(
                "work_challenge.max_n",
                format!(
                    "{} is not between 64 and {}",
                    self.max_n,
                    warden_proto::workproof::MAX_N
                ),
            );
        }
        if self.slack.is_nan() || self.slack < 1.0 {
            return bad("work_challenge.slack", format!("{} is below 1", self.slack));
        }
        if !(1..=warden_proto::workproof::MAX_SPOT_TILES).contains(&self.spot_tiles) {
            return bad(
                "work_challenge.spot_tiles",
                format!(
                    "{} is not between 1 and {}",
                    self.spot_tiles,
                    warden_proto::workproof::MAX_SPOT_TILES
                ),
            );
        }
        if self.unknown_tops.is_nan() || self.unknown_tops <= 0.0 {
            return bad(
                "work_challenge.unknown_tops",
                format!("{} is not above 0", self.unknown_tops),
            );
        }
        if self.interval.is_zero() || self.retry.is_zero() {
            return bad(
                "work_challenge.interval",
                "interval and retry must be longer than zero".into(),
            );
        }
        Ok(())
    }
}

/// `[clusters]`: hired clusters.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClustersConfig {
    /// The shortest hire accepted: the seed's one hour. Lowered only by
    /// tests, which cannot wait an hour for a cluster to end.
    #[serde(with = "humantime_serde")]
    pub min_duration: std::time::Duration,
    /// How long a member's node may stay disconnected before the member
    /// is replaced (a lease that fails is replaced at once).
    #[serde(with = "humantime_serde")]
    pub replace_after: std::time::Duration,
}

impl Default for ClustersConfig {
    fn default() -> Self {
        Self {
            min_duration: crate::hire::MIN_DURATION,
            replace_after: crate::hire::REPLACE_AFTER,
        }
    }
}

/// Who may register a node that this coordinator has not seen before.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EnrollmentPolicy {
    /// Any TLS client may register a new node: `--dev`, or a private network.
    Open,
    /// A new node presents a join token whose SHA-256 is listed; nodes in
    /// `allow`, and nodes enrolled earlier with a token, need none.
    Token,
    /// Only the node ids listed in `allow`.
    Allowlist,
}

/// `[enrollment]`: the policy and its lists, and how fast new nodes may come.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    /// Required outside `--dev` (which defaults to open).
    pub policy: Option<EnrollmentPolicy>,
    /// SHA-256 (hex) of each join token accepted (`warden join-token` makes one).
    pub join_token_sha256: Vec<String>,
    /// Node ids (their key ids) that may register whatever the token.
    pub allow: Vec<String>,
    /// New nodes accepted per minute, in all (a burst of as many at once).
    pub new_nodes_per_minute: u32,
    /// New nodes accepted per minute from one source address.
    pub new_nodes_per_minute_per_ip: u32,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        Self {
            policy: None,
            join_token_sha256: Vec::new(),
            allow: Vec::new(),
            new_nodes_per_minute: 60,
            new_nodes_per_minute_per_ip: 10,
        }
    }
}

/// `[limits]`: what one client or node may hold or send.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections open at once, in all (also kept under the fd limit).
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_ip: usize,
    /// A TLS handshake not done by then is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: std::time::Duration,
    /// A connection with no RPC open for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: std::time::Duration,
    /// Envelopes (records and heartbeats) per second per node, over 5 s bursts.
    pub node_envelopes_per_second: u64,
    /// Payload bytes per second per node, over 5 s bursts.
    pub node_bytes_per_second: u64,
    /// Record payload bytes stored per node, at most.
    pub node_storage_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 8192,
            max_connections_per_ip: 256,
            handshake_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            node_envelopes_per_second: 1000,
            node_bytes_per_second: 1 << 20,
            node_storage_bytes: 16 << 30,
        }
    }
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

/// `[postgres]`: the PostgreSQL database the coordinator (and its
/// replicas) store in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/dbname`, or libpq `key=value` words.
    pub url: String,
    /// PEM of the CA that signed the server's certificate: TLS is then
    /// required and the server's name checked. Needed unless the
    /// database is on this host (a Unix socket or a loopback address).
    pub ca_cert: Option<PathBuf>,
    /// A file holding the password (mode 0600), rather than in `url`.
    pub password_file: Option<PathBuf>,
    /// Connections the store writes through at once (each node's writes
    /// on one of them); default 4.
    #[serde(default = "default_pg_connections")]
    pub connections: usize,
}

fn default_pg_connections() -> usize {
    4
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
            postgres: None,
            admin_socket: None,
            key_file: None,
            tls: TlsConfig::default(),
            leases: LeasesConfig::default(),
            enrollment: EnrollmentConfig::default(),
            limits: LimitsConfig::default(),
            clusters: ClustersConfig::default(),
            work_challenge: WorkChallengeConfig::default(),
        }
    }
}

impl CoordinatorConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = warden_state::config::read(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = warden_state::config::parse_toml(text, origin)?;
        cfg.work_challenge.check()?;
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
        if cfg.clusters.min_duration.is_zero() {
            return Err(ConfigError::Invalid {
                key: "clusters.min_duration",
                reason: "must be longer than zero".into(),
            });
        }
        if cfg.clusters.replace_after.is_zero() {
            return Err(ConfigError::Invalid {
                key: "clusters.replace_after",
                reason:
                    "must be longer than zero (a member would be replaced at its first reconnect)"
                        .into(),
            });
        }
        if let Some(n) = cfg.postgres.as_ref().map(|p| p.connections) {
            if !(1..=64).contains(&n) {
                return Err(ConfigError::Invalid {
                    key: "postgres.connections",
                    reason: format!("{n} is not between 1 and 64"),
                });
            }
        }
        if cfg.postgres.is_some() && cfg.database.is_some() {
            return Err(ConfigError::Invalid {
                key: "database",
                reason: "is a SQLite file, and [postgres] names a PostgreSQL database: keep one"
                    .into(),
            });
        }
        cfg.validate_enrollment()?;
        cfg.validate_limits()?;
        Ok(cfg)
    }

    /// The PostgreSQL database to open, when `[postgres]` names one: its
    /// password read from `password_file`, which must be private.
    pub fn postgres_target(&self) -> Result<Option<PostgresTarget>, ConfigError> {
        let Some(pg) = &self.postgres else {
            return Ok(None);
        };
        let password = match &pg.password_file {
            None => None,
            Some(path) => Some(read_secret(path, "postgres.password_file")?),
        };
        PostgresTarget::new(&pg.url, pg.ca_cert.as_deref(), password.as_deref())
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                key: "postgres",
                reason: e.to_string(),
            })
    }

    fn validate_enrollment(&self) -> Result<(), ConfigError> {
        let e = &self.enrollment;
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if let Some(t) = e
            .join_token_sha256
            .iter()
            .find(|t| t.len() != 64 || hex::decode(t).is_err())
        {
            return invalid(
                "enrollment.join_token_sha256",
                format!(
                    "{t:?} is not a SHA-256 in hex (64 characters); `warden join-token` prints one"
                ),
            );
        }
        if let Some(n) = e.allow.iter().find(|n| !is_node_id(n)) {
            return invalid(
                "enrollment.allow",
                format!("{n:?} is not a node id (32 hex characters, as `warden status` and `warden nodes` show)"),
            );
        }
        match e.policy {
            Some(EnrollmentPolicy::Token) if e.join_token_sha256.is_empty() => invalid(
                "enrollment.join_token_sha256",
                "is empty, so the token policy would let no new node in; add the SHA-256 of a token (`warden join-token` makes one)".into(),
            ),
            Some(EnrollmentPolicy::Allowlist) if e.allow.is_empty() => invalid(
                "enrollment.allow",
                "is empty, so the allowlist policy would let no node in; list the node ids that may register".into(),
            ),
            Some(EnrollmentPolicy::Allowlist) if !e.join_token_sha256.is_empty() => invalid(
                "enrollment.join_token_sha256",
                "is set but the policy is \"allowlist\", which takes no tokens; use policy = \"token\" to accept both".into(),
            ),
            Some(EnrollmentPolicy::Open) if !e.allow.is_empty() || !e.join_token_sha256.is_empty() => invalid(
                "enrollment.policy",
                "is \"open\" (any node may register) but tokens or an allowlist are set; choose \"token\" or \"allowlist\" for them to count".into(),
            ),
            _ if e.new_nodes_per_minute == 0 || e.new_nodes_per_minute_per_ip == 0 => invalid(
                "enrollment.new_nodes_per_minute",
                "and new_nodes_per_minute_per_ip must be at least 1".into(),
            ),
            _ => Ok(()),
        }
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let checks: [(&'static str, bool); 7] = [
            ("limits.max_connections", l.max_connections == 0),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip == 0,
            ),
            ("limits.handshake_timeout", l.handshake_timeout.is_zero()),
            ("limits.idle_timeout", l.idle_timeout.is_zero()),
            (
                "limits.node_envelopes_per_second",
                l.node_envelopes_per_second == 0,
            ),
            ("limits.node_bytes_per_second", l.node_bytes_per_second == 0),
            ("limits.node_storage_bytes", l.node_storage_bytes == 0),
        ];
        match checks.iter().find(|(_, bad)| *bad) {
            Some((key, _)) => Err(ConfigError::Invalid {
                key,
                reason: "must be more than zero".into(),
            }),
            None => Ok(()),
        }
    }

    /// The enrollment policy; outside `--dev` the operator must choose one,
    /// so a coordinator facing the internet is never open by accident.
    pub fn enrollment_policy(&self) -> Result<EnrollmentPolicy, ConfigError> {
        self.enrollment.policy.ok_or(ConfigError::Invalid {
            key: "enrollment.policy",
            reason: "is required (outside --dev): choose who may register a new node. \
                     \"token\": nodes present a join token (run `warden join-token`, put its SHA-256 in enrollment.join_token_sha256 and the token in each agent's coordinator.join_token); \
                     \"allowlist\": only the node ids in enrollment.allow; \
                     \"open\": any TLS client may register a node (only on a network you trust)"
                .into(),
        })
    }

    /// The TLS certificate and key paths, which production needs.
    /// Under systemd the packaged unit hands the TLS certificate and key
    /// over as credentials (`LoadCredential=tls.crt:…`), since its dynamic
    /// user cannot read root's files: from `dir` (`$CREDENTIALS_DIRECTORY`)
    /// they fill `tls.cert` and `tls.key` unless the config sets them; so
    /// does `postgres.password` fill `postgres.password_file`.
    pub fn take_credentials(&mut self, dir: Option<&Path>) {
        let Some(dir) = dir else { return };
        let found = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
        if self.tls.cert.is_none() {
            self.tls.cert = found("tls.crt");
        }
        if self.tls.key.is_none() {
            self.tls.key = found("tls.key");
        }
        if let Some(pg) = self.postgres.as_mut().filter(|p| p.password_file.is_none()) {
            pg.password_file = found("postgres.password");
        }
    }

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

/// A node id: the key id of its Ed25519 key, 32 lowercase hex characters.
pub fn is_node_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A secret's file, trimmed: refused unless only its owner may read it.
fn read_secret(path: &Path, key: &'static str) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let invalid = |reason: String| ConfigError::Invalid { key, reason };
    let meta = std::fs::metadata(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "{} may be read by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_challenge_values_out_of_range_are_refused_naming_the_key() {
        let c = CoordinatorConfig::parse("", "t").unwrap();
        assert!(!c.work_challenge.enabled);
        for (toml, key) in [
            ("spot_tiles = 0", "work_challenge.spot_tiles"),
            ("spot_tiles = 65", "work_challenge.spot_tiles"),
            ("fill = 0.0", "work_challenge.fill"),
            ("fill = 1.5", "work_challenge.fill"),
            ("slack = 0.5", "work_challenge.slack"),
            ("slack = nan", "work_challenge.slack"),
            ("max_n = 10", "work_challenge.max_n"),
            ("unknown_tops = 0.0", "work_challenge.unknown_tops"),
            ("interval = \"0s\"", "work_challenge.interval"),
        ] {
            let e = CoordinatorConfig::parse(&format!("[work_challenge]\n{toml}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let c = CoordinatorConfig::parse(
            "[work_challenge]\nenabled = true\nmax_n = 128\nspot_tiles = 8\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.work_challenge.settings().sizing.max_n, 128);
    }

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
    fn enrollment_policy_must_be_chosen_and_its_lists_fit_it() {
        let c = CoordinatorConfig::parse("", "t").unwrap();
        let e = c.enrollment_policy().unwrap_err().to_string();
        for word in [
            "enrollment.policy",
            "\"token\"",
            "\"allowlist\"",
            "\"open\"",
            "coordinator.join_token",
        ] {
            assert!(e.contains(word), "{word}: {e}");
        }
        let c = CoordinatorConfig::parse("[enrollment]\npolicy = \"open\"\n", "t").unwrap();
        assert_eq!(c.enrollment_policy().unwrap(), EnrollmentPolicy::Open);
        let sha = "ab".repeat(32);
        let node = "0123456789abcdef0123456789abcdef";
        let ok = [
            format!("policy = \"token\"\njoin_token_sha256 = [\"{sha}\"]\n"),
            format!("policy = \"token\"\njoin_token_sha256 = [\"{sha}\"]\nallow = [\"{node}\"]\n"),
            format!("policy = \"allowlist\"\nallow = [\"{node}\"]\n"),
        ];
        for t in ok {
            CoordinatorConfig::parse(&format!("[enrollment]\n{t}"), "t").unwrap();
        }
        let bad = [
            ("policy = \"token\"\n".to_owned(), "join_token_sha256"),
            ("policy = \"allowlist\"\n".to_owned(), "enrollment.allow"),
            (
                format!("policy = \"open\"\nallow = [\"{node}\"]\n"),
                "enrollment.policy",
            ),
            (
                format!(
                    "policy = \"token\"\njoin_token_sha256 = [\"{}\"]\n",
                    "ab".repeat(31)
                ),
                "join_token_sha256",
            ),
            (
                format!("policy = \"allowlist\"\nallow = [\"{}\"]\n", "XYZ"),
                "enrollment.allow",
            ),
            ("policy = \"closed\"\n".to_owned(), "policy"),
        ];
        for (t, key) in bad {
            let e = CoordinatorConfig::parse(&format!("[enrollment]\n{t}"), "t").unwrap_err();
            assert!(e.to_string().contains(key), "{t}: {e}");
        }
        let e = CoordinatorConfig::parse("[limits]\nidle_timeout = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("limits.idle_timeout"), "{e}");
    }

    #[test]
    fn unknown_key_and_bad_address_are_named() {
        let e = CoordinatorConfig::parse("[tls]\ncertificate = \"x\"\n", "c.toml").unwrap_err();
        assert!(e.to_string().contains("unknown field `certificate`"), "{e}");
        let e = CoordinatorConfig::parse("listen = \"nowhere\"\n", "c.toml").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }

    #[test]
    fn systemd_credentials_fill_only_the_tls_paths_the_config_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), "cert").unwrap();
        let mut cfg = CoordinatorConfig::default();
        cfg.take_credentials(Some(dir.path()));
        assert_eq!(cfg.tls.cert, Some(dir.path().join("tls.crt")));
        assert_eq!(cfg.tls.key, None, "no tls.key credential was passed");

        let mut cfg = CoordinatorConfig::default();
        cfg.tls.cert = Some("/etc/mine.pem".into());
        cfg.take_credentials(Some(dir.path()));
        assert_eq!(cfg.tls.cert, Some(PathBuf::from("/etc/mine.pem")));

        let mut cfg = CoordinatorConfig::default();
        cfg.take_credentials(None);
        assert_eq!(cfg.tls.cert, None);
    }

    #[test]
    fn the_postgres_password_comes_from_a_private_file_or_the_units_credential() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let secret = creds.join("postgres.password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = CoordinatorConfig::parse(
            "[postgres]\nurl = \"postgres://warden@127.0.0.1/warden\"\n",
            "t",
        )
        .unwrap();
        c.take_credentials(Some(&creds));
        assert_eq!(
            c.postgres.as_ref().unwrap().password_file,
            Some(secret.clone())
        );
        // Readable by others: refused, naming the key and the fix.
        let err = c.postgres_target().err().unwrap().to_string();
        assert!(
            err.contains("postgres.password_file") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = c.postgres_target().unwrap().unwrap();
        assert_eq!(t.to_string(), "postgres://warden@127.0.0.1:5432/warden");
        // Both stores at once: refused.
        let err = CoordinatorConfig::parse(
            "database = \"/x.db\"\n[postgres]\nurl = \"postgres://w@127.0.0.1/w\"\n",
            "t",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("database") && err.contains("keep one"),
            "{err}"
        );
    }
}
