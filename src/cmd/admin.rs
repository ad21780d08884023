//! What the commands that talk to a coordinator share: its admin socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::settings::load_coordinator_config;

/// The admin client.
pub type Client = warden_proto::pb::admin_client::AdminClient<tonic::transport::Channel>;

/// A client of the coordinator's admin socket: `socket`, or the one the
/// coordinator's config names, or the default.
pub async fn admin_client(socket: Option<PathBuf>) -> Result<Client> {
    let socket = socket.unwrap_or_else(|| {
        load_coordinator_config(None)
            .map(|c| c.admin_socket_path())
            .unwrap_or_else(|_| {
                Path::new(warden_coordinator::config::DEFAULT_STATE_DIR).join("admin.sock")
            })
    });
    warden_coordinator::admin::connect(&socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the coordinator admin socket {}",
                socket.display()
            )
        })
}

/// An admin call refused: the node's (or coordinator's) own words, not
/// gRPC's framing, reach the terminal.
pub fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Every lease the coordinator knows.
pub async fn leases(client: &mut Client) -> Result<Vec<warden_proto::pb::LeaseInfo>> {
    Ok(client
        .list_leases(warden_proto::pb::ListLeasesRequest {})
        .await
        .map_err(refused)?
        .into_inner()
        .leases)
}

/// One lease, or an error naming it.
pub async fn lease_named(client: &mut Client, id: &str) -> Result<warden_proto::pb::LeaseInfo> {
    leases(client)
        .await?
        .into_iter()
        .find(|l| l.lease_id == id)
        .with_context(|| format!("no lease {id}"))
}

/// Every cluster the coordinator knows.
pub async fn clusters(client: &mut Client) -> Result<Vec<warden_proto::pb::ClusterInfo>> {
    Ok(client
        .list_clusters(warden_proto::pb::ListClustersRequest {})
        .await
        .map_err(refused)?
        .into_inner()
        .clusters)
}

/// One cluster, or an error naming it.
pub async fn cluster_named(client: &mut Client, id: &str) -> Result<warden_proto::pb::ClusterInfo> {
    clusters(client)
        .await?
        .into_iter()
        .find(|c| c.cluster_id == id)
        .with_context(|| format!("no cluster {id}"))
}
