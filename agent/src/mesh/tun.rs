//! The TUN device: the kernel side of the mesh interface. IP packets the
//! host routes to the interface are read here, and packets decrypted from
//! peers are written here. Linux only (`/dev/net/tun`, `TUNSETIFF`).
//!
//! Opened with offloads where the kernel allows (`IFF_VNET_HDR` and
//! `TUNSETOFFLOAD` with checksum and TCP segmentation offload): every read
//! and write then starts with a virtio-net header, reads may be TCP
//! super-packets of up to 64 KiB with a partial checksum, and writes may be
//! too (see `offload`). Where the ioctl is refused the device is plain:
//! one finished IP packet per read and write.

use std::{
    fs::File,
    io::{self, IoSlice, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// Longest interface name the kernel takes (IFNAMSIZ minus the NUL).
pub const MAX_NAME: usize = 15;

/// Why a TUN device could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("interface name `{0}` is empty, longer than 15 bytes or has a `/` or whitespace")]
    BadName(String),
    #[error("/dev/net/tun: {0} (is the tun module loaded? the agent needs CAP_NET_ADMIN)")]
    Open(io::Error),
    #[error("creating TUN interface {name}: {source}")]
    Create { name: String, source: io::Error },
}

/// An open TUN interface (no packet-info header).
pub struct Tun {
    file: AsyncFd<File>,
    name: String,
    offload: bool,
}

/// Opens `/dev/net/tun` and creates interface `name` (blocking; no
/// runtime needed): the descriptor, and the name the kernel gave it.
pub fn open(name: &str) -> Result<(File, String), TunError> {
    open_with(name, false)
}

/// As [`open`], with a virtio-net header on every read and write if
/// `vnet_hdr`.
fn open_with(name: &str, vnet_hdr: bool) -> Result<(File, String), TunError> {
    if !valid_name(name) {
        return Err(TunError::BadName(name.to_owned()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TunError::Open)?;
    // struct ifreq: a 16-byte name, then the flags.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    req[16..18].copy_from_slice(&(flags as i16).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is sized for.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
    if r < 0 {
        return Err(TunError::Create {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    let end = req[..16].iter().position(|&b| b == 0).unwrap_or(16);
    Ok((file, String::from_utf8_lossy(&req[..end]).into_owned()))
}

/// A TUN device opened but not yet handed to the runtime: the interface
/// lives in the network namespace of the thread that opened it, wherever
/// the descriptor is used afterwards.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub name: String,
    pub offload: bool,
}

/// Opens interface `name` with offloads if the kernel takes them, plain if
/// not (blocking; no runtime needed, so it can run on a thread that has
/// entered another network namespace).
pub fn open_best(name: &str) -> Result<Opened, TunError> {
    if let Ok((file, actual)) = open_with(name, true) {
        if offer_offloads(&file) {
            return Ok(Opened {
                file,
                name: actual,
                offload: true,
            });
        }
        // Closing it removes the interface, so the name is free again.
        drop(file);
    }
    let (file, name) = open(name)?;
    Ok(Opened {
        file,
        name,
        offload: false,
    })
}

/// Offers the kernel checksum and TCP segmentation offload on a TUN opened
/// with a virtio-net header; false if it refuses.
fn offer_offloads(file: &File) -> bool {
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offloads as libc::c_ulong,
        ) == 0
    }
}

/// Whether the kernel would take `name` (and it names no other directory).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.contains('/')
        && !name.contains(char::is_whitespace)
}

impl Tun {
    /// Creates (or attaches to) the interface `name`; a `%d` in the name
    /// lets the kernel pick a number. The interface goes away when this is
    /// dropped (it is not made persistent). Needs a tokio runtime. With
    /// offloads if the kernel takes them (see [`Tun::offload`]), plain if not.
    pub fn create(name: &str) -> Result<Tun, TunError> {
        let opened = open_best(name)?;
        Tun::from_opened(opened)
    }

    /// A device [`open_best`] opened (perhaps in another network
    /// namespace), made ready for the runtime.
    pub fn from_opened(opened: Opened) -> Result<Tun, TunError> {
        Tun::from_file(opened.file, opened.name, opened.offload)
    }

    /// As [`Tun::create`], without offloads: one finished packet per read
    /// and write, no header.
    pub fn create_plain(name: &str) -> Result<Tun, TunError> {
        let (file, actual) = open(name)?;
        Tun::from_file(file, actual, false)
    }

    fn from_file(file: File, actual: String, offload: bool) -> Result<Tun, TunError> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Tun {
            file: register(file).map_err(|source| TunError::Create {
                name: actual.clone(),
                source,
            })?,
            name: actual,
            offload,
        })
    }

    /// The interface's name as the kernel made it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether offloads are on: every read and write starts with a
    /// virtio-net header (`offload::VnetHdr`), and reads may be TCP
    /// super-packets or carry partial checksums.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Reads one frame into `buf` (a virtio-net header first if
    /// [`Tun::offload`], then one IP packet); returns its length.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.file.readable().await?;
            match guard.try_io(|f| f.get_ref().read(buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one frame if one is waiting, without waiting for one.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.file
            .try_io(tokio::io::Interest::READABLE, |mut f| f.read(buf))
    }

    /// Writes one frame (a virtio-net header first if [`Tun::offload`]).
    pub async fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.send_vectored(&[IoSlice::new(frame)]).await
    }

    /// Writes one frame gathered from `parts` (one `writev`).
    pub async fn send_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            let mut guard = self.file.writable().await?;
            match guard.try_io(|f| f.get_ref().write_vectored(parts)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// A second handle on the same queue (for a reader and a writer task).
    pub fn try_clone(&self) -> io::Result<Tun> {
        // SAFETY: dup of a descriptor we own; the new one is owned by the result.
        let fd = unsafe { libc::dup(self.file.get_ref().as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by dup and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Tun {
            file: register(file)?,
            name: self.name.clone(),
            offload: self.offload,
        })
    }
}

/// Registers a file we own with the reactor.
fn register(file: File) -> io::Result<AsyncFd<File>> {
    // SAFETY: the `File` owns its descriptor for the whole life of the
    // `AsyncFd`, which never replaces it.
    unsafe { AsyncFd::register(file) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("wg0") && valid_name("warden%d") && valid_name("a23456789012345"));
        assert!(
            !valid_name("")
                && !valid_name("a234567890123456")
                && !valid_name("a/b")
                && !valid_name("a b")
        );
        assert!(matches!(Tun::create("bad/name"), Err(TunError::BadName(_))));
    }

    /// In a network namespace of its own (this thread only), a packet sent
    /// to an address routed to the interface comes out of `recv`: with
    /// offloads, after a virtio-net header, its UDP checksum left for us to
    /// finish; plain, as it is.
    #[test]
    fn packets_routed_to_the_interface_are_read() {
        for offload in [true, false] {
            let t = std::thread::spawn(move || read_one_packet(offload));
            t.join().unwrap().unwrap();
        }
    }

    fn read_one_packet(offload: bool) -> Result<(), String> {
        use crate::mesh::{checksum, offload as off};
        // SAFETY: moves only this thread into a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", io::Error::last_os_error()));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tun = if offload {
                Tun::create("wtest%d")
            } else {
                Tun::create_plain("wtest%d")
            }
            .map_err(|e| e.to_string())?;
            assert_eq!(tun.offload(), offload, "this kernel takes the offloads");
            let name = tun.name().to_owned();
            assert!(name.starts_with("wtest"), "{name}");
            // Configured with ioctls: they act in this thread's namespace.
            up_with_address(&name, [10, 99, 0, 1]).map_err(|e| e.to_string())?;
            let sock = std::net::UdpSocket::bind("10.99.0.1:0").map_err(|e| e.to_string())?;
            sock.send_to(b"hello", "10.99.0.2:9")
                .map_err(|e| e.to_string())?;
            let at = if offload { off::VNET_HDR_LEN } else { 0 };
            let mut buf = [0u8; 2048];
            // The kernel may send its own IPv6 chatter first; wait for ours.
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    let n = tun.recv(&mut buf).await?;
                    if buf[at] >> 4 == 4 {
                        return Ok::<_, io::Error>(n);
                    }
                }
            })
            .await
            .map_err(|_| "no packet on the TUN".to_owned())?
            .map_err(|e| e.to_string())?;
            let mut p = buf[at..n].to_vec();
            if offload {
                let hdr = off::VnetHdr::parse(&buf).unwrap();
                assert_eq!(hdr.gso_type, off::GSO_NONE);
                let mut out = Vec::new();
                off::split(&hdr, &mut p, |q| out.push(q.to_vec())).unwrap();
                p = out.remove(0);
            }
            assert_eq!(&p[16..20], &[10, 99, 0, 2], "destination");
            assert_eq!(p[9], 17, "UDP");
            assert!(p.ends_with(b"hello"));
            assert!(checksum::transport_valid(&p, 20, 17), "UDP checksum");
            Ok(())
        })
    }

    /// Sets an IPv4 address (/24) and brings the interface up with ioctls,
    /// in the calling thread's network namespace.
    fn up_with_address(name: &str, addr: [u8; 4]) -> io::Result<()> {
        // SAFETY: plain ioctls on a datagram socket with ifreq-sized buffers.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if s < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut req = [0u8; 40];
            req[..name.len()].copy_from_slice(name.as_bytes());
            // struct sockaddr_in at offset 16: family, port, address.
            req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            req[20..24].copy_from_slice(&addr);
            if libc::ioctl(s, libc::SIOCSIFADDR, req.as_mut_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            req[20..24].copy_from_slice(&[255, 255, 255, 0]);
            if libc::ioctl(s, libc::SIOCSIFNETMASK, req.as_mut_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut flags = [0u8; 40];
            flags[..name.len()].copy_from_slice(name.as_bytes());
            if libc::ioctl(s, libc::SIOCGIFFLAGS, flags.as_mut_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            let f = i16::from_ne_bytes([flags[16], flags[17]])
                | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
            flags[16..18].copy_from_slice(&f.to_ne_bytes());
            if libc::ioctl(s, libc::SIOCSIFFLAGS, flags.as_mut_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(s);
        }
        Ok(())
    }
}
