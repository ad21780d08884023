//! A load generator for the coordinator (issue #15): N simulated agents in
//! this one process against a real `warden coordinator --dev` process
//! (SQLite, or PostgreSQL). Each agent has its own Ed25519 node key and its own TLS
//! connection, does the real handshake (Hello → Register signed with the
//! Hello's nonce → Registered, Welcome) and then sends what an agent sends at
//! its default rates: heartbeats, telemetry with 8 GPU samples, and for the
//! leased fraction an attestation each epoch, all signed, with increasing
//! seqs as the spool gives them. Heartbeats start at registration; records
//! once all N are registered; the window opens one longest interval later.
//!
//! Run with `cargo bench --bench coordload`; prints a table per N, asserts
//! nothing. Environment:
//! - `WARDEN_LOAD_AGENTS`: agent counts, comma-separated (default "100,1000");
//! - `WARDEN_LOAD_SECONDS`: the steady window measured (default 20);
//! - `WARDEN_LOAD_LEASED`: the fraction of agents with a lease (default 0.1);
//! - `WARDEN_LOAD_RATE`: multiplies each agent's record rates (telemetry,
//!   attestations; heartbeats stay at their interval) (default 1);
//! - `WARDEN_LOAD_BACKLOG`: instead of the mix, each agent comes with this
//!   many records already signed in its spool (telemetry, and attestations
//!   for the leased) and sends them as the agent's uplink does, up to its
//!   `max_in_flight` unreceipted: the drain after an outage, a coordinator's
//!   busiest record path; the window ends when all are receipted;
//! - `WARDEN_LOAD_POSTGRES` (and `WARDEN_LOAD_POSTGRES_CA`): store in that
//!   PostgreSQL database instead of SQLite.
//!
//! The agents do not verify the coordinator's signatures (a real agent
//! does): their CPU is this machine's too, and the figures are the
//! coordinator's.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prost::Message;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warden_agent::config::AgentConfig;
use warden_proto::{
    dsse::{self, Signer},
    pb::{self, uplink_client::UplinkClient, Envelope},
    types,
};

mod common;

/// GPUs per simulated node, as in issue #15's mix.
const GPUS: u32 = 8;
/// Registrations in flight at once: enough to fill the table quickly without
/// letting handshakes queue past the coordinator's handshake timeout.
const REGISTERING: usize = 32;
/// How long after the window the agents wait for the last receipts.
const GRACE: Duration = Duration::from_secs(3);

