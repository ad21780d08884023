//! The mesh interface's IPv4 address, MTU and up flag, set with the
//! classic `SIOCSIF*` ioctls so the agent needs no `ip` binary. Setting an
//! address with its prefix also gives the kernel the route to the mesh.

use std::{io, net::Ipv4Addr, os::fd::AsRawFd};

/// Why the interface could not be configured.
#[derive(Debug, thiserror::Error)]
#[error("interface {name}: {what}: {source}")]
pub struct IfError {
    pub name: String,
    pub what: &'static str,
    pub source: io::Error,
}

/// WireGuard's overhead over UDP/IPv4 is 60 bytes and 80 over IPv6; 1420
/// keeps every encrypted packet within a 1500-byte path, as `wg-quick` does.
pub const DEFAULT_MTU: u32 = 1420;

/// An ifreq: 16 bytes of name, then a 24-byte union.
fn ifreq(name: &str) -> [u8; 40] {
    let mut r = [0u8; 40];
    let n = name.len().min(15);
    r[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn sockaddr_in(addr: Ipv4Addr) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&addr.octets());
    s
}

/// The netmask of a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

/// Sets `addr/prefix`, the MTU, and brings the interface up.
pub fn configure(name: &str, addr: Ipv4Addr, prefix: u8, mtu: u32) -> Result<(), IfError> {
    let ctl = Ctl::open(name)?;
    ctl.ioctl(libc::SIOCSIFADDR, "setting its address", |r| {
        r[16..32].copy_from_slice(&sockaddr_in(addr))
    })?;
    ctl.ioctl(libc::SIOCSIFNETMASK, "setting its netmask", |r| {
        r[16..32].copy_from_slice(&sockaddr_in(netmask(prefix)))
    })?;
    ctl.mtu_and_up(mtu)
}

/// Sets the MTU and brings the interface up, leaving its addresses alone
/// (`warden mesh up`: the user adds those, as for wireguard-go).
pub fn set_mtu_and_up(name: &str, mtu: u32) -> Result<(), IfError> {
    Ctl::open(name)?.mtu_and_up(mtu)
}

/// A socket to aim `SIOCSIF*` ioctls at one interface through.
struct Ctl<'a> {
    name: &'a str,
    sock: std::net::UdpSocket,
}

impl<'a> Ctl<'a> {
    fn open(name: &'a str) -> Result<Self, IfError> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|source| IfError {
            name: name.to_owned(),
            what: "control socket",
            source,
        })?;
        Ok(Ctl { name, sock })
    }

    /// Runs request `req` on an ifreq naming the interface, filled by
    /// `fill`; the ifreq as the kernel left it.
    fn ioctl(
        &self,
        req: libc::c_ulong,
        what: &'static str,
        fill: impl FnOnce(&mut [u8; 40]),
    ) -> Result<[u8; 40], IfError> {
        let mut r = ifreq(self.name);
        fill(&mut r);
        // SAFETY: each SIOC*IF* request reads or writes one ifreq, which `r` is.
        if unsafe { libc::ioctl(self.sock.as_raw_fd(), req as _, r.as_mut_ptr()) } < 0 {
            return Err(IfError {
                name: self.name.to_owned(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(r)
    }

    fn mtu_and_up(&self, mtu: u32) -> Result<(), IfError> {
        self.ioctl(libc::SIOCSIFMTU, "setting its MTU", |r| {
            r[16..20].copy_from_slice(&(mtu as i32).to_ne_bytes())
        })?;
        let r = self.ioctl(libc::SIOCGIFFLAGS, "reading its flags", |_| {})?;
        let flags = i16::from_ne_bytes([r[16], r[17]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        self.ioctl(libc::SIOCSIFFLAGS, "bringing it up", |r| {
            r[16..18].copy_from_slice(&flags.to_ne_bytes())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
