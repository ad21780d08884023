//! `warden coordinator`: the reference coordinator; `coordinator init`, which
//! sets a new one up; `coordinator key`, the public key verifiers pin;
//! `warden join-token` for its enrollment.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::Subcommand;
use warden_agent::config::CoordinatorLink;
use warden_coordinator::{
    config::{EnrollmentPolicy, DEFAULT_STATE_DIR},
    init::{self, ConfigChoices, InitPaths},
    CoordinatorConfig, TlsPem,
};

use crate::{
    dev,
    settings::{load_coordinator_config, COORDINATOR_CONFIG},
    signals::shutdown_on_signal,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Option<CoordinatorCommand>,
    /// Coordinator config file [default: /etc/warden/coordinator.toml when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use throwaway TLS certificates made in the state directory.
    #[arg(long)]
    dev: bool,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Listen address for agents (overrides the config's listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        match self.command {
            Some(CoordinatorCommand::Key { config, json }) => coordinator_key(config, json),
            Some(CoordinatorCommand::Init(a)) => coordinator_init(a),
            None => run_coordinator(self.config, self.dev, self.state_dir, self.listen).await,
        }
    }
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Print the coordinator's public key (what verifiers pin) without
    /// starting it.
    Key {
        /// Coordinator config file [default: /etc/warden/coordinator.toml when it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Set up a new coordinator: a commented config, its signing key, a
    /// self-signed CA and server certificate, a join token; prints what
    /// suppliers paste into their agent.toml.
    Init(InitArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Config file to write; the TLS files go beside it.
    #[arg(long, default_value = COORDINATOR_CONFIG)]
    config: PathBuf,
    /// The coordinator's state directory (signing key, database).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// DNS name or IP address agents reach the coordinator by, put in its
    /// certificate; repeat for more. The first goes into the agents' address.
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
    /// Listen address for agents.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Replace an existing config and TLS files (never the signing key).
    #[arg(long)]
    force: bool,
}

async fn run_coordinator(
    config: Option<PathBuf>,
    dev: bool,
    state_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<()> {
    if let Some(path) = config.as_deref().filter(|p| !p.exists()) {
        anyhow::bail!(
            "no coordinator config at {}: run `warden coordinator init --name HOST` to write one \
             (see /usr/share/doc/warden/coordinator.md)",
            path.display()
        );
    }
    let mut cfg = load_coordinator_config(config)?;
    if let Some(d) = state_dir {
        cfg.state_dir = d;
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if dev {
        // Dev mode enrolls anyone unless its config chose otherwise.
        cfg.enrollment.policy.get_or_insert(EnrollmentPolicy::Open);
    }
    // Before the TLS files: who may enroll is the first thing to decide.
    cfg.enrollment_policy()?;
    cfg.take_credentials(
        std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(PathBuf::from)
            .as_deref(),
    );
    let shutdown = shutdown_on_signal();
    let (tls, ca) = if dev {
        let t = warden_coordinator::devtls::ensure(&cfg.state_dir.join("tls"))?;
        (t.server, Some(t.ca_cert))
    } else {
        (TlsPem::from_config(&cfg)?, None)
    };
    let running = warden_coordinator::start(&cfg, tls, shutdown).await?;
    if let Some(ca) = ca {
        // Agents started by hand (and the tests) read their [coordinator] section from here.
        let link = dev::link(running.addr.port(), &running.public_key.to_base64(), &ca);
        let path = cfg.state_dir.join("agent-link.toml");
        // Whole or absent: whoever waits for the file never reads half of it.
        warden_state::file::write_private(&path, dev::link_toml(&link).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "agents connect with the [coordinator] section in {}",
            path.display()
        );
    }
    println!(
        "coordinator listening on {} (key {}); admin socket {}",
        running.addr,
        running.public_key.to_base64(),
        running.admin_socket.display()
    );
    running.wait().await?;
    Ok(())
}

/// Prints a new join token and the line the coordinator's config needs.
pub fn join_token() {
    let (token, sha) = warden_coordinator::enrollment::new_token();
    println!(
        "# For each agent, in /etc/warden/agent.toml (keep the file private: chmod 600):\n\
         [coordinator]\n\
         join_token = \"{token}\"\n\
         \n\
         # For the coordinator, in /etc/warden/coordinator.toml (only the digest; it is not a secret):\n\
         [enrollment]\n\
         policy = \"token\"\n\
         join_token_sha256 = [\"{sha}\"]"
    );
}

/// `warden coordinator key`: the public half of the coordinator's signing
/// key, read from its key file (never made here: the coordinator makes it
/// on its first start).
fn coordinator_key(config: Option<PathBuf>, json: bool) -> Result<()> {
    let cfg = load_coordinator_config(config)?;
    let path = cfg.key_path();
    if !path.exists() {
        anyhow::bail!(
            "no coordinator key at {} yet: `warden coordinator init` makes it, or the coordinator when it first starts",
            path.display()
        );
    }
    let key = warden_proto::identity::load(&path)?.verifying_key();
    if json {
        println!(
            "{}",
            serde_json::json!({"public_key": key.to_base64(), "key_id": key.key_id(), "key_file": path})
        );
    } else {
        println!("{}", key.to_base64());
        println!("# key id {} ({})", key.key_id(), path.display());
    }
    Ok(())
}

/// `warden coordinator init`: checks first, then the key, the TLS files and
/// the config last, so a config in place means the rest is there too.
fn coordinator_init(a: InitArgs) -> Result<()> {
    init::check_names(&a.names)?;
    let paths = InitPaths::beside(&a.config);
    paths.check_free(a.force, Path::exists)?;
    let (token, sha) = warden_coordinator::enrollment::new_token();
    let text = init::render_config(&ConfigChoices {
        state_dir: &a.state_dir,
        listen: a.listen,
        tls_cert: &paths.tls_cert,
        tls_key: &paths.tls_key,
        join_token_sha256: &sha,
    });
    // Read back by the coordinator's own loader before anything is written.
    let cfg = CoordinatorConfig::parse(&text, &a.config.display().to_string())?;
    cfg.check_paths()?;

    // The coordinator's own key code: an existing key is loaded and kept.
    let key_path = cfg.key_path();
    let (signer, created) = warden_coordinator::server::load_signing_key(&key_path)?;
    let public_key = signer.verifying_key();

    if let Some(dir) = paths
        .tls_cert
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let made =
        warden_coordinator::devtls::self_signed(&a.names, "Warden coordinator CA", &a.names[0])
            .context("making the TLS certificates")?;
    write_file(&paths.tls_key, &made.key_pem, 0o600)?;
    // Certificates are public; suppliers copy the CA.
    write_file(&paths.tls_cert, &made.cert_pem, 0o644)?;
    write_file(&paths.ca_cert, &made.ca_pem, 0o644)?;
    // No secret in it, and the unit's dynamic user must read it.
    write_file(&paths.config, &text, 0o644)?;

    let link = CoordinatorLink {
        address: init::agent_address(&a.names[0], a.listen.port()).into(),
        public_key: public_key.to_base64(),
        ca_cert: PathBuf::from(init::AGENT_CA_PATH),
        server_name: None,
        join_token: Some(token),
    };
    println!("wrote {}", paths.config.display());
    println!(
        "wrote {} and {} (server certificate for {}), signed by the CA {}",
        paths.tls_cert.display(),
        paths.tls_key.display(),
        a.names.join(", "),
        paths.ca_cert.display()
    );
    if created {
        println!("created the signing key {}", key_path.display());
    } else {
        println!(
            "kept the existing signing key {} (agents that pin it keep working)",
            key_path.display()
        );
    }
    if a.force {
        println!("the join token and the CA are new: tokens issued before no longer enroll new nodes (enrolled nodes stay), and every supplier copies the new CA");
    }
    println!(
        "\nFor each supplier: copy {} to {} on the node, and put this in /etc/warden/agent.toml\n\
         (keep that file private, chmod 600: the join token lets a new node in):\n",
        paths.ca_cert.display(),
        init::AGENT_CA_PATH
    );
    print!("{}", dev::link_toml(&link));
    println!("\nThen start the coordinator: systemctl start warden-coordinator");
    Ok(())
}

/// Writes `text` whole (never half a file) and sets its mode.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    warden_state::file::write_private(path, text.as_bytes())
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .with_context(|| format!("writing {}", path.display()))
}
