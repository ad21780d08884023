//! `warden mesh up`: a userspace WireGuard interface on its own, driven by
//! stock `wg`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use warden_agent::mesh::standalone::Standalone;

use crate::signals::shutdown_on_signal;

#[derive(Subcommand)]
pub enum MeshCommand {
    /// Run interface IFNAME in the foreground, driven by stock `wg` through
    /// /var/run/wireguard/IFNAME.sock, until SIGINT or SIGTERM.
    Up {
        ifname: String,
        /// Where the UAPI socket goes.
        #[arg(long, default_value = warden_agent::mesh::control::SOCKET_DIR)]
        socket_dir: PathBuf,
        /// A plain TUN device: one packet per read and write, no TCP
        /// segmentation offload (the fallback the kernel may force anyway).
        #[arg(long)]
        no_offload: bool,
    },
}

impl MeshCommand {
    pub async fn run(self) -> Result<()> {
        let MeshCommand::Up {
            ifname,
            socket_dir,
            no_offload,
        } = self;
        let iface = Standalone::open(&ifname, &socket_dir, !no_offload)?;
        eprintln!(
            "interface {} is up{}; configure it with `wg set {} …` (UAPI socket {})",
            iface.name(),
            if iface.offload() {
                " with TCP segmentation offload"
            } else {
                ""
            },
            iface.name(),
            iface.socket_path().display()
        );
        iface.run(shutdown_on_signal()).await;
        Ok(())
    }
}
