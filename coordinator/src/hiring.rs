//! Hiring a cluster, the shell around [`crate::hire`]: match the order
//! against what the store knows, store the cluster and its leases, start
//! the leases on every chosen node at once, mesh the members, and record
//! how long each phase took. Also ends hired clusters, by hand or when
//! their time is up.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use warden_proto::{
    pb,
    states::{ClusterPhase, LeaseState},
};

use crate::{
    clock::now_ms,
    cluster,
    control::LeaseControl,
    hire, ids, matcher,
    mesh::{self, MeshSender},
    store::{ClusterWrite, StoreError},
};

/// How long a lease end may take when a cluster ends or a hire is undone.
const END_WAIT: Duration = Duration::from_secs(60);

/// Hires and ends clusters; cheap to clone.
#[derive(Clone)]
pub struct Hiring {
    control: LeaseControl,
    /// Matching and storing the leases of one hire happen under it, so two
    /// hires at once never pick the same free GPU.
    matching: Arc<tokio::sync::Mutex<()>>,
    /// The shortest hire (an hour; tests lower it).
    pub min_duration: Duration,
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(e.to_string())
}

impl Hiring {
    pub fn new(control: LeaseControl, min_duration: Duration) -> Hiring {
        Hiring {
            control,
            matching: Default::default(),
            min_duration,
        }
    }

    fn mesh(&self) -> MeshSender {
        MeshSender {
            store: self.control.store.clone(),
            registry: self.control.registry.clone(),
        }
    }

