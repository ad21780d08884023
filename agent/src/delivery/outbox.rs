//! The task that owns the spool: it numbers and signs every record the
//! agent emits, admits it by class (telemetry samples are shed before any
//! evidence is refused), appends the admitted ones in fsync'd groups before
//! anyone may send them, and serves the uplink's reads, acknowledgements,
//! set-asides and the coordinator's anchor.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::{
    dsse::{self, Signer},
    pb::{self, Envelope},
    types,
};

use crate::delivery::spool::{Admit, Anchoring, Class, Eviction, Spool, SpoolStats, RELINKS};

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
    SetAside {
        seq: u64,
        why: String,
    },
    Anchor {
        last_stored: u64,
        reply: oneshot::Sender<Result<Anchoring, String>>,
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

    /// Moves a record the coordinator refused for good to the set-aside log.
    pub fn set_aside(&self, seq: u64, why: String) {
        let _ = self.control.send(Control::SetAside { seq, why });
    }

    /// Takes the coordinator's last stored seq for this node: an unanchored
    /// spool's records are renumbered after it (see [`Spool::anchor`]).
    pub async fn anchor(&self, last_stored: u64) -> Result<Anchoring, String> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Anchor { last_stored, reply })
            .map_err(|_| "the outbox has stopped".to_owned())?;
        rx.await.map_err(|_| "the outbox has stopped".to_owned())?
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

/// How a record body fares when room runs out: plain telemetry samples
/// are shed first; anything carrying an event (GPU health, container
/// lifecycle), and every other body, is evidence.
pub fn class_of(body: &pb::record::Body) -> Class {
    match body {
        pb::record::Body::Telemetry(t)
            if t.gpu_events.is_empty() && t.workload_events.is_empty() =>
        {
            Class::Telemetry
        }
        _ => Class::Evidence,
    }
}

/// Digests of attestations that were renumbered (re-signed): old → new.
/// A chain link to an old digest is rewritten before signing, so a chain
/// that crossed a renumbering stays linked.
#[derive(Debug, Default)]
struct Relinks {
    map: HashMap<[u8; 32], [u8; 32]>,
    path: Option<PathBuf>,
}

impl Relinks {
    fn load(path: PathBuf) -> Relinks {
        let mut map = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                let mut parts = line.split_whitespace().filter_map(|h| {
                    let v = hex::decode(h).ok()?;
                    <[u8; 32]>::try_from(v.as_slice()).ok()
                });
                if let (Some(old), Some(new)) = (parts.next(), parts.next()) {
                    map.insert(old, new);
                }
            }
        }
        Relinks {
            map,
            path: Some(path),
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let text: String = self
            .map
            .iter()
            .map(|(o, n)| format!("{} {}\n", hex::encode(o), hex::encode(n)))
            .collect();
        if let Err(e) = warden_state::file::write_private(path, text.as_bytes()) {
            tracing::error!(file = %path.display(), error = %e, "could not save the renumbered attestation digests; a chain crossing the renumbering may show a broken link after a restart");
        }
    }

    fn apply(&self, body: &mut pb::record::Body) {
        relink(&self.map, body);
    }
}

/// Points a chain link at the renumbered record it meant.
fn relink(map: &HashMap<[u8; 32], [u8; 32]>, body: &mut pb::record::Body) {
    let link = match body {
        pb::record::Body::Attestation(a) => &mut a.prev_sha256,
        pb::record::Body::LeaseProof(p) => &mut p.head_sha256,
        _ => return,
    };
    if let Some(new) = <[u8; 32]>::try_from(link.as_slice())
        .ok()
        .and_then(|d| map.get(&d))
    {
        *link = new.to_vec();
    }
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
    let relinks = Relinks::load(spool.dir().join(RELINKS));
    let owner = Owner {
        spool,
        stamp,
        relinks,
        set_aside_said: 0,
    };
    // The spool writes and fsyncs synchronously: its owner runs on a thread
    // of its own (with a runtime for its channels), never on the shared
    // async workers, whose other tasks would wait out every fsync.
    let task = tokio::task::spawn_blocking(move || {
        match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => rt.block_on(run(owner, emit_rx, control_rx, stats_tx, shutdown)),
            Err(e) => tracing::error!(error = %e, "the outbox cannot start its runtime"),
        }
    });
    (
        Outbox {
            emit: emit_tx,
            control: control_tx,
            stats: stats_rx,
        },
        task,
    )
}

/// What the outbox task owns.
struct Owner {
    spool: Spool,
    stamp: Stamp,
    relinks: Relinks,
    /// Set-asides logged at warn by this process.
    set_aside_said: u64,
}

