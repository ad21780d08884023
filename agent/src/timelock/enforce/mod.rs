//! Enforcement of a lease: who may hold a leased GPU.
//!
//! [`decide`] is the policy, pure: the GPU holders of one scan and the
//! active leases in, one [`Decision`] per process or container out. Nothing
//! here signals anything: the executor that ends a foreign process is the
//! edge beside it, `exec` (callers import it by that name); stopping a
//! foreign container is the Docker edge's job, given the id.

pub mod exec;

use std::collections::{BTreeMap, BTreeSet};

use crate::timelock::procs::parse::{self as procs, Holder};

/// Executables allowed to hold any GPU by default: `nvidia-persistenced`,
/// which keeps every device open so the driver stays initialised.
///
/// `nvidia-smi` is not in it: besides reading it can reset a GPU, change
/// clocks, power limits and compute mode, so a host process running it on
/// a leased GPU is as foreign as any other. Suppliers running a monitoring
/// daemon on the host (DCGM's `nv-hostengine`) add it to the list.
///
/// The NVIDIA Container Toolkit's host binaries are in it by full path (only
/// root can write there): the runtime hook queries the driver through NVML,
/// opening every GPU's node, whenever a GPU container starts (the lease's
/// own among them), and an open guard that denied it would break the lease.
pub const DEFAULT_ALLOW_EXE: &[&str] = &[
    "nvidia-persistenced",
    "/usr/bin/nvidia-container-cli",
    "/usr/bin/nvidia-container-runtime-hook",
    "/usr/bin/nvidia-ctk",
    "/usr/bin/nvidia-cdi-hook",
];

/// An active lease as the policy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub lease_id: String,
    /// GPU uuids.
    pub gpus: Vec<String>,
    /// Docker container ids of the lease, in full (64 hex), as
    /// [`procs::parse_cgroup`] finds them.
    pub containers: Vec<String>,
}

/// What the node allows besides lease containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The agent's own pid, as seen in the procfs scanned (the agent runs in
    /// the host's pid namespace, which it needs to see holders anyway).
    pub agent_pid: u32,
    /// Host executables allowed to hold any GPU: an entry with a `/` is a
    /// full path compared with the holder's `exe`; one without is compared
    /// with the file name of `exe`. A trailing ` (deleted)` on `exe` (the
    /// binary was upgraded while running) is ignored. A file name is
    /// weaker than a path: any host user can name a binary
    /// `nvidia-persistenced`, while only root can write `/usr/bin`.
    /// The list applies to host processes only: a container's `exe` is a
    /// path inside its own image, which its author chooses.
    pub allow_exe: Vec<String>,
}

impl Policy {
    /// The policy for agent `agent_pid` with [`DEFAULT_ALLOW_EXE`].
    pub fn new(agent_pid: u32) -> Self {
        Self {
            agent_pid,
            allow_exe: DEFAULT_ALLOW_EXE.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    /// Whether `exe` matches the allowlist (see [`Policy::allow_exe`]).
    pub fn allows_exe(&self, exe: &str) -> bool {
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
        let name = exe.rsplit('/').next().unwrap_or(exe);
        self.allow_exe
            .iter()
            .any(|a| if a.contains('/') { a == exe } else { a == name })
    }
}

/// One GPU holder as seen this cycle, with the GPU it holds resolved to a
/// uuid (`None`: a control device such as `/dev/nvidiactl`, or a minor
/// number the caller could not map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub holder: Holder,
    pub gpu: Option<String>,
}

impl Seen {
    /// Resolves each holder's device with [`procs::gpu_index_of`] and
    /// `uuid_of_minor` (the uuid of the GPU with that minor number, from
    /// NVML's `nvmlDeviceGetMinorNumber`).
    pub fn resolve(
        holders: Vec<Holder>,
        uuid_of_minor: impl Fn(u32) -> Option<String>,
    ) -> Vec<Seen> {
        holders
            .into_iter()
            .map(|holder| {
                let gpu = procs::gpu_index_of(&holder.device).and_then(&uuid_of_minor);
                Seen { holder, gpu }
            })
            .collect()
    }
}

/// What to do with a holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed(AllowReason),
    /// A foreign host process: SIGTERM, grace, SIGKILL.
    KillProcess,
    /// A foreign container, by id: stop it.
    StopContainer(String),
}

