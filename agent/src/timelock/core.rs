//! The time-lock's decisions as plain data, driven the way quinn drives
//! quinn-proto: the task feeds it the leases, the clock, what the edges
//! found and how enforcements ended ([`Core::handle_tick`],
//! [`Core::handle_scan`], [`Core::handle_gpu_requests`], [`Core::enforced`],
//! [`Core::attested`]); it answers with [`Action`]s, in order
//! ([`Core::poll_action`]), and says when it next wants the clock
//! ([`Core::next_timeout`]). No I/O and no clock of its own, so tests run an
//! hour of epochs in a millisecond.
//!
//! One sampling cycle: leases that ended get their last epoch signed and
//! their proof; leases that started get an epoch; the cycle's samples go
//! into every open epoch; the open guard is given the leased GPUs' device
//! nodes and says what it guards and which opens it denied
//! ([`Action::Guard`]); then the host is scanned ([`Action::Scan`]), the
//! holders judged (`enforce::decide`), foreign ones ended; epochs that are
//! over are closed, after asking Docker which containers requested a leased
//! GPU ([`Action::FindGpuRequests`]) once per epoch. An edge that failed
//! reaches the epoch as blind, never as an empty answer.
//!
//! The scan reads every process's descriptors, so it is what a lease costs
//! the host. While every lease is guarded at the open it is only a safety
//! net: a full scan when a lease comes under the guard (for what opened
//! before the marks), then every `safety_scan_ms`; the cycles between
//! describe only the processes NVML lists. A lease not guarded (no
//! fanotify, a node that could not be marked) is scanned every cycle.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    time::Duration,
};

use bollard::models::DeviceRequest;
use prost::Message;
use serde::{Deserialize, Serialize};
use warden_proto::{
    chain::{Head, Tally},
    dsse, pb,
    states::HolderClass,
};

use super::{
    attest::Epoch,
    enforce::{self, AllowReason, LeaseView, Policy, Seen, Verdict},
    guard::{self, GuardReport, Target},
    procs::parse::Holder,
};
use crate::workloads::book::Lease;

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

/// How a holder is recorded (`HolderSeen.verdict`, in proto's words);
/// None for holders that concern no lease (not recorded).
pub fn recorded(v: &Verdict) -> Option<HolderClass> {
    match v {
        Verdict::Allowed(AllowReason::LeaseContainer) => Some(HolderClass::LeaseContainer),
        Verdict::Allowed(AllowReason::Agent) => Some(HolderClass::Agent),
        Verdict::Allowed(AllowReason::Allowlisted) => Some(HolderClass::Allowlisted),
        Verdict::Allowed(AllowReason::ProtectedPid)
        | Verdict::KillProcess
        | Verdict::StopContainer(_) => Some(HolderClass::Foreign),
        Verdict::Allowed(_) => None,
    }
}

/// What an enforcement did (`EnforcementEvent.action`; the verifier counts
/// kills and stops by these words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnforceAction {
    Kill,
    Stop,
}

impl EnforceAction {
    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EnforceAction::Kill => "kill",
            EnforceAction::Stop => "stop",
        }
    }
}

/// Whether a container's device requests ask for one of `gpus`: by uuid,
/// or for every GPU (count -1) through a GPU driver or capability.
pub fn requests_gpu(requests: &[DeviceRequest], gpus: &[String]) -> bool {
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

/// What the core runs with. The cycle and the epoch stay as started; the
/// rest follows a reload ([`Core::reconfigure`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cycle_ms: i64,
    pub epoch_ms: i64,
    pub policy: Policy,
    /// GPU device nodes whose holders are found.
    pub device_patterns: Vec<String>,
    /// SIGTERM, then SIGKILL after this long, for a foreign process.
    pub kill_grace: Duration,
    /// The same for a foreign container.
    pub stop_grace: Duration,
    /// While every lease is guarded at the open, a full scan this often.
    pub safety_scan_ms: i64,
}

/// An enforcement the core asked for; it comes back with its outcome
/// ([`Core::enforced`]), and until then the same target is not asked again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcing {
    Kill { pid: u32, start_time: u64 },
    Stop { container: String },
}

/// What the task is to do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Make the open guard's marks `targets` and judge opens by `leases`
    /// (no target, no lease: the guard is to let go); answer with
    /// [`Core::handle_guard`] before anything else.
    Guard {
        targets: Vec<Target>,
        leases: Vec<LeaseView>,
        all_gpus_leased: bool,
    },
    /// Describe the processes NVML listed (pid, GPU uuid) and, when `full`,
    /// scan `/proc` for holders of the device nodes matching `patterns`;
    /// answer with [`Core::handle_scan`] before anything else.
    Scan {
        patterns: Vec<String>,
        nvml: Vec<(u32, String)>,
        full: bool,
    },
    /// Ask Docker for the device requests of running containers other than
    /// `ours`; answer with [`Core::handle_gpu_requests`] before anything else.
    FindGpuRequests { ours: BTreeSet<String> },
    /// End a foreign process (SIGTERM, SIGKILL after `grace`) in the
    /// background; `event` comes back through [`Core::enforced`] with the
    /// outcome and times filled in.
    Kill {
        pid: u32,
        start_time: u64,
        grace: Duration,
        event: pb::EnforcementEvent,
    },
    /// Stop a foreign container (`event.container`) in the background; the
    /// same answer.
    Stop {
        grace: Duration,
        event: pb::EnforcementEvent,
    },
    /// Sign and spool this attestation; answer with [`Core::attested`]
    /// before anything else (the next link needs the bytes signed).
    Attest(pb::Attestation),
    /// Spool a lease's proof.
    Prove(pb::LeaseProof),
    /// Save [`Core::chains`], so a restart continues them.
    Persist,
}

/// The leases as the policy sees them.
fn lease_views(leases: &[Lease]) -> Vec<LeaseView> {
    leases
        .iter()
        .map(|l| LeaseView {
            lease_id: l.id.clone(),
            gpus: l.gpus.clone(),
            containers: l.containers.iter().map(|c| c.id.clone()).collect(),
        })
        .collect()
}

/// Whether every GPU of the node is leased (then the control nodes are too).
fn all_leased(leases: &[Lease], inv: &pb::InventorySummary) -> bool {
    let leased: HashSet<&String> = leases.iter().flat_map(|l| &l.gpus).collect();
    !inv.gpus.is_empty() && inv.gpus.iter().all(|g| leased.contains(&g.uuid))
}