fn main() {
    common::raise_nofile();
    let counts: Vec<usize> = env("WARDEN_LOAD_AGENTS", "100,1000")
        .split(',')
        .map(|s| s.trim().parse().expect("WARDEN_LOAD_AGENTS: numbers"))
        .collect();
    let load = Load {
        secs: env("WARDEN_LOAD_SECONDS", "20")
            .parse()
            .expect("WARDEN_LOAD_SECONDS: a number"),
        leased: env("WARDEN_LOAD_LEASED", "0.1")
            .parse()
            .expect("WARDEN_LOAD_LEASED: a fraction"),
        rate: env("WARDEN_LOAD_RATE", "1")
            .parse()
            .expect("WARDEN_LOAD_RATE: a number"),
        backlog: env("WARDEN_LOAD_BACKLOG", "0")
            .parse()
            .expect("WARDEN_LOAD_BACKLOG: a number"),
        defaults: AgentConfig::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(outage) = std::env::var("WARDEN_LOAD_STORM") {
        let outage = Duration::from_secs(outage.parse().expect("WARDEN_LOAD_STORM: seconds"));
        for n in counts {
            rt.block_on(storm(n, outage, &load));
        }
        return;
    }
    for n in counts {
        let f = rt.block_on(run(n, &load));
        f.print(n, &load);
    }
}

/// A reconnect storm: N agents registered and heartbeating; the
/// coordinator SIGKILLed, down for `outage`, started again on its port and
/// state; each agent meanwhile retries as the real one does (its uplink's
/// jittered exponential backoff, `uplink.backoff_initial` to
/// `backoff_max`). Prints how long after the restart all N were registered
/// again, and the coordinator's CPU and largest RSS until then.
async fn storm(n: usize, outage: Duration, load: &Load) {
    let tmp = tempfile::tempdir().unwrap();
    let (coord, port, ca_path) = coordinator(tmp.path(), n);
    let ca = Certificate::from_pem(std::fs::read(&ca_path).unwrap());
    let shared = Arc::new(Shared::default());
    let (_window_tx, window_rx) = watch::channel(None::<(Instant, Instant)>);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(REGISTERING));
    let (back_tx, mut back_rx) = mpsc::unbounded_channel::<Instant>();
    let (up_tx, mut up_rx) = mpsc::channel::<()>(n.max(1));
    let uplink = load.defaults.uplink.clone();
    for i in 0..n {
        let agent = Agent {
            backlog: 0,
            in_flight: uplink.max_in_flight,
            index: i,
            leased: false,
            port,
            ca: ca.clone(),
            plan: Plan {
                heartbeat: uplink.heartbeat_interval,
                telemetry: Duration::from_secs(3600),
                epoch: Duration::from_secs(3600),
            },
            shared: shared.clone(),
            window: window_rx.clone(),
            stop: stop_rx.clone(),
        };
        let (gate, up, back, uplink) =
            (gate.clone(), up_tx.clone(), back_tx.clone(), uplink.clone());
        tokio::spawn(async move {
            let (node, _) = Signer::generate().unwrap();
            let mut first = true;
            let mut attempt = 0u32;
            loop {
                let registered = if first {
                    let _turn = gate.acquire().await;
                    agent.register(&node).await
                } else {
                    agent.register(&node).await
                };
                match registered {
                    Ok(mut s) => {
                        attempt = 0;
                        if std::mem::take(&mut first) {
                            let _ = up.send(()).await;
                        } else {
                            let _ = back.send(Instant::now());
                        }
                        // Held (heartbeats) until the coordinator goes.
                        agent.clone().send_mix(&node, &mut s).await;
                    }
                    Err(kind) if !first => shared_error(&agent, kind),
                    Err(kind) => {
                        shared_error(&agent, kind);
                        return;
                    }
                }
                let wait = warden_agent::delivery::uplink::backoff(
                    attempt,
                    uplink.backoff_initial,
                    uplink.backoff_max,
                    rand::random::<f64>(),
                );
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
        });
    }
    drop(up_tx);
    let mut up = 0;
    while up < n && up_rx.recv().await.is_some() {
        up += 1;
    }
    let pid = coord.0.id();
    drop(coord); // SIGKILL
    let killed = Instant::now();
    tokio::time::sleep(outage).await;
    let (coord, _, _) = restart(tmp.path(), n, port);
    let restarted = Instant::now();
    let pid2 = coord.0.id();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (ticks0, _) = common::proc_figures(pid2);
    let mut back = 0;
    let mut max_rss = 0;
    let mut last = restarted;
    let deadline = restarted + Duration::from_secs(120);
    while back < up && Instant::now() < deadline {
        tokio::select! {
            t = back_rx.recv() => {
                if let Some(t) = t {
                    back += 1;
                    last = last.max(t);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        max_rss = max_rss.max(common::proc_figures(pid2).1);
    }
    let (ticks1, rss) = common::proc_figures(pid2);
    let settle = last.duration_since(restarted);
    let _ = pid;
    println!(
        "coordload storm agents={n} outage={}s backoff={:?}..{:?}",
        outage.as_secs(),
        uplink.backoff_initial,
        uplink.backoff_max
    );
    println!("  registered before  {up} of {n}");
    println!(
        "  back after restart {back} of {up}, the last {:.1}s after the restart ({:.1}s after the kill)",
        settle.as_secs_f64(),
        last.duration_since(killed).as_secs_f64()
    );
    println!(
        "  coordinator cpu    {:.1}% of one core until then",
        (ticks1 - ticks0) as f64 / hz / settle.as_secs_f64().max(1e-3) * 100.0
    );
    println!(
        "  coordinator rss    {:.0} MiB at the end (max {:.0} MiB)",
        rss as f64 / 1024.0,
        max_rss.max(rss) as f64 / 1024.0
    );
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap());
    println!("  errors             {errors:?}");
}

/// The run's coordinator started again on `port`, state kept.
fn restart(dir: &Path, n: usize, port: u16) -> (common::Killed, u16, PathBuf) {
    let (config, _) = coordinator_config(n);
    common::dev_coordinator_on(dir, &config, port)
}

fn shared_error(agent: &Agent, kind: String) {
    agent.shared.error(format!("register: {kind}"));
}

/// An environment variable, or its default.
fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.into())
}

/// What every run shares: the window, the mix, and the agent's defaults the
/// rates come from.
struct Load {
    secs: u64,
    leased: f64,
    rate: f64,
    /// Records each agent drains instead of the mix (0: the mix).
    backlog: usize,
    defaults: AgentConfig,
}

impl Load {
    /// An agent default interval, divided by the rate multiplier.
    fn every(&self, d: Duration) -> Duration {
        d.div_f64(self.rate.max(1e-3))
    }
}

/// A dev coordinator process whose enrollment rate does not pace the bench
/// (the bench enrolls N fresh identities at once; the default allows 60 a
/// minute) and whose connection table holds N; other limits as shipped.
/// With `WARDEN_LOAD_POSTGRES` (a URL, and `WARDEN_LOAD_POSTGRES_CA` for
/// TLS) it stores in that PostgreSQL instead of SQLite.
fn coordinator(dir: &Path, n: usize) -> (common::Killed, u16, PathBuf) {
    let (config, _) = coordinator_config(n);
    common::dev_coordinator(dir, &config)
}

/// The coordinator's config for a run of `n` agents, and its connection cap.
fn coordinator_config(n: usize) -> (String, usize) {
    let max = (n + 256).max(8192);
    let postgres = match std::env::var("WARDEN_LOAD_POSTGRES") {
        Ok(url) => {
            let ca = std::env::var("WARDEN_LOAD_POSTGRES_CA")
                .map(|ca| format!("ca_cert = \"{ca}\"\n"))
                .unwrap_or_default();
            format!("[postgres]\nurl = \"{url}\"\n{ca}")
        }
        Err(_) => String::new(),
    };
    let config = format!(
        "[enrollment]\nnew_nodes_per_minute = 1000000\nnew_nodes_per_minute_per_ip = 1000000\n\
         [limits]\nmax_connections = {max}\n{postgres}"
    );
    (config, max)
}

/// The loopback address agent `i` connects from: one per agent, so the
/// per-address connection cap never applies.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, 1 + (i % 250) as u8))
}