/// Why a holder may stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AllowReason {
    /// The agent itself.
    Agent,
    /// No lease is active: outside a lease nothing is killed.
    NoLease,
    /// The GPU it holds belongs to no active lease.
    NotALeasedGpu,
    /// It holds only control devices (or GPUs the caller could not map)
    /// while some GPU of the node is not leased: it may be working there.
    ControlDevice,
    /// It runs in a container of the lease holding that GPU.
    LeaseContainer,
    /// A host process whose executable is on the allowlist.
    Allowlisted,
    /// Foreign, but pid 1 (init): never killed, as that would bring the
    /// host down. Reported so the record shows a foreign holder spared.
    ProtectedPid,
}

impl AllowReason {
    /// A short stable name for records and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::NoLease => "no lease",
            Self::NotALeasedGpu => "not a leased gpu",
            Self::ControlDevice => "control device",
            Self::LeaseContainer => "lease container",
            Self::Allowlisted => "allowlisted",
            Self::ProtectedPid => "protected pid",
        }
    }
}

/// One verdict about one process (or one container, see [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub pid: u32,
    /// The process's start time, for `exec::kill_process`'s pid-reuse guard.
    pub start_time: u64,
    pub exe: String,
    pub container: Option<String>,
    /// The device node behind the verdict.
    pub device: String,
    /// The GPU behind the verdict (`None`: a control device).
    pub gpu: Option<String>,
    pub verdict: Verdict,
}

/// The policy. For each holder, the first rule that applies:
///
/// 1. The agent itself (`policy.agent_pid`) → `Allowed(Agent)`.
/// 2. No active lease → `Allowed(NoLease)`: outside a lease nothing is
///    killed or stopped.
/// 3. Its GPU belongs to no lease → `Allowed(NotALeasedGpu)`. If two leases
///    list the same GPU (the caller should prevent it), the first owns it.
/// 4. It holds a control device, or a GPU the caller could not map
///    (`gpu: None`): while some GPU of the node is not leased
///    (`all_gpus_leased` false) → `Allowed(ControlDevice)`, since every CUDA
///    process holds `/dev/nvidiactl` and `/dev/nvidia-uvm` and it may be
///    working on a free GPU. When every GPU is leased, nobody outside the
///    leases has a reason to hold the driver open, and the rules below
///    apply with "the lease" meaning any active lease.
/// 5. It runs in a container of the lease owning that GPU →
///    `Allowed(LeaseContainer)`. A container of another lease is foreign.
/// 6. A host process whose executable is allowlisted (see
///    [`Policy::allow_exe`]) → `Allowed(Allowlisted)`.
/// 7. A foreign container → `StopContainer(id)`.
/// 8. A foreign host process: pid 1 → `Allowed(ProtectedPid)`; any other →
///    `KillProcess`. (The agent never reaches here, by rule 1.)
///
/// The holders of one process are then folded into one decision per
/// process, and those of a container to stop into one per container:
/// - each container to stop gives one `StopContainer` decision, carrying
///   the first holder that triggered it; its other processes give no
///   decision of their own (stopping the container ends them);
/// - each process to kill gives one `KillProcess` decision, whatever else
///   it holds;
/// - every other process gives one `Allowed` decision, naming a GPU it
///   holds if it holds one, else its first control device.
///
/// Actions come first, in the order of `seen`, then the allowances in the
/// order of `seen`.
pub fn decide(
    seen: &[Seen],
    leases: &[LeaseView],
    all_gpus_leased: bool,
    policy: &Policy,
) -> Vec<Decision> {
    let owners = Owners::of(leases);

    let verdicts: Vec<Verdict> = seen
        .iter()
        .map(|s| verdict(s, leases, &owners, all_gpus_leased, policy))
        .collect();

    let decision = |s: &Seen, verdict: Verdict| Decision {
        pid: s.holder.pid,
        start_time: s.holder.start_time,
        exe: s.holder.exe.clone(),
        container: s.holder.container.clone(),
        device: s.holder.device.clone(),
        gpu: s.gpu.clone(),
        verdict,
    };

    let mut out = Vec::new();
    let mut stopped: BTreeSet<&str> = BTreeSet::new();
    let mut killed: BTreeSet<u32> = BTreeSet::new();
    for (s, v) in seen.iter().zip(&verdicts) {
        match v {
            Verdict::StopContainer(id) if stopped.insert(id) => out.push(decision(s, v.clone())),
            Verdict::KillProcess if killed.insert(s.holder.pid) => out.push(decision(s, v.clone())),
            _ => {}
        }
    }

    // One allowance per remaining process, preferring a holder of a GPU.
    let mut allowed: BTreeMap<u32, (usize, &Seen, AllowReason)> = BTreeMap::new();
    for (i, (s, v)) in seen.iter().zip(&verdicts).enumerate() {
        let Verdict::Allowed(reason) = v else {
            continue;
        };
        let pid = s.holder.pid;
        let in_stopped = s
            .holder
            .container
            .as_deref()
            .is_some_and(|c| stopped.contains(c));
        if killed.contains(&pid) || in_stopped {
            continue;
        }
        match allowed.get_mut(&pid) {
            None => {
                allowed.insert(pid, (i, s, *reason));
            }
            Some(entry) if entry.1.gpu.is_none() && s.gpu.is_some() => {
                *entry = (entry.0, s, *reason);
            }
            Some(_) => {}
        }
    }
    let mut allowed: Vec<_> = allowed.into_values().collect();
    allowed.sort_by_key(|(i, _, _)| *i);
    out.extend(
        allowed
            .into_iter()
            .map(|(_, s, reason)| decision(s, Verdict::Allowed(reason))),
    );
    out
}

