//! `warden agent`: the node agent under systemd, or with `--dev` an
//! embedded coordinator and an agent in one process for a newcomer.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use warden_coordinator::{config::EnrollmentPolicy, CoordinatorConfig};

use crate::{
    dev,
    settings::{agent_config, config_path, load_agent_config, AGENT_CONFIG},
    signals::{reload_on_sighup, shutdown_on_signal},
};

#[derive(clap::Args)]
pub struct Args {
    /// Agent config file [default: /etc/warden/agent.toml when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run an embedded coordinator too, with throwaway TLS, in one process.
    #[arg(long)]
    dev: bool,
    /// State directory (overrides the config's state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The NVML library (overrides gpu.nvml_library).
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        let Args {
            config,
            dev,
            state_dir,
            nvml_lib,
        } = self;
        if dev {
            run_dev(config, state_dir, nvml_lib).await
        } else {
            run_service(config, state_dir, nvml_lib).await
        }
    }
}

/// The agent as a service: its config file, re-read on SIGHUP.
async fn run_service(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    nvml_lib: Option<PathBuf>,
) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let reloads = reload_on_sighup();
    let file = config.clone().unwrap_or_else(|| AGENT_CONFIG.into());
    // The default file is read if it exists at the time, at start or reload.
    let load = move || {
        let file = config_path(config.clone(), AGENT_CONFIG);
        agent_config(file.as_deref(), state_dir.as_deref(), nvml_lib.as_deref())
    };
    let cfg = load()?;
    let reload = warden_agent::Reloader {
        requests: reloads,
        load: Box::new(load),
        file,
    };
    Ok(warden_agent::run(cfg, Some(reload), shutdown).await?)
}

/// Dev mode: a coordinator on loopback with throwaway TLS, and an agent
/// pointed at it, in a fresh private directory unless one is given.
async fn run_dev(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    nvml_lib: Option<PathBuf>,
) -> Result<()> {
    // Ctrl-C first ends this run's leases (through the coordinator, so
    // their proofs are made), then stops both halves: a newcomer who then
    // deletes the directory leaves no container behind.
    let signal = shutdown_on_signal();
    let shutdown = CancellationToken::new();
    let reloads = reload_on_sighup();
    let mut cfg = load_agent_config(config)?;
    if let Some(l) = nvml_lib {
        cfg.gpu.nvml_library = Some(l);
    }
    // Dev mode makes its config in code: SIGHUP only says so.
    let mut reloads = reloads;
    tokio::spawn(async move {
        while reloads.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP ignored: --dev has no config file to re-read; restart to change settings"
            );
        }
    });

    // A given directory must be a private one of ours; by default a fresh
    // one, since any user can prepare a predictable name in a shared $TMPDIR
    // (with links into root's files) before root runs --dev.
    let fresh = state_dir.is_none();
    let root = match state_dir {
        Some(d) => {
            warden_state::dir::ensure_private(&d)?;
            d
        }
        None => warden_state::dir::fresh_private(&std::env::temp_dir(), "warden-dev.")?,
    };
    let mut coord_cfg = CoordinatorConfig {
        state_dir: root.join("coordinator"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..CoordinatorConfig::default()
    };
    // Dev mode enrolls anyone: it listens on loopback only.
    coord_cfg.enrollment.policy = Some(EnrollmentPolicy::Open);
    let tls = warden_coordinator::devtls::ensure(&root.join("tls"))?;
    let coordinator = warden_coordinator::start(&coord_cfg, tls.server, shutdown.clone()).await?;
    cfg.state_dir = root.join("agent");
    cfg.coordinator = Some(dev::link(
        coordinator.addr.port(),
        &coordinator.public_key.to_base64(),
        &tls.ca_cert,
    ));
    // A second dev agent (or anything else on the port) must not stop a
    // newcomer; the banner says where metrics went instead.
    let mut metrics_moved = None;
    if std::net::TcpListener::bind(&cfg.metrics.listen).is_err() {
        metrics_moved = Some(std::mem::replace(
            &mut cfg.metrics.listen,
            "127.0.0.1:0".into(),
        ));
    }
    cfg.validate()?;
    let exe = std::env::current_exe().unwrap_or_else(|_| "warden".into());
    // Made now (the agent would make it at start) so the banner can name the node.
    warden_state::dir::ensure_private(&cfg.state_dir)?;
    let (signer, _) = warden_proto::identity::load_or_create(&cfg.key_file())?;
    println!(
        "\nWarden dev mode: an embedded coordinator and an agent in one process.\n\
         \n  state dir          {root}{fresh}\
         \n  coordinator        https://localhost:{port} (TLS, CA {ca})\
         \n  coordinator key    {key}\
         \n  coordinator db     {db}\
         \n  metrics            {metrics}\
         \n\nIn another shell, so that `warden` finds this agent and its coordinator:\
         \n\n  export WARDEN_SOCKET={status} WARDEN_ADMIN_SOCKET={admin}\
         \n\n  {exe} status\
         \n  {exe} nodes\
         \n  {exe} lease start {node} --image IMAGE -- CMD\
         \n\nPress Ctrl-C to stop (the leases this run started are ended).\n",
        root = root.display(),
        fresh = if fresh {
            " (new for this run; --state-dir DIR keeps one across runs)"
        } else {
            ""
        },
        port = coordinator.addr.port(),
        ca = tls.ca_cert.display(),
        key = coordinator.public_key.to_base64(),
        db = coordinator.database,
        exe = exe.display(),
        status = cfg.status_socket().display(),
        admin = coordinator.admin_socket.display(),
        node = signer.key_id(),
        metrics = match &metrics_moved {
            Some(taken) => format!(
                "{taken} is in use (another agent?): on a free port instead, which `warden status` shows"
            ),
            None if cfg.metrics.listen.ends_with(":0") => {
                "on a free port (`warden status` shows it)".to_owned()
            }
            None => format!("http://{}/metrics", cfg.metrics.listen),
        },
    );
    let admin = coordinator.admin_socket.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signal.cancelled().await;
        end_dev_leases(&admin).await;
        stop.cancel();
    });
    let agent = warden_agent::run(cfg, None, shutdown.clone()).await;
    shutdown.cancel();
    coordinator.wait().await?;
    Ok(agent?)
}

/// Ends every lease still starting or running on the dev coordinator, at
/// once, each within a short grace; says what it could not end.
async fn end_dev_leases(admin: &std::path::Path) {
    use warden_proto::{pb, states::LeaseState};
    let Ok(mut client) = warden_coordinator::admin::connect(admin).await else {
        return;
    };
    let Ok(list) = client.list_leases(pb::ListLeasesRequest {}).await else {
        return;
    };
    let live: Vec<String> = list
        .into_inner()
        .leases
        .into_iter()
        .filter(|l| {
            matches!(
                LeaseState::parse(&l.state),
                Some(LeaseState::Starting | LeaseState::Running | LeaseState::Stopped)
            )
        })
        .map(|l| l.lease_id)
        .collect();
    if live.is_empty() {
        return;
    }
    eprintln!("ending {} lease(s) before stopping…", live.len());
    let mut ends = tokio::task::JoinSet::new();
    for id in live {
        let mut c = client.clone();
        ends.spawn(async move {
            let r = c
                .end_lease(pb::EndLeaseRequest {
                    lease_id: id.clone(),
                    grace_seconds: 5,
                    timeout_seconds: 30,
                })
                .await;
            if let Err(e) = r {
                eprintln!("lease {id} not ended: {}", e.message());
            }
        });
    }
    ends.join_all().await;
}
