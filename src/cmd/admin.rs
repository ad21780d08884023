//! What the commands that talk to a coordinator share: its admin socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::settings::load_coordinator_config;

/// A client of the coordinator's admin socket: `socket`, or the one the
/// coordinator's config names, or the default.
pub async fn admin_client(
    socket: Option<PathBuf>,
) -> Result<warden_proto::pb::admin_client::AdminClient<tonic::transport::Channel>> {
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
