//! The task that owns the connection to the coordinator: one bidirectional
//! gRPC stream over TLS, reopened with jittered exponential backoff. With
//! several coordinator addresses it stays on one while its stream lives and
//! moves to the next when it dies, waiting only after a whole round failed
//! ([`Rotation`], pure).
//!
//! On each connection it registers (the coordinator's Hello gives the nonce
//! that binds the Register to this stream; Registered accepts it), takes
//! the coordinator's Welcome (its last stored seq for this node, which
//! anchors a spool started empty),
//! then sends every pending record from the spool in seq order (at most
//! `max_in_flight` unacknowledged) and heartbeats. A record leaves the
//! spool only on a receipt that verifies against the pinned coordinator
//! key, for this node, with the digest of what was sent; or, refused for
//! good by a refusal that verifies likewise, to the set-aside log. What
//! each coordinator message means, when to stop waiting for the Welcome and
//! when to wake are decided by [`Session`] (pure, beside the window's
//! bookkeeping, [`crate::delivery::Window`]); this task carries it out.
//! Anything else from the coordinator is logged and ignored.

use std::{sync::Arc, time::Duration};

use rand::Rng;
use tokio::{sync::watch, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warden_proto::{
    dsse::{self, Signer, VerifyingKey},
    pb::{self, uplink_client::UplinkClient, Envelope},
    types,
};

use crate::{
    config::{CoordinatorLink, UplinkConfig},
    delivery::failover::{Next, Outcome, Rotation},
    delivery::outbox::Outbox,
    delivery::session::{Ignored, Inbound, Session},
    delivery::Window,
};

/// What `warden status` shows of the connection.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UplinkStatus {
    /// The address the agent is on now (connected, or trying).
    pub address: String,
    /// Every configured address in the order they are tried, with the
    /// last failure at each: a standby that is down or signs with another
    /// key shows here while the agent delivers through another.
    pub addresses: Vec<AddressStatus>,
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_receipt_seq: u64,
    pub records_sent: u64,
    pub receipts: u64,
    /// Refusals of records in flight, since start (final and retryable).
    pub refusals: u64,
    /// Of those, refusals for good: the record was set aside.
    pub refusals_final: u64,
    /// Records refused for now, waiting to be sent again.
    pub retrying: u64,
    pub last_refusal: Option<String>,
    /// The last seq the coordinator said it holds for this node (its Welcome).
    pub coordinator_last_seq: Option<u64>,
    /// Why the uplink is not delivering, with the fix (the last failure's).
    pub problem: Option<String>,
    pub connected_since_unix_ns: i64,
    pub last_receipt_unix_ms: i64,
}

/// One configured coordinator address, as `warden status` shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AddressStatus {
    pub address: String,
    /// Why the last try there failed or its stream ended; cleared when a
    /// stream there registers.
    pub last_error: Option<String>,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot read the coordinator CA certificate {path}: {source}")]
    Ca {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("coordinator refused the stream: {}", .0.message())]
    Refused(tonic::Status),
    #[error("coordinator refused to register this node: {}", .0.message())]
    Registration(tonic::Status),
    #[error("registering: {0}")]
    Handshake(String),
    #[error("stream broken: {}", .0.message())]
    Stream(tonic::Status),
    #[error("the coordinator closed the stream")]
    Closed,
    #[error("local spool: {0}")]
    Spool(String),
    #[error("the coordinator at {address} signs with key id {theirs}, not with the pinned coordinator.public_key {pinned} (key id {pinned_id}); nothing is sent to it, since its receipts and commands could not be trusted")]
    WrongKey {
        address: String,
        theirs: String,
        pinned: String,
        pinned_id: String,
    },
}

