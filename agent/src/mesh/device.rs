//! One userspace WireGuard interface: a TUN device, one UDP socket, and a
//! `boringtun::noise::Tunn` per peer. Three loops: TUN → peers (cryptokey
//! routing by destination, encrypt, send), UDP → TUN (find the peer,
//! decrypt, check the source against its allowed IPs, write), and timers
//! (handshakes, keepalives, rekeys) every 250 ms.
//!
//! Simple first: one packet per syscall. Garbage datagrams are dropped and
//! counted; they never stop a loop.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use boringtun::{
    noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult},
    x25519::{PublicKey, StaticSecret},
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::tun::Tun;

/// Largest packet handled (TUN MTU 1420 plus WireGuard's overhead, with room).
const BUF: usize = 65_535;

/// An allowed-IP network of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// What a peer is configured with.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    pub allowed_ips: Vec<Net>,
}

struct Peer {
    config: PeerConfig,
    tunn: Mutex<Tunn>,
    endpoint: Mutex<Option<SocketAddr>>,
    /// The upper 24 bits of every session index boringtun makes for this peer.
    index: u32,
}

/// Counters the interface keeps.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams that were not WireGuard, or were for no known peer, or failed.
    pub dropped_datagrams: AtomicU64,
    /// Decrypted packets whose source is outside the sending peer's allowed IPs.
    pub dropped_spoofed: AtomicU64,
    /// Packets from the TUN for which no peer's allowed IPs match.
    pub no_route: AtomicU64,
}

/// Per-peer figures (for `wg show`, status and telemetry).
#[derive(Debug, Clone)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub rtt_ms: Option<u32>,
}

/// A running interface.
pub struct Device {
    private: StaticSecret,
    public: PublicKey,
    peers: Mutex<Vec<Arc<Peer>>>,
    next_index: AtomicU32,
    pub counters: Counters,
    udp: Arc<UdpSocket>,
}

fn lookup(peers: &[Arc<Peer>], dst: IpAddr) -> Option<Arc<Peer>> {
    peers
        .iter()
        .flat_map(|p| p.config.allowed_ips.iter().map(move |n| (n, p)))
        .filter(|(n, _)| n.contains(dst))
        .max_by_key(|(n, _)| n.prefix)
        .map(|(_, p)| p.clone())
}

fn dst_of(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?)),
        6 if packet.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?)),
        _ => None,
    }
}

