//! Proof of Time-Lock, the task: the shell around [`Core`]. It feeds the
//! core the leases, the clock, the GPU samples and the inventory, carries
//! out what the core asks (scan `/proc`, ask Docker, end a process, stop a
//! container, sign into the outbox, save the chains) and brings the answers
//! back. Every decision is the core's; see `core.rs` for the cycle.
//!
//! Docker is reached through the handle the workload task lends (it owns
//! the connection: it connects, follows events and reconnects), not through
//! that task's command queue: enforcement must not wait behind a workload
//! command (a stop takes its whole grace). What the time-lock does is read
//! the engine (list running containers, inspect them) and stop a container
//! holding a leased GPU; the engine serialises those against the workload
//! task's calls, and a container of ours stopped here reaches the workload
//! task as Docker's die event. While no handle is lent, the epoch is blind
//! and says why.
//!
//! The chain heads and totals are persisted (`chains.json`, replaced
//! atomically) after every signed attestation, so a restarted agent goes on
//! with the same chain under its new start id; the epoch it was in when it
//! stopped is lost, and shows as a gap in the windows and in coverage.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use super::{
    core::{Action, ChainState, Core, Enforcing, GpuRequests, HostScan, Settings},
    enforce::{exec, Policy, Seen},
    guard::{fanotify::Guard, GuardReport},
    procs,
};
use crate::{
    config::TimeLockConfig,
    delivery::outbox::Outbox,
    workloads::{book::Lease, docker::DockerError, task::Engine},
};

/// Loads the chains; a missing file is none. A corrupt one is an error: a
/// chain cannot be continued from a guess.
pub fn load_chains(path: &Path) -> Result<BTreeMap<String, ChainState>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn save_chains(path: &Path, chains: &BTreeMap<String, ChainState>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(chains).map_err(std::io::Error::other)?;
    warden_state::file::write_private(path, &bytes)
}

/// Describes the processes NVML listed and, when `full`, finds the holders
/// of the device nodes matching `patterns`. Blocking (it reads `/proc`).
fn scan_host(patterns: &[String], nvml: Vec<(u32, String)>, full: bool) -> HostScan {
    let proc_root = Path::new("/proc");
    let nvml = nvml
        .into_iter()
        .filter_map(|(pid, uuid)| {
            let holder = procs::describe(proc_root, pid, format!("nvml:{uuid}"))?;
            Some(Seen {
                holder,
                gpu: Some(uuid),
            })
        })
        .collect();
    if !full {
        return HostScan {
            nvml,
            ..Default::default()
        };
    }
    let scan = procs::scan(proc_root, patterns);
    HostScan {
        holders: scan.holders,
        blind: scan.blind,
        nvml,
    }
}

/// The device requests of running containers other than `ours`, and what
/// Docker could not answer, which leaves the epoch blind (an edge that
/// failed is not "no containers").
async fn gpu_requests(engine: Engine, ours: &BTreeSet<String>) -> GpuRequests {
    let docker = match engine {
        Ok(d) => d,
        Err(e) => {
            return GpuRequests {
                found: Vec::new(),
                blind: vec![format!("Docker could not be asked for GPU requests: {e}")],
            }
        }
    };
    let ids = match docker.list_running().await {
        Ok(ids) => ids,
        Err(e) => {
            return GpuRequests {
                found: Vec::new(),
                blind: vec![format!("Docker could not list running containers: {e}")],
            }
        }
    };
    let mut answer = GpuRequests::default();
    for id in ids.into_iter().filter(|id| !ours.contains(id)) {
        match docker.inspect(&id).await {
            Ok(c) => {
                let requests = c.host_config.device_requests.clone().unwrap_or_default();
                answer.found.push((id, requests));
            }
            // Removed since it was listed: nothing there to see.
            Err(DockerError::NotFound { .. }) => {}
            Err(e) => answer
                .blind
                .push(format!("Docker could not inspect container {id}: {e}")),
        }
    }
    answer
}

/// Stops a foreign container in the background (SIGTERM, then SIGKILL
/// after `grace`); `ev` names it, and comes back on `done` with the outcome.
fn spawn_stop(
    done: mpsc::Sender<Done>,
    engine: Engine,
    grace: Duration,
    mut ev: pb::EnforcementEvent,
) {
    tokio::spawn(async move {
        ev.sigterm_unix_ms = crate::now_ms();
        ev.outcome = match engine {
            Ok(d) => d
                .stop(&ev.container, grace)
                .await
                .map_or_else(|e| format!("stop failed: {e}"), |()| "stopped".to_owned()),
            Err(e) => format!("stop failed: {e}"),
        };
        ev.done_unix_ms = crate::now_ms();
        let what = Enforcing::Stop {
            container: ev.container.clone(),
        };
        let _ = done.send((what, ev)).await;
    });
}

