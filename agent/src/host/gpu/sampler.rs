//! The GPU sampling task: every interval, one cycle over all GPUs, sent as
//! one telemetry record, published for /metrics and status, and health
//! changes logged once and recorded as events.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use super::{health_events, GpuSource};
use crate::delivery::outbox::Outbox;

/// Samples until `shutdown`. NVML calls block, so each cycle runs on the
/// blocking pool.
pub async fn run(
    source: Arc<dyn GpuSource>,
    interval: Duration,
    outbox: Outbox,
    latest: watch::Sender<Vec<pb::GpuSample>>,
    mut driver_events: mpsc::UnboundedReceiver<pb::GpuEvent>,
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
        let mut events = Vec::new();
        while let Ok(e) = driver_events.try_recv() {
            tracing::warn!(gpu = e.index, uuid = %e.uuid, detail = %e.detail, "GPU reported an Xid error");
            events.push(e);
        }
        let health = health_events(&prev, &now, crate::now_ms());
        for e in &health {
            match e.kind.as_str() {
                "recovered" => tracing::info!(gpu = e.index, uuid = %e.uuid, "GPU answers again"),
                _ => {
                    tracing::warn!(gpu = e.index, uuid = %e.uuid, kind = %e.kind, detail = %e.detail, "GPU health changed")
                }
            }
        }
        events.extend(health);
        if !now.is_empty() || !events.is_empty() {
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

/// How long one wait for driver events blocks: bounds how late shutdown is noticed.
const EVENT_WAIT: Duration = Duration::from_millis(500);

/// Waits for driver events (Xid errors) on a blocking thread and forwards
/// them to the sampler, which records them with the next cycle.
pub fn watch_events(
    source: Arc<dyn GpuSource>,
    shutdown: CancellationToken,
) -> (
    mpsc::UnboundedReceiver<pb::GpuEvent>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::task::spawn_blocking(move || {
        while !shutdown.is_cancelled() {
            for e in source.wait_events(EVENT_WAIT) {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    (rx, task)
}
