//! The workload task: the only owner of the lease book and of the lifecycle
//! of Warden's containers (the ones labelled `warden.managed`). It acts on
//! the coordinator's commands, once `commands` admitted them (start and end
//! leases, run and stop their containers, probe Ray; it also finds a lease's
//! network namespace for the mesh lane), follows Docker's events, reconciles what Docker runs with
//! the book when Docker (re)appears, and reports all of it: command answers
//! as records, lifecycle as telemetry.
//!
//! It is also the only owner of the connection to Docker: it connects,
//! follows the event stream and reconnects, and lends the live handle (or
//! why there is none) on a `watch` ([`Engine`]). The time-lock borrows it to
//! read the engine and to stop a container that holds a leased GPU, without
//! queueing behind a workload command; a stop of one of ours reaches this
//! task as Docker's die event, like any stop. Work that may take long (image
//! pulls, the Ray probe) runs beside the loop and comes back to it as a
//! message, so the loop always follows events and answers commands.
//!
//! Policy lives in `confine` (what a container may be) and `book` (what a
//! command may do); this file only sequences Docker calls around them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::{
    pb,
    states::{ContainerStatus, WorkloadEventKind},
};

use crate::{
    commands::{answer, lease_of, Success, ToWorkload},
    delivery::outbox::Outbox,
};

use super::{
    book::{Book, Container, Lease, ObservedStatus},
    confine::{self, WorkloadConfig, LABEL_LEASE, LABEL_NAME, LABEL_NODE},
    docker::{ContainerEvent, Docker, DockerError, EventKind},
    hostpath, isolation,
    scratch::{self, gocryptfs, ScratchMode, Volume},
};

/// How often an unreachable Docker is tried again.
const DOCKER_RETRY: Duration = Duration::from_secs(2);
/// Pull progress goes out at most this often.
const PULL_REPORT: Duration = Duration::from_secs(1);

/// The task's Docker connection as lent to others: a handle while Docker
/// answers, otherwise why it does not.
pub type Engine = Result<Docker, String>;

/// A fresh channel for [`Engine`], saying nothing is connected yet.
pub fn engine_channel() -> (watch::Sender<Engine>, watch::Receiver<Engine>) {
    watch::channel(Err("the agent has not connected to Docker yet".to_owned()))
}

/// What the task needs from the rest of the agent.
pub struct Workload {
    pub config: WorkloadConfig,
    /// A reloaded configuration (SIGHUP): its workload section applies to
    /// containers made or stopped from then on.
    pub reload: watch::Receiver<crate::AgentConfig>,
    pub node_id: String,
    /// `book.json` in the state directory.
    pub book_path: PathBuf,
    /// The state directory (the node key): never mountable.
    pub state_dir: PathBuf,
    pub outbox: Outbox,
    /// The node's GPUs come from the inventory.
    pub inventory: watch::Receiver<pb::InventorySummary>,
    /// The active leases, for `warden status`.
    pub leases: watch::Sender<Vec<Lease>>,
    /// The Docker connection, lent (see [`Engine`]).
    pub engine: watch::Sender<Engine>,
    /// Answers that go on the live stream once, never spooled (a
    /// container's logs); the uplink signs and sends them.
    pub direct: mpsc::Sender<pb::LogChunk>,
}

/// The Ray probe: the alive nodes from GCS's node table, read without
/// starting a Ray driver (a driver costs seconds of CPU each time, taken
/// from the Ray nodes starting beside it), every 0.2 s until a node is
/// alive at every expected address or the wait is over; a Ray whose
/// private client moved falls back to a driver, asked once.
/// Arguments: the head's GCS address, the wait in ms, the expected IPs.
const RAY_PROBE: &str = "import sys, time\n\
        gcs, wait, expect = sys.argv[1], int(sys.argv[2]) / 1000, set(sys.argv[3:])\n\
        end = time.monotonic() + wait\n\
        try:\n\
        \x20   from ray._raylet import GcsClient\n\
        \x20   from ray.core.generated.gcs_pb2 import GcsNodeInfo\n\
        except ImportError:\n\
        \x20   GcsClient = None\n\
        if GcsClient is None:\n\
        \x20   import ray\n\
        \x20   ray.init(address=gcs, logging_level='ERROR', log_to_driver=False)\n\
        \x20   alive = [n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]\n\
        else:\n\
        \x20   up, client = GcsNodeInfo.GcsNodeState.Value('ALIVE'), None\n\
        \x20   while True:\n\
        \x20       try:\n\
        \x20           client = client or GcsClient(address=gcs)\n\
        \x20           nodes = client.get_all_node_info().values()\n\
        \x20           alive = [n.node_manager_address for n in nodes if n.state == up]\n\
        \x20       except Exception:\n\
        \x20           if time.monotonic() >= end:\n\
        \x20               raise\n\
        \x20           alive = []\n\
        \x20       if expect <= set(alive) or time.monotonic() >= end:\n\
        \x20           break\n\
        \x20       time.sleep(0.2)\n\
        print('alive', *sorted(alive))\n";

/// The most log bytes one ContainerLogs answer carries.
pub const LOG_LIMIT: usize = 256 << 10;

/// Why the book could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("lease book {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lease book {path} is not valid JSON ({source}); it was moved to {aside} and the agent starts with no leases, removing nothing")]
    Corrupt {
        path: PathBuf,
        aside: PathBuf,
        source: serde_json::Error,
    },
}

