//! The Admin gRPC service, served only on a unix socket with mode 0600:
//! whoever can open it administers the coordinator.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use warden_proto::{dsse::Signer, pb, states::LeaseState};

use crate::{
    clock::now_ms, control::LeaseControl, hiring::Hiring, ids, registry::Registry, store::Store,
};
/// How long the admin call waits for the node's answer by default.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);

pub struct AdminService {
    store: Store,
    registry: Registry,
    signer: Arc<Signer>,
    control: LeaseControl,
    hiring: Hiring,
}

impl AdminService {
    pub fn new(store: Store, registry: Registry, signer: Arc<Signer>, hiring: Hiring) -> Self {
        Self {
            control: LeaseControl {
                store: store.clone(),
                registry: registry.clone(),
            },
            store,
            registry,
            signer,
            hiring,
        }
    }

    /// Signs and sends a command to a connected node, waits for its answer
    /// (stored by then), and returns the lease as it stands.
    async fn command(
        &self,
        info: pb::LeaseInfo,
        body: pb::command::Body,
        wait: Duration,
    ) -> Result<pb::LeaseInfo, Status> {
        self.control.command(info, body, wait).await
    }
}

impl AdminService {
    /// One cluster as stored.
    async fn cluster(&self, id: &str) -> Result<Option<pb::ClusterInfo>, Status> {
        self.store
            .cluster(id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    fn mesh(&self) -> crate::mesh::MeshSender {
        crate::mesh::MeshSender {
            store: self.store.clone(),
            registry: self.registry.clone(),
        }
    }

    /// A lease that is running, or why it cannot take a container command.
    async fn running_lease(&self, lease_id: &str) -> Result<pb::LeaseInfo, Status> {
        let info = self
            .store
            .get_lease(lease_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no lease {lease_id}")))?;
        if !matches!(
            LeaseState::parse(&info.state),
            Some(LeaseState::Running | LeaseState::Stopped)
        ) {
            return Err(Status::failed_precondition(format!(
                "lease {lease_id} is {}, not running",
                info.state
            )));
        }
        Ok(info)
    }
}

/// How long SetCluster waits for the members by default: the promise is a
/// cluster in seconds.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// A request's timeout in seconds; 0 is `default`.
fn wait_or(seconds: u32, default: Duration) -> Duration {
    if seconds == 0 {
        default
    } else {
        Duration::from_secs(seconds.into())
    }
}

fn wait(seconds: u32) -> Duration {
    wait_or(seconds, DEFAULT_WAIT)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .store
            .list_nodes()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let link: Option<pb::LinkSample> = n
                    .link
                    .as_deref()
                    .and_then(|b| prost::Message::decode(b).ok());
                (n, link)
            })
            .map(|(n, link)| pb::NodeInfo {
                work: self.hiring.work().standings(&n.node_id),
                tier: crate::matcher::Tier::of_sample(link.as_ref()).name().into(),
                labels: Some(n.labels),
                connected: self.registry.is_connected(&n.node_id),
                node_id: n.node_id,
                public_key: n.public_key,
                agent_version: n.agent_version,
                first_seen_unix_ms: n.first_seen_ms,
                last_seen_unix_ms: n.last_seen_ms,
                records: n.records,
                last_seq: n.last_seq,
                peer_address: n.peer_address,
                hostname: n.hostname,
                spool: n
                    .spool_state
                    .and_then(|b| prost::Message::decode(b.as_slice()).ok()),
                inventory: prost::Message::decode(n.inventory.as_slice()).ok(),
                mesh_public_key: n.mesh_public_key.clone(),
                mesh_endpoints: n.mesh_endpoints.clone(),
                link,
                gpus: n
                    .gpus
                    .iter()
                    .filter_map(|b| prost::Message::decode(b.as_slice()).ok())
                    .collect(),
                missing: n
                    .missing
                    .iter()
                    .map(|g| pb::SeqRange {
                        first: g.first,
                        last: g.last,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn start_lease(
        &self,
        req: Request<pb::StartLeaseRequest>,
    ) -> Result<Response<pb::LeaseInfo>, Status> {
        let req = req.into_inner();
        if req.all_gpus && !req.gpu_uuids.is_empty() {
            return Err(Status::invalid_argument(
                "give GPU uuids or all GPUs, not both",
            ));
        }
        if !req.scratch_key_to.is_empty() {
            warden_proto::sealed::key32(&req.scratch_key_to).map_err(|e| {
                Status::invalid_argument(format!(
                    "scratch_key_to (the renter's X25519 public key): {e}"
                ))
            })?;
        }
        let lease_id = if req.lease_id.is_empty() {
            ids::fresh("l")
        } else {
            let chosen = &req.lease_id;
            let ok = chosen.strip_prefix("l-").is_some_and(|rest| {
                (1..=64).contains(&rest.len())
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
            if !ok {
                return Err(Status::invalid_argument(format!(
                    "lease id `{chosen}` is not `l-` and 1 to 64 of [a-z0-9]"
                )));
            }
            let taken = self
                .store
                .get_lease(chosen)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if taken.is_some() {
                return Err(Status::already_exists(format!("lease {chosen} exists")));
            }
            chosen.clone()
        };
        let info = pb::LeaseInfo {
            lease_id: lease_id.clone(),
            node_id: req.node_id.clone(),
            state: LeaseState::Starting.into(),
            gpu_uuids: req.gpu_uuids.clone(),
            all_gpus: req.all_gpus,
            created_unix_ms: now_ms(),
            renter: req.renter.clone(),
            ..Default::default()
        };
        let body = pb::command::Body::LeaseStart(pb::LeaseStart {
            lease_id,
            renter: req.renter,
            gpu_uuids: req.gpu_uuids,
            all_gpus: req.all_gpus,
            containers: req.container.into_iter().collect(),
            scratch_key_to: req.scratch_key_to,
        });
        Ok(Response::new(
            self.command(info, body, wait(req.timeout_seconds)).await?,
        ))
    }

    async fn end_lease(
        &self,
        req: Request<pb::EndLeaseRequest>,
    ) -> Result<Response<pb::LeaseInfo>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.control
                .end(&req.lease_id, req.grace_seconds, wait(req.timeout_seconds))
                .await?,
        ))
    }

    async fn run_container(
        &self,
        req: Request<pb::RunContainerRequest>,
    ) -> Result<Response<pb::LeaseInfo>, Status> {
        let req = req.into_inner();
        let info = self.running_lease(&req.lease_id).await?;
        let body = pb::command::Body::RunContainer(pb::RunContainer {
            lease_id: req.lease_id,
            spec: req.container,
        });
        Ok(Response::new(
            self.command(info, body, wait(req.timeout_seconds)).await?,
        ))
    }

    async fn stop_container(
        &self,
        req: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::LeaseInfo>, Status> {
        let req = req.into_inner();
        let info = self.running_lease(&req.lease_id).await?;
        let body = pb::command::Body::StopContainer(pb::StopContainer {
            lease_id: req.lease_id,
            name: req.name,
            grace_seconds: req.grace_seconds,
        });
        Ok(Response::new(
            self.command(info, body, wait(req.timeout_seconds)).await?,
        ))
    }

    async fn export_lease(
        &self,
        req: Request<pb::ExportLeaseRequest>,
    ) -> Result<Response<pb::ExportLeaseResponse>, Status> {
        let lease_id = req.into_inner().lease_id;
        let ev = self
            .store
            .evidence(&lease_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no lease {lease_id}")))?;
        let bundle_json =
            crate::verifier::lease::bundle_json(&lease_id, &ev, &self.signer.verifying_key())
                .map_err(|e| Status::internal(format!("node key: {e}")))?;
        Ok(Response::new(pb::ExportLeaseResponse { bundle_json }))
    }

    async fn set_cluster(
        &self,
        request: Request<pb::SetClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        let r = request.into_inner();
        let unavailable = |e: crate::store::StoreError| Status::unavailable(e.to_string());
        let clusters = self.store.list_clusters().await.map_err(unavailable)?;
        let existing = clusters.iter().find(|c| c.cluster_id == r.cluster_id);
        if existing.is_some_and(|c| c.order.is_some()) {
            return Err(Status::failed_precondition(format!(
                "cluster {} was hired: its members are its leases' nodes (end it with `warden cluster end {}`)",
                r.cluster_id, r.cluster_id
            )));
        }
        let mesh = self.mesh();
        let who = mesh.identities().await.map_err(unavailable)?;
        for n in &r.node_ids {
            match who.get(n) {
                None => {
                    return Err(Status::invalid_argument(format!(
                        "no node {n} has registered"
                    )))
                }
                Some(id) if id.public_key.len() != 32 => {
                    return Err(Status::invalid_argument(format!(
                        "node {n} has not announced a mesh key (an agent older than the mesh?)"
                    )))
                }
                Some(_) => {}
            }
        }
        let (mut info, left) = crate::cluster::set_members(
            existing,
            &r.cluster_id,
            &r.subnet,
            &r.node_ids,
            &clusters,
            now_ms(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for m in &mut info.members {
            if !self.registry.is_connected(&m.node_id) {
                m.error = "not connected: sent when it connects".into();
            }
        }
        let answers = mesh
            .send(
                &r.cluster_id,
                crate::store::ClusterWrite::Put(Box::new(info.clone())),
                Some(&info),
                None,
                &left,
                &who,
            )
            .await
            .map_err(unavailable)?;
        crate::mesh::wait_all(
            &self.registry,
            answers,
            wait_or(r.timeout_seconds, CLUSTER_WAIT),
        )
        .await;
        let info = self
            .cluster(&r.cluster_id)
            .await?
            .ok_or_else(|| Status::internal(format!("cluster {} vanished", r.cluster_id)))?;
        Ok(Response::new(info))
    }

    async fn delete_cluster(
        &self,
        request: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        let r = request.into_inner();
        let unavailable = |e: crate::store::StoreError| Status::unavailable(e.to_string());
        let mut info = self
            .cluster(&r.cluster_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no cluster {}", r.cluster_id)))?;
        if info.order.is_some() {
            if crate::cluster::is_live(&info) {
                return Err(Status::failed_precondition(format!(
                    "cluster {} was hired and runs: end it with `warden cluster end {}`",
                    r.cluster_id, r.cluster_id
                )));
            }
            // Ended or failed: its members left already; only the record goes.
            self.store
                .put_cluster(&r.cluster_id, crate::store::ClusterWrite::Delete, vec![])
                .await
                .map_err(unavailable)?;
            return Ok(Response::new(info));
        }
        info.members = self
            .mesh()
            .leave_all(
                &r.cluster_id,
                crate::store::ClusterWrite::Delete,
                std::mem::take(&mut info.members),
                wait_or(r.timeout_seconds, CLUSTER_WAIT),
            )
            .await
            .map_err(unavailable)?;
        Ok(Response::new(info))
    }

    async fn list_clusters(
        &self,
        _request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let clusters = self
            .store
            .list_clusters()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ListClustersResponse { clusters }))
    }

    async fn hire_cluster(
        &self,
        req: Request<pb::HireClusterRequest>,
    ) -> Result<Response<pb::HireClusterResponse>, Status> {
        Ok(Response::new(self.hiring.hire(req.into_inner()).await?))
    }

    async fn end_cluster(
        &self,
        req: Request<pb::EndClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.hiring
                .end(
                    &r.cluster_id,
                    r.grace_seconds,
                    wait_or(r.timeout_seconds, CLUSTER_WAIT),
                )
                .await?,
        ))
    }

    async fn extend_cluster(
        &self,
        req: Request<pb::ExtendClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.hiring.extend(&r.cluster_id, r.add_seconds).await?,
        ))
    }

    async fn lease_logs(
        &self,
        req: Request<pb::LeaseLogsRequest>,
    ) -> Result<Response<pb::LeaseLogsResponse>, Status> {
        let r = req.into_inner();
        let info = self
            .store
            .get_lease(&r.lease_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no lease {}", r.lease_id)))?;
        if !LeaseState::parse(&info.state).is_some_and(LeaseState::is_live) {
            return Err(Status::failed_precondition(format!(
                "lease {} is {}: its containers are gone from the node, and their output with them",
                r.lease_id, info.state
            )));
        }
        let body = pb::command::Body::ContainerLogs(pb::ContainerLogs {
            lease_id: r.lease_id.clone(),
            name: r.name,
            tail: r.tail,
            since_unix_ns: r.since_unix_ns,
        });
        let cmd = self
            .registry
            .command(&info.node_id, "g", body)
            .ok_or_else(|| {
                Status::unavailable(format!("node {} is not connected", info.node_id))
            })?;
        let pending = self
            .registry
            .send(cmd)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let wait = wait_or(r.timeout_seconds, Duration::from_secs(30));
        let answer = match tokio::time::timeout(wait, pending.answer).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => return Err(Status::unavailable("the coordinator is shutting down")),
            Err(_) => {
                self.registry.forget(&pending.command_id);
                return Err(Status::deadline_exceeded(format!(
                    "node {} did not answer within {}s",
                    info.node_id,
                    wait.as_secs()
                )));
            }
        };
        if !answer.ok {
            return Err(Status::failed_precondition(answer.error));
        }
        let logs = answer.logs.unwrap_or_default();
        Ok(Response::new(pb::LeaseLogsResponse {
            name: logs.name,
            data: logs.data,
            truncated: logs.truncated,
            last_unix_ns: logs.last_unix_ns,
        }))
    }

    async fn scale_cluster(
        &self,
        req: Request<pb::ScaleClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.hiring
                .scale(
                    &r.cluster_id,
                    r.gpus,
                    r.nodes,
                    wait_or(r.timeout_seconds, crate::hire::DEFAULT_READY_WAIT),
                )
                .await?,
        ))
    }

    async fn export_cluster(
        &self,
        req: Request<pb::ExportClusterRequest>,
    ) -> Result<Response<pb::ExportClusterResponse>, Status> {
        use crate::export::{self, LeaseRow};
        let id = req.into_inner().cluster_id;
        let c = self
            .cluster(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no cluster {id}")))?;
        if c.order.is_none() {
            return Err(Status::failed_precondition(
                export::ExportError::NotHired(id).to_string(),
            ));
        }
        let key = self.signer.verifying_key();
        let mut rows = std::collections::BTreeMap::new();
        let mut leases = Vec::new();
        for lease_id in export::lease_ids(&c) {
            let ev = self
                .store
                .evidence(&lease_id)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            // A lease without a bundle is named, not a reason to export nothing.
            let (node_id, bundle_json, error) = match ev {
                None => (
                    String::new(),
                    String::new(),
                    "no such lease stored".to_owned(),
                ),
                Some(ev) => {
                    let made = crate::verifier::lease::bundle_json(&lease_id, &ev, &key);
                    let node_id = ev.node_id.clone();
                    rows.insert(
                        lease_id.clone(),
                        LeaseRow {
                            node_public_key: ev.node_public_key,
                            lease: ev.lease,
                        },
                    );
                    match made {
                        Ok(json) => (node_id, json, String::new()),
                        Err(e) => (node_id, String::new(), format!("node key: {e}")),
                    }
                }
            };
            leases.push(pb::ExportedLease {
                lease_id,
                node_id,
                bundle_json,
                error,
            });
        }
        let record = export::record(&c, &rows, &key, now_ms())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        for l in leases.iter_mut().filter(|l| l.node_id.is_empty()) {
            if let Some(r) = record.leases.iter().find(|r| r.lease_id == l.lease_id) {
                l.node_id = r.node_id.clone();
            }
        }
        let env = self
            .signer
            .sign_message(warden_proto::types::CLUSTER_RECORD, &record);
        Ok(Response::new(pb::ExportClusterResponse {
            record_json: format!("{:#}", warden_proto::dsse::to_json(&env)),
            leases,
        }))
    }

    async fn connect_cluster(
        &self,
        req: Request<pb::ConnectClusterRequest>,
    ) -> Result<Response<pb::ConnectClusterResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.hiring
                .connect(
                    &r.cluster_id,
                    r.public_key,
                    &r.name,
                    wait_or(r.timeout_seconds, CLUSTER_WAIT),
                )
                .await?,
        ))
    }

    async fn list_leases(
        &self,
        _: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let leases = self
            .store
            .list_leases()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ListLeasesResponse { leases }))
    }
}

/// Connects to the admin socket of a running coordinator.
pub async fn connect(
    socket: &std::path::Path,
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(pb::admin_client::AdminClient::new(channel(socket).await?))
}

/// A gRPC channel to the admin socket (for Admin, or its reflection).
pub async fn channel(
    socket: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://admin.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}
