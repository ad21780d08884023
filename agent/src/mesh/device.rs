//! One userspace WireGuard interface: a TUN device, one UDP socket, and a
//! `boringtun::noise::Tunn` per peer. Configured live with UAPI operations
//! (from `wg set` or the coordinator's mesh config) through the pure peer
//! table (`peers::Table`): cryptokey routing, allowed sources and roaming
//! are the table's; sessions are this file's. A peer whose keys and
//! keepalive did not change keeps its session whatever else changes.
//!
//! Three loops: TUN → peers (route by destination, encrypt, send), UDP →
//! TUN (find the peer, decrypt, check the source, write), and timers
//! (handshakes, keepalives, rekeys) every 250 ms. One packet per syscall
//! for now. Garbage datagrams are dropped and counted; they never stop a loop.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use boringtun::{
    noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult},
    x25519::{PublicKey, StaticSecret},
};
use tokio::{net::UdpSocket, sync::watch};
use tokio_util::sync::CancellationToken;

use super::{
    peers::{Change, Table},
    tun::Tun,
    uapi::{self, DeviceView, Key, Op, PeerView},
};

/// Largest packet handled.
const BUF: usize = 65_535;

/// One peer's session state.
struct Tunnel {
    tunn: Mutex<Tunn>,
    /// The upper 24 bits of every session index boringtun makes for it.
    index: u32,
    /// What the session was made with: a change of either needs a new one.
    made_with: (Option<Key>, u16),
}

struct State {
    key: Option<(StaticSecret, PublicKey)>,
    listen_port: u16,
    fwmark: u32,
    table: Table,
    tunnels: HashMap<Key, Arc<Tunnel>>,
    next_index: u32,
}

impl State {
    fn tunnel_for(&mut self, peer: &Key) {
        let Some((private, _)) = &self.key else {
            self.tunnels.remove(peer);
            return;
        };
        let Some(p) = self.table.get(peer) else {
            self.tunnels.remove(peer);
            return;
        };
        let made_with = (p.preshared_key, p.keepalive);
        if self
            .tunnels
            .get(peer)
            .is_some_and(|t| t.made_with == made_with)
        {
            return; // endpoint or allowed IPs only: the session stays
        }
        self.next_index = (self.next_index + 1) & 0x00ff_ffff;
        let index = self.next_index;
        let tunn = Tunn::new(
            private.clone(),
            PublicKey::from(*peer),
            p.preshared_key,
            Some(p.keepalive).filter(|k| *k > 0),
            // boringtun shifts it left by 8 itself: session indexes are index<<8 | n.
            index,
            None,
        );
        self.tunnels.insert(
            *peer,
            Arc::new(Tunnel {
                tunn: Mutex::new(tunn),
                index,
                made_with,
            }),
        );
    }
}

/// Counters the interface keeps.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams that were not WireGuard, or were for no known peer, or failed.
    pub dropped_datagrams: AtomicU64,
    /// Decrypted packets whose source is not routed to the sending peer.
    pub dropped_spoofed: AtomicU64,
    /// Packets from the TUN for which no peer's allowed IPs match.
    pub no_route: AtomicU64,
}

/// A running interface.
pub struct Device {
    state: Mutex<State>,
    udp: watch::Sender<Option<Arc<UdpSocket>>>,
    bind: IpAddr,
    pub counters: Counters,
}

fn dst_of(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?)),
        6 if packet.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?)),
        _ => None,
    }
}

/// The X25519 public key of a private key.
pub fn public_of(private_key: Key) -> Key {
    *PublicKey::from(&StaticSecret::from(private_key)).as_bytes()
}