async fn run(
    mut o: Owner,
    mut emit_rx: mpsc::Receiver<Emit>,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
    stats_tx: watch::Sender<SpoolStats>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            Some(c) = control_rx.recv() => o.control(c),
            body = emit_rx.recv() => {
                // Every handle dropped: nobody can emit or ask any more.
                let Some(body) = body else { break };
                let mut group = vec![body];
                while group.len() < MAX_GROUP {
                    match emit_rx.try_recv() {
                        Ok(b) => group.push(b),
                        Err(_) => break,
                    }
                }
                o.append(group);
            }
            _ = shutdown.cancelled() => break,
        }
        stats_tx.send_replace(o.spool.stats());
    }
    // Whatever producers queued before shutdown is still spooled.
    emit_rx.close();
    let mut rest = Vec::new();
    while let Ok(b) = emit_rx.try_recv() {
        rest.push(b);
    }
    if !rest.is_empty() {
        o.append(rest);
    }
    while let Ok(c) = control_rx.try_recv() {
        o.control(c);
    }
    if let Err(e) = o.spool.flush() {
        tracing::error!(error = %e, "spool flush at shutdown failed");
    }
    stats_tx.send_replace(o.spool.stats());
}

impl Owner {
    fn control(&mut self, c: Control) {
        match c {
            Control::Ack(seq) => {
                self.spool.ack(seq);
            }
            Control::Read { from, max, reply } => {
                let result = self
                    .spool
                    .read_from(from, max)
                    .map_err(|e| e.to_string())
                    .and_then(|recs| {
                        recs.into_iter()
                            .map(|(seq, bytes)| {
                                Envelope::decode(bytes.as_slice())
                                    .map(|envelope| Pending { seq, envelope })
                                    .map_err(|e| {
                                        format!("spooled record {seq} does not decode: {e}")
                                    })
                            })
                            .collect()
                    });
                let _ = reply.send(result);
            }
            Control::SetAside { seq, why } => match self.spool.set_aside(&[seq], &why) {
                // The first of this run and every thousandth are said; all are in refused.txt.
                Ok(1) => match self.spool.stats().set_aside {
                    n if self.set_aside_said == 0 || n % 1000 == 0 => {
                        self.set_aside_said += 1;
                        tracing::warn!(seq, reason = %why, set_aside = n, "record set aside: the coordinator will never accept it; kept in the spool's refused.log (reasons in refused.txt)")
                    }
                    _ => tracing::debug!(seq, reason = %why, "record set aside"),
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(seq, error = %e, "could not set a refused record aside; it stays spooled")
                }
            },
            Control::Anchor { last_stored, reply } => {
                let _ = reply.send(self.anchor(last_stored));
            }
        }
    }

    fn anchor(&mut self, last_stored: u64) -> Result<Anchoring, String> {
        let mut fresh: HashMap<[u8; 32], [u8; 32]> = HashMap::new();
        let (stamp, relinks) = (&self.stamp, &self.relinks);
        let result = self.spool.anchor(last_stored, &mut |seq, old| {
            let env = Envelope::decode(old).map_err(|e| format!("does not decode: {e}"))?;
            let mut rec = pb::Record::decode(env.payload.as_slice())
                .map_err(|e| format!("payload does not decode: {e}"))?;
            rec.seq = seq;
            if let Some(body) = rec.body.as_mut() {
                relinks.apply(body);
                // And links to records renumbered earlier in this pass.
                relink(&fresh, body);
            }
            let new = stamp.signer.sign_message(types::RECORD, &rec);
            if matches!(rec.body, Some(pb::record::Body::Attestation(_))) {
                fresh.insert(dsse::payload_sha256(&env), dsse::payload_sha256(&new));
            }
            Ok(new.encode_to_vec())
        });
        match &result {
            Ok(Anchoring::Renumbered { count, first }) => {
                tracing::warn!(count, first, last_stored, "the spool was started empty but the coordinator already holds records of this node: the unsent records were renumbered (and re-signed) to follow its last seq");
                if !fresh.is_empty() {
                    self.relinks.map.extend(fresh);
                    self.relinks.save();
                }
            }
            Ok(Anchoring::Skipped { from, to }) => tracing::warn!(from, to, "the coordinator already holds records of this node beyond the spool's next seq (a restored spool?): new records continue after them"),
            Ok(Anchoring::Unchanged) => {}
            Err(e) => tracing::error!(error = %e, "could not anchor the spool; records stay unsent until the next connection"),
        }
        result.map_err(|e| e.to_string())
    }

