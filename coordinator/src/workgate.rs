//! Which GPUs have proved themselves with a work challenge
//! (docs/attestation.md#work-challenge), which are due one, and which are
//! kept out of matching. Pure: fed inventories, issued challenges, judged
//! answers and the time; the issuer task (`workissuer.rs`) does the I/O.
//!
//! A GPU is matchable once a challenge passed on it and stays so while
//! nothing contradicts it: a failed or unanswered challenge, or an NVML
//! identity (uuid, serial, PCI ids, memory, name) other than the one that
//! passed, takes it out until a challenge passes again.

use std::{collections::BTreeMap, time::Duration};

use warden_proto::{
    pb,
    workproof::{self, identity, sizing},
};

use crate::store::GpuWorkRow;

/// A GPU's standing.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Not challenged yet, or its identity changed since it passed: why.
    Unverified {
        why: String,
    },
    /// A challenge is out; `good` says whether it was matchable before.
    Pending {
        challenge: Box<pb::WorkChallenge>,
    },
    Passed {
        at_ms: i64,
    },
    Failed {
        reason: String,
        at_ms: i64,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Unverified { .. } => "unverified",
            State::Pending { .. } => "pending",
            State::Passed { .. } => "passed",
            State::Failed { .. } => "failed",
        }
    }
}

/// One GPU's record with the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub state: State,
    /// What NVML says it is now (the inventory's view).
    pub claim: pb::GpuIdentity,
    /// The identity its last passing answer carried.
    pub passed: Option<pb::GpuIdentity>,
    /// Matchable: passed, and nothing since has contradicted it.
    pub good: bool,
    /// The confidential-computing report of the last passing answer (kept,
    /// not verified here) and its status.
    pub cc_report: Vec<u8>,
    pub cc_status: String,
}

/// A challenge to send: to whom, on which GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub node_id: String,
    pub gpu: pb::GpuIdentity,
}

/// The gate's settings (coordinator config `[work_challenge]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A passed GPU is challenged again this long after.
    pub interval: Duration,
    /// A failed one is challenged again this long after.
    pub retry: Duration,
    pub sizing: sizing::Policy,
}

/// The identity the inventory claims for one GPU.
pub fn claim_of(g: &pb::GpuInfo) -> pb::GpuIdentity {
    identity::of(g)
}

/// Every node's GPUs, by node then uuid: what one node's inventory,
/// answer or standing touches is that node's alone (a tick stays linear in
/// the GPUs of the network).
#[derive(Debug, Default)]
pub struct Gate {
    gpus: BTreeMap<String, BTreeMap<String, Entry>>,
    /// GPUs whose outcome changed since [`Gate::take_changed`]: to store.
    changed: Vec<(String, String)>,
}

impl Gate {
    /// A node's inventory as it registered or changed: new GPUs are
    /// unverified, GPUs gone are forgotten, a GPU whose identity is not the
    /// one that passed is taken out of matching.
    pub fn inventory(&mut self, node_id: &str, gpus: &[pb::GpuInfo]) {
        if gpus.is_empty() {
            self.gpus.remove(node_id);
            return;
        }
        let node = self.gpus.entry(node_id.to_owned()).or_default();
        node.retain(|uuid, _| gpus.iter().any(|g| &g.uuid == uuid));
        for g in gpus {
            let claim = claim_of(g);
            let e = node.entry(g.uuid.clone()).or_insert_with(|| Entry {
                state: State::Unverified {
                    why: "not challenged yet".into(),
                },
                claim: claim.clone(),
                passed: None,
                good: false,
                cc_report: Vec::new(),
                cc_status: String::new(),
            });
            e.claim = claim;
            if let Some(passed) = &e.passed {
                let changed = identity::changes(passed, &e.claim);
                if !changed.is_empty() && e.good {
                    e.good = false;
                    if !matches!(e.state, State::Pending { .. }) {
                        e.state = State::Unverified {
                            why: format!("NVML identity changed: {}", changed.join(", ")),
                        };
                    }
                }
            }
        }
    }

