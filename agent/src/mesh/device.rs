//! One userspace WireGuard interface: a TUN device, one UDP socket, and a
//! `boringtun::noise::Tunn` per peer. Configured live with UAPI operations
//! (from `wg set` or the coordinator's mesh config) through the pure peer
//! table (`peers::Table`): cryptokey routing, allowed sources and roaming
//! are the table's; sessions are this file's. A peer whose keys and
//! keepalive did not change keeps its session whatever else changes.
//!
//! Three loops: TUN → peers (route by destination, encrypt, send), UDP →
//! TUN (find the peer, decrypt, check the source, write), and timers
//! (handshakes, keepalives, rekeys) every 250 ms. Packets move in batches:
//! a TUN read may be a 64 KiB TCP super-packet, split here (`offload`),
//! and the TUN reads waiting at a wakeup are encrypted into one batch sent
//! with `sendmmsg` and UDP GSO (`udp`); a `recvmmsg` brings runs of
//! datagrams, whose decrypted TCP segments are joined again before they
//! are written to the TUN. Routes and peers are looked up under the
//! device's lock once per batch and peer, not per packet (a generation
//! counter says when a loop's cached answer is stale). Garbage datagrams
//! are dropped and counted; they never stop a loop.

use std::{
    collections::HashMap,
    io::IoSlice,
    net::{IpAddr, SocketAddr},
    ops::Range,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime},
};

use boringtun::{
    noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult},
    x25519::{PublicKey, StaticSecret},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    offload::{self, Gro, VnetHdr, VNET_HDR_LEN},
    peers::{Change, Table},
    tun::Tun,
    uapi::{self, DeviceView, Key, Op, PeerView},
    udp::{self, RecvBatch, SendBatch},
};

/// Largest packet handled.
const BUF: usize = 65_535;

/// Room boringtun needs to write any message: a packet and its overhead,
/// and never less than a handshake initiation.
const fn room_for(len: usize) -> usize {
    if len + 32 > 148 {
        len + 32
    } else {
        148
    }
}

/// Stop reading the TUN and send once this much is queued.
const SEND_BATCH_BYTES: usize = 256 << 10;

/// Most TUN reads per wakeup before sending what they gave.
const MAX_READS: usize = 64;

/// One peer's session state.
struct Tunnel {
    tunn: Mutex<Tunn>,
    /// The upper 24 bits of every session index boringtun makes for it.
    index: u32,
    /// What the session was made with: a change of either needs a new one.
    made_with: (Option<Key>, u16),
}

impl Tunnel {
    fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    /// TUN reads with a malformed offload header, and TUN writes the kernel refused.
    pub tun_errors: AtomicU64,
}

/// A running interface.
pub struct Device {
    state: Mutex<State>,
    udp: watch::Sender<Option<Arc<udp::Socket>>>,
    bind: IpAddr,
    /// Bumped after every change to peers, routes, sessions or endpoints:
    /// the loops' cached lookups are good while it stays the same.
    generation: AtomicU64,
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

/// The outbound loop's last route: good while the generation holds.
#[derive(Default)]
struct RouteCache {
    generation: u64,
    dst: Option<IpAddr>,
    hit: Option<(Arc<Tunnel>, Option<SocketAddr>)>,
}

/// The peer of the last data message: good while the generation holds.
struct PeerCache {
    generation: u64,
    index: u32,
    key: Key,
    tunnel: Arc<Tunnel>,
    /// Where its packets were last seen coming from (the endpoint as set).
    endpoint: Option<SocketAddr>,
    /// The last inner source checked, and whether it was allowed.
    source: Option<(IpAddr, bool)>,
}

/// What the inbound loop gathers from one `recvmmsg` before writing it out.
struct Inbound {
    /// Decrypted packets end to end; `packets` says where.
    arena: Vec<u8>,
    filled: usize,
    packets: Vec<Range<usize>>,
    gro: Gro,
    /// Handshake answers and packets boringtun had queued.
    replies: SendBatch,
    peer: Option<PeerCache>,
}

impl Inbound {
    fn new() -> Inbound {
        Inbound {
            arena: Vec::new(),
            filled: 0,
            packets: Vec::new(),
            gro: Gro::new(),
            replies: SendBatch::new(),
            peer: None,
        }
    }

