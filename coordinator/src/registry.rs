//! The nodes connected now, and the one way to send one a command.
//!
//! Each agent session attaches its stream here; the admin API, the mesh
//! sender and the challenger reach a node through it. A command is built
//! here (a fresh id, an expiry of [`COMMAND_TTL`]), recorded by the caller
//! while still unsent, then signed and sent here, and its answer (stored by
//! the node's session first) is handed to whoever waits for it.
//!
//! With replicas on one PostgreSQL, a node's stream may be on another
//! replica (`crate::replicas` keeps the map): a command for it is relayed
//! there through the database, and its answer relayed back to the replica
//! that waits for it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use warden_proto::{
    dsse::Signer,
    pb::{self, Envelope},
    types,
};

use crate::{
    clock::now_ms,
    ids,
    store::{presence::RelayKind, Store},
};

/// How long a command stays valid after it is sent.
pub const COMMAND_TTL: Duration = Duration::from_secs(60);

/// The outbound half of an agent's stream.
pub type Outbound = mpsc::Sender<Result<Envelope, Status>>;

/// The live streams, by node; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Streams>>,
    next: Arc<AtomicU64>,
    /// Signs the commands sent through here.
    signer: Arc<Signer>,
    /// This replica and its database, when there are replicas.
    relay: Option<Arc<Relay>>,
}

/// What relaying between replicas needs: the shared database and who we are.
struct Relay {
    store: Store,
    me: String,
}

#[derive(Default)]
struct Streams {
    /// node id -> (session number, its outbound half).
    nodes: HashMap<String, (u64, Outbound)>,
    /// command id -> the node it was sent to, and whoever waits for its
    /// answer (only that node's answer is handed on).
    waiting: HashMap<String, (String, oneshot::Sender<pb::CommandResult>)>,
    /// node id -> the other replica that holds its stream.
    remote: HashMap<String, String>,
    /// command id -> (the node it went to, the replica that relayed it
    /// here and waits for its answer, until when).
    relayed: HashMap<String, (String, String, i64)>,
}

/// A command for a connected node, built but not yet sent: the caller
/// records its id first, so the node's answer always finds what it answers.
pub struct Outgoing {
    pub command: pb::Command,
    tx: Outbound,
}

/// A command sent, and where its answer will arrive.
pub struct Pending {
    pub node_id: String,
    pub command_id: String,
    pub answer: oneshot::Receiver<pb::CommandResult>,
}

/// The node's stream closed before the command could be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node's stream closed before the command was sent")]
pub struct StreamClosed;

impl Registry {
    pub fn new(signer: Arc<Signer>) -> Self {
        Self {
            inner: Arc::default(),
            next: Arc::default(),
            signer,
            relay: None,
        }
    }

    /// This registry as replica `me` of the replicas sharing `store`: the
    /// streams it holds are noted there, and nodes on other replicas are
    /// reached through it.
    pub fn with_relay(mut self, store: Store, me: String) -> Self {
        self.relay = Some(Arc::new(Relay { store, me }));
        self
    }

