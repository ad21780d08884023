//! Periodic host telemetry records: a host sample and the spool's state,
//! so the coordinator sees a filling spool even before heartbeats are read.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use crate::{
    config::TelemetryConfig,
    delivery::{outbox::Outbox, spool::SpoolStats},
};

/// Emits a telemetry record every `interval` until `shutdown`, or until
/// `max_records` have been emitted when that is not 0.
pub async fn run(
    config: TelemetryConfig,
    outbox: Outbox,
    spool: watch::Receiver<SpoolStats>,
    mesh: watch::Receiver<Option<crate::mesh::node::MeshStatus>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.interval.max(Duration::from_micros(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut emitted = 0u64;
    while config.max_records == 0 || emitted < config.max_records {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let body = pb::record::Body::Telemetry(pb::Telemetry {
            host: Some(crate::host::facts::sample()),
            spool: Some(spool.borrow().to_pb()),
            mesh_peers: mesh
                .borrow()
                .as_ref()
                .map(|m| m.samples())
                .unwrap_or_default(),
            ..Default::default()
        });
        // The last one waits until it is spooled (the ones before it are,
        // in order): the line below then means all of them are in the
        // spool, which tests and benches wait on.
        if config.max_records != 0 && emitted + 1 == config.max_records {
            let _ = outbox.emit_signed(body).await;
        } else if !outbox.emit(body).await {
            return;
        }
        emitted += 1;
    }
    tracing::info!(emitted, "telemetry.max_records reached; telemetry stopped");
}