impl UplinkError {
    /// What to do about it, for the status and doctor.
    pub fn fix(&self) -> &'static str {
        match self {
            UplinkError::Ca { .. } => "copy the coordinator's CA certificate (the ca.pem `warden coordinator init` wrote) to the path in coordinator.ca_cert, then restart the agent",
            UplinkError::Config(_) => "correct the key named above in the agent's config file",
            UplinkError::Connect(_) => "check coordinator.address (host and port), that the coordinator runs, and that this host reaches it (firewall); records stay in the spool meanwhile",
            UplinkError::Refused(_) | UplinkError::Registration(_) => "ask the coordinator's operator: the coordinator's own words above say why (enrollment: coordinator.join_token, or its allowlist)",
            UplinkError::Handshake(_) => "the agent and the coordinator may be of different versions; upgrade the older one",
            UplinkError::Stream(_) | UplinkError::Closed => "the agent reconnects by itself; if this repeats, read the coordinator's log",
            UplinkError::Spool(_) => "read the spool error above; check the disk under state_dir",
            UplinkError::WrongKey { .. } => "set coordinator.public_key to the key `warden coordinator key` prints on the coordinator's host, then restart the agent",
        }
    }
}

/// Everything the uplink task needs.
pub struct Uplink {
    pub link: CoordinatorLink,
    pub config: UplinkConfig,
    pub signer: Arc<Signer>,
    pub node_id: String,
    pub start_id: String,
    /// The latest inventory, sent at each Register.
    pub inventory: watch::Receiver<pb::InventorySummary>,
    /// The supplier's labels (`[node]`), sent at each Register.
    pub labels: pb::NodeLabels,
    pub outbox: Outbox,
    pub status: watch::Sender<UplinkStatus>,
    /// Where verified coordinator commands go (the workload task).
    pub commands: Option<tokio::sync::mpsc::Sender<pb::Command>>,
    /// Where verified challenges go (the time-lock task).
    pub challenges: Option<tokio::sync::mpsc::Sender<pb::Challenge>>,
    /// Where verified work challenges go (the work runner).
    pub work: Option<tokio::sync::mpsc::Sender<pb::WorkChallenge>>,
    /// Work answers, sent once on the live stream like `direct`.
    pub work_answers: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<pb::WorkAnswer>>,
    /// The mesh public key and endpoints announced at Register.
    pub mesh: (Vec<u8>, Vec<String>),
    /// The mesh as it runs, so Register says which cluster it is in.
    pub mesh_status: watch::Receiver<Option<crate::mesh::node::MeshStatus>>,
    /// Answers to send once on the live stream, never spooled (logs);
    /// dropped while no stream is up (the asker times out and asks again).
    pub direct: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<pb::LogChunk>>,
}

