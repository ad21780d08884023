//! Round-trip time to each mesh peer: an ICMP echo to the peer's mesh
//! address, through the tunnel, answered by the peer's kernel, so it works
//! with any WireGuard peer (wireguard-go, the kernel module) and measures
//! the path renters' traffic takes. The packet format is pure; the raw
//! socket (root, or CAP_NET_RAW) is the edge.

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// The ICMP checksum: the Internet checksum of the whole message.
fn checksum(data: &[u8]) -> u16 {
    super::checksum::checksum(data, 0)
}

/// An ICMP echo request (without IP header: the kernel adds it).
pub fn echo_request(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + payload.len());
    p.extend_from_slice(&[ECHO_REQUEST, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// An echo reply as a raw IPv4 socket reads it (IP header first): its
/// source, id and sequence; `None` for anything else or a bad checksum.
pub fn parse_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let src = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    if icmp.len() < 8 || icmp[0] != ECHO_REPLY || icmp[1] != 0 || checksum(icmp) != 0 {
        return None;
    }
    Some((
        src,
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

/// A raw ICMP socket, in the network namespace of the calling thread (no
/// runtime needed).
pub fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket(2); the descriptor is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw ICMP socket that pings mesh addresses.
pub struct Pinger {
    fd: AsyncFd<OwnedFd>,
    id: u16,
    seq: u16,
}

impl Pinger {
    /// Opens the raw socket (needs root or CAP_NET_RAW, and a runtime).
    pub fn open() -> io::Result<Pinger> {
        Pinger::from_socket(raw_socket()?)
    }

    /// A pinger on a socket [`raw_socket`] made (perhaps in another network
    /// namespace: it pings from there). Needs a runtime.
    pub fn from_socket(fd: OwnedFd) -> io::Result<Pinger> {
        // SAFETY: the `OwnedFd` owns its descriptor for the whole life of
        // the `AsyncFd`, which never replaces it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Pinger {
            fd,
            id: rand::random(),
            seq: 0,
        })
    }

    fn send(&self, to: Ipv4Addr, packet: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
        // SAFETY: the buffer and address outlive the call; lengths are theirs.
        let r = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Pings every target once and waits up to `timeout` for the replies:
    /// the round trip of each target that answered.
    pub async fn round<K: Copy + Eq + std::hash::Hash>(
        &mut self,
        targets: &[(K, Ipv4Addr)],
        timeout: Duration,
    ) -> HashMap<K, Duration> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut waiting: HashMap<Ipv4Addr, (K, Instant)> = HashMap::new();
        for (k, addr) in targets {
            let sent = Instant::now();
            // A peer with no route or session yet: no answer, no RTT.
            if self
                .send(*addr, &echo_request(self.id, seq, b"warden-rtt"))
                .is_ok()
            {
                waiting.insert(*addr, (*k, sent));
            }
        }
        let mut out = HashMap::new();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        while !waiting.is_empty() {
            let ready = tokio::time::timeout_at(deadline, self.fd.readable()).await;
            let Ok(Ok(mut guard)) = ready else {
                break;
            };
            let fd = self.fd.get_ref().as_raw_fd();
            let n = match guard.try_io(|_| {
                // SAFETY: reading into a buffer we own, within its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            };
            if let Some((src, id, s)) = parse_reply(&buf[..n]) {
                if id == self.id && s == seq {
                    if let Some((k, sent)) = waiting.remove(&src) {
                        out.insert(k, sent.elapsed());
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo reply wrapped in a minimal IPv4 header, as the kernel would.
    fn reply_from(src: [u8; 4], request: &[u8]) -> Vec<u8> {
        let mut icmp = request.to_vec();
        icmp[0] = ECHO_REPLY;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[10, 90, 0, 1]);
        ip.extend_from_slice(&icmp);
        ip
    }

    #[test]
    fn checksums_match_rfc_1071() {
        // The example of RFC 1071 section 3: words summing to 0xddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        // A packet with its checksum in place sums to zero.
        let p = echo_request(0x1234, 7, b"odd");
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[..2], &[8, 0]);
    }

    #[test]
    fn replies_are_matched_and_anything_else_is_not() {
        let req = echo_request(42, 9, b"warden-rtt");
        let rep = reply_from([10, 90, 0, 2], &req);
        assert_eq!(
            parse_reply(&rep),
            Some((Ipv4Addr::new(10, 90, 0, 2), 42, 9))
        );
        let mut bad = rep.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(parse_reply(&bad), None, "a corrupt payload");
        let mut request = rep.clone();
        request[20] = ECHO_REQUEST;
        assert_eq!(parse_reply(&request), None, "not a reply");
        assert_eq!(parse_reply(&rep[..25]), None, "truncated");
        assert_eq!(parse_reply(&[0x60; 48]), None, "IPv6");
        assert_eq!(parse_reply(&[]), None);
    }

    /// Needs root (a raw socket): pings the loopback address. (Unanswered
    /// pings are covered by tests/cluster.rs, inside its own namespaces.)
    #[tokio::test]
    async fn loopback_answers_a_ping() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a raw socket needs root");
            return;
        }
        let mut p = Pinger::open().expect("root opens a raw ICMP socket");
        let got = p
            .round(&[(1u8, Ipv4Addr::LOCALHOST)], Duration::from_secs(2))
            .await;
        assert!(got.contains_key(&1), "{got:?}");
    }
}