    /// Makes `tx` the node's stream, after queueing `first` on it. Both under
    /// the registry's lock: no command can be queued ahead of `first`, and
    /// anyone who learns of the node from `first` (the agent says it is
    /// connected once Registered arrives) finds it attached. `None` if the
    /// stream is gone or full.
    pub(crate) fn attach(&self, node_id: &str, tx: Outbound, first: Vec<Envelope>) -> Option<u64> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut map = self.lock();
        for env in first {
            tx.try_send(Ok(env)).ok()?;
        }
        map.nodes.insert(node_id.to_owned(), (id, tx));
        map.remote.remove(node_id);
        drop(map);
        if let Some(r) = &self.relay {
            r.store.stream_opened(node_id, &r.me, id);
        }
        Some(id)
    }

    /// Detaches only if no newer session of the node replaced this one.
    pub(crate) fn detach(&self, node_id: &str, session: u64) {
        let mut map = self.lock();
        if map.nodes.get(node_id).map(|(s, _)| *s) == Some(session) {
            map.nodes.remove(node_id);
        }
        drop(map);
        if let Some(r) = &self.relay {
            r.store.stream_closed(node_id, &r.me, session);
        }
    }

    /// Whether the node's stream is here or on another live replica.
    pub fn is_connected(&self, node_id: &str) -> bool {
        let map = self.lock();
        map.nodes.contains_key(node_id) || map.remote.contains_key(node_id)
    }

    /// The outbound half of the node's stream held here (for what only
    /// the replica holding the stream sends, such as a challenge).
    pub fn local_sender(&self, node_id: &str) -> Option<Outbound> {
        self.lock().nodes.get(node_id).map(|(_, tx)| tx.clone())
    }

    /// The outbound half of the node's stream: here, or a relay to the
    /// replica that holds it.
    pub fn sender(&self, node_id: &str) -> Option<Outbound> {
        let to = {
            let map = self.lock();
            if let Some((_, tx)) = map.nodes.get(node_id) {
                return Some(tx.clone());
            }
            map.remote.get(node_id)?.clone()
        };
        let relay = self.relay.clone()?;
        let (tx, mut rx) = mpsc::channel::<Result<Envelope, Status>>(8);
        let node = node_id.to_owned();
        tokio::spawn(async move {
            // A Status ends a stream held here; there is none to relay.
            while let Some(Ok(env)) = rx.recv().await {
                use prost::Message as _;
                if let Err(e) = relay
                    .store
                    .relay(
                        &to,
                        &relay.me,
                        &node,
                        RelayKind::Envelope,
                        env.encode_to_vec(),
                    )
                    .await
                {
                    tracing::warn!(%node, replica = %to, error = %e, "cannot relay to the replica holding the node's stream");
                }
            }
        });
        Some(tx)
    }

    /// Which nodes' streams other live replicas hold now.
    pub(crate) fn set_remote(&self, remote: HashMap<String, String>) {
        let mut map = self.lock();
        map.remote = remote;
        let now = now_ms();
        map.relayed.retain(|_, (_, _, until)| *until > now);
    }

    /// Hands an envelope another replica relayed to the node's stream
    /// here; a command's answer will be relayed back to `from`.
    pub(crate) fn deliver(&self, node_id: &str, env: Envelope, from: &str) {
        use prost::Message as _;
        // Only what a replica signed with the coordinator's key goes on:
        // a row written into the database by anyone else reaches no node.
        let key = self.signer.verifying_key();
        if let Err(e) = warden_proto::dsse::verify(&env, &env.payload_type, &key) {
            tracing::warn!(node = %node_id, %from, error = %e, "relayed envelope not signed by this coordinator's key: dropped");
            return;
        }
        let mut map = self.lock();
        let Some((_, tx)) = map.nodes.get(node_id) else {
            tracing::debug!(node = %node_id, %from, "relayed envelope for a stream no longer here");
            return;
        };
        let tx = tx.clone();
        if env.payload_type == types::COMMAND {
            if let Ok(c) = pb::Command::decode(env.payload.as_slice()) {
                let until = now_ms() + COMMAND_TTL.as_millis() as i64;
                map.relayed
                    .insert(c.command_id, (node_id.to_owned(), from.to_owned(), until));
            }
        }
        drop(map);
        if tx.try_send(Ok(env)).is_err() {
            tracing::warn!(node = %node_id, "relayed envelope dropped: the node's stream is full or closed");
        }
    }

    /// A command for `node_id` carrying `body`, its id starting with
    /// `prefix`, valid for [`COMMAND_TTL`] from now; `None` if the node is
    /// not connected.
    pub fn command(
        &self,
        node_id: &str,
        prefix: &str,
        body: pb::command::Body,
    ) -> Option<Outgoing> {
        let tx = self.sender(node_id)?;
        let now = now_ms();
        Some(Outgoing {
            command: pb::Command {
                node_id: node_id.to_owned(),
                command_id: ids::fresh(prefix),
                issued_unix_ms: now,
                expires_unix_ms: now + COMMAND_TTL.as_millis() as i64,
                body: Some(body),
            },
            tx,
        })
    }

    /// Signs and sends a command; its answer arrives on the returned
    /// `Pending` (interest is registered before it goes, so no answer is missed).
    pub async fn send(&self, out: Outgoing) -> Result<Pending, StreamClosed> {
        let command_id = out.command.command_id.clone();
        let answer = self.wait_for(&out.command.node_id, &command_id);
        let env = self.signer.sign_message(types::COMMAND, &out.command);
        if out.tx.send(Ok(env)).await.is_err() {
            self.forget(&command_id);
            return Err(StreamClosed);
        }
        Ok(Pending {
            node_id: out.command.node_id,
            command_id,
            answer,
        })
    }

    /// Registers interest in a command's answer (before sending it).
    fn wait_for(&self, node_id: &str, command_id: &str) -> oneshot::Receiver<pb::CommandResult> {
        let (tx, rx) = oneshot::channel();
        self.lock()
            .waiting
            .insert(command_id.to_owned(), (node_id.to_owned(), tx));
        rx
    }

    /// Stops waiting (timed out, or nobody waits).
    pub fn forget(&self, command_id: &str) {
        self.lock().waiting.remove(command_id);
    }

    /// Hands `node_id`'s answer to whoever waits for it, if the command
    /// was sent to that node: another node cannot answer for it.
    /// A command relayed here from another replica has its answer relayed
    /// back there.
    pub(crate) fn resolve(&self, node_id: &str, result: &pb::CommandResult) {
        if self.resolve_here(node_id, result) {
            return;
        }
        let back = {
            let mut map = self.lock();
            match map.relayed.get(&result.command_id) {
                Some((to, _, _)) if to == node_id => map.relayed.remove(&result.command_id),
                _ => None,
            }
        };
        if let (Some((_, from, _)), Some(relay)) = (back, self.relay.clone()) {
            use prost::Message as _;
            let (node, body) = (node_id.to_owned(), result.encode_to_vec());
            tokio::spawn(async move {
                if let Err(e) = relay
                    .store
                    .relay(&from, &relay.me, &node, RelayKind::Result, body)
                    .await
                {
                    tracing::warn!(%node, replica = %from, error = %e, "cannot relay a command's answer back");
                }
            });
        }
    }

    /// Hands the answer to whoever waits here; whether anyone did.
    pub(crate) fn resolve_here(&self, node_id: &str, result: &pb::CommandResult) -> bool {
        let mut streams = self.lock();
        if streams
            .waiting
            .get(&result.command_id)
            .is_some_and(|(to, _)| to == node_id)
        {
            if let Some((_, tx)) = streams.waiting.remove(&result.command_id) {
                let _ = tx.send(result.clone());
                return true;
            }
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_node_a_command_went_to_can_answer_it() {
        let r = Registry::new(Arc::new(Signer::from_seed(&[3; 32])));
        let (tx, mut _rx) = mpsc::channel(4);
        r.attach("n1", tx, vec![]).unwrap();
        let out = r
            .command(
                "n1",
                "g",
                pb::command::Body::ContainerLogs(Default::default()),
            )
            .unwrap();
        let mut pending = r.send(out).await.unwrap();
        let answer = pb::CommandResult {
            command_id: pending.command_id.clone(),
            ok: true,
            ..Default::default()
        };
        // Another node naming the command id is not heard.
        r.resolve("n2", &answer);
        assert!(pending.answer.try_recv().is_err());
        r.resolve("n1", &answer);
        assert!(pending.answer.try_recv().unwrap().ok);
    }

    #[tokio::test]
    async fn a_relayed_envelope_reaches_the_node_only_if_the_coordinator_signed_it() {
        let signer = Arc::new(Signer::from_seed(&[3; 32]));
        let r = Registry::new(signer.clone());
        let (tx, mut rx) = mpsc::channel(4);
        r.attach("n1", tx, vec![]).unwrap();
        let command = pb::Command {
            node_id: "n1".into(),
            command_id: "c-1".into(),
            ..Default::default()
        };
        let forged = Signer::from_seed(&[4; 32]).sign_message(types::COMMAND, &command);
        r.deliver("n1", forged, "r-x");
        assert!(rx.try_recv().is_err(), "a forged envelope went on");
        r.deliver("n1", signer.sign_message(types::COMMAND, &command), "r-x");
        assert_eq!(rx.try_recv().unwrap().unwrap().payload_type, types::COMMAND);
    }
}