    /// Matches, and unless it is a dry run, starts the cluster; answers when
    /// it is ready or has failed (what started is then ended again).
    pub async fn hire(
        &self,
        req: pb::HireClusterRequest,
    ) -> Result<pb::HireClusterResponse, Status> {
        let began = Instant::now();
        let id = req.cluster_id.clone();
        let order_pb = req
            .order
            .clone()
            .ok_or_else(|| Status::invalid_argument("the hire carries no order"))?;
        let order = hire::order(&order_pb, &id, self.min_duration)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = &self.control.store;

        let guard = self.matching.lock().await;
        let clusters = store.list_clusters().await.map_err(unavailable)?;
        if clusters.iter().any(|c| c.cluster_id == id) {
            return Err(Status::already_exists(format!(
                "cluster {id} exists; choose another name or end it first"
            )));
        }
        let nodes = store.list_nodes().await.map_err(unavailable)?;
        let leases = store.list_leases().await.map_err(unavailable)?;
        let registry = &self.control.registry;
        let candidates = hire::candidates(&nodes, &leases, |n| registry.is_connected(n));
        // A node's mesh serves one cluster at a time.
        let mut order = order;
        order.exclude = clusters
            .iter()
            .filter(|c| cluster::is_live(c))
            .flat_map(|c| c.members.iter().map(|m| m.node_id.clone()))
            .collect();
        let plan = matcher::plan(&candidates, &order)
            .map_err(|why| Status::failed_precondition(why.to_string()))?;
        let shown = hire::plan_info(&plan, &candidates);
        if req.dry_run {
            return Ok(pb::HireClusterResponse {
                plan: Some(shown),
                cluster: None,
            });
        }
        let member_ids: Vec<String> = plan.members.iter().map(|m| m.node_id.clone()).collect();
        let (meshed, _) = cluster::set_members(None, &id, "", &member_ids, &clusters, now_ms())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let who = self.mesh().identities().await.map_err(unavailable)?;
        if let Some(n) = member_ids
            .iter()
            .find(|n| who.get(*n).is_none_or(|w| w.public_key.len() != 32))
        {
            return Err(Status::failed_precondition(format!(
                "node {n} has not announced a mesh key (an agent older than the mesh?)"
            )));
        }
        let lease_ids: Vec<String> = plan.members.iter().map(|_| ids::fresh("l")).collect();
        // Each member's container; for Ray, each its part, on its mesh address.
        let base: Option<pb::ContainerSpec> =
            order_pb.container.clone().filter(|c| !c.image.is_empty());
        let ray = hire::is_ray(&order_pb);
        let host_of = |m: &pb::ClusterMember| -> Option<std::net::Ipv4Addr> {
            m.address.split('/').next()?.parse().ok()
        };
        let head = meshed.members.first().and_then(host_of);
        let token = ray.then(hire::ray_token);
        let containers: Vec<Vec<pb::ContainerSpec>> = meshed
            .members
            .iter()
            .map(|m| match (&base, &token, head, host_of(m)) {
                (Some(b), Some(t), Some(h), Some(me)) => vec![hire::ray_container(b, h, me, t)],
                (Some(b), _, _, _) => vec![b.clone()],
                _ => Vec::new(),
            })
            .collect();
        let mut info = hire::starting(meshed, &plan, &order_pb, &lease_ids, now_ms());
        if let (Some(t), Some(h)) = (&token, head) {
            info.ray_address = format!("{h}:{}", hire::RAY_GCS_PORT);
            info.ray_client = format!("ray://{h}:{}", hire::RAY_CLIENT_PORT);
            info.ray_token = t.clone();
        }
        info.timings = Some(pb::ClusterTimings {
            match_ms: began.elapsed().as_millis() as u64,
            ..Default::default()
        });
        store
            .put_cluster(&id, ClusterWrite::Put(Box::new(info.clone())), vec![])
            .await
            .map_err(unavailable)?;
        // The leases are stored as they are sent, still under the lock:
        // the next hire sees their GPUs taken.
        let mut sent = Vec::new();
        let mut failed: Option<String> = None;
        for ((m, lease_id), containers) in plan.members.iter().zip(&lease_ids).zip(containers) {
            let lease = pb::LeaseInfo {
                lease_id: lease_id.clone(),
                node_id: m.node_id.clone(),
                state: LeaseState::Starting.into(),
                gpu_uuids: m.gpus.clone(),
                created_unix_ms: now_ms(),
                renter: order_pb.renter.clone(),
                ..Default::default()
            };
            let body = pb::command::Body::LeaseStart(pb::LeaseStart {
                lease_id: lease_id.clone(),
                renter: order_pb.renter.clone(),
                gpu_uuids: m.gpus.clone(),
                all_gpus: false,
                containers,
            });
            match self.control.send(lease, body).await {
                Ok(s) => sent.push(s),
                Err(e) => {
                    failed = Some(format!("node {}: {}", m.node_id, e.message()));
                    break;
                }
            }
        }
        drop(guard);

        let wait = match req.timeout_seconds {
            0 => hire::DEFAULT_READY_WAIT,
            s => Duration::from_secs(s.into()),
        };
        let deadline = began + wait;
        let leases_began = Instant::now();
        let answers = futures::future::join_all(sent.into_iter().map(|s| {
            self.control
                .answer(s, deadline.saturating_duration_since(Instant::now()))
        }))
        .await;
        for (m, a) in plan.members.iter().zip(&answers) {
            if let Err(e) = a {
                failed.get_or_insert_with(|| format!("node {}: {}", m.node_id, e.message()));
            }
        }
        let leases_ms = leases_began.elapsed().as_millis() as u64;
        if let Some(why) = failed {
            return self.undo(&id, why, leases_ms).await;
        }

        // Every lease runs: the members mesh.
        let meshing_began = Instant::now();
        let info = store
            .edit_cluster(&id, move |c| {
                c.phase = ClusterPhase::Meshing.into();
                if let Some(t) = c.timings.as_mut() {
                    t.leases_ms = leases_ms;
                }
            })
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::internal(format!("cluster {id} vanished")))?;
        let pending = self
            .mesh()
            .send(&id, ClusterWrite::Keep, Some(&info), None, &[], &who)
            .await
            .map_err(unavailable)?;
        let answered = mesh::wait_all(
            registry,
            pending,
            deadline.saturating_duration_since(Instant::now()),
        )
        .await;
        let mesh_ms = meshing_began.elapsed().as_millis() as u64;
        let refused: Vec<String> = answered
            .iter()
            .filter(|(_, r)| !r.ok)
            .map(|(n, r)| format!("node {n}: {}", r.error))
            .collect();
        let silent: Vec<&String> = member_ids
            .iter()
            .filter(|n| !answered.contains_key(*n))
            .collect();
        if !refused.is_empty() || !silent.is_empty() {
            let why = if refused.is_empty() {
                format!(
                    "the mesh was not applied within {}s by {}",
                    wait.as_secs(),
                    silent
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                format!("the mesh was refused: {}", refused.join("; "))
            };
            return self.undo(&id, why, leases_ms).await;
        }
        let mut ray_ms = 0;
        if ray {
            store
                .edit_cluster(&id, move |c| {
                    c.phase = ClusterPhase::Ray.into();
                    if let Some(t) = c.timings.as_mut() {
                        t.mesh_ms = mesh_ms;
                    }
                })
                .await
                .map_err(unavailable)?;
            let ray_began = Instant::now();
            let (node, lease) = (&plan.members[0].node_id, &lease_ids[0]);
            if let Err(why) = self
                .ray_ready(
                    node,
                    lease,
                    &info.ray_address,
                    member_ids.len() as u32,
                    deadline,
                )
                .await
            {
                return self.undo(&id, why, leases_ms).await;
            }
            ray_ms = ray_began.elapsed().as_millis() as u64;
        }
        let total_ms = began.elapsed().as_millis() as u64;
        let info = store
            .edit_cluster(&id, move |c| {
                c.phase = ClusterPhase::Ready.into();
                if let Some(t) = c.timings.as_mut() {
                    t.mesh_ms = mesh_ms;
                    t.ray_ms = ray_ms;
                    t.total_ms = total_ms;
                }
            })
            .await
            .map_err(unavailable)?;
        tracing::info!(cluster = %id, members = member_ids.len(), total_ms, "cluster ready");
        Ok(pb::HireClusterResponse {
            plan: Some(shown),
            cluster: info,
        })
    }