    /// Numbers, signs and admits each body in turn (a shed one takes no
    /// seq), appends the group with a single fsync, then tells whoever
    /// asked what was spooled.
    fn append(&mut self, bodies: Vec<Emit>) {
        let before = self.spool.stats();
        let first = self.spool.next_seq();
        let now = crate::now_ms();
        let mut waiting = Vec::new();
        let mut records: Vec<(u64, Class, Vec<u8>)> = Vec::new();
        for (mut body, reply) in bodies {
            self.relinks.apply(&mut body);
            let class = class_of(&body);
            let seq = first + records.len() as u64;
            let record = pb::Record {
                node_id: self.stamp.node_id.clone(),
                seq,
                time_unix_ms: now,
                start_id: self.stamp.start_id.clone(),
                body: Some(body),
            };
            let env = self.stamp.signer.sign_message(types::RECORD, &record);
            let bytes = env.encode_to_vec();
            match self.spool.admit(class, bytes.len()) {
                Ok((Admit::Take, eviction)) => {
                    log_eviction(&eviction);
                    records.push((seq, class, bytes));
                    if let Some(reply) = reply {
                        waiting.push((reply, env));
                    }
                }
                Ok((_, eviction)) => {
                    log_eviction(&eviction);
                    if let Some(reply) = reply {
                        let _ = reply.send(None);
                    }
                }
                Err(e) => {
                    tracing::error!(seq, error = %e, "record not spooled");
                    if let Some(reply) = reply {
                        let _ = reply.send(None);
                    }
                }
            }
        }
        let result = self.spool.append_batch(&records);
        let spooled = result.is_ok();
        for (reply, env) in waiting {
            let _ = reply.send(spooled.then_some(env));
        }
        if let Err(e) = result {
            tracing::error!(error = %e, records = records.len(), "records not spooled");
        }
        // Each change of state is said once; status, heartbeats and telemetry carry the counts.
        let after = self.spool.stats();
        match (before.shedding, after.shedding) {
            (false, true) => tracing::warn!(
                bytes = after.bytes, max_bytes = after.max_bytes,
                "spool full: shedding telemetry samples; attestations, proofs, command results and events are still kept"
            ),
            (true, false) => tracing::info!(shed = after.shed, "spool has room again; telemetry samples are spooled"),
            _ => {}
        }
        match (before.full, after.full) {
            (false, true) => tracing::error!(
                bytes = after.bytes, max_bytes = after.max_bytes,
                "spool full of evidence (no telemetry left to shed): new records are refused until the coordinator acknowledges older ones — check connectivity or raise spool.max_bytes"
            ),
            (true, false) => tracing::info!("spool has room for evidence again"),
            _ => {}
        }
    }
}