    /// GPUs that need a challenge at `now_ms`: at most one per node, and
    /// none for a node with one out.
    /// `eligible(node, uuid)`: the node's stream is here and the GPU is in
    /// no lease (a challenge would run beside the renter's work).
    pub fn due(
        &self,
        now_ms: i64,
        s: &Settings,
        eligible: impl Fn(&str, &str) -> bool,
    ) -> Vec<Due> {
        let mut out = Vec::new();
        // One challenge out per node at a time.
        for (node, gpus) in &self.gpus {
            if gpus
                .values()
                .any(|e| matches!(e.state, State::Pending { .. }))
            {
                continue;
            }
            let due = gpus.iter().find(|(uuid, e)| {
                eligible(node, uuid)
                    && match &e.state {
                        State::Unverified { .. } => true,
                        State::Pending { .. } => false,
                        State::Passed { at_ms } => now_ms >= at_ms + s.interval.as_millis() as i64,
                        State::Failed { at_ms, .. } => now_ms >= at_ms + s.retry.as_millis() as i64,
                    }
            });
            if let Some((_, e)) = due {
                out.push(Due {
                    node_id: node.clone(),
                    gpu: e.claim.clone(),
                });
            }
        }
        out
    }

    /// The challenge for `due`, sized to the GPU's claim, issued at `now_ms`.
    pub fn challenge(
        due: &Due,
        s: &Settings,
        now_ms: i64,
        seed: [u8; 32],
        cc_nonce: [u8; 32],
        challenge_id: String,
    ) -> pb::WorkChallenge {
        let plan = sizing::plan(due.gpu.memory_total_bytes, &due.gpu.name, &s.sizing);
        pb::WorkChallenge {
            node_id: due.node_id.clone(),
            challenge_id,
            seed: seed.to_vec(),
            gpu_uuid: due.gpu.uuid.clone(),
            n: plan.params.n,
            rounds: plan.params.rounds,
            spot_tiles: plan.params.spot_tiles,
            issued_unix_ms: now_ms,
            deadline_unix_ms: now_ms + plan.deadline.as_millis() as i64,
            cc_nonce: cc_nonce.to_vec(),
        }
    }

    /// A challenge was sent.
    pub fn issued(&mut self, ch: pb::WorkChallenge) {
        if let Some(e) = self.entry_mut(&ch.node_id, &ch.gpu_uuid) {
            e.state = State::Pending {
                challenge: Box::new(ch),
            };
        }
    }

    /// The challenge out for this node with this id, to check an answer against.
    pub fn pending(&self, node_id: &str, challenge_id: &str) -> Option<&pb::WorkChallenge> {
        self.gpus
            .get(node_id)?
            .values()
            .find_map(|e| match &e.state {
                State::Pending { challenge } if challenge.challenge_id == challenge_id => {
                    Some(challenge.as_ref())
                }
                _ => None,
            })
    }

    /// Whether an answer passes: the checker, then the identity it carries
    /// against the inventory's claim.
    pub fn judge(
        &self,
        ch: &pb::WorkChallenge,
        answer: &pb::WorkAnswer,
        received_ms: i64,
    ) -> Result<(), String> {
        workproof::check(ch, answer, received_ms).map_err(|e| e.to_string())?;
        self.judge_identity(ch, answer)
    }

    /// The identity half of `judge`: the answer's NVML identity is the
    /// inventory's claim for that GPU.
    pub fn judge_identity(
        &self,
        ch: &pb::WorkChallenge,
        answer: &pb::WorkAnswer,
    ) -> Result<(), String> {
        let claim = self
            .entry(&ch.node_id, &ch.gpu_uuid)
            .map(|e| &e.claim)
            .ok_or("the GPU is no longer in the node's inventory")?;
        let got = answer.identity.clone().unwrap_or_default();
        let changed = identity::changes(claim, &got);
        if !changed.is_empty() {
            return Err(format!(
                "the answer's NVML identity differs from the inventory's: {}",
                changed.join(", ")
            ));
        }
        Ok(())
    }

