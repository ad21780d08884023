//! Sends cluster members their `MeshConfig` down their streams: when an
//! operator changes a cluster, and when a member (re)connects, so a node
//! that was offline, restarted or moved catches up, and its peers learn
//! its new key or endpoint.

use std::{collections::HashMap, time::Duration};

use warden_proto::pb;

use crate::{
    clock::now_ms,
    cluster::{self, MeshIdentity},
    registry::{Pending, Registry},
    store::{ClusterWrite, MeshSent, Store, StoreError},
};

/// What the mesh sender needs; cheap to clone.
#[derive(Clone)]
pub struct MeshSender {
    pub store: Store,
    pub registry: Registry,
}

impl MeshSender {
    /// Every node's announced mesh key and endpoints.
    pub async fn identities(&self) -> Result<HashMap<String, MeshIdentity>, StoreError> {
        self.store.mesh_identities().await
    }

    /// Writes the cluster (`write`), then sends `cluster`'s config to each
    /// connected member (only to `only`, when given) and the leave config to
    /// each connected node of `left`. Members not connected get theirs when
    /// they connect. `who`: the nodes' mesh identities.
    pub async fn send(
        &self,
        cluster_id: &str,
        write: ClusterWrite,
        cluster: Option<&pb::ClusterInfo>,
        only: Option<&str>,
        left: &[String],
        who: &HashMap<String, MeshIdentity>,
    ) -> Result<Vec<Pending>, StoreError> {
        let generation = cluster.map(|c| c.generation).unwrap_or(0);
        let mut out = Vec::new();
        if let Some(c) = cluster {
            for m in c
                .members
                .iter()
                .filter(|m| only.is_none_or(|n| n == m.node_id))
            {
                if let Some(cfg) = cluster::mesh_config(c, &m.node_id, who) {
                    out.push((m.node_id.clone(), cfg));
                }
            }
        }
        let leave_gen = generation.max(now_ms().max(0) as u64);
        for n in left {
            out.push((n.clone(), cluster::leave_config(leave_gen)));
        }
        let mut sent = Vec::new();
        let mut commands = Vec::new();
        for (node, cfg) in out {
            let generation = cfg.generation;
            let body = pb::command::Body::MeshConfig(cfg);
            let Some(cmd) = self.registry.command(&node, "m", body) else {
                continue;
            };
            sent.push(MeshSent {
                command_id: cmd.command.command_id.clone(),
                node_id: node,
                cluster_id: cluster_id.to_owned(),
                generation,
            });
            commands.push(cmd);
        }
        // Stored before sending, so an answer always finds its command.
        self.store.put_cluster(cluster_id, write, sent).await?;
        let mut answers = Vec::new();
        for cmd in commands {
            if let Ok(pending) = self.registry.send(cmd).await {
                answers.push(pending);
            }
        }
        Ok(answers)
    }

    /// A node (re)connected: if it is in a cluster, it is sent the cluster's
    /// config, and so is every other member when the node's mesh key or
    /// endpoints changed (`changed`; applying an unchanged config changes
    /// nothing on a node). If it is in none but says it runs a mesh
    /// (`running`: the cluster its Register names), it missed its removal
    /// while offline and is told to leave.
    pub async fn connected(&self, node_id: &str, running: &str, changed: bool) {
        let clusters = match self.store.list_clusters().await {
            Ok(c) => c,
            Err(e) => return tracing::warn!(error = %e, "cannot read clusters"),
        };
        let member_of = clusters
            .into_iter()
            .find(|c| cluster::is_live(c) && c.members.iter().any(|m| m.node_id == node_id));
        let who = match &member_of {
            Some(_) => match self.identities().await {
                Ok(w) => w,
                Err(e) => return tracing::warn!(error = %e, "cannot read mesh identities"),
            },
            None => HashMap::new(),
        };
        let leaving = [node_id.to_owned()];
        let only = (!changed).then_some(node_id);
        let sent = match &member_of {
            Some(c) => self.send(&c.cluster_id, ClusterWrite::Keep, Some(c), only, &[], &who),
            None if !running.is_empty() => {
                tracing::info!(node = %node_id, cluster = %running, "node runs a mesh of a cluster it is not in: told to leave");
                self.send(running, ClusterWrite::Keep, None, None, &leaving, &who)
            }
            None => return,
        };
        match sent.await {
            Ok(answers) => {
                // Nobody waits here: the answers land in the store.
                for p in answers {
                    self.registry.forget(&p.command_id);
                }
                if let Some(c) = &member_of {
                    tracing::info!(node = %node_id, cluster = %c.cluster_id, to_all = changed, "mesh config sent");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot send mesh configs"),
        }
    }
}

impl MeshSender {
    /// Tells every node of `members` to leave cluster `cluster_id` (after
    /// `write` to its row), waits up to `wait`, and returns the members
    /// with what each answered ([`cluster::note_left`]).
    pub async fn leave_all(
        &self,
        cluster_id: &str,
        write: ClusterWrite,
        mut members: Vec<pb::ClusterMember>,
        wait: Duration,
    ) -> Result<Vec<pb::ClusterMember>, StoreError> {
        let left: Vec<String> = members.iter().map(|m| m.node_id.clone()).collect();
        let pending = self
            .send(cluster_id, write, None, None, &left, &HashMap::new())
            .await?;
        let answered = wait_all(&self.registry, pending, wait).await;
        cluster::note_left(&mut members, &answered);
        Ok(members)
    }
}

/// Waits for answers until `wait` has passed: those that came, by node;
/// the others are forgotten (their members stay `pending` until they answer).
pub async fn wait_all(
    registry: &Registry,
    answers: Vec<Pending>,
    wait: Duration,
) -> HashMap<String, pb::CommandResult> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut came = HashMap::new();
    for p in answers {
        match tokio::time::timeout_at(deadline, p.answer).await {
            Ok(Ok(r)) => {
                came.insert(p.node_id, r);
            }
            _ => registry.forget(&p.command_id),
        }
    }
    came
}
