//! Proof of Time-Lock, the task. During leases, every sampling cycle it
//! finds the GPU holders (`procs`), judges them (`enforce::decide`), ends
//! foreign processes and stops foreign containers; every epoch it signs one
//! attestation per lease (`attest::Epoch`), linked into the lease's chain
//! (`chain::Head`); when a lease ends it closes the last epoch and signs the
//! proof (`chain::Tally`). Challenges from the coordinator go into the open
//! epoch of their lease.
//!
//! The chain heads and totals are persisted (`chains.json`, replaced
//! atomically) after every signed attestation, so a restarted agent goes on
//! with the same chain under its new start id; the epoch it was in when it
//! stopped is lost, and shows as a gap in the windows and in coverage.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    time::Duration,
};

use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::{
    chain::{Head, Tally},
    pb,
};

use super::{
    attest::Epoch,
    enforce::{self, AllowReason, LeaseView, Policy, Seen, Verdict},
    procs,
};
use crate::{
    config::TimeLockConfig,
    delivery::outbox::Outbox,
    workloads::{book::Lease, docker::Docker},
};

/// What is kept of a lease's chain across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChainState {
    pub t1_unix_ms: i64,
    pub head_seq: u64,
    pub head_sha256: [u8; 32],
    pub tally: Tally,
}

impl ChainState {
    fn head(&self) -> Head {
        Head {
            lease_seq: self.head_seq,
            sha256: self.head_sha256,
        }
    }
}

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

/// The verdict of a holder of a leased GPU, as the record names it; None
/// for holders that concern no lease (not recorded).
pub fn verdict_name(v: &Verdict) -> Option<&'static str> {
    match v {
        Verdict::Allowed(AllowReason::LeaseContainer) => Some("lease-container"),
        Verdict::Allowed(AllowReason::Agent) => Some("agent"),
        Verdict::Allowed(AllowReason::Allowlisted) => Some("allowlisted"),
        Verdict::Allowed(AllowReason::ProtectedPid)
        | Verdict::KillProcess
        | Verdict::StopContainer(_) => Some("foreign"),
        Verdict::Allowed(_) => None,
    }
}

/// Whether a container's device requests ask for one of `gpus`: by uuid,
/// or for every GPU (count -1) through a GPU driver or capability.
pub fn requests_gpu(requests: &[bollard::models::DeviceRequest], gpus: &[String]) -> bool {
    requests.iter().any(|r| {
        let is_gpu = r.driver.as_deref() == Some("nvidia")
            || r.capabilities
                .as_ref()
                .is_some_and(|c| c.iter().flatten().any(|cap| cap == "gpu"));
        let by_id = r
            .device_ids
            .as_ref()
            .is_some_and(|ids| ids.iter().any(|id| gpus.contains(id)));
        let all = r.count == Some(-1)
            || (r.count.unwrap_or(0) > 0 && r.device_ids.as_ref().is_none_or(|i| i.is_empty()));
        is_gpu && (by_id || (all && !gpus.is_empty()))
    })
}

/// Running containers that are no lease's own but asked Docker for a
/// leased GPU (they may not have opened it yet): (container id, gpu); and
/// what Docker could not answer, which leaves the epoch blind (an edge
/// that failed is not "no containers").
async fn gpu_requesters(socket: &Path, leases: &[Lease]) -> (Vec<(String, String)>, Vec<String>) {
    let docker = match Docker::connect(socket).await {
        Ok(d) => d,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("Docker could not be asked for GPU requests: {e}")],
            )
        }
    };
    let ids = match docker.list_running().await {
        Ok(ids) => ids,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("Docker could not list running containers: {e}")],
            )
        }
    };
    let mut blind = Vec::new();
    let ours: HashSet<&str> = leases
        .iter()
        .flat_map(|l| l.containers.iter().map(|c| c.id.as_str()))
        .collect();
    let mut out = Vec::new();
    for id in ids.into_iter().filter(|id| !ours.contains(id.as_str())) {
        let c = match docker.inspect(&id).await {
            Ok(c) => c,
            // Removed since it was listed: nothing there to see.
            Err(crate::workloads::docker::DockerError::NotFound { .. }) => continue,
            Err(e) => {
                blind.push(format!("Docker could not inspect container {id}: {e}"));
                continue;
            }
        };
        let requests = c.host_config.device_requests.clone().unwrap_or_default();
        for l in leases {
            if requests_gpu(&requests, &l.gpus) {
                out.push((id.clone(), l.gpus.first().cloned().unwrap_or_default()));
                break;
            }
        }
    }
    (out, blind)
}

