//! The open guard: during a lease, opens of the leased GPUs' device nodes
//! wait for the agent's answer (fanotify permission events), and an open
//! by a process that is not the lease's is denied before it succeeds —
//! prevention, where the `/proc` scan can only end a holder after the fact.
//!
//! This module is the guard's plain data: which nodes to mark
//! ([`targets`]), and the log of denied opens ([`PreventedLog`]) that goes
//! into the attestations. The policy is `enforce::admit`, the same rules the
//! scan judges holders by. The edge that owns the fanotify group is
//! `fanotify`.
//!
//! What the guard does not see: an open of another inode with the same
//! device number (a node made with `mknod` elsewhere, as a container
//! runtime may do inside a container's own `/dev`), and descriptors opened
//! before the marks were placed. Those are what the safety-net scan (every
//! `timelock.safety_scan`, and at once when a lease comes under the guard)
//! and NVML's process lists (every cycle) are for.

pub mod fanotify;

use std::collections::BTreeSet;

use warden_proto::pb;

/// A device node to guard, and the GPU behind it (`None`: a control node).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub path: String,
    pub gpu: Option<String>,
}

/// The control nodes every CUDA process opens besides its GPU's own.
const CONTROL_NODES: &[&str] = &["ctl", "-uvm", "-uvm-tools", "-modeset"];

