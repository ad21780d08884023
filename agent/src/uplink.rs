//! The task that owns the connection to the coordinator: one bidirectional
//! gRPC stream over TLS, reopened with jittered exponential backoff.
//!
//! On each connection it registers (the coordinator's Hello gives the nonce
//! that binds the Register to this stream; Registered accepts it), then
//! sends every pending record from
//! the spool in seq order (at most `max_in_flight` unacknowledged) and
//! heartbeats. A record leaves the spool only on a receipt that verifies
//! against the pinned coordinator key, for this node, with the digest of
//! what was sent. Anything else from the coordinator is logged and ignored.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

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
    outbox::Outbox,
};

/// An error and its sources, so "transport error" says what failed underneath.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let next = s.to_string();
        if !msg.contains(&next) {
            msg.push_str(": ");
            msg.push_str(&next);
        }
        src = s.source();
    }
    msg
}

/// Wait before resending a record the coordinator refused.
const REFUSAL_RETRY: Duration = Duration::from_secs(5);

/// What `warden status` shows of the connection.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UplinkStatus {
    pub address: String,
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_receipt_seq: u64,
    pub records_sent: u64,
    pub receipts: u64,
    pub refusals: u64,
    pub last_refusal: Option<String>,
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
    pub outbox: Outbox,
    pub status: watch::Sender<UplinkStatus>,
    /// Where verified coordinator commands go (the workload task).
    pub commands: Option<tokio::sync::mpsc::Sender<pb::Command>>,
    /// Where verified challenges go (the time-lock task).
    pub challenges: Option<tokio::sync::mpsc::Sender<pb::Challenge>>,
    /// The mesh public key and endpoints announced at Register.
    pub mesh: (Vec<u8>, Vec<String>),
    /// The mesh as it runs, so Register says which cluster it is in.
    pub mesh_status: watch::Receiver<Option<crate::mesh::node::MeshStatus>>,
}

