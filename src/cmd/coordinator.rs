//! `warden coordinator`: the reference coordinator, and `coordinator key`,
//! the public key verifiers pin; `warden join-token` for its enrollment.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use warden_coordinator::{config::EnrollmentPolicy, TlsPem};

use crate::{dev, settings::load_coordinator_config, signals::shutdown_on_signal};

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
}

async fn run_coordinator(
    config: Option<PathBuf>,
    dev: bool,
    state_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<()> {
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
    cfg.take_tls_credentials(
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
            "no coordinator key at {} yet: the coordinator makes it when it first starts",
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