    /// The verdict on the answer to challenge `challenge_id` (from `judge`).
    pub fn answered(
        &mut self,
        node_id: &str,
        answer: &pb::WorkAnswer,
        verdict: Result<(), String>,
        now_ms: i64,
    ) {
        let Some((uuid, e)) = self.gpus.get_mut(node_id).and_then(|gpus| {
            gpus.iter_mut().find(|(_, e)| {
                matches!(&e.state, State::Pending { challenge }
                    if challenge.challenge_id == answer.challenge_id)
            })
        }) else {
            return;
        };
        let key = (node_id.to_owned(), uuid.clone());
        match verdict {
            Ok(()) => {
                e.state = State::Passed { at_ms: now_ms };
                e.passed = answer.identity.clone();
                e.good = true;
                e.cc_report = answer.cc_report.clone();
                e.cc_status = answer.cc_status.clone();
            }
            Err(reason) => {
                e.state = State::Failed {
                    reason,
                    at_ms: now_ms,
                };
                e.good = false;
            }
        }
        self.changed.push(key);
    }

    /// Challenges past their deadline (and `grace` for the answer in
    /// transit) fail; returns them.
    pub fn expire(&mut self, now_ms: i64, grace: Duration) -> Vec<pb::WorkChallenge> {
        let mut out = Vec::new();
        for e in self.gpus.values_mut().flat_map(|g| g.values_mut()) {
            if let State::Pending { challenge } = &e.state {
                if now_ms > challenge.deadline_unix_ms + grace.as_millis() as i64 {
                    self.changed
                        .push((challenge.node_id.clone(), challenge.gpu_uuid.clone()));
                    out.push(challenge.as_ref().clone());
                    e.state = State::Failed {
                        reason: "no answer by the deadline".into(),
                        at_ms: now_ms,
                    };
                    e.good = false;
                }
            }
        }
        out
    }

    /// Whether the matcher may offer this GPU.
    pub fn matchable(&self, node_id: &str, uuid: &str) -> bool {
        self.entry(node_id, uuid).is_some_and(|e| e.good)
    }

    /// Whether a hire may take this GPU now: matchable and not being
    /// challenged (a renter's work beside the solver would slow both, and
    /// the node's time-lock would stop the solver as a stranger on a
    /// leased GPU).
    pub fn offerable(&self, node_id: &str, uuid: &str) -> bool {
        self.entry(node_id, uuid)
            .is_some_and(|e| e.good && !matches!(e.state, State::Pending { .. }))
    }

