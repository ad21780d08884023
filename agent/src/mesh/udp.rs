//! The mesh's UDP socket, moving many datagrams per syscall: `sendmmsg`
//! with UDP GSO (`UDP_SEGMENT`: a run of equal-sized datagrams to one peer
//! goes down the stack as one buffer), and `recvmmsg` with UDP GRO
//! (`UDP_GRO`: the kernel hands up a run of datagrams from one sender as
//! one buffer and says the segment size). Both fall back to one datagram
//! per message where the kernel refuses them.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    ops::Range,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::io::Interest;

/// Most messages per `sendmmsg`/`recvmmsg`.
const MAX_MSGS: usize = 64;

/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64
/// on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;

/// Most payload bytes in one GSO send: the IP length field, less the IPv6
/// and UDP headers.
const MAX_GSO_BYTES: usize = 65_535 - 40 - 8;

/// Room per received message: a GRO run is at most 64 KiB.
pub const RECV_SLOT: usize = 65_536;

/// Socket buffers asked for, so bursts of 64 KiB runs are not dropped
/// while a loop is busy (wireguard-go asks for 7 MiB too).
const SOCKET_BUFFER: libc::c_int = 7 << 20;

/// A bound UDP socket and what the kernel lets it do.
#[derive(Debug)]
pub struct Socket {
    sock: tokio::net::UdpSocket,
    /// Segmentation offload on send; cleared for good on the first refusal.
    gso: AtomicBool,
    /// The kernel joins received runs.
    gro: bool,
}

