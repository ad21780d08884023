//! The work challenge's shell (docs/attestation.md#work-challenge): keeps
//! the gate fed with inventories, sends the challenges it says are due,
//! checks answers off the async threads, and answers the matcher. The
//! decisions are the gate's (`workgate.rs`).
//!
//! The gate lives in memory on each replica; each GPU's outcome (pass or
//! failure, with the identity and CC report of its last pass) is stored
//! (`gpu_work`), read back at start, and, for nodes whose stream another
//! replica holds, every tick: a restarted coordinator, or a matcher on
//! another replica, knows which GPUs proved themselves.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message;
use tokio_util::sync::CancellationToken;
use warden_proto::{dsse::Signer, pb, types};

use crate::{
    clock::now_ms,
    matcher::Candidate,
    registry::Registry,
    store::Store,
    workgate::{Gate, Settings, State},
};

/// How late an answer may arrive past its deadline before the challenge
/// counts as unanswered (the answer in transit is still judged on time).
const GRACE: Duration = Duration::from_secs(5);
/// How often the issuer looks for due challenges and expired ones.
const TICK: Duration = Duration::from_millis(500);

/// The gate and its settings; cheap to clone. Off: every GPU is verified.
#[derive(Clone, Default)]
pub struct Work {
    inner: Option<Arc<(Mutex<Gate>, Settings, tokio::sync::Notify)>>,
}

impl Work {
    pub fn new(settings: Option<Settings>) -> Work {
        Work {
            inner: settings
                .map(|s| Arc::new((Mutex::new(Gate::default()), s, tokio::sync::Notify::new()))),
        }
    }

    fn gate(&self) -> Option<std::sync::MutexGuard<'_, Gate>> {
        self.inner
            .as_ref()
            .map(|i| i.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Marks each candidate GPU verified or not (one being challenged is not).
    pub fn restrict(&self, candidates: &mut [Candidate]) {
        let Some(gate) = self.gate() else { return };
        for c in candidates {
            for g in &mut c.gpus {
                g.verified = gate.offerable(&c.node_id, &g.uuid);
            }
        }
    }

    /// Each GPU's standing on a node, for the admin view (empty when off).
    pub fn standings(&self, node_id: &str) -> Vec<pb::GpuWorkStanding> {
        let Some(gate) = self.gate() else {
            return Vec::new();
        };
        let mut out: Vec<pb::GpuWorkStanding> = gate
            .entries(node_id)
            .map(|(uuid, e)| pb::GpuWorkStanding {
                uuid: uuid.to_owned(),
                state: e.state.name().to_owned(),
                reason: match &e.state {
                    State::Unverified { why } => why.clone(),
                    State::Failed { reason, .. } => reason.clone(),
                    _ => String::new(),
                },
                offered: gate.offerable(node_id, uuid),
                cc_status: e.cc_status.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        out
    }

    /// An answer from `node_id`'s stream (its signature already verified):
    /// judged on a blocking thread (a few seconds for a big challenge).
    pub async fn answered(&self, node_id: &str, answer: pb::WorkAnswer) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let received = now_ms();
        let node = node_id.to_owned();
        let judged = tokio::task::spawn_blocking(move || {
            let pending = {
                let gate = inner.0.lock().unwrap_or_else(|e| e.into_inner());
                gate.pending(&node, &answer.challenge_id).cloned()
            };
            let Some(ch) = pending else {
                return (answer, None);
            };
            // The tile work without the lock; then the identity under it.
            let verdict = warden_proto::workproof::check(&ch, &answer, received)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    inner
                        .0
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .judge_identity(&ch, &answer)
                });
            inner.0.lock().unwrap_or_else(|e| e.into_inner()).answered(
                &node,
                &answer,
                verdict.clone(),
                now_ms(),
            );
            inner.2.notify_one();
            (answer, Some((ch, verdict)))
        })
        .await;
        match judged {
            Ok((answer, None)) => {
                tracing::warn!(node = %node_id, challenge = %answer.challenge_id, "work answer for no pending challenge (late, or another replica's)")
            }
            Ok((answer, Some((ch, Ok(()))))) => tracing::info!(
                node = %node_id, gpu = %ch.gpu_uuid, challenge = %ch.challenge_id, n = ch.n, rounds = ch.rounds,
                solve_ms = answer.solve_ms, cc = %answer.cc_status, "work challenge passed"
            ),
            Ok((_, Some((ch, Err(why))))) => tracing::warn!(
                node = %node_id, gpu = %ch.gpu_uuid, challenge = %ch.challenge_id, reason = %why,
                "work challenge failed: the GPU is out of matching until one passes"
            ),
            Err(e) => tracing::error!(node = %node_id, error = %e, "work answer check panicked"),
        }
    }
}

