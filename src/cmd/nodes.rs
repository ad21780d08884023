//! `warden nodes`: the nodes a running coordinator knows.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::admin::admin_client;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// The coordinator's admin socket [default: the coordinator config's,
    /// else /var/lib/warden-coordinator/admin.sock].
    #[arg(long, env = "WARDEN_ADMIN_SOCKET")]
    socket: Option<PathBuf>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        nodes(self.json, self.socket).await
    }
}

async fn nodes(json: bool, socket: Option<PathBuf>) -> Result<()> {
    let mut client = admin_client(socket).await?;
    let nodes = client
        .list_nodes(warden_proto::pb::ListNodesRequest {})
        .await
        .context("listing nodes")?
        .into_inner()
        .nodes;
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    if nodes.is_empty() {
        println!("no nodes yet");
        return Ok(());
    }
    println!(
        "{:<34} {:<16} {:<10} {:>5} {:<10} {:<12} {:>9} {:>8}  last seen",
        "NODE", "HOST", "STATE", "GPUS", "TIER", "REGION", "RECORDS", "LAST SEQ"
    );
    let now = warden_agent::now_ms();
    for n in nodes {
        let labels = n.labels.clone().unwrap_or_default();
        let region = match (labels.region.as_str(), labels.country.as_str()) {
            ("", "") => "-".to_owned(),
            (r, "") => r.to_owned(),
            ("", c) => c.to_owned(),
            (r, c) => format!("{r}/{c}"),
        };
        println!(
            "{:<34} {:<16} {:<10} {:>5} {:<10} {:<12} {:>9} {:>8}  {}s ago{}{}{}",
            n.node_id,
            n.hostname,
            if n.connected { "connected" } else { "offline" },
            n.inventory.as_ref().map_or(0, |i| i.gpus.len()),
            n.tier,
            region,
            n.records,
            n.last_seq,
            (now - n.last_seen_unix_ms).max(0) / 1000,
            match &n.spool {
                Some(s) if s.full => format!("  SPOOL FULL ({} records refused)", s.refused),
                Some(s) if s.shedding => format!("  SHEDDING TELEMETRY ({} shed)", s.shed),
                _ => String::new(),
            },
            match n.gpus.iter().filter(|g| g.lost).count() {
                0 => String::new(),
                lost => format!("  {lost} GPU(s) LOST"),
            },
            if labels.tags.is_empty() {
                String::new()
            } else {
                format!("  tags: {}", labels.tags.join(","))
            }
        );
    }
    Ok(())
}
