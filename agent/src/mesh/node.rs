//! The agent's own mesh interface. It is made when the coordinator first
//! puts the node in a cluster, changed live by every later `MeshConfig`
//! (only the peers that changed are touched, so the others keep their
//! sessions), and taken down when the node leaves its cluster. Each
//! `rtt_interval` it pings every peer over the mesh and publishes what
//! status, /metrics and telemetry show.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use super::{
    control,
    device::Device,
    ifaddr,
    peers::{split_config, Peer},
    place::Netns,
    rtt::{self, Pinger},
    tun::{self, Tun},
    uapi::{parse_net, Key, Op},
};

/// A config to apply, and where to say how it went: `Ok` with notes (peers
/// left out) or `Err` with why nothing was applied.
pub struct Request {
    pub config: pb::MeshConfig,
    /// For a config naming a lease: the network namespace of its first
    /// container, where the interface goes (found by the workload task,
    /// which owns Docker).
    pub netns: Option<Netns>,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// The mesh as `warden status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MeshStatus {
    pub interface: String,
    pub cluster_id: String,
    pub generation: u64,
    pub address: String,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
    /// Peers of the last config that were left out or are incomplete, and why.
    pub errors: Vec<String>,
    /// Datagrams that were not WireGuard, for no peer, or failed to authenticate.
    pub dropped_datagrams: u64,
}

/// One peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub node_id: String,
    /// Base64, as `wg` shows it.
    pub public_key: String,
    /// The same key as bytes, for telemetry.
    #[serde(skip)]
    pub key: Key,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// 0: no handshake yet.
    pub last_handshake_unix_ms: i64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The last ping's round trip; `None` when it went unanswered.
    pub rtt_ms: Option<f64>,
}

impl MeshStatus {
    /// The peers as telemetry carries them.
    pub fn samples(&self) -> Vec<pb::MeshPeerSample> {
        self.peers
            .iter()
            .map(|p| pb::MeshPeerSample {
                node_id: p.node_id.clone(),
                public_key: p.key.to_vec(),
                endpoint: p.endpoint.clone().unwrap_or_default(),
                last_handshake_unix_ms: p.last_handshake_unix_ms,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rtt_ms: p.rtt_ms.unwrap_or(-1.0),
                cluster_id: self.cluster_id.clone(),
            })
            .collect()
    }
}

/// One pushed peer, checked: what to configure, and what was wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub node_id: String,
    pub peer: Peer,
}

/// Turns the pushed peers into table peers, given how their endpoints
/// resolved (`resolved`: endpoint text → address or why not). A peer with
/// a malformed key or allowed IP is left out; one whose endpoint does not
/// resolve is kept without an endpoint (it can still reach us). Then
/// overlapping allowed IPs and repeated keys are left out as
/// [`split_config`] decides. Each problem is one line naming the peer.
pub fn wanted(
    peers: &[pb::MeshPeer],
    resolved: &HashMap<String, Result<SocketAddr, String>>,
) -> (Vec<Wanted>, Vec<String>) {
    let mut errors = Vec::new();
    let mut names: HashMap<Key, String> = HashMap::new();
    let mut list = Vec::new();
    'peers: for p in peers {
        let who = if p.node_id.is_empty() {
            "(unnamed)"
        } else {
            &p.node_id
        };
        let Ok(key) = <Key>::try_from(p.public_key.as_slice()) else {
            errors.push(format!(
                "peer {who}: public key is {} bytes, not 32; left out",
                p.public_key.len()
            ));
            continue;
        };
        let mut peer = Peer::new(key);
        for a in &p.allowed_ips {
            match parse_net(a) {
                Ok(n) => peer.allowed_ips.push(n),
                Err(e) => {
                    errors.push(format!("peer {who}: allowed IP `{a}`: {e}; left out"));
                    continue 'peers;
                }
            }
        }
        if !p.endpoint.is_empty() {
            match resolved.get(&p.endpoint) {
                Some(Ok(ep)) => peer.endpoint = Some(*ep),
                Some(Err(e)) => errors.push(format!(
                    "peer {who}: endpoint `{}` does not resolve ({e}); kept, waiting for it to call",
                    p.endpoint
                )),
                None => errors.push(format!(
                    "peer {who}: endpoint `{}` was not resolved; kept, waiting for it to call",
                    p.endpoint
                )),
            }
        }
        peer.keepalive = u16::try_from(p.keepalive_seconds).unwrap_or(u16::MAX);
        names.entry(key).or_insert_with(|| p.node_id.clone());
        list.push(peer);
    }
    let (ok, bad) = split_config(&list);
    for (k, e) in bad {
        let who = names.get(&k).cloned().unwrap_or_default();
        errors.push(format!("peer {who}: {e}; left out"));
    }
    let ok = ok
        .into_iter()
        .map(|peer| Wanted {
            node_id: names.get(&peer.public_key).cloned().unwrap_or_default(),
            peer,
        })
        .collect();
    (ok, errors)
}

