//! The nodes connected now, and the one way to send one a command.
//!
//! Each agent session attaches its stream here; the admin API, the mesh
//! sender and the challenger reach a node through it. A command is built
//! here (a fresh id, an expiry of [`COMMAND_TTL`]), recorded by the caller
//! while still unsent, then signed and sent here, and its answer (stored by
//! the node's session first) is handed to whoever waits for it.

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

use crate::{clock::now_ms, ids};

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
}

#[derive(Default)]
struct Streams {
    /// node id -> (session number, its outbound half).
    nodes: HashMap<String, (u64, Outbound)>,
    /// command id -> the node it was sent to, and whoever waits for its
    /// answer (only that node's answer is handed on).
    waiting: HashMap<String, (String, oneshot::Sender<pb::CommandResult>)>,
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
        }
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
        Some(id)
    }

    /// Detaches only if no newer session of the node replaced this one.
    pub(crate) fn detach(&self, node_id: &str, session: u64) {
        let mut map = self.lock();
        if map.nodes.get(node_id).map(|(s, _)| *s) == Some(session) {
            map.nodes.remove(node_id);
        }
    }

    pub fn is_connected(&self, node_id: &str) -> bool {
        self.lock().nodes.contains_key(node_id)
    }

    /// The outbound half of a node's live stream (for what is not a
    /// command, such as a challenge).
    pub fn sender(&self, node_id: &str) -> Option<Outbound> {
        self.lock().nodes.get(node_id).map(|(_, tx)| tx.clone())
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
    pub(crate) fn resolve(&self, node_id: &str, result: &pb::CommandResult) {
        let mut streams = self.lock();
        if streams
            .waiting
            .get(&result.command_id)
            .is_some_and(|(to, _)| to == node_id)
        {
            if let Some((_, tx)) = streams.waiting.remove(&result.command_id) {
                let _ = tx.send(result.clone());
            }
        }
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
}