    /// Asks the head's node, every second, how many Ray nodes are alive,
    /// until all `members` are or `deadline` passes (then why not).
    async fn ray_ready(
        &self,
        node: &str,
        lease: &str,
        address: &str,
        members: u32,
        deadline: Instant,
    ) -> Result<(), String> {
        let registry = &self.control.registry;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            let body = pb::command::Body::RayProbe(pb::RayProbe {
                lease_id: lease.to_owned(),
                address: address.to_owned(),
            });
            let Some(cmd) = registry.command(node, "r", body) else {
                return Err(format!("the Ray head's node {node} is not connected"));
            };
            let pending = registry
                .send(cmd)
                .await
                .map_err(|e| format!("the Ray head's node {node}: {e}"))?;
            let command_id = pending.command_id.clone();
            match tokio::time::timeout_at(deadline, pending.answer).await {
                Ok(Ok(r)) if r.ok && r.ray_alive_nodes >= members => return Ok(()),
                Ok(Ok(r)) if r.ok => {
                    last = format!("{} of {members} Ray nodes alive", r.ray_alive_nodes)
                }
                Ok(Ok(r)) => last = r.error,
                Ok(Err(_)) => return Err("the coordinator is shutting down".into()),
                Err(_) => {
                    registry.forget(&command_id);
                    break;
                }
            }
            tokio::time::sleep_until((Instant::now() + Duration::from_secs(1)).min(deadline)).await;
        }
        Err(format!("Ray was not ready in time: {last}"))
    }

    /// A hire that failed: its leases are ended, its mesh taken down, the
    /// cluster kept as `failed` with the reason, and the reason returned.
    async fn undo(
        &self,
        id: &str,
        why: String,
        leases_ms: u64,
    ) -> Result<pb::HireClusterResponse, Status> {
        tracing::warn!(cluster = %id, reason = %why, "hire failed; ending what started");
        let _ = self.take_down(id, 0, END_WAIT).await;
        let reason = why.clone();
        let _ = self
            .control
            .store
            .edit_cluster(id, move |c| {
                c.phase = ClusterPhase::Failed.into();
                c.error = reason;
                if let Some(t) = c.timings.as_mut() {
                    t.leases_ms = leases_ms;
                }
            })
            .await;
        Err(Status::failed_precondition(format!(
            "cluster {id} failed: {why}; its leases were ended"
        )))
    }

    /// Ends every lease of the cluster at once and takes its mesh down;
    /// the cluster row stays (members `left`).
    async fn take_down(
        &self,
        id: &str,
        grace: u32,
        wait: Duration,
    ) -> Result<pb::ClusterInfo, Status> {
        let store = &self.control.store;
        let info = store
            .cluster(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?;
        let ends = info
            .members
            .iter()
            .filter(|m| !m.lease_id.is_empty())
            .map(|m| self.control.end(&m.lease_id, grace, wait));
        let ended = futures::future::join_all(ends).await;
        let members = self
            .mesh()
            .leave_all(id, ClusterWrite::Keep, info.members.clone(), wait)
            .await
            .map_err(unavailable)?;
        let errors: Vec<String> = ended
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.message().to_owned()))
            .collect();
        store
            .edit_cluster(id, move |c| {
                // Each member's leave answer; the rest of each member as stored.
                for m in &mut c.members {
                    if let Some(after) = members.iter().find(|a| a.node_id == m.node_id) {
                        m.state = after.state.clone();
                        m.error = after.error.clone();
                    }
                }
                if !errors.is_empty() {
                    c.error = format!("ending its leases: {}", errors.join("; "));
                }
            })
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))
    }

    /// Ends a hired cluster: its leases end (their proofs follow as for
    /// any lease) and its members leave the mesh.
    pub async fn end(
        &self,
        id: &str,
        grace: u32,
        wait: Duration,
    ) -> Result<pb::ClusterInfo, Status> {
        let store = &self.control.store;
        let info = store
            .edit_cluster(id, |c| {
                if c.order.is_some()
                    && !matches!(ClusterPhase::parse(&c.phase), Some(ClusterPhase::Ended))
                {
                    c.phase = ClusterPhase::Ending.into();
                }
            })
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?;
        if info.order.is_none() {
            return Err(Status::failed_precondition(format!(
                "cluster {id} was made with `cluster set`, not hired: use `warden cluster delete {id}`"
            )));
        }
        if info.phase == ClusterPhase::Ended {
            return Ok(info);
        }
        self.take_down(id, grace, wait).await?;
        store
            .edit_cluster(id, |c| c.phase = ClusterPhase::Ended.into())
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))
    }

    /// Moves a running hired cluster's end `add_seconds` later.
    pub async fn extend(&self, id: &str, add_seconds: u64) -> Result<pb::ClusterInfo, Status> {
        self.control
            .store
            .try_edit_cluster(id, move |c| hire::extend(c, add_seconds))
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    /// Adds a renter's machine to a live cluster's mesh (the public key it
    /// made; the same key again gets the same address) and sends every
    /// member the new peer list; answers with the renter's side: its
    /// address and every member as its peer.
    pub async fn connect(
        &self,
        id: &str,
        key: Vec<u8>,
        name: &str,
        wait: Duration,
    ) -> Result<pb::ConnectClusterResponse, Status> {
        let name = if name.is_empty() { "renter" } else { name }.to_owned();
        let theirs = key.clone();
        let info = self
            .control
            .store
            .try_edit_cluster(id, move |c| {
                cluster::add_renter(c, &key, &name, now_ms()).map(|_| ())
            })
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let mesh = self.mesh();
        let who = mesh.identities().await.map_err(unavailable)?;
        let pending = mesh
            .send(id, ClusterWrite::Keep, Some(&info), None, &[], &who)
            .await
            .map_err(unavailable)?;
        mesh::wait_all(&self.control.registry, pending, wait).await;
        let address = info
            .renter_peers
            .iter()
            .find(|r| r.public_key == theirs)
            .map(|r| r.address.clone())
            .unwrap_or_default();
        let prefix = info.subnet.split('/').nth(1).unwrap_or("24");
        let peers = info
            .members
            .iter()
            .filter_map(|m| {
                let id = who.get(&m.node_id)?;
                Some(pb::MeshPeer {
                    node_id: m.node_id.clone(),
                    public_key: id.public_key.clone(),
                    endpoint: id.endpoints.first().cloned().unwrap_or_default(),
                    allowed_ips: vec![format!("{}/32", m.address.split('/').next().unwrap_or(""))],
                    keepalive_seconds: cluster::KEEPALIVE_SECONDS,
                })
            })
            .collect();
        let cluster = self.control.store.cluster(id).await.map_err(unavailable)?;
        Ok(pb::ConnectClusterResponse {
            address: format!("{}/{prefix}", address.split('/').next().unwrap_or("")),
            peers,
            cluster,
        })
    }

    /// Ends hired clusters when their time is up, checking every `every`.
    pub async fn run_expiry(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let clusters = match self.control.store.list_clusters().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read clusters to end expired ones");
                    continue;
                }
            };
            for id in hire::expired(&clusters, now_ms()) {
                tracing::info!(cluster = %id, "the cluster's time is up: ending it");
                if let Err(e) = self.end(&id, 10, END_WAIT).await {
                    tracing::warn!(cluster = %id, error = %e.message(), "cannot end expired cluster");
                }
            }
        }
    }
}