/// Resolves "host:port" endpoints (IP literals need no lookup).
async fn resolve(peers: &[pb::MeshPeer]) -> HashMap<String, Result<SocketAddr, String>> {
    let mut out = HashMap::new();
    for p in peers.iter().filter(|p| !p.endpoint.is_empty()) {
        if out.contains_key(&p.endpoint) {
            continue;
        }
        let r = match p.endpoint.parse::<SocketAddr>() {
            Ok(a) => Ok(a),
            Err(_) => match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host(p.endpoint.clone()),
            )
            .await
            {
                Ok(Ok(mut it)) => it.next().ok_or_else(|| "no address".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("lookup timed out".to_owned()),
            },
        };
        out.insert(p.endpoint.clone(), r);
    }
    out
}

/// The task's settings.
pub struct MeshNode {
    pub config: crate::config::MeshConfig,
    pub private_key: Key,
    /// Where the interface's UAPI socket goes, so `wg show` works on it.
    pub socket_dir: PathBuf,
    pub status: watch::Sender<Option<MeshStatus>>,
}

struct Running {
    /// The lease whose container's namespace holds the interface ("" for
    /// the host's), and that namespace.
    lease_id: String,
    netns: Option<Netns>,
    /// Pings from where the interface is.
    pinger: Option<Pinger>,
    dev: Arc<Device>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    interface: String,
    cluster_id: String,
    generation: u64,
    address: String,
    names: HashMap<Key, String>,
    errors: Vec<String>,
    rtt: HashMap<Key, Duration>,
}