/// What a scan of the host found, and what it could not see.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostScan {
    /// Holders of the device nodes (`procs::scan`).
    pub holders: Vec<Holder>,
    /// Why part of the host went unseen (empty: nothing did).
    pub blind: Vec<String>,
    /// The processes NVML listed, described.
    pub nvml: Vec<Seen>,
}

/// What Docker said about running containers' device requests: (container
/// id, its requests), and what it could not answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuRequests {
    pub found: Vec<(String, Vec<DeviceRequest>)>,
    pub blind: Vec<String>,
}

/// A cycle waiting for an edge's answer.
#[derive(Debug)]
struct Cycle {
    now: i64,
    leases: Vec<Lease>,
    inventory: pb::InventorySummary,
    /// The processes NVML listed: (pid, GPU uuid).
    nvml: Vec<(u32, String)>,
}

#[derive(Debug, Default)]
enum Waiting {
    #[default]
    Nothing,
    Guard(Cycle),
    Scan(Cycle),
    GpuRequests(Cycle, Vec<String>),
}

/// The time-lock's state: the chains, the open epochs, the enforcements
/// under way.
#[derive(Debug)]
pub struct Core {
    settings: Settings,
    leases: Vec<Lease>,
    chains: BTreeMap<String, ChainState>,
    epochs: BTreeMap<String, Epoch>,
    killing: HashSet<(u32, u64)>,
    stopping: HashSet<String>,
    /// Ended leases whose last attestation is being signed: their T2.
    proving: BTreeMap<String, i64>,
    waiting: Waiting,
    next_cycle_ms: Option<i64>,
    actions: VecDeque<Action>,
    /// Challenges that came before their lease's first epoch opened (the
    /// coordinator challenges a lease as soon as the node said it runs,
    /// which can be a cycle before this core has seen it): they go into
    /// that epoch, or are dropped at their deadline. At most [`EARLY_MAX`].
    early: Vec<pb::Challenge>,
    /// Per lease, why it was not guarded at the open in the last cycle
    /// (None: it was); what an epoch opened between cycles starts with.
    guarded: BTreeMap<String, Option<String>>,
    /// Whether the guard holds marks (it is told to let go once leases end).
    guarding: bool,
    /// When the last full scan ran, and the guarded leases it covered.
    last_full_scan_ms: Option<i64>,
    scanned: BTreeSet<String>,
}

/// Challenges held for leases whose first epoch has not opened.
const EARLY_MAX: usize = 64;

impl Core {
    /// A core that continues `chains` (as loaded at start).
    pub fn new(settings: Settings, chains: BTreeMap<String, ChainState>) -> Core {
        Core {
            settings,
            leases: Vec::new(),
            chains,
            epochs: BTreeMap::new(),
            killing: HashSet::new(),
            stopping: HashSet::new(),
            proving: BTreeMap::new(),
            waiting: Waiting::Nothing,
            next_cycle_ms: None,
            actions: VecDeque::new(),
            early: Vec::new(),
            guarded: BTreeMap::new(),
            guarding: false,
            last_full_scan_ms: None,
            scanned: BTreeSet::new(),
        }
    }

    /// A reloaded configuration: from the next cycle on.
    pub fn reconfigure(
        &mut self,
        allow_exe: Vec<String>,
        device_patterns: Vec<String>,
        kill_grace: Duration,
        stop_grace: Duration,
        safety_scan: Duration,
    ) {
        self.settings.policy.allow_exe = allow_exe;
        self.settings.device_patterns = device_patterns;
        self.settings.kill_grace = kill_grace;
        self.settings.stop_grace = stop_grace;
        self.settings.safety_scan_ms = safety_scan.as_millis() as i64;
    }

    /// The leases now. Starts and ends are acted on at the next cycle.
    pub fn set_leases(&mut self, leases: Vec<Lease>) {
        self.leases = leases;
    }

    /// The policy now (the guard judges opens by it too).
    pub fn policy(&self) -> &Policy {
        &self.settings.policy
    }