/// A TLS channel to the coordinator at `address` (one of the link's),
/// trusting only the configured CA.
pub async fn channel(
    link: &CoordinatorLink,
    address: &str,
    connect_timeout: Duration,
    keepalive: Duration,
) -> Result<tonic::transport::Channel, UplinkError> {
    let ca = std::fs::read(&link.ca_cert).map_err(|source| UplinkError::Ca {
        path: link.ca_cert.display().to_string(),
        source,
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(link.tls_name(address)?);
    Ok(Endpoint::from_shared(address.to_owned())?
        .tls_config(tls)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive)
        .keep_alive_while_idle(true)
        .connect()
        .await?)
}

/// The delay before reconnect attempt `attempt` (0-based): exponential
/// from `initial`, capped at `max`, then scaled into its upper half by
/// `jitter` in [0, 1) so many agents do not reconnect in lockstep.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = initial.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
    let capped = exp.min(max);
    capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

impl Uplink {
    /// Runs until `shutdown`, reconnecting as needed.
    pub async fn run(self, shutdown: CancellationToken) {
        let pinned = match self.link.pinned_key() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "uplink disabled");
                return;
            }
        };
        let addresses = self.link.address.list().to_vec();
        if addresses.is_empty() {
            tracing::error!("uplink disabled: coordinator.address lists no address");
            return;
        }
        let several = addresses.len() > 1;
        self.status.send_modify(|s| {
            s.addresses = addresses
                .iter()
                .map(|a| AddressStatus {
                    address: a.clone(),
                    last_error: None,
                })
                .collect();
        });
        let mut rotation = Rotation::new(addresses.len(), self.config.backoff_max);
        // The last failure at each address: each distinct one is logged once.
        let mut last_errors: Vec<Option<String>> = vec![None; addresses.len()];
        loop {
            let i = rotation.current();
            let address = addresses[i].as_str();
            self.status.send_modify(|s| s.address = address.to_owned());
            let mut up_since = None;
            let end = tokio::select! {
                r = self.session(address, &pinned, &shutdown, &mut up_since) => r,
                _ = shutdown.cancelled() => Ok(()),
            };
            self.status.send_modify(|s| s.connected = false);
            if shutdown.is_cancelled() {
                return;
            }
            if up_since.is_some() {
                last_errors[i] = None;
            }
            let next = rotation.ended(match up_since {
                Some(t) => Outcome::Dropped { lived: t.elapsed() },
                None => Outcome::Failed,
            });
            if let Err(e) = end {
                let msg = crate::error_chain(&e);
                let then = match next {
                    Next::After { .. }
                        if matches!(e, UplinkError::Stream(_) | UplinkError::Closed) =>
                    {
                        "reconnecting with backoff"
                    }
                    Next::After { .. } => "retrying with backoff",
                    Next::Now(_) => "trying the next coordinator address at once",
                };
                // Log each distinct state once; repeats of the same failure go to debug.
                if last_errors[i].as_deref() != Some(msg.as_str()) {
                    if matches!(e, UplinkError::Stream(_) | UplinkError::Closed) {
                        tracing::warn!(address, error = %msg, "disconnected from coordinator; {then}");
                    } else if matches!(e, UplinkError::Registration(_)) {
                        tracing::warn!(address, error = %msg, "registration refused; {then}");
                    } else if matches!(e, UplinkError::WrongKey { .. }) {
                        tracing::warn!(address, error = %msg, "coordinator not trusted; {then}");
                    } else {
                        tracing::warn!(address, error = %msg, "coordinator unreachable; {then}");
                    }
                } else {
                    tracing::debug!(address, error = %msg, "still unreachable");
                }
                let shown = if several && !matches!(e, UplinkError::WrongKey { .. }) {
                    format!("{address}: {msg}")
                } else {
                    msg.clone()
                };
                let problem = format!("{shown}. Fix: {}", e.fix());
                self.status.send_modify(|s| {
                    s.last_error = Some(shown);
                    s.problem = Some(problem);
                    if let Some(a) = s.addresses.get_mut(i) {
                        a.last_error = Some(msg.clone());
                    }
                });
                last_errors[i] = Some(msg);
            }
            if let Next::After { attempt, .. } = next {
                let delay = backoff(
                    attempt,
                    self.config.backoff_initial,
                    self.config.backoff_max,
                    rand::rng().random::<f64>(),
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }

    async fn connect(
        &self,
        address: &str,
    ) -> Result<UplinkClient<tonic::transport::Channel>, UplinkError> {
        let channel = channel(
            &self.link,
            address,
            self.config.connect_timeout,
            self.config.keepalive,
        )
        .await?;
        Ok(UplinkClient::new(channel)
            .max_decoding_message_size(1 << 20)
            .max_encoding_message_size(8 << 20))
    }

    /// One connection to `address`: returns when the stream ends.
    /// `up_since` is set when the stream has registered.
    async fn session(
        &self,
        address: &str,
        pinned: &VerifyingKey,
        shutdown: &CancellationToken,
        up_since: &mut Option<Instant>,
    ) -> Result<(), UplinkError> {
        let mut client = self.connect(address).await?;
        let window = self.config.max_in_flight;
        let (out, out_rx) = tokio::sync::mpsc::channel::<Envelope>(window + 16);
        let mut inbound = client
            .session(ReceiverStream::new(out_rx))
            .await
            .map_err(UplinkError::Refused)?
            .into_inner();
        self.register(address, pinned, &out, &mut inbound).await?;
        tracing::info!(address, "connected to coordinator");
        *up_since = Some(Instant::now());
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
            s.problem = None;
            s.connected_since_unix_ns = crate::now_ms();
            if let Some(a) = s.addresses.iter_mut().find(|a| a.address == address) {
                a.last_error = None;
            }
        });

        let mut stats = self.outbox.stats();
        let mut core = Session::new(
            self.node_id.clone(),
            pinned.clone(),
            window,
            std::time::Instant::now(),
            self.config.connect_timeout,
        );
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut direct = self.direct.lock().await;
        // Asked before this stream was up: their askers have given up.
        while direct.try_recv().is_ok() {}
        // An answer to another stream's challenge may still be in time.
        let mut work_answers = self.work_answers.lock().await;

        loop {
            let spool = *stats.borrow_and_update();
            if core.welcome_overdue(spool.anchored, std::time::Instant::now()) {
                tracing::warn!("the coordinator sent no Welcome with its last seq for this node (an older coordinator?); the spool, started empty, keeps its seqs: records the coordinator already holds under them will be refused and set aside");
                self.anchor(0).await?;
                continue;
            }
            if spool.anchored {
                self.fill(core.window(), spool.next_seq, &out).await?;
            }
            let watch_spool = core.wants_spool_change(spool.anchored, spool.next_seq);
            let wake = core.wake_at(spool.anchored).map(Instant::from_std);
            let retrying = core.retrying() as u64;
            self.status.send_if_modified(|s| {
                if s.retrying > 0 && retrying == 0 {
                    tracing::info!("every record refused for now has been sent again");
                }
                let changed = s.retrying != retrying;
                s.retrying = retrying;
                changed
            });

            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    // A heartbeat is not a record: if the pipe is full it is skipped.
                    let _ = out.try_send(self.signer.sign_message(types::HEARTBEAT, &pb::Heartbeat {
                        node_id: self.node_id.clone(),
                        time_unix_ms: crate::now_ms(),
                        spool: Some(spool.to_pb()),
                        last_receipt_seq: self.status.borrow().last_receipt_seq,
                    }));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(env)) => {
                        let inbound = core.handle(&env, std::time::Instant::now());
                        self.carry_out(inbound).await?;
                    }
                    Ok(None) => return Err(UplinkError::Closed),
                    Err(status) => return Err(UplinkError::Stream(status)),
                },
                // New records to send, or (unanchored) the anchor taking effect.
                r = stats.changed(), if watch_spool => {
                    if r.is_err() {
                        return Err(UplinkError::Spool("the outbox has stopped".into()));
                    }
                }
                // A retry falls due, or the wait for the Welcome ends.
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
                Some(chunk) = direct.recv() => {
                    // Like a heartbeat, not a record: skipped if the pipe is full.
                    let _ = out.try_send(self.signer.sign_message(types::LOGS, &chunk));
                }
                Some(answer) = work_answers.recv() => {
                    // Waits for room: a dropped answer fails the challenge.
                    if out.send(self.signer.sign_message(types::WORK_ANSWER, &answer)).await.is_err() {
                        return Err(UplinkError::Closed);
                    }
                }
            }
        }
    }

    /// Gives the outbox the coordinator's last seq for this node.
    async fn anchor(&self, last_stored: u64) -> Result<(), UplinkError> {
        self.outbox
            .anchor(last_stored)
            .await
            .map_err(UplinkError::Spool)?;
        self.status
            .send_modify(|s| s.coordinator_last_seq = Some(last_stored));
        Ok(())
    }

    /// Resends refused records whose wait is over, then fills the window
    /// from the spool.
    async fn fill(
        &self,
        window: &mut Window,
        next_seq: u64,
        out: &tokio::sync::mpsc::Sender<Envelope>,
    ) -> Result<(), UplinkError> {
        let now = std::time::Instant::now();
        let mut sent = 0;
        for seq in window.due(now) {
            let recs = self.outbox.read(seq, 1).await.map_err(UplinkError::Spool)?;
            match recs.into_iter().find(|p| p.seq == seq) {
                Some(p) => {
                    let digest = dsse::payload_sha256(&p.envelope);
                    if out.try_send(p.envelope).is_ok() {
                        window.sent(seq, digest);
                        sent += 1;
                    } else {
                        window.unsent(seq, now);
                    }
                }
                // Acknowledged after all, shed or found damaged meanwhile.
                None => window.forget(seq),
            }
        }
        let room = window.room();
        if room > 0 && window.cursor() < next_seq {
            let recs = self
                .outbox
                .read(window.cursor(), room)
                .await
                .map_err(UplinkError::Spool)?;
            if recs.is_empty() {
                window.caught_up_to(next_seq);
            }
            for p in recs {
                if !window.take_new(p.seq) {
                    continue;
                }
                let digest = dsse::payload_sha256(&p.envelope);
                if out.try_send(p.envelope).is_err() {
                    window.rewind(p.seq);
                    break;
                }
                window.sent(p.seq, digest);
                sent += 1;
            }
        }
        if sent > 0 {
            self.status.send_modify(|s| s.records_sent += sent);
        }
        Ok(())
    }

    /// Registers on a new stream: reads the coordinator's Hello, sends the
    /// Register carrying its nonce (and the join token, if configured), and
    /// waits for Registered.
    async fn register(
        &self,
        address: &str,
        pinned: &VerifyingKey,
        out: &tokio::sync::mpsc::Sender<Envelope>,
        inbound: &mut tonic::Streaming<Envelope>,
    ) -> Result<(), UplinkError> {
        let wait = self.config.connect_timeout;
        let hello = next_message(inbound, wait, "Hello (is it older than this agent?)").await?;
        if hello.payload_type != types::HELLO {
            return Err(UplinkError::Handshake(format!(
                "the coordinator spoke first with {}, not a Hello",
                hello.payload_type
            )));
        }
        // A coordinator whose Hello the pinned key does not verify would
        // have every receipt and command ignored: records would pile up
        // unreceipted while the link looked fine. Refused here, said plainly.
        let nonce = match dsse::open::<pb::Hello>(&hello, types::HELLO, pinned) {
            Ok(h) => h.nonce,
            Err(_) => {
                return Err(UplinkError::WrongKey {
                    address: address.to_owned(),
                    theirs: hello
                        .signatures
                        .first()
                        .map(|s| s.keyid.clone())
                        .filter(|k| !k.is_empty())
                        .unwrap_or_else(|| "(none)".into()),
                    pinned: self.link.public_key.clone(),
                    pinned_id: pinned.key_id().to_owned(),
                })
            }
        };
        let register = self.signer.sign_message(
            types::REGISTER,
            &pb::Register {
                node_id: self.node_id.clone(),
                public_key: self.signer.public_key().to_vec(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                inventory: Some(self.inventory.borrow().clone()),
                time_unix_ms: crate::now_ms(),
                start_id: self.start_id.clone(),
                mesh_public_key: self.mesh.0.clone(),
                mesh_endpoints: self.mesh.1.clone(),
                mesh_cluster_id: self
                    .mesh_status
                    .borrow()
                    .as_ref()
                    .map(|m| m.cluster_id.clone())
                    .unwrap_or_default(),
                session_nonce: nonce,
                join_token: self.link.join_token.clone().unwrap_or_default(),
                labels: Some(self.labels.clone()),
            },
        );
        out.try_send(register).map_err(|_| UplinkError::Closed)?;
        let answer = next_message(inbound, wait, "answer to the Register").await?;
        if answer.payload_type != types::REGISTERED {
            return Err(UplinkError::Handshake(format!(
                "the coordinator answered the Register with {}, not Registered",
                answer.payload_type
            )));
        }
        Ok(())
    }

    /// Records receipted: they leave the spool.
    fn acked(&self, seqs: &[u64]) {
        let Some(&last) = seqs.iter().max() else {
            return;
        };
        for &seq in seqs {
            self.outbox.ack(seq);
        }
        self.status.send_modify(|s| {
            s.receipts += seqs.len() as u64;
            s.last_receipt_seq = s.last_receipt_seq.max(last);
            s.last_receipt_unix_ms = crate::now_ms();
        });
    }

    /// Does what one coordinator message asks (the session core decided
    /// it): anchors the spool, acks or sets aside a record, passes a
    /// challenge or command on, and keeps the status and the log.
    async fn carry_out(&self, inbound: Inbound) -> Result<(), UplinkError> {
        match inbound {
            Inbound::Anchor(last) => self.anchor(last).await?,
            Inbound::Ack(seq) => self.acked(&[seq]),
            Inbound::Acks { seqs, wrong } => {
                self.acked(&seqs);
                for seq in wrong {
                    log_ignored(&Ignored::WrongDigest { seq });
                }
            }
            Inbound::SetAside { seq, why } => {
                // The outbox logs the set-aside itself.
                self.outbox.set_aside(seq, why.clone());
                self.status.send_modify(|s| {
                    s.refusals_final += 1;
                    s.refusals += 1;
                    s.last_refusal = Some(format!("seq {seq}: {why}"));
                });
            }
            Inbound::Retry {
                seq,
                why,
                retry_in,
                first,
            } => {
                // Said when records start waiting (and when none waits any more,
                // in the session loop); each one goes to debug.
                if first {
                    tracing::warn!(
                        seq, reason = %why, retry_in_s = retry_in.as_secs(),
                        "coordinator refused a record for now; it stays spooled and is sent again (later ones are logged at debug)"
                    );
                } else {
                    tracing::debug!(seq, reason = %why, "coordinator refused a record for now");
                }
                self.status.send_modify(|s| {
                    s.refusals += 1;
                    s.last_refusal = Some(format!("seq {seq}: {why}"));
                });
            }
            Inbound::Challenge(ch) => {
                if let Some(tx) = &self.challenges {
                    let _ = tx.try_send(ch);
                }
            }
            Inbound::WorkChallenge(ch) => match &self.work {
                Some(tx) if tx.try_send(*ch).is_ok() => {}
                _ => tracing::warn!("ignored a work challenge: the work runner is busy or stopped"),
            },
            Inbound::Command(cmd) => match &self.commands {
                Some(tx) => {
                    if tx.try_send(*cmd).is_err() {
                        tracing::warn!("ignored a command: the workload task is busy or stopped");
                    }
                }
                None => {
                    tracing::warn!(command = %cmd.command_id, "ignored a command: workloads are not run here")
                }
            },
            Inbound::Ignored(why) => log_ignored(&why),
        }
        Ok(())
    }
}