/// Whether an open of a guarded device node may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Allow(AllowReason),
    Deny,
}

/// The open guard's policy: `opener` (the process opening, with the node it
/// opens as `device` and its GPU) judged by the rules of [`decide`] as if it
/// already held the node; every verdict that would end it — a kill, a
/// container stop, and pid 1, which a scan spares only because killing it
/// would bring the host down — is a denial. So the guard and the scan never
/// disagree about who may hold a leased GPU.
pub fn admit(opener: &Seen, leases: &[LeaseView], all_gpus_leased: bool, policy: &Policy) -> Admit {
    let owners = Owners::of(leases);
    match verdict(opener, leases, &owners, all_gpus_leased, policy) {
        Verdict::Allowed(AllowReason::ProtectedPid) => Admit::Deny,
        Verdict::Allowed(reason) => Admit::Allow(reason),
        Verdict::KillProcess | Verdict::StopContainer(_) => Admit::Deny,
    }
}

/// Who owns what among the active leases.
struct Owners<'a> {
    /// Each leased GPU's lease (the first, if two list it).
    gpu: BTreeMap<&'a str, &'a LeaseView>,
    /// Every lease's containers.
    any_container: BTreeSet<&'a str>,
}

impl<'a> Owners<'a> {
    fn of(leases: &'a [LeaseView]) -> Owners<'a> {
        let mut gpu: BTreeMap<&str, &LeaseView> = BTreeMap::new();
        for lease in leases {
            for g in &lease.gpus {
                gpu.entry(g.as_str()).or_insert(lease);
            }
        }
        let any_container = leases
            .iter()
            .flat_map(|l| l.containers.iter().map(String::as_str))
            .collect();
        Owners { gpu, any_container }
    }
}

/// The verdict about one holder, before folding (rules 1 to 8 of [`decide`]).
fn verdict(
    s: &Seen,
    leases: &[LeaseView],
    owners: &Owners,
    all_gpus_leased: bool,
    policy: &Policy,
) -> Verdict {
    let h = &s.holder;
    if h.pid == policy.agent_pid {
        return Verdict::Allowed(AllowReason::Agent);
    }
    if leases.is_empty() {
        return Verdict::Allowed(AllowReason::NoLease);
    }
    let in_lease = match &s.gpu {
        Some(gpu) => {
            let Some(lease) = owners.gpu.get(gpu.as_str()) else {
                return Verdict::Allowed(AllowReason::NotALeasedGpu);
            };
            h.container
                .as_ref()
                .is_some_and(|c| lease.containers.contains(c))
        }
        None => {
            if !all_gpus_leased {
                return Verdict::Allowed(AllowReason::ControlDevice);
            }
            h.container
                .as_deref()
                .is_some_and(|c| owners.any_container.contains(c))
        }
    };
    if in_lease {
        return Verdict::Allowed(AllowReason::LeaseContainer);
    }
    match &h.container {
        Some(id) => Verdict::StopContainer(id.clone()),
        None if policy.allows_exe(&h.exe) => Verdict::Allowed(AllowReason::Allowlisted),
        None if h.pid <= 1 => Verdict::Allowed(AllowReason::ProtectedPid),
        None => Verdict::KillProcess,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AGENT: u32 = 500;

    fn id(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn holder(pid: u32, exe: &str, container: Option<&str>, device: &str) -> Holder {
        Holder {
            pid,
            start_time: u64::from(pid) * 7,
            exe: exe.to_owned(),
            comm: exe.rsplit('/').next().unwrap().chars().take(15).collect(),
            container: container.map(str::to_owned),
            device: device.to_owned(),
            uid: 0,
        }
    }

    /// A holder of GPU `gpu` (`/dev/nvidiaN`, uuid `GPU-N`), or of
    /// `/dev/nvidiactl` for `None`.
    fn seen(pid: u32, exe: &str, container: Option<&str>, gpu: Option<u32>) -> Seen {
        let device = gpu.map_or("/dev/nvidiactl".to_owned(), |g| format!("/dev/nvidia{g}"));
        Seen {
            holder: holder(pid, exe, container, &device),
            gpu: gpu.map(|g| format!("GPU-{g}")),
        }
    }

    fn lease(name: &str, gpus: &[u32], containers: &[&str]) -> LeaseView {
        LeaseView {
            lease_id: name.to_owned(),
            gpus: gpus.iter().map(|g| format!("GPU-{g}")).collect(),
            containers: containers.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn policy() -> Policy {
        let mut p = Policy::new(AGENT);
        p.allow_exe.push("/opt/dcgm/bin/nv-hostengine".to_owned());
        p
    }

    #[test]
    fn every_rule() {
        let (ca, cb, cx) = (id('a'), id('b'), id('c'));
        let (ca, cb, cx) = (ca.as_str(), cb.as_str(), cx.as_str());
        // Lease A holds GPUs 0 and 1 with container ca; lease B GPU 2 with
        // cb; GPU 3 is free.
        let two = vec![lease("A", &[0, 1], &[ca]), lease("B", &[2], &[cb])];
        let none: Vec<LeaseView> = vec![];
        let py = "/usr/bin/python3";
        use AllowReason::*;
        let allowed = Verdict::Allowed;
        let stop = |c: &str| Verdict::StopContainer(c.to_owned());
        let kill = Verdict::KillProcess;
        #[rustfmt::skip]
        let cases: Vec<(&str, Seen, &Vec<LeaseView>, bool, Verdict)> = vec![
            ("lease container on its own GPU", seen(10, py, Some(ca), Some(0)), &two, false, allowed(LeaseContainer)),
            ("lease container on its other GPU", seen(10, py, Some(ca), Some(1)), &two, false, allowed(LeaseContainer)),
            ("lease B's container on B's GPU", seen(11, py, Some(cb), Some(2)), &two, false, allowed(LeaseContainer)),
            ("container of lease A on lease B's GPU", seen(10, py, Some(ca), Some(2)), &two, false, stop(ca)),
            ("container of lease B on lease A's GPU", seen(11, py, Some(cb), Some(0)), &two, true, stop(cb)),
            ("foreign container on a leased GPU", seen(12, py, Some(cx), Some(0)), &two, false, stop(cx)),
            ("foreign container on a free GPU", seen(12, py, Some(cx), Some(3)), &two, false, allowed(NotALeasedGpu)),
            ("lease container on a free GPU", seen(10, py, Some(ca), Some(3)), &two, false, allowed(NotALeasedGpu)),
            ("host process on a leased GPU", seen(13, py, None, Some(0)), &two, false, kill.clone()),
            ("host process on a free GPU", seen(13, py, None, Some(3)), &two, false, allowed(NotALeasedGpu)),
            ("host process, no lease", seen(13, py, None, Some(0)), &none, false, allowed(NoLease)),
            ("foreign container, no lease", seen(12, py, Some(cx), Some(0)), &none, true, allowed(NoLease)),
            ("the agent on a leased GPU", seen(AGENT, "/usr/bin/warden", None, Some(0)), &two, true, allowed(Agent)),
            ("the agent, no lease", seen(AGENT, "/usr/bin/warden", None, Some(0)), &none, false, allowed(Agent)),
            ("the agent on a control device", seen(AGENT, "/usr/bin/warden", None, None), &two, true, allowed(Agent)),
            ("allowlisted by name", seen(14, "/usr/bin/nvidia-persistenced", None, Some(0)), &two, false, allowed(Allowlisted)),
            ("allowlisted by name, other dir", seen(14, "/usr/local/sbin/nvidia-persistenced", None, Some(2)), &two, false, allowed(Allowlisted)),
            ("allowlisted, binary upgraded", seen(14, "/usr/bin/nvidia-persistenced (deleted)", None, Some(0)), &two, false, allowed(Allowlisted)),
            ("allowlisted by full path", seen(15, "/opt/dcgm/bin/nv-hostengine", None, Some(0)), &two, false, allowed(Allowlisted)),
            ("a path entry does not match the name elsewhere", seen(15, "/tmp/nv-hostengine", None, Some(0)), &two, false, kill.clone()),
            ("a name entry is the whole file name", seen(15, "/usr/bin/nvidia-persistenced2", None, Some(0)), &two, false, kill.clone()),
            ("the allowlist does not apply in a container", seen(16, "/usr/bin/nvidia-persistenced", Some(cx), Some(0)), &two, false, stop(cx)),
            ("pid 1 is never killed", seen(1, "/sbin/init", None, Some(0)), &two, true, allowed(ProtectedPid)),
            ("pid 1 allowlisted", seen(1, "/usr/bin/nvidia-persistenced", None, Some(0)), &two, true, allowed(Allowlisted)),
            ("pid 1 on a control device", seen(1, "/sbin/init", None, None), &two, true, allowed(ProtectedPid)),
            ("exe unreadable", seen(17, "[python3]", None, Some(1)), &two, false, kill.clone()),
            ("host on a control device, a GPU free", seen(18, py, None, None), &two, false, allowed(ControlDevice)),
            ("host on a control device, all leased", seen(18, py, None, None), &two, true, kill.clone()),
            ("foreign container on a control device, a GPU free", seen(12, py, Some(cx), None), &two, false, allowed(ControlDevice)),
            ("foreign container on a control device, all leased", seen(12, py, Some(cx), None), &two, true, stop(cx)),
            ("any lease's container on a control device, all leased", seen(11, py, Some(cb), None), &two, true, allowed(LeaseContainer)),
            ("allowlisted on a control device, all leased", seen(14, "/usr/bin/nvidia-persistenced", None, None), &two, true, allowed(Allowlisted)),
            ("control device, no lease", seen(18, py, None, None), &none, true, allowed(NoLease)),
        ];
        for (what, s, leases, all, want) in cases {
            let got = decide(std::slice::from_ref(&s), leases, all, &policy());
            assert_eq!(got.len(), 1, "{what}: {got:?}");
            assert_eq!(got[0].verdict, want, "{what}");
            assert_eq!(
                (got[0].pid, &got[0].device, &got[0].gpu),
                (s.holder.pid, &s.holder.device, &s.gpu),
                "{what}"
            );
            assert_eq!(
                (got[0].start_time, &got[0].exe, &got[0].container),
                (s.holder.start_time, &s.holder.exe, &s.holder.container),
                "{what}"
            );
        }
    }

    #[test]
    fn a_gpu_in_two_leases_belongs_to_the_first() {
        let (ca, cb) = (id('a'), id('b'));
        let leases = vec![lease("A", &[0], &[&ca]), lease("B", &[0], &[&cb])];
        let got = decide(
            &[
                seen(10, "x", Some(&ca), Some(0)),
                seen(11, "x", Some(&cb), Some(0)),
            ],
            &leases,
            true,
            &policy(),
        );
        assert_eq!(got[0].verdict, Verdict::StopContainer(cb.clone()));
        assert_eq!(
            got[1].verdict,
            Verdict::Allowed(AllowReason::LeaseContainer)
        );
    }

    #[test]
    fn a_lease_without_containers_yet() {
        let leases = vec![lease("A", &[0], &[])];
        let cx = id('c');
        let got = decide(
            &[
                seen(12, "x", Some(&cx), Some(0)),
                seen(13, "x", None, Some(0)),
            ],
            &leases,
            false,
            &policy(),
        );
        let verdicts: Vec<_> = got.iter().map(|d| d.verdict.clone()).collect();
        assert_eq!(
            verdicts,
            vec![Verdict::StopContainer(cx), Verdict::KillProcess]
        );
    }

    #[test]
    fn a_container_is_stopped_once() {
        let (ca, cx, cy) = (id('a'), id('c'), id('d'));
        let leases = vec![lease("A", &[0, 1], &[&ca])];
        let s = vec![
            seen(20, "x", Some(&cx), None),
            seen(20, "x", Some(&cx), Some(0)),
            seen(21, "y", Some(&cx), Some(1)),
            seen(22, "z", Some(&cx), Some(3)),
            seen(23, "w", Some(&cy), Some(1)),
            seen(24, "v", Some(&cy), Some(0)),
        ];
        let got = decide(&s, &leases, false, &policy());
        let brief: Vec<_> = got
            .iter()
            .map(|d| (d.pid, d.gpu.as_deref(), d.verdict.clone()))
            .collect();
        assert_eq!(
            brief,
            vec![
                (20, Some("GPU-0"), Verdict::StopContainer(cx.clone())),
                (23, Some("GPU-1"), Verdict::StopContainer(cy.clone())),
            ],
            "pid 22 (a free GPU) is folded into its container's stop"
        );
    }

    #[test]
    fn a_process_gets_one_decision() {
        let ca = id('a');
        let leases = vec![lease("A", &[0], &[&ca])];
        let uvm = |pid, container: Option<&str>| Seen {
            holder: holder(pid, "p", container, "/dev/nvidia-uvm"),
            gpu: None,
        };
        let s = vec![
            // A host process on a control device, a free GPU and a leased one.
            uvm(30, None),
            seen(30, "p", None, Some(3)),
            seen(30, "p", None, Some(0)),
            seen(30, "p", None, None),
            // The lease's container: its GPU is named, not its control device.
            uvm(31, Some(&ca)),
            seen(31, "p", Some(&ca), Some(0)),
            seen(31, "p", Some(&ca), None),
            // A host process on control devices only.
            uvm(32, None),
            seen(32, "p", None, None),
            // Another host process killed.
            seen(33, "p", None, Some(0)),
        ];
        let got = decide(&s, &leases, false, &policy());
        let brief: Vec<_> = got
            .iter()
            .map(|d| (d.pid, d.device.as_str(), d.verdict.clone()))
            .collect();
        use AllowReason::*;
        assert_eq!(
            brief,
            vec![
                (30, "/dev/nvidia0", Verdict::KillProcess),
                (33, "/dev/nvidia0", Verdict::KillProcess),
                (31, "/dev/nvidia0", Verdict::Allowed(LeaseContainer)),
                (32, "/dev/nvidia-uvm", Verdict::Allowed(ControlDevice)),
            ]
        );
    }

    #[test]
    fn nothing_seen_nothing_decided() {
        assert!(decide(&[], &[lease("A", &[0], &[])], true, &policy()).is_empty());
    }

    #[test]
    fn resolve_maps_minor_numbers() {
        let holders = vec![
            holder(1, "x", None, "/dev/nvidia0"),
            holder(1, "x", None, "/dev/nvidiactl"),
            holder(1, "x", None, "/dev/nvidia7"),
        ];
        let got = Seen::resolve(holders, |minor| (minor < 4).then(|| format!("GPU-{minor}")));
        let gpus: Vec<_> = got.iter().map(|s| s.gpu.as_deref()).collect();
        assert_eq!(gpus, vec![Some("GPU-0"), None, None]);
    }

    #[test]
    fn an_open_is_admitted_exactly_when_a_holder_would_be_left_alone() {
        let (c1, c2) = (id('a'), id('b'));
        let (ours, theirs) = (c1.as_str(), c2.as_str());
        let leases = [LeaseView {
            lease_id: "l1".into(),
            gpus: vec!["GPU-0".into()],
            containers: vec![ours.into()],
        }];
        let p = Policy::new(AGENT);
        let opener = |pid: u32, exe: &str, container: Option<&str>, gpu: Option<&str>| Seen {
            holder: Holder {
                pid,
                start_time: 1,
                exe: exe.into(),
                comm: String::new(),
                container: container.map(Into::into),
                device: "/dev/nvidia0".into(),
                uid: 0,
            },
            gpu: gpu.map(Into::into),
        };
        let g = Some("GPU-0");
        let admit = |s: &Seen, all: bool| admit(s, &leases, all, &p);
        assert_eq!(
            admit(&opener(AGENT, "/usr/bin/warden", None, g), false),
            Admit::Allow(AllowReason::Agent)
        );
        assert_eq!(
            admit(&opener(9, "/bin/app", Some(ours), g), false),
            Admit::Allow(AllowReason::LeaseContainer)
        );
        assert_eq!(
            admit(&opener(9, "/usr/bin/nvidia-persistenced", None, g), false),
            Admit::Allow(AllowReason::Allowlisted)
        );
        assert_eq!(
            admit(&opener(9, "/usr/bin/python3", None, g), false),
            Admit::Deny
        );
        assert_eq!(
            admit(&opener(9, "/bin/app", Some(theirs), g), false),
            Admit::Deny
        );
        assert_eq!(
            admit(&opener(1, "/sbin/init", None, g), false),
            Admit::Deny,
            "pid 1 is spared a kill, not an open"
        );
        assert_eq!(
            admit(&opener(9, "/usr/bin/python3", None, Some("GPU-1")), false),
            Admit::Allow(AllowReason::NotALeasedGpu)
        );
        // A control node: free while a GPU is, the lease's when all are leased.
        let ctl = opener(9, "/usr/bin/python3", None, None);
        assert_eq!(admit(&ctl, false), Admit::Allow(AllowReason::ControlDevice));
        assert_eq!(admit(&ctl, true), Admit::Deny);
        assert_eq!(
            admit(&opener(9, "/bin/app", Some(ours), None), true),
            Admit::Allow(AllowReason::LeaseContainer)
        );
    }

    #[test]
    fn allowlist_forms() {
        let p = Policy::new(1);
        assert_eq!(p.allow_exe[0], "nvidia-persistenced");
        assert!(p.allows_exe("/usr/bin/nvidia-container-cli"));
        assert!(
            !p.allows_exe("/tmp/nvidia-container-cli"),
            "the toolkit's binaries are allowed by path only"
        );
        assert!(p.allows_exe("/usr/bin/nvidia-persistenced"));
        assert!(p.allows_exe("nvidia-persistenced"));
        assert!(!p.allows_exe("/usr/bin/nvidia-smi"));
        assert!(!p.allows_exe("[nvidia-persiste]"));
        assert!(!p.allows_exe(""));
    }

    /// Holdings of a few processes, each with one container and exe (as
    /// one scan gives them), in random order.
    fn arb_seen() -> impl Strategy<Value = Vec<Seen>> {
        let process = (
            prop::option::of(0u8..4),
            prop::sample::select(vec![
                "/usr/bin/python3",
                "/usr/bin/nvidia-persistenced",
                "/opt/dcgm/bin/nv-hostengine",
                "[kworker]",
            ]),
        );
        let pids = [0u32, 1, 2, 3, AGENT, 501, 502, 503];
        (
            prop::collection::vec(process, pids.len()),
            prop::collection::vec((0..pids.len(), prop::option::of(0u32..5)), 0..12),
        )
            .prop_map(move |(procs, holdings)| {
                holdings
                    .into_iter()
                    .map(|(i, gpu)| {
                        let (container, exe) = procs[i];
                        let c = container.map(|c| id(char::from(b'a' + c)));
                        seen(pids[i], exe, c.as_deref(), gpu)
                    })
                    .collect()
            })
    }

    fn arb_lease() -> impl Strategy<Value = LeaseView> {
        (
            prop::collection::btree_set(0u32..5, 0..3),
            prop::collection::btree_set(0u8..4, 0..3),
        )
            .prop_map(|(gpus, containers)| LeaseView {
                lease_id: "L".to_owned(),
                gpus: gpus.iter().map(|g| format!("GPU-{g}")).collect(),
                containers: containers
                    .iter()
                    .map(|c| id(char::from(b'a' + c)))
                    .collect(),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn decide_holds_its_promises(
            seen in arb_seen(),
            leases in prop::collection::vec(arb_lease(), 0..3),
            all_gpus_leased in any::<bool>(),
        ) {
            let p = policy();
            let got = decide(&seen, &leases, all_gpus_leased, &p);
            let owner = |g: &str| leases.iter().find(|l| l.gpus.iter().any(|x| x == g));
            let in_any = |c: &str| leases.iter().any(|l| l.containers.iter().any(|x| x == c));
            let mut pids = BTreeSet::new();
            let mut stops = BTreeSet::new();
            for d in &got {
                // The holder behind it was seen.
                prop_assert!(seen.iter().any(|s| s.holder.pid == d.pid && s.holder.device == d.device && s.gpu == d.gpu));
                prop_assert!(pids.insert(d.pid), "two decisions for pid {}", d.pid);
                match &d.verdict {
                    Verdict::KillProcess => {
                        prop_assert!(d.pid != AGENT && d.pid > 1);
                        prop_assert!(!leases.is_empty());
                        prop_assert!(d.container.is_none());
                        prop_assert!(!p.allows_exe(&d.exe));
                        match &d.gpu {
                            Some(g) => prop_assert!(owner(g).is_some()),
                            None => prop_assert!(all_gpus_leased),
                        }
                    }
                    Verdict::StopContainer(id) => {
                        prop_assert!(!leases.is_empty());
                        prop_assert!(d.pid != AGENT);
                        prop_assert_eq!(d.container.as_deref(), Some(id.as_str()));
                        prop_assert!(stops.insert(id.clone()), "{} stopped twice", id);
                        match &d.gpu {
                            Some(g) => prop_assert!(!owner(g).unwrap().containers.contains(id)),
                            None => prop_assert!(all_gpus_leased && !in_any(id)),
                        }
                    }
                    Verdict::Allowed(_) => {}
                }
                if leases.is_empty() {
                    prop_assert!(matches!(d.verdict, Verdict::Allowed(_)));
                }
            }
            // Every holder is accounted for: its process has a decision,
            // or its container is stopped.
            for s in &seen {
                let stopped = s.holder.container.as_ref().is_some_and(|c| stops.contains(c));
                prop_assert!(pids.contains(&s.holder.pid) || stopped);
            }
        }
    }
}