fn log_eviction(e: &Eviction) {
    if e.shed > 0 {
        tracing::info!(
            shed = e.shed, freed_bytes = e.freed, first_seq = ?e.first_seq, last_seq = ?e.last_seq,
            "spooled telemetry samples evicted to make room for evidence; their seqs will show as a gap"
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::delivery::spool::SpoolConfig;

    /// A 64 KiB spool in `dir`: full after a few dozen records.
    pub(crate) fn small_spool(dir: &std::path::Path) -> Spool {
        Spool::open(SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: 64 << 10,
            segment_bytes: 64 << 10,
        })
        .unwrap()
        .0
    }

    #[tokio::test]
    async fn emit_signed_returns_the_spooled_envelope_or_none_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let spool = small_spool(dir.path());
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

#[cfg(test)]
mod class_tests {
    use super::*;
    use crate::delivery::spool::SpoolConfig;

    fn stamp(signer: &Arc<Signer>) -> Stamp {
        Stamp {
            signer: signer.clone(),
            node_id: signer.key_id().into(),
            start_id: "s".into(),
        }
    }

    fn sample(i: u64) -> pb::record::Body {
        pb::record::Body::Telemetry(pb::Telemetry {
            host: Some(pb::HostSample {
                uptime_s: i,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn attestation(prev: Vec<u8>, lease_seq: u64) -> pb::record::Body {
        pb::record::Body::Attestation(pb::Attestation {
            lease_id: "L".into(),
            lease_seq,
            prev_sha256: prev,
            ..Default::default()
        })
    }

    fn record(env: &Envelope, signer: &Signer) -> pb::Record {
        dsse::open(env, types::RECORD, &signer.verifying_key()).unwrap()
    }

    #[test]
    fn samples_are_shed_but_events_and_the_rest_are_evidence() {
        assert_eq!(class_of(&sample(1)), Class::Telemetry);
        let with_event = pb::record::Body::Telemetry(pb::Telemetry {
            workload_events: vec![pb::WorkloadEvent::default()],
            ..Default::default()
        });
        assert_eq!(class_of(&with_event), Class::Evidence);
        assert_eq!(class_of(&attestation(vec![], 1)), Class::Evidence);
        assert_eq!(
            class_of(&pb::record::Body::LeaseProof(Default::default())),
            Class::Evidence
        );
    }

    #[tokio::test]
    async fn a_full_spool_sheds_samples_and_still_spools_every_attestation() {
        let dir = tempfile::tempdir().unwrap();
        let spool = super::tests::small_spool(dir.path());
        let signer = Arc::new(Signer::from_seed(&[5; 32]));
        let stop = CancellationToken::new();
        let (outbox, task) = spawn(spool, stamp(&signer), stop.clone());
        let mut prev = vec![0; 32];
        for round in 0..20u64 {
            for i in 0..200 {
                assert!(outbox.emit(sample(round * 1000 + i)).await);
            }
            let env = outbox
                .emit_signed(attestation(prev.clone(), round + 1))
                .await
                .unwrap_or_else(|| panic!("attestation {} refused", round + 1));
            prev = dsse::payload_sha256(&env).to_vec();
        }
        let st = *outbox.stats().borrow();
        assert!(st.shed > 0 && !st.full, "{st:?}");
        assert!(st.bytes <= 64 << 10, "{st:?}");
        let spooled = outbox.read(0, usize::MAX).await.unwrap();
        let lease_seqs: Vec<u64> = spooled
            .iter()
            .filter_map(|p| match record(&p.envelope, &signer).body {
                Some(pb::record::Body::Attestation(a)) => Some(a.lease_seq),
                _ => None,
            })
            .collect();
        assert_eq!(lease_seqs, (1..=20).collect::<Vec<_>>());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn renumbering_re_signs_and_keeps_the_chain_linked() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            Spool::open(SpoolConfig {
                dir: dir.path().to_owned(),
                max_bytes: 1 << 20,
                segment_bytes: 64 << 10,
            })
            .unwrap()
            .0
        };
        let signer = Arc::new(Signer::from_seed(&[6; 32]));
        let stop = CancellationToken::new();
        let (outbox, task) = spawn(open(), stamp(&signer), stop.clone());
        assert!(!outbox.stats().borrow().anchored);
        let a1 = outbox
            .emit_signed(attestation(vec![0; 32], 1))
            .await
            .unwrap();
        assert!(outbox.emit(sample(1)).await);
        let a2 = outbox
            .emit_signed(attestation(dsse::payload_sha256(&a1).to_vec(), 2))
            .await
            .unwrap();
        assert_eq!(record(&a2, &signer).seq, 3);
        // The coordinator already holds seqs 1..=40 of this node (the spool was wiped).
        let got = outbox.anchor(40).await.unwrap();
        assert_eq!(
            got,
            Anchoring::Renumbered {
                count: 3,
                first: 41
            }
        );
        // The figures follow the answer (the owner publishes them after it).
        let mut stats = outbox.stats();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stats.wait_for(|s| s.anchored),
        )
        .await
        .expect("the spool's figures say anchored")
        .unwrap();
        // The timelock still holds a2's old digest as its head.
        outbox
            .emit_signed(attestation(dsse::payload_sha256(&a2).to_vec(), 3))
            .await
            .unwrap();
        stop.cancel();
        task.await.unwrap();

        // A restarted agent reads the renumbered spool and the saved links.
        let stop = CancellationToken::new();
        let (outbox, task) = spawn(open(), stamp(&signer), stop.clone());
        outbox
            .emit_signed(pb::record::Body::LeaseProof(pb::LeaseProof {
                head_sha256: dsse::payload_sha256(&a2).to_vec(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let recs: Vec<pb::Record> = outbox
            .read(0, usize::MAX)
            .await
            .unwrap()
            .iter()
            .map(|p| {
                let r = record(&p.envelope, &signer);
                assert_eq!(r.seq, p.seq);
                r
            })
            .collect();
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![41, 42, 43, 44, 45]);
        let envs = outbox.read(0, usize::MAX).await.unwrap();
        let digest = |i: usize| dsse::payload_sha256(&envs[i].envelope).to_vec();
        let link = |r: &pb::Record| match &r.body {
            Some(pb::record::Body::Attestation(a)) => a.prev_sha256.clone(),
            Some(pb::record::Body::LeaseProof(p)) => p.head_sha256.clone(),
            _ => panic!("not a chain record"),
        };
        assert_eq!(link(&recs[0]), vec![0; 32]);
        assert_eq!(link(&recs[2]), digest(0), "a2 links to the renumbered a1");
        assert_eq!(link(&recs[3]), digest(2), "a3 links to the renumbered a2");
        assert_eq!(
            link(&recs[4]),
            digest(2),
            "the proof's head too, after a restart"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
