//! `warden image load`: images for suppliers without a registry.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::settings::load_agent_config;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Load an image archive (`docker save` format) into this node's Docker,
    /// for suppliers without a registry.
    Load {
        archive: PathBuf,
        /// Docker's socket [default: the agent config's workload.docker_socket].
        #[arg(long)]
        docker_socket: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

impl ImageCommand {
    pub async fn run(self) -> Result<()> {
        let ImageCommand::Load {
            archive,
            docker_socket,
            config,
        } = self;
        image_load(archive, docker_socket, config).await
    }
}

async fn image_load(
    archive: PathBuf,
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => load_agent_config(config)?.workload.docker_socket,
    };
    let docker = warden_agent::workloads::docker::Docker::connect(&socket).await?;
    let loaded = docker.load_image(&archive).await?;
    for name in loaded {
        println!("loaded {name}");
    }
    Ok(())
}
