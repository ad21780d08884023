//! `warden coordinator init`, its pure part: where a new coordinator's files
//! go, the commented config it starts from, what exists already, and the
//! `[coordinator]` section its suppliers paste.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use crate::config::CoordinatorConfig;

/// Where the agents' CA goes on a supplier's machine, as the section says.
pub const AGENT_CA_PATH: &str = "/etc/warden/coordinator-ca.pem";

/// Why init would not go on.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{} already exist{}; pass --force to replace {} (the coordinator's signing key is kept either way)",
        list(.0), if .0.len() == 1 { "s" } else { "" }, if .0.len() == 1 { "it" } else { "them" })]
    Exists(Vec<PathBuf>),
    #[error("no --name given: name each DNS name or IP address agents reach this coordinator by (e.g. --name coord.example.com)")]
    NoName,
    #[error("--name {0:?} is neither a DNS name nor an IP address")]
    BadName(String),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The files init writes beside the config. The TLS pair sits where the
/// packaged unit hands it over as credentials (`LoadCredential=tls.crt:
/// /etc/warden/coordinator.crt`), since its dynamic user cannot read root's files.
#[derive(Debug, Clone, PartialEq)]
pub struct InitPaths {
    pub config: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The CA suppliers copy to [`AGENT_CA_PATH`].
    pub ca_cert: PathBuf,
}

impl InitPaths {
    pub fn beside(config: &Path) -> Self {
        let dir = config.parent().unwrap_or(Path::new("."));
        Self {
            config: config.to_owned(),
            tls_cert: dir.join("coordinator.crt"),
            tls_key: dir.join("coordinator.key"),
            ca_cert: dir.join("coordinator-ca.pem"),
        }
    }

    /// The files init would replace, of those `exists` says are there.
    pub fn taken(&self, exists: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
        [&self.config, &self.tls_cert, &self.tls_key, &self.ca_cert]
            .into_iter()
            .filter(|p| exists(p))
            .cloned()
            .collect()
    }

    /// Refuses to replace any of them unless `force`.
    pub fn check_free(&self, force: bool, exists: impl Fn(&Path) -> bool) -> Result<(), InitError> {
        match self.taken(exists) {
            taken if taken.is_empty() || force => Ok(()),
            taken => Err(InitError::Exists(taken)),
        }
    }
}

/// Checks the names for the server certificate; the first is the one
/// suppliers' agents use in their address.
pub fn check_names(names: &[String]) -> Result<(), InitError> {
    if names.is_empty() {
        return Err(InitError::NoName);
    }
    let dns = |n: &str| {
        !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    match names
        .iter()
        .find(|n| n.parse::<IpAddr>().is_err() && !dns(n))
    {
        Some(bad) => Err(InitError::BadName(bad.clone())),
        None => Ok(()),
    }
}

/// `https://NAME:PORT`, an IPv6 address in brackets.
pub fn agent_address(name: &str, port: u16) -> String {
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("https://[{ip}]:{port}"),
        _ => format!("https://{name}:{port}"),
    }
}

/// What goes into the config beyond the defaults.
pub struct ConfigChoices<'a> {
    pub state_dir: &'a Path,
    pub listen: SocketAddr,
    pub tls_cert: &'a Path,
    pub tls_key: &'a Path,
    /// SHA-256 (hex) of the join token; the token itself is never written here.
    pub join_token_sha256: &'a str,
}