/// A TLS channel to the coordinator, trusting only the configured CA.
pub async fn channel(
    link: &CoordinatorLink,
    connect_timeout: Duration,
    keepalive: Duration,
) -> Result<tonic::transport::Channel, UplinkError> {
    let ca = std::fs::read(&link.ca_cert).map_err(|source| UplinkError::Ca {
        path: link.ca_cert.display().to_string(),
        source,
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(link.tls_name()?);
    Ok(Endpoint::from_shared(link.address.clone())?
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
        self.status
            .send_modify(|s| s.address = self.link.address.clone());
        let mut attempt = 0u32;
        let mut last_error: Option<String> = None;
        loop {
            let started = Instant::now();
            let end = tokio::select! {
                r = self.session(&pinned, &shutdown, &mut last_error) => r,
                _ = shutdown.cancelled() => Ok(()),
            };
            self.status.send_modify(|s| s.connected = false);
            if shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = end {
                let msg = error_chain(&e);
                // Log each distinct state once; repeats of the same failure go to debug.
                if last_error.as_deref() != Some(msg.as_str()) {
                    if matches!(e, UplinkError::Stream(_) | UplinkError::Closed) {
                        tracing::warn!(address = %self.link.address, error = %msg, "disconnected from coordinator; reconnecting with backoff");
                    } else if matches!(e, UplinkError::Registration(_)) {
                        tracing::warn!(address = %self.link.address, error = %msg, "registration refused; retrying with backoff");
                    } else {
                        tracing::warn!(address = %self.link.address, error = %msg, "coordinator unreachable; retrying with backoff");
                    }
                } else {
                    tracing::debug!(error = %msg, "still unreachable");
                }
                self.status
                    .send_modify(|s| s.last_error = Some(msg.clone()));
                last_error = Some(msg);
            }
            // A connection that lived a while earns a fresh backoff.
            if started.elapsed() > self.config.backoff_max {
                attempt = 0;
            }
            let delay = backoff(
                attempt,
                self.config.backoff_initial,
                self.config.backoff_max,
                rand::rng().random::<f64>(),
            );
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn connect(&self) -> Result<UplinkClient<tonic::transport::Channel>, UplinkError> {
        let channel = channel(
            &self.link,
            self.config.connect_timeout,
            self.config.keepalive,
        )
        .await?;
        Ok(UplinkClient::new(channel)
            .max_decoding_message_size(1 << 20)
            .max_encoding_message_size(8 << 20))
    }

    /// One connection: returns when the stream ends.
    async fn session(
        &self,
        pinned: &VerifyingKey,
        shutdown: &CancellationToken,
        last_error: &mut Option<String>,
    ) -> Result<(), UplinkError> {
        let mut client = self.connect().await?;
        let window = self.config.max_in_flight;
        let (out, out_rx) = tokio::sync::mpsc::channel::<Envelope>(window + 16);
        let mut inbound = client
            .session(ReceiverStream::new(out_rx))
            .await
            .map_err(UplinkError::Refused)?
            .into_inner();
        self.register(pinned, &out, &mut inbound).await?;
        tracing::info!(address = %self.link.address, "connected to coordinator");
        last_error.take();
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
        });

        let mut stats = self.outbox.stats();
        // seq -> SHA-256 of the payload sent: a receipt must match it.
        let mut in_flight: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
        let mut retry: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut cursor = 0u64; // every pending record is (re)sent on a new stream
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let next_seq = stats.borrow_and_update().next_seq;
            // Resend refused records whose wait is over.
            let now = Instant::now();
            let due: BTreeSet<u64> = retry
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(s, _)| *s)
                .collect();
            for seq in due {
                retry.remove(&seq);
                let recs = self.outbox.read(seq, 1).await.map_err(UplinkError::Spool)?;
                if let Some(p) = recs.into_iter().find(|p| p.seq == seq) {
                    in_flight.insert(seq, dsse::payload_sha256(&p.envelope));
                    if out.try_send(p.envelope).is_err() {
                        in_flight.remove(&seq);
                        retry.insert(seq, now + REFUSAL_RETRY);
                    }
                }
            }
            // Fill the window from the spool.
            let room = window.saturating_sub(in_flight.len() + retry.len());
            if room > 0 && cursor < next_seq {
                let recs = self
                    .outbox
                    .read(cursor, room)
                    .await
                    .map_err(UplinkError::Spool)?;
                let mut sent = 0;
                for p in &recs {
                    if in_flight.contains_key(&p.seq) || retry.contains_key(&p.seq) {
                        cursor = p.seq + 1;
                        continue;
                    }
                    if out.try_send(p.envelope.clone()).is_err() {
                        break;
                    }
                    in_flight.insert(p.seq, dsse::payload_sha256(&p.envelope));
                    cursor = p.seq + 1;
                    sent += 1;
                }
                if recs.is_empty() {
                    cursor = next_seq;
                }
                self.status.send_modify(|s| s.records_sent += sent);
            }
            let caught_up = cursor >= next_seq;
            let next_retry = retry.values().min().copied();

            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    let spool = *stats.borrow();
                    // A heartbeat is not a record: if the pipe is full it is skipped.
                    let _ = out.try_send(self.signer.sign_message(types::HEARTBEAT, &pb::Heartbeat {
                        node_id: self.node_id.clone(),
                        time_unix_ms: crate::now_ms(),
                        spool: Some(crate::spool_state(&spool)),
                        last_receipt_seq: self.status.borrow().last_receipt_seq,
                    }));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(env)) => self.handle(pinned, &env, &mut in_flight, &mut retry),
                    Ok(None) => return Err(UplinkError::Closed),
                    Err(status) => return Err(UplinkError::Stream(status)),
                },
                r = stats.changed(), if caught_up => {
                    if r.is_err() {
                        return Err(UplinkError::Spool("the outbox has stopped".into()));
                    }
                }
                _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {}
            }
        }
    }

    /// Registers on a new stream: reads the coordinator's Hello, sends the
    /// Register carrying its nonce (and the join token, if configured), and
    /// waits for Registered.
    async fn register(
        &self,
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
        let nonce = match dsse::open::<pb::Hello>(&hello, types::HELLO, pinned) {
            Ok(h) => h.nonce,
            Err(e) => {
                // The nonce only binds the Register to this stream; the pinned
                // key still guards every receipt and command, which is said here early.
                tracing::warn!(error = %e, "the coordinator's Hello does not verify against the pinned coordinator key (coordinator.public_key): its receipts and commands will be ignored");
                <pb::Hello as prost::Message>::decode(hello.payload.as_slice())
                    .map_err(|e| UplinkError::Handshake(format!("Hello does not decode: {e}")))?
                    .nonce
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

    /// Applies one coordinator message, after checking its signature.
    fn handle(
        &self,
        pinned: &VerifyingKey,
        env: &Envelope,
        in_flight: &mut BTreeMap<u64, [u8; 32]>,
        retry: &mut BTreeMap<u64, Instant>,
    ) {
        match env.payload_type.as_str() {
            types::RECEIPT => {
                let receipt = match dsse::open::<pb::Receipt>(env, types::RECEIPT, pinned) {
                    Ok(r) => r,
                    Err(e) => {
                        return tracing::warn!(error = %e, "ignored a receipt that does not verify against the pinned coordinator key")
                    }
                };
                if receipt.node_id != self.node_id {
                    return tracing::warn!(node = %receipt.node_id, "ignored a receipt for another node");
                }
                match in_flight.get(&receipt.seq) {
                    Some(d) if d.as_slice() == receipt.payload_sha256.as_slice() => {
                        in_flight.remove(&receipt.seq);
                        self.outbox.ack(receipt.seq);
                        self.status.send_modify(|s| {
                            s.receipts += 1;
                            s.last_receipt_seq = s.last_receipt_seq.max(receipt.seq);
                        });
                    }
                    Some(_) => tracing::warn!(
                        seq = receipt.seq,
                        "ignored a receipt whose digest differs from the record sent"
                    ),
                    None => {
                        tracing::debug!(seq = receipt.seq, "receipt for a record not in flight")
                    }
                }
            }
            types::REFUSAL => {
                let refusal = match dsse::open::<pb::Refusal>(env, types::REFUSAL, pinned) {
                    Ok(r) => r,
                    Err(e) => {
                        return tracing::warn!(error = %e, "ignored a refusal that does not verify against the pinned coordinator key")
                    }
                };
                tracing::warn!(seq = refusal.seq, reason = %refusal.reason, "coordinator refused a record; it stays spooled and is sent again");
                if in_flight.remove(&refusal.seq).is_some() {
                    retry.insert(refusal.seq, Instant::now() + REFUSAL_RETRY);
                }
                self.status.send_modify(|s| {
                    s.refusals += 1;
                    s.last_refusal = Some(format!("seq {}: {}", refusal.seq, refusal.reason));
                });
            }
            types::CHALLENGE => {
                let ch = match dsse::open::<pb::Challenge>(env, types::CHALLENGE, pinned) {
                    Ok(c) => c,
                    Err(e) => {
                        return tracing::warn!(error = %e, "ignored a challenge that does not verify against the pinned coordinator key")
                    }
                };
                if ch.node_id != self.node_id {
                    return tracing::warn!(node = %ch.node_id, "ignored a challenge for another node");
                }
                if let Some(tx) = &self.challenges {
                    let _ = tx.try_send(ch);
                }
            }
            types::COMMAND => {
                let cmd = match dsse::open::<pb::Command>(env, types::COMMAND, pinned) {
                    Ok(c) => c,
                    Err(e) => {
                        return tracing::warn!(error = %e, "ignored a command that does not verify against the pinned coordinator key")
                    }
                };
                match &self.commands {
                    Some(tx) => {
                        if tx.try_send(cmd).is_err() {
                            tracing::warn!(
                                "ignored a command: the workload task is busy or stopped"
                            );
                        }
                    }
                    None => {
                        tracing::warn!(command = %cmd.command_id, "ignored a command: workloads are not run here")
                    }
                }
            }
            other => {
                tracing::warn!(payload_type = %other, "ignored an unexpected coordinator message")
            }
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