    /// The chains, as [`Action::Persist`] saves them.
    pub fn chains(&self) -> &BTreeMap<String, ChainState> {
        &self.chains
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the next cycle is due (the clock given to `handle_tick`); None:
    /// now.
    pub fn next_timeout(&self) -> Option<i64> {
        self.next_cycle_ms
    }

    /// A challenge from the coordinator: into its lease's open epoch.
    pub fn challenge(&mut self, ch: pb::Challenge) {
        match self.epochs.get_mut(&ch.lease_id) {
            Some(e) => e.add_challenge(ch.nonce),
            None if self.early.len() < EARLY_MAX => self.early.push(ch),
            None => tracing::debug!(lease = %ch.lease_id, "challenge for no active lease"),
        }
    }

    /// One sampling cycle at `now`, with the GPUs' latest samples and the
    /// inventory (for the uuid of each device minor).
    pub fn handle_tick(
        &mut self,
        now: i64,
        samples: &[pb::GpuSample],
        inventory: &pb::InventorySummary,
    ) {
        self.schedule(now);
        // Early challenges whose deadline passed are of no use any more.
        self.early
            .retain(|c| c.deadline_unix_ms == 0 || c.deadline_unix_ms > now);
        let leases = self.leases.clone();
        // Leases that ended: last epoch, then the proof (after the epoch is
        // signed, see `attested`).
        let ended: Vec<String> = self
            .chains
            .keys()
            .filter(|id| !leases.iter().any(|l| &l.id == *id))
            .cloned()
            .collect();
        for id in ended {
            match (self.epochs.remove(&id), self.chains.get(&id)) {
                (Some(epoch), Some(state)) => {
                    self.proving.insert(id.clone(), now);
                    self.actions
                        .push_back(Action::Attest(epoch.finish(now, &state.head())));
                }
                _ => {
                    if let Some(proof) = self.prove(&id, now) {
                        self.actions.push_back(Action::Prove(proof));
                    }
                }
            }
            self.actions.push_back(Action::Persist);
        }
        // Leases that started (or that a restart finds running).
        let cycle_ms = self.settings.cycle_ms;
        for l in &leases {
            let state = self
                .chains
                .entry(l.id.clone())
                .or_insert_with(|| ChainState {
                    t1_unix_ms: l.started_unix_ms,
                    ..Default::default()
                });
            let start = if state.head_seq == 0 {
                state.t1_unix_ms.min(now)
            } else {
                now
            };
            if !self.epochs.contains_key(&l.id) {
                let mut epoch = Epoch::new(&l.id, &l.gpus, start, cycle_ms);
                if let Some(Some(why)) = self.guarded.get(&l.id) {
                    epoch.add_unguarded(why.clone());
                }
                for ch in self.early.extract_if(.., |c| c.lease_id == l.id) {
                    epoch.add_challenge(ch.nonce);
                }
                self.epochs.insert(l.id.clone(), epoch);
            }
        }
        self.guarded
            .retain(|id, _| leases.iter().any(|l| &l.id == id));
        if leases.is_empty() {
            if self.guarding {
                self.guarding = false;
                self.actions.push_back(Action::Guard {
                    targets: Vec::new(),
                    leases: Vec::new(),
                    all_gpus_leased: false,
                });
            }
            return;
        }
        for e in self.epochs.values_mut() {
            e.add_cycle(samples);
        }
        // Two sources of holders: descriptors on the device nodes, and
        // NVML's process lists.
        let nvml = samples
            .iter()
            .flat_map(|g| g.processes.iter().map(move |p| (p.pid, g.uuid.clone())))
            .collect();
        let views = lease_views(&leases);
        let all_gpus_leased = all_leased(&leases, inventory);
        let minors: Vec<(String, u32)> = leases
            .iter()
            .flat_map(|l| &l.gpus)
            .filter_map(|uuid| {
                let g = inventory.gpus.iter().find(|g| &g.uuid == uuid)?;
                Some((uuid.clone(), g.minor_number))
            })
            .collect();
        self.guarding = true;
        self.actions.push_back(Action::Guard {
            targets: guard::targets(&self.settings.device_patterns, &minors, all_gpus_leased),
            leases: views,
            all_gpus_leased,
        });
        self.waiting = Waiting::Guard(Cycle {
            now,
            leases,
            inventory: inventory.clone(),
            nvml,
        });
    }

    /// The answer to [`Action::Guard`]: what is guarded at the open, and
    /// the opens denied since the last answer. Then the scan: full unless
    /// every lease is guarded and was covered by a full scan since it came
    /// under the guard, less than `safety_scan_ms` ago.
    pub fn handle_guard(&mut self, report: GuardReport) {
        let Waiting::Guard(cycle) = std::mem::take(&mut self.waiting) else {
            return;
        };
        for l in &cycle.leases {
            let why = report.unguarded_for(&l.gpus);
            if let (Some(why), Some(e)) = (&why, self.epochs.get_mut(&l.id)) {
                e.add_unguarded(why.clone());
            }
            self.guarded.insert(l.id.clone(), why);
        }
        // Denied opens go to the leases of their GPU (a control node's, and
        // those beyond the log's entries, to every lease).
        for p in &report.prevented.entries {
            for l in cycle
                .leases
                .iter()
                .filter(|l| p.gpu.is_empty() || l.gpus.contains(&p.gpu))
            {
                if let Some(e) = self.epochs.get_mut(&l.id) {
                    e.add_prevented(guard::PreventedLog {
                        entries: vec![p.clone()],
                        more: 0,
                    });
                }
            }
        }
        if report.prevented.more > 0 {
            for l in &cycle.leases {
                if let Some(e) = self.epochs.get_mut(&l.id) {
                    e.add_prevented(guard::PreventedLog {
                        entries: Vec::new(),
                        more: report.prevented.more,
                    });
                }
            }
        }
        let guarded: BTreeSet<String> = cycle
            .leases
            .iter()
            .filter(|l| matches!(self.guarded.get(&l.id), Some(None)))
            .map(|l| l.id.clone())
            .collect();
        let now = cycle.now;
        let due = self
            .last_full_scan_ms
            .is_none_or(|at| now - at >= self.settings.safety_scan_ms || now < at);
        let full = guarded.len() < cycle.leases.len() || !guarded.is_subset(&self.scanned) || due;
        if full {
            self.last_full_scan_ms = Some(now);
            self.scanned = guarded;
        } else {
            self.scanned.retain(|id| guarded.contains(id));
        }
        let nvml = cycle.nvml.clone();
        self.waiting = Waiting::Scan(cycle);
        self.actions.push_back(Action::Scan {
            patterns: self.settings.device_patterns.clone(),
            nvml,
            full,
        });
    }

    /// The answer to [`Action::Scan`]; `Err` says why there is none (a scan
    /// that failed is not "no holders": the epochs say so).
    pub fn handle_scan(&mut self, scan: Result<HostScan, String>) {
        let Waiting::Scan(cycle) = std::mem::take(&mut self.waiting) else {
            return;
        };
        let scan = scan.unwrap_or_else(|e| HostScan {
            blind: vec![format!("the /proc scan failed: {e}")],
            ..Default::default()
        });
        for reason in &scan.blind {
            tracing::warn!(%reason, "part of the host went unseen this cycle");
            for e in self.epochs.values_mut() {
                e.add_blind(reason.clone());
            }
        }
        let inv = &cycle.inventory;
        let mut seen = Seen::resolve(scan.holders, |minor| {
            inv.gpus
                .iter()
                .find(|g| g.minor_number == minor)
                .map(|g| g.uuid.clone())
        });
        for n in scan.nvml {
            if !seen
                .iter()
                .any(|s| s.holder.pid == n.holder.pid && s.gpu == n.gpu)
            {
                seen.push(n);
            }
        }
        let leases = &cycle.leases;
        let views = lease_views(leases);
        let all_leased = all_leased(leases, inv);
        for d in enforce::decide(&seen, &views, all_leased, &self.settings.policy) {
            let Some(name) = recorded(&d.verdict) else {
                continue;
            };
            let gpu = d.gpu.clone().unwrap_or_default();
            for l in leases
                .iter()
                .filter(|l| gpu.is_empty() || l.gpus.contains(&gpu))
            {
                if let Some(e) = self.epochs.get_mut(&l.id) {
                    e.add_holder(pb::HolderSeen {
                        pid: d.pid,
                        exe: d.exe.clone(),
                        container: d.container.clone().unwrap_or_default(),
                        gpu: gpu.clone(),
                        verdict: name.as_str().into(),
                    });
                }
            }
            match d.verdict {
                Verdict::KillProcess if self.killing.insert((d.pid, d.start_time)) => {
                    tracing::warn!(pid = d.pid, exe = %d.exe, gpu = %gpu, "foreign process on a leased GPU: ending it");
                    self.actions.push_back(Action::Kill {
                        pid: d.pid,
                        start_time: d.start_time,
                        grace: self.settings.kill_grace,
                        event: pb::EnforcementEvent {
                            pid: d.pid,
                            exe: d.exe,
                            gpu,
                            action: EnforceAction::Kill.as_str().into(),
                            detected_unix_ms: cycle.now,
                            ..Default::default()
                        },
                    });
                }
                Verdict::StopContainer(id) if self.stopping.insert(id.clone()) => {
                    tracing::warn!(container = %id, gpu = %gpu, "foreign container on a leased GPU: stopping it");
                    self.stop(pb::EnforcementEvent {
                        pid: d.pid,
                        exe: d.exe,
                        container: id,
                        gpu,
                        detected_unix_ms: cycle.now,
                        ..Default::default()
                    });
                }
                _ => {}
            }
        }
        // Epochs that are over.
        let due: Vec<String> = self
            .epochs
            .iter()
            .filter(|(_, e)| cycle.now - e.start_ms() >= self.settings.epoch_ms)
            .map(|(id, _)| id.clone())
            .collect();
        // Once per epoch: containers that asked Docker for a leased GPU.
        if !due.is_empty() && leases.iter().any(|l| !l.gpus.is_empty()) {
            let ours = leases
                .iter()
                .flat_map(|l| l.containers.iter().map(|c| c.id.clone()))
                .collect();
            self.waiting = Waiting::GpuRequests(cycle, due);
            self.actions.push_back(Action::FindGpuRequests { ours });
        } else {
            self.close(&cycle, due);
        }
    }

    /// The answer to [`Action::FindGpuRequests`].
    pub fn handle_gpu_requests(&mut self, answer: GpuRequests) {
        let Waiting::GpuRequests(cycle, due) = std::mem::take(&mut self.waiting) else {
            return;
        };
        for reason in answer.blind {
            tracing::warn!(%reason, "part of the host went unseen this epoch");
            for id in &due {
                if let Some(e) = self.epochs.get_mut(id) {
                    e.add_blind(reason.clone());
                }
            }
        }
        for (id, requests) in answer.found {
            let Some(l) = cycle
                .leases
                .iter()
                .find(|l| requests_gpu(&requests, &l.gpus))
            else {
                continue;
            };
            if !self.stopping.insert(id.clone()) {
                continue;
            }
            let gpu = l.gpus.first().cloned().unwrap_or_default();
            tracing::warn!(container = %id, gpu = %gpu, "container with a device request for a leased GPU: stopping it");
            self.stop(pb::EnforcementEvent {
                container: id,
                gpu,
                detected_unix_ms: cycle.now,
                ..Default::default()
            });
        }
        self.close(&cycle, due);
    }

    /// An enforcement finished: it may be asked again, and the epochs of
    /// the leases of its GPU (all, if it concerned none) record it.
    pub fn enforced(&mut self, what: Enforcing, ev: pb::EnforcementEvent) {
        match what {
            Enforcing::Kill { pid, start_time } => self.killing.remove(&(pid, start_time)),
            Enforcing::Stop { container } => self.stopping.remove(&container),
        };
        tracing::warn!(pid = ev.pid, exe = %ev.exe, container = %ev.container, gpu = %ev.gpu, action = %ev.action, outcome = %ev.outcome, "enforced");
        for l in self
            .leases
            .iter()
            .filter(|l| ev.gpu.is_empty() || l.gpus.contains(&ev.gpu))
        {
            if let Some(e) = self.epochs.get_mut(&l.id) {
                e.add_enforcement(ev.clone());
            }
        }
    }

    /// The answer to [`Action::Attest`]: the envelope spooled, or None when
    /// it was not (the chain keeps its head, and has a gap in time).
    pub fn attested(&mut self, a: pb::Attestation, spooled: Option<pb::Envelope>) {
        if let Some(state) = self.chains.get_mut(&a.lease_id) {
            match spooled {
                Some(env) => {
                    if let Ok(rec) = pb::Record::decode(env.payload.as_slice()) {
                        let mut head = state.head();
                        head.advance(a.lease_seq, &env.payload);
                        state.head_seq = head.lease_seq;
                        state.head_sha256 = head.sha256;
                        state.tally.add(&rec, &a, dsse::payload_sha256(&env));
                    }
                }
                None => {
                    tracing::error!(lease = %a.lease_id, "attestation not spooled (spool full?); the chain has a gap in time")
                }
            }
        }
        // An ended lease's proof follows its last attestation at once.
        if let Some(t2) = self.proving.remove(&a.lease_id) {
            if let Some(proof) = self.prove(&a.lease_id, t2) {
                self.actions.push_front(Action::Prove(proof));
            }
        }
    }

    /// Closes the epochs that are over and opens the next ones.
    fn close(&mut self, cycle: &Cycle, due: Vec<String>) {
        for id in due {
            let Some(l) = cycle.leases.iter().find(|l| l.id == id) else {
                continue;
            };
            if let (Some(epoch), Some(state)) = (self.epochs.remove(&id), self.chains.get(&id)) {
                self.actions
                    .push_back(Action::Attest(epoch.finish(cycle.now, &state.head())));
            }
            let mut epoch = Epoch::new(&id, &l.gpus, cycle.now, self.settings.cycle_ms);
            if let Some(Some(why)) = self.guarded.get(&id) {
                epoch.add_unguarded(why.clone());
            }
            self.epochs.insert(id.clone(), epoch);
            self.actions.push_back(Action::Persist);
        }
    }

    /// Forgets an ended lease's chain and makes its proof.
    fn prove(&mut self, id: &str, t2: i64) -> Option<pb::LeaseProof> {
        let state = self.chains.remove(id)?;
        let proof = state.tally.proof(id, state.t1_unix_ms, t2);
        tracing::info!(lease = %id, records = proof.last_seq, coverage = format!("{:.3}", proof.coverage), kills = proof.kills, prevented = proof.prevented, "lease proof signed");
        Some(proof)
    }

    fn stop(&mut self, mut event: pb::EnforcementEvent) {
        event.action = EnforceAction::Stop.as_str().into();
        self.actions.push_back(Action::Stop {
            grace: self.settings.stop_grace,
            event,
        });
    }

    /// The next cycle: one period after the last one was due, skipping
    /// periods missed (like tokio's `MissedTickBehavior::Skip`); a clock
    /// that went back starts a new period from now.
    fn schedule(&mut self, now: i64) {
        let period = self.settings.cycle_ms.max(1);
        let next = match self.next_cycle_ms {
            None => now + period,
            Some(due) => {
                let mut next = due + period;
                if next <= now {
                    next += ((now - next) / period + 1) * period;
                }
                if next > now + period {
                    next = now + period;
                }
                next
            }
        };
        self.next_cycle_ms = Some(next);
    }
}

#[cfg(test)]
mod tests {
    //! The core driven with simulated time: plain millisecond values, no
    //! sleeping, no I/O. `Host` plays the task, answering the actions the
    //! way the edges would.