impl Socket {
    /// Binds `addr` and turns on what the kernel offers.
    pub async fn bind(addr: SocketAddr) -> io::Result<Socket> {
        let sock = tokio::net::UdpSocket::bind(addr).await?;
        let fd = sock.as_raw_fd();
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            // FORCE needs CAP_NET_ADMIN; without it the plain one is capped by
            // net.core.[rw]mem_max. Either way a smaller buffer only costs drops.
            if setsockopt(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = setsockopt(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        // A kernel that knows UDP_SEGMENT answers getsockopt for it.
        let gso = getsockopt(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok();
        let gro = setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        Ok(Socket {
            sock,
            gso: AtomicBool::new(gso),
            gro,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Whether sends still use segmentation offload.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Whether receives may come as joined runs.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Sends every datagram of `batch`, as few syscalls as the kernel
    /// allows. A datagram the kernel refuses (no route, too big) is
    /// skipped; the error ends the call only if the socket itself failed.
    pub async fn send(&self, batch: &SendBatch) -> io::Result<()> {
        let mut next = 0;
        // Datagrams before this one go one by one (a run the kernel refused).
        let mut plain_until = 0;
        while next < batch.datagrams.len() {
            self.sock.writable().await?;
            let gso = self.gso() && next >= plain_until;
            let r = self.sock.try_io(Interest::WRITABLE, || {
                sendmmsg(self.sock.as_raw_fd(), batch, next, gso)
            });
            let run = batch.run_len(next, gso);
            match r {
                Ok(sent) => next += sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The route's device cannot checksum a GSO run: one by one from now on.
                Err(e) if run > 1 && e.raw_os_error() == Some(libc::EIO) => {
                    self.gso.store(false, Ordering::Relaxed);
                }
                // This run the kernel would not segment (a segment above the
                // path MTU, too many): send it one by one, to be fragmented.
                Err(e)
                    if run > 1
                        && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EMSGSIZE)) =>
                {
                    plain_until = next + run;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => return Err(e),
                // The first message failed (its peer unreachable...): skip it.
                Err(_) => next += run,
            }
        }
        Ok(())
    }

    /// Receives what is waiting into `batch` (waiting for at least one
    /// message); returns how many messages.
    pub async fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            self.sock.readable().await?;
            let fd = self.sock.as_raw_fd();
            match self.sock.try_io(Interest::READABLE, || recvmmsg(fd, batch)) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Datagrams to send, laid end to end in one buffer in the order they are
/// to go.
#[derive(Debug, Default)]
pub struct SendBatch {
    buf: Vec<u8>,
    filled: usize,
    datagrams: Vec<(SocketAddr, Range<usize>)>,
}

impl SendBatch {
    /// An empty batch.
    pub fn new() -> SendBatch {
        SendBatch::default()
    }

    /// At least `room` bytes to write the next datagram into.
    pub fn spare(&mut self, room: usize) -> &mut [u8] {
        if self.buf.len() < self.filled + room {
            self.buf.resize(self.filled + room, 0);
        }
        &mut self.buf[self.filled..]
    }

    /// Adds the `len` bytes written at the start of [`SendBatch::spare`] as
    /// a datagram to `to`.
    pub fn commit(&mut self, to: SocketAddr, len: usize) {
        self.datagrams.push((to, self.filled..self.filled + len));
        self.filled += len;
    }

    /// Adds the datagram written at `at` within [`SendBatch::spare`] (moved
    /// to its start if it is not there).
    pub fn commit_at(&mut self, to: SocketAddr, at: Range<usize>) {
        if at.start != 0 {
            let base = self.filled;
            self.buf.copy_within(base + at.start..base + at.end, base);
        }
        self.commit(to, at.len());
    }

    /// Adds a copy of `datagram`.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.spare(datagram.len())[..datagram.len()].copy_from_slice(datagram);
        self.commit(to, datagram.len());
    }

    /// The datagrams queued, in order.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.datagrams
            .iter()
            .map(|(to, span)| (*to, &self.buf[span.clone()]))
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.filled
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Empties the batch, keeping its storage.
    pub fn clear(&mut self) {
        self.filled = 0;
        self.datagrams.clear();
    }

    /// How many datagrams from `first` one message carries: with GSO, the
    /// run to the same address of the same size (the last may be shorter),
    /// within the kernel's limits; else one.
    fn run_len(&self, first: usize, gso: bool) -> usize {
        let (to, span) = &self.datagrams[first];
        let size = span.len();
        if !gso || size == 0 {
            return 1;
        }
        let mut n = 1;
        let mut bytes = size;
        for (t, s) in &self.datagrams[first + 1..] {
            if t != to
                || s.len() > size
                || s.is_empty()
                || n == MAX_GSO_SEGMENTS
                || bytes + s.len() > MAX_GSO_BYTES
            {
                break;
            }
            n += 1;
            bytes += s.len();
            if s.len() < size {
                break; // a shorter one ends the run
            }
        }
        n
    }
}

/// Messages received by one [`Socket::recv`].
#[derive(Debug)]
pub struct RecvBatch {
    buf: Vec<u8>,
    msgs: Vec<Received>,
}

/// One received message: a datagram, or with GRO a run of datagrams of
/// `segment` bytes each (the last may be shorter) from one sender.
#[derive(Debug, Clone)]
struct Received {
    from: SocketAddr,
    len: usize,
    segment: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch::new()
    }
}

impl RecvBatch {
    /// Room for [`MAX_MSGS`] messages of up to 64 KiB.
    pub fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0; RECV_SLOT * MAX_MSGS / 4],
            msgs: Vec::with_capacity(MAX_MSGS / 4),
        }
    }

    fn slots(&self) -> usize {
        self.buf.len() / RECV_SLOT
    }

    /// Each datagram received, with its sender, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.msgs.iter().enumerate().flat_map(move |(i, m)| {
            let bytes = &self.buf[i * RECV_SLOT..i * RECV_SLOT + m.len];
            bytes.chunks(m.segment.max(1)).map(move |d| (m.from, d))
        })
    }
}

