//! The agents' stream: one session per connected agent.
//!
//! A session starts with the coordinator's Hello (a fresh nonce), then a
//! Register signed by the key it announces and carrying that nonce, which
//! the enrollment policy must let in; the coordinator answers Registered,
//! then a Welcome carrying the last seq it has stored for the node. After
//! that every envelope is verified against that node's key; records are
//! stored and answered with a signed Receipt, anything that fails
//! verification or a limit with a signed Refusal giving the reason and its
//! kind (final, or retry later). A node sending faster than its rate is
//! paused (not refused).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use warden_proto::{
    dsse::{Signer, VerifyingKey},
    pb::{self, Envelope, RefusalKind},
    types,
};

use crate::{
    clock::now_ms,
    enrollment::{Admit, Denied, EnrollRate, Policy},
    listener::ConnInfo,
    ratelimit::{LogGate, NodeThrottle},
    registry::{Outbound, Registry},
    store::{ChainItem, NewRecord, NodeRow, Outcome, Store},
    verifier::{check_register, Inbound, NodeCheck, OverLimit},
};

/// How long an agent has to send Register after opening the stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Envelopes verified and stored together.
const CHUNK: usize = 512;
/// What a session enforces beyond verification: who may register, how fast
/// new nodes may come, and how fast each node may send.
#[derive(Clone)]
pub struct Gate {
    pub policy: Arc<Policy>,
    pub rate: Arc<Mutex<EnrollRate>>,
    pub throttle: NodeThrottle,
    /// Refused registrations are logged at most once per 10 s, with a count.
    refused_log: Arc<Mutex<LogGate>>,
}

impl Gate {
    pub fn new(policy: Policy, rate: EnrollRate, throttle: NodeThrottle) -> Self {
        Self {
            policy: Arc::new(policy),
            rate: Arc::new(Mutex::new(rate)),
            throttle,
            refused_log: Arc::new(Mutex::new(LogGate::new(Duration::from_secs(10)))),
        }
    }
}

/// The gRPC `Uplink` service.
#[derive(Clone)]
pub struct UplinkService {
    signer: Arc<Signer>,
    store: Store,
    registry: Registry,
    shutdown: CancellationToken,
    /// Least coverage for a lease's proof to hold.
    min_coverage: f64,
    gate: Gate,
    /// Where work answers go (off unless `[work_challenge]` is on).
    work: crate::workissuer::Work,
}

impl UplinkService {
    pub fn new(
        signer: Arc<Signer>,
        store: Store,
        registry: Registry,
        shutdown: CancellationToken,
        min_coverage: f64,
        gate: Gate,
    ) -> Self {
        Self {
            signer,
            store,
            registry,
            shutdown,
            min_coverage,
            gate,
            work: Default::default(),
        }
    }

    /// Work answers from the nodes go to `work`.
    pub fn with_work(mut self, work: crate::workissuer::Work) -> Self {
        self.work = work;
        self
    }