impl Device {
    /// A device with this private key, its UDP socket bound to `listen`.
    pub async fn new(private_key: [u8; 32], listen: SocketAddr) -> std::io::Result<Device> {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Ok(Device {
            private,
            public,
            peers: Mutex::new(Vec::new()),
            next_index: AtomicU32::new(1),
            counters: Counters::default(),
            udp: Arc::new(UdpSocket::bind(listen).await?),
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Peer>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a peer, or replaces one with the same key (a new session).
    pub fn set_peer(&self, config: PeerConfig) {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(config.public_key),
            config.preshared_key,
            config.keepalive.filter(|k| *k > 0),
            // boringtun shifts it left by 8 itself: session indexes are index<<8 | n.
            index,
            None,
        );
        let peer = Arc::new(Peer {
            endpoint: Mutex::new(config.endpoint),
            config,
            tunn: Mutex::new(tunn),
            index,
        });
        let mut peers = self.lock();
        peers.retain(|p| p.config.public_key != peer.config.public_key);
        peers.push(peer);
    }

    pub fn remove_peer(&self, key: &[u8; 32]) -> bool {
        let mut peers = self.lock();
        let before = peers.len();
        peers.retain(|p| &p.config.public_key != key);
        peers.len() != before
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        self.lock()
            .iter()
            .map(|p| {
                let (last, tx, rx, _, rtt) =
                    p.tunn.lock().unwrap_or_else(|e| e.into_inner()).stats();
                PeerStats {
                    public_key: p.config.public_key,
                    endpoint: *p.endpoint.lock().unwrap_or_else(|e| e.into_inner()),
                    last_handshake: last,
                    tx_bytes: tx,
                    rx_bytes: rx,
                    rtt_ms: rtt,
                }
            })
            .collect()
    }

    async fn send_to(&self, peer: &Peer, bytes: &[u8]) {
        let ep = *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ep) = ep {
            let _ = self.udp.send_to(bytes, ep).await;
        }
    }

    /// Runs the three loops over `tun` until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        tun: Tun,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tun = Arc::new(tun);
        let outbound = {
            let (dev, tun, stop) = (self.clone(), tun.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut src = vec![0u8; BUF];
                let mut dst = vec![0u8; BUF];
                loop {
                    let n = tokio::select! {
                        r = tun.recv(&mut src) => match r { Ok(n) => n, Err(_) => return },
                        _ = stop.cancelled() => return,
                    };
                    let Some(ip) = dst_of(&src[..n]) else {
                        continue;
                    };
                    let Some(peer) = lookup(&dev.lock(), ip) else {
                        dev.counters.no_route.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let out = match peer
                        .tunn
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .encapsulate(&src[..n], &mut dst)
                    {
                        TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                        _ => None,
                    };
                    if let Some(b) = out {
                        dev.send_to(&peer, &b).await;
                    }
                }
            })
        };
        let inbound = {
            let (dev, tun, stop) = (self.clone(), tun.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; BUF];
                let mut dst = vec![0u8; BUF];
                loop {
                    let (n, from) = tokio::select! {
                        r = dev.udp.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                        _ = stop.cancelled() => return,
                    };
                    dev.inbound(&buf[..n], from, &mut dst, &tun).await;
                }
            })
        };
        let timers = {
            let (dev, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut dst = vec![0u8; BUF];
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let peers = dev.lock().clone();
                    for p in peers {
                        let out = match p
                            .tunn
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .update_timers(&mut dst)
                        {
                            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                            _ => None,
                        };
                        if let Some(b) = out {
                            dev.send_to(&p, &b).await;
                        }
                    }
                }
            })
        };
        let _ = tokio::join!(outbound, inbound, timers);
        Ok(())
    }

    /// One datagram from the network.
    async fn inbound(&self, datagram: &[u8], from: SocketAddr, dst: &mut [u8], tun: &Tun) {
        let drop = || {
            self.counters
                .dropped_datagrams
                .fetch_add(1, Ordering::Relaxed);
        };
        let peer = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.private, &self.public, &init) {
                    Ok(half) => self
                        .lock()
                        .iter()
                        .find(|p| p.config.public_key == half.peer_static_public)
                        .cloned(),
                    Err(_) => None,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => self.by_index(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => self.by_index(p.receiver_idx),
            Ok(Packet::PacketData(p)) => self.by_index(p.receiver_idx),
            Err(_) => None,
        };
        let Some(peer) = peer else { return drop() };
        let mut first = true;
        loop {
            let result = {
                let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
                let input: &[u8] = if first { datagram } else { &[] };
                match t.decapsulate(Some(from.ip()), input, dst) {
                    TunnResult::Done => None,
                    TunnResult::Err(_) => {
                        if first {
                            drop();
                        }
                        None
                    }
                    TunnResult::WriteToNetwork(b) => Some((true, b.to_vec(), None)),
                    TunnResult::WriteToTunnelV4(b, src) => {
                        Some((false, b.to_vec(), Some(IpAddr::V4(src))))
                    }
                    TunnResult::WriteToTunnelV6(b, src) => {
                        Some((false, b.to_vec(), Some(IpAddr::V6(src))))
                    }
                }
            };
            first = false;
            match result {
                None => return,
                Some((true, bytes, _)) => {
                    // A valid packet from a new address: the peer roamed.
                    *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    let _ = self.udp.send_to(&bytes, from).await;
                    // Queued packets follow a handshake: keep draining.
                    continue;
                }
                Some((false, bytes, src)) => {
                    *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    let ok =
                        src.is_some_and(|s| peer.config.allowed_ips.iter().any(|n| n.contains(s)));
                    if ok {
                        let _ = tun.send(&bytes).await;
                    } else if !bytes.is_empty() {
                        self.counters
                            .dropped_spoofed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
    }

    fn by_index(&self, receiver_idx: u32) -> Option<Arc<Peer>> {
        let index = receiver_idx >> 8;
        self.lock().iter().find(|p| p.index == index).cloned()
    }
}

/// The X25519 public key of a private key.
pub fn public_of(private_key: [u8; 32]) -> [u8; 32] {
    *PublicKey::from(&StaticSecret::from(private_key)).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_match_by_prefix() {
        let n = |a: &str, p| Net {
            addr: a.parse().unwrap(),
            prefix: p,
        };
        assert!(n("10.0.0.0", 8).contains("10.1.2.3".parse().unwrap()));
        assert!(!n("10.0.0.0", 8).contains("11.0.0.1".parse().unwrap()));
        assert!(n("0.0.0.0", 0).contains("1.2.3.4".parse().unwrap()));
        assert!(n("fd00::", 8).contains("fd12::1".parse().unwrap()));
        assert!(!n("fd00::", 8).contains("10.0.0.1".parse().unwrap()));
        assert!(n("10.0.0.7", 32).contains("10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn ip_headers_name_their_destination() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 0, 0, 9]);
        assert_eq!(dst_of(&v4), Some("10.0.0.9".parse().unwrap()));
        assert_eq!(dst_of(&[0x60; 10]), None);
        assert_eq!(dst_of(&[]), None);
    }
}

#[cfg(test)]
mod netns_tests {
    //! Two hosts made of network namespaces joined by a veth pair, one
    //! device in each (each run by a thread that entered its namespace): a
    //! UDP packet sent to B's mesh address leaves through A's TUN, crosses
    //! the veth encrypted, and is delivered by B's TUN to a socket on B.
    use std::os::fd::AsRawFd;

    use super::*;

    fn ip(args: &[&str]) {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    }

    /// Deletes the namespaces when the test ends, pass or fail.
    struct Hosts(Vec<String>);

    impl Drop for Hosts {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", n])
                    .status();
            }
        }
    }

    /// Runs `f` on a thread inside network namespace `ns`, with its own runtime.
    fn in_ns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: moves only this thread into the namespace.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns {path}"
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(f())
        })
    }

    #[test]
    fn a_packet_crosses_the_tunnel() {
        let id = std::process::id();
        let (na, nb) = (format!("wt-a-{id}"), format!("wt-b-{id}"));
        let _hosts = Hosts(vec![na.clone(), nb.clone()]);
        ip(&["netns", "add", &na]);
        ip(&["netns", "add", &nb]);
        ip(&[
            "link", "add", "va", "netns", &na, "type", "veth", "peer", "name", "vb", "netns", &nb,
        ]);
        for (ns, dev, addr) in [
            (&na, "va", "192.168.77.1/24"),
            (&nb, "vb", "192.168.77.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (ka, kb) = ([1u8; 32], [2u8; 32]);
        let net = |s: &str, p| Net {
            addr: s.parse().unwrap(),
            prefix: p,
        };
        let stop = CancellationToken::new();
        // B: listens, and receives on its mesh address.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (nb2, stop_b) = (nb.clone(), stop.clone());
        let b = in_ns(&nb, move || {
            Box::pin(async move {
                let dev = Arc::new(
                    Device::new(kb, "192.168.77.2:51820".parse().unwrap())
                        .await
                        .unwrap(),
                );
                dev.set_peer(PeerConfig {
                    public_key: public_of(ka),
                    preshared_key: None,
                    endpoint: None, // learnt from A's handshake
                    keepalive: None,
                    allowed_ips: vec![net("10.66.0.1", 32)],
                });
                let tun = Tun::create("wgb").unwrap();
                ip(&["-n", &nb2, "addr", "add", "10.66.0.2/24", "dev", "wgb"]);
                ip(&["-n", &nb2, "link", "set", "wgb", "up"]);
                tokio::spawn(dev.clone().run(tun, stop_b.clone()));
                let rx = tokio::net::UdpSocket::bind("10.66.0.2:7000").await.unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 64];
                let got = tokio::time::timeout(Duration::from_secs(10), rx.recv_from(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|(n, from)| (buf[..n].to_vec(), from));
                stop_b.cancelled().await;
                (got, dev.stats())
            })
        });
        ready_rx.recv().unwrap();
        let (na2, stop_a) = (na.clone(), stop.clone());
        let a = in_ns(&na, move || {
            Box::pin(async move {
                let dev = Arc::new(
                    Device::new(ka, "192.168.77.1:51820".parse().unwrap())
                        .await
                        .unwrap(),
                );
                dev.set_peer(PeerConfig {
                    public_key: public_of(kb),
                    preshared_key: None,
                    endpoint: Some("192.168.77.2:51820".parse().unwrap()),
                    keepalive: None,
                    allowed_ips: vec![net("10.66.0.2", 32)],
                });
                let tun = Tun::create("wga").unwrap();
                ip(&["-n", &na2, "addr", "add", "10.66.0.1/24", "dev", "wga"]);
                ip(&["-n", &na2, "link", "set", "wga", "up"]);
                tokio::spawn(dev.clone().run(tun, stop_a.clone()));
                let tx = tokio::net::UdpSocket::bind("10.66.0.1:0").await.unwrap();
                // The first packet waits for the handshake; resend until B has it.
                for _ in 0..40 {
                    let _ = tx.send_to(b"over the mesh", "10.66.0.2:7000").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if dev.stats()[0].tx_bytes > 200 {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                dev.stats()
            })
        });
        let sa = a.join().unwrap();
        stop.cancel();
        let (got, sb) = b.join().unwrap();
        let (bytes, from) = got.unwrap_or_else(|| panic!("nothing arrived; a: {sa:?} b: {sb:?}"));
        assert_eq!(bytes, b"over the mesh");
        assert_eq!(
            from.ip(),
            "10.66.0.1".parse::<IpAddr>().unwrap(),
            "the inner source"
        );
        assert!(sa[0].last_handshake.is_some(), "{sa:?}");
        assert_eq!(
            sb[0].endpoint,
            Some("192.168.77.1:51820".parse().unwrap()),
            "B learnt A's endpoint"
        );
    }
}

#[cfg(test)]
mod garbage_tests {
    use super::*;
    use rand::{Rng, RngCore};

    /// Random datagrams, some shaped like WireGuard messages, are dropped and
    /// counted; the device keeps working.
    #[test]
    fn random_datagrams_are_dropped_and_counted() {
        let t = std::thread::spawn(|| {
            // SAFETY: only this thread moves to a new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dev = Device::new([3; 32], "127.0.0.1:0".parse().unwrap())
                    .await
                    .unwrap();
                dev.set_peer(PeerConfig {
                    public_key: public_of([4; 32]),
                    preshared_key: None,
                    endpoint: None,
                    keepalive: None,
                    allowed_ips: vec![Net {
                        addr: "10.0.0.2".parse().unwrap(),
                        prefix: 32,
                    }],
                });
                let tun = Tun::create("wgz%d").unwrap();
                let mut rng = rand::rng();
                let mut dst = vec![0u8; BUF];
                let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
                let sizes = [0usize, 1, 3, 4, 32, 92, 148, 1500];
                for i in 0..5_000 {
                    let len = if i % 2 == 0 {
                        sizes[i % sizes.len()]
                    } else {
                        rng.random_range(0..2048)
                    };
                    let mut d = vec![0u8; len];
                    rng.fill_bytes(&mut d);
                    // Half of them claim a WireGuard message type (1..4, zero reserved bytes).
                    if len >= 4 && i % 4 < 2 {
                        d[..4].copy_from_slice(&(1 + (i as u32 % 4)).to_le_bytes());
                    }
                    dev.inbound(&d, from, &mut dst, &tun).await;
                }
                let dropped = dev.counters.dropped_datagrams.load(Ordering::Relaxed);
                assert!(dropped >= 4_900, "dropped {dropped}");
                assert_eq!(dev.stats().len(), 1, "the peer is still there");
            });
        });
        t.join().unwrap();
    }
}