/// Says why a coordinator message was ignored.
fn log_ignored(why: &Ignored) {
    match why {
        Ignored::Unverified { what, error } => tracing::warn!(
            error = %error,
            "ignored a {what} that does not verify against the pinned coordinator key"
        ),
        Ignored::OtherNode { what, node } => {
            tracing::warn!(node = %node, "ignored a {what} for another node")
        }
        Ignored::WrongDigest { seq } => tracing::warn!(
            seq,
            "ignored a receipt whose digest differs from the record sent"
        ),
        Ignored::NotInFlight { seq } => {
            tracing::debug!(seq, "receipt for a record not in flight")
        }
        Ignored::RefusalNotInFlight { seq, why } => {
            tracing::debug!(seq, reason = %why, "refusal for a record not in flight")
        }
        Ignored::Unexpected { payload_type } => {
            tracing::warn!(payload_type = %payload_type, "ignored an unexpected coordinator message")
        }
    }
}

/// The next message of a stream being registered; a refusal status there
/// (unauthenticated, permission denied, too many) is the coordinator
/// refusing the registration.
async fn next_message(
    inbound: &mut tonic::Streaming<Envelope>,
    wait: Duration,
    what: &str,
) -> Result<Envelope, UplinkError> {
    match tokio::time::timeout(wait, inbound.message()).await {
        Err(_) => Err(UplinkError::Handshake(format!(
            "no {what} from the coordinator within {}",
            humantime::format_duration(wait)
        ))),
        Ok(Err(status)) => Err(match status.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::ResourceExhausted => UplinkError::Registration(status),
            _ => UplinkError::Stream(status),
        }),
        Ok(Ok(None)) => Err(UplinkError::Closed),
        Ok(Ok(Some(env))) => Ok(env),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_upper_half() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(10);
        assert_eq!(backoff(0, i, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(0, i, m, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(3, i, m, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(20, i, m, 1.0), m);
        assert_eq!(backoff(u32::MAX, i, m, 0.0), m / 2);
        for a in 0..40 {
            let d = backoff(a, i, m, 0.3);
            assert!(d <= m && d >= Duration::from_millis(50), "{a}: {d:?}");
        }
    }
}