/// Ends a foreign process in the background; the event comes back on
/// `done` with the outcome and its times.
fn spawn_kill(
    done: mpsc::Sender<Done>,
    pid: u32,
    start_time: u64,
    grace: Duration,
    mut ev: pb::EnforcementEvent,
) {
    tokio::spawn(async move {
        let o = exec::kill_process(pid, start_time, grace).await;
        ev.outcome = o.outcome.to_string();
        ev.sigterm_unix_ms = o.sigterm_at_ms.unwrap_or(0);
        ev.sigkill_unix_ms = o.sigkill_at_ms.unwrap_or(0);
        ev.done_unix_ms = o.exited_at_ms.unwrap_or_else(crate::now_ms);
        let _ = done.send((Enforcing::Kill { pid, start_time }, ev)).await;
    });
}

/// What the task needs from the rest of the agent.
pub struct TimeLock {
    pub config: TimeLockConfig,
    pub sample_interval: Duration,
    pub state_path: PathBuf,
    pub outbox: Outbox,
    pub leases: watch::Receiver<Vec<Lease>>,
    pub gpus: watch::Receiver<Vec<pb::GpuSample>>,
    pub inventory: watch::Receiver<pb::InventorySummary>,
    /// The workload task's Docker connection.
    pub engine: watch::Receiver<Engine>,
    /// Grace for stopping a foreign container.
    pub stop_grace: Duration,
    /// A reloaded configuration (SIGHUP): the allowlist, device patterns
    /// and graces apply from the next cycle; the epoch stays as started.
    pub reload: watch::Receiver<crate::AgentConfig>,
    /// The open guard's state, for `warden status`.
    pub guard: watch::Sender<String>,
}

/// An enforcement finished.
type Done = (Enforcing, pb::EnforcementEvent);

/// The open guard, or why there is none.
enum Guarding {
    On(Guard),
    Off(String),
}

impl Guarding {
    /// "on", or "off: why".
    fn status(&self) -> String {
        match self {
            Guarding::On(_) => "on".into(),
            Guarding::Off(why) => format!("off: {why}"),
        }
    }

    /// A guard if `prevent` and the kernel allow one.
    fn new(prevent: bool) -> Guarding {
        if !prevent {
            return Guarding::Off(
                "prevention is off in the configuration (timelock.prevent = false)".into(),
            );
        }
        match Guard::start(PathBuf::from("/proc")) {
            Ok(g) => {
                tracing::info!("open guard on: foreign opens of leased GPUs are denied");
                Guarding::On(g)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no open guard: foreign holders of leased GPUs are found by scanning /proc every cycle");
                Guarding::Off(e.to_string())
            }
        }
    }
}