    use super::*;
    use crate::workloads::book::Container;
    use warden_proto::states::ContainerStatus;

    const GPU: &str = "GPU-a";
    const AGENT_PID: u32 = 4242;

    fn settings() -> Settings {
        Settings {
            cycle_ms: 1_000,
            epoch_ms: 10_000,
            policy: Policy::new(AGENT_PID),
            device_patterns: vec!["/dev/nvidia*".into()],
            kill_grace: Duration::from_secs(2),
            stop_grace: Duration::from_secs(10),
            safety_scan_ms: 30_000,
        }
    }

    fn lease(id: &str, t1: i64, containers: &[&str]) -> Lease {
        Lease {
            id: id.into(),
            renter: "renter".into(),
            gpus: vec![GPU.into()],
            started_unix_ms: t1,
            containers: containers
                .iter()
                .map(|c| Container {
                    name: format!("n-{c}"),
                    image: "img".into(),
                    id: (*c).into(),
                    state: ContainerStatus::Running.into(),
                    exit_code: 0,
                    health: String::new(),
                    time_unix_ms: t1,
                })
                .collect(),
        }
    }

    fn holder(pid: u32, exe: &str, container: Option<&str>) -> Holder {
        Holder {
            pid,
            start_time: u64::from(pid) * 10,
            exe: exe.into(),
            comm: exe.rsplit('/').next().unwrap_or(exe).into(),
            container: container.map(Into::into),
            device: "/dev/nvidia0".into(),
            uid: 1000,
        }
    }