/// Runs until `shutdown`: every tick, feeds the gate the stored
/// inventories of the nodes streaming here, fails overdue challenges and
/// sends those due.
pub async fn run(
    work: Work,
    store: Store,
    registry: Registry,
    signer: Arc<Signer>,
    shutdown: CancellationToken,
) {
    let Some(inner) = work.inner.clone() else {
        return;
    };
    let settings = inner.1.clone();
    match store.gpu_work().await {
        Ok(rows) => inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&rows),
        Err(e) => {
            tracing::warn!(error = %e, "stored work-challenge outcomes unreadable: every GPU is challenged again")
        }
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            // An answer judged: its outcome stored now, not a tick later (a
            // coordinator stopped meanwhile would challenge the GPU again).
            _ = inner.2.notified() => {
                store_changed(&inner.0, &store).await;
                continue;
            }
            _ = shutdown.cancelled() => {
                store_changed(&inner.0, &store).await;
                return;
            }
        }
        let (nodes, leases, stored) =
            match futures::join!(store.list_nodes(), store.list_leases(), store.gpu_work()) {
                (Ok(n), Ok(l), Ok(w)) => (n, l, w),
                _ => continue,
            };
        let candidates =
            crate::hire::candidates(&nodes, &leases, |n| registry.local_sender(n).is_some());
        let now = now_ms();
        let (due, changed) = {
            let mut gate = inner.0.lock().unwrap_or_else(|e| e.into_inner());
            // Nodes streaming to another replica: what that replica stored.
            let remote: Vec<_> = stored
                .into_iter()
                .filter(|r| registry.local_sender(&r.node_id).is_none())
                .collect();
            gate.restore(&remote);
            for n in &nodes {
                let inv = pb::InventorySummary::decode(n.inventory.as_slice()).unwrap_or_default();
                gate.inventory(&n.node_id, &inv.gpus);
            }
            for ch in gate.expire(now, GRACE) {
                tracing::warn!(node = %ch.node_id, gpu = %ch.gpu_uuid, challenge = %ch.challenge_id, "work challenge unanswered by its deadline: the GPU is out of matching until one passes");
            }
            let free: std::collections::HashSet<(&str, &str)> = candidates
                .iter()
                .filter(|c| c.connected)
                .flat_map(|c| {
                    c.gpus
                        .iter()
                        .filter(|g| g.free)
                        .map(|g| (c.node_id.as_str(), g.uuid.as_str()))
                })
                .collect();
            let due = gate.due(now, &settings, |node, uuid| free.contains(&(node, uuid)));
            (due, gate.take_changed())
        };
        put_rows(&store, changed).await;
        for d in due {
            let Some(tx) = registry.local_sender(&d.node_id) else {
                continue;
            };
            let ch = Gate::challenge(
                &d,
                &settings,
                now_ms(),
                rand::random(),
                rand::random(),
                crate::ids::fresh("wc"),
            );
            let env = signer.sign_message(types::WORK_CHALLENGE, &ch);
            inner
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .issued(ch.clone());
            tracing::info!(node = %d.node_id, gpu = %d.gpu.uuid, challenge = %ch.challenge_id, n = ch.n, rounds = ch.rounds, deadline_ms = ch.deadline_unix_ms - ch.issued_unix_ms, "work challenge sent");
            let _ = tx.send(Ok(env)).await;
        }
    }
}

/// Stores the outcomes the gate changed since they were last taken.
async fn store_changed(gate: &Mutex<Gate>, store: &Store) {
    let changed = gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take_changed();
    put_rows(store, changed).await;
}

async fn put_rows(store: &Store, rows: Vec<crate::store::GpuWorkRow>) {
    for row in rows {
        let (node, gpu) = (row.node_id.clone(), row.gpu_uuid.clone());
        if let Err(e) = store.put_gpu_work(row).await {
            tracing::error!(node = %node, gpu = %gpu, error = %e, "work-challenge outcome not stored: a restart will challenge the GPU again");
        }
    }
}
