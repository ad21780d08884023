//! Hiring a cluster, the shell around [`crate::hire`]: match the order
//! against what the store knows, store the cluster and its leases, start
//! the leases on every chosen node at once, mesh the members, and record
//! how long each phase took. Also ends hired clusters, by hand or when
//! their time is up.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use warden_proto::{
    pb,
    states::{ClusterEventKind, ClusterPhase, LeaseState},
};

use crate::{
    clock::now_ms,
    cluster,
    control::{LeaseControl, Sent},
    hire, ids,
    matcher::{self, Want},
    mesh::{self, MeshSender},
    store::{ClusterWrite, StoreError},
};

/// How long a lease end may take when a cluster ends or a hire is undone.
const END_WAIT: Duration = Duration::from_secs(60);
/// How long one Ray probe watches for the members before it answers.
const RAY_WATCH: Duration = Duration::from_secs(20);
/// How long a lost member's node is waited for when it is dropped.
const LOST_WAIT: Duration = Duration::from_secs(5);

/// Hires and ends clusters; cheap to clone.
#[derive(Clone)]
pub struct Hiring {
    control: LeaseControl,
    /// Matching and storing the leases of one hire happen under it, so two
    /// hires at once never pick the same free GPU.
    matching: Arc<tokio::sync::Mutex<()>>,
    /// The shortest hire (an hour; tests lower it).
    pub min_duration: Duration,
    /// How long a member's node may be away before it is replaced.
    pub replace_after: Duration,
    /// Clusters being scaled or having a member replaced: one change at a
    /// time per cluster.
    changing: Arc<std::sync::Mutex<HashSet<String>>>,
    /// When this coordinator started (ms): nobody is counted away for
    /// longer than that.
    started_ms: i64,
    /// Which GPUs passed their work challenge (all, where it is off).
    work: crate::workissuer::Work,
}

/// A cluster marked as changing; unmarked when dropped.
struct Changing {
    set: Arc<std::sync::Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Changing {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(e.to_string())
}

impl Hiring {
    pub fn new(control: LeaseControl, min_duration: Duration, replace_after: Duration) -> Hiring {
        Hiring {
            control,
            matching: Default::default(),
            min_duration,
            replace_after,
            changing: Default::default(),
            started_ms: now_ms(),
            work: Default::default(),
        }
    }

    /// The work gate, for the admin view.
    pub fn work(&self) -> &crate::workissuer::Work {
        &self.work
    }