/// Loads the book; a missing file is an empty book.
pub fn load_book(path: &Path) -> Result<Book, BookError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| {
            let aside = path.with_extension(format!("corrupt-{}", crate::now_ms()));
            let _ = std::fs::rename(path, &aside);
            BookError::Corrupt {
                path: path.to_owned(),
                aside,
                source,
            }
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Book::default()),
        Err(source) => Err(BookError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the book durably and privately (mode 0600, `write_private`).
pub fn save_book(path: &Path, book: &Book) -> Result<(), BookError> {
    let bytes = serde_json::to_vec_pretty(book).map_err(std::io::Error::other);
    bytes
        .and_then(|b| warden_state::file::write_private(path, &b))
        .map_err(|source| BookError::Io {
            path: path.to_owned(),
            source,
        })
}

/// A workload event, now.
fn wev(
    lease_id: &str,
    name: &str,
    id: &str,
    kind: WorkloadEventKind,
    detail: String,
) -> pb::WorkloadEvent {
    pb::WorkloadEvent {
        lease_id: lease_id.into(),
        name: name.into(),
        container_id: id.into(),
        kind: kind.as_str().into(),
        detail,
        exit_code: 0,
        time_unix_ms: crate::now_ms(),
    }
}

/// The task's state while it runs.
struct State {
    w: Workload,
    book: Book,
    /// False when the book on disk was corrupt: then nothing Docker runs is
    /// removed as stale, since the book cannot say what is ours.
    trusted: bool,
    docker: Option<Docker>,
    docker_error: Option<String>,
    default_memory: i64,
    /// Commands waiting for their images: (lease, command id).
    pulling: Vec<(String, String)>,
    /// Where a pull brings its command back.
    pulled: mpsc::Sender<Pulled>,
    /// Where the leases' encrypted scratch volumes live.
    scratch: scratch::Layout,
}

/// A command whose images were being pulled, and how that went.
struct Pulled {
    cmd: pb::Command,
    result: Result<(), String>,
}

/// Pulls one image for container `name` of `lease_id`, reporting progress
/// (at most once per [`PULL_REPORT`]) and the outcome as workload events.
async fn pull(
    docker: &Docker,
    outbox: &Outbox,
    lease_id: &str,
    name: &str,
    image: &str,
) -> Result<(), String> {
    tracing::info!(%image, lease = %lease_id, "pulling");
    // Progress goes out as it comes (the operator's `lease start` shows
    // it), at most once per PULL_REPORT, from a task beside the pull.
    let (tx, mut rx) = mpsc::unbounded_channel::<pb::WorkloadEvent>();
    let forward = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let _ = outbox
                    .emit(pb::record::Body::Telemetry(pb::Telemetry {
                        workload_events: vec![ev],
                        ..Default::default()
                    }))
                    .await;
            }
        })
    };
    let mut last = Instant::now() - PULL_REPORT;
    let result = docker
        .pull(image, |line| {
            if last.elapsed() >= PULL_REPORT {
                last = Instant::now();
                let _ = tx.send(wev(
                    lease_id,
                    name,
                    "",
                    WorkloadEventKind::Pull,
                    format!("{image}: {line}"),
                ));
            }
        })
        .await;
    let outcome = match &result {
        Ok(()) => format!("{image}: pulled"),
        Err(e) => format!("{image}: pull failed: {e}"),
    };
    let _ = tx.send(wev(lease_id, name, "", WorkloadEventKind::Pull, outcome));
    drop(tx);
    let _ = forward.await;
    // Offline nodes are common: say how an image gets there without a registry.
    result.map_err(|e| {
        format!("container {name}: pulling {image}: {e}; a node that reaches no registry takes images with `warden image load FILE.tar` (an archive from `docker save`)")
    })
}

impl Workload {
    /// Runs until `shutdown`. Lease containers are left running on shutdown:
    /// the next start adopts them.
    pub async fn run(self, mut commands: mpsc::Receiver<ToWorkload>, shutdown: CancellationToken) {
        let (book, trusted) = match load_book(&self.book_path) {
            Ok(b) => (b, true),
            Err(e) => {
                tracing::error!(error = %e, "lease book unusable");
                (Book::default(), false)
            }
        };
        let memory = default_memory(&self.config);
        let (pulled, mut pulls) = mpsc::channel(16);
        let scratch = scratch::Layout::new(&self.state_dir);
        let mut st = State {
            scratch,
            w: self,
            book,
            trusted,
            docker: None,
            docker_error: None,
            default_memory: memory,
            pulling: Vec::new(),
            pulled,
        };
        st.publish();
        let mut events: Option<mpsc::Receiver<ContainerEvent>> = None;
        let mut retry_at = Instant::now();
        loop {
            if st.docker.is_none() && Instant::now() >= retry_at {
                events = st.connect().await;
                retry_at = Instant::now() + DOCKER_RETRY;
            }
            let next_retry = tokio::time::Instant::from_std(retry_at);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                asked = commands.recv() => match asked {
                    Some(ToWorkload::Command(cmd)) => st.execute(*cmd, false).await,
                    Some(ToWorkload::LeaseNetns { lease_id, reply }) => {
                        let _ = reply.send(st.lease_netns(&lease_id).await);
                    }
                    None => return,
                },
                ev = async { events.as_mut()?.recv().await }, if events.is_some() => match ev {
                    Some(ev) => st.docker_event(ev).await,
                    None => {
                        events = None;
                        st.docker_gone("Docker's event stream ended").await;
                        retry_at = Instant::now() + DOCKER_RETRY;
                    }
                },
                Some(p) = pulls.recv() => st.pulled(p).await,
                _ = tokio::time::sleep_until(next_retry), if st.docker.is_none() => {}
                Ok(()) = st.w.reload.changed() => {
                    let config = st.w.reload.borrow_and_update().workload.clone();
                    st.default_memory = default_memory(&config);
                    st.w.config = config;
                }
            }
        }
    }
}

/// The memory limit of a container whose spec gives none.
fn default_memory(config: &WorkloadConfig) -> i64 {
    if config.default_memory_bytes > 0 {
        config.default_memory_bytes as i64
    } else {
        (crate::host::facts::summary().memory_bytes as f64 * 0.9) as i64
    }
}

impl State {
    fn publish(&self) {
        self.w
            .leases
            .send_replace(self.book.leases.values().cloned().collect());
    }

    fn save(&self) {
        if let Err(e) = save_book(&self.w.book_path, &self.book) {
            tracing::error!(error = %e, "cannot save the lease book");
        }
        self.publish();
    }

    async fn report(&self, events: Vec<pb::WorkloadEvent>) {
        if events.is_empty() {
            return;
        }
        let _ = self
            .w
            .outbox
            .emit(pb::record::Body::Telemetry(pb::Telemetry {
                workload_events: events,
                ..Default::default()
            }))
            .await;
    }