impl Running {
    /// A pinger where the interface is.
    fn open_pinger(&self) -> std::io::Result<Pinger> {
        let socket = match &self.netns {
            None => rtt::raw_socket()?,
            Some(ns) => ns.run(rtt::raw_socket)??,
        };
        Pinger::from_socket(socket)
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    fn status(&self) -> MeshStatus {
        use base64::Engine;
        let view = self.dev.view();
        let epoch_ms = |d: Duration| d.as_millis() as i64;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        MeshStatus {
            interface: self.interface.clone(),
            cluster_id: self.cluster_id.clone(),
            generation: self.generation,
            address: self.address.clone(),
            listen_port: view.listen_port,
            peers: view
                .peers
                .iter()
                .map(|p| PeerStatus {
                    node_id: self.names.get(&p.public_key).cloned().unwrap_or_default(),
                    public_key: base64::engine::general_purpose::STANDARD.encode(p.public_key),
                    key: p.public_key,
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    // The view holds the handshake time since the epoch.
                    last_handshake_unix_ms: p
                        .last_handshake
                        .filter(|t| *t <= now)
                        .map(epoch_ms)
                        .unwrap_or(0),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    rtt_ms: self
                        .rtt
                        .get(&p.public_key)
                        .map(|d| d.as_secs_f64() * 1000.0),
                })
                .collect(),
            errors: self.errors.clone(),
            dropped_datagrams: self
                .dev
                .counters
                .dropped_datagrams
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl MeshNode {
    /// Applies configs from `requests` until `shutdown`, then takes the
    /// interface down.
    pub async fn run(self, mut requests: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut running: Option<Running> = None;
        let mut applied_generation = 0u64;
        let mut pinger_said = false;
        let every = self.config.rtt_interval.max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = requests.recv() => {
                    let Some(Request { config: cfg, netns, reply }) = r else { break };
                    let outcome = if cfg.generation < applied_generation {
                        Ok(format!(
                            "ignored: generation {} is older than the applied {applied_generation}",
                            cfg.generation
                        ))
                    } else {
                        let r = self.apply(&mut running, cfg.clone(), netns).await;
                        if r.is_ok() {
                            applied_generation = cfg.generation;
                        }
                        r
                    };
                    match &outcome {
                        Ok(note) if note.is_empty() => tracing::info!(cluster = %cfg.cluster_id, generation = cfg.generation, peers = cfg.peers.len(), "mesh config applied"),
                        Ok(note) => tracing::warn!(cluster = %cfg.cluster_id, generation = cfg.generation, %note, "mesh config applied, with problems"),
                        Err(e) => tracing::warn!(cluster = %cfg.cluster_id, error = %e, "mesh config not applied"),
                    }
                    let _ = reply.send(outcome);
                    self.status.send_replace(running.as_ref().map(Running::status));
                }
                _ = tick.tick() => {
                    let Some(run) = running.as_mut() else { continue };
                    if run.pinger.is_none() {
                        match run.open_pinger() {
                            Ok(p) => run.pinger = Some(p),
                            Err(e) if !pinger_said => {
                                pinger_said = true;
                                tracing::warn!(error = %e, "cannot open a raw ICMP socket: no mesh round-trip times");
                            }
                            Err(_) => {}
                        }
                    }
                    if let Some(p) = run.pinger.as_mut() {
                        let targets: Vec<(Key, Ipv4Addr)> = run
                            .dev
                            .view()
                            .peers
                            .iter()
                            .filter_map(|peer| {
                                let first = peer.allowed_ips.first()?;
                                match first.addr() {
                                    IpAddr::V4(a) => Some((peer.public_key, a)),
                                    IpAddr::V6(_) => None,
                                }
                            })
                            .collect();
                        let wait = (every / 2).min(Duration::from_secs(5));
                        run.rtt = tokio::select! {
                            r = p.round(&targets, wait) => r,
                            _ = shutdown.cancelled() => break,
                        };
                    }
                    self.status.send_replace(Some(run.status()));
                }
                _ = shutdown.cancelled() => break,
            }
        }
        if let Some(r) = running.take() {
            r.stop().await;
        }
        self.status.send_replace(None);
    }

    async fn apply(
        &self,
        running: &mut Option<Running>,
        cfg: pb::MeshConfig,
        netns: Option<Netns>,
    ) -> Result<String, String> {
        if cfg.cluster_id.is_empty() {
            if let Some(r) = running.take() {
                let name = r.interface.clone();
                r.stop().await;
                tracing::info!(interface = %name, "left the mesh; interface removed");
            }
            return Ok(String::new());
        }
        let (addr, prefix) = match parse_net(&cfg.address) {
            Ok(ipnet::IpNet::V4(n)) => (n.addr(), n.prefix_len()),
            _ => {
                return Err(format!(
                    "mesh address `{}` is not IPv4 ADDR/PREFIX",
                    cfg.address
                ))
            }
        };
        let resolved = resolve(&cfg.peers).await;
        let (wanted, errors) = wanted(&cfg.peers, &resolved);
        // The interface moves (host ↔ a lease's container) by being made
        // anew where it now belongs.
        if running.as_ref().is_some_and(|r| r.lease_id != cfg.lease_id) {
            if let Some(r) = running.take() {
                let (name, from) = (r.interface.clone(), r.lease_id.clone());
                r.stop().await;
                tracing::info!(interface = %name, lease = %from, "mesh interface moves: taken down where it was");
            }
        }
        if running.is_none() {
            let netns = match (cfg.lease_id.as_str(), netns) {
                ("", _) => None,
                (_, Some(ns)) => Some(ns),
                (lease, None) => {
                    return Err(format!(
                        "lease {lease} has no running container to put the mesh interface in"
                    ))
                }
            };
            *running = Some(self.start(cfg.lease_id.clone(), netns).await?);
        }
        let Some(run) = running.as_mut() else {
            return Err("the mesh interface is not running".into());
        };
        if run.address != cfg.address {
            let (name, mtu) = (run.interface.clone(), self.config.mtu);
            let configure = move || ifaddr::configure(&name, addr, prefix, mtu);
            match &run.netns {
                None => configure(),
                Some(ns) => ns
                    .run(configure)
                    .map_err(|e| format!("{}: {e}", ns.label))?,
            }
            .map_err(|e| e.to_string())?;
            run.address = cfg.address.clone();
        }
        let peers: Vec<Peer> = wanted.iter().map(|w| w.peer.clone()).collect();
        let ops = run.dev.diff_to(&peers);
        let errno = run.dev.apply(&ops).await;
        if errno != 0 {
            return Err(format!(
                "the device refused the peer changes (errno {errno})"
            ));
        }
        run.names = wanted
            .into_iter()
            .map(|w| (w.peer.public_key, w.node_id))
            .collect();
        run.rtt.retain(|k, _| run.names.contains_key(k));
        run.cluster_id = cfg.cluster_id;
        run.generation = cfg.generation;
        run.errors = errors.clone();
        Ok(errors.join("; "))
    }

    /// Makes the interface: TUN (on the host, or inside `netns`), device
    /// with our key and port (always on the host), UAPI socket.
    async fn start(&self, lease_id: String, netns: Option<Netns>) -> Result<Running, String> {
        let name = self.config.interface.as_str();
        let opened = match &netns {
            None => tun::open_best(name),
            Some(ns) => ns
                .run(|| tun::open_best(name))
                .map_err(|e| format!("entering {}: {e}", ns.label))?,
        }
        .map_err(|e| e.to_string())?;
        let tun = Tun::from_opened(opened).map_err(|e| e.to_string())?;
        let interface = tun.name().to_owned();
        if let Some(ns) = &netns {
            super::place::mesh_only_inbound(ns, &interface)?;
        }
        // Dual-stack: IPv4 peers arrive as mapped addresses.
        let dev = Arc::new(Device::new(Ipv6Addr::UNSPECIFIED.into()));
        let errno = dev
            .apply(&[
                Op::PrivateKey(self.private_key),
                Op::ListenPort(self.config.listen_port),
            ])
            .await;
        if errno != 0 {
            return Err(format!(
                "mesh.listen_port {} cannot be bound (in use?)",
                self.config.listen_port
            ));
        }
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let path = control::socket_path(&self.socket_dir, &interface);
        match control::bind(&path) {
            Ok((l, file)) => tasks.push(tokio::spawn(control::serve(
                l,
                file,
                dev.clone(),
                stop.clone(),
            ))),
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "no UAPI socket: `wg show` will not see the mesh")
            }
        }
        tasks.push(tokio::spawn(dev.clone().run(tun, stop.clone())));
        match &netns {
            None => {
                tracing::info!(%interface, port = self.config.listen_port, "mesh interface up")
            }
            Some(ns) => {
                tracing::info!(%interface, port = self.config.listen_port, netns = %ns.label, "mesh interface up in the lease's container")
            }
        }
        Ok(Running {
            lease_id,
            netns,
            pinger: None,
            dev,
            stop,
            tasks,
            interface,
            cluster_id: String::new(),
            generation: 0,
            address: String::new(),
            names: HashMap::new(),
            errors: Vec::new(),
            rtt: HashMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str, key: &[u8], ep: &str, ips: &[&str]) -> pb::MeshPeer {
        pb::MeshPeer {
            node_id: node.into(),
            public_key: key.to_vec(),
            endpoint: ep.into(),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            keepalive_seconds: 25,
        }
    }

    #[test]
    fn each_bad_peer_costs_only_itself_and_is_named() {
        let mut resolved = HashMap::new();
        resolved.insert(
            "192.0.2.2:51820".to_string(),
            Ok("192.0.2.2:51820".parse().unwrap()),
        );
        resolved.insert("nowhere.invalid:1".to_string(), Err("no such host".into()));
        let peers = [
            peer("b", &[2; 32], "192.0.2.2:51820", &["10.90.0.2/32"]),
            peer("short", &[3; 31], "", &["10.90.0.3/32"]),
            peer("badip", &[4; 32], "", &["10.90.0.400/32"]),
            peer("lost", &[5; 32], "nowhere.invalid:1", &["10.90.0.5/32"]),
            peer("overlap", &[6; 32], "", &["10.90.0.0/24"]),
            peer("again", &[2; 32], "", &["10.90.0.9/32"]),
        ];
        let (ok, errors) = wanted(&peers, &resolved);
        let names: Vec<&str> = ok.iter().map(|w| w.node_id.as_str()).collect();
        assert_eq!(names, ["b", "lost"]);
        assert_eq!(
            ok[0].peer.endpoint,
            Some("192.0.2.2:51820".parse().unwrap())
        );
        assert_eq!(ok[0].peer.keepalive, 25);
        assert_eq!(ok[1].peer.endpoint, None, "kept without an endpoint");
        assert_eq!(errors.len(), 5, "{errors:#?}");
        for (e, who) in errors
            .iter()
            .zip(["short", "badip", "lost", "overlap", "b"])
        {
            assert!(e.starts_with(&format!("peer {who}:")), "{e}");
        }
        assert!(errors[0].contains("31 bytes"));
        assert!(errors[2].contains("does not resolve (no such host)"));
        assert!(errors[3].contains("overlaps"), "{}", errors[3]);
        assert!(errors[4].contains("more than once"), "{}", errors[4]);
    }

    #[test]
    fn status_becomes_telemetry_samples() {
        let s = MeshStatus {
            cluster_id: "c1".into(),
            peers: vec![PeerStatus {
                node_id: "b".into(),
                public_key: "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=".into(),
                key: [2; 32],
                endpoint: Some("192.0.2.2:51820".into()),
                rx_bytes: 5,
                tx_bytes: 7,
                rtt_ms: None,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = s.samples();
        assert_eq!(t[0].public_key, vec![2u8; 32]);
        assert_eq!(t[0].rtt_ms, -1.0);
        assert_eq!((t[0].rx_bytes, t[0].tx_bytes), (5, 7));
        assert_eq!(t[0].cluster_id, "c1");
    }
}

#[cfg(test)]
mod netns_tests {
    use std::path::Path;

    use super::*;
    use crate::mesh::netns::{in_ns, ip, two_hosts, Hosts};

    fn public(private: Key) -> Vec<u8> {
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(private))
            .as_bytes()
            .to_vec()
    }

    /// Waits until the status shows an answered ping to the peer.
    fn wait_rtt(status: &watch::Receiver<Option<MeshStatus>>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let rtt = status
                .borrow()
                .as_ref()
                .and_then(|s| s.peers.first().and_then(|p| p.rtt_ms));
            if rtt.is_some() {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no ping answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A UDP socket made inside namespace `ns` (std sockets need no runtime).
    fn udp_in(ns: &str, bind: &str) -> std::net::UdpSocket {
        let ns = Netns::open(Path::new(&format!("/var/run/netns/{ns}")), ns.into()).unwrap();
        let s = ns.run(|| std::net::UdpSocket::bind(bind)).unwrap().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    }

    /// Whether a datagram sent from namespace `from` reaches `to` (an
    /// address in namespace `to_ns`).
    fn reaches(from: &str, to_ns: &str, to: &str) -> bool {
        let rx = udp_in(to_ns, &format!("{to}:0"));
        let tx = udp_in(from, "0.0.0.0:0");
        if tx.send_to(b"hi", rx.local_addr().unwrap()).is_err() {
            return false;
        }
        let mut buf = [0u8; 8];
        matches!(rx.recv_from(&mut buf), Ok((2, _)))
    }

    /// Two hosts whose mesh interfaces live in a "container" namespace each
    /// (as a hired cluster's leases): the containers reach each other over
    /// the mesh, while neither host has a route to the mesh addresses; the
    /// UDP sockets stay on the hosts. Taking the mesh down removes the
    /// interface from the container.
    #[test]
    fn the_mesh_lives_in_the_lease_container_and_not_on_the_host() {
        let (_hosts, ha, hb) =
            two_hosts("pl", ("vpa", "192.168.79.1/24"), ("vpb", "192.168.79.2/24"));
        let id = std::process::id();
        let (ca, cb) = (format!("wtplca-{id}"), format!("wtplcb-{id}"));
        let _containers = Hosts(vec![ca.clone(), cb.clone()]);
        for c in [&ca, &cb] {
            ip(&["netns", "add", c]);
            ip(&["-n", c, "link", "set", "lo", "up"]);
        }
        let (ka, kb) = ([7u8; 32], [8u8; 32]);
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let start =
            |host: &str, container: &str, key: Key, peer: Key, me: &str, other: (&str, &str)| {
                let (tx, rx) = mpsc::channel::<Request>(4);
                let (status, status_rx) = watch::channel(None);
                let node = MeshNode {
                    config: crate::config::MeshConfig {
                        interface: "wmesh0".into(),
                        rtt_interval: Duration::from_millis(200),
                        ..Default::default()
                    },
                    private_key: key,
                    socket_dir: dir.path().join(host),
                    status,
                };
                let stop = stop.clone();
                let handle = in_ns(host, move || Box::pin(node.run(rx, stop)));
                let cfg = pb::MeshConfig {
                    cluster_id: "c1".into(),
                    generation: 1,
                    address: format!("{me}/24"),
                    lease_id: "l-1".into(),
                    peers: vec![pb::MeshPeer {
                        node_id: "peer".into(),
                        public_key: public(peer),
                        endpoint: format!("{}:51820", other.1),
                        allowed_ips: vec![format!("{}/32", other.0)],
                        keepalive_seconds: 1,
                    }],
                };
                let netns = Netns::open(
                    Path::new(&format!("/var/run/netns/{container}")),
                    container.to_owned(),
                )
                .unwrap();
                (tx, cfg, netns, (handle, status_rx))
            };
        let (txa, cfga, nsa, (ta, sa)) =
            start(&ha, &ca, ka, kb, "10.88.0.1", ("10.88.0.2", "192.168.79.2"));
        let (txb, cfgb, nsb, (tb, _sb)) =
            start(&hb, &cb, kb, ka, "10.88.0.2", ("10.88.0.1", "192.168.79.1"));
        let apply = |tx: &mpsc::Sender<Request>, config: pb::MeshConfig, netns: Option<Netns>| {
            let (reply, rx) = oneshot::channel();
            tx.blocking_send(Request {
                config,
                netns,
                reply,
            })
            .unwrap();
            rx.blocking_recv().unwrap()
        };
        // A config naming a lease with no namespace given is refused.
        let err = apply(&txa, cfga.clone(), None).unwrap_err();
        assert!(err.contains("no running container"), "{err}");
        assert_eq!(apply(&txa, cfga.clone(), Some(nsa)), Ok(String::new()));
        assert_eq!(apply(&txb, cfgb, Some(nsb)), Ok(String::new()));

        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !reaches(&ca, &cb, "10.88.0.2") {
            assert!(
                std::time::Instant::now() < deadline,
                "container A never reached B: {:?}",
                *sa.borrow()
            );
        }
        assert!(reaches(&cb, &ca, "10.88.0.1"));
        // Neither host, nor anything else there, has the mesh.
        assert!(!reaches(&ha, &cb, "10.88.0.2"), "host A reaches the mesh");
        assert!(!reaches(&hb, &ca, "10.88.0.1"), "host B reaches the mesh");
        // The pinger pings from inside the container too.
        wait_rtt(&sa);
        let links = std::process::Command::new("ip")
            .args(["-n", &ha, "link", "show", "wmesh0"])
            .output()
            .unwrap();
        assert!(!links.status.success(), "no interface on host A");

        // Leaving takes the interface out of the container.
        let leave = pb::MeshConfig {
            generation: 2,
            ..Default::default()
        };
        assert_eq!(apply(&txa, leave, None), Ok(String::new()));
        let gone = std::process::Command::new("ip")
            .args(["-n", &ca, "link", "show", "wmesh0"])
            .output()
            .unwrap();
        assert!(!gone.status.success(), "the interface left container A");
        stop.cancel();
        ta.join().unwrap();
        tb.join().unwrap();
    }
}