    /// A node's GPUs: (uuid, entry).
    pub fn entries<'a>(&'a self, node_id: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        self.gpus
            .get(node_id)
            .into_iter()
            .flat_map(|gpus| gpus.iter())
            .map(|(u, e)| (u.as_str(), e))
    }

    /// The stored form of the GPUs whose outcome changed since the last
    /// call (a pass, a failure, an expiry), to write.
    pub fn take_changed(&mut self) -> Vec<GpuWorkRow> {
        let keys = std::mem::take(&mut self.changed);
        keys.iter().filter_map(|(n, u)| self.stored(n, u)).collect()
    }

    /// A GPU's outcome as stored; None while it has none (unverified, or
    /// its first challenge out).
    pub fn stored(&self, node_id: &str, uuid: &str) -> Option<GpuWorkRow> {
        let e = self.entry(node_id, uuid)?;
        let (passed, at_ms, reason) = match &e.state {
            State::Passed { at_ms } => (true, *at_ms, String::new()),
            State::Failed { reason, at_ms } => (false, *at_ms, reason.clone()),
            State::Unverified { .. } | State::Pending { .. } => return None,
        };
        Some(GpuWorkRow {
            node_id: node_id.to_owned(),
            gpu_uuid: uuid.to_owned(),
            passed,
            at_ms,
            reason,
            identity: e.passed.clone(),
            cc_report: e.cc_report.clone(),
            cc_status: e.cc_status.clone(),
        })
    }

    /// Outcomes stored earlier (by this coordinator before a restart, or by
    /// another replica): a GPU that passed is matchable again while the
    /// inventory's identity is the one it passed with ([`Gate::inventory`]
    /// checks, as after a pass here). A GPU with a challenge out here keeps
    /// its standing: the answer decides.
    pub fn restore(&mut self, rows: &[GpuWorkRow]) {
        for r in rows {
            let known = self.entry(&r.node_id, &r.gpu_uuid);
            if known.is_some_and(|e| matches!(e.state, State::Pending { .. })) {
                continue;
            }
            let claim = known
                .map(|e| e.claim.clone())
                .or_else(|| r.identity.clone())
                .unwrap_or_default();
            let good = r.passed
                && r.identity
                    .as_ref()
                    .is_some_and(|p| identity::changes(p, &claim).is_empty());
            self.gpus.entry(r.node_id.clone()).or_default().insert(
                r.gpu_uuid.clone(),
                Entry {
                    state: if r.passed {
                        State::Passed { at_ms: r.at_ms }
                    } else {
                        State::Failed {
                            reason: r.reason.clone(),
                            at_ms: r.at_ms,
                        }
                    },
                    claim,
                    passed: r.identity.clone(),
                    good,
                    cc_report: r.cc_report.clone(),
                    cc_status: r.cc_status.clone(),
                },
            );
        }
    }

    pub fn entry(&self, node_id: &str, uuid: &str) -> Option<&Entry> {
        self.gpus.get(node_id)?.get(uuid)
    }

    fn entry_mut(&mut self, node_id: &str, uuid: &str) -> Option<&mut Entry> {
        self.gpus.get_mut(node_id)?.get_mut(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::workproof::contract::Input;

    const NODE: &str = "node-a";

    fn settings() -> Settings {
        Settings {
            interval: Duration::from_secs(3600),
            retry: Duration::from_secs(60),
            sizing: sizing::Policy {
                max_n: 64,
                target: Duration::ZERO,
                spot_tiles: 4,
                ..sizing::Policy::default()
            },
        }
    }

    fn gpu(serial: &str) -> pb::GpuInfo {
        pb::GpuInfo {
            uuid: "GPU-1".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            pci_bus_id: "00000000:01:00.0".into(),
            serial: serial.into(),
            ..Default::default()
        }
    }

    /// An honest answer from the CPU solver, with the identity NVML gives.
    fn solve(ch: &pb::WorkChallenge, id: &pb::GpuInfo) -> pb::WorkAnswer {
        let input = Input::of(ch).unwrap();
        pb::WorkAnswer {
            node_id: ch.node_id.clone(),
            challenge_id: ch.challenge_id.clone(),
            rounds: workproof::solve(&input.seed, &input.node_id, &input.params, 1).unwrap(),
            identity: Some(claim_of(id)),
            ..Default::default()
        }
    }

    fn issue(g: &mut Gate, now: i64, id: &str) -> pb::WorkChallenge {
        let due = g.due(now, &settings(), |_, _| true);
        assert_eq!(due.len(), 1, "{due:?}");
        let ch = Gate::challenge(&due[0], &settings(), now, [1; 32], [2; 32], id.into());
        g.issued(ch.clone());
        ch
    }

    fn answer(g: &mut Gate, ch: &pb::WorkChallenge, a: &pb::WorkAnswer, now: i64) {
        let pending = g.pending(NODE, &a.challenge_id).cloned().expect("pending");
        assert_eq!(&pending, ch);
        let verdict = g.judge(&pending, a, now);
        g.answered(NODE, a, verdict, now);
    }

    #[test]
    fn outcomes_are_stored_as_judged_and_a_restored_pass_stands_while_the_identity_holds() {
        let mut g = Gate::default();
        g.inventory(NODE, &[gpu("111")]);
        assert!(g.take_changed().is_empty(), "nothing judged yet");
        let ch = issue(&mut g, 1_000, "c1");
        assert!(g.take_changed().is_empty(), "a challenge out is no outcome");
        let mut a = solve(&ch, &gpu("111"));
        a.cc_report = vec![7; 4];
        a.cc_status = "ok".into();
        answer(&mut g, &ch, &a, 1_500);
        let rows = g.take_changed();
        assert_eq!(rows.len(), 1);
        let passed = rows[0].clone();
        assert!(passed.passed && passed.at_ms == 1_500 && passed.reason.is_empty());
        assert_eq!(passed.identity, Some(claim_of(&gpu("111"))));
        assert_eq!(
            (passed.cc_report.as_slice(), passed.cc_status.as_str()),
            (&[7u8; 4][..], "ok")
        );
        assert!(g.take_changed().is_empty(), "taken once");

        // A restarted coordinator: matchable again without a challenge,
        // and not due before the interval.
        let mut fresh = Gate::default();
        fresh.restore(std::slice::from_ref(&passed));
        fresh.inventory(NODE, &[gpu("111")]);
        assert!(fresh.offerable(NODE, "GPU-1"));
        assert!(fresh.due(2_000, &settings(), |_, _| true).is_empty());
        assert_eq!(fresh.entry(NODE, "GPU-1").unwrap().cc_status, "ok");
        // ... unless the board is not the one that passed.
        let mut swapped = Gate::default();
        swapped.restore(std::slice::from_ref(&passed));
        swapped.inventory(NODE, &[gpu("222")]);
        assert!(!swapped.matchable(NODE, "GPU-1"));
        assert_eq!(swapped.due(2_000, &settings(), |_, _| true).len(), 1);

        // A challenge that expires is stored as a failure, and restores as one.
        let ch2 = issue(&mut g, 1_500 + 3_600_000, "c2");
        let expired = g.expire(ch2.deadline_unix_ms + 10_000, Duration::from_secs(5));
        assert_eq!(expired.len(), 1);
        let rows = g.take_changed();
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].passed && rows[0].reason == "no answer by the deadline");
        assert_eq!(
            rows[0].identity,
            Some(claim_of(&gpu("111"))),
            "the last pass's identity is kept"
        );
        let mut after = Gate::default();
        after.restore(&rows);
        after.inventory(NODE, &[gpu("111")]);
        assert!(!after.matchable(NODE, "GPU-1"));

        // A challenge out here is not overwritten by what another replica stored.
        let ch3 = issue(&mut after, rows[0].at_ms + 60_000, "c3");
        after.restore(std::slice::from_ref(&passed));
        assert_eq!(after.pending(NODE, "c3"), Some(&ch3));
    }

    #[test]
    fn a_gpu_is_matchable_only_after_a_pass_and_again_after_its_identity_changes_and_passes() {
        let mut g = Gate::default();
        g.inventory(NODE, &[gpu("111")]);
        assert!(!g.matchable(NODE, "GPU-1"));
        let ch = issue(&mut g, 1_000, "c1");
        assert_eq!((ch.n, ch.rounds, ch.spot_tiles), (64, 1, 4));
        // One out per node: nothing else is due meanwhile.
        assert!(g.due(1_001, &settings(), |_, _| true).is_empty());
        answer(&mut g, &ch, &solve(&ch, &gpu("111")), 1_500);
        assert!(g.matchable(NODE, "GPU-1"));
        assert_eq!(
            g.entry(NODE, "GPU-1").unwrap().state,
            State::Passed { at_ms: 1_500 }
        );

        // The serial changes: out of matching, due again at once.
        g.inventory(NODE, &[gpu("222")]);
        assert!(!g.matchable(NODE, "GPU-1"));
        let why = match &g.entry(NODE, "GPU-1").unwrap().state {
            State::Unverified { why } => why.clone(),
            s => panic!("{s:?}"),
        };
        assert_eq!(why, "NVML identity changed: serial");
        let ch2 = issue(&mut g, 2_000, "c2");
        // An answer still carrying the old serial does not pass.
        let stale = solve(&ch2, &gpu("111"));
        answer(&mut g, &ch2, &stale, 2_500);
        assert!(!g.matchable(NODE, "GPU-1"));
        assert!(matches!(&g.entry(NODE, "GPU-1").unwrap().state,
            State::Failed { reason, .. } if reason.contains("serial")));
        // Retried after `retry`, passes on what it is now.
        assert!(g.due(2_500 + 59_999, &settings(), |_, _| true).is_empty());
        let ch3 = issue(&mut g, 2_500 + 60_000, "c3");
        answer(&mut g, &ch3, &solve(&ch3, &gpu("222")), 63_000);
        assert!(g.matchable(NODE, "GPU-1"));
    }

    #[test]
    fn a_late_or_missing_or_wrong_answer_takes_the_gpu_out() {
        let mut g = Gate::default();
        g.inventory(NODE, &[gpu("1")]);
        let ch = issue(&mut g, 0, "c1");
        answer(&mut g, &ch, &solve(&ch, &gpu("1")), 10);
        assert!(g.matchable(NODE, "GPU-1"));
        // The hourly one: still in good standing while it is out, but not
        // offered to a hire until it is answered.
        assert!(g.offerable(NODE, "GPU-1"));
        let ch = issue(&mut g, 3_600_010, "c2");
        assert!(g.matchable(NODE, "GPU-1"));
        assert!(!g.offerable(NODE, "GPU-1"));
        let late = ch.deadline_unix_ms + 1;
        answer(&mut g, &ch, &solve(&ch, &gpu("1")), late);
        assert!(!g.matchable(NODE, "GPU-1"));
        assert!(matches!(&g.entry(NODE, "GPU-1").unwrap().state,
            State::Failed { reason, .. } if reason.contains("after the deadline")));

        let ch = issue(&mut g, late + 60_000, "c3");
        answer(&mut g, &ch, &solve(&ch, &gpu("1")), late + 60_001);
        assert!(g.matchable(NODE, "GPU-1"));
        let ch = issue(&mut g, late + 60_001 + 3_600_000, "c4");
        let expired = g.expire(ch.deadline_unix_ms + 5_001, Duration::from_secs(5));
        assert_eq!(expired, vec![ch.clone()]);
        assert!(!g.matchable(NODE, "GPU-1"));

        // A tampered answer, and an answer to no pending challenge.
        let ch = issue(&mut g, ch.deadline_unix_ms + 70_000, "c5");
        let mut a = solve(&ch, &gpu("1"));
        a.rounds[0].openings[0].tile[0] ^= 1;
        answer(&mut g, &ch, &a, ch.issued_unix_ms + 1);
        assert!(!g.matchable(NODE, "GPU-1"));
        assert!(g.pending(NODE, "c5").is_none());
    }

    #[test]
    fn gpus_gone_from_the_inventory_are_forgotten() {
        let mut g = Gate::default();
        g.inventory(NODE, &[gpu("1")]);
        g.inventory(NODE, &[]);
        assert!(g.entry(NODE, "GPU-1").is_none());
        assert!(g.due(0, &settings(), |_, _| true).is_empty());
    }

    #[test]
    fn one_challenge_out_per_node_and_each_node_apart() {
        let mut g = Gate::default();
        let two = |node: &str| {
            [1, 2].map(|i| {
                let mut x = gpu(&format!("{node}{i}"));
                x.uuid = format!("GPU-{node}-{i}");
                x
            })
        };
        g.inventory("a", &two("a"));
        g.inventory("b", &two("b"));
        // One per node, the first uuid of each; an ineligible GPU is passed over.
        let due = g.due(0, &settings(), |n, u| !(n == "b" && u == "GPU-b-1"));
        let got: Vec<(&str, &str)> = due
            .iter()
            .map(|d| (d.node_id.as_str(), d.gpu.uuid.as_str()))
            .collect();
        assert_eq!(got, [("a", "GPU-a-1"), ("b", "GPU-b-2")]);
        // A challenge out on a holds back a's other GPU, not b's.
        let ch = Gate::challenge(&due[0], &settings(), 0, [1; 32], [2; 32], "c1".into());
        g.issued(ch);
        let due = g.due(0, &settings(), |_, _| true);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].node_id, "b");
        // An answer names its node: b cannot answer a's challenge.
        let a = pb::WorkAnswer {
            challenge_id: "c1".into(),
            ..Default::default()
        };
        assert!(g.pending("b", "c1").is_none());
        g.answered("b", &a, Ok(()), 1);
        assert!(!g.matchable("a", "GPU-a-1"));
        assert!(g.pending("a", "c1").is_some());
        // b's inventory shrinking leaves a's GPUs alone.
        g.inventory("b", &two("b")[..1]);
        assert_eq!(g.entries("a").count(), 2);
        assert_eq!(g.entries("b").count(), 1);
    }
}
