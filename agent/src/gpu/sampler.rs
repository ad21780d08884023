//! The GPU sampling task: every interval, one cycle over all GPUs, sent as
//! one telemetry record, published for /metrics and status, and health
//! changes logged once and recorded as events.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use super::{health_events, GpuSource};
use crate::outbox::Outbox;

/// Samples until `shutdown`. NVML calls block, so each cycle runs on the
/// blocking pool.
pub async fn run(
    source: Arc<dyn GpuSource>,
    interval: Duration,
    outbox: Outbox,
    latest: watch::Sender<Vec<pb::GpuSample>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev: Vec<pb::GpuSample> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let src = source.clone();
        let now = match tokio::task::spawn_blocking(move || src.sample()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "GPU sampling cycle panicked");
                continue;
            }
        };
        let events = health_events(&prev, &now, crate::now_ms());
        for e in &events {
            match e.kind.as_str() {
                "recovered" => tracing::info!(gpu = e.index, uuid = %e.uuid, "GPU answers again"),
                _ => {
                    tracing::warn!(gpu = e.index, uuid = %e.uuid, kind = %e.kind, detail = %e.detail, "GPU health changed")
                }
            }
        }
        if !now.is_empty() {
            let body = pb::record::Body::Telemetry(pb::Telemetry {
                gpus: now.clone(),
                gpu_events: events,
                ..Default::default()
            });
            if !outbox.emit(body).await {
                return;
            }
        }
        latest.send_replace(now.clone());
        prev = now;
    }
}