/// Counters every agent updates; read by the sampler and at the end.
#[derive(Default)]
struct Shared {
    /// Agents registered and not disconnected.
    streams: AtomicI64,
    /// Records sent and receipted inside the window.
    sent: AtomicU64,
    receipted: AtomicU64,
    heartbeats: AtomicU64,
    /// Agents whose backlog is all receipted.
    drained: AtomicU64,
    /// Errors by kind ("register: Unavailable", "refusal: CONFLICT", ...).
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Send → receipt, µs, for records sent inside the window.
    latencies: std::sync::Mutex<Vec<u64>>,
}

impl Shared {
    fn error(&self, kind: String) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }
}

/// One run's figures.
struct Figures {
    register: Duration,
    registered: usize,
    window: f64,
    sent: u64,
    receipted: u64,
    heartbeats: u64,
    p50: Duration,
    p99: Duration,
    unanswered: usize,
    cpu: f64,
    rss_mib: f64,
    max_rss_mib: f64,
    streams_min: i64,
    streams_max: i64,
    errors: BTreeMap<String, u64>,
}

impl Figures {
    fn print(&self, n: usize, load: &Load) {
        println!(
            "coordload agents={n} leased={} {} window={:.1}s",
            load.leased,
            if load.backlog > 0 {
                format!(
                    "backlog={} in_flight={}",
                    load.backlog, load.defaults.uplink.max_in_flight
                )
            } else {
                format!("rate=x{}", load.rate)
            },
            self.window
        );
        let rows = [
            (
                "registration",
                format!(
                    "{} of {n} in {:.1}s ({:.0}/s)",
                    self.registered,
                    self.register.as_secs_f64(),
                    self.registered as f64 / self.register.as_secs_f64().max(1e-6)
                ),
            ),
            (
                "streams held",
                format!(
                    "{}..{} during the window",
                    self.streams_min, self.streams_max
                ),
            ),
            (
                "records sent",
                format!("{} ({:.0}/s)", self.sent, self.sent as f64 / self.window),
            ),
            (
                "records receipted",
                format!(
                    "{} ({:.0}/s)",
                    self.receipted,
                    self.receipted as f64 / self.window
                ),
            ),
            (
                "heartbeats",
                format!(
                    "{} ({:.0}/s)",
                    self.heartbeats,
                    self.heartbeats as f64 / self.window
                ),
            ),
            (
                "receipt latency",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms ({} unanswered {}s after the window)",
                    self.p50.as_secs_f64() * 1e3,
                    self.p99.as_secs_f64() * 1e3,
                    self.unanswered,
                    GRACE.as_secs()
                ),
            ),
            (
                "coordinator cpu",
                format!(
                    "{:.1}% of one core ({:.0} records/s per core)",
                    self.cpu,
                    self.receipted as f64 / self.window / (self.cpu / 100.0).max(1e-6)
                ),
            ),
            (
                "coordinator rss",
                format!("{:.0} MiB (max {:.0} MiB)", self.rss_mib, self.max_rss_mib),
            ),
            (
                "errors",
                if self.errors.is_empty() {
                    "none".into()
                } else {
                    self.errors
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
        ];
        for (k, v) in rows {
            println!("  {k:<18} {v}");
        }
    }
}

/// One run: a coordinator, N agents registered, a steady window measured.
async fn run(n: usize, load: &Load) -> Figures {
    let tmp = tempfile::tempdir().unwrap();
    let (coord, port, ca) = coordinator(tmp.path(), n);
    let pid = coord.0.id();
    let ca = Certificate::from_pem(std::fs::read(&ca).unwrap());
    let shared = Arc::new(Shared::default());
    // None until all registered; the agents stamp what they count with it.
    let (window_tx, window_rx) = watch::channel(None::<(Instant, Instant)>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(REGISTERING));
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(n.max(1));
    let leased = (n as f64 * load.leased).round() as usize;
    let plan = Plan {
        // Liveness, not load: a busy agent heartbeats no faster.
        heartbeat: load.defaults.uplink.heartbeat_interval,
        telemetry: load.every(load.defaults.telemetry.interval),
        epoch: load.every(load.defaults.timelock.epoch),
    };
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let agent = Agent {
            backlog: load.backlog,
            in_flight: load.defaults.uplink.max_in_flight,
            index: i,
            leased: i < leased,
            port,
            ca: ca.clone(),
            plan: plan.clone(),
            shared: shared.clone(),
            window: window_rx.clone(),
            stop: stop_rx.clone(),
        };
        let (gate, ready) = (gate.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(agent.run(gate, ready)));
    }
    drop(ready_tx);
    let mut registered = 0;
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(true) => registered += 1,
            Some(false) => {}
            None => break,
        }
    }
    let register = started.elapsed();

    // The agents start their mix together once all are registered (a mix
    // started during registration piles a backlog up before the window at
    // high rates); the window opens one longest interval later, when every
    // timer has fired once and the load is steady. In it: the coordinator's
    // CPU and RSS from procfs, the streams held sampled each second.
    // A drain starts at once and ends when every backlog is receipted.
    let warmup = if load.backlog > 0 {
        Duration::ZERO
    } else {
        plan.heartbeat.max(plan.telemetry).max(plan.epoch)
    };
    let tick = if load.backlog > 0 {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    let open = Instant::now() + warmup;
    let close = open + Duration::from_secs(load.secs);
    window_tx.send_replace(Some((open, close)));
    tokio::time::sleep_until(open.into()).await;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (ticks0, _) = common::proc_figures(pid);
    let (mut smin, mut smax, mut max_rss) = (i64::MAX, 0, 0);
    while Instant::now() < close
        && !(load.backlog > 0 && shared.drained.load(Ordering::Relaxed) >= registered as u64)
    {
        tokio::time::sleep(tick.min(close - Instant::now())).await;
        let s = shared.streams.load(Ordering::Relaxed);
        (smin, smax) = (smin.min(s), smax.max(s));
        max_rss = max_rss.max(common::proc_figures(pid).1);
    }
    let (ticks1, rss) = common::proc_figures(pid);
    let window = open.elapsed().as_secs_f64();
    stop_tx.send_replace(true);
    let mut unanswered = 0;
    for t in tasks {
        unanswered += t.await.unwrap_or(0);
    }
    drop(coord);
    let mut lat = std::mem::take(&mut *shared.latencies.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(Duration::ZERO, |&us| Duration::from_micros(us))
    };
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap());
    Figures {
        register,
        registered,
        window,
        sent: shared.sent.load(Ordering::Relaxed),
        receipted: shared.receipted.load(Ordering::Relaxed),
        heartbeats: shared.heartbeats.load(Ordering::Relaxed),
        p50: pct(0.50),
        p99: pct(0.99),
        unanswered,
        cpu: (ticks1 - ticks0) as f64 / hz / window * 100.0,
        rss_mib: rss as f64 / 1024.0,
        max_rss_mib: max_rss.max(rss) as f64 / 1024.0,
        streams_min: if smin == i64::MAX { 0 } else { smin },
        streams_max: smax,
        errors,
    }
}