    /// The edges as a test sets them, and what the core asked of them.
    struct Host {
        core: Core,
        samples: Vec<pb::GpuSample>,
        inventory: pb::InventorySummary,
        scan: Result<HostScan, String>,
        docker: GpuRequests,
        /// What the guard answers (by default: no guard).
        guard: GuardReport,
        /// Signing fails (a full spool) while set.
        spool_full: bool,
        next_seq: u64,
        /// Everything asked, in order; Scan and FindGpuRequests included.
        done: Vec<Action>,
    }

    impl Host {
        fn new(chains: BTreeMap<String, ChainState>) -> Host {
            Host {
                core: Core::new(settings(), chains),
                samples: vec![pb::GpuSample {
                    uuid: GPU.into(),
                    utilization_gpu: 90,
                    ..Default::default()
                }],
                inventory: pb::InventorySummary {
                    gpus: vec![pb::GpuInfo {
                        uuid: GPU.into(),
                        minor_number: 0,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                scan: Ok(HostScan::default()),
                docker: GpuRequests::default(),
                guard: GuardReport::off("no guard in this test"),
                spool_full: false,
                next_seq: 1,
                done: Vec::new(),
            }
        }

        /// One cycle at `now`, every action carried out; returns the
        /// actions it took.
        fn tick(&mut self, now: i64) -> Vec<Action> {
            let first = self.done.len();
            self.core
                .handle_tick(now, &self.samples.clone(), &self.inventory.clone());
            while let Some(a) = self.core.poll_action() {
                self.done.push(a.clone());
                match a {
                    Action::Guard { .. } => {
                        let r = self.guard.clone();
                        // Denied opens are reported once.
                        self.guard.prevented = Default::default();
                        self.core.handle_guard(r)
                    }
                    // A partial scan reads no descriptors: only NVML's pids.
                    Action::Scan { full: false, .. } => {
                        self.core.handle_scan(self.scan.clone().map(|s| HostScan {
                            holders: Vec::new(),
                            ..s
                        }))
                    }
                    Action::Scan { .. } => self.core.handle_scan(self.scan.clone()),
                    Action::FindGpuRequests { .. } => {
                        self.core.handle_gpu_requests(self.docker.clone())
                    }
                    Action::Attest(a) => {
                        let env = (!self.spool_full).then(|| {
                            let rec = pb::Record {
                                seq: self.next_seq,
                                body: Some(pb::record::Body::Attestation(a.clone())),
                                ..Default::default()
                            };
                            self.next_seq += 1;
                            pb::Envelope {
                                payload: rec.encode_to_vec(),
                                ..Default::default()
                            }
                        });
                        self.core.attested(a, env);
                    }
                    _ => {}
                }
            }
            self.done[first..].to_vec()
        }

        /// Ticks every cycle over `[from, to]`, returning the attestations.
        fn run(&mut self, from: i64, to: i64) -> Vec<pb::Attestation> {
            let mut out = Vec::new();
            let mut now = from;
            while now <= to {
                out.extend(attestations(&self.tick(now)));
                now += 1_000;
            }
            out
        }
    }

    fn attestations(actions: &[Action]) -> Vec<pb::Attestation> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Attest(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    fn kills(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Kill { .. }))
            .count()
    }

    fn stops(actions: &[Action]) -> Vec<pb::EnforcementEvent> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { event, .. } => Some(event.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_lease_gets_epochs_then_its_last_epoch_and_proof_when_it_ends() {
        let mut h = Host::new(BTreeMap::new());
        assert_eq!(h.tick(0), Vec::new(), "no lease: nothing to do");
        h.core.set_leases(vec![lease("l1", 500, &[])]);
        // Started at 500: the first window opens at T1, not at the tick.
        let first = h.run(1_000, 10_000);
        assert!(first.is_empty(), "{first:?}");
        let a = h.run(11_000, 11_000);
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].window_start_unix_ms, a[0].window_end_unix_ms),
            (500, 11_000)
        );
        assert_eq!(a[0].lease_seq, 1);
        assert_eq!(a[0].prev_sha256, vec![0; 32]);
        assert_eq!(h.core.chains()["l1"].head_seq, 1);
        let more = h.run(12_000, 24_000);
        assert_eq!(more.len(), 1);
        // Ended: the last (short) epoch, its proof right after, then saved.
        h.core.set_leases(Vec::new());
        let end = h.tick(25_000);
        // The guard lets go of the nodes.
        let [Action::Attest(last), Action::Prove(proof), Action::Persist, Action::Guard {
            targets, leases, ..
        }] = end.as_slice()
        else {
            panic!("{end:?}");
        };
        assert!(targets.is_empty() && leases.is_empty());
        assert_eq!(
            (last.window_start_unix_ms, last.window_end_unix_ms),
            (21_000, 25_000)
        );
        assert_eq!(last.lease_seq, 3);
        assert_eq!(
            (
                proof.t1_unix_ms,
                proof.t2_unix_ms,
                proof.first_seq,
                proof.last_seq
            ),
            (500, 25_000, 1, 3)
        );
        assert!(h.core.chains().is_empty());
        assert_eq!(h.tick(26_000), Vec::new(), "nothing left of it");
    }

