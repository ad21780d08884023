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
    ifaddr::{self, IfError},
    tun::{Tun, TunError},
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error("socket {} in use by a running warden mesh up / wireguard-go: interface {name} is already up; stop that one first or pick another name", path.display())]
    InUse { path: PathBuf, name: String },
    #[error("UAPI socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: SocketError },
    #[error(transparent)]
    Link(#[from] IfError),
}

impl StandaloneError {
    fn socket(path: &Path, name: &str, source: SocketError) -> Self {
        match source {
            SocketError::InUse { .. } => StandaloneError::InUse {
                path: path.to_owned(),
                name: name.to_owned(),
            },
            source => StandaloneError::Socket {
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// The interface, made, bound, up with its MTU, not yet running.
pub struct Standalone {
    tun: Tun,
    path: PathBuf,
    listener: UnixListener,
    socket_file: SocketFile,
    mtu: u32,
}

impl Standalone {
    /// Makes the TUN device (`offload`: with TCP segmentation offload,
    /// else one packet per read and write), binds its UAPI socket in
    /// `socket_dir`, sets the MTU and brings the link up. A live socket for
    /// the name (another `warden mesh up` or wireguard-go, perhaps in another
    /// network namespace) is refused and left alone; a stale one is replaced.
    pub fn open(
        ifname: &str,
        socket_dir: &Path,
        offload: bool,
        mtu: u32,
    ) -> Result<Self, StandaloneError> {
        // Asked before the TUN is made, so that a name taken in this
        // namespace is reported as the socket in use, not as EBUSY.
        if super::tun::valid_name(ifname) && !ifname.contains('%') {
            let path = control::socket_path(socket_dir, ifname);
            warden_state::socket::remove_stale(&path)
                .map_err(|e| StandaloneError::socket(&path, ifname, e))?;
        }
        let tun = if offload {
            Tun::create(ifname)?
        } else {
            Tun::create_plain(ifname)?
        };
        let path = control::socket_path(socket_dir, tun.name());
        let (listener, socket_file) =
            control::bind(&path).map_err(|e| StandaloneError::socket(&path, tun.name(), e))?;
        ifaddr::set_mtu_and_up(tun.name(), mtu)?;
        Ok(Standalone {
            tun,
            path,
            listener,
            socket_file,
            mtu,
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

    pub fn mtu(&self) -> u32 {
        self.mtu
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