/// Every agent's intervals.
#[derive(Clone)]
struct Plan {
    heartbeat: Duration,
    telemetry: Duration,
    epoch: Duration,
}

/// One simulated agent.
#[derive(Clone)]
struct Agent {
    /// Records signed before registering and drained (0: the mix).
    backlog: usize,
    in_flight: usize,
    index: usize,
    leased: bool,
    port: u16,
    ca: Certificate,
    plan: Plan,
    shared: Arc<Shared>,
    window: watch::Receiver<Option<(Instant, Instant)>>,
    stop: watch::Receiver<bool>,
}

/// The stream an agent holds once registered.
struct Stream {
    tx: mpsc::Sender<Envelope>,
    inbound: tonic::Streaming<Envelope>,
}

impl Agent {
    /// Registers (saying so on `ready`), then sends its mix until stopped;
    /// returns how many of the records it sent in the window were never
    /// answered.
    async fn run(mut self, gate: Arc<Semaphore>, ready: mpsc::Sender<bool>) -> usize {
        let (node, _) = Signer::generate().unwrap();
        // A spool's records were signed when made, before the outage.
        let spool = self.spool(&node);
        let stream = {
            let _turn = gate.acquire().await;
            self.register(&node).await
        };
        let mut s = match stream {
            Ok(s) => s,
            Err(kind) => {
                self.shared.error(format!("register: {kind}"));
                let _ = ready.send(false).await;
                return 0;
            }
        };
        self.shared.streams.fetch_add(1, Ordering::Relaxed);
        let _ = ready.send(true).await;
        let unanswered = if spool.is_empty() {
            self.send_mix(&node, &mut s).await
        } else {
            self.drain(&node, &mut s, spool).await
        };
        self.shared.streams.fetch_sub(1, Ordering::Relaxed);
        unanswered
    }

