//! The local status socket: `warden status` connects, the agent writes
//! one JSON document and closes. The socket is mode 0600 in a 0700
//! directory: only root (or the agent's user) may read it. It is bound by
//! `warden_state::socket`, which replaces only a stale socket.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use warden_proto::pb;

use crate::delivery::{spool::SpoolStats, uplink::UplinkStatus};

/// The document `warden status --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub node_id: String,
    /// Why records are not being receipted (cause and fix), if they are not.
    #[serde(default)]
    pub problem: Option<crate::delivery::problem::Problem>,
    pub version: String,
    pub start_id: String,
    pub coordinator: CoordinatorStatus,
    pub spool: SpoolStats,
    pub last_receipt_seq: u64,
    /// "ok", or why NVML is not loaded (a CPU-only node).
    pub nvml: String,
    /// The latest sample of each GPU.
    pub gpus: Vec<pb::GpuSample>,
    /// The last link probe, if one ran.
    pub link: Option<pb::LinkSample>,
    /// Where /metrics is served (the bound address), if it is.
    pub metrics_address: Option<String>,
    /// The active leases, with their GPUs and containers.
    pub leases: Vec<crate::workloads::book::Lease>,
    /// The mesh interface, when the node is in a cluster.
    pub mesh: Option<crate::mesh::node::MeshStatus>,
    /// Reloads of the configuration file (SIGHUP) and what they left undone.
    pub config: ConfigStatus,
    /// The time-lock's open guard: "on", or "off: why" (then foreign
    /// holders are found by scanning and ended).
    #[serde(default)]
    pub guard: String,
}

/// What the reloads of the configuration did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// The file a reload reads, if the agent has one.
    pub file: Option<String>,
    /// Reloads that applied (a refused file does not count).
    pub reloads: u64,
    pub last_reload_unix_ms: i64,
    /// Keys the last reload changed in the running agent.
    pub applied: Vec<String>,
    /// Keys whose value in the file differs from the running one until a restart.
    pub needs_restart: Vec<String>,
    /// Why the last reload was refused, until one succeeds.
    pub last_error: Option<String>,
}

/// The coordinator part of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    pub configured: bool,
    #[serde(flatten)]
    pub uplink: UplinkStatus,
}

/// What the status task reads to build a report.
pub struct Sources {
    pub node_id: String,
    pub start_id: String,
    pub configured: bool,
    pub uplink: watch::Receiver<UplinkStatus>,
    pub spool: watch::Receiver<SpoolStats>,
    pub inventory: watch::Receiver<pb::InventorySummary>,
    pub gpus: watch::Receiver<Vec<pb::GpuSample>>,
    pub link: watch::Receiver<Option<pb::LinkSample>>,
    pub metrics_address: Option<String>,
    pub leases: watch::Receiver<Vec<crate::workloads::book::Lease>>,
    pub mesh: watch::Receiver<Option<crate::mesh::node::MeshStatus>>,
    pub config: watch::Receiver<ConfigStatus>,
    pub guard: watch::Receiver<String>,
}

impl Sources {
    fn report(&self) -> StatusReport {
        let uplink = self.uplink.borrow().clone();
        let spool = *self.spool.borrow();
        StatusReport {
            node_id: self.node_id.clone(),
            problem: crate::delivery::problem::problem(
                self.configured,
                &uplink,
                &spool,
                crate::now_ms(),
            ),
            version: env!("CARGO_PKG_VERSION").into(),
            start_id: self.start_id.clone(),
            last_receipt_seq: uplink.last_receipt_seq,
            coordinator: CoordinatorStatus {
                configured: self.configured,
                uplink,
            },
            spool,
            nvml: self.inventory.borrow().nvml_status.clone(),
            gpus: self.gpus.borrow().clone(),
            link: self.link.borrow().clone(),
            metrics_address: self.metrics_address.clone(),
            leases: self.leases.borrow().clone(),
            mesh: self.mesh.borrow().clone(),
            config: self.config.borrow().clone(),
            guard: self.guard.borrow().clone(),
        }
    }
}

/// Why the status socket could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("status socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status socket {path} answered with something that is not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Serves reports until `shutdown`, then removes the socket file (if it
/// is still this agent's).
pub async fn serve(
    listener: UnixListener,
    file: warden_state::socket::SocketFile,
    sources: Sources,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.cancelled() => break,
        };
        match conn {
            Ok((mut stream, _)) => {
                let body = serde_json::to_vec(&sources.report()).unwrap_or_default();
                tokio::spawn(async move {
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "status socket accept failed"),
        }
    }
    drop(file);
}

/// Reads one report from a running agent's socket.
pub async fn query(path: &Path) -> Result<serde_json::Value, StatusError> {
    let io = |source| StatusError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(io)?;
    let mut buf = Vec::new();
    (&mut stream)
        .take(1 << 20)
        .read_to_end(&mut buf)
        .await
        .map_err(io)?;
    serde_json::from_slice(&buf).map_err(|source| StatusError::Json {
        path: path.to_owned(),
        source,
    })
}
