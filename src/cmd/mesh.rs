//! `warden mesh up`: a userspace WireGuard interface on its own, driven by
//! stock `wg`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use warden_agent::mesh::{ifaddr::DEFAULT_MTU, standalone::Standalone};

use crate::signals::shutdown_on_signal;

#[derive(Subcommand)]
pub enum MeshCommand {
    /// Run interface IFNAME in the foreground, up with its MTU, driven by
    /// stock `wg` through /var/run/wireguard/IFNAME.sock, until SIGINT or
    /// SIGTERM. Refused while another warden mesh up or wireguard-go serves
    /// that socket.
    Up {
        ifname: String,
        /// Where the UAPI socket goes.
        #[arg(long, default_value = warden_agent::mesh::control::SOCKET_DIR)]
        socket_dir: PathBuf,
        /// The interface's MTU; 1420, as wireguard-go's, keeps encrypted
        /// packets within a 1500-byte path over IPv4 or IPv6.
        #[arg(long, default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u32).range(576..=65535))]
        mtu: u32,
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
            mtu,
            no_offload,
        } = self;
        let iface = Standalone::open(&ifname, &socket_dir, !no_offload, mtu)?;
        eprintln!("{}", ready_message(&iface));
        iface.run(shutdown_on_signal()).await;
        Ok(())
    }
}

/// What the interface is now and what is left for the user to do.
fn ready_message(iface: &Standalone) -> String {
    let name = iface.name();
    format!(
        "interface {name} is up, MTU {mtu}{offload}, UAPI socket {sock}; it has no address, key or \
         peers yet:\n  ip addr add ADDRESS/PREFIX dev {name}\n  wg setconf {name} FILE   \
         (or wg set {name} private-key KEYFILE listen-port PORT peer …)",
        mtu = iface.mtu(),
        offload = if iface.offload() {
            ", TCP segmentation offload"
        } else {
            ""
        },
        sock = iface.socket_path().display(),
    )
}