    /// Hello → Register signed with its nonce → Registered, and the Welcome
    /// that follows (its last seq, 0 for a fresh key). An error names its kind.
    async fn register(&self, node: &Signer) -> Result<Stream, String> {
        let ch = Endpoint::from_shared(format!("https://localhost:{}", self.port))
            .map_err(|e| e.to_string())?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(self.ca.clone())
                    .domain_name("localhost"),
            )
            .map_err(|e| e.to_string())?
            .local_address(Some(source(self.index)))
            .connect_timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|_| "connect".to_string())?;
        let (tx, rx) = mpsc::channel(1024);
        let mut inbound = UplinkClient::new(ch)
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}", s.code()))?
            .into_inner();
        let next = |e: Result<Option<Envelope>, tonic::Status>| match e {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err("closed".to_string()),
            Err(s) => Err(format!("{:?}", s.code())),
        };
        let hello = next(inbound.message().await)?;
        let nonce = pb::Hello::decode(hello.payload.as_slice())
            .map_err(|_| "bad Hello".to_string())?
            .nonce;
        let register = node.sign_message(
            types::REGISTER,
            &pb::Register {
                node_id: node.key_id().to_owned(),
                public_key: node.public_key().to_vec(),
                agent_version: "coordload".into(),
                inventory: Some(inventory(self.index)),
                time_unix_ms: common::now_ms(),
                start_id: format!("load-{}", self.index),
                session_nonce: nonce,
                ..Default::default()
            },
        );
        tx.send(register).await.map_err(|_| "closed".to_string())?;
        let answer = next(inbound.message().await)?;
        if answer.payload_type != types::REGISTERED {
            return Err(format!("answered {}", answer.payload_type));
        }
        let welcome = next(inbound.message().await)?;
        if welcome.payload_type != types::WELCOME {
            return Err(format!("no Welcome but {}", welcome.payload_type));
        }
        Ok(Stream { tx, inbound })
    }

    /// Heartbeats, telemetry and (leased) attestations at the plan's
    /// intervals, each timer started at a random phase so N agents do not
    /// send in step (records once all agents are registered); receipts and
    /// refusals read as they come.
    async fn send_mix(&mut self, node: &Signer, s: &mut Stream) -> usize {
        let phase = |d: Duration| tokio::time::Instant::now() + d.mul_f64(rand::random::<f64>());
        let tick = |d: Duration| {
            let mut t = tokio::time::interval_at(phase(d), d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let (mut hb, mut tel, mut att) = (
            tick(self.plan.heartbeat),
            tick(self.plan.telemetry),
            tick(self.plan.epoch),
        );
        let mut seq = 0u64;
        let mut chain = Chain::default();
        // Seq → when it was sent, for records sent inside the window.
        let mut waiting: HashMap<u64, Instant> = HashMap::new();
        let mut stopped_at = None;
        // Records wait for every agent to have registered; heartbeats, which
        // keep the stream from its idle deadline, do not.
        let mut going = self.window.borrow().is_some();
        loop {
            let body = tokio::select! {
                m = s.inbound.message() => {
                    match m {
                        Ok(Some(e)) => self.answer(&e, &mut waiting),
                        Ok(None) => { self.shared.error("stream closed by the coordinator".into()); break }
                        Err(st) => { self.shared.error(format!("stream: {:?}", st.code())); break }
                    }
                    if stopped_at.is_some() && waiting.is_empty() { break }
                    continue;
                }
                _ = hb.tick(), if stopped_at.is_none() => {
                    let env = node.sign_message(types::HEARTBEAT, &pb::Heartbeat {
                        node_id: node.key_id().to_owned(),
                        time_unix_ms: common::now_ms(),
                        spool: Some(pb::SpoolState { max_bytes: 1 << 30, ..Default::default() }),
                        last_receipt_seq: seq,
                    });
                    if self.send(&s.tx, env) && self.in_window(Instant::now()) {
                        self.shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                _ = self.window.changed(), if !going => {
                    going = true;
                    tel.reset_at(phase(self.plan.telemetry));
                    att.reset_at(phase(self.plan.epoch));
                    continue;
                }
                _ = tel.tick(), if going && stopped_at.is_none() => telemetry(self.index),
                _ = att.tick(), if going && stopped_at.is_none() && self.leased => chain.next(self.index),
                _ = self.stop.changed(), if stopped_at.is_none() => {
                    stopped_at = Some(Instant::now());
                    if waiting.is_empty() { break }
                    continue;
                }
                _ = tokio::time::sleep(GRACE), if stopped_at.is_some() => break,
            };
            seq += 1;
            let env = record(node, self.index, seq, body);
            if std::mem::take(&mut chain.signing) {
                chain.prev = dsse::payload_sha256(&env).to_vec();
            }
            let at = Instant::now();
            if self.send(&s.tx, env) && self.in_window(at) {
                waiting.insert(seq, at);
                self.shared.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        waiting.len()
    }

    /// The backlog, signed: telemetry, and for the leased every other one
    /// an attestation of its chain.
    fn spool(&self, node: &Signer) -> Vec<Envelope> {
        let mut chain = Chain::default();
        (1..=self.backlog as u64)
            .map(|seq| {
                let body = if self.leased && seq % 2 == 0 {
                    chain.next(self.index)
                } else {
                    telemetry(self.index)
                };
                let env = record(node, self.index, seq, body);
                if std::mem::take(&mut chain.signing) {
                    chain.prev = dsse::payload_sha256(&env).to_vec();
                }
                env
            })
            .collect()
    }

    /// Sends the backlog once the window opens, at most `in_flight`
    /// unreceipted, heartbeating meanwhile; stays connected until stopped.
    async fn drain(&mut self, node: &Signer, s: &mut Stream, spool: Vec<Envelope>) -> usize {
        let mut hb = tokio::time::interval(self.plan.heartbeat);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut waiting: HashMap<u64, Instant> = HashMap::new();
        let mut next = spool.into_iter().enumerate().peekable();
        let mut going = self.window.borrow().is_some();
        let mut done = false;
        loop {
            if going {
                while waiting.len() < self.in_flight {
                    let Some((i, env)) = next.next() else { break };
                    let at = Instant::now();
                    if self.send(&s.tx, env) {
                        waiting.insert(i as u64 + 1, at);
                        self.shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if !done && waiting.is_empty() && next.peek().is_none() {
                    done = true;
                    self.shared.drained.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::select! {
                m = s.inbound.message() => match m {
                    Ok(Some(e)) => self.answer(&e, &mut waiting),
                    Ok(None) => { self.shared.error("stream closed by the coordinator".into()); break }
                    Err(st) => { self.shared.error(format!("stream: {:?}", st.code())); break }
                },
                _ = hb.tick() => {
                    let env = node.sign_message(types::HEARTBEAT, &pb::Heartbeat {
                        node_id: node.key_id().to_owned(),
                        time_unix_ms: common::now_ms(),
                        spool: Some(pb::SpoolState { max_bytes: 1 << 30, ..Default::default() }),
                        last_receipt_seq: 0,
                    });
                    if self.send(&s.tx, env) {
                        self.shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = self.window.changed(), if !going => going = true,
                _ = self.stop.changed() => break,
            }
        }
        waiting.len()
    }

    /// Queues an envelope; a full queue (the coordinator not reading) counts
    /// as an error, never blocks the agent's reading of receipts.
    fn send(&self, tx: &mpsc::Sender<Envelope>, env: Envelope) -> bool {
        match tx.try_send(env) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.error("send queue full".into());
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn in_window(&self, at: Instant) -> bool {
        matches!(*self.window.borrow(), Some((open, close)) if at >= open && at < close)
    }

    /// A receipt ends a record's wait; a refusal is counted by its kind.
    fn answer(&self, e: &Envelope, waiting: &mut HashMap<u64, Instant>) {
        match e.payload_type.as_str() {
            types::RECEIPT | types::RECEIPTS => {
                let seqs: Vec<u64> = if e.payload_type == types::RECEIPT {
                    pb::Receipt::decode(e.payload.as_slice()).map(|r| vec![r.seq])
                } else {
                    pb::Receipts::decode(e.payload.as_slice())
                        .map(|s| s.receipts.iter().map(|r| r.seq).collect())
                }
                .unwrap_or_else(|_| {
                    self.shared.error("undecodable receipt".into());
                    Vec::new()
                });
                let now = Instant::now();
                let mut lat = self
                    .shared
                    .latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for seq in seqs {
                    if let Some(sent) = waiting.remove(&seq) {
                        if self.in_window(now) {
                            self.shared.receipted.fetch_add(1, Ordering::Relaxed);
                        }
                        lat.push((now - sent).as_micros() as u64);
                    }
                }
            }
            types::REFUSAL => {
                let kind = pb::Refusal::decode(e.payload.as_slice())
                    .map(|r| r.kind().as_str_name().to_owned())
                    .unwrap_or_else(|_| "undecodable".into());
                self.shared.error(format!("refusal: {kind}"));
            }
            other => self.shared.error(format!("unexpected {other}")),
        }
    }
}

/// A leased node's attestation chain: lease seqs from 1, each linked to the
/// previous attestation's payload, as the time-lock builds it.
#[derive(Default)]
struct Chain {
    lease_seq: u64,
    prev: Vec<u8>,
    window_end: i64,
    /// Set when `next` made an attestation, so its digest becomes `prev`.
    signing: bool,
}

impl Chain {
    fn next(&mut self, node: usize) -> pb::record::Body {
        self.lease_seq += 1;
        let end = common::now_ms();
        let start = if self.window_end == 0 {
            end - 10_000
        } else {
            self.window_end
        };
        self.window_end = end;
        let prev = if self.prev.is_empty() {
            vec![0; 32]
        } else {
            self.prev.clone()
        };
        self.signing = true;
        pb::record::Body::Attestation(pb::Attestation {
            lease_id: format!("l-load{node}"),
            lease_seq: self.lease_seq,
            prev_sha256: prev,
            window_start_unix_ms: start,
            window_end_unix_ms: end,
            sampled_ms: end - start,
            gpus: (0..GPUS)
                .map(|g| pb::GpuWindow {
                    uuid: uuid(node, g),
                    samples: 10,
                    util_min: 90,
                    util_mean: 95.0,
                    util_max: 100,
                    memory_used_min_bytes: 70 << 30,
                    memory_used_mean_bytes: (72u64 << 30) as f64,
                    memory_used_max_bytes: 75 << 30,
                })
                .collect(),
            holders: (0..GPUS)
                .map(|g| pb::HolderSeen {
                    pid: 4000 + g,
                    exe: "/usr/bin/python3".into(),
                    container: format!("{:064x}", node),
                    gpu: uuid(node, g),
                    verdict: "lease-container".into(),
                })
                .collect(),
            ..Default::default()
        })
    }
}

/// Record `seq` of agent `index`, signed.
fn record(node: &Signer, index: usize, seq: u64, body: pb::record::Body) -> Envelope {
    node.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: node.key_id().to_owned(),
            seq,
            time_unix_ms: common::now_ms(),
            start_id: format!("load-{index}"),
            body: Some(body),
        },
    )
}

fn uuid(node: usize, gpu: u32) -> String {
    format!("GPU-{node:08x}-0000-4000-8000-{gpu:012x}")
}

/// What the node declares when it registers: 8 GPUs.
fn inventory(node: usize) -> pb::InventorySummary {
    pb::InventorySummary {
        hostname: format!("load-{node}"),
        os: "Ubuntu 24.04".into(),
        kernel: "6.8.0".into(),
        cpu_cores: 64,
        memory_bytes: 512 << 30,
        gpu_count: GPUS,
        cpu_model: "bench".into(),
        driver_version: "550.54.15".into(),
        cuda_version: 12040,
        gpus: (0..GPUS)
            .map(|g| pb::GpuInfo {
                index: g,
                uuid: uuid(node, g),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + g),
                minor_number: g,
                ..Default::default()
            })
            .collect(),
        nvml_status: "ok".into(),
        ..Default::default()
    }
}

/// One telemetry record: the host and the last sample of each of 8 GPUs.
fn telemetry(node: usize) -> pb::record::Body {
    let t = common::now_ms();
    pb::record::Body::Telemetry(pb::Telemetry {
        host: Some(pb::HostSample {
            load1: 12.5,
            mem_total_bytes: 512 << 30,
            mem_available_bytes: 300 << 30,
            uptime_s: 86_400,
        }),
        spool: Some(pb::SpoolState {
            max_bytes: 1 << 30,
            ..Default::default()
        }),
        gpus: (0..GPUS)
            .map(|g| pb::GpuSample {
                index: g,
                uuid: uuid(node, g),
                utilization_gpu: 97,
                utilization_memory: 60,
                memory_used_bytes: 72 << 30,
                memory_total_bytes: 80 << 30,
                power_mw: 650_000,
                temperature_c: 71,
                sm_clock_mhz: 1980,
                processes: vec![pb::GpuProcess {
                    pid: 4000 + g,
                    used_memory_bytes: 72 << 30,
                    graphics: false,
                }],
                time_unix_ms: t,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}