    #[test]
    fn an_hour_of_epochs_links_into_one_chain_with_full_coverage() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        let chain = h.run(0, 3_600_000);
        assert_eq!(chain.len(), 360);
        for (i, a) in chain.iter().enumerate() {
            assert_eq!(a.lease_seq, i as u64 + 1);
            assert_eq!(a.window_start_unix_ms, i as i64 * 10_000);
            assert_eq!(a.window_end_unix_ms, a.window_start_unix_ms + 10_000);
            assert_eq!(a.sampled_ms, 10_000, "every cycle answered");
            assert!(a.blind.is_empty());
        }
        // Each links the record that carried the one before.
        let mut head = Head::default();
        for (seq, a) in (1..).zip(&chain) {
            assert_eq!(a.prev_sha256, head.sha256.to_vec());
            let rec = pb::Record {
                seq,
                body: Some(pb::record::Body::Attestation(a.clone())),
                ..Default::default()
            };
            head.advance(a.lease_seq, &rec.encode_to_vec());
        }
        h.core.set_leases(Vec::new());
        let end = h.tick(3_601_000);
        let Some(Action::Prove(proof)) = end.get(1) else {
            panic!("{end:?}");
        };
        assert_eq!(proof.last_seq, 361);
        // Every cycle was sampled but the one that found the lease gone,
        // which opened no scan (its last epoch, [3600 s, 3601 s), has none).
        let expected = 3_600_000.0 / 3_601_000.0;
        assert!(
            (proof.coverage - expected).abs() < 1e-9,
            "{}",
            proof.coverage
        );
    }

