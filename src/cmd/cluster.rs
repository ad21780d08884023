//! `warden cluster`: nodes grouped into a cluster joined by a WireGuard
//! mesh, through the coordinator's admin socket.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::admin::{admin_client, refused};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ClusterCommand,
    /// The coordinator's admin socket [default: /var/lib/warden-coordinator/admin.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        cluster(self.command, self.socket).await
    }
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create a cluster or set its members; waits for them to apply their mesh.
    Set {
        cluster_id: String,
        /// Node ids: the members after this call.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// IPv4 prefix of mesh addresses [default: 10.90.0.0/24 for a new cluster].
        #[arg(long)]
        subnet: Option<String>,
        /// Seconds to wait for the members' answers.
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        #[arg(long)]
        json: bool,
    },
    /// Take every member out of the mesh and forget the cluster.
    Delete {
        cluster_id: String,
        #[arg(long, default_value_t = 30)]
        timeout: u32,
    },
    /// Clusters, their members, addresses and states.
    List {
        #[arg(long)]
        json: bool,
    },
}

async fn cluster(command: ClusterCommand, socket: Option<PathBuf>) -> Result<()> {
    use warden_proto::pb;
    let mut client = admin_client(socket).await?;
    let print = |c: &pb::ClusterInfo, json: bool| -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(c)?);
            return Ok(());
        }
        println!(
            "cluster {}  subnet {}  generation {}",
            c.cluster_id, c.subnet, c.generation
        );
        for m in &c.members {
            println!(
                "  {}  {:<16} {:<8} {}",
                m.node_id, m.address, m.state, m.error
            );
        }
        Ok(())
    };
    match command {
        ClusterCommand::Set {
            cluster_id,
            nodes,
            subnet,
            timeout,
            json,
        } => {
            let started = std::time::Instant::now();
            let c = client
                .set_cluster(pb::SetClusterRequest {
                    cluster_id,
                    node_ids: nodes,
                    subnet: subnet.unwrap_or_default(),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print(&c, json)?;
            if !json {
                let applied = c.members.iter().filter(|m| m.state == "applied").count();
                println!(
                    "{applied} of {} member(s) applied it in {:.2} s",
                    c.members.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        ClusterCommand::Delete {
            cluster_id,
            timeout,
        } => {
            let c = client
                .delete_cluster(pb::DeleteClusterRequest {
                    cluster_id,
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print(&c, false)?;
        }
        ClusterCommand::List { json } => {
            let list = client
                .list_clusters(pb::ListClustersRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .clusters;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no clusters");
            } else {
                for c in &list {
                    print(c, false)?;
                }
            }
        }
    }
    Ok(())
}
