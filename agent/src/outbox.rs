//! The task that owns the spool: it numbers and signs every record the
//! agent emits, appends them to the spool in fsync'd groups before anyone
//! may send them, and serves the uplink's reads and acknowledgements.

use std::sync::Arc;

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::{
    dsse::Signer,
    pb::{self, Envelope},
    types,
};

use crate::spool::{Spool, SpoolError, SpoolStats};

/// Records numbered, signed and appended under one fsync, at most.
const MAX_GROUP: usize = 1024;

/// A record read back from the spool for sending.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: u64,
    pub envelope: Envelope,
}

enum Control {
    Ack(u64),
    Read {
        from: u64,
        max: usize,
        reply: oneshot::Sender<Result<Vec<Pending>, String>>,
    },
}

/// A body to spool, and who wants the signed envelope once it is on disk.
type Emit = (pb::record::Body, Option<oneshot::Sender<Option<Envelope>>>);

/// Handle used by producers and by the uplink.
#[derive(Clone)]
pub struct Outbox {
    emit: mpsc::Sender<Emit>,
    control: mpsc::UnboundedSender<Control>,
    stats: watch::Receiver<SpoolStats>,
}

impl Outbox {
    /// Queues a record body; it gets its seq and signature when spooled.
    pub async fn emit(&self, body: pb::record::Body) -> bool {
        self.emit.send((body, None)).await.is_ok()
    }

    /// Queues a record body and waits until it is spooled: the signed
    /// envelope, or None if it was not (spool full, or shutting down). For
    /// producers that chain records by digest (the attestor).
    pub async fn emit_signed(&self, body: pb::record::Body) -> Option<Envelope> {
        let (tx, rx) = oneshot::channel();
        self.emit.send((body, Some(tx))).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Marks a record acknowledged by a verified receipt.
    pub fn ack(&self, seq: u64) {
        let _ = self.control.send(Control::Ack(seq));
    }

    /// Pending records with seq >= `from`, in order.
    pub async fn read(&self, from: u64, max: usize) -> Result<Vec<Pending>, String> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Read { from, max, reply })
            .map_err(|_| "the outbox has stopped".to_owned())?;
        rx.await.map_err(|_| "the outbox has stopped".to_owned())?
    }

    /// The spool's figures, updated after every change.
    pub fn stats(&self) -> watch::Receiver<SpoolStats> {
        self.stats.clone()
    }
}

/// Identity stamped into every record.
pub struct Stamp {
    pub signer: Arc<Signer>,
    pub node_id: String,
    pub start_id: String,
}

/// Starts the outbox task. It runs until `shutdown`, then spools what is
/// still queued and flushes.
pub fn spawn(
    spool: Spool,
    stamp: Stamp,
    shutdown: CancellationToken,
) -> (Outbox, tokio::task::JoinHandle<()>) {
    let (emit_tx, emit_rx) = mpsc::channel(4 * MAX_GROUP);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (stats_tx, stats_rx) = watch::channel(spool.stats());
    let task = tokio::spawn(run(spool, stamp, emit_rx, control_rx, stats_tx, shutdown));
    (
        Outbox {
            emit: emit_tx,
            control: control_tx,
            stats: stats_rx,
        },
        task,
    )
}

async fn run(
    mut spool: Spool,
    stamp: Stamp,
    mut emit_rx: mpsc::Receiver<Emit>,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
    stats_tx: watch::Sender<SpoolStats>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            Some(c) = control_rx.recv() => handle_control(&mut spool, c),
            Some(body) = emit_rx.recv() => {
                let mut group = vec![body];
                while group.len() < MAX_GROUP {
                    match emit_rx.try_recv() {
                        Ok(b) => group.push(b),
                        Err(_) => break,
                    }
                }
                append(&mut spool, &stamp, group);
            }
            _ = shutdown.cancelled() => break,
        }
        stats_tx.send_replace(spool.stats());
    }
    // Whatever producers queued before shutdown is still spooled.
    emit_rx.close();
    let mut rest = Vec::new();
    while let Ok(b) = emit_rx.try_recv() {
        rest.push(b);
    }
    if !rest.is_empty() {
        append(&mut spool, &stamp, rest);
    }
    while let Ok(c) = control_rx.try_recv() {
        handle_control(&mut spool, c);
    }
    if let Err(e) = spool.flush() {
        tracing::error!(error = %e, "spool flush at shutdown failed");
    }
    stats_tx.send_replace(spool.stats());
}

