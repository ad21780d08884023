//! Wires the agent's tasks together and runs them until shutdown.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::identity::{self, IdentityError};
use warden_state::{
    dir::{self, DirError},
    lock::{DirLock, LockError, LOCK_FILE},
    socket::SocketError,
};

use crate::{
    config::AgentConfig,
    config::ConfigError,
    delivery::{
        outbox::{self, Stamp},
        spool::{Spool, SpoolConfig, SpoolError},
        uplink::{Uplink, UplinkStatus},
    },
    host::{
        gpu::{self, nvml::NvmlSource, GpuSource},
        inventory, linkprobe, metrics, telemetry,
    },
    notify::Notifier,
    reload, status,
    timelock::TimeLock,
    workloads::Workload,
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
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("status.socket: {0}")]
    StatusSocket(SocketError),
}

/// How a running agent re-reads its configuration (on SIGHUP).
pub struct Reloader {
    /// One message per reload asked for.
    pub requests: mpsc::Receiver<()>,
    /// Reads the file, applies the command line's overrides and validates,
    /// as at start.
    pub load: Box<dyn Fn() -> Result<AgentConfig, ConfigError> + Send>,
    /// The file `load` reads, for messages.
    pub file: PathBuf,
}

/// Runs the agent until `shutdown` is cancelled, then stops its tasks in
/// order: producers first, then the stream, then the spool is flushed.
/// With a `reload`, each request re-reads the configuration and applies
/// what can change while running ([`reload::LIVE`]).
pub async fn run(
    config: AgentConfig,
    reload: Option<Reloader>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    config.check_files()?;
    let dir = &config.state_dir;
    // One agent per state: a second would take over the socket and reuse
    // seqs. Held until this function returns (or the kernel drops it with
    // the process). The spool may live elsewhere, so it is locked too.
    dir::ensure_private(dir)?;
    let _state_lock = DirLock::acquire(
        &config.lock_file(),
        format!("the agent state directory {}", dir.display()),
    )?;
    let spool_dir = config.spool_dir();
    dir::ensure_private(&spool_dir)?;
    let _spool_lock = DirLock::acquire(
        &spool_dir.join(LOCK_FILE),
        format!("the spool directory {}", spool_dir.display()),
    )?;

    let (signer, created) = identity::load_or_create(&config.key_file())?;
    let signer = Arc::new(signer);
    let node_id = signer.key_id().to_owned();
    if created {
        tracing::info!(%node_id, key = %config.key_file().display(), "created node identity");
    }
    let start_id = crate::random_id();
    let mesh_key_path = config.mesh_key_file();
    let (mesh_private, made) = crate::mesh::key::load_or_create(&mesh_key_path)?;
    let mesh_public = crate::mesh::device::public_of(mesh_private);
    if made {
        tracing::info!(key = %mesh_key_path.display(), "created the mesh (WireGuard) key");
    }

    // Bound early, so a path that is not ours to take stops the start
    // before anything else runs.
    let socket = config.status_socket();
    let (listener, socket_file) =
        warden_state::socket::bind(&socket).map_err(AgentError::StatusSocket)?;
    tracing::info!(socket = %socket.display(), "status socket ready");

    let (mut spool, recovery) = Spool::open(SpoolConfig {
        dir: spool_dir,
        max_bytes: config.spool.max_bytes,
        segment_bytes: config.spool.segment_bytes,
    })?;
    if let Some((previous, moved)) = spool.claim(&node_id)? {
        tracing::warn!(
            %node_id, %previous, set_aside = moved, dir = %config.spool_dir().display(),
            "the spool belonged to another node key (node.key was replaced): its records can never be delivered by this one, so they were set aside (refused.log) and this identity's records start at seq 1"
        );
    }
    tracing::info!(
        %node_id, %start_id, pending = recovery.pending, damaged = recovery.damaged.len(),
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
    let (live_tx, live_rx) = watch::channel(config.clone());
    let (config_status_tx, config_status_rx) = watch::channel(status::ConfigStatus {
        file: reload.as_ref().map(|r| r.file.display().to_string()),
        ..Default::default()
    });
    let (ready_tx, ready_rx) = watch::channel(false);
    let notifier = Notifier::from_env();
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
    let (direct_tx, direct_rx) = tokio::sync::mpsc::channel(16);
    let (challenges_tx, challenges_rx) = tokio::sync::mpsc::channel(64);
    let (work_tx, work_rx) = tokio::sync::mpsc::channel(4);
    let (work_answers_tx, work_answers_rx) = tokio::sync::mpsc::channel(4);
    let uplink_task = match config.coordinator.clone() {
        Some(link) => {
            let up = Uplink {
                link,
                config: config.uplink.clone(),
                signer: signer.clone(),
                node_id: node_id.clone(),
                start_id: start_id.clone(),
                inventory: inventory_rx.clone(),
                labels: config.node.labels(),
                outbox: outbox.clone(),
                status: uplink_tx,
                commands: Some(commands_tx),
                challenges: Some(challenges_tx),
                work: Some(work_tx),
                work_answers: tokio::sync::Mutex::new(work_answers_rx),
                mesh: (mesh_public.to_vec(), config.mesh.endpoints.clone()),
                mesh_status: mesh_status_rx.clone(),
                direct: tokio::sync::Mutex::new(direct_rx),
            };
            Some(tokio::spawn(up.run(tasks.clone())))
        }
        None => {
            tracing::warn!("no [coordinator] configured: records stay in the spool until one is");
            None
        }
    };

    let (leases_tx, leases_rx) = watch::channel(Vec::new());
    let (engine_tx, engine_rx) = crate::workloads::task::engine_channel();
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
    let (guard_tx, guard_rx) = tokio::sync::watch::channel(String::new());
    let status_task = tokio::spawn(status::serve(
        listener,
        socket_file,
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
            config: config_status_rx,
            guard: guard_rx,
        },
        tasks.clone(),
    ));
    let (workload_tx, workload_rx) = tokio::sync::mpsc::channel(64);
    let mut producers = vec![tokio::spawn(
        crate::commands::Dispatch {
            node_id: node_id_for_workload.clone(),
            admission: crate::commands::load(&config.commands_file(), &config.book_file()),
            path: config.commands_file(),
            reload: live_rx.clone(),
            outbox: outbox.clone(),
            workload: workload_tx,
            mesh: mesh_tx,
        }
        .run(commands_rx, stop_producers.clone()),
    )];
    producers.push(tokio::spawn(
        Workload {
            config: config.workload.clone(),
            node_id: node_id_for_workload.clone(),
            book_path: config.book_file(),
            state_dir: dir.to_owned(),
            reload: live_rx.clone(),
            outbox: outbox.clone(),
            inventory: inventory_rx.clone(),
            leases: leases_tx,
            engine: engine_tx,
            direct: direct_tx,
        }
        .run(workload_rx, stop_producers.clone()),
    ));
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
            state_path: config.chains_file(),
            outbox: outbox.clone(),
            leases: leases_rx.clone(),
            gpus: gpus_rx.clone(),
            inventory: inventory_rx.clone(),
            engine: engine_rx,
            stop_grace: config.workload.stop_grace,
            reload: live_rx,
            guard: guard_tx,
        }
        .run(challenges_rx, stop_producers.clone()),
    ));
    producers.push(tokio::spawn(
        crate::workproof::WorkRunner {
            config: config.work_challenge.clone(),
            workload: config.workload.clone(),
            node_id: node_id_for_workload.clone(),
            gpus: gpus.clone(),
            answers: work_answers_tx,
            leases: leases_rx,
        }
        .run(work_rx, stop_producers.clone()),
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
            uplink_rx.clone(),
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
            ready_tx.send_replace(true);
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

    let reload_task = reload.map(|r| {
        tokio::spawn(reload_loop(
            r,
            config.clone(),
            live_tx,
            config_status_tx,
            (notifier.clone(), ready_rx),
            tasks.clone(),
        ))
    });

    shutdown.cancelled().await;
    notifier.send("STOPPING=1");
    tracing::info!("shutting down");
    let _ = notify_task.await;
    if let Some(t) = reload_task {
        let _ = t.await;
    }
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

/// Re-reads the configuration on each request: applies the live keys,
/// names in the log each changed key that waits for a restart, and keeps
/// the running configuration when the file is unusable. systemd hears
/// RELOADING, then READY with a STATUS saying what happened (once the
/// agent has said READY at all).
async fn reload_loop(
    mut r: Reloader,
    mut running: AgentConfig,
    live: watch::Sender<AgentConfig>,
    status: watch::Sender<status::ConfigStatus>,
    (notifier, ready): (Notifier, watch::Receiver<bool>),
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            req = r.requests.recv() => if req.is_none() { return },
        }
        let tell_systemd = *ready.borrow();
        if tell_systemd {
            notifier.send(&crate::notify::reloading());
        }
        let file = r.file.display().to_string();
        let loaded = (r.load)().and_then(|new| {
            let plan = reload::plan(&running, &new);
            plan.config.validate()?;
            new.check_files()?;
            Ok(plan)
        });
        let outcome = match loaded {
            Err(e) => {
                let e = one_line(&e.to_string());
                tracing::error!(file = %file, error = %e, "config not reloaded: the agent keeps running with its previous config");
                status.send_modify(|s| s.last_error = Some(e.clone()));
                format!("config {file} not reloaded ({e}); running with the previous config")
            }
            Ok(plan) => {
                for k in &plan.applied {
                    tracing::info!("{k} changed: applied");
                }
                for k in &plan.restart {
                    tracing::warn!("{k} changed: takes effect after a restart");
                }
                tracing::info!(file = %file, applied = plan.applied.len(), needs_restart = plan.restart.len(), "config reloaded");
                running = plan.config;
                live.send_replace(running.clone());
                let summary = format!(
                    "config reloaded: {} applied; needs a restart: {}",
                    plan.applied.len(),
                    if plan.restart.is_empty() {
                        "nothing".to_owned()
                    } else {
                        plan.restart.join(", ")
                    }
                );
                status.send_modify(|s| {
                    s.reloads += 1;
                    s.last_reload_unix_ms = crate::now_ms();
                    s.applied = plan.applied;
                    s.needs_restart = plan.restart;
                    s.last_error = None;
                });
                summary
            }
        };
        if tell_systemd {
            notifier.send(&format!("READY=1\nSTATUS={outcome}"));
        }
    }
}

/// A TOML error's first line (where) and last (what), for one journal line;
/// between them is a drawing of the line with a caret.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    match (lines.next(), lines.next_back()) {
        (Some(first), Some(last)) => format!("{first}: {last}"),
        (Some(first), None) => first.to_owned(),
        _ => String::new(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_fits_one_line_with_where_and_what() {
        let e = AgentConfig::parse(
            "[uplink]\nheartbeat_interval = [\n",
            "/etc/warden/agent.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.lines().count() > 1, "{e}");
        let line = one_line(&e);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("config /etc/warden/agent.toml: TOML parse error at line"),
            "{line}"
        );
        assert!(line.ends_with(e.lines().last().unwrap().trim()), "{line}");
        assert_eq!(one_line("config key `x`: bad"), "config key `x`: bad");
    }
}