fn setsockopt(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option read into `value`, whose size `len` says.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Space for one `cmsghdr` carrying an int (UDP_SEGMENT takes a u16, UDP_GRO
/// gives an int), 8-byte aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Cmsg([u8; 32]);

/// One `sendmmsg` from datagram `first` on: returns how many datagrams went.
fn sendmmsg(fd: libc::c_int, batch: &SendBatch, first: usize, gso: bool) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; MAX_MSGS] = unsafe { zeroed() };
    let mut names: [libc::sockaddr_storage; MAX_MSGS] = unsafe { zeroed() };
    let mut cmsgs = [Cmsg([0; 32]); MAX_MSGS];
    let mut counts = [0usize; MAX_MSGS];
    let mut m = 0;
    let mut at = first;
    while m < MAX_MSGS && at < batch.datagrams.len() {
        let n = batch.run_len(at, gso);
        let (to, span) = &batch.datagrams[at];
        let end = batch.datagrams[at + n - 1].1.end;
        iovs[m] = libc::iovec {
            iov_base: batch.buf[span.start..end].as_ptr() as *mut libc::c_void,
            iov_len: end - span.start,
        };
        let name_len = write_sockaddr(to, &mut names[m]);
        let h = &mut hdrs[m].msg_hdr;
        h.msg_name = (&mut names[m] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = name_len;
        h.msg_iov = &mut iovs[m];
        h.msg_iovlen = 1;
        if n > 1 {
            // SAFETY: CMSG_* over a buffer of CMSG_SPACE(2) <= 32 bytes
            // that `msg_control` points at.
            unsafe {
                h.msg_control = cmsgs[m].0.as_mut_ptr().cast();
                h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                let size = span.len() as u16;
                std::ptr::copy_nonoverlapping(size.to_ne_bytes().as_ptr(), libc::CMSG_DATA(c), 2);
            }
        }
        counts[m] = n;
        at += n;
        m += 1;
    }
    // SAFETY: `hdrs[..m]` point at buffers that live until the call returns.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), m as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(counts[..r as usize].iter().sum())
}

/// One `recvmmsg` into `batch`'s slots, not waiting.
fn recvmmsg(fd: libc::c_int, batch: &mut RecvBatch) -> io::Result<usize> {
    let slots = batch.slots().min(MAX_MSGS);
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; MAX_MSGS] = unsafe { zeroed() };
    let mut names: [libc::sockaddr_storage; MAX_MSGS] = unsafe { zeroed() };
    let mut cmsgs = [Cmsg([0; 32]); MAX_MSGS];
    let base = batch.buf.as_mut_ptr();
    for i in 0..slots {
        iovs[i] = libc::iovec {
            // SAFETY: slot i lies within `buf` (slots * RECV_SLOT <= len).
            iov_base: unsafe { base.add(i * RECV_SLOT) }.cast(),
            iov_len: RECV_SLOT,
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
        h.msg_controllen = size_of::<Cmsg>() as _;
    }
    // SAFETY: `hdrs[..slots]` point at buffers that live until the call returns.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            slots as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    batch.msgs.clear();
    for i in 0..r as usize {
        let len = hdrs[i].msg_len as usize;
        let h = &hdrs[i].msg_hdr;
        // A truncated run would split wrongly: nothing of it is used.
        let truncated = h.msg_flags & libc::MSG_TRUNC != 0;
        let from = read_sockaddr(&names[i]).filter(|_| !truncated);
        let Some(from) = from else {
            batch.msgs.push(Received {
                from: SocketAddr::from(([0, 0, 0, 0], 0)),
                len: 0,
                segment: 0,
            });
            continue;
        };
        let mut segment = len;
        // SAFETY: walks the control messages the kernel wrote within
        // `msg_controllen` of the buffer `msg_control` points at.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let mut v = [0u8; 4];
                    std::ptr::copy_nonoverlapping(libc::CMSG_DATA(c), v.as_mut_ptr(), 4);
                    segment = i32::from_ne_bytes(v).max(1) as usize;
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        batch.msgs.push(Received { from, len, segment });
    }
    Ok(r as usize)
}

fn write_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn read_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `addr` as a dual-stack socket bound to `bind` must be given it: an IPv4
/// address mapped into IPv6 when the socket is IPv6.
pub fn for_socket(bind: IpAddr, addr: SocketAddr) -> SocketAddr {
    match (bind, addr) {
        (IpAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn batch(sizes: &[(u16, usize)]) -> SendBatch {
        let mut b = SendBatch::new();
        for &(port, len) in sizes {
            b.push(SocketAddr::from(([127, 0, 0, 1], port)), &vec![7; len]);
        }
        b
    }

    #[test]
    fn runs_are_equal_sized_datagrams_to_one_address() {
        let b = batch(&[(1, 100), (1, 100), (1, 60), (1, 100), (2, 100), (2, 120)]);
        assert_eq!(b.run_len(0, true), 3, "a shorter one ends a run");
        assert_eq!(b.run_len(3, true), 1, "another address ends a run");
        assert_eq!(b.run_len(4, true), 1, "a longer one starts a new run");
        assert_eq!(b.run_len(0, false), 1, "no GSO: one by one");
        let long = batch(&vec![(1, 1400); 100]);
        assert_eq!(long.run_len(0, true), MAX_GSO_BYTES / 1400);
        let many = batch(&vec![(1, 100); 100]);
        assert_eq!(many.run_len(0, true), MAX_GSO_SEGMENTS);
    }

    /// Over loopback: a batch of runs and odd sizes arrives whole and in
    /// order, with GSO and GRO on and with them off.
    #[tokio::test]
    async fn batches_arrive_whole_and_in_order() {
        for offload in [true, false] {
            let rx = Socket::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let tx = Socket::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            if !offload {
                tx.gso.store(false, Ordering::Relaxed);
            }
            assert!(rx.gro(), "this kernel joins UDP runs");
            let to = rx.local_addr().unwrap();
            let mut b = SendBatch::new();
            let mut sent = Vec::new();
            for i in 0..300u32 {
                let len = match i % 50 {
                    49 => 17,
                    _ => 1200,
                };
                let d: Vec<u8> = (0..len).map(|k| (k as u32 ^ i) as u8).collect();
                b.push(to, &d);
                sent.push(d);
            }
            tx.send(&b).await.unwrap();
            let mut got = Vec::new();
            let mut r = RecvBatch::new();
            while got.len() < sent.len() {
                let n = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv(&mut r))
                    .await
                    .expect("all datagrams arrive")
                    .unwrap();
                assert!(n > 0);
                for (from, d) in r.datagrams() {
                    assert_eq!(from, tx.local_addr().unwrap());
                    got.push(d.to_vec());
                }
            }
            assert_eq!(got, sent, "offload={offload}");
        }
    }

    /// Across a link whose MTU is below the datagrams' size the kernel
    /// refuses a GSO run: it goes one by one (fragmented) and arrives
    /// whole, and GSO stays on for the runs that fit.
    #[test]
    fn a_run_above_the_path_mtu_goes_one_by_one() {
        use crate::mesh::netns::{in_ns, ip, two_hosts};
        let (_hosts, na, nb) = two_hosts("u", ("ua", "192.168.79.1/24"), ("ub", "192.168.79.2/24"));
        ip(&["-n", &na, "link", "set", "ua", "mtu", "1280"]);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = in_ns(&nb, move || {
            Box::pin(async move {
                let rx = Socket::bind("192.168.79.2:7100".parse().unwrap())
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                let (mut got, mut r) = (Vec::new(), RecvBatch::new());
                while got.len() < 60 {
                    let recv = tokio::time::timeout(Duration::from_secs(10), rx.recv(&mut r));
                    recv.await.expect("all datagrams arrive").unwrap();
                    got.extend(r.datagrams().map(|(_, d)| d.to_vec()));
                }
                got
            })
        });
        ready_rx.recv().unwrap();
        let sender = in_ns(&na, move || {
            Box::pin(async move {
                let tx = Socket::bind("192.168.79.1:0".parse().unwrap())
                    .await
                    .unwrap();
                let to = "192.168.79.2:7100".parse().unwrap();
                let (mut b, mut sent) = (SendBatch::new(), Vec::new());
                // A run too big for the link, then one that fits, twice.
                for (n, len) in [(20u8, 1400), (10, 1000), (20, 1400), (10, 1000)] {
                    for i in 0..n {
                        let d = vec![i.wrapping_mul(len as u8); len];
                        b.push(to, &d);
                        sent.push(d);
                    }
                }
                tx.send(&b).await.unwrap();
                (sent, tx.gso())
            })
        });
        let (sent, gso) = sender.join().unwrap();
        assert_eq!(receiver.join().unwrap(), sent);
        assert!(gso, "a refused run does not turn GSO off");
    }
}
