//! Wires the agent's tasks together and runs them until shutdown.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, sync::Arc};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_proto::identity::{self, IdentityError};

use crate::{
    config::AgentConfig,
    outbox::{self, Stamp},
    spool::{Spool, SpoolConfig, SpoolError},
    status, telemetry,
    uplink::{Uplink, UplinkStatus},
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` is cancelled, then stops its tasks in
/// order: producers first, then the stream, then the spool is flushed.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let dir = &config.state_dir;
    let dir_err = |source| AgentError::StateDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;

    let (signer, created) = identity::load_or_create(&config.key_file())?;
    let signer = Arc::new(signer);
    let node_id = signer.key_id().to_owned();
    if created {
        tracing::info!(%node_id, key = %config.key_file().display(), "created node identity");
    }
    let start_id = crate::random_id();

    let (spool, recovery) = Spool::open(SpoolConfig {
        dir: config.spool_dir(),
        max_bytes: config.spool.max_bytes,
        segment_bytes: config.spool.segment_bytes,
    })?;
    tracing::info!(
        %node_id, %start_id, pending = recovery.pending, truncated = recovery.truncated.len(),
        "agent starting"
    );

    let tasks = shutdown.child_token();
    let stop_producers = tasks.child_token();
    let stop_outbox = CancellationToken::new();
    let (outbox, outbox_task) = outbox::spawn(
        spool,
        Stamp {
            signer: signer.clone(),
            node_id: node_id.clone(),
            start_id: start_id.clone(),
        },
        stop_outbox.clone(),
    );

    let (uplink_tx, uplink_rx) = watch::channel(UplinkStatus::default());
    let uplink_task = match config.coordinator.clone() {
        Some(link) => {
            let up = Uplink {
                link,
                config: config.uplink.clone(),
                signer: signer.clone(),
                node_id: node_id.clone(),
                start_id: start_id.clone(),
                inventory: crate::host::summary(),
                outbox: outbox.clone(),
                status: uplink_tx,
            };
            Some(tokio::spawn(up.run(tasks.clone())))
        }
        None => {
            tracing::warn!("no [coordinator] configured: records stay in the spool until one is");
            None
        }
    };

    let socket = config.status_socket();
    let listener = status::bind(&socket)?;
    tracing::info!(socket = %socket.display(), "status socket ready");
    let status_task = tokio::spawn(status::serve(
        listener,
        socket,
        status::Sources {
            node_id,
            start_id,
            configured: config.coordinator.is_some(),
            uplink: uplink_rx,
            spool: outbox.stats(),
        },
        tasks.clone(),
    ));
    let telemetry_task = tokio::spawn(telemetry::run(
        config.telemetry.clone(),
        outbox.clone(),
        outbox.stats(),
        stop_producers.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let _ = telemetry_task.await;
    if let Some(t) = uplink_task {
        let _ = t.await;
    }
    let _ = status_task.await;
    // The outbox stops last so everything produced is spooled and flushed.
    stop_outbox.cancel();
    let _ = outbox_task.await;
    tracing::info!("agent stopped; spool flushed");
    Ok(())
}