fn handle_control(spool: &mut Spool, c: Control) {
    match c {
        Control::Ack(seq) => {
            spool.ack(seq);
        }
        Control::Read { from, max, reply } => {
            let result = spool
                .read_from(from, max)
                .map_err(|e| e.to_string())
                .and_then(|recs| {
                    recs.into_iter()
                        .map(|(seq, bytes)| {
                            Envelope::decode(bytes.as_slice())
                                .map(|envelope| Pending { seq, envelope })
                                .map_err(|e| format!("spooled record {seq} does not decode: {e}"))
                        })
                        .collect()
                });
            let _ = reply.send(result);
        }
    }
}

/// Numbers, signs and appends one group with a single fsync; then tells
/// whoever asked what was spooled.
fn append(spool: &mut Spool, stamp: &Stamp, bodies: Vec<Emit>) {
    let first = spool.next_seq();
    let now = crate::now_ms();
    let mut waiting = Vec::new();
    let records: Vec<(u64, Vec<u8>)> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, (body, reply))| {
            let seq = first + i as u64;
            let record = pb::Record {
                node_id: stamp.node_id.clone(),
                seq,
                time_unix_ms: now,
                start_id: stamp.start_id.clone(),
                body: Some(body),
            };
            let env = stamp.signer.sign_message(types::RECORD, &record);
            let bytes = env.encode_to_vec();
            if let Some(reply) = reply {
                waiting.push((reply, env));
            }
            (seq, bytes)
        })
        .collect();
    let was_full = spool.stats().full;
    let result = spool.append_batch(&records);
    let spooled = result.is_ok();
    for (reply, env) in waiting {
        let _ = reply.send(spooled.then_some(env));
    }
    match result {
        Ok(()) if was_full => tracing::info!("spool has room again; records are spooled"),
        Ok(()) => {}
        // Said once when the spool fills; status and heartbeats carry the count.
        Err(e @ SpoolError::Full { .. }) if !was_full => tracing::warn!(error = %e, "spool full"),
        Err(SpoolError::Full { .. }) => {}
        Err(e) => tracing::error!(error = %e, "records not spooled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolConfig;

    #[tokio::test]
    async fn emit_signed_returns_the_spooled_envelope_or_none_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(SpoolConfig {
            dir: dir.path().to_owned(),
            max_bytes: 64 << 10,
            segment_bytes: 64 << 10,
        })
        .unwrap();
        let signer = Arc::new(Signer::from_seed(&[4; 32]));
        let stop = CancellationToken::new();
        let (outbox, task) = spawn(
            spool,
            Stamp {
                signer: signer.clone(),
                node_id: signer.key_id().into(),
                start_id: "s".into(),
            },
            stop.clone(),
        );
        let body = |n: usize| {
            pb::record::Body::Telemetry(pb::Telemetry {
                gpu_events: vec![pb::GpuEvent {
                    detail: "x".repeat(n),
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let env = outbox.emit_signed(body(10)).await.expect("spooled");
        let rec: pb::Record =
            warden_proto::dsse::open(&env, types::RECORD, &signer.verifying_key()).unwrap();
        assert_eq!(rec.seq, 1);
        // The spool holds exactly what was returned.
        let read = outbox.read(1, 1).await.unwrap();
        assert_eq!(read[0].envelope, env);
        // Too big for the cap: refused, and the producer is told.
        assert!(outbox.emit_signed(body(80 << 10)).await.is_none());
        stop.cancel();
        task.await.unwrap();
    }
}
