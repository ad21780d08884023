//! Wires the agent's tasks together and runs them until shutdown.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, sync::Arc};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_proto::identity::{self, IdentityError};

use crate::{
    config::AgentConfig,
    gpu::{self, nvml::NvmlSource, GpuSource},
    inventory, linkprobe, metrics,
    outbox::{self, Stamp},
    spool::{Spool, SpoolConfig, SpoolError},
    status, telemetry,
    timelock::TimeLock,
    uplink::{Uplink, UplinkStatus},
    workload::Workload,
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
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    MeshKey(#[from] crate::mesh::key::MeshKeyError),
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
    let mesh_key_path = dir.join("mesh.key");
    let (mesh_private, made) = crate::mesh::key::load_or_create(&mesh_key_path)?;
    let mesh_public = crate::mesh::device::public_of(mesh_private);
    if made {
        tracing::info!(key = %mesh_key_path.display(), "created the mesh (WireGuard) key");
    }

    let (spool, recovery) = Spool::open(SpoolConfig {
        dir: config.spool_dir(),
        max_bytes: config.spool.max_bytes,
        segment_bytes: config.spool.segment_bytes,
    })?;
    tracing::info!(
        %node_id, %start_id, pending = recovery.pending, truncated = recovery.truncated.len(),
        "agent starting"
    );

    let gpus = load_gpus(&config).await;
    let inv = {
        let (dir, g) = (dir.clone(), gpus.clone());
        tokio::task::spawn_blocking(move || {
            inventory::collect(&dir, g.as_ref().map(|g| g.as_ref()).map_err(String::clone))
        })
        .await
        .unwrap_or_default()
    };
    tracing::info!(
        hostname = %inv.hostname, cpu = %inv.cpu_model, cores = inv.cpu_cores,
        memory_gib = inv.memory_bytes >> 30, gpus = inv.gpus.len(), docker = %inv.docker,
        tun = inv.tun_available, "inventory"
    );
    let (inventory_tx, inventory_rx) = watch::channel(inv);
    let (gpus_tx, gpus_rx) = watch::channel(Vec::new());
    let (link_tx, link_rx) = watch::channel(None);

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
    let (mesh_tx, mesh_rx) = tokio::sync::mpsc::channel(8);
    let (mesh_status_tx, mesh_status_rx) = watch::channel(None);
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(64);
    let (challenges_tx, challenges_rx) = tokio::sync::mpsc::channel(64);
    let uplink_task = match config.coordinator.clone() {
        Some(link) => {
            let up = Uplink {
                link,
                config: config.uplink.clone(),
                signer: signer.clone(),
                node_id: node_id.clone(),
                start_id: start_id.clone(),
                inventory: inventory_rx.clone(),
                outbox: outbox.clone(),
                status: uplink_tx,
                commands: Some(commands_tx),
                challenges: Some(challenges_tx),
                mesh: (mesh_public.to_vec(), config.mesh.endpoints.clone()),
                mesh_status: mesh_status_rx.clone(),
            };
            Some(tokio::spawn(up.run(tasks.clone())))
        }
        None => {
            tracing::warn!("no [coordinator] configured: records stay in the spool until one is");
            None
        }
    };

    let (leases_tx, leases_rx) = watch::channel(Vec::new());
    let mut metrics_address = None;
    let metrics_task = if config.metrics.listen.is_empty() {
        None
    } else {
        let addr =
            config
                .metrics
                .listen
                .parse()
                .map_err(|_| crate::config::ConfigError::Invalid {
                    key: "metrics.listen",
                    reason: format!("`{}` is not host:port", config.metrics.listen),
                })?;
        let listener = metrics::bind(addr).await?;
        let bound = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(addr = %bound, "serving /metrics");
        metrics_address = Some(bound);
        Some(tokio::spawn(metrics::serve(
            listener,
            metrics::Sources {
                configured: config.coordinator.is_some(),
                inventory: inventory_rx.clone(),
                gpus: gpus_rx.clone(),
                spool: outbox.stats(),
                uplink: uplink_rx.clone(),
                link: link_rx.clone(),
                mesh: mesh_status_rx.clone(),
            },
            tasks.clone(),
        )))
    };
    let node_id_for_workload = node_id.clone();
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
            uplink: uplink_rx.clone(),
            spool: outbox.stats(),
            inventory: inventory_rx.clone(),
            gpus: gpus_rx.clone(),
            link: link_rx.clone(),
            metrics_address,
            leases: leases_rx.clone(),
            mesh: mesh_status_rx.clone(),
        },
        tasks.clone(),
    ));
    let mut producers = vec![tokio::spawn(
        Workload {
            config: config.workload.clone(),
            node_id: node_id_for_workload,
            book_path: dir.join("book.json"),
            outbox: outbox.clone(),
            inventory: inventory_rx.clone(),
            leases: leases_tx,
            mesh: Some(mesh_tx),
        }
        .run(commands_rx, stop_producers.clone()),
    )];
    producers.push(tokio::spawn(
        crate::mesh::node::MeshNode {
            config: config.mesh.clone(),
            private_key: mesh_private,
            socket_dir: config.mesh.socket_dir.clone(),
            status: mesh_status_tx,
        }
        .run(mesh_rx, stop_producers.clone()),
    ));
    producers.push(tokio::spawn(
        TimeLock {
            config: config.timelock.clone(),
            sample_interval: config.gpu.sample_interval,
            state_path: dir.join("chains.json"),
            outbox: outbox.clone(),
            leases: leases_rx,
            gpus: gpus_rx.clone(),
            inventory: inventory_rx.clone(),
            docker_socket: config.workload.docker_socket.clone(),
            stop_grace: config.workload.stop_grace,
        }
        .run(challenges_rx, stop_producers.clone()),
    ));
    if let Ok(source) = &gpus {
        let (driver_events, watcher) = gpu::watch_events(source.clone(), stop_producers.clone());
        producers.push(watcher);
        producers.push(tokio::spawn(gpu::sampler::run(
            source.clone(),
            config.gpu.sample_interval,
            outbox.clone(),
            gpus_tx,
            driver_events,
            stop_producers.clone(),
        )));
    }
    producers.push(tokio::spawn(inventory::watch(
        dir.clone(),
        gpus,
        config.gpu.inventory_interval,
        outbox.clone(),
        inventory_tx,
        stop_producers.clone(),
    )));
    if let Some(link) = config
        .coordinator
        .clone()
        .filter(|_| !config.probe.interval.is_zero())
    {
        producers.push(tokio::spawn(linkprobe::run(
            link,
            config.probe.clone(),
            config.uplink.connect_timeout,
            outbox.clone(),
            link_tx,
            stop_producers.clone(),
        )));
    }
    let telemetry_task = tokio::spawn(telemetry::run(
        config.telemetry.clone(),
        outbox.clone(),
        outbox.stats(),
        mesh_status_rx,
        stop_producers.clone(),
    ));

    // systemd: READY once registered with the coordinator, or, when it cannot
    // be reached in time, once the local duties run; then the watchdog.
    let notifier = crate::notify::Notifier::from_env();
    let notify_task = {
        let (n, mut up, stop) = (notifier.clone(), uplink_rx.clone(), tasks.clone());
        let wait = if config.coordinator.is_some() {
            config.uplink.connect_timeout
        } else {
            std::time::Duration::ZERO
        };
        tokio::spawn(async move {
            let connected = tokio::time::timeout(wait, up.wait_for(|s| s.connected))
                .await
                .is_ok_and(|r| r.is_ok());
            n.send(if connected {
                "READY=1\nSTATUS=connected to the coordinator"
            } else {
                "READY=1\nSTATUS=running; the coordinator is not reachable yet"
            });
            let Some(every) = n.watchdog_interval() else {
                return;
            };
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => n.send("WATCHDOG=1"),
                    _ = stop.cancelled() => return,
                }
            }
        })
    };

    shutdown.cancelled().await;
    notifier.send("STOPPING=1");
    tracing::info!("shutting down");
    let _ = notify_task.await;
    let _ = telemetry_task.await;
    for p in producers {
        let _ = p.await;
    }
    if let Some(t) = uplink_task {
        let _ = t.await;
    }
    let _ = status_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    // The outbox stops last so everything produced is spooled and flushed.
    stop_outbox.cancel();
    let _ = outbox_task.await;
    tracing::info!("agent stopped; spool flushed");
    Ok(())
}

/// Loads NVML. Without it the node runs CPU-only: said once, here.
async fn load_gpus(config: &AgentConfig) -> Result<Arc<dyn GpuSource>, String> {
    let lib = config.gpu.nvml_library.clone();
    let loaded = tokio::task::spawn_blocking(move || NvmlSource::load(lib.as_deref()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match loaded {
        Ok(src) => {
            tracing::info!(gpus = src.gpu_count(), "NVML loaded");
            Ok(Arc::new(src))
        }
        Err(e) => {
            tracing::warn!(reason = %e, "no usable NVML: running as a CPU-only node");
            Err(e)
        }
    }
}