fn dur(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The commented config: every key the coordinator reads, the chosen ones
/// set and the rest commented out at their defaults.
pub fn render_config(c: &ConfigChoices) -> String {
    let d = CoordinatorConfig::default();
    let (l, e, le, cl) = (&d.limits, &d.enrollment, &d.leases, &d.clusters);
    let w = &d.work_challenge;
    let state = c.state_dir.display();
    format!(
        r#"# Warden coordinator config (`warden coordinator init` writes one).
# Every key is shown; commented ones are at their default. Reference:
# /usr/share/doc/warden/config.md; setting up: /usr/share/doc/warden/coordinator.md.
# This file holds no secret (only the join token's digest): the packaged
# unit's dynamic user must be able to read it, so it is mode 0644.

# Signing key, database and admin socket.
state_dir = "{state}"
# The agents' gRPC endpoint (TLS).
listen = "{listen}"
# database = "{state}/coordinator.db"
# admin_socket = "{state}/admin.sock"
# The signing key verifiers and agents pin (`warden coordinator key` prints
# its public half). Never replace it: every agent would refuse the coordinator.
# key_file = "{state}/coordinator.key"

[tls]
# Under the packaged unit these stay unset: systemd hands the two files below
# over as credentials (LoadCredential=), since its dynamic user cannot read
# root's files. Set them to run the coordinator by hand as a user that can.
# cert = "{cert}"
# key = "{key}"

[enrollment]
# "token": a new node presents a join token whose SHA-256 is listed here.
# Add a token: `warden join-token`, append its digest; remove a digest to
# retire its token (nodes already enrolled stay).
policy = "token"
join_token_sha256 = ["{sha}"]
# Node ids that may register without a token.
# allow = []
# new_nodes_per_minute = {npm}
# new_nodes_per_minute_per_ip = {npmip}

[leases]
# challenge_interval = "{ci}"
# challenge_deadline = "{cd}"
# min_coverage = {mc}

[limits]
# max_connections = {mx}
# max_connections_per_ip = {mxip}
# handshake_timeout = "{ht}"
# idle_timeout = "{it}"
# node_envelopes_per_second = {nes}
# node_bytes_per_second = {nbs}
# node_storage_bytes = {nsb}

[clusters]
# min_duration = "{md}"
# replace_after = "{ra}"

# Work challenges (config.md, attestation.md#work-challenge): a GPU is
# offered to hires only once a seeded matrix product on it passed.
[work_challenge]
# enabled = {we}
# interval = "{wi}"
# retry = "{wr}"
# fill = {wf:?}
# max_n = {wn}
# target = "{wt}"
# allowance = "{wa}"
# slack = {ws:?}
# spot_tiles = {wk}
# unknown_tops = {wu:?}
"#,
        listen = c.listen,
        cert = c.tls_cert.display(),
        key = c.tls_key.display(),
        sha = c.join_token_sha256,
        npm = e.new_nodes_per_minute,
        npmip = e.new_nodes_per_minute_per_ip,
        ci = dur(le.challenge_interval),
        cd = dur(le.challenge_deadline),
        mc = le.min_coverage,
        mx = l.max_connections,
        mxip = l.max_connections_per_ip,
        ht = dur(l.handshake_timeout),
        it = dur(l.idle_timeout),
        nes = l.node_envelopes_per_second,
        nbs = l.node_bytes_per_second,
        nsb = l.node_storage_bytes,
        md = dur(cl.min_duration),
        ra = dur(cl.replace_after),
        we = w.enabled,
        wi = dur(w.interval),
        wr = dur(w.retry),
        wf = w.fill,
        wn = w.max_n,
        wt = dur(w.target),
        wa = dur(w.allowance),
        ws = w.slack,
        wk = w.spot_tiles,
        wu = w.unknown_tops,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices<'a>(sha: &'a str) -> ConfigChoices<'a> {
        ConfigChoices {
            state_dir: Path::new("/var/lib/warden-coordinator"),
            listen: "0.0.0.0:7443".parse().unwrap(),
            tls_cert: Path::new("/etc/warden/coordinator.crt"),
            tls_key: Path::new("/etc/warden/coordinator.key"),
            join_token_sha256: sha,
        }
    }

    #[test]
    fn the_config_parses_with_the_coordinators_loader_and_holds_the_digest() {
        let (token, sha) = crate::enrollment::new_token();
        let text = render_config(&choices(&sha));
        assert!(!text.contains(&token));
        let cfg = CoordinatorConfig::parse(&text, "init").unwrap();
        assert_eq!(cfg.enrollment.join_token_sha256, vec![sha.clone()]);
        assert_eq!(
            cfg.enrollment_policy().unwrap(),
            crate::config::EnrollmentPolicy::Token
        );
        assert_eq!(cfg.state_dir, Path::new("/var/lib/warden-coordinator"));
        assert_eq!(cfg.tls.cert, None, "the unit's credentials fill it");
        // Every commented key is a real one at its default: uncommented,
        // the file still parses, to the same values.
        let open: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") && !kv.contains('`') => kv,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(open.contains("\nmax_connections = "), "{open}");
        let all = CoordinatorConfig::parse(&open, "uncommented").unwrap();
        assert_eq!(all.limits, cfg.limits);
        assert_eq!(all.leases, cfg.leases);
        assert_eq!(all.clusters, cfg.clusters);
        assert_eq!(all.key_path(), cfg.key_path());
        assert_eq!(all.tls.cert.as_deref(), Some(choices(&sha).tls_cert));
    }

    /// What the package ships as /usr/share/doc/warden/examples/coordinator.toml.
    #[test]
    fn the_packaged_example_is_this_template() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/coordinator.toml");
        let want = render_config(&choices("SHA-256 of a join token (`warden join-token`)"));
        if std::env::var_os("WARDEN_BLESS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "packaging/coordinator.toml is not the template; rewrite it: \
             WARDEN_BLESS=1 cargo test -p warden-coordinator the_packaged_example"
        );
        // Used as is, it is refused, and the error says how to fill it in.
        let e = CoordinatorConfig::parse(&have, "example")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("join_token_sha256") && e.contains("warden join-token"),
            "{e}"
        );
    }

    #[test]
    fn existing_files_are_refused_unless_forced() {
        let p = InitPaths::beside(Path::new("/etc/warden/coordinator.toml"));
        assert_eq!(p.tls_key, Path::new("/etc/warden/coordinator.key"));
        p.check_free(false, |_| false).unwrap();
        let e = p
            .check_free(false, |f| f == p.config || f == p.tls_key)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/warden/coordinator.toml, /etc/warden/coordinator.key already exist"),
            "{e}"
        );
        assert!(
            e.contains("--force") && e.contains("signing key is kept"),
            "{e}"
        );
        p.check_free(true, |_| true).unwrap();
    }

    #[test]
    fn names_and_addresses() {
        assert!(matches!(check_names(&[]), Err(InitError::NoName)));
        check_names(&["coord.example.com".into(), "10.0.0.1".into(), "::1".into()]).unwrap();
        let e = check_names(&["https://x".into()]).unwrap_err().to_string();
        assert!(e.contains("https://x"), "{e}");
        assert_eq!(agent_address("localhost", 7443), "https://localhost:7443");
        assert_eq!(agent_address("::1", 7443), "https://[::1]:7443");
    }
}