impl TimeLock {
    /// Runs until `shutdown`.
    pub async fn run(
        mut self,
        mut challenges: mpsc::Receiver<pb::Challenge>,
        shutdown: CancellationToken,
    ) {
        let chains = match load_chains(&self.state_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "lease chains unreadable; the chains of running leases restart from nothing and will not verify");
                BTreeMap::new()
            }
        };
        let cycle_ms = self.sample_interval.as_millis() as i64;
        let mut core = Core::new(
            Settings {
                cycle_ms,
                epoch_ms: self.config.epoch.as_millis() as i64,
                policy: Policy {
                    agent_pid: std::process::id(),
                    allow_exe: self.config.allow_exe.clone(),
                },
                device_patterns: self.config.device_patterns.clone(),
                kill_grace: self.config.kill_grace,
                stop_grace: self.stop_grace,
                safety_scan_ms: self.config.safety_scan.as_millis() as i64,
            },
            chains,
        );
        let mut prevent = self.config.prevent;
        let mut guarding = Guarding::new(prevent);
        self.guard.send_replace(guarding.status());
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(256);
        loop {
            // The core's deadline is on the agent's clock; a wait is never
            // longer than one cycle, whatever that clock did.
            let wait = core
                .next_timeout()
                .map_or(0, |at| (at - crate::now_ms()).clamp(0, cycle_ms));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Ok(()) = self.reload.changed() => {
                    let c = self.reload.borrow_and_update().clone();
                    core.reconfigure(c.timelock.allow_exe, c.timelock.device_patterns, c.timelock.kill_grace, c.workload.stop_grace, c.timelock.safety_scan);
                    if c.timelock.prevent != prevent {
                        prevent = c.timelock.prevent;
                        guarding = Guarding::new(prevent);
                        self.guard.send_replace(guarding.status());
                    }
                }
                Some(ch) = challenges.recv() => core.challenge(ch),
                Some((what, ev)) = done_rx.recv() => {
                    core.set_leases(self.leases.borrow().clone());
                    core.enforced(what, ev);
                }
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {
                    // Challenges already here go into the epoch they arrived in.
                    while let Ok(ch) = challenges.try_recv() {
                        core.challenge(ch);
                    }
                    core.set_leases(self.leases.borrow().clone());
                    let samples = self.gpus.borrow().clone();
                    let inventory = self.inventory.borrow().clone();
                    core.handle_tick(crate::now_ms(), &samples, &inventory);
                    self.execute(&mut core, &mut guarding, &done_tx).await;
                }
            }
        }
    }

    /// Carries out the core's actions in order, answering those it waits for.
    async fn execute(&self, core: &mut Core, guarding: &mut Guarding, done: &mpsc::Sender<Done>) {
        while let Some(action) = core.poll_action() {
            match action {
                Action::Guard {
                    targets,
                    leases,
                    all_gpus_leased,
                } => {
                    // A few stat and fanotify_mark calls: not worth a thread.
                    let report = match guarding {
                        Guarding::On(g) => {
                            g.apply(&targets, leases, all_gpus_leased, core.policy().clone())
                        }
                        Guarding::Off(why) => GuardReport::off(why.clone()),
                    };
                    core.handle_guard(report);
                }
                Action::Scan {
                    patterns,
                    nvml,
                    full,
                } => {
                    let scanned =
                        tokio::task::spawn_blocking(move || scan_host(&patterns, nvml, full)).await;
                    core.handle_scan(scanned.map_err(|e| e.to_string()));
                }
                Action::FindGpuRequests { ours } => {
                    let engine = self.engine.borrow().clone();
                    core.handle_gpu_requests(gpu_requests(engine, &ours).await);
                }
                Action::Kill {
                    pid,
                    start_time,
                    grace,
                    event,
                } => {
                    spawn_kill(done.clone(), pid, start_time, grace, event);
                }
                Action::Stop { grace, event } => {
                    spawn_stop(done.clone(), self.engine.borrow().clone(), grace, event);
                }
                Action::Attest(a) => {
                    let spooled = self
                        .outbox
                        .emit_signed(pb::record::Body::Attestation(a.clone()))
                        .await;
                    core.attested(a, spooled);
                }
                Action::Prove(proof) => {
                    let _ = self.outbox.emit(pb::record::Body::LeaseProof(proof)).await;
                }
                Action::Persist => {
                    if let Err(e) = save_chains(&self.state_path, core.chains()) {
                        tracing::error!(path = %self.state_path.display(), error = %e, "cannot save the lease chains");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::chain::Tally;

    #[tokio::test]
    async fn docker_that_cannot_answer_leaves_the_epoch_blind_not_clean() {
        let why = "Docker's event stream ended".to_owned();
        let answer = gpu_requests(Err(why.clone()), &BTreeSet::new()).await;
        assert!(answer.found.is_empty());
        assert_eq!(answer.blind.len(), 1);
        assert!(
            answer.blind[0].contains("Docker could not be asked") && answer.blind[0].contains(&why),
            "{:?}",
            answer.blind
        );
    }

    #[test]
    fn chains_survive_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chains.json");
        assert!(load_chains(&path).unwrap().is_empty());
        let mut c = BTreeMap::new();
        c.insert(
            "l1".to_owned(),
            ChainState {
                t1_unix_ms: 5,
                head_seq: 3,
                head_sha256: [7; 32],
                tally: Tally {
                    first_seq: 1,
                    last_seq: 3,
                    ..Default::default()
                },
            },
        );
        save_chains(&path, &c).unwrap();
        assert_eq!(load_chains(&path).unwrap(), c);
        std::fs::write(&path, "{").unwrap();
        assert!(load_chains(&path).is_err());
    }
}