    fn guarded(gpus: &[&str]) -> GuardReport {
        GuardReport {
            guarded: gpus.iter().map(|g| (*g).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// The `full` of each scan asked.
    fn full_scans(actions: &[Action]) -> Vec<bool> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Scan { full, .. } => Some(*full),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn under_the_guard_a_full_scan_runs_when_a_lease_comes_under_it_then_every_safety_interval() {
        let mut h = Host::new(BTreeMap::new());
        h.guard = guarded(&[GPU, "GPU-b"]);
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        let full_at = |h: &mut Host, from: i64, to: i64| -> Vec<i64> {
            (from..=to)
                .step_by(1_000)
                .filter(|&now| {
                    let f = full_scans(&h.tick(now));
                    assert_eq!(f.len(), 1, "one scan a cycle");
                    f[0]
                })
                .collect()
        };
        assert_eq!(full_at(&mut h, 0, 65_000), [0, 30_000, 60_000]);
        let a = attestations(&h.done);
        assert!(!a.is_empty());
        assert!(a
            .iter()
            .all(|a| a.guard == "open" && a.unguarded.is_empty()));

        // A second lease comes under the guard: at once, for what opened before.
        let mut l2 = lease("l2", 66_000, &[]);
        l2.gpus = vec!["GPU-b".into()];
        h.core.set_leases(vec![lease("l1", 0, &[]), l2.clone()]);
        assert_eq!(full_at(&mut h, 66_000, 70_000), [66_000]);

        // One lease ends and another takes its GPU in the same cycle: the
        // new lease is scanned at once even though the GPU stayed guarded.
        let mut l3 = l2.clone();
        l3.id = "l3".into();
        h.core.set_leases(vec![lease("l1", 0, &[]), l3]);
        assert_eq!(full_at(&mut h, 71_000, 73_000), [71_000]);

        // The guard loses GPU-a's node: every cycle is a full scan, and
        // l1's windows say why they are "scan".
        h.guard = GuardReport {
            guarded: ["GPU-b".to_owned()].into(),
            unguarded: vec![(Some(GPU.into()), "/dev/nvidia0: No such file".into())],
            ..Default::default()
        };
        let before = h.done.len();
        assert_eq!(full_at(&mut h, 74_000, 76_000), [74_000, 75_000, 76_000]);
        h.run(77_000, 90_000);
        let l1: Vec<_> = attestations(&h.done[before..])
            .into_iter()
            .filter(|a| a.lease_id == "l1")
            .collect();
        assert!(!l1.is_empty());
        assert!(l1
            .iter()
            .all(|a| a.guard == "scan" && a.unguarded == "/dev/nvidia0: No such file"));
    }

    #[test]
    fn without_a_guard_every_cycle_is_a_full_scan_and_every_window_says_why() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        h.run(0, 25_000);
        assert!(full_scans(&h.done).iter().all(|f| *f));
        assert_eq!(full_scans(&h.done).len(), 26);
        let a = attestations(&h.done);
        assert_eq!(a.len(), 2);
        assert!(a
            .iter()
            .all(|a| a.guard == "scan" && a.unguarded == "no guard in this test"));
        // The lease's last window, opened between cycles, says it too.
        h.core.set_leases(Vec::new());
        let end = attestations(&h.tick(26_000));
        assert_eq!(end[0].guard, "scan");
    }

    #[test]
    fn denied_opens_go_into_the_windows_of_their_gpus_leases_and_the_proof_counts_them() {
        let mut h = Host::new(BTreeMap::new());
        h.inventory.gpus.push(pb::GpuInfo {
            uuid: "GPU-b".into(),
            minor_number: 1,
            ..Default::default()
        });
        h.samples.push(pb::GpuSample {
            uuid: "GPU-b".into(),
            ..Default::default()
        });
        let mut l2 = lease("l2", 0, &[]);
        l2.gpus = vec!["GPU-b".into()];
        h.core.set_leases(vec![lease("l1", 0, &[]), l2]);
        h.guard = guarded(&[GPU, "GPU-b"]);
        let first = h.tick(0);
        // Both GPUs leased: the control nodes are guarded too.
        let Some(Action::Guard {
            targets,
            all_gpus_leased: true,
            ..
        }) = first.iter().find(|a| matches!(a, Action::Guard { .. }))
        else {
            panic!("{first:?}");
        };
        assert!(targets.iter().any(|t| t.path == "/dev/nvidiactl"));
        assert!(targets.iter().any(|t| t.path == "/dev/nvidia1"));
        let open = |pid: u32, gpu: &str, device: &str, attempts: u64| pb::PreventedOpen {
            pid,
            exe: "/usr/bin/miner".into(),
            gpu: gpu.into(),
            device: device.into(),
            attempts,
            first_unix_ms: 1_500,
            last_unix_ms: 1_900,
            ..Default::default()
        };
        h.guard.prevented = guard::PreventedLog {
            entries: vec![
                open(100, GPU, "/dev/nvidia0", 3),
                open(100, "", "/dev/nvidiactl", 1),
            ],
            more: 2,
        };
        h.tick(1_000);
        h.guard.prevented = guard::PreventedLog {
            entries: vec![open(100, GPU, "/dev/nvidia0", 4)],
            more: 0,
        };
        h.tick(2_000);
        let a = h.run(3_000, 10_000);
        let of = |id: &str| a.iter().find(|a| a.lease_id == id).unwrap().clone();
        let (a1, a2) = (of("l1"), of("l2"));
        assert_eq!(a1.guard, "open");
        assert_eq!(
            a1.prevented
                .iter()
                .map(|p| (p.device.as_str(), p.attempts))
                .collect::<Vec<_>>(),
            [("/dev/nvidia0", 7), ("/dev/nvidiactl", 1)]
        );
        assert_eq!(a1.prevented_more, 2);
        assert_eq!(
            a2.prevented
                .iter()
                .map(|p| (p.device.as_str(), p.attempts))
                .collect::<Vec<_>>(),
            [("/dev/nvidiactl", 1)]
        );
        assert!(
            a.iter().all(|a| a.enforcement.is_empty()),
            "nothing to kill"
        );
        h.core.set_leases(Vec::new());
        let proofs: Vec<_> = h
            .tick(11_000)
            .into_iter()
            .filter_map(|a| match a {
                Action::Prove(p) => Some((p.lease_id, p.prevented)),
                _ => None,
            })
            .collect();
        assert_eq!(proofs, [("l1".to_owned(), 10), ("l2".to_owned(), 3)]);
    }

    #[test]
    fn a_foreign_process_is_killed_once_until_the_kill_comes_back() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        h.scan = Ok(HostScan {
            holders: vec![holder(100, "/usr/bin/miner", None)],
            ..Default::default()
        });
        let first = h.tick(0);
        let kill = first
            .iter()
            .find_map(|a| match a {
                Action::Kill {
                    pid,
                    start_time,
                    grace,
                    event,
                } => Some((*pid, *start_time, *grace, event.clone())),
                _ => None,
            })
            .expect("a kill");
        assert_eq!(
            (kill.0, kill.1, kill.2),
            (100, 1_000, Duration::from_secs(2))
        );
        assert_eq!(
            (
                kill.3.action.as_str(),
                kill.3.gpu.as_str(),
                kill.3.detected_unix_ms
            ),
            ("kill", GPU, 0)
        );
        // Still there while the kill runs: not asked twice.
        assert_eq!(kills(&h.tick(1_000)), 0);
        assert_eq!(kills(&h.tick(2_000)), 0);
        let mut ev = kill.3;
        ev.outcome = "killed".into();
        h.core.enforced(
            Enforcing::Kill {
                pid: 100,
                start_time: 1_000,
            },
            ev,
        );
        // Back, and still seen (a process that survived): asked again.
        assert_eq!(kills(&h.tick(3_000)), 1);
        let a = h.run(4_000, 10_000);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].enforcement.len(), 1, "{:?}", a[0].enforcement);
        assert_eq!(a[0].enforcement[0].outcome, "killed");
        assert_eq!(a[0].holders.len(), 1, "the same holder once per epoch");
        assert_eq!(a[0].holders[0].verdict, "foreign");
    }

    #[test]
    fn a_reload_that_allows_the_process_stops_the_kills() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        h.scan = Ok(HostScan {
            holders: vec![holder(100, "/usr/bin/miner", None)],
            ..Default::default()
        });
        h.core.reconfigure(
            vec!["miner".into()],
            vec!["/dev/nvidia*".into()],
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(30),
        );
        assert_eq!(kills(&h.tick(0)), 0);
        let a = h.run(1_000, 10_000);
        assert_eq!(a[0].holders[0].verdict, "allowlisted");
    }

    #[test]
    fn a_foreign_container_is_stopped_once_whoever_finds_it() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &["ours"])]);
        h.scan = Ok(HostScan {
            holders: vec![
                holder(200, "/app", Some("theirs")),
                holder(201, "/app", Some("ours")),
            ],
            ..Default::default()
        });
        let gpu_request = DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(vec![GPU.into()]),
            ..Default::default()
        };
        h.docker = GpuRequests {
            found: vec![
                ("theirs".into(), vec![gpu_request.clone()]),
                ("waiting".into(), vec![gpu_request]),
                ("cpu-only".into(), Vec::new()),
            ],
            blind: Vec::new(),
        };
        let first = stops(&h.tick(0));
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].container.as_str(), first[0].action.as_str()),
            ("theirs", "stop")
        );
        // The epoch's Docker question finds it again (still stopping) and
        // one that asked for the GPU without opening it yet.
        let mut asked = Vec::new();
        for now in (1_000..=10_000).step_by(1_000) {
            asked.extend(h.tick(now));
        }
        let ours: BTreeSet<String> = ["ours".to_owned()].into();
        assert_eq!(
            asked
                .iter()
                .filter(|a| **a == Action::FindGpuRequests { ours: ours.clone() })
                .count(),
            1,
            "Docker is asked once per epoch"
        );
        let later = stops(&asked);
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(
            (
                later[0].container.as_str(),
                later[0].pid,
                later[0].detected_unix_ms
            ),
            ("waiting", 0, 10_000)
        );
        let a = attestations(&asked);
        let verdicts: Vec<(&str, &str)> = a[0]
            .holders
            .iter()
            .map(|h| (h.container.as_str(), h.verdict.as_str()))
            .collect();
        assert_eq!(
            verdicts,
            [("theirs", "foreign"), ("ours", "lease-container")]
        );
    }

    #[test]
    fn edges_that_failed_leave_the_epoch_blind_not_clean() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        h.scan = Err("task 7 panicked".into());
        h.tick(0);
        h.scan = Ok(HostScan {
            blind: vec!["/proc/77/fd: permission denied".into()],
            ..Default::default()
        });
        h.tick(1_000);
        h.scan = Ok(HostScan::default());
        h.docker = GpuRequests {
            found: Vec::new(),
            blind: vec!["Docker could not list running containers: gone".into()],
        };
        let a = h.run(2_000, 10_000);
        assert_eq!(
            a[0].blind,
            [
                "the /proc scan failed: task 7 panicked",
                "/proc/77/fd: permission denied",
                "Docker could not list running containers: gone",
            ]
        );
        assert!(a[0].holders.is_empty());
        // The next epoch saw everything.
        h.docker.blind.clear();
        let b = h.run(11_000, 20_000);
        assert!(b[0].blind.is_empty(), "{:?}", b[0].blind);
    }

    #[test]
    fn challenges_go_into_the_open_epoch_of_their_lease() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        h.core.challenge(pb::Challenge {
            lease_id: "l1".into(),
            nonce: vec![1],
            ..Default::default()
        });
        h.tick(0);
        for nonce in [vec![2], vec![2]] {
            h.core.challenge(pb::Challenge {
                lease_id: "l1".into(),
                nonce,
                ..Default::default()
            });
        }
        h.core.challenge(pb::Challenge {
            lease_id: "other".into(),
            nonce: vec![3],
            ..Default::default()
        });
        let a = h.run(1_000, 10_000);
        assert_eq!(
            a[0].challenges,
            [vec![1], vec![2]],
            "one that came before the epoch opened waits for it"
        );
    }

    #[test]
    fn an_early_challenge_waits_for_its_lease_until_its_deadline() {
        let mut h = Host::new(BTreeMap::new());
        let early = |lease: &str, nonce: u8, deadline| pb::Challenge {
            lease_id: lease.into(),
            nonce: vec![nonce],
            deadline_unix_ms: deadline,
            ..Default::default()
        };
        // Before the core knows the lease at all (its first cycle is later).
        h.core.challenge(early("l1", 1, 5_000));
        h.core.challenge(early("l2", 2, 500));
        h.tick(0);
        h.tick(1_000);
        h.core
            .set_leases(vec![lease("l1", 0, &[]), lease("l2", 0, &[])]);
        let a = h.run(2_000, 10_000);
        let of = |id: &str| {
            a.iter()
                .find(|x| x.lease_id == id)
                .map(|x| x.challenges.clone())
                .unwrap_or_default()
        };
        assert_eq!(of("l1"), [vec![1]]);
        assert!(of("l2").is_empty(), "its deadline passed first");
        // Never more than EARLY_MAX held.
        for i in 0..200u8 {
            h.core.challenge(early("nobody", i, 99_999));
        }
        assert_eq!(h.core.early.len(), EARLY_MAX);
    }

    #[test]
    fn a_restart_continues_the_chain_and_proves_a_lease_that_ended_meanwhile() {
        let chains = BTreeMap::from([
            (
                "running".to_owned(),
                ChainState {
                    t1_unix_ms: 0,
                    head_seq: 4,
                    head_sha256: [9; 32],
                    tally: Tally::default(),
                },
            ),
            (
                "gone".to_owned(),
                ChainState {
                    t1_unix_ms: 0,
                    head_seq: 2,
                    head_sha256: [8; 32],
                    tally: Tally {
                        first_seq: 1,
                        last_seq: 2,
                        ..Default::default()
                    },
                },
            ),
        ]);
        let mut h = Host::new(chains);
        h.core.set_leases(vec![lease("running", 0, &[])]);
        let first = h.tick(50_000);
        let [Action::Prove(proof), Action::Persist, Action::Guard { .. }, Action::Scan { .. }] =
            first.as_slice()
        else {
            panic!("{first:?}");
        };
        assert_eq!(
            (proof.lease_id.as_str(), proof.t2_unix_ms, proof.last_seq),
            ("gone", 50_000, 2)
        );
        // The epoch lost to the restart is a gap: the window opens now.
        let a = h.run(51_000, 60_000);
        assert_eq!((a[0].window_start_unix_ms, a[0].lease_seq), (50_000, 5));
        assert_eq!(a[0].prev_sha256, vec![9; 32]);
    }

    #[test]
    fn an_attestation_not_spooled_keeps_the_head() {
        let mut h = Host::new(BTreeMap::new());
        h.core.set_leases(vec![lease("l1", 0, &[])]);
        h.spool_full = true;
        let lost = h.run(0, 10_000);
        assert_eq!(lost[0].lease_seq, 1);
        assert_eq!(h.core.chains()["l1"].head_seq, 0);
        h.spool_full = false;
        let next = h.run(11_000, 20_000);
        assert_eq!(next[0].lease_seq, 1, "the next one takes its place");
        assert_eq!(next[0].window_start_unix_ms, 10_000, "a gap in time");
    }

    #[test]
    fn cycles_keep_their_period_skip_missed_ones_and_survive_a_clock_step() {
        let mut core = Core::new(settings(), BTreeMap::new());
        let inv = pb::InventorySummary::default();
        assert_eq!(core.next_timeout(), None, "the first cycle is now");
        core.handle_tick(0, &[], &inv);
        assert_eq!(core.next_timeout(), Some(1_000));
        core.handle_tick(1_003, &[], &inv);
        assert_eq!(
            core.next_timeout(),
            Some(2_000),
            "late wakeups do not drift"
        );
        core.handle_tick(3_500, &[], &inv);
        assert_eq!(
            core.next_timeout(),
            Some(4_000),
            "missed cycles are skipped"
        );
        core.handle_tick(100, &[], &inv);
        assert_eq!(core.next_timeout(), Some(1_100), "the clock went back");
    }

    #[test]
    fn answers_nobody_asked_for_are_ignored() {
        let mut core = Core::new(settings(), BTreeMap::new());
        core.handle_scan(Err("late".into()));
        core.handle_gpu_requests(GpuRequests::default());
        assert_eq!(core.poll_action(), None);
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
        let name = |v: &Verdict| recorded(v).map(HolderClass::as_str);
        assert_eq!(name(&Verdict::KillProcess), Some("foreign"));
        assert_eq!(name(&Verdict::StopContainer("c".into())), Some("foreign"));
        assert_eq!(
            name(&Verdict::Allowed(AllowReason::LeaseContainer)),
            Some("lease-container")
        );
        assert_eq!(name(&Verdict::Allowed(AllowReason::NoLease)), None);
        assert_eq!(name(&Verdict::Allowed(AllowReason::NotALeasedGpu)), None);
    }

    #[test]
    fn the_words_on_the_wire_are_the_verifiers() {
        assert_eq!(
            (EnforceAction::Kill.as_str(), EnforceAction::Stop.as_str()),
            ("kill", "stop")
        );
    }
}