impl Device {
    /// An unconfigured device whose UDP socket, once a port is set, binds
    /// on `bind` (the unspecified address in production).
    pub fn new(bind: IpAddr) -> Device {
        Device {
            state: Mutex::new(State {
                key: None,
                listen_port: 0,
                fwmark: 0,
                table: Table::new(),
                tunnels: HashMap::new(),
                next_index: 0,
            }),
            udp: watch::channel(None).0,
            bind,
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bound UDP address, once there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.borrow().as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Applies a UAPI set: the errno to answer (0: done).
    pub async fn apply(&self, ops: &[Op]) -> i32 {
        // The socket first: a port that cannot be bound fails the whole set.
        let port = ops.iter().rev().find_map(|o| match o {
            Op::ListenPort(p) => Some(*p),
            _ => None,
        });
        let bound = match port {
            Some(p) if p != self.lock().listen_port || self.udp.borrow().is_none() => {
                match UdpSocket::bind(SocketAddr::new(self.bind, p)).await {
                    Ok(s) => Some(s),
                    Err(_) => return uapi::ERRNO_PORT_IN_USE,
                }
            }
            _ => None,
        };
        let mut st = self.lock();
        if let Some(sock) = bound {
            st.listen_port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
            self.udp.send_replace(Some(Arc::new(sock)));
        }
        let mut rekey = false;
        for op in ops {
            match op {
                Op::PrivateKey(k) if *k == [0; 32] => {
                    st.key = None;
                    rekey = true;
                }
                Op::PrivateKey(k) => {
                    let private = StaticSecret::from(*k);
                    let public = PublicKey::from(&private);
                    st.key = Some((private, public));
                    rekey = true;
                }
                Op::Fwmark(m) => st.fwmark = *m,
                _ => {}
            }
        }
        if rekey {
            st.tunnels.clear();
        }
        let changes = st.table.apply(ops);
        for c in changes {
            match c {
                Change::Added(k) | Change::Updated(k) => st.tunnel_for(&k),
                Change::Removed(k) => {
                    st.tunnels.remove(&k);
                }
            }
        }
        if rekey {
            let keys: Vec<Key> = st.table.peers().map(|p| p.public_key).collect();
            for k in keys {
                st.tunnel_for(&k);
            }
        }
        0
    }

    /// The operations that turn the peer table into `desired` (see
    /// [`crate::mesh::peers::diff`]): unchanged peers are not touched.
    pub fn diff_to(&self, desired: &[crate::mesh::peers::Peer]) -> Vec<Op> {
        crate::mesh::peers::diff(&self.lock().table, desired)
    }

    /// What `wg show` sees.
    pub fn view(&self) -> DeviceView {
        let st = self.lock();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        DeviceView {
            private_key: st.key.as_ref().map(|(k, _)| k.to_bytes()),
            listen_port: st.listen_port,
            fwmark: st.fwmark,
            peers: st
                .table
                .peers()
                .map(|p| {
                    let stats = st
                        .tunnels
                        .get(&p.public_key)
                        .map(|t| t.tunn.lock().unwrap_or_else(|e| e.into_inner()).stats());
                    let (ago, tx, rx) = stats.map_or((None, 0, 0), |(a, tx, rx, _, _)| (a, tx, rx));
                    PeerView {
                        public_key: p.public_key,
                        preshared_key: p.preshared_key,
                        endpoint: p.endpoint,
                        keepalive: p.keepalive,
                        allowed_ips: p.allowed_ips.clone(),
                        last_handshake: ago.map(|a| now.saturating_sub(a)),
                        rx_bytes: rx as u64,
                        tx_bytes: tx as u64,
                    }
                })
                .collect(),
        }
    }

    async fn send_to(&self, ep: Option<SocketAddr>, bytes: &[u8]) {
        let sock = self.udp.borrow().clone();
        if let (Some(sock), Some(ep)) = (sock, ep) {
            // A dual-stack socket reaches IPv4 peers through mapped addresses.
            let ep = match (self.bind, ep) {
                (IpAddr::V6(_), SocketAddr::V4(v4)) => {
                    SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                }
                _ => ep,
            };
            let _ = sock.send_to(bytes, ep).await;
        }
    }

    /// Runs the three loops over `tun` until `shutdown`.
    pub async fn run(self: Arc<Self>, tun: Tun, shutdown: CancellationToken) {
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
                    let route = {
                        let st = dev.lock();
                        st.table.lookup(ip).and_then(|k| {
                            Some((st.tunnels.get(k)?.clone(), st.table.get(k)?.endpoint))
                        })
                    };
                    let Some((tunnel, ep)) = route else {
                        dev.counters.no_route.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    // The span written into `dst`, so the lock is released
                    // before sending without copying the packet.
                    let base = dst.as_ptr();
                    let out = match tunnel
                        .tunn
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .encapsulate(&src[..n], &mut dst)
                    {
                        TunnResult::WriteToNetwork(b) => Some(span(base, b)),
                        _ => None,
                    };
                    if let Some(r) = out {
                        dev.send_to(ep, &dst[r]).await;
                    }
                }
            })
        };
        let inbound = {
            let (dev, tun, stop) = (self.clone(), tun.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; BUF];
                let mut dst = vec![0u8; BUF];
                let mut sockets = dev.udp.subscribe();
                loop {
                    let sock = sockets.borrow_and_update().clone();
                    let Some(sock) = sock else {
                        tokio::select! {
                            r = sockets.changed() => if r.is_err() { return },
                            _ = stop.cancelled() => return,
                        }
                        continue;
                    };
                    let (n, from) = tokio::select! {
                        r = sock.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                        _ = sockets.changed() => continue, // rebound: read the new socket
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
                    let tunnels: Vec<(Arc<Tunnel>, Option<SocketAddr>)> = {
                        let st = dev.lock();
                        st.tunnels
                            .iter()
                            .map(|(k, t)| (t.clone(), st.table.get(k).and_then(|p| p.endpoint)))
                            .collect()
                    };
                    for (t, ep) in tunnels {
                        let out = match t
                            .tunn
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .update_timers(&mut dst)
                        {
                            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                            _ => None,
                        };
                        if let Some(b) = out {
                            dev.send_to(ep, &b).await;
                        }
                    }
                }
            })
        };
        let _ = tokio::join!(outbound, inbound, timers);
    }

    /// Which peer a datagram is from (None: drop it).
    fn peer_of(&self, datagram: &[u8]) -> Option<(Key, Arc<Tunnel>)> {
        let st = self.lock();
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(init) => {
                let (private, public) = st.key.as_ref()?;
                let half = parse_handshake_anon(private, public, &init).ok()?;
                let key = half.peer_static_public;
                Some((key, st.tunnels.get(&key)?.clone()))
            }
            Packet::HandshakeResponse(p) => by_index(&st, p.receiver_idx),
            Packet::PacketCookieReply(p) => by_index(&st, p.receiver_idx),
            Packet::PacketData(p) => by_index(&st, p.receiver_idx),
        }
    }

    /// One datagram from the network.
    async fn inbound(&self, datagram: &[u8], from: SocketAddr, dst: &mut [u8], tun: &Tun) {
        // An IPv4 peer on a dual-stack socket: remember it as IPv4.
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let Some((key, tunnel)) = self.peer_of(datagram) else {
            self.counters
                .dropped_datagrams
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut first = true;
        loop {
            let result = {
                let mut t = tunnel.tunn.lock().unwrap_or_else(|e| e.into_inner());
                let input: &[u8] = if first { datagram } else { &[] };
                let base = dst.as_ptr();
                match t.decapsulate(Some(from.ip()), input, dst) {
                    TunnResult::Done => None,
                    TunnResult::Err(_) => {
                        if first {
                            self.counters
                                .dropped_datagrams
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                    TunnResult::WriteToNetwork(b) => Some((span(base, b), None)),
                    TunnResult::WriteToTunnelV4(b, src) => {
                        Some((span(base, b), Some(IpAddr::V4(src))))
                    }
                    TunnResult::WriteToTunnelV6(b, src) => {
                        Some((span(base, b), Some(IpAddr::V6(src))))
                    }
                }
            };
            first = false;
            let Some((range, src)) = result else { return };
            let bytes = &dst[range];
            // A packet that authenticated: the peer is where it came from (roaming).
            let allowed = {
                let mut st = self.lock();
                st.table.set_endpoint(&key, from);
                src.map(|s| st.table.allowed_src(&key, s))
            };
            match allowed {
                // Handshake answers and queued packets: send, and keep draining.
                None => {
                    self.send_to(Some(from), bytes).await;
                    continue;
                }
                Some(true) => {
                    let _ = tun.send(bytes).await;
                }
                Some(false) => {
                    if !bytes.is_empty() {
                        self.counters
                            .dropped_spoofed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            return;
        }
    }
}

/// Where `part` (a slice boringtun wrote into the buffer starting at
/// `base`) lies in that buffer.
fn span(base: *const u8, part: &mut [u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(base as usize);
    start..start + part.len()
}

fn by_index(st: &State, receiver_idx: u32) -> Option<(Key, Arc<Tunnel>)> {
    let index = receiver_idx >> 8;
    st.tunnels
        .iter()
        .find(|(_, t)| t.index == index)
        .map(|(k, t)| (*k, t.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::uapi::{IpNet, PeerOp};

    /// A set: our key and port, one peer with an endpoint and one allowed IP.
    pub fn config(
        key: Key,
        port: u16,
        peer: Key,
        endpoint: Option<&str>,
        allowed: &str,
    ) -> Vec<Op> {
        let (addr, prefix) = allowed.split_once('/').unwrap();
        vec![
            Op::PrivateKey(key),
            Op::ListenPort(port),
            Op::Peer(PeerOp {
                endpoint: endpoint.map(|e| e.parse().unwrap()),
                allowed_ips: vec![
                    IpNet::new(addr.parse().unwrap(), prefix.parse().unwrap()).unwrap()
                ],
                ..PeerOp::new(public_of(peer))
            }),
        ]
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

    #[tokio::test]
    async fn a_set_configures_and_keeps_sessions_of_unchanged_peers() {
        let dev = Device::new("127.0.0.1".parse().unwrap());
        assert_eq!(
            dev.apply(&config(
                [1; 32],
                0,
                [2; 32],
                Some("127.0.0.1:9"),
                "10.0.0.2/32"
            ))
            .await,
            0
        );
        let v = dev.view();
        assert_eq!(v.private_key, Some([1; 32]));
        assert_ne!(v.listen_port, 0, "an ephemeral port was bound");
        assert_eq!(v.peers.len(), 1);
        let index = dev.lock().tunnels[&public_of([2; 32])].index;
        // A new endpoint and allowed IP: same session.
        let mut ops = config(
            [1; 32],
            v.listen_port,
            [2; 32],
            Some("127.0.0.1:10"),
            "10.0.0.3/32",
        );
        ops.remove(0);
        assert_eq!(dev.apply(&ops).await, 0);
        assert_eq!(dev.lock().tunnels[&public_of([2; 32])].index, index);
        // A new private key: new sessions.
        assert_eq!(dev.apply(&[Op::PrivateKey([5; 32])]).await, 0);
        assert_ne!(dev.lock().tunnels[&public_of([2; 32])].index, index);
        // A port in use is refused with its errno, and nothing else changes.
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        assert_eq!(
            dev.apply(&[Op::ListenPort(port)]).await,
            uapi::ERRNO_PORT_IN_USE
        );
        assert_eq!(dev.view().listen_port, v.listen_port);
    }
}

#[cfg(test)]
mod netns_tests {
    //! Two hosts made of network namespaces joined by a veth pair, one
    //! device in each (each run by a thread that entered its namespace): a
    //! UDP packet sent to B's mesh address leaves through A's TUN, crosses
    //! the veth encrypted, and is delivered by B's TUN to a socket on B.
    use std::os::fd::AsRawFd;

    use super::{tests::config, *};

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

    type Job<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

    /// Runs `f` on a thread inside network namespace `ns`, with its own runtime.
    fn in_ns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> Job<T> + Send + 'static,
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
        let stop = CancellationToken::new();
        // B: no endpoint for A (learnt from A's handshake); receives on its mesh address.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (nb2, stop_b) = (nb.clone(), stop.clone());
        let b = in_ns(&nb, move || {
            Box::pin(async move {
                let dev = Arc::new(Device::new("192.168.77.2".parse().unwrap()));
                assert_eq!(
                    dev.apply(&config(kb, 51820, ka, None, "10.66.0.1/32"))
                        .await,
                    0
                );
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
                (got, dev.view())
            })
        });
        ready_rx.recv().unwrap();
        let (na2, stop_a) = (na.clone(), stop.clone());
        let a = in_ns(&na, move || {
            Box::pin(async move {
                let dev = Arc::new(Device::new("192.168.77.1".parse().unwrap()));
                let cfg = config(ka, 51820, kb, Some("192.168.77.2:51820"), "10.66.0.2/32");
                assert_eq!(dev.apply(&cfg).await, 0);
                let tun = Tun::create("wga").unwrap();
                ip(&["-n", &na2, "addr", "add", "10.66.0.1/24", "dev", "wga"]);
                ip(&["-n", &na2, "link", "set", "wga", "up"]);
                tokio::spawn(dev.clone().run(tun, stop_a.clone()));
                let tx = tokio::net::UdpSocket::bind("10.66.0.1:0").await.unwrap();
                // The first packet waits for the handshake; resend until it is through.
                for _ in 0..40 {
                    let _ = tx.send_to(b"over the mesh", "10.66.0.2:7000").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if dev.view().peers[0].tx_bytes > 200 {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                dev.view()
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
        assert!(sa.peers[0].last_handshake.is_some(), "{sa:?}");
        assert_eq!(
            sb.peers[0].endpoint,
            Some("192.168.77.1:51820".parse().unwrap()),
            "B learnt A's endpoint"
        );
    }
}

#[cfg(test)]
mod garbage_tests {
    use rand::{Rng, RngCore};

    use super::{tests::config, *};

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
                let dev = Device::new("127.0.0.1".parse().unwrap());
                assert_eq!(
                    dev.apply(&config([3; 32], 0, [4; 32], None, "10.0.0.2/32"))
                        .await,
                    0
                );
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
                assert_eq!(dev.view().peers.len(), 1, "the peer is still there");
            });
        });
        t.join().unwrap();
    }
}