    /// Registers the stream's node, then serves it until the stream ends.
    async fn serve(
        self,
        mut inbound: Streaming<Envelope>,
        nonce: [u8; 32],
        peer: Option<std::net::SocketAddr>,
        tx: Outbound,
    ) {
        let registered = tokio::select! {
            r = self.register(&mut inbound, &nonce, peer) => r,
            _ = self.shutdown.cancelled() => return,
        };
        let (reg, key, registration) = match registered {
            Ok(r) => r,
            Err(status) => {
                let due = self
                    .gate
                    .refused_log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .hit(Instant::now());
                if let Some(n) = due {
                    tracing::warn!(peer = %peer.map(|p| p.to_string()).unwrap_or_default(), refused = n, reason = %status.message(), "registration refused");
                }
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        tracing::info!(node = %reg.node_id, peer = %peer.map(|p| p.to_string()).unwrap_or_default(), version = %reg.agent_version, last_seq = registration.last_seq, "agent registered");
        // Queued as the stream is attached: nothing else reaches the agent first.
        let registered = self.signer.sign_message(
            types::REGISTERED,
            &pb::Registered {
                node_id: reg.node_id.clone(),
                session_nonce: nonce.to_vec(),
                time_unix_ms: now_ms(),
            },
        );
        // Then where the node's seqs stand here: the agent anchors its spool on it.
        let welcome = self.signer.sign_message(
            types::WELCOME,
            &pb::Welcome {
                node_id: reg.node_id.clone(),
                last_seq: registration.last_seq,
                time_unix_ms: now_ms(),
            },
        );
        let mesh_changed = registration.mesh_changed;
        let registry = self.registry.clone();
        let Some(id) = registry.attach(&reg.node_id, tx.clone(), vec![registered, welcome]) else {
            return;
        };
        {
            let mesh = crate::mesh::MeshSender {
                store: self.store.clone(),
                registry: registry.clone(),
            };
            let node = reg.node_id.clone();
            let running = reg.mesh_cluster_id.clone();
            tokio::spawn(async move { mesh.connected(&node, &running, mesh_changed).await });
        }
        let session = Session {
            node_id: reg.node_id,
            key,
            signer: self.signer.clone(),
            store: self.store.clone(),
            registry: registry.clone(),
            tx,
            min_coverage: self.min_coverage,
            throttle: self.gate.throttle.clone(),
            work: self.work.clone(),
        };
        let node = session.node_id.clone();
        let end = tokio::select! {
            r = session.run(inbound) => r,
            _ = self.shutdown.cancelled() => Ok(()),
        };
        registry.detach(&node, id);
        match end {
            Ok(()) => tracing::info!(%node, "agent stream closed"),
            Err(e) => tracing::warn!(%node, error = %e, "agent stream ended"),
        }
    }

    /// Reads the Register, checks it against this stream's nonce and the
    /// enrollment policy, and stores it: the node, its key, and what storing
    /// it said (the node's last stored seq, whether its mesh identity changed).
    async fn register(
        &self,
        inbound: &mut Streaming<Envelope>,
        nonce: &[u8; 32],
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(pb::Register, VerifyingKey, crate::store::Registered), Status> {
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 10 s"))??
            .ok_or_else(|| Status::cancelled("stream closed before Register"))?;
        let (reg, key) = check_register(&first, now_ms(), nonce)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let unavailable = |e: crate::store::StoreError| Status::unavailable(e.to_string());
        let stored = self
            .store
            .enrolled(&reg.node_id)
            .await
            .map_err(unavailable)?;
        let denied = |d: Denied| Status::new(d.code(), d.to_string());
        let admit = self
            .gate
            .policy
            .decide(&reg.node_id, stored, &reg.join_token)
            .map_err(denied)?;
        if admit.rate_limited() {
            let ip = peer
                .map(|p| p.ip().to_canonical())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            self.gate
                .rate
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(ip, Instant::now())
                .map_err(denied)?;
        }
        let enrolled = match admit {
            Admit::Known => None,
            Admit::Enroll { by, new } => {
                tracing::info!(node = %reg.node_id, by = by.as_str(), new, "node enrolled");
                Some(by)
            }
        };
        let registration = self
            .store
            .register(NodeRow {
                node_id: reg.node_id.clone(),
                public_key: reg.public_key.clone(),
                agent_version: reg.agent_version.clone(),
                hostname: reg
                    .inventory
                    .as_ref()
                    .map(|i| i.hostname.clone())
                    .unwrap_or_default(),
                inventory: reg
                    .inventory
                    .as_ref()
                    .map(|i| i.encode_to_vec())
                    .unwrap_or_default(),
                start_id: reg.start_id.clone(),
                peer_address: peer.map(|p| p.to_string()).unwrap_or_default(),
                time_ms: now_ms(),
                inventory_ms: reg.time_unix_ms,
                mesh_public_key: reg.mesh_public_key.clone(),
                mesh_endpoints: reg.mesh_endpoints.clone(),
                labels: reg.labels.clone().unwrap_or_default(),
                enrolled,
            })
            .await
            .map_err(unavailable)?;
        Ok((reg, key, registration))
    }
}

#[tonic::async_trait]
impl pb::uplink_server::Uplink for UplinkService {
    type SessionStream = ReceiverStream<Result<Envelope, Status>>;

    /// Answers at once with a Hello; the Register is awaited in the
    /// session's own task.
    async fn session(
        &self,
        request: Request<Streaming<Envelope>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.remote)
            .or_else(|| request.remote_addr());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(CHUNK * 2);
        let nonce: [u8; 32] = rand::random();
        let hello = self.signer.sign_message(
            types::HELLO,
            &pb::Hello {
                nonce: nonce.to_vec(),
                time_unix_ms: now_ms(),
            },
        );
        tx.try_send(Ok(hello))
            .map_err(|_| Status::internal("a new stream's channel is full"))?;
        tokio::spawn(self.clone().serve(inbound, nonce, peer, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    node_id: String,
    key: VerifyingKey,
    signer: Arc<Signer>,
    store: Store,
    registry: Registry,
    tx: Outbound,
    min_coverage: f64,
    throttle: NodeThrottle,
    work: crate::workissuer::Work,
}

impl Session {
    async fn run(&self, inbound: Streaming<Envelope>) -> Result<(), Status> {
        let mut chunks = inbound.ready_chunks(CHUNK);
        let mut throttled = false;
        while let Some(chunk) = chunks.next().await {
            let bytes: usize = chunk
                .iter()
                .map(|e| e.as_ref().map_or(0, |e| e.payload.len()))
                .sum();
            let pause = self.throttle.charge(
                &self.node_id,
                chunk.len() as u64,
                bytes as u64,
                Instant::now(),
            );
            // Over its rate: this chunk waits, and meanwhile nothing more is
            // read from the node (HTTP/2 flow control holds it back); other
            // nodes' sessions go on.
            if !pause.is_zero() {
                if !throttled {
                    tracing::info!(node = %self.node_id, pause = ?pause, "node over its rate (limits.node_envelopes_per_second, limits.node_bytes_per_second): throttled");
                }
                tokio::time::sleep(pause).await;
            }
            throttled = !pause.is_zero();
            let mut to_store: Vec<NewRecord> = Vec::new();
            let mut replies = Vec::new();
            let mut heard = false;
            let mut spool = None;
            let mut envs = Vec::with_capacity(chunk.len());
            for item in chunk {
                match item {
                    Ok(env) => envs.push(env),
                    Err(status) => {
                        // Tell the agent why (e.g. an oversized message), not just hang up.
                        let _ = self.tx.send(Err(status.clone())).await;
                        return Err(status);
                    }
                }
            }
            let check = NodeCheck {
                node_id: &self.node_id,
                key: &self.key,
            };
            for inbound in check.check_all(&envs) {
                match inbound {
                    Inbound::Store(r) => to_store.push(*r),
                    Inbound::Refuse {
                        seq,
                        digest,
                        kind,
                        reason,
                    } => {
                        tracing::warn!(node = %self.node_id, seq, kind = kind.as_str_name(), %reason, "record refused");
                        replies.push(self.refusal(seq, digest, kind, reason));
                    }
                    Inbound::Heartbeat(hb) => {
                        heard = true;
                        spool = hb.spool.map(|s| s.encode_to_vec()).or(spool);
                    }
                    Inbound::WorkAnswer(answer) => {
                        heard = true;
                        // Judged apart: its check must not hold up the stream.
                        let (work, node) = (self.work.clone(), self.node_id.clone());
                        tokio::spawn(async move { work.answered(&node, *answer).await });
                    }
                    Inbound::Logs(chunk) => {
                        heard = true;
                        self.registry.resolve(
                            &self.node_id,
                            &pb::CommandResult {
                                command_id: chunk.command_id.clone(),
                                lease_id: chunk.lease_id.clone(),
                                ok: chunk.error.is_empty(),
                                error: chunk.error.clone(),
                                logs: Some(chunk),
                                ..Default::default()
                            },
                        );
                    }
                }
            }
            if heard || !to_store.is_empty() {
                self.store.seen(&self.node_id, now_ms(), spool);
            }
            if !to_store.is_empty() {
                let refused: Vec<(u64, [u8; 32])> =
                    to_store.iter().map(|r| (r.seq, r.payload_sha256)).collect();
                match self
                    .store
                    .insert_with(to_store, crate::ingest::effects, self.signer.clone())
                    .await
                {
                    Ok(stored) => {
                        for (rec, outcome) in stored.records {
                            replies.extend(self.stored(rec, outcome));
                        }
                        replies.extend(stored.receipts);
                    }
                    Err(e) => {
                        // Nothing of the chunk is stored: the agent keeps the
                        // records and sends them again later; the stream stays up.
                        tracing::error!(node = %self.node_id, error = %e, records = refused.len(), "records not stored; refused for now");
                        for (seq, digest) in refused {
                            replies.push(self.refusal(
                                seq,
                                digest,
                                RefusalKind::RetryLater,
                                format!("the coordinator could not store it now: {e}"),
                            ));
                        }
                    }
                }
            }
            for r in replies {
                if self.tx.send(Ok(r)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// What a record's storing asks once committed: its answers go to whoever
    /// waits, a stored proof has its lease judged, and a record not stored
    /// is refused (why). The receipts of those stored come from the store.
    fn stored(&self, rec: NewRecord, outcome: Outcome) -> Option<Envelope> {
        if matches!(outcome, Outcome::Stored | Outcome::Duplicate) {
            for r in &rec.state.results {
                self.registry.resolve(&self.node_id, r);
            }
        }
        if let (Outcome::Stored, Some(ChainItem::Proof { lease_id })) = (&outcome, &rec.state.chain)
        {
            // The lease has ended: judge its whole chain against the proof.
            let (store, signer, lease) =
                (self.store.clone(), self.signer.clone(), lease_id.clone());
            let min = self.min_coverage;
            tokio::spawn(async move {
                crate::verifier::lease::judge(&store, &signer, &lease, min).await
            });
        }
        match outcome {
            Outcome::Stored | Outcome::Duplicate => None,
            Outcome::Conflict { stored_sha256 } => Some(self.refusal(
                rec.seq,
                rec.payload_sha256,
                RefusalKind::Conflict,
                format!(
                    "seq {} is already stored with different content (sha256 {})",
                    rec.seq,
                    hex::encode(stored_sha256)
                ),
            )),
            Outcome::OverQuota { stored, quota } => {
                let why = OverLimit::Quota {
                    node: self.node_id.clone(),
                    stored,
                    size: rec.payload.len(),
                    quota,
                };
                tracing::warn!(node = %self.node_id, seq = rec.seq, "record refused: {why}");
                // Retryable: the record stays in the agent's spool until
                // the operator raises the quota.
                Some(self.refusal(
                    rec.seq,
                    rec.payload_sha256,
                    RefusalKind::RetryLater,
                    why.to_string(),
                ))
            }
        }
    }

    fn refusal(&self, seq: u64, digest: [u8; 32], kind: RefusalKind, reason: String) -> Envelope {
        self.signer.sign_message(
            types::REFUSAL,
            &pb::Refusal {
                node_id: self.node_id.clone(),
                seq,
                payload_sha256: digest.to_vec(),
                reason,
                time_unix_ms: now_ms(),
                kind: kind.into(),
            },
        )
    }
}