    /// The free part of the arena, at least `room` bytes.
    fn spare(&mut self, room: usize) -> &mut [u8] {
        if self.arena.len() < self.filled + room {
            self.arena.resize(self.filled + room, 0);
        }
        &mut self.arena[self.filled..]
    }
}

/// What one decapsulate call gave, as spans of the buffer it wrote.
enum Decap {
    Done,
    Failed,
    Network(Range<usize>),
    Tunnel(Range<usize>, IpAddr),
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
            generation: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
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
                match udp::Socket::bind(SocketAddr::new(self.bind, p)).await {
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
        self.changed();
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
                    let stats = st.tunnels.get(&p.public_key).map(|t| t.lock().stats());
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

    /// Sends `batch` on the current socket (if any) and empties it.
    async fn flush(&self, batch: &mut SendBatch) {
        if batch.is_empty() {
            return;
        }
        let sock = self.udp.borrow().clone();
        if let Some(sock) = sock {
            let _ = sock.send(batch).await;
        }
        batch.clear();
    }

    /// Runs the three loops over `tun` until `shutdown`.
    pub async fn run(self: Arc<Self>, tun: Tun, shutdown: CancellationToken) {
        let tun = Arc::new(tun);
        let outbound = tokio::spawn(self.clone().outbound(tun.clone(), shutdown.clone()));
        let inbound = tokio::spawn(self.clone().inbound_loop(tun.clone(), shutdown.clone()));
        let timers = tokio::spawn(self.clone().timers(shutdown.clone()));
        let _ = tokio::join!(outbound, inbound, timers);
    }

    /// TUN → peers: the reads waiting at each wakeup, encrypted into one batch.
    async fn outbound(self: Arc<Self>, tun: Arc<Tun>, stop: CancellationToken) {
        let mut frame = vec![0u8; VNET_HDR_LEN + BUF];
        let mut batch = SendBatch::new();
        let mut cache = RouteCache::default();
        loop {
            let n = tokio::select! {
                r = tun.recv(&mut frame) => match r { Ok(n) => n, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            self.encrypt(tun.offload(), &mut frame[..n], &mut batch, &mut cache);
            for _ in 1..MAX_READS {
                if batch.bytes() >= SEND_BATCH_BYTES {
                    break;
                }
                match tun.try_recv(&mut frame) {
                    Ok(n) => self.encrypt(tun.offload(), &mut frame[..n], &mut batch, &mut cache),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
            self.flush(&mut batch).await;
        }
    }

    /// The route for `dst`: its peer's tunnel and endpoint.
    fn route(
        &self,
        dst: IpAddr,
        cache: &mut RouteCache,
    ) -> Option<(Arc<Tunnel>, Option<SocketAddr>)> {
        let generation = self.generation.load(Ordering::Acquire);
        if cache.generation != generation || cache.dst != Some(dst) {
            let hit = {
                let st = self.lock();
                st.table
                    .lookup(dst)
                    .and_then(|k| Some((st.tunnels.get(k)?.clone(), st.table.get(k)?.endpoint)))
            };
            *cache = RouteCache {
                generation,
                dst: Some(dst),
                hit,
            };
        }
        cache.hit.clone()
    }

    /// One TUN frame, cut into packets if it is a super-packet, encrypted
    /// into `batch`.
    fn encrypt(
        &self,
        offload: bool,
        frame: &mut [u8],
        batch: &mut SendBatch,
        cache: &mut RouteCache,
    ) {
        let (hdr, packet) = if offload {
            match VnetHdr::parse(frame) {
                Some(hdr) => (hdr, &mut frame[VNET_HDR_LEN..]),
                None => {
                    self.counters.tun_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        } else {
            (VnetHdr::default(), frame)
        };
        let Some(ip) = dst_of(packet) else {
            return;
        };
        let Some((tunnel, ep)) = self.route(ip, cache) else {
            self.counters.no_route.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let ep = ep.map(|e| udp::for_socket(self.bind, e));
        let mut t = tunnel.lock();
        let split = offload::split(&hdr, packet, |p| {
            let dst = batch.spare(room_for(p.len()));
            let base = dst.as_ptr();
            if let TunnResult::WriteToNetwork(b) = t.encapsulate(p, dst) {
                let at = span(base, b);
                if let Some(ep) = ep {
                    batch.commit_at(ep, at);
                }
            }
        });
        if split.is_err() {
            self.counters.tun_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// UDP → TUN: each `recvmmsg`'s datagrams decrypted, then written.
    async fn inbound_loop(self: Arc<Self>, tun: Arc<Tun>, stop: CancellationToken) {
        let mut rx = RecvBatch::new();
        let mut st = Inbound::new();
        let mut sockets = self.udp.subscribe();
        loop {
            let sock = sockets.borrow_and_update().clone();
            let Some(sock) = sock else {
                tokio::select! {
                    r = sockets.changed() => if r.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                continue;
            };
            tokio::select! {
                r = sock.recv(&mut rx) => if r.is_err() { continue },
                _ = sockets.changed() => continue, // rebound: read the new socket
                _ = stop.cancelled() => return,
            }
            for (from, datagram) in rx.datagrams() {
                self.receive(datagram, from, &mut st);
            }
            self.deliver(&tun, &mut st).await;
        }
    }

    /// Writes what `receive` gathered to the TUN, joined where it can be,
    /// and sends the replies.
    async fn deliver(&self, tun: &Tun, st: &mut Inbound) {
        if tun.offload() {
            st.gro.coalesce(&mut st.arena[..st.filled], &st.packets);
            for n in 0..st.gro.len() {
                let hdr = st.gro.header(n).encode();
                let mut iov = [IoSlice::new(&[]); 1 + offload::MAX_SEGMENTS];
                iov[0] = IoSlice::new(&hdr);
                let mut k = 1;
                for r in st.gro.parts(n, &st.packets).take(offload::MAX_SEGMENTS) {
                    iov[k] = IoSlice::new(&st.arena[r]);
                    k += 1;
                }
                if tun.send_vectored(&iov[..k]).await.is_err() {
                    self.counters.tun_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            for r in &st.packets {
                if tun.send(&st.arena[r.clone()]).await.is_err() {
                    self.counters.tun_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        st.packets.clear();
        st.filled = 0;
        self.flush(&mut st.replies).await;
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

    /// The peer of a datagram, from the cache when it is a data message
    /// for the same peer as the last one.
    fn cached_peer<'c>(
        &self,
        datagram: &[u8],
        cache: &'c mut Option<PeerCache>,
    ) -> Option<&'c mut PeerCache> {
        let generation = self.generation.load(Ordering::Acquire);
        // A data message: type 4, then the receiver's index (little-endian).
        let index = match datagram {
            [4, 0, 0, 0, a, b, c, d, ..] if datagram.len() >= 32 => {
                Some(u32::from_le_bytes([*a, *b, *c, *d]) >> 8)
            }
            _ => None,
        };
        let hit = matches!(cache, Some(c) if c.generation == generation && Some(c.index) == index);
        if !hit {
            let (key, tunnel) = self.peer_of(datagram)?;
            *cache = Some(PeerCache {
                generation,
                index: tunnel.index,
                key,
                tunnel,
                endpoint: None,
                source: None,
            });
        }
        cache.as_mut()
    }

    /// One datagram from the network: what it decrypts to goes to
    /// `st.packets`, what it answers to `st.replies`.
    fn receive(&self, datagram: &[u8], from: SocketAddr, st: &mut Inbound) {
        // An IPv4 peer on a dual-stack socket: remember it as IPv4.
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let Some(peer) = self.cached_peer(datagram, &mut st.peer) else {
            self.counters
                .dropped_datagrams
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (key, tunnel) = (peer.key, peer.tunnel.clone());
        let mut first = true;
        loop {
            let out = {
                let room = room_for(datagram.len().max(BUF));
                let dst = st.spare(room);
                let base = dst.as_ptr();
                let input: &[u8] = if first { datagram } else { &[] };
                match tunnel.lock().decapsulate(Some(from.ip()), input, dst) {
                    TunnResult::Done => Decap::Done,
                    TunnResult::Err(_) => Decap::Failed,
                    TunnResult::WriteToNetwork(b) => Decap::Network(span(base, b)),
                    TunnResult::WriteToTunnelV4(b, src) => Decap::Tunnel(span(base, b), src.into()),
                    TunnResult::WriteToTunnelV6(b, src) => Decap::Tunnel(span(base, b), src.into()),
                }
            };
            let was_first = std::mem::replace(&mut first, false);
            match out {
                Decap::Done => return,
                Decap::Failed => {
                    if was_first {
                        self.counters
                            .dropped_datagrams
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                // Handshake answers and queued packets: send, and keep draining.
                Decap::Network(r) => {
                    self.roamed(&key, from, &mut st.peer);
                    let at = st.filled;
                    let to = udp::for_socket(self.bind, from);
                    st.replies.push(to, &st.arena[at + r.start..at + r.end]);
                }
                Decap::Tunnel(r, src) => {
                    self.roamed(&key, from, &mut st.peer);
                    if r.is_empty() {
                        return; // a keepalive
                    }
                    if self.allowed(&key, src, &mut st.peer) {
                        let at = st.filled;
                        st.packets.push(at + r.start..at + r.end);
                        st.filled = at + r.end;
                    } else {
                        self.counters
                            .dropped_spoofed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
    }

    /// A packet that authenticated: the peer is where it came from (roaming).
    fn roamed(&self, key: &Key, from: SocketAddr, cache: &mut Option<PeerCache>) {
        let known = matches!(cache, Some(c) if c.key == *key && c.endpoint == Some(from));
        if known {
            return;
        }
        if self.lock().table.set_endpoint(key, from) {
            self.changed();
        }
        if let Some(c) = cache.as_mut().filter(|c| c.key == *key) {
            c.endpoint = Some(from);
        }
    }

    /// Whether `src` routes back to the peer `key` (the inbound source check).
    fn allowed(&self, key: &Key, src: IpAddr, cache: &mut Option<PeerCache>) -> bool {
        if let Some((s, ok)) = cache
            .as_ref()
            .filter(|c| c.key == *key)
            .and_then(|c| c.source)
        {
            if s == src {
                return ok;
            }
        }
        let ok = self.lock().table.allowed_src(key, src);
        if let Some(c) = cache.as_mut().filter(|c| c.key == *key) {
            c.source = Some((src, ok));
        }
        ok
    }

    /// Handshakes, keepalives and rekeys, every 250 ms.
    async fn timers(self: Arc<Self>, stop: CancellationToken) {
        let mut dst = vec![0u8; BUF];
        let mut batch = SendBatch::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let tunnels: Vec<(Arc<Tunnel>, Option<SocketAddr>)> = {
                let st = self.lock();
                st.tunnels
                    .iter()
                    .map(|(k, t)| (t.clone(), st.table.get(k).and_then(|p| p.endpoint)))
                    .collect()
            };
            for (t, ep) in tunnels {
                if let TunnResult::WriteToNetwork(b) = t.lock().update_timers(&mut dst) {
                    if let Some(ep) = ep {
                        batch.push(udp::for_socket(self.bind, ep), b);
                    }
                }
            }
            self.flush(&mut batch).await;
        }
    }
}

/// Where `part` (a slice boringtun wrote into the buffer starting at
/// `base`) lies in that buffer.
fn span(base: *const u8, part: &mut [u8]) -> Range<usize> {
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
    use super::{tests::config, *};
    use crate::mesh::netns::{in_ns, ip, two_hosts};

    #[test]
    fn a_packet_crosses_the_tunnel() {
        let (_hosts, na, nb) = two_hosts("", ("va", "192.168.77.1/24"), ("vb", "192.168.77.2/24"));
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

    /// Bytes from a seeded xorshift, the same for the sender and the
    /// checker whatever sizes they read and write in.
    struct Pattern {
        state: u64,
        word: [u8; 8],
        used: usize,
    }

    impl Pattern {
        fn new(seed: u64) -> Pattern {
            Pattern {
                state: seed | 1,
                word: [0; 8],
                used: 8,
            }
        }

        fn fill(&mut self, out: &mut [u8]) {
            for b in out {
                if self.used == 8 {
                    self.state ^= self.state << 13;
                    self.state ^= self.state >> 7;
                    self.state ^= self.state << 17;
                    self.word = self.state.to_le_bytes();
                    self.used = 0;
                }
                *b = self.word[self.used];
                self.used += 1;
            }
        }
    }

    async fn send_pattern(mut s: tokio::net::TcpStream, seed: u64, total: usize) {
        use tokio::io::AsyncWriteExt;
        let mut p = Pattern::new(seed);
        let mut buf = vec![0u8; 100_000]; // not a multiple of anything
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
        s.shutdown().await.unwrap();
    }

    /// Reads to the end: how many bytes came, and where the first one that
    /// differs from the pattern is.
    async fn check_pattern(mut s: tokio::net::TcpStream, seed: u64) -> (usize, Option<usize>) {
        use tokio::io::AsyncReadExt;
        let mut p = Pattern::new(seed);
        let (mut buf, mut want) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        let (mut got, mut bad) = (0, None);
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return (got, bad);
            }
            p.fill(&mut want[..n]);
            if bad.is_none() {
                bad = (0..n).find(|&i| buf[i] != want[i]).map(|i| got + i);
            }
            got += n;
        }
    }

    /// Brings up host `ns`'s mesh interface with a v4 and a v6 address.
    fn mesh_addresses(ns: &str, ifname: &str, v4: &str, v6: &str) {
        ip(&["-n", ns, "addr", "add", v4, "dev", ifname]);
        ip(&["-n", ns, "addr", "add", v6, "dev", ifname, "nodad"]);
        ip(&["-n", ns, "link", "set", ifname, "mtu", "1420", "up"]);
    }

    /// The peer config of one side: its peer's v4 and v6 mesh addresses.
    fn dual_config(key: Key, peer: Key, endpoint: Option<&str>, v4: &str, v6: &str) -> Vec<Op> {
        use crate::mesh::uapi::IpNet;
        let mut ops = config(key, 51820, peer, endpoint, v4);
        if let Some(Op::Peer(p)) = ops.last_mut() {
            p.allowed_ips
                .push(IpNet::new(v6.parse().unwrap(), 128).unwrap());
        }
        ops
    }

    /// TCP streams both ways at once (IPv4 A → B, IPv6 B → A) arrive byte
    /// for byte: through TUN segmentation offload on both sides (the
    /// kernel's super-packets split, sent as GSO runs, received as GRO
    /// runs, joined again), and between an offloading side and a plain one.
    #[test]
    fn tcp_streams_cross_intact_with_and_without_offload() {
        // Sizes hold thousands of super-packets each; more only costs time
        // on a loaded CI machine running a debug build.
        for (tag, offload_a, total) in [("o", true, 16 << 20), ("p", false, 4 << 20)] {
            let (up, down, view_a, view_b) = stream_both_ways(tag, offload_a, total);
            assert_eq!(
                up,
                (total, None),
                "A → B over IPv4, offload on A: {offload_a}"
            );
            assert_eq!(
                down,
                (total / 2, None),
                "B → A over IPv6, offload on A: {offload_a}"
            );
            // The byte counters saw it all: at least the payload, at most with headers.
            assert!(view_b.peers[0].rx_bytes as usize >= total, "{view_b:?}");
            assert!(view_a.peers[0].tx_bytes as usize >= total, "{view_a:?}");
            assert!(view_a.peers[0].rx_bytes as usize >= total / 2, "{view_a:?}");
            assert!(view_b.peers[0].tx_bytes as usize <= 2 * total, "{view_b:?}");
        }
    }

    type Streamed = (
        (usize, Option<usize>),
        (usize, Option<usize>),
        DeviceView,
        DeviceView,
    );

    fn stream_both_ways(tag: &str, offload_a: bool, total: usize) -> Streamed {
        let (_hosts, na, nb) = two_hosts(tag, ("vc", "192.168.78.1/24"), ("vd", "192.168.78.2/24"));
        let (ka, kb) = ([5u8; 32], [6u8; 32]);
        let stop = CancellationToken::new();
        // A's writes finishing only means its kernel holds the bytes: A's
        // device must keep running until B has read them all.
        let b_done = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (nb2, stop_b, b_done_b) = (nb.clone(), stop.clone(), b_done.clone());
        let b = in_ns(&nb, move || {
            Box::pin(async move {
                let dev = Arc::new(Device::new("192.168.78.2".parse().unwrap()));
                let cfg = dual_config(kb, ka, None, "10.67.0.1/32", "fd67::1");
                assert_eq!(dev.apply(&cfg).await, 0);
                let tun = Tun::create("wgd").unwrap();
                assert!(tun.offload(), "this kernel takes TUN offloads");
                mesh_addresses(&nb2, "wgd", "10.67.0.2/24", "fd67::2/64");
                tokio::spawn(dev.clone().run(tun, stop_b.clone()));
                let up = tokio::net::TcpListener::bind("10.67.0.2:7001")
                    .await
                    .unwrap();
                let down = tokio::net::TcpListener::bind("[fd67::2]:7002")
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                let work = async {
                    let ((s1, _), (s2, _)) =
                        (up.accept().await.unwrap(), down.accept().await.unwrap());
                    tokio::join!(check_pattern(s1, 1), send_pattern(s2, 2, total / 2)).0
                };
                let got = tokio::time::timeout(Duration::from_secs(120), work)
                    .await
                    .expect("A's streams within 2 minutes");
                b_done_b.cancel();
                stop_b.cancelled().await;
                (got, dev.view())
            })
        });
        ready_rx.recv().unwrap();
        let (na2, stop_a) = (na.clone(), stop.clone());
        let a = in_ns(&na, move || {
            Box::pin(async move {
                let dev = Arc::new(Device::new("192.168.78.1".parse().unwrap()));
                let cfg = dual_config(
                    ka,
                    kb,
                    Some("192.168.78.2:51820"),
                    "10.67.0.2/32",
                    "fd67::2",
                );
                assert_eq!(dev.apply(&cfg).await, 0);
                let tun = if offload_a {
                    Tun::create("wgc").unwrap()
                } else {
                    Tun::create_plain("wgc").unwrap()
                };
                assert_eq!(tun.offload(), offload_a);
                mesh_addresses(&na2, "wgc", "10.67.0.1/24", "fd67::1/64");
                tokio::spawn(dev.clone().run(tun, stop_a.clone()));
                let work = async {
                    // The first SYN waits for the handshake; connect retries it.
                    let up = tokio::net::TcpStream::connect("10.67.0.2:7001")
                        .await
                        .unwrap();
                    let down = tokio::net::TcpStream::connect("[fd67::2]:7002")
                        .await
                        .unwrap();
                    tokio::join!(send_pattern(up, 1, total), check_pattern(down, 2)).1
                };
                let got = tokio::time::timeout(Duration::from_secs(120), work)
                    .await
                    .expect("streams to B within 2 minutes");
                tokio::time::timeout(Duration::from_secs(120), b_done.cancelled())
                    .await
                    .expect("B read A's stream to its end within 2 minutes");
                // Let B's last ACKs and the counters settle.
                tokio::time::sleep(Duration::from_millis(200)).await;
                (got, dev.view())
            })
        });
        let (down, view_a) = a.join().unwrap();
        stop.cancel();
        let (up, view_b) = b.join().unwrap();
        (up, down, view_a, view_b)
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
                let mut st = Inbound::new();
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
                    dev.receive(&d, from, &mut st);
                    if i % 64 == 63 {
                        dev.deliver(&tun, &mut st).await;
                    }
                }
                let dropped = dev.counters.dropped_datagrams.load(Ordering::Relaxed);
                assert!(dropped >= 4_900, "dropped {dropped}");
                assert_eq!(dev.view().peers.len(), 1, "the peer is still there");
            });
        });
        t.join().unwrap();
    }
}

#[cfg(test)]
mod roaming_tests {
    use super::{tests::config, *};

    fn network(r: TunnResult<'_>) -> Vec<u8> {
        match r {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => panic!("expected a datagram"),
        }
    }

    /// An IPv4 packet from `src` to 10.0.0.1 carrying `payload`.
    fn packet(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[10, 0, 0, 1]);
        p.extend_from_slice(payload);
        p
    }

    /// A peer (a boringtun session driven by hand) handshakes from one
    /// address and then sends from another: the endpoint follows it at
    /// once, for the outbound route too; packets from a source it is not
    /// allowed are dropped and counted; the byte counters and the
    /// handshake time are kept.
    #[tokio::test]
    async fn the_endpoint_follows_a_peer_that_moves() {
        let (ours, theirs) = ([7u8; 32], [8u8; 32]);
        let dev = Device::new("127.0.0.1".parse().unwrap());
        let cfg = config(ours, 0, theirs, Some("127.0.0.1:9"), "10.0.0.2/32");
        assert_eq!(dev.apply(&cfg).await, 0);
        let our_public = PublicKey::from(&StaticSecret::from(ours));
        let mut peer = Tunn::new(StaticSecret::from(theirs), our_public, None, None, 1, None);
        let (mut st, mut buf) = (Inbound::new(), vec![0u8; 2048]);
        let (here, there): (SocketAddr, SocketAddr) = (
            "127.0.0.1:4001".parse().unwrap(),
            "127.0.0.1:4002".parse().unwrap(),
        );
        let mut routes = RouteCache::default();
        let to_peer = "10.0.0.2".parse().unwrap();
        assert_eq!(
            dev.route(to_peer, &mut routes).unwrap().1,
            Some("127.0.0.1:9".parse().unwrap())
        );

        let init = network(peer.format_handshake_initiation(&mut buf, false));
        dev.receive(&init, here, &mut st);
        let replies: Vec<_> = st.replies.iter().map(|(to, d)| (to, d.to_vec())).collect();
        assert_eq!(replies.len(), 1, "a handshake response");
        assert_eq!(replies[0].0, here, "answered where it came from");
        let keepalive = network(peer.decapsulate(None, &replies[0].1, &mut buf));
        dev.receive(&keepalive, here, &mut st);
        assert_eq!(dev.view().peers[0].endpoint, Some(here));
        assert_eq!(
            dev.route(to_peer, &mut routes).unwrap().1,
            Some(here),
            "the route saw it"
        );

        let p = packet([10, 0, 0, 2], b"from here");
        dev.receive(&network(peer.encapsulate(&p, &mut buf)), here, &mut st);
        let q = packet([10, 0, 0, 2], b"and from there");
        dev.receive(&network(peer.encapsulate(&q, &mut buf)), there, &mut st);
        let spoofed = packet([10, 0, 0, 3], b"not its address");
        dev.receive(
            &network(peer.encapsulate(&spoofed, &mut buf)),
            there,
            &mut st,
        );

        let got: Vec<&[u8]> = st.packets.iter().map(|r| &st.arena[r.clone()]).collect();
        assert_eq!(got, vec![&p[..], &q[..]]);
        assert_eq!(dev.counters.dropped_spoofed.load(Ordering::Relaxed), 1);
        let v = dev.view();
        assert_eq!(v.peers[0].endpoint, Some(there), "it moved");
        assert_eq!(dev.route(to_peer, &mut routes).unwrap().1, Some(there));
        assert_eq!(
            v.peers[0].rx_bytes as usize,
            p.len() + q.len() + spoofed.len()
        );
        assert!(v.peers[0].last_handshake.is_some());
        // The same datagram replayed from elsewhere is dropped and counted,
        // and the endpoint does not move to the replayer.
        let before = dev.counters.dropped_datagrams.load(Ordering::Relaxed);
        let replay = network(peer.encapsulate(&p, &mut buf));
        dev.receive(&replay, there, &mut st);
        dev.receive(&replay, here, &mut st);
        assert_eq!(
            dev.counters.dropped_datagrams.load(Ordering::Relaxed),
            before + 1
        );
        assert_eq!(dev.view().peers[0].endpoint, Some(there));
    }
}
