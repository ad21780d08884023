//! A mesh interface on its own (`warden mesh up`): a TUN device and its
//! UAPI socket, driven by stock `wg` — no agent, no coordinator.

use std::{
    net::Ipv6Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use warden_state::socket::{SocketError, SocketFile};

use super::{
    control,
    device::Device,
    tun::{Tun, TunError},
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error("UAPI socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: SocketError },
}

/// The interface, made and bound, not yet running.
pub struct Standalone {
    tun: Tun,
    path: PathBuf,
    listener: UnixListener,
    socket_file: SocketFile,
}

impl Standalone {
    /// Makes the TUN device (`offload`: with TCP segmentation offload,
    /// else one packet per read and write) and binds its UAPI socket in
    /// `socket_dir`.
    pub fn open(ifname: &str, socket_dir: &Path, offload: bool) -> Result<Self, StandaloneError> {
        let tun = if offload {
            Tun::create(ifname)?
        } else {
            Tun::create_plain(ifname)?
        };
        let path = control::socket_path(socket_dir, tun.name());
        let (listener, socket_file) =
            control::bind(&path).map_err(|source| StandaloneError::Socket {
                path: path.clone(),
                source,
            })?;
        Ok(Standalone {
            tun,
            path,
            listener,
            socket_file,
        })
    }

    pub fn name(&self) -> &str {
        self.tun.name()
    }

    /// Whether the kernel granted segmentation offload.
    pub fn offload(&self) -> bool {
        self.tun.offload()
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Runs the interface and answers `wg` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        // Dual-stack: IPv4 peers arrive as mapped addresses.
        let dev = Arc::new(Device::new(Ipv6Addr::UNSPECIFIED.into()));
        let control = tokio::spawn(control::serve(
            self.listener,
            self.socket_file,
            dev.clone(),
            shutdown.clone(),
        ));
        dev.run(self.tun, shutdown).await;
        let _ = control.await;
    }
}