/// Stops a foreign container in the background (SIGTERM, then SIGKILL
/// after `grace`); `ev` names it, and comes back on `done` with the outcome.
fn spawn_stop(
    done: mpsc::Sender<(Option<(u32, u64)>, Done)>,
    socket: PathBuf,
    grace: Duration,
    mut ev: pb::EnforcementEvent,
) {
    tokio::spawn(async move {
        ev.action = "stop".into();
        ev.sigterm_unix_ms = crate::now_ms();
        ev.outcome = match Docker::connect(&socket).await {
            Ok(d) => d
                .stop(&ev.container, grace)
                .await
                .map_or_else(|e| format!("stop failed: {e}"), |()| "stopped".to_owned()),
            Err(e) => format!("stop failed: {e}"),
        };
        ev.done_unix_ms = crate::now_ms();
        let _ = done.send((None, ev)).await;
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
    pub docker_socket: PathBuf,
    /// Grace for stopping a foreign container.
    pub stop_grace: Duration,
    /// A reloaded configuration (SIGHUP): the allowlist, device patterns
    /// and graces apply from the next cycle; the epoch stays as started.
    pub reload: watch::Receiver<crate::AgentConfig>,
}

/// An enforcement finished, and which GPU it concerned.
type Done = pb::EnforcementEvent;

impl TimeLock {
    /// Runs until `shutdown`.
    pub async fn run(
        mut self,
        mut challenges: mpsc::Receiver<pb::Challenge>,
        shutdown: CancellationToken,
    ) {
        let mut chains = match load_chains(&self.state_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "lease chains unreadable; the chains of running leases restart from nothing and will not verify");
                BTreeMap::new()
            }
        };
        let mut policy = Policy {
            agent_pid: std::process::id(),
            allow_exe: self.config.allow_exe.clone(),
        };
        let cycle_ms = self.sample_interval.as_millis() as i64;
        let epoch_ms = self.config.epoch.as_millis() as i64;
        let mut epochs: BTreeMap<String, Epoch> = BTreeMap::new();
        let mut in_flight: HashSet<(u32, u64)> = HashSet::new();
        let mut stopping: HashSet<String> = HashSet::new();
        let (done_tx, mut done_rx) = mpsc::channel::<(Option<(u32, u64)>, Done)>(256);
        let mut tick = tokio::time::interval(self.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Ok(()) = self.reload.changed() => {
                    let c = self.reload.borrow_and_update().clone();
                    policy.allow_exe = c.timelock.allow_exe.clone();
                    self.config.device_patterns = c.timelock.device_patterns;
                    self.config.kill_grace = c.timelock.kill_grace;
                    self.config.allow_exe = c.timelock.allow_exe;
                    self.stop_grace = c.workload.stop_grace;
                }
                Some(ch) = challenges.recv() => {
                    match epochs.get_mut(&ch.lease_id) {
                        Some(e) => e.add_challenge(ch.nonce),
                        None => tracing::debug!(lease = %ch.lease_id, "challenge for no active lease"),
                    }
                }
                Some((key, ev)) = done_rx.recv() => {
                    if let Some(k) = key {
                        in_flight.remove(&k);
                    } else {
                        stopping.remove(&ev.container);
                    }
                    tracing::warn!(pid = ev.pid, exe = %ev.exe, container = %ev.container, gpu = %ev.gpu, action = %ev.action, outcome = %ev.outcome, "enforced");
                    let leases = self.leases.borrow().clone();
                    for l in leases.iter().filter(|l| ev.gpu.is_empty() || l.gpus.contains(&ev.gpu)) {
                        if let Some(e) = epochs.get_mut(&l.id) {
                            e.add_enforcement(ev.clone());
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = crate::now_ms();
                    let leases = self.leases.borrow().clone();
                    // Leases that ended: last epoch, then the proof.
                    let ended: Vec<String> = chains.keys().filter(|id| !leases.iter().any(|l| &l.id == *id)).cloned().collect();
                    for id in ended {
                        while let Ok(ch) = challenges.try_recv() {
                            if let Some(e) = epochs.get_mut(&ch.lease_id) {
                                e.add_challenge(ch.nonce);
                            }
                        }
                        if let (Some(epoch), Some(state)) = (epochs.remove(&id), chains.get_mut(&id)) {
                            self.sign(epoch, now, state).await;
                        }
                        if let Some(state) = chains.remove(&id) {
                            let proof = state.tally.proof(&id, state.t1_unix_ms, now);
                            tracing::info!(lease = %id, records = proof.last_seq, coverage = format!("{:.3}", proof.coverage), kills = proof.kills, "lease proof signed");
                            let _ = self.outbox.emit(pb::record::Body::LeaseProof(proof)).await;
                        }
                        self.persist(&chains);
                    }
                    // Leases that started (or that a restart finds running).
                    for l in &leases {
                        let state = chains.entry(l.id.clone()).or_insert_with(|| ChainState {
                            t1_unix_ms: l.started_unix_ms,
                            ..Default::default()
                        });
                        let start = if state.head_seq == 0 { state.t1_unix_ms.min(now) } else { now };
                        epochs.entry(l.id.clone()).or_insert_with(|| Epoch::new(&l.id, &l.gpus, start, cycle_ms));
                    }
                    if leases.is_empty() {
                        continue;
                    }
                    let samples = self.gpus.borrow().clone();
                    for e in epochs.values_mut() {
                        e.add_cycle(&samples);
                    }
                    // Who holds what, and what to do about it.
                    let patterns = self.config.device_patterns.clone();
                    // Two sources: descriptors on the device nodes, and NVML's process lists.
                    let from_nvml: Vec<(u32, String)> = samples
                        .iter()
                        .flat_map(|g| g.processes.iter().map(move |p| (p.pid, g.uuid.clone())))
                        .collect();
                    let scanned = tokio::task::spawn_blocking(move || {
                        let proc_root = Path::new("/proc");
                        let nvml: Vec<Seen> = from_nvml
                            .into_iter()
                            .filter_map(|(pid, uuid)| {
                                let holder = procs::describe(proc_root, pid, format!("nvml:{uuid}"))?;
                                Some(Seen { holder, gpu: Some(uuid) })
                            })
                            .collect();
                        (procs::scan(proc_root, &patterns), nvml)
                    })
                    .await;
                    // A scan that failed is not "no holders": the epochs say so.
                    let (scan, nvml_holders) = scanned.unwrap_or_else(|e| {
                        (procs::Scan { holders: Vec::new(), blind: vec![format!("the /proc scan failed: {e}")] }, Vec::new())
                    });
                    for reason in &scan.blind {
                        tracing::warn!(%reason, "part of the host went unseen this cycle");
                        for e in epochs.values_mut() {
                            e.add_blind(reason.clone());
                        }
                    }
                    let holders = scan.holders;
                    let inv = self.inventory.borrow().clone();
                    let mut seen = Seen::resolve(holders, |minor| inv.gpus.iter().find(|g| g.minor_number == minor).map(|g| g.uuid.clone()));
                    for n in nvml_holders {
                        if !seen.iter().any(|s| s.holder.pid == n.holder.pid && s.gpu == n.gpu) {
                            seen.push(n);
                        }
                    }
                    let views: Vec<LeaseView> = leases.iter().map(|l| LeaseView {
                        lease_id: l.id.clone(),
                        gpus: l.gpus.clone(),
                        containers: l.containers.iter().map(|c| c.id.clone()).collect(),
                    }).collect();
                    let leased: HashSet<&String> = leases.iter().flat_map(|l| &l.gpus).collect();
                    let all_leased = !inv.gpus.is_empty() && inv.gpus.iter().all(|g| leased.contains(&g.uuid));
                    for d in enforce::decide(&seen, &views, all_leased, &policy) {
                        let Some(name) = verdict_name(&d.verdict) else { continue };
                        let gpu = d.gpu.clone().unwrap_or_default();
                        for l in leases.iter().filter(|l| gpu.is_empty() || l.gpus.contains(&gpu)) {
                            if let Some(e) = epochs.get_mut(&l.id) {
                                e.add_holder(pb::HolderSeen {
                                    pid: d.pid,
                                    exe: d.exe.clone(),
                                    container: d.container.clone().unwrap_or_default(),
                                    gpu: gpu.clone(),
                                    verdict: name.into(),
                                });
                            }
                        }
                        match &d.verdict {
                            Verdict::KillProcess if in_flight.insert((d.pid, d.start_time)) => {
                                let (tx, grace, key) = (done_tx.clone(), self.config.kill_grace, (d.pid, d.start_time));
                                tracing::warn!(pid = d.pid, exe = %d.exe, gpu = %gpu, "foreign process on a leased GPU: ending it");
                                tokio::spawn(async move {
                                    let o = enforce::kill_process(d.pid, d.start_time, grace).await;
                                    let ev = pb::EnforcementEvent {
                                        pid: d.pid,
                                        exe: d.exe,
                                        container: String::new(),
                                        gpu,
                                        action: "kill".into(),
                                        outcome: o.outcome.to_string(),
                                        detected_unix_ms: now,
                                        sigterm_unix_ms: o.sigterm_at_ms.unwrap_or(0),
                                        sigkill_unix_ms: o.sigkill_at_ms.unwrap_or(0),
                                        done_unix_ms: o.exited_at_ms.unwrap_or_else(crate::now_ms),
                                    };
                                    let _ = tx.send((Some(key), ev)).await;
                                });
                            }
                            Verdict::StopContainer(id) if stopping.insert(id.clone()) => {
                                let (tx, socket, grace, id) = (done_tx.clone(), self.docker_socket.clone(), self.stop_grace, id.clone());
                                tracing::warn!(container = %id, gpu = %gpu, "foreign container on a leased GPU: stopping it");
                                spawn_stop(tx, socket, grace, pb::EnforcementEvent {
                                    pid: d.pid,
                                    exe: d.exe,
                                    container: id,
                                    gpu,
                                    detected_unix_ms: now,
                                    ..Default::default()
                                });
                            }
                            _ => {}
                        }
                    }
                    // Epochs that are over.
                    let due: Vec<String> = epochs.iter().filter(|(_, e)| now - e.start_ms() >= epoch_ms).map(|(id, _)| id.clone()).collect();
                    // Once per epoch: containers that asked Docker for a leased GPU.
                    if !due.is_empty() && leases.iter().any(|l| !l.gpus.is_empty()) {
                        let (requesters, blind) = gpu_requesters(&self.docker_socket, &leases).await;
                        for reason in blind {
                            tracing::warn!(%reason, "part of the host went unseen this epoch");
                            for id in &due {
                                if let Some(e) = epochs.get_mut(id) {
                                    e.add_blind(reason.clone());
                                }
                            }
                        }
                        for (id, gpu) in requesters {
                            if !stopping.insert(id.clone()) {
                                continue;
                            }
                            tracing::warn!(container = %id, gpu = %gpu, "container with a device request for a leased GPU: stopping it");
                            let (tx, socket, grace) = (done_tx.clone(), self.docker_socket.clone(), self.stop_grace);
                            spawn_stop(tx, socket, grace, pb::EnforcementEvent {
                                container: id,
                                gpu,
                                detected_unix_ms: now,
                                ..Default::default()
                            });
                        }
                    }
                    for id in due {
                        let Some(l) = leases.iter().find(|l| l.id == id) else { continue };
                        if let (Some(epoch), Some(state)) = (epochs.remove(&id), chains.get_mut(&id)) {
                            self.sign(epoch, now, state).await;
                        }
                        epochs.insert(id.clone(), Epoch::new(&id, &l.gpus, now, cycle_ms));
                        self.persist(&chains);
                    }
                }
            }
        }
    }

    /// Closes an epoch at `end`, signs it into the chain and advances the head.
    async fn sign(&self, epoch: Epoch, end: i64, state: &mut ChainState) {
        let a = epoch.finish(end, &state.head());
        let seq = a.lease_seq;
        match self
            .outbox
            .emit_signed(pb::record::Body::Attestation(a.clone()))
            .await
        {
            Some(env) => {
                let Ok(rec) = pb::Record::decode(env.payload.as_slice()) else {
                    return;
                };
                let mut head = state.head();
                head.advance(seq, &env.payload);
                state.head_seq = head.lease_seq;
                state.head_sha256 = head.sha256;
                state
                    .tally
                    .add(&rec, &a, warden_proto::dsse::payload_sha256(&env));
            }
            None => {
                tracing::error!(lease = %a.lease_id, "attestation not spooled (spool full?); the chain has a gap in time")
            }
        }
    }

    fn persist(&self, chains: &BTreeMap<String, ChainState>) {
        if let Err(e) = save_chains(&self.state_path, chains) {
            tracing::error!(path = %self.state_path.display(), error = %e, "cannot save the lease chains");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn docker_that_cannot_answer_leaves_the_epoch_blind_not_clean() {
        let tmp = tempfile::tempdir().unwrap();
        let lease = Lease {
            id: "l-1".into(),
            renter: String::new(),
            gpus: vec!["GPU-a".into()],
            started_unix_ms: 0,
            containers: Vec::new(),
        };
        let (found, blind) = gpu_requesters(&tmp.path().join("no-docker.sock"), &[lease]).await;
        assert!(found.is_empty());
        assert_eq!(blind.len(), 1);
        assert!(blind[0].contains("Docker could not be asked"), "{blind:?}");
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

    #[test]
    fn device_requests_for_leased_gpus_are_recognised() {
        use bollard::models::DeviceRequest;
        let gpus = vec!["GPU-a".to_owned()];
        let by_id = DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(vec!["GPU-a".into()]),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        };
        assert!(requests_gpu(std::slice::from_ref(&by_id), &gpus));
        assert!(!requests_gpu(&[by_id], &["GPU-b".to_owned()]));
        let all = DeviceRequest {
            count: Some(-1),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        };
        assert!(requests_gpu(std::slice::from_ref(&all), &gpus));
        assert!(!requests_gpu(&[all], &[]), "no leased GPU, nothing to take");
        let other_driver = DeviceRequest {
            driver: Some("other".into()),
            count: Some(-1),
            ..Default::default()
        };
        assert!(!requests_gpu(&[other_driver], &gpus));
        assert!(!requests_gpu(&[], &gpus));
    }

    #[test]
    fn only_holders_of_leased_gpus_are_recorded() {
        assert_eq!(verdict_name(&Verdict::KillProcess), Some("foreign"));
        assert_eq!(
            verdict_name(&Verdict::StopContainer("c".into())),
            Some("foreign")
        );
        assert_eq!(
            verdict_name(&Verdict::Allowed(AllowReason::LeaseContainer)),
            Some("lease-container")
        );
        assert_eq!(verdict_name(&Verdict::Allowed(AllowReason::NoLease)), None);
        assert_eq!(
            verdict_name(&Verdict::Allowed(AllowReason::NotALeasedGpu)),
            None
        );
    }
}