    /// Connects to Docker, starts following its events, then reconciles.
    async fn connect(&mut self) -> Option<mpsc::Receiver<ContainerEvent>> {
        let docker = match Docker::connect(&self.w.config.docker_socket).await {
            Ok(d) => d,
            Err(e) => {
                let msg = e.to_string();
                self.w.engine.send_modify(|e| *e = Err(msg.clone()));
                if self.docker_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "Docker is unreachable; retrying (leases cannot start until it answers)");
                    self.report(vec![wev(
                        "",
                        "",
                        "",
                        WorkloadEventKind::DockerDown,
                        msg.clone(),
                    )])
                    .await;
                    self.docker_error = Some(msg);
                }
                return None;
            }
        };
        // Follow events before listing, so nothing between the two is missed.
        let (tx, rx) = mpsc::channel(256);
        let mut stream = Box::pin(docker.events());
        tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "Docker event stream failed");
                        return;
                    }
                }
            }
        });
        let version = docker.version().await.unwrap_or_default();
        tracing::info!(%version, "connected to Docker");
        if self.docker_error.take().is_some() {
            self.report(vec![wev("", "", "", WorkloadEventKind::DockerUp, version)])
                .await;
        }
        self.w.engine.send_modify(|e| *e = Ok(docker.clone()));
        self.docker = Some(docker);
        self.reconcile().await;
        Some(rx)
    }

    async fn docker_gone(&mut self, why: &str) {
        tracing::warn!(reason = why, "lost Docker; reconnecting");
        self.docker = None;
        self.docker_error = Some(why.to_owned());
        self.w.engine.send_modify(|e| *e = Err(why.to_owned()));
        self.report(vec![wev(
            "",
            "",
            "",
            WorkloadEventKind::DockerDown,
            why.to_owned(),
        )])
        .await;
    }

    /// Adopts the containers of active leases, removes every other managed
    /// container, and notes lease containers Docker no longer has.
    async fn reconcile(&mut self) {
        let Some(docker) = self.docker.clone() else {
            return;
        };
        let managed = match docker.list_managed().await {
            Ok(m) => m,
            Err(e) => return tracing::warn!(error = %e, "cannot list managed containers"),
        };
        let mut events = Vec::new();
        let grace = self.w.config.stop_grace;
        let mut seen = Vec::new();
        for m in managed {
            // Another identity's containers (another agent on this Docker, or a
            // wiped state directory) cannot be attributed: left alone, said once.
            let owner = m.labels.get(LABEL_NODE).map(String::as_str).unwrap_or("");
            if owner != self.w.node_id {
                tracing::info!(id = %m.id, name = %m.name, node = %owner, "left alone a managed container of another node id");
                continue;
            }
            let lease = m.labels.get(LABEL_LEASE).cloned().unwrap_or_default();
            let name = m.labels.get(LABEL_NAME).cloned().unwrap_or_default();
            if let Some(c) = self.book.container_mut(&lease, &name) {
                c.id = m.id.clone();
                c.state = if m.running {
                    ContainerStatus::Running.into()
                } else {
                    ObservedStatus::from_docker(&m.state)
                };
                c.time_unix_ms = crate::now_ms();
                seen.push((lease.clone(), name.clone()));
                tracing::info!(%lease, %name, id = %m.id, state = %c.state, "adopted a lease container");
                events.push(wev(
                    &lease,
                    &name,
                    &m.id,
                    WorkloadEventKind::Adopted,
                    c.state.to_string(),
                ));
            } else if self.trusted {
                let outcome = match docker.stop_and_remove(&m.id, grace).await {
                    Ok(()) => "stopped and removed".to_owned(),
                    Err(e) => format!("could not be removed: {e}"),
                };
                tracing::info!(%lease, %name, id = %m.id, %outcome, "managed container of no active lease");
                events.push(wev(
                    &lease,
                    &name,
                    &m.id,
                    WorkloadEventKind::RemovedStale,
                    outcome,
                ));
            } else {
                tracing::warn!(%lease, %name, id = %m.id, "left a managed container alone: the lease book was unusable");
            }
        }
        if self.trusted {
            self.remove_stale_networks(&docker).await;
            events.extend(self.reconcile_scratch().await);
        }
        for lease in self.book.leases.values_mut() {
            for c in &mut lease.containers {
                if !seen.contains(&(lease.id.clone(), c.name.clone()))
                    && c.state != ContainerStatus::Missing
                {
                    c.state = ContainerStatus::Missing.into();
                    events.push(wev(
                        &lease.id,
                        &c.name,
                        &c.id,
                        WorkloadEventKind::Missing,
                        "Docker no longer has it".into(),
                    ));
                }
            }
        }
        self.save();
        self.report(events).await;
    }

    /// Destroys the scratch volumes of leases that are not active (their
    /// containers are gone by now: reconcile removed them first), and those
    /// of active leases found dead: their gocryptfs ended (an agent restart
    /// under systemd ends it), and with it the key, so what is on disk can
    /// never be read again. Returns what it reports.
    async fn reconcile_scratch(&mut self) -> Vec<pb::WorkloadEvent> {
        let layout = self.scratch.clone();
        let active: std::collections::BTreeSet<String> = self.book.leases.keys().cloned().collect();
        let encrypted: Vec<String> = self
            .book
            .scratch
            .iter()
            .filter(|(_, v)| **v == Volume::Encrypted)
            .map(|(l, _)| l.clone())
            .collect();
        let found = self
            .in_dockers_namespace(move |place| {
                let dirs: Vec<String> = match std::fs::read_dir(&layout.root) {
                    Ok(d) => d
                        .flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let mounts = place
                    .run(gocryptfs::own_mounts)
                    .and_then(|m| m)
                    .map_err(|e| e.to_string())?;
                let dead: Vec<(String, String)> = encrypted
                    .into_iter()
                    .filter_map(|l| {
                        gocryptfs::live(place, &layout.plain(&l))
                            .err()
                            .map(|e| (l, e))
                    })
                    .collect();
                Ok((scratch::leftovers(&layout, &dirs, &mounts, &active), dead))
            })
            .await;
        let (stale, dead) = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "cannot look for leftover scratch volumes");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        for lease in stale {
            let outcome = match self.destroy_scratch(&lease).await {
                Ok(()) => "destroyed: unmounted, key gone, ciphertext removed".to_owned(),
                Err(e) => format!("could not be destroyed: {e}"),
            };
            tracing::info!(%lease, %outcome, "scratch volume of no active lease");
            self.book.scratch.remove(&lease);
            events.push(wev(
                &lease,
                "",
                "",
                WorkloadEventKind::ScratchRemoved,
                outcome,
            ));
        }
        for (lease, why) in dead {
            let outcome = match self.destroy_scratch(&lease).await {
                Ok(()) => "its remains are removed".to_owned(),
                Err(e) => format!("its remains could not be removed: {e}"),
            };
            tracing::warn!(%lease, %why, %outcome, "a lease's scratch volume is lost; its containers' /scratch is unreadable");
            self.book.scratch.insert(lease.clone(), Volume::Lost);
            events.push(wev(
                &lease,
                "",
                "",
                WorkloadEventKind::ScratchLost,
                format!("{why}; the key is gone with its gocryptfs process, so its data can never be read; {outcome}"),
            ));
        }
        events
    }

    /// Removes this node's lease networks whose lease is not active (its
    /// containers are gone by now: reconcile removed them first), and keeps
    /// the others apart (after a reboot the kernel's rules are gone while
    /// Docker brings the leases' containers back).
    async fn remove_stale_networks(&self, docker: &Docker) {
        let networks = match docker.list_managed_networks().await {
            Ok(n) => n,
            Err(e) => return tracing::warn!(error = %e, "cannot list managed networks"),
        };
        for (name, labels) in networks {
            let owner = labels.get(LABEL_NODE).map(String::as_str).unwrap_or("");
            let lease = labels.get(LABEL_LEASE).map(String::as_str).unwrap_or("");
            if owner != self.w.node_id {
                continue;
            }
            if self.book.leases.contains_key(lease) {
                if let Err(e) = isolate_network(docker, &name).await {
                    tracing::error!(%lease, network = %name, error = %e, "cannot keep a lease network apart from the others");
                }
                continue;
            }
            match drop_network(docker, &name).await {
                Ok(()) => {
                    tracing::info!(%lease, network = %name, "removed the network of no active lease")
                }
                Err(e) => {
                    tracing::warn!(%lease, network = %name, error = %e, "cannot remove a stale lease network")
                }
            }
        }
    }

    /// Follows one Docker event of a managed container.
    async fn docker_event(&mut self, ev: ContainerEvent) {
        // Docker's filter is Warden's label; another node id's containers are not ours.
        if ev.labels.get(LABEL_NODE).map(String::as_str) != Some(self.w.node_id.as_str()) {
            return;
        }
        let lease = ev.labels.get(LABEL_LEASE).cloned().unwrap_or_default();
        let name = ev.labels.get(LABEL_NAME).cloned().unwrap_or_default();
        let (kind, detail, exit_code, state) = match &ev.kind {
            EventKind::Start => (
                WorkloadEventKind::Started,
                String::new(),
                0,
                Some(ContainerStatus::Running),
            ),
            EventKind::Die { exit_code } => {
                let code = exit_code.unwrap_or(-1);
                (
                    WorkloadEventKind::Exited,
                    format!("exit code {code}"),
                    code,
                    Some(ContainerStatus::Exited),
                )
            }
            EventKind::Oom => (
                WorkloadEventKind::Oom,
                "killed for exceeding its memory limit".into(),
                0,
                Some(ContainerStatus::OomKilled),
            ),
            EventKind::Health(h) => (WorkloadEventKind::Health, h.clone(), 0, None),
            _ => return,
        };
        if let Some(c) = self.book.container_mut(&lease, &name) {
            if c.id.is_empty() || c.id == ev.id {
                match (&ev.kind, state) {
                    (EventKind::Health(h), _) => c.health = h.clone(),
                    // An OOM kill is followed by its die event: keep saying why it died.
                    (EventKind::Die { .. }, _) if c.state == ContainerStatus::OomKilled => {
                        c.exit_code = exit_code
                    }
                    (EventKind::Die { .. }, Some(s)) => {
                        c.state = s.into();
                        c.exit_code = exit_code;
                    }
                    (_, Some(s)) => c.state = s.into(),
                    _ => {}
                }
                c.time_unix_ms = ev.time_unix_ms;
                self.save();
            }
        }
        tracing::info!(%lease, %name, id = %ev.id, kind = kind.as_str(), %detail, "container event");
        let mut e = wev(&lease, &name, &ev.id, kind, detail);
        e.exit_code = exit_code;
        e.time_unix_ms = ev.time_unix_ms;
        self.report(vec![e]).await;
    }

    /// Acts on an admitted command and sends the answer as a record; one
    /// whose images are not all here is first sent to pull them beside the
    /// loop (`pulled` once that is done), one that probes Ray answers from
    /// beside the loop too.
    async fn execute(&mut self, cmd: pb::Command, pulled: bool) {
        if !pulled {
            match self.images_to_pull(&cmd).await {
                Ok(None) => {}
                Ok(Some((lease_id, images))) => return self.spawn_pull(cmd, lease_id, images),
                Err((lease_id, e)) => {
                    return answer(&self.w.outbox, &cmd.command_id, lease_id, Err(e)).await
                }
            }
        }
        let command_id = cmd.command_id.clone();
        let (lease_id, outcome) = match cmd.body {
            Some(pb::command::Body::LeaseStart(ls)) => {
                let id = ls.lease_id.clone();
                let outcome =
                    self.lease_start(ls)
                        .await
                        .map(|(containers, note, sealed_scratch_key)| Success {
                            note,
                            sealed_scratch_key,
                            // What "all GPUs" meant here: the GPUs the chain will report.
                            gpu_uuids: self
                                .book
                                .leases
                                .get(&id)
                                .map(|l| l.gpus.clone())
                                .unwrap_or_default(),
                            containers,
                            ..Default::default()
                        });
                (id, outcome)
            }
            Some(pb::command::Body::LeaseEnd(le)) => {
                let id = le.lease_id.clone();
                (id, self.lease_end(le).await.map(Success::containers))
            }
            Some(pb::command::Body::RunContainer(rc)) => {
                let id = rc.lease_id.clone();
                (id, self.run_container(rc).await.map(Success::containers))
            }
            Some(pb::command::Body::StopContainer(sc)) => {
                let id = sc.lease_id.clone();
                (id, self.stop_container(sc).await.map(Success::containers))
            }
            Some(pb::command::Body::RayProbe(rp)) => {
                let id = rp.lease_id.clone();
                match self.ray_probe(&rp) {
                    Ok(probe) => {
                        let outbox = self.w.outbox.clone();
                        tokio::spawn(async move {
                            let outcome = probe.await.map(|alive| Success {
                                ray_alive_addresses: alive,
                                ..Default::default()
                            });
                            answer(&outbox, &command_id, id, outcome).await;
                        });
                        return;
                    }
                    Err(e) => (id, Err(e)),
                }
            }
            Some(pb::command::Body::ContainerLogs(cl)) => {
                let chunk = pb::LogChunk {
                    command_id,
                    lease_id: cl.lease_id.clone(),
                    ..Default::default()
                };
                let (found, docker) = (self.log_container(&cl), self.docker());
                let direct = self.w.direct.clone();
                // Read beside the loop: a large log takes a while.
                tokio::spawn(async move {
                    let chunk = match (found, docker) {
                        (Ok((name, id)), Ok(docker)) => {
                            match docker.logs(&id, cl.tail, cl.since_unix_ns, LOG_LIMIT).await {
                                Ok(l) => pb::LogChunk {
                                    name,
                                    data: l.data,
                                    truncated: l.truncated,
                                    last_unix_ns: l.last_ns,
                                    ..chunk
                                },
                                Err(e) => pb::LogChunk {
                                    name,
                                    error: e.to_string(),
                                    ..chunk
                                },
                            }
                        }
                        (Err(e), _) | (_, Err(e)) => pb::LogChunk { error: e, ..chunk },
                    };
                    if direct.send(chunk).await.is_err() {
                        tracing::debug!("logs not sent: the uplink has stopped");
                    }
                });
                return;
            }
            // Routed to the mesh lane by `commands`; never here.
            Some(pb::command::Body::MeshConfig(_)) => (
                String::new(),
                Err("a mesh config reached the workload task".into()),
            ),
            None => (String::new(), Err("the command is empty".into())),
        };
        answer(&self.w.outbox, &command_id, lease_id, outcome).await;
    }

    /// The images a LeaseStart or RunContainer needs that Docker does not
    /// have, with the lease they are for; `None` when there is nothing to
    /// pull (or the command is of another kind). A command its checks
    /// refuse is refused before anything is pulled for it.
    async fn images_to_pull(
        &self,
        cmd: &pb::Command,
    ) -> Result<Option<(String, Vec<(String, String)>)>, (String, String)> {
        let (lease_id, specs) = match &cmd.body {
            Some(pb::command::Body::LeaseStart(ls)) => {
                let fail = |e| (ls.lease_id.clone(), e);
                self.book.plan_start(ls, &self.node_gpus()).map_err(fail)?;
                (&ls.lease_id, ls.containers.iter().collect::<Vec<_>>())
            }
            Some(pb::command::Body::RunContainer(rc)) => (&rc.lease_id, rc.spec.iter().collect()),
            _ => return Ok(None),
        };
        let fail = |e: String| (lease_id.clone(), e);
        for spec in &specs {
            confine::check(spec, &self.w.config).map_err(|e| fail(e.to_string()))?;
        }
        let docker = self.docker().map_err(fail)?;
        let mut missing: Vec<(String, String)> = Vec::new();
        for spec in specs {
            if missing.iter().any(|(_, image)| *image == spec.image) {
                continue;
            }
            let present = docker
                .image_present(&spec.image)
                .await
                .map_err(|e| fail(format!("container {}: {e}", spec.name)))?;
            if !present {
                missing.push((spec.name.clone(), spec.image.clone()));
            }
        }
        Ok((!missing.is_empty()).then(|| (lease_id.clone(), missing)))
    }

    /// Pulls `images` beside the loop; the command comes back to the loop
    /// as [`Pulled`] when they are here (or cannot be).
    fn spawn_pull(&mut self, cmd: pb::Command, lease_id: String, images: Vec<(String, String)>) {
        let docker = match self.docker() {
            Ok(d) => d,
            // `images_to_pull` had a handle a moment ago; answer as it would.
            Err(e) => {
                let outbox = self.w.outbox.clone();
                tokio::spawn(
                    async move { answer(&outbox, &cmd.command_id, lease_id, Err(e)).await },
                );
                return;
            }
        };
        self.pulling
            .push((lease_id.clone(), cmd.command_id.clone()));
        let outbox = self.w.outbox.clone();
        let back = self.pulled.clone();
        tokio::spawn(async move {
            let mut result = Ok(());
            for (name, image) in &images {
                result = pull(&docker, &outbox, &lease_id, name, image).await;
                if result.is_err() {
                    break;
                }
            }
            let _ = back.send(Pulled { cmd, result }).await;
        });
    }

    /// A command back from its pull: carried out, unless the pull failed or
    /// its lease was ended meanwhile.
    async fn pulled(&mut self, p: Pulled) {
        let id = &p.cmd.command_id;
        let waiting = self.pulling.iter().position(|(_, c)| c == id);
        let lease_id = match waiting {
            Some(i) => self.pulling.remove(i).0,
            None => {
                let lease = lease_of(&p.cmd);
                let e = format!("lease {lease} was ended while its images were pulled");
                return answer(&self.w.outbox, id, lease, Err(e)).await;
            }
        };
        match p.result {
            Ok(()) => self.execute(p.cmd, true).await,
            Err(e) => answer(&self.w.outbox, id, lease_id, Err(e)).await,
        }
    }

    /// The Ray nodes (their addresses) the cluster whose head is at
    /// `rp.address` has alive, asked from inside the lease's first container (it holds the
    /// cluster's token). A fixed probe: the address is checked and passed
    /// as an argument, never through a shell. What is checked here is
    /// checked at once; the probe itself (up to a minute) is the future
    /// returned, run beside the loop.
    fn ray_probe(
        &self,
        rp: &pb::RayProbe,
    ) -> Result<impl std::future::Future<Output = Result<Vec<String>, String>>, String> {
        let addr: std::net::SocketAddr = rp
            .address
            .parse()
            .map_err(|_| format!("Ray head address `{}` is not IP:port", rp.address))?;
        let first = self
            .book
            .leases
            .get(&rp.lease_id)
            .ok_or_else(|| format!("no lease {} on this node", rp.lease_id))?
            .containers
            .iter()
            .find(|c| !c.id.is_empty())
            .ok_or_else(|| format!("lease {} runs no container", rp.lease_id))?
            .id
            .clone();
        let docker = self.docker()?;

        let expect: Vec<std::net::IpAddr> = rp
            .expect
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| format!("expected Ray node `{a}` is not an IP address"))
            })
            .collect::<Result<_, _>>()?;
        let wait = rp.wait_ms.min(60_000);
        let mut cmd = vec![
            "python3".to_owned(),
            "-c".to_owned(),
            RAY_PROBE.to_owned(),
            addr.to_string(),
            wait.to_string(),
        ];
        cmd.extend(expect.iter().map(|a| a.to_string()));
        // The probe's own wait, and a minute for Python and Ray to answer.
        let limit = Duration::from_millis(wait.into()) + Duration::from_secs(60);
        Ok(async move {
            let (code, out) = docker
                .exec_output(&first, cmd, 64 << 10, limit)
                .await
                .map_err(|e| e.to_string())?;
            let alive = out.lines().rev().find_map(|l| {
                let rest = l.strip_prefix("alive")?;
                Some(rest.split_whitespace().map(str::to_owned).collect())
            });
            match (code, alive) {
                (0, Some(alive)) => Ok(alive),
                _ => {
                    let tail: String = out
                        .chars()
                        .rev()
                        .take(300)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    Err(format!("the Ray probe exited with {code}: {}", tail.trim()))
                }
            }
        })
    }

    /// The container a ContainerLogs asks for (by name, or the lease's
    /// first): its name and Docker id.
    fn log_container(&self, cl: &pb::ContainerLogs) -> Result<(String, String), String> {
        let lease = self
            .book
            .leases
            .get(&cl.lease_id)
            .ok_or_else(|| format!("no lease {} on this node", cl.lease_id))?;
        let c = if cl.name.is_empty() {
            lease.containers.first()
        } else {
            lease.containers.iter().find(|c| c.name == cl.name)
        };
        let c = c.ok_or_else(|| match cl.name.as_str() {
            "" => format!("lease {} runs no container", cl.lease_id),
            n => format!(
                "lease {} has no container named {n} (it has: {})",
                cl.lease_id,
                lease
                    .containers
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        Ok((c.name.clone(), c.id.clone()))
    }

    /// The network namespace of the lease's first container, running.
    async fn lease_netns(&self, lease_id: &str) -> Result<crate::mesh::place::Netns, String> {
        let lease = self
            .book
            .leases
            .get(lease_id)
            .ok_or_else(|| format!("no lease {lease_id} on this node"))?;
        let first = lease
            .containers
            .iter()
            .find(|c| !c.id.is_empty())
            .ok_or_else(|| format!("lease {lease_id} runs no container to put the mesh in"))?;
        let seen = self
            .docker()?
            .inspect(&first.id)
            .await
            .map_err(|e| e.to_string())?;
        let pid = seen.pid.filter(|_| seen.running).ok_or_else(|| {
            format!(
                "container {} of lease {lease_id} is not running ({})",
                first.name,
                match seen.exit_code {
                    Some(code) => format!("it exited with {code}"),
                    None => "Docker gives it no process".to_owned(),
                }
            )
        })?;
        crate::mesh::place::Netns::of_pid(
            pid,
            format!("lease {lease_id} ({}, pid {pid})", first.name),
        )
        .map_err(|e| {
            format!(
                "the network namespace of container {} (pid {pid}): {e}",
                first.name
            )
        })
    }

    fn docker(&self) -> Result<Docker, String> {
        self.docker.clone().ok_or_else(|| {
            format!(
                "Docker is unreachable on this node ({})",
                self.docker_error.as_deref().unwrap_or("not connected yet")
            )
        })
    }

    fn node_gpus(&self) -> Vec<String> {
        self.w
            .inventory
            .borrow()
            .gpus
            .iter()
            .map(|g| g.uuid.clone())
            .collect()
    }

    /// Starts a lease: its scratch volume, then its containers. Returns
    /// their states, what the renter is told of the volume, and the
    /// volume's key sealed to the renter's if the start asked for it.
    async fn lease_start(
        &mut self,
        ls: pb::LeaseStart,
    ) -> Result<(Vec<pb::ContainerState>, String, Vec<u8>), String> {
        let renter_key = match ls.scratch_key_to.as_slice() {
            [] => None,
            k => Some(
                warden_proto::sealed::key32(k)
                    .map_err(|e| format!("scratch_key_to (the renter's X25519 public key): {e}"))?,
            ),
        };
        let gpus = self.book.plan_start(&ls, &self.node_gpus())?;
        // Every spec is checked before anything is created.
        for spec in &ls.containers {
            confine::check(spec, &self.w.config).map_err(|e| e.to_string())?;
        }
        let docker = self.docker()?;
        // Before the containers: they are made with it.
        let volume = self.make_scratch(&ls.lease_id, renter_key).await?;
        let encrypted = volume.is_ok();
        let note = scratch::note(&volume, self.w.config.scratch);
        let sealed = volume.ok().flatten().unwrap_or_default();
        let note = if sealed.is_empty() {
            note
        } else {
            format!(
                "{note}; a copy of its key is sealed to the renter's (warden lease scratch-key)"
            )
        };
        let mut lease = Lease {
            id: ls.lease_id.clone(),
            renter: ls.renter.clone(),
            gpus,
            started_unix_ms: crate::now_ms(),
            containers: Vec::new(),
        };
        for spec in &ls.containers {
            let started = match self.ensure_network(&docker, &lease.id, spec).await {
                Ok(()) => self.start_container(&docker, &lease, spec, encrypted).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(c) => lease.containers.push(c),
                Err(e) => {
                    // All or nothing: what this lease already started goes.
                    for c in &lease.containers {
                        let _ = docker.stop_and_remove(&c.id, Duration::from_secs(1)).await;
                    }
                    self.remove_network(&docker, &lease.id).await;
                    if encrypted {
                        if let Err(gone) = self.destroy_scratch(&lease.id).await {
                            tracing::error!(lease = %lease.id, error = %gone, "the scratch volume of a lease that failed to start could not be destroyed; retried at the next start");
                        }
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(lease = %lease.id, gpus = ?lease.gpus, containers = lease.containers.len(), "lease started");
        let states = lease.container_states();
        self.report(vec![wev(
            &lease.id,
            "",
            "",
            WorkloadEventKind::LeaseStarted,
            lease.gpus.join(","),
        )])
        .await;
        if encrypted {
            self.book
                .scratch
                .insert(lease.id.clone(), Volume::Encrypted);
        }
        self.book.leases.insert(lease.id.clone(), lease);
        self.save();
        Ok((states, note, sealed))
    }

    /// Makes the lease's encrypted scratch volume as `workload.scratch`
    /// says: `Ok(Ok)` made (with its key sealed to `renter`'s, if given),
    /// `Ok(Err(why))` the lease goes on without one (off, or unavailable in
    /// `auto`), `Err` the lease is refused.
    async fn make_scratch(
        &self,
        lease_id: &str,
        renter: Option<[u8; 32]>,
    ) -> Result<Result<Option<Vec<u8>>, String>, String> {
        let mode = self.w.config.scratch;
        if mode == ScratchMode::Off {
            return Ok(Err("workload.scratch is off".into()));
        }
        let (layout, id) = (self.scratch.clone(), lease_id.to_owned());
        let made = self
            .in_dockers_namespace(move |place| {
                gocryptfs::create(place, &layout, &id, renter.as_ref()).map_err(|e| e.to_string())
            })
            .await;
        match made {
            Ok(sealed) => {
                tracing::info!(lease = %lease_id, path = %self.scratch.plain(lease_id).display(), sealed_to_renter = sealed.is_some(), "encrypted scratch volume mounted");
                Ok(Ok(sealed))
            }
            Err(e) if mode == ScratchMode::Required => Err(format!(
                "the encrypted scratch volume could not be made (workload.scratch is required): {e}"
            )),
            Err(e) => {
                tracing::warn!(lease = %lease_id, error = %e, "no encrypted scratch volume; the lease runs without one");
                Ok(Err(e))
            }
        }
    }

    /// Destroys a lease's volume (unmount, key gone with gocryptfs,
    /// ciphertext removed), if it has one.
    async fn destroy_scratch(&self, lease_id: &str) -> Result<(), String> {
        // A volume's directory is the same in every mount namespace (only
        // the mount on it differs): none here, no volume, and no need to
        // enter Docker's namespace, which may be impossible.
        if !self.scratch.dir(lease_id).exists() {
            return Ok(());
        }
        let (layout, id) = (self.scratch.clone(), lease_id.to_owned());
        self.in_dockers_namespace(move |place| {
            gocryptfs::destroy(place, &layout, &id).map_err(|e| e.to_string())
        })
        .await
    }

    /// Runs `f` on a blocking thread with the mount namespace Docker makes
    /// its containers' mounts in (found anew each time: Docker may have
    /// restarted), where the scratch volumes live.
    async fn in_dockers_namespace<R: Send + 'static>(
        &self,
        f: impl FnOnce(&gocryptfs::Place) -> Result<R, String> + Send + 'static,
    ) -> Result<R, String> {
        let socket = self.w.config.docker_socket.clone();
        tokio::task::spawn_blocking(move || {
            f(&gocryptfs::Place::docker(&socket).map_err(|e| e.to_string())?)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Makes sure the image is here (pulling it if not), then creates and
    /// starts the container.
    async fn start_container(
        &self,
        docker: &Docker,
        lease: &Lease,
        spec: &pb::ContainerSpec,
        scratch: bool,
    ) -> Result<Container, String> {
        let fail = |e: String| format!("container {}: {e}", spec.name);
        let spec = &self.resolve_mounts(docker, spec).await.map_err(fail)?;
        let present = docker
            .image_present(&spec.image)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !present {
            // Pulled before the command was carried out; removed since.
            return Err(fail(format!(
                "image {} is not on this node (it was removed after it was pulled)",
                spec.image
            )));
        }
        let mut config = confine::container_config(
            spec,
            &confine::Owner {
                lease_id: &lease.id,
                node_id: &self.w.node_id,
            },
            &lease.gpus,
            &self.w.config,
            self.default_memory,
        );
        if scratch {
            let host = config.host_config.get_or_insert_with(Default::default);
            host.mounts
                .get_or_insert_with(Vec::new)
                .push(scratch::mount(&self.scratch.source(&lease.id)));
        }
        // Taken before the container exists, so that every Docker event of it
        // is later than this state (the coordinator keeps the latest).
        let created_ms = crate::now_ms();
        let id = docker
            .create_and_start(&confine::docker_name(&lease.id, &spec.name), config)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(Container {
            name: spec.name.clone(),
            image: spec.image.clone(),
            id,
            state: ContainerStatus::Running.into(),
            exit_code: 0,
            health: String::new(),
            time_unix_ms: created_ms,
        })
    }

    /// Makes the lease's own network before its first container that
    /// needs one (a lease adopted from before networks were per lease gets
    /// one for its next container).
    async fn ensure_network(
        &self,
        docker: &Docker,
        lease_id: &str,
        spec: &pb::ContainerSpec,
    ) -> Result<(), String> {
        if !confine::wants_network(spec) {
            return Ok(());
        }
        let name = confine::network_name(lease_id);
        let labels = confine::network_labels(&confine::Owner {
            lease_id,
            node_id: &self.w.node_id,
        });
        if docker
            .ensure_network(&name, labels)
            .await
            .map_err(|e| format!("lease network: {e}"))?
        {
            tracing::info!(lease = %lease_id, network = %name, "lease network created");
        }
        // Before any container of the lease is on it; again for each (a
        // rule deleted by hand comes back at the next container).
        isolate_network(docker, &name)
            .await
            .map_err(|e| format!("lease network {name}: {e}"))
    }

    /// Removes a lease's network, saying so if it cannot.
    async fn remove_network(&self, docker: &Docker, lease_id: &str) {
        let name = confine::network_name(lease_id);
        if let Err(e) = drop_network(docker, &name).await {
            tracing::warn!(lease = %lease_id, network = %name, error = %e, "cannot remove the lease network");
        }
    }

    /// The spec with each mount source resolved on the host (no symlink
    /// below its allowed path, not in a protected place), refused if a
    /// running container could swap part of it before Docker mounts it.
    /// Done just before the container is made, after every container
    /// started before it, so the list of writers is the one that counts.
    async fn resolve_mounts(
        &self,
        docker: &Docker,
        spec: &pb::ContainerSpec,
    ) -> Result<pb::ContainerSpec, String> {
        let mut spec = spec.clone();
        if spec.mounts.is_empty() {
            return Ok(spec);
        }
        let cfg = &self.w.config;
        let writable = docker
            .writable_mount_sources()
            .await
            .map_err(|e| e.to_string())?;
        for m in &mut spec.mounts {
            let resolved = hostpath::resolve(Path::new(&m.source), &cfg.allowed_host_paths, |p| {
                confine::host_path_danger(p, &self.w.state_dir, &cfg.docker_socket)
            })
            .map_err(|e| e.to_string())?;
            if let Some(w) = confine::swappable_by(&resolved, &writable) {
                return Err(format!(
                    "host path {} is refused: it lies below {}, which a running container can write, so it could be swapped for a symbolic link while it is mounted",
                    m.source,
                    w.display()
                ));
            }
            tracing::info!(source = %m.source, resolved = %resolved.display(), "mount source resolved");
            m.source = resolved.to_string_lossy().into_owned();
        }
        Ok(spec)
    }

    async fn lease_end(&mut self, le: pb::LeaseEnd) -> Result<Vec<pb::ContainerState>, String> {
        let Some(lease) = self.book.leases.get(&le.lease_id).cloned() else {
            // A start still pulling its images is called off: it will not run.
            let before = self.pulling.len();
            self.pulling.retain(|(l, _)| *l != le.lease_id);
            if self.pulling.len() < before {
                tracing::info!(lease = %le.lease_id, "lease ended before its images were pulled");
                return Ok(Vec::new());
            }
            return Err(format!("lease {} is not active on this node", le.lease_id));
        };
        let docker = self.docker()?;
        let grace = if le.grace_seconds > 0 {
            Duration::from_secs(le.grace_seconds.into())
        } else {
            self.w.config.stop_grace
        };
        let mut states = Vec::new();
        let mut errors = Vec::new();
        for c in &lease.containers {
            let mut s = c.to_pb(&lease.id);
            match docker.stop_and_remove(&c.id, grace).await {
                Ok(()) => s.state = ContainerStatus::Removed.into(),
                Err(e) => errors.push(format!("{}: {e}", c.name)),
            }
            s.time_unix_ms = crate::now_ms();
            states.push(s);
        }
        if !errors.is_empty() {
            // The lease stays so that ending it again retries what is left.
            return Err(format!("could not remove: {}", errors.join("; ")));
        }
        // Its containers are gone: nothing holds the volume any more.
        if let Err(e) = self.destroy_scratch(&lease.id).await {
            return Err(format!(
                "the containers are removed, but the encrypted scratch volume could not be destroyed: {e}"
            ));
        }
        if self.book.scratch.remove(&lease.id).is_some() {
            tracing::info!(lease = %lease.id, "scratch volume destroyed: unmounted, key gone, ciphertext removed");
        }
        self.remove_network(&docker, &lease.id).await;
        self.book.leases.remove(&lease.id);
        self.save();
        tracing::info!(lease = %lease.id, "lease ended; its containers are removed");
        self.report(vec![wev(
            &lease.id,
            "",
            "",
            WorkloadEventKind::LeaseEnded,
            String::new(),
        )])
        .await;
        Ok(states)
    }

    async fn run_container(
        &mut self,
        rc: pb::RunContainer,
    ) -> Result<Vec<pb::ContainerState>, String> {
        let spec = rc.spec.unwrap_or_default();
        let Some(lease) = self.book.leases.get(&rc.lease_id).cloned() else {
            return Err(format!("lease {} is not active on this node", rc.lease_id));
        };
        if lease.containers.iter().any(|c| c.name == spec.name) {
            return Err(format!(
                "lease {} already has a container named {}",
                rc.lease_id, spec.name
            ));
        }
        confine::check(&spec, &self.w.config).map_err(|e| e.to_string())?;
        let docker = self.docker()?;
        let scratch = match self.book.scratch.get(&lease.id) {
            None => false,
            Some(Volume::Encrypted) => {
                let plain = self.scratch.plain(&lease.id);
                self.in_dockers_namespace(move |place| gocryptfs::live(place, &plain))
                    .await
                    .map_err(|e| format!("lease {}'s encrypted scratch volume is lost ({e}); a new container would find /scratch unencrypted; end the lease", lease.id))?;
                true
            }
            Some(Volume::Lost) => {
                return Err(format!(
                    "lease {}'s encrypted scratch volume was lost (its key ended with an earlier agent); a new container would find /scratch unencrypted; end the lease",
                    lease.id
                ))
            }
        };
        self.ensure_network(&docker, &lease.id, &spec).await?;
        let c = self
            .start_container(&docker, &lease, &spec, scratch)
            .await?;
        let state = c.to_pb(&lease.id);
        if let Some(l) = self.book.leases.get_mut(&rc.lease_id) {
            l.containers.push(c);
        }
        self.save();
        Ok(vec![state])
    }

    async fn stop_container(
        &mut self,
        sc: pb::StopContainer,
    ) -> Result<Vec<pb::ContainerState>, String> {
        let Some(c) = self.book.find_container(&sc.lease_id, &sc.name).cloned() else {
            return Err(format!(
                "lease {} has no container named {}",
                sc.lease_id, sc.name
            ));
        };
        let grace = if sc.grace_seconds > 0 {
            Duration::from_secs(sc.grace_seconds.into())
        } else {
            self.w.config.stop_grace
        };
        self.docker()?
            .stop_and_remove(&c.id, grace)
            .await
            .map_err(|e| format!("{}: {e}", sc.name))?;
        if let Some(l) = self.book.leases.get_mut(&sc.lease_id) {
            l.containers.retain(|x| x.name != sc.name);
        }
        self.save();
        let mut s = c.to_pb(&sc.lease_id);
        s.state = ContainerStatus::Removed.into();
        s.time_unix_ms = crate::now_ms();
        Ok(vec![s])
    }
}

/// Keeps a lease network's bridge apart from every other (`isolation`).
async fn isolate_network(docker: &Docker, name: &str) -> Result<(), String> {
    let bridge = docker
        .network_bridge(name)
        .await
        .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || isolation::isolate(&bridge))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Removes a lease network, then the rules that kept its bridge apart
/// (not before: its containers may still be on it until it goes).
async fn drop_network(docker: &Docker, name: &str) -> Result<(), String> {
    let bridge = match docker.network_bridge(name).await {
        Ok(b) => Some(b),
        Err(DockerError::NotFound { .. }) => None,
        Err(e) => return Err(e.to_string()),
    };
    docker
        .remove_network(name)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(bridge) = bridge {
        tokio::task::spawn_blocking(move || isolation::release(&bridge))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ray_probe_is_python_that_compiles() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys; compile(sys.argv[1], 'probe', 'exec')",
                RAY_PROBE,
            ])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_book_survives_a_save_and_a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.json");
        assert_eq!(load_book(&path).unwrap(), Book::default());
        let mut b = Book::default();
        b.leases.insert(
            "l1".into(),
            Lease {
                id: "l1".into(),
                renter: String::new(),
                gpus: vec!["GPU-a".into()],
                started_unix_ms: 5,
                containers: Vec::new(),
            },
        );
        save_book(&path, &b).unwrap();
        assert_eq!(load_book(&path).unwrap(), b);
        std::fs::write(&path, b"{not json").unwrap();
        let err = load_book(&path).unwrap_err().to_string();
        assert!(
            err.contains("not valid JSON") && err.contains("removing nothing"),
            "{err}"
        );
        assert!(!path.exists(), "the corrupt file is moved aside");
        let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(aside.len(), 1);
    }
}