/// The nodes to guard for the leased GPUs `leased` (uuid, minor number),
/// found where `patterns` (`timelock.device_patterns`) look:
/// - a pattern `DIR/nvidia*` gives `DIR/nvidiaN` for each leased minor N,
///   and, when `all_gpus_leased`, the control nodes `DIR/nvidiactl`,
///   `DIR/nvidia-uvm`, `DIR/nvidia-uvm-tools`, `DIR/nvidia-modeset`;
/// - an exact pattern naming a per-GPU node gives it if its GPU is leased.
///
/// Control nodes are guarded only when every GPU is leased: while one is
/// free, a host process opening `nvidiactl` may be working there (the rule
/// `enforce::decide` applies to holders). Sorted, without duplicates.
pub fn targets(
    patterns: &[String],
    leased: &[(String, u32)],
    all_gpus_leased: bool,
) -> Vec<Target> {
    let mut out = BTreeSet::new();
    let gpu_of = |minor: u32| {
        leased
            .iter()
            .find(|(_, m)| *m == minor)
            .map(|(uuid, _)| uuid.clone())
    };
    for p in patterns {
        match p.strip_suffix('*') {
            Some(prefix) if prefix.ends_with("nvidia") => {
                for (uuid, minor) in leased {
                    out.insert(Target {
                        path: format!("{prefix}{minor}"),
                        gpu: Some(uuid.clone()),
                    });
                }
                if all_gpus_leased {
                    for c in CONTROL_NODES {
                        out.insert(Target {
                            path: format!("{prefix}{c}"),
                            gpu: None,
                        });
                    }
                }
            }
            Some(_) => {}
            None => {
                if let Some(uuid) = crate::timelock::procs::parse::gpu_index_of(p).and_then(gpu_of)
                {
                    out.insert(Target {
                        path: p.clone(),
                        gpu: Some(uuid),
                    });
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Distinct openers a log keeps, per attestation window and per drain;
/// further attempts only count (`more`). A process opening in a loop is one
/// entry however often it tries, so the bound is on distinct openers.
pub const PREVENTED_MAX: usize = 64;

/// Denied opens, folded per opener and node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreventedLog {
    pub entries: Vec<pb::PreventedOpen>,
    /// Attempts of openers beyond [`PREVENTED_MAX`].
    pub more: u64,
}

impl PreventedLog {
    /// Folds `p` in: into the entry of the same opener (pid, exe,
    /// container) and node (gpu, device) if there is one, as a new entry if
    /// there is room, else into `more`.
    pub fn add(&mut self, p: pb::PreventedOpen) {
        let same = |e: &pb::PreventedOpen| {
            e.pid == p.pid
                && e.exe == p.exe
                && e.container == p.container
                && e.gpu == p.gpu
                && e.device == p.device
        };
        if let Some(e) = self.entries.iter_mut().find(|e| same(e)) {
            e.attempts = e.attempts.saturating_add(p.attempts);
            e.first_unix_ms = e.first_unix_ms.min(p.first_unix_ms);
            e.last_unix_ms = e.last_unix_ms.max(p.last_unix_ms);
        } else if self.entries.len() < PREVENTED_MAX {
            self.entries.push(p);
        } else {
            self.more = self.more.saturating_add(p.attempts);
        }
    }

    /// Another log folded in.
    pub fn merge(&mut self, other: PreventedLog) {
        for e in other.entries {
            self.add(e);
        }
        self.more = self.more.saturating_add(other.more);
    }

    /// Every attempt, listed or not.
    pub fn attempts(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.attempts)
            .fold(self.more, u64::saturating_add)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.more == 0
    }
}

/// What the guard says each cycle (the answer to the core's
/// `Action::Guard`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuardReport {
    /// Leased GPUs whose nodes are all under marks now.
    pub guarded: BTreeSet<String>,
    /// Why part of what was asked is not guarded: for a GPU (`Some(uuid)`),
    /// or for every lease (`None`: the guard is off or unavailable, a
    /// control node could not be marked). Empty when all is guarded.
    pub unguarded: Vec<(Option<String>, String)>,
    /// Opens denied since the last report.
    pub prevented: PreventedLog,
}

impl GuardReport {
    /// The report of an agent without a guard: nothing guarded, for `why`.
    pub fn off(why: impl Into<String>) -> GuardReport {
        GuardReport {
            unguarded: vec![(None, why.into())],
            ..Default::default()
        }
    }

    /// Why a lease holding `gpus` is not guarded at the open, or None when
    /// it is: the first reason concerning it.
    pub fn unguarded_for(&self, gpus: &[String]) -> Option<String> {
        for (gpu, why) in &self.unguarded {
            match gpu {
                None => return Some(why.clone()),
                Some(g) if gpus.contains(g) => return Some(why.clone()),
                Some(_) => {}
            }
        }
        gpus.iter()
            .find(|g| !self.guarded.contains(*g))
            .map(|g| format!("GPU {g} has no device node under the guard"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(v: &[(&str, u32)]) -> Vec<(String, u32)> {
        v.iter().map(|(u, m)| ((*u).to_owned(), *m)).collect()
    }

    fn paths(t: &[Target]) -> Vec<&str> {
        t.iter().map(|t| t.path.as_str()).collect()
    }

    #[test]
    fn a_lease_guards_its_gpus_nodes_and_the_control_nodes_only_when_all_are_leased() {
        let p = vec!["/dev/nvidia*".to_owned()];
        let some = targets(&p, &leased(&[("GPU-b", 1)]), false);
        assert_eq!(
            some,
            [Target {
                path: "/dev/nvidia1".into(),
                gpu: Some("GPU-b".into())
            }]
        );
        let all = targets(&p, &leased(&[("GPU-a", 0), ("GPU-b", 1)]), true);
        assert_eq!(
            paths(&all),
            [
                "/dev/nvidia-modeset",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia0",
                "/dev/nvidia1",
                "/dev/nvidiactl"
            ]
        );
        assert!(all.iter().filter(|t| t.gpu.is_none()).count() == 4);
        assert!(targets(&p, &[], false).is_empty());
    }

    #[test]
    fn exact_patterns_guard_their_gpu_and_other_patterns_nothing() {
        let p = vec![
            "/srv/dev/nvidia3".to_owned(),
            "/srv/dev/nvidia4".to_owned(),
            "/dev/dri/*".to_owned(),
            "/dev/nvidia*".to_owned(),
        ];
        let t = targets(&p, &leased(&[("GPU-d", 3)]), false);
        assert_eq!(paths(&t), ["/dev/nvidia3", "/srv/dev/nvidia3"]);
    }

    fn denied(pid: u32, at: i64) -> pb::PreventedOpen {
        pb::PreventedOpen {
            pid,
            exe: "/usr/bin/python3".into(),
            gpu: "GPU-a".into(),
            device: "/dev/nvidia0".into(),
            attempts: 1,
            first_unix_ms: at,
            last_unix_ms: at,
            ..Default::default()
        }
    }

    #[test]
    fn a_process_opening_in_a_loop_is_one_entry_and_distinct_openers_are_bounded() {
        let mut log = PreventedLog::default();
        for i in 0..10_000 {
            log.add(denied(7, 1_000 + i));
        }
        assert_eq!(log.entries.len(), 1);
        assert_eq!(log.entries[0].attempts, 10_000);
        assert_eq!(
            (log.entries[0].first_unix_ms, log.entries[0].last_unix_ms),
            (1_000, 10_999)
        );
        for pid in 100..100 + PREVENTED_MAX as u32 + 5 {
            log.add(denied(pid, 5));
        }
        assert_eq!(log.entries.len(), PREVENTED_MAX);
        assert_eq!(log.more, 6);
        assert_eq!(log.attempts(), 10_000 + PREVENTED_MAX as u64 + 5);

        let mut window = PreventedLog::default();
        window.merge(log.clone());
        window.merge(log);
        assert_eq!(window.entries[0].attempts, 20_000);
        assert_eq!(window.attempts(), 2 * (10_000 + PREVENTED_MAX as u64 + 5));
    }

    #[test]
    fn a_lease_is_unguarded_by_a_general_reason_or_one_of_its_gpus() {
        let gpus = vec!["GPU-a".to_owned(), "GPU-b".to_owned()];
        let mut r = GuardReport {
            guarded: ["GPU-a".to_owned(), "GPU-b".to_owned()].into(),
            ..Default::default()
        };
        assert_eq!(r.unguarded_for(&gpus), None);
        r.unguarded = vec![(Some("GPU-c".into()), "other lease".into())];
        assert_eq!(r.unguarded_for(&gpus), None);
        r.guarded.remove("GPU-b");
        assert_eq!(
            r.unguarded_for(&gpus).as_deref(),
            Some("GPU GPU-b has no device node under the guard")
        );
        r.unguarded
            .push((Some("GPU-b".into()), "/dev/nvidia1: No such file".into()));
        assert_eq!(
            r.unguarded_for(&gpus).as_deref(),
            Some("/dev/nvidia1: No such file")
        );
        let off = GuardReport::off("timelock.prevent is false");
        assert_eq!(
            off.unguarded_for(&[]).as_deref(),
            Some("timelock.prevent is false")
        );
    }
}
