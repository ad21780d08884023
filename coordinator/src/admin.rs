//! The Admin gRPC service, served only on a unix socket with mode 0600:
//! whoever can open it administers the coordinator.

use tonic::{Request, Response, Status};
use warden_proto::pb;

use crate::{session::Registry, store::Store};

pub struct AdminService {
    store: Store,
    registry: Registry,
}

impl AdminService {
    pub fn new(store: Store, registry: Registry) -> Self {
        Self { store, registry }
    }
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
            .map(|n| pb::NodeInfo {
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
                link: n
                    .link
                    .as_deref()
                    .and_then(|b| prost::Message::decode(b).ok()),
                gpus: n
                    .gpus
                    .iter()
                    .filter_map(|b| prost::Message::decode(b.as_slice()).ok())
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }
}

/// Connects to the admin socket of a running coordinator.
pub async fn connect(
    socket: &std::path::Path,
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
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
    Ok(pb::admin_client::AdminClient::new(channel))
}