    /// GPUs are offered only as `work` says they passed their challenge.
    pub fn with_work(mut self, work: crate::workissuer::Work) -> Self {
        self.work = work;
        self
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
        let mut candidates = hire::candidates(&nodes, &leases, |n| registry.is_connected(n));
        self.work.restrict(&mut candidates);
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
        let mut info = hire::starting(meshed, &plan, &order_pb, &lease_ids, now_ms());
        if let Some(h) = info.members.first().and_then(hire::host_of) {
            if hire::is_ray(&order_pb) {
                info.ray_address = format!("{h}:{}", hire::RAY_GCS_PORT);
                info.ray_client = format!("ray://{h}:{}", hire::RAY_CLIENT_PORT);
                info.ray_token = hire::ray_token();
            }
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
        let sent = self.start_leases(&info, &info.members).await;
        drop(guard);

        let wait = match req.timeout_seconds {
            0 => hire::DEFAULT_READY_WAIT,
            s => Duration::from_secs(s.into()),
        };
        let deadline = began + wait;
        let leases_began = Instant::now();
        let failed = self.leases_answered(&info.members, sent, deadline).await;
        let leases_ms = leases_began.elapsed().as_millis() as u64;
        if let Err(why) = failed {
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
        if let Err(why) = self.mesh_members(&info, &member_ids, &who, deadline).await {
            return self.undo(&id, why, leases_ms).await;
        }
        let mesh_ms = meshing_began.elapsed().as_millis() as u64;
        let ray = hire::is_ray(&order_pb);
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
            if let Err(why) = self.ray_ready(&info, deadline).await {
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

    /// Sends a LeaseStart for each of `members` of cluster `c` (each stored
    /// as it is sent), stopping at the first that cannot be sent.
    async fn start_leases(
        &self,
        c: &pb::ClusterInfo,
        members: &[pb::ClusterMember],
    ) -> (Vec<Sent>, Option<String>) {
        let (renter, scratch_key_to) = c
            .order
            .as_ref()
            .map(|o| (o.renter.clone(), o.scratch_key_to.clone()))
            .unwrap_or_default();
        let mut sent = Vec::new();
        for m in members {
            let lease = pb::LeaseInfo {
                lease_id: m.lease_id.clone(),
                node_id: m.node_id.clone(),
                state: LeaseState::Starting.into(),
                gpu_uuids: m.gpu_uuids.clone(),
                created_unix_ms: now_ms(),
                renter: renter.clone(),
                ..Default::default()
            };
            let body = pb::command::Body::LeaseStart(pb::LeaseStart {
                lease_id: m.lease_id.clone(),
                renter: renter.clone(),
                gpu_uuids: m.gpu_uuids.clone(),
                all_gpus: false,
                containers: hire::member_containers(c, m),
                scratch_key_to: scratch_key_to.clone(),
            });
            match self.control.send(lease, body).await {
                Ok(s) => sent.push(s),
                Err(e) => return (sent, Some(format!("node {}: {}", m.node_id, e.message()))),
            }
        }
        (sent, None)
    }

    /// Waits for the answers to [`Self::start_leases`] (in `members`' order)
    /// until `deadline`: the first failure, if any.
    async fn leases_answered(
        &self,
        members: &[pb::ClusterMember],
        (sent, failed): (Vec<Sent>, Option<String>),
        deadline: Instant,
    ) -> Result<(), String> {
        let answers = futures::future::join_all(sent.into_iter().map(|s| {
            self.control
                .answer(s, deadline.saturating_duration_since(Instant::now()))
        }))
        .await;
        let mut failed = failed;
        for (m, a) in members.iter().zip(&answers) {
            if let Err(e) = a {
                failed.get_or_insert_with(|| format!("node {}: {}", m.node_id, e.message()));
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Sends cluster `c`'s mesh to its members and waits until each of
    /// `expect` has applied it, or `deadline` (then why not).
    async fn mesh_members(
        &self,
        c: &pb::ClusterInfo,
        expect: &[String],
        who: &HashMap<String, cluster::MeshIdentity>,
        deadline: Instant,
    ) -> Result<(), String> {
        let pending = self
            .mesh()
            .send(&c.cluster_id, ClusterWrite::Keep, Some(c), None, &[], who)
            .await
            .map_err(|e| e.to_string())?;
        let answered = mesh::wait_all(
            &self.control.registry,
            pending,
            deadline.saturating_duration_since(Instant::now()),
        )
        .await;
        let refused: Vec<String> = answered
            .iter()
            .filter(|(n, r)| !r.ok && expect.contains(n))
            .map(|(n, r)| format!("node {n}: {}", r.error))
            .collect();
        if !refused.is_empty() {
            return Err(format!("the mesh was refused: {}", refused.join("; ")));
        }
        let silent: Vec<&str> = expect
            .iter()
            .filter(|n| !answered.contains_key(*n))
            .map(String::as_str)
            .collect();
        if !silent.is_empty() {
            return Err(format!(
                "the mesh was not applied in time by {}",
                silent.join(", ")
            ));
        }
        Ok(())
    }

    /// Marks cluster `id` as changing, or says it already is.
    fn begin_change(&self, id: &str) -> Option<Changing> {
        let mut set = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(id.to_owned()).then(|| Changing {
            set: self.changing.clone(),
            id: id.to_owned(),
        })
    }

    /// Sets a changing cluster's phase (`Scaling`, or back to `Ready` if it
    /// still is scaling) and adds `events` to it.
    async fn note_change(
        &self,
        id: &str,
        phase: ClusterPhase,
        events: Vec<pb::ClusterEvent>,
        edit: impl FnOnce(&mut pb::ClusterInfo) + Send + 'static,
    ) -> Result<Option<pb::ClusterInfo>, StoreError> {
        self.control
            .store
            .edit_cluster(id, move |c| {
                let now = ClusterPhase::parse(&c.phase);
                match phase {
                    ClusterPhase::Scaling if now == Some(ClusterPhase::Ready) => {
                        c.phase = phase.into()
                    }
                    ClusterPhase::Ready if now == Some(ClusterPhase::Scaling) => {
                        c.phase = phase.into()
                    }
                    _ => {}
                }
                c.events.extend(events);
                edit(c);
            })
            .await
    }

    /// New members for live cluster `id`, for `want` more: matched (no node
    /// of a live cluster, none of `exclude`), stored with their leases,
    /// started, meshed with the others and, for Ray, joined to the head,
    /// by `deadline`. If any step fails, the new members leave again and
    /// the rest of the cluster runs on as it was.
    async fn add_members(
        &self,
        id: &str,
        want: Want,
        exclude: BTreeSet<String>,
        deadline: Instant,
    ) -> Result<Vec<pb::ClusterMember>, String> {
        let store = &self.control.store;
        let guard = self.matching.lock().await;
        let clusters = store.list_clusters().await.map_err(|e| e.to_string())?;
        let c = clusters
            .iter()
            .find(|c| c.cluster_id == id)
            .ok_or_else(|| format!("no cluster {id}"))?;
        let order_pb = c.order.clone().ok_or("the cluster was not hired")?;
        let mut order = hire::order(&order_pb, id, Duration::ZERO).map_err(|e| e.to_string())?;
        order.want = want;
        order.exclude = clusters
            .iter()
            .filter(|c| cluster::is_live(c))
            .flat_map(|c| c.members.iter().map(|m| m.node_id.clone()))
            .chain(exclude)
            .collect();
        let nodes = store.list_nodes().await.map_err(|e| e.to_string())?;
        let leases = store.list_leases().await.map_err(|e| e.to_string())?;
        let registry = &self.control.registry;
        let mut candidates = hire::candidates(&nodes, &leases, |n| registry.is_connected(n));
        self.work.restrict(&mut candidates);
        let plan = matcher::plan(&candidates, &order).map_err(|e| e.to_string())?;
        let who = self.mesh().identities().await.map_err(|e| e.to_string())?;
        if let Some(m) = plan
            .members
            .iter()
            .find(|m| who.get(&m.node_id).is_none_or(|w| w.public_key.len() != 32))
        {
            return Err(format!("node {} has not announced a mesh key", m.node_id));
        }
        let all: Vec<String> = c
            .members
            .iter()
            .map(|m| m.node_id.clone())
            .chain(plan.members.iter().map(|m| m.node_id.clone()))
            .collect();
        let (mut grown, _) = cluster::set_members(Some(c), id, "", &all, &clusters, now_ms())
            .map_err(|e| e.to_string())?;
        let mut added = Vec::new();
        for planned in &plan.members {
            if let Some(m) = grown
                .members
                .iter_mut()
                .find(|m| m.node_id == planned.node_id)
            {
                m.lease_id = ids::fresh("l");
                m.gpu_uuids = planned.gpus.clone();
                added.push(m.clone());
            }
        }
        store
            .put_cluster(id, ClusterWrite::Put(Box::new(grown.clone())), vec![])
            .await
            .map_err(|e| e.to_string())?;
        let sent = self.start_leases(&grown, &added).await;
        drop(guard);
        let added_ids: Vec<String> = added.iter().map(|m| m.node_id.clone()).collect();
        let mut joined = self.leases_answered(&added, sent, deadline).await;
        if joined.is_ok() {
            joined = self.mesh_members(&grown, &added_ids, &who, deadline).await;
        }
        if joined.is_ok() && hire::is_ray(&order_pb) {
            joined = self.ray_ready(&grown, deadline).await;
        }
        // A cluster ended meanwhile took down the members it knew of.
        if joined.is_ok() {
            let now = store.cluster(id).await.map_err(|e| e.to_string())?;
            if now.is_none_or(|c| {
                matches!(
                    ClusterPhase::parse(&c.phase),
                    Some(ClusterPhase::Ending | ClusterPhase::Ended)
                )
            }) {
                joined = Err(format!("cluster {id} was ended meanwhile"));
            }
        }
        if let Err(why) = joined {
            tracing::warn!(cluster = %id, reason = %why, "new members failed; they leave again");
            let _ = self.drop_members(id, &added_ids, 0, END_WAIT).await;
            return Err(why);
        }
        Ok(added)
    }

    /// Members `nodes` leave cluster `id`: the others are sent the mesh
    /// without them, they are told to leave it, and their leases end.
    /// Answers with the members that left and what ending each lease said.
    async fn drop_members(
        &self,
        id: &str,
        nodes: &[String],
        grace: u32,
        wait: Duration,
    ) -> Result<Vec<(pb::ClusterMember, Result<(), String>)>, String> {
        let store = &self.control.store;
        let clusters = store.list_clusters().await.map_err(|e| e.to_string())?;
        let c = clusters
            .iter()
            .find(|c| c.cluster_id == id)
            .ok_or_else(|| format!("no cluster {id}"))?;
        let keep: Vec<String> = c
            .members
            .iter()
            .filter(|m| !nodes.contains(&m.node_id))
            .map(|m| m.node_id.clone())
            .collect();
        let (shrunk, left) = cluster::set_members(Some(c), id, "", &keep, &clusters, now_ms())
            .map_err(|e| e.to_string())?;
        let mesh = self.mesh();
        let who = mesh.identities().await.map_err(|e| e.to_string())?;
        let pending = mesh
            .send(
                id,
                ClusterWrite::Put(Box::new(shrunk.clone())),
                Some(&shrunk),
                None,
                &left,
                &who,
            )
            .await
            .map_err(|e| e.to_string())?;
        let leaving: Vec<pb::ClusterMember> = c
            .members
            .iter()
            .filter(|m| nodes.contains(&m.node_id))
            .cloned()
            .collect();
        let (_, ended) = futures::join!(
            mesh::wait_all(&self.control.registry, pending, wait),
            futures::future::join_all(leaving.iter().map(|m| self.control.end(
                &m.lease_id,
                grace,
                wait
            )))
        );
        Ok(leaving
            .into_iter()
            .zip(ended)
            .map(|(m, e)| (m, e.map(|_| ()).map_err(|e| e.message().to_owned())))
            .collect())
    }

    /// Scales a ready hired cluster to `gpus` GPUs or `nodes` nodes (the
    /// kind its order gave): new members start and join, or the newest
    /// leave. Answers with the cluster after the change.
    pub async fn scale(
        &self,
        id: &str,
        gpus: u32,
        nodes: u32,
        wait: Duration,
    ) -> Result<pb::ClusterInfo, Status> {
        let store = &self.control.store;
        let _changing = self.begin_change(id).ok_or_else(|| {
            Status::failed_precondition(format!(
                "cluster {id} is already changing (a scale or a replacement); try again when it is ready"
            ))
        })?;
        let c = store
            .cluster(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?;
        let resize = hire::resize(&c, gpus, nodes)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let resized = move |c: &mut pb::ClusterInfo| {
            if let Some(o) = c.order.as_mut() {
                if o.gpus > 0 {
                    o.gpus = gpus;
                } else {
                    o.nodes = nodes;
                }
            }
        };
        let deadline = Instant::now() + wait;
        let (events, outcome) = match resize {
            hire::Resize::Same => return Ok(c),
            hire::Resize::Grow(want) => {
                self.note_change(id, ClusterPhase::Scaling, vec![], |_| {})
                    .await
                    .map_err(unavailable)?;
                match self.add_members(id, want, BTreeSet::new(), deadline).await {
                    Ok(added) => {
                        let n = added.len();
                        let events = added
                            .iter()
                            .map(|m| {
                                hire::event(ClusterEventKind::ScaledUp, m, String::new(), now_ms())
                            })
                            .collect();
                        tracing::info!(cluster = %id, added = n, "cluster scaled up");
                        (events, Ok(()))
                    }
                    Err(why) => (vec![], Err(why)),
                }
            }
            hire::Resize::Shrink(leaving) => {
                self.note_change(id, ClusterPhase::Scaling, vec![], |_| {})
                    .await
                    .map_err(unavailable)?;
                match self.drop_members(id, &leaving, 10, wait).await {
                    Ok(left) => {
                        let events = left
                            .iter()
                            .map(|(m, ended)| {
                                let detail = ended.clone().err().map_or(String::new(), |e| {
                                    format!("its lease did not end: {e}")
                                });
                                hire::event(ClusterEventKind::ScaledDown, m, detail, now_ms())
                            })
                            .collect();
                        tracing::info!(cluster = %id, removed = leaving.len(), "cluster scaled down");
                        (events, Ok(()))
                    }
                    Err(why) => (vec![], Err(why)),
                }
            }
        };
        let grew = outcome.is_ok();
        let info = self
            .note_change(id, ClusterPhase::Ready, events, move |c| {
                if grew {
                    resized(c)
                }
            })
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?;
        match outcome {
            Ok(()) => Ok(info),
            Err(why) => Err(Status::failed_precondition(format!(
                "cluster {id} keeps its size: {why}"
            ))),
        }
    }

    /// Replaces the lost members of every ready hired cluster, each in a
    /// task of its own; `seen` is a node's last contact while it is not
    /// connected.
    async fn replace_lost(&self, clusters: &[pb::ClusterInfo]) {
        // Every second: read the whole network only when a cluster could
        // lose a member or has a lost member's lease to end.
        let concerned = |c: &pb::ClusterInfo| {
            (c.order.is_some() && ClusterPhase::parse(&c.phase) == Some(ClusterPhase::Ready))
                || c.events.iter().any(|e| e.kind == ClusterEventKind::Lost)
        };
        if !clusters.iter().any(concerned) {
            return;
        }
        let store = &self.control.store;
        let (nodes, leases) = match futures::join!(store.list_nodes(), store.list_leases()) {
            (Ok(n), Ok(l)) => (n, l),
            (Err(e), _) | (_, Err(e)) => {
                return tracing::warn!(error = %e, "cannot read nodes and leases to find lost members")
            }
        };
        let registry = &self.control.registry;
        // A coordinator that just started has seen nobody for a while.
        let seen = |n: &str| {
            (!registry.is_connected(n)).then(|| {
                nodes
                    .iter()
                    .find(|s| s.node_id == n)
                    .map_or(0, |s| s.last_seen_ms)
                    .max(self.started_ms)
            })
        };
        let now = now_ms();
        for c in clusters {
            for (m, why) in hire::lost(c, &leases, seen, now, self.replace_after.as_millis() as i64)
            {
                let Some(changing) = self.begin_change(&c.cluster_id) else {
                    continue;
                };
                let this = self.clone();
                let head = c
                    .members
                    .first()
                    .map(|h| h.node_id == m.node_id)
                    .unwrap_or(false)
                    && c.order.as_ref().is_some_and(hire::is_ray);
                let want = hire::replacement(c, &m);
                let id = c.cluster_id.clone();
                tokio::spawn(async move {
                    this.replace(&id, m, why, want, head).await;
                    drop(changing);
                });
            }
            // Leases of members lost earlier whose nodes came back are ended now.
            for e in c.events.iter().filter(|e| e.kind == ClusterEventKind::Lost) {
                let running = leases.iter().any(|l| {
                    l.lease_id == e.lease_id
                        && matches!(
                            LeaseState::parse(&l.state),
                            Some(LeaseState::Starting | LeaseState::Running | LeaseState::Stopped)
                        )
                });
                if running && registry.is_connected(&e.node_id) {
                    tracing::info!(cluster = %c.cluster_id, lease = %e.lease_id, "the lease of a lost member is ended now that its node is back");
                    let control = self.control.clone();
                    let lease = e.lease_id.clone();
                    tokio::spawn(async move { control.end(&lease, 10, END_WAIT).await });
                }
            }
        }
    }

    /// Replaces lost member `m` of cluster `id`: it leaves (its lease is
    /// ended if its node answers), and a member for `want` joins. Each step
    /// is recorded as an event. A Ray head is not replaced: Ray cannot move
    /// its head under running workers.
    async fn replace(&self, id: &str, m: pb::ClusterMember, why: String, want: Want, head: bool) {
        tracing::warn!(cluster = %id, node = %m.node_id, reason = %why, "cluster member lost");
        let lost = hire::event(ClusterEventKind::Lost, &m, why, now_ms());
        if head {
            let not = hire::event(
                ClusterEventKind::NotReplaced,
                &m,
                "it runs the Ray head, which Ray cannot move under running workers: end the cluster and hire it again".into(),
                now_ms(),
            );
            let _ = self
                .note_change(id, ClusterPhase::Ready, vec![lost, not], |c| {
                    c.error = "the Ray head's member is lost".into()
                })
                .await;
            return;
        }
        let _ = self
            .note_change(id, ClusterPhase::Scaling, vec![lost], |_| {})
            .await;
        let deadline = Instant::now() + hire::DEFAULT_READY_WAIT;
        let outcome = match self
            .drop_members(id, std::slice::from_ref(&m.node_id), 0, LOST_WAIT)
            .await
        {
            Ok(_) => {
                let exclude = BTreeSet::from([m.node_id.clone()]);
                self.add_members(id, want, exclude, deadline).await
            }
            Err(e) => Err(e),
        };
        let event = match outcome {
            Ok(added) => {
                let mut e = hire::event(ClusterEventKind::Replaced, &m, String::new(), now_ms());
                e.replacement_node_id = added
                    .iter()
                    .map(|a| a.node_id.clone())
                    .collect::<Vec<_>>()
                    .join(",");
                e.replacement_lease_id = added
                    .iter()
                    .map(|a| a.lease_id.clone())
                    .collect::<Vec<_>>()
                    .join(",");
                tracing::info!(cluster = %id, lost = %m.node_id, by = %e.replacement_node_id, "cluster member replaced");
                e
            }
            Err(why) => {
                tracing::warn!(cluster = %id, lost = %m.node_id, reason = %why, "cluster member not replaced");
                hire::event(ClusterEventKind::NotReplaced, &m, why, now_ms())
            }
        };
        let _ = self
            .note_change(id, ClusterPhase::Ready, vec![event], |_| {})
            .await;
    }

    /// Asks the head's node, every second, which Ray nodes are alive, until
    /// there is one at every member's mesh address or `deadline` passes
    /// (then why not). By address, not by count: a lost member's Ray node
    /// counts as alive for a while after its node went away.
    async fn ray_ready(&self, c: &pb::ClusterInfo, deadline: Instant) -> Result<(), String> {
        let head = c.members.first().ok_or("the cluster has no members")?;
        let (node, lease, address) = (&head.node_id, &head.lease_id, &c.ray_address);
        let hosts: Vec<String> = c
            .members
            .iter()
            .filter_map(hire::host_of)
            .map(|a| a.to_string())
            .collect();
        let registry = &self.control.registry;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            // The node watches until every member is alive (or a while).
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(RAY_WATCH);
            let body = pb::command::Body::RayProbe(pb::RayProbe {
                lease_id: lease.to_owned(),
                address: address.to_owned(),
                expect: hosts.clone(),
                wait_ms: wait.as_millis() as u32,
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
                Ok(Ok(r)) if r.ok => {
                    let missing: Vec<&str> = hosts
                        .iter()
                        .filter(|h| !r.ray_alive_addresses.contains(h))
                        .map(String::as_str)
                        .collect();
                    if missing.is_empty() {
                        return Ok(());
                    }
                    last = format!("no Ray node alive at {}", missing.join(", "));
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

    /// Ends hired clusters when their time is up and replaces lost
    /// members, checking every `every`.
    pub async fn run_upkeep(
        self,
        every: Duration,
        replica: crate::replicas::Replica,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Among replicas, only the leader keeps the clusters' time.
            if !replica.leads() {
                continue;
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
            self.replace_lost(&clusters).await;
        }
    }
}
