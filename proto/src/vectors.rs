//! Deterministic lease evidence: the facts of a lease (`Lease`), signed as
//! an honest node and coordinator would (`Lease::sign`), and the tampering
//! a node's owner could try afterwards (`Evidence`'s forger methods).
//!
//! The conformance vectors in `tests/vectors/` are made from it
//! (`cases()`), and so are the chain's unit tests and benchmark: fixed
//! seeds and times, and Ed25519 is deterministic, so the same code always
//! writes the same bytes.

use prost::Message;

use crate::{
    bundle::{Bundle, Trust},
    chain::{self, Chain, Head, Item, Params, Tally},
    dsse::{self, Signer},
    pb::{self, Envelope},
    types,
};

/// The lease of every vector.
pub const LEASE: &str = "l-0123456789abcdef";
/// T1 of every vector (2023-11-14T22:13:20Z).
pub const T1: i64 = 1_700_000_000_000;
/// The attestation epoch.
pub const EPOCH: i64 = 10_000;
/// The leased GPU.
pub const GPU: &str = "GPU-5a5a5a5a-0000-4000-8000-000000000001";
/// Seeds of the vectors' keys.
pub const NODE_SEED: [u8; 32] = [21; 32];
pub const COORDINATOR_SEED: [u8; 32] = [42; 32];

/// A challenge as the coordinator issues it (chained when signed).
#[derive(Debug, Clone)]
pub struct Issued {
    pub issued_unix_ms: i64,
    pub deadline_unix_ms: i64,
    pub nonce: Vec<u8>,
}

/// The facts of a lease, before anything is signed.
#[derive(Debug, Clone)]
pub struct Lease {
    pub lease_id: String,
    pub node_seed: [u8; 32],
    pub coordinator_seed: [u8; 32],
    pub t1: i64,
    pub t2: i64,
    pub gpus: Vec<String>,
    /// One per record; `lease_seq` and `prev_sha256` are set when signed.
    pub attestations: Vec<pb::Attestation>,
    pub start_ids: Vec<String>,
    /// How long after its window ended each record reached the coordinator.
    pub delays_ms: Vec<i64>,
    pub challenges: Vec<Issued>,
    /// The first lease seq (1 for an honest agent).
    pub first_seq: u64,
}

impl Lease {
    /// An honest lease of `epochs` windows of 10 s from T1, each fully
    /// sampled on `gpus` GPUs, received 500 ms after it ended, with a
    /// challenge issued in the second and the fifth window (when there
    /// are that many) and answered in the window it was issued in.
    pub fn honest(epochs: usize, gpus: usize) -> Lease {
        let gpus: Vec<String> = (0..gpus)
            .map(|g| {
                if g == 0 {
                    GPU.to_owned()
                } else {
                    format!("GPU-5a5a5a5a-0000-4000-8000-{:012x}", g + 1)
                }
            })
            .collect();
        let mut l = Lease {
            lease_id: LEASE.into(),
            node_seed: NODE_SEED,
            coordinator_seed: COORDINATOR_SEED,
            t1: T1,
            t2: T1 + epochs as i64 * EPOCH,
            attestations: (0..epochs).map(|i| window(LEASE, i, &gpus)).collect(),
            gpus,
            start_ids: vec!["start-1".into(); epochs],
            delays_ms: vec![500; epochs],
            challenges: Vec::new(),
            first_seq: 1,
        };
        for epoch in [1, 4].into_iter().filter(|&e| e < epochs) {
            l.challenge_in(epoch, 2_000);
        }
        l
    }

    /// A challenge issued `at_ms` into window `epoch`, due 30 s later,
    /// answered in that window.
    pub fn challenge_in(&mut self, epoch: usize, at_ms: i64) {
        let issued = self.t1 + epoch as i64 * EPOCH + at_ms;
        let nonce = format!("nonce-{}", self.challenges.len() + 1).into_bytes();
        self.attestations[epoch].challenges.push(nonce.clone());
        self.challenges.push(Issued {
            issued_unix_ms: issued,
            deadline_unix_ms: issued + 30_000,
            nonce,
        });
    }

    pub fn node(&self) -> Signer {
        Signer::from_seed(&self.node_seed)
    }

    pub fn coordinator(&self) -> Signer {
        Signer::from_seed(&self.coordinator_seed)
    }

    /// Signs everything as an honest node and coordinator would: the
    /// records linked, each countersigned on arrival, the challenges
    /// chained, the proof over the records, the verdict over all of it.
    pub fn sign(&self) -> Evidence {
        let node = self.node();
        let coord = self.coordinator();
        let mut head = Head::default();
        let mut records = Vec::new();
        let mut receipts = Vec::new();
        for (i, a) in self.attestations.iter().enumerate() {
            let mut a = a.clone();
            head.link(&mut a);
            if i == 0 {
                a.lease_seq = self.first_seq;
            }
            let seq = a.lease_seq;
            let end = a.window_end_unix_ms;
            let env = record(&node, 100 + 3 * i as u64, &self.start_ids[i], a);
            head.advance(seq, &env.payload);
            receipts.push(receipt(&coord, &node, &env, seq, end + self.delays_ms[i]));
            records.push(env);
        }
        let challenges = self.sign_challenges(&coord, &node);
        let proof = sign_proof(
            &node,
            &self.start_ids.last().cloned().unwrap_or_default(),
            chain::proof_for(&self.lease_id, self.t1, self.t2, &records),
        );
        let mut ev = Evidence {
            lease: self.clone(),
            records,
            receipts,
            proof: Some(proof),
            challenges,
            verdict: None,
        };
        ev.verdict = Some(ev.coordinator_verdict());
        ev
    }

    fn sign_challenges(&self, coord: &Signer, node: &Signer) -> Vec<Envelope> {
        let mut prev = [0u8; 32];
        self.challenges
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let env = coord.sign_message(
                    types::CHALLENGE,
                    &pb::Challenge {
                        node_id: node.key_id().into(),
                        lease_id: self.lease_id.clone(),
                        nonce: c.nonce.clone(),
                        issued_unix_ms: c.issued_unix_ms,
                        deadline_unix_ms: c.deadline_unix_ms,
                        index: i as u64 + 1,
                        prev_sha256: prev.to_vec(),
                    },
                );
                prev = dsse::payload_sha256(&env);
                env
            })
            .collect()
    }
}

/// Window `i` of a lease from T1: fully sampled, one sample a second.
fn window(lease_id: &str, i: usize, gpus: &[String]) -> pb::Attestation {
    pb::Attestation {
        lease_id: lease_id.into(),
        window_start_unix_ms: T1 + i as i64 * EPOCH,
        window_end_unix_ms: T1 + (i as i64 + 1) * EPOCH,
        sampled_ms: EPOCH,
        gpus: gpus
            .iter()
            .map(|uuid| pb::GpuWindow {
                uuid: uuid.clone(),
                samples: 10,
                util_min: 90,
                util_mean: 95.5,
                util_max: 99,
                memory_used_min_bytes: 40 << 30,
                memory_used_mean_bytes: 41e9,
                memory_used_max_bytes: 42 << 30,
            })
            .collect(),
        holders: gpus
            .iter()
            .map(|uuid| pb::HolderSeen {
                pid: 4242,
                exe: "/usr/bin/python3".into(),
                container: "c0ffee".repeat(10) + "c0ff",
                gpu: uuid.clone(),
                verdict: "lease-container".into(),
            })
            .collect(),
        ..Default::default()
    }
}

/// A node-signed Record holding attestation `a`.
pub fn record(node: &Signer, seq: u64, start_id: &str, a: pb::Attestation) -> Envelope {
    node.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: node.key_id().to_owned(),
            seq,
            time_unix_ms: a.window_end_unix_ms,
            start_id: start_id.into(),
            body: Some(pb::record::Body::Attestation(a)),
        },
    )
}

/// The coordinator's countersignature of a record received at `at`.
pub fn receipt(coord: &Signer, node: &Signer, env: &Envelope, lease_seq: u64, at: i64) -> Envelope {
    let rec = pb::Record::decode(env.payload.as_slice()).unwrap_or_default();
    let lease_id = match rec.body {
        Some(pb::record::Body::Attestation(a)) => a.lease_id,
        _ => String::new(),
    };
    coord.sign_message(
        types::RECEIPT,
        &pb::Receipt {
            node_id: node.key_id().to_owned(),
            seq: rec.seq,
            payload_sha256: dsse::payload_sha256(env).to_vec(),
            time_unix_ms: at,
            lease_id,
            lease_seq,
        },
    )
}

fn sign_proof(node: &Signer, start_id: &str, p: pb::LeaseProof) -> Envelope {
    let t2 = p.t2_unix_ms;
    node.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: node.key_id().into(),
            seq: 9_999,
            time_unix_ms: t2,
            start_id: start_id.into(),
            body: Some(pb::record::Body::LeaseProof(p)),
        },
    )
}

/// A lease's signed evidence, as the coordinator exports it, and what a
/// forger holding the node key could do to it.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub lease: Lease,
    pub records: Vec<Envelope>,
    pub receipts: Vec<Envelope>,
    pub proof: Option<Envelope>,
    pub challenges: Vec<Envelope>,
    pub verdict: Option<Envelope>,
}

impl Evidence {
    /// The proof changed by `f` and signed again with the node key (the
    /// node's owner can always do that).
    pub fn reprove_with(&mut self, f: impl FnOnce(&mut pb::LeaseProof)) {
        let mut p = pb::Record::decode(
            self.proof
                .as_ref()
                .map(|p| p.payload.as_slice())
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        if let Some(pb::record::Body::LeaseProof(pr)) = p.body.as_mut() {
            f(pr);
        }
        self.proof = Some(self.lease.node().sign_message(types::RECORD, &p));
    }

    /// The verdict the coordinator signs for this evidence.
    pub fn coordinator_verdict(&self) -> Envelope {
        let l = &self.lease;
        let (node, coord) = (l.node(), l.coordinator());
        let items = |v: &[Envelope]| v.iter().cloned().map(Ok).collect::<Vec<Item>>();
        let (records, receipts, challenges) = (
            items(&self.records),
            items(&self.receipts),
            items(&self.challenges),
        );
        let proof = self.proof.clone().map(Ok);
        let (nkey, ckey) = (node.verifying_key(), coord.verifying_key());
        let report = chain::judge(
            &Chain {
                lease_id: &l.lease_id,
                node_key: &nkey,
                coordinator_key: Some(&ckey),
                records: &records,
                receipts: &receipts,
                proof: proof.as_ref(),
                challenges: &challenges,
                verdict: None,
            },
            &Params::default(),
            &l.gpus,
        );
        let last = self.challenges.last().map(dsse::payload_sha256);
        coord.sign_message(
            types::VERDICT,
            &chain::verdict_for(&report, &l.gpus, last, l.t2 + 1_000),
        )
    }

    pub fn bundle(&self) -> Bundle {
        let l = &self.lease;
        let items = |v: &[Envelope]| v.iter().cloned().map(Ok).collect::<Vec<Item>>();
        Bundle {
            lease_id: l.lease_id.clone(),
            node_key: l.node().verifying_key(),
            coordinator_key: Some(l.coordinator().verifying_key()),
            records: items(&self.records),
            receipts: items(&self.receipts),
            proof: self.proof.clone().map(Ok),
            challenges: items(&self.challenges),
            verdict: self.verdict.clone().map(Ok),
        }
    }

    /// The attestation of record `i`.
    pub fn attestation(&self, i: usize) -> pb::Attestation {
        match pb::Record::decode(self.records[i].payload.as_slice())
            .ok()
            .and_then(|r| r.body)
        {
            Some(pb::record::Body::Attestation(a)) => a,
            _ => pb::Attestation::default(),
        }
    }

    /// Forger: changes record `i` with the node key, then re-links and
    /// re-signs every record after it so the chain reads as whole.
    pub fn rewrite(&mut self, i: usize, f: impl FnOnce(&mut pb::Attestation)) {
        let node = self.lease.node();
        let mut rec = pb::Record::decode(self.records[i].payload.as_slice()).unwrap_or_default();
        if let Some(pb::record::Body::Attestation(a)) = rec.body.as_mut() {
            f(a);
        }
        self.records[i] = node.sign_message(types::RECORD, &rec);
        self.relink_from(i + 1);
    }

    /// Forger: re-links and re-signs records `from..` after a change before them.
    pub fn relink_from(&mut self, from: usize) {
        let node = self.lease.node();
        for j in from..self.records.len() {
            let prev = dsse::payload_sha256(&self.records[j - 1]);
            let mut rec =
                pb::Record::decode(self.records[j].payload.as_slice()).unwrap_or_default();
            if let Some(pb::record::Body::Attestation(a)) = rec.body.as_mut() {
                a.lease_seq = self.attestation(j - 1).lease_seq + 1;
                a.prev_sha256 = prev.to_vec();
            }
            self.records[j] = node.sign_message(types::RECORD, &rec);
        }
    }

    /// Forger: inserts a record after record `i`, linked to it, and
    /// re-links the rest.
    pub fn insert_after(&mut self, i: usize, a: pb::Attestation) {
        let node = self.lease.node();
        let mut a = a;
        a.lease_seq = self.attestation(i).lease_seq + 1;
        a.prev_sha256 = dsse::payload_sha256(&self.records[i]).to_vec();
        let start = self.lease.start_ids[i].clone();
        self.records
            .insert(i + 1, record(&node, 700 + a.lease_seq, &start, a));
        self.relink_from(i + 2);
    }

    /// Forger: appends a record after the last, linked, signed by the node key.
    pub fn append(&mut self, a: pb::Attestation) {
        let node = self.lease.node();
        let last = self.records.len() - 1;
        let mut a = a;
        a.lease_seq = self.attestation(last).lease_seq + 1;
        a.prev_sha256 = dsse::payload_sha256(&self.records[last]).to_vec();
        let start = self.lease.start_ids.last().cloned().unwrap_or_default();
        self.records
            .push(record(&node, 500 + a.lease_seq, &start, a));
    }

    /// The coordinator's receipts for the records as they now are, as if
    /// they had arrived so (500 ms after their window; for an agent bug).
    pub fn recountersign(&mut self) {
        let (coord, node) = (self.lease.coordinator(), self.lease.node());
        self.receipts = self
            .records
            .iter()
            .filter_map(|env| {
                let a = pb::Record::decode(env.payload.as_slice()).ok()?;
                let Some(pb::record::Body::Attestation(a)) = a.body else {
                    return None;
                };
                Some(receipt(
                    &coord,
                    &node,
                    env,
                    a.lease_seq,
                    a.window_end_unix_ms + 500,
                ))
            })
            .collect();
    }

    /// Forger: re-signs a proof over the records as they now are.
    pub fn reprove(&mut self, t1: i64, t2: i64) {
        let node = self.lease.node();
        let start = self.lease.start_ids.last().cloned().unwrap_or_default();
        self.proof = Some(sign_proof(
            &node,
            &start,
            chain::proof_for(&self.lease.lease_id, t1, t2, &self.records),
        ));
    }

    /// Forger: the whole chain and proof re-signed with another node key.
    pub fn rekey(&mut self, seed: [u8; 32]) {
        self.lease.node_seed = seed;
        let node = self.lease.node();
        for j in 0..self.records.len() {
            let mut rec =
                pb::Record::decode(self.records[j].payload.as_slice()).unwrap_or_default();
            rec.node_id = node.key_id().into();
            self.records[j] = node.sign_message(types::RECORD, &rec);
            if j > 0 {
                self.relink_from(j);
            }
        }
        self.relink_from(1);
        let (t1, t2) = (self.lease.t1, self.lease.t2);
        self.reprove(t1, t2);
    }
}

/// The parameters of the vectors (a fixed clock for reproducible runs).
pub fn params() -> Params {
    Params {
        now_unix_ms: T1 + 3_600_000,
        ..Params::default()
    }
}

/// How a vector's verifier is set up: the keys it pins, its parameters.
#[derive(Debug, Clone)]
pub struct Setup {
    pub trust: Trust,
    pub params: Params,
}

/// One conformance vector.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub description: &'static str,
    pub bundle: serde_json::Value,
    pub setup: Setup,
    /// The rules that fail, as a sorted multiset (empty: the lease holds).
    pub expected: Vec<&'static str>,
}

fn pinned(ev: &Evidence) -> Setup {
    Setup {
        trust: Trust {
            coordinator_key: Some(ev.lease.coordinator().verifying_key()),
            node_key: None,
            self_asserted: false,
        },
        params: params(),
    }
}

fn case(
    name: &'static str,
    description: &'static str,
    ev: &Evidence,
    setup: Setup,
    expected: &[(&'static str, usize)],
) -> Case {
    case_json(name, description, ev.bundle().to_json(), setup, expected)
}

fn case_json(
    name: &'static str,
    description: &'static str,
    bundle: serde_json::Value,
    setup: Setup,
    expected: &[(&'static str, usize)],
) -> Case {
    let mut rules: Vec<&'static str> = expected
        .iter()
        .flat_map(|&(r, n)| std::iter::repeat_n(r, n))
        .collect();
    rules.sort();
    Case {
        name,
        description,
        bundle,
        setup,
        expected: rules,
    }
}

/// Every conformance vector: a valid lease, each tampering a node's owner
/// could try, and each rule broken alone.
pub fn cases() -> Vec<Case> {
    use crate::chain::rule::*;
    let mut out = Vec::new();
    let honest = Lease::honest(6, 1);
    let ev = honest.sign();

    out.push(case(
        "valid",
        "An honest lease of six 10 s windows, two challenges answered.",
        &ev,
        pinned(&ev),
        &[],
    ));

    // Receipts of records stored together, under one signature.
    let receipts: Vec<pb::Receipt> = ev
        .receipts
        .iter()
        .map(|e| pb::Receipt::decode(e.payload.as_slice()).expect("a receipt"))
        .collect();
    let set = |by: &Signer, receipts: Vec<pb::Receipt>| {
        by.sign_message(types::RECEIPTS, &pb::Receipts { receipts })
    };
    let mut e = honest.sign();
    e.receipts = vec![
        set(&honest.coordinator(), receipts[..4].to_vec()),
        set(&honest.coordinator(), receipts[4..].to_vec()),
    ];
    out.push(case(
        "valid-receipts-set",
        "As valid, the six receipts given as two Receipts (four entries and two), each under one coordinator signature, as a coordinator acknowledges records stored together.",
        &e,
        pinned(&e),
        &[],
    ));
    let mut other = receipts.clone();
    other[5].lease_id = "l-other".into();
    e.receipts = vec![set(&honest.coordinator(), other)];
    out.push(case(
        "bad-receipts-set-entry",
        "One Receipts for the six windows whose sixth entry names another lease: that entry is a bad countersignature and window 6 is not countersigned (coverage 5 of 6, below the verdict's); the other five count.",
        &e,
        pinned(&e),
        &[
            (BAD_COUNTERSIGNATURE, 1),
            (MISSING_COUNTERSIGNATURE, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 1),
        ],
    ));

    let mut l = honest.clone();
    l.start_ids[3..]
        .iter_mut()
        .for_each(|s| *s = "start-2".into());
    l.delays_ms[2] = 90_000;
    l.delays_ms[3] = 80_000;
    let e = l.sign();
    out.push(case(
        "valid-restart-and-outage",
        "The agent restarted before window 4 (a new start id) and the coordinator was unreachable for about 90 s: windows 3 and 4 arrived late, within the 120 s bound.",
        &e,
        pinned(&e),
        &[],
    ));

    let mut l = honest.clone();
    l.delays_ms[2] = 150_000;
    l.delays_ms[3] = 140_000;
    let e = l.sign();
    out.push(case(
        "late-beyond-bound",
        "Windows 3 and 4 were countersigned more than 120 s after they ended: they prove nothing live and count as not covered (4 of 6 windows).",
        &e,
        pinned(&e),
        &[(LOW_COVERAGE, 1)],
    ));

    let mut s = pinned(&ev);
    s.trust.coordinator_key = None;
    out.push(case(
        "untrusted",
        "No coordinator key is pinned: the bundle's own keys cannot make a lease hold.",
        &ev,
        s.clone(),
        &[(UNTRUSTED, 1)],
    ));
    s.trust.self_asserted = true;
    out.push(case(
        "self-asserted",
        "No key pinned, and the verifier explicitly accepts the bundle's keys (reported as self-asserted).",
        &ev,
        s,
        &[],
    ));

    let mut e = ev.clone();
    e.receipts.clear();
    e.challenges.clear();
    e.verdict = None;
    let mut b = e.bundle().to_json();
    b["coordinator_public_key"] = serde_json::Value::Null;
    out.push(case_json(
        "node-material-only",
        "Everything the coordinator signed is removed (receipts, challenges, verdict, its key): node-signed material alone never holds.",
        b,
        pinned(&ev),
        &[(NO_VERDICT, 1), (MISSING_COUNTERSIGNATURE, 6), (LOW_COVERAGE, 1)],
    ));

    // A kill in window 5, cut away afterwards.
    let mut l = honest.clone();
    l.attestations[4].holders.push(pb::HolderSeen {
        pid: 31337,
        exe: "/usr/bin/miner".into(),
        gpu: GPU.into(),
        verdict: "foreign".into(),
        ..Default::default()
    });
    l.attestations[4].enforcement.push(pb::EnforcementEvent {
        pid: 31337,
        exe: "/usr/bin/miner".into(),
        gpu: GPU.into(),
        action: "kill".into(),
        outcome: "exited after SIGTERM".into(),
        detected_unix_ms: T1 + 41_000,
        sigterm_unix_ms: T1 + 41_001,
        done_unix_ms: T1 + 41_200,
        ..Default::default()
    });
    let killed = l.sign();
    out.push(case(
        "valid-with-kill",
        "An honest lease in which a foreign process was found and killed in window 5.",
        &killed,
        pinned(&killed),
        &[],
    ));
    let mut e = killed.clone();
    e.records.truncate(4);
    e.receipts.truncate(4);
    e.reprove(T1, T1 + 4 * EPOCH);
    out.push(case(
        "cut-before-kill",
        "The node's owner cut the chain before the kill and re-signed a proof ending at 40 s: the verdict's T2, last seq and head disagree.",
        &e,
        pinned(&e),
        &[(VERDICT_MISMATCH, 3)],
    ));
    let mut e = killed.clone();
    e.records.truncate(4);
    e.receipts.truncate(4);
    e.reprove(T1, T1 + 6 * EPOCH);
    out.push(case(
        "cut-keep-t2",
        "The chain cut before the kill, the proof re-signed with the same T2: 4 of 6 windows remain.",
        &e,
        pinned(&e),
        &[(LOW_COVERAGE, 1), (VERDICT_MISMATCH, 3)],
    ));

    let mut l = honest.clone();
    l.attestations[2].sampled_ms = 8_000;
    let partial = l.sign();
    let mut e = partial.clone();
    e.rewrite(2, |a| a.sampled_ms = EPOCH);
    e.reprove(T1, T1 + 6 * EPOCH);
    out.push(case(
        "invented-samples",
        "Window 3 was sampled for 8 s; the owner re-signed it claiming 10 s and re-linked the rest: none of the rewritten records was countersigned.",
        &e,
        pinned(&e),
        &[
            (MISSING_COUNTERSIGNATURE, 4),
            (MISSING_CHALLENGE, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 2),
        ],
    ));

    let mut e = ev.clone();
    for i in 6..9 {
        e.append(window(LEASE, i, &honest.gpus));
    }
    e.reprove(T1, T1 + 9 * EPOCH);
    out.push(case(
        "after-t2",
        "Three windows invented past T2 and the proof re-signed to end 30 s later.",
        &e,
        pinned(&e),
        &[
            (MISSING_COUNTERSIGNATURE, 3),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 4),
        ],
    ));

    // A gap: the agent was down during window 4.
    let mut l = honest.clone();
    l.attestations.remove(3);
    l.start_ids.remove(3);
    l.delays_ms.remove(3);
    let gap = l.sign();
    let mut loose = pinned(&gap);
    loose.params.min_coverage = 0.8;
    out.push(case(
        "valid-with-gap",
        "The agent was down for window 4: a gap in the windows (not in the seqs), coverage 50 of 60 s, judged with min_coverage 0.8.",
        &gap,
        loose.clone(),
        &[],
    ));
    let mut e = gap.clone();
    e.insert_after(2, window(LEASE, 3, &honest.gpus));
    e.reprove(T1, T1 + 6 * EPOCH);
    out.push(case(
        "hidden-gap",
        "The owner filled the gap with an invented window and re-linked the rest.",
        &e,
        loose,
        &[
            (MISSING_COUNTERSIGNATURE, 3),
            (MISSING_CHALLENGE, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 3),
        ],
    ));

    let mut e = ev.clone();
    e.challenges.remove(0);
    out.push(case(
        "challenge-dropped",
        "The first challenge's envelope is removed from the bundle.",
        &e,
        pinned(&e),
        &[(BROKEN_CHALLENGE_CHAIN, 2)],
    ));
    let mut e = ev.clone();
    e.challenges.remove(0);
    e.rewrite(1, |a| a.challenges.clear());
    e.reprove(T1, T1 + 6 * EPOCH);
    out.push(case(
        "challenge-and-answer-dropped",
        "The first challenge and its answer are removed, window 2 re-signed and the chain re-linked.",
        &e,
        pinned(&e),
        &[
            (MISSING_COUNTERSIGNATURE, 5),
            (BROKEN_CHALLENGE_CHAIN, 2),
            (MISSING_CHALLENGE, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 2),
        ],
    ));

    let mut e = ev.clone();
    e.rekey([77; 32]);
    out.push(case(
        "rekeyed",
        "Every record and the proof re-signed with a new node key, and the bundle's node key replaced.",
        &e,
        pinned(&e),
        &[
            (BAD_COUNTERSIGNATURE, 6),
            (MISSING_COUNTERSIGNATURE, 6),
            (BAD_CHALLENGE, 2),
            (BROKEN_CHALLENGE_CHAIN, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 3),
        ],
    ));

    let mut other = honest.clone();
    other.lease_id = "l-fedcba9876543210".into();
    for a in &mut other.attestations {
        a.lease_id = other.lease_id.clone();
    }
    let mut e = ev.clone();
    e.verdict = other.sign().verdict;
    out.push(case(
        "foreign-verdict",
        "The verdict of another lease of the same node, same shape.",
        &e,
        pinned(&e),
        &[(VERDICT_MISMATCH, 2), (BROKEN_CHALLENGE_CHAIN, 1)],
    ));

    // The bugs of the first outside review, each alone.
    let mut e = ev.clone();
    e.records[0].signatures[0].sig[0] ^= 1;
    let mut loose = pinned(&e);
    loose.params.min_coverage = 0.5;
    out.push(case(
        "unreadable-first-record",
        "Record 1's signature is broken: it fails alone, keeps its place (no false gap or break), and proves nothing (coverage, the proof's first seq).",
        &e,
        loose.clone(),
        &[(BAD_SIGNATURE, 1), (PROOF_MISMATCH, 2), (VERDICT_MISMATCH, 1)],
    ));
    let mut e = ev.clone();
    e.records.insert(3, e.records[2].clone());
    out.push(case(
        "duplicate-record",
        "Record 3 appears twice: one seq-repeat, nothing after it.",
        &e,
        pinned(&e),
        &[(SEQ_REPEAT, 1)],
    ));
    let mut e = ev.clone();
    e.records.swap(2, 3);
    out.push(case(
        "reordered-records",
        "Records 3 and 4 swapped in the bundle: the chain is placed by lease seq, so it still holds.",
        &e,
        pinned(&e),
        &[],
    ));
    let mut l = honest.clone();
    l.first_seq = 0;
    let e = l.sign();
    out.push(case(
        "first-seq-zero",
        "An agent that numbered the chain from 0 (all else consistent): one seq-gap.",
        &e,
        pinned(&e),
        &[(SEQ_GAP, 1)],
    ));
    let mut b = ev.bundle().to_json();
    b["records"][3]
        .as_object_mut()
        .expect("an envelope")
        .remove("payload");
    out.push(case_json(
        "malformed-envelope",
        "Record 4's JSON has no payload: a rule failure at its place, not an unreadable bundle.",
        b,
        loose.clone(),
        &[
            (BAD_PAYLOAD, 1),
            (SEQ_GAP, 1),
            (PROOF_MISMATCH, 1),
            (VERDICT_MISMATCH, 1),
        ],
    ));
    let mut b = ev.bundle().to_json();
    let text = b["records"][1]["payload"]
        .as_str()
        .expect("base64")
        .to_owned();
    b["records"][1]["payload"] = non_canonical(&text).into();
    out.push(case_json(
        "non-canonical-base64",
        "Record 2's payload is base64 whose last character has unused bits set: decoded to the same bytes, accepted.",
        b,
        pinned(&ev),
        &[],
    ));
    let e = Lease::honest(6, 0).sign();
    out.push(case(
        "gpu-less-lease",
        "A lease without GPUs: covered by the agent's scan cycles, no GPU windows.",
        &e,
        pinned(&e),
        &[],
    ));

    // Each rule alone, as a node or coordinator bug would produce it (all
    // countersigned and judged: the rule is the only thing wrong).
    let mut l = honest.clone();
    l.attestations[2].blind = vec!["/proc scan failed: permission denied".into()];
    let e = l.sign();
    out.push(case(
        "blind-window",
        "The agent could not scan /proc in window 3 and said so: the window counts as not covered.",
        &e,
        pinned(&e),
        &[(LOW_COVERAGE, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[2].holders[0].verdict = "friendly".into();
    let e = l.sign();
    out.push(case(
        "bad-payload-holder-verdict",
        "A holder verdict outside the four named.",
        &e,
        pinned(&e),
        &[(BAD_PAYLOAD, 1)],
    ));
    // Windows guarded at the open, two of them with denied opens.
    let mut guarded = honest.clone();
    for a in &mut guarded.attestations {
        a.guard = "open".into();
    }
    guarded.attestations[1].prevented = vec![pb::PreventedOpen {
        pid: 4242,
        exe: "/usr/bin/python3".into(),
        gpu: guarded.gpus[0].clone(),
        device: "/dev/nvidia0".into(),
        attempts: 3,
        first_unix_ms: guarded.attestations[1].window_start_unix_ms + 100,
        last_unix_ms: guarded.attestations[1].window_start_unix_ms + 900,
        ..Default::default()
    }];
    guarded.attestations[4].prevented_more = 2;
    guarded.attestations[5].guard = "scan".into();
    guarded.attestations[5].unguarded = "fanotify is unavailable: Operation not permitted".into();
    let e = guarded.sign();
    out.push(case(
        "valid-prevented",
        "As valid, five windows guarded at the open and the last one by scan; window 2 lists three opens denied to one process, window 5 counts two more beyond its entries: the proof says 5 prevented.",
        &e,
        pinned(&e),
        &[],
    ));
    let mut e = guarded.sign();
    e.reprove_with(|pr| pr.prevented = 0);
    out.push(case(
        "proof-hides-prevented",
        "As valid-prevented, but the proof says no open was prevented.",
        &e,
        pinned(&e),
        &[(PROOF_MISMATCH, 1)],
    ));
    let mut l = guarded.clone();
    l.attestations[2].guard = "none".into();
    l.attestations[3].prevented = vec![pb::PreventedOpen {
        pid: 7,
        attempts: 0,
        ..Default::default()
    }];
    let e = l.sign();
    out.push(case(
        "bad-payload-guard",
        "A guard outside \"open\" and \"scan\" in window 3, and a prevented open of 0 attempts in window 4.",
        &e,
        pinned(&e),
        &[(BAD_PAYLOAD, 2)],
    ));
    let mut l = honest.clone();
    l.attestations[2].sampled_ms = EPOCH + 1;
    let e = l.sign();
    out.push(case(
        "bad-payload-sampled",
        "sampled_ms beyond its window.",
        &e,
        pinned(&e),
        &[(BAD_PAYLOAD, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[2]
        .gpus
        .push(window(LEASE, 2, &["GPU-not-leased".to_owned()]).gpus[0].clone());
    let e = l.sign();
    out.push(case(
        "wrong-gpus",
        "Window 3 reports a GPU the lease does not have.",
        &e,
        pinned(&e),
        &[(WRONG_GPUS, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[2].window_start_unix_ms -= 1_000;
    let e = l.sign();
    out.push(case(
        "window-overlap",
        "Window 3 starts before window 2 ended.",
        &e,
        pinned(&e),
        &[(WINDOW_OVERLAP, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[2].window_end_unix_ms = l.attestations[2].window_start_unix_ms;
    l.attestations[2].sampled_ms = 0;
    let e = l.sign();
    let mut loose = pinned(&e);
    loose.params.min_coverage = 0.5;
    out.push(case(
        "window-backward",
        "Window 3 ends where it starts.",
        &e,
        loose,
        &[(WINDOW_BACKWARD, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[5].window_end_unix_ms += 10_000;
    let e = l.sign();
    out.push(case(
        "window-outside-lease",
        "The last window ends 10 s after T2 (skew 5 s).",
        &e,
        pinned(&e),
        &[(WINDOW_OUTSIDE, 1)],
    ));
    let mut s = pinned(&ev);
    s.params.now_unix_ms = T1 + 35_000;
    out.push(case("window-future", "The verifier's clock reads 35 s into the lease: windows 5 and 6 end in its future beyond the skew.", &ev, s, &[(WINDOW_FUTURE, 2)]));
    let mut e = ev.clone();
    let other_node = Signer::from_seed(&[5; 32]);
    e.records[2] = other_node.sign(types::RECORD, e.records[2].payload.clone());
    let mut loose = pinned(&e);
    loose.params.min_coverage = 0.5;
    out.push(case(
        "wrong-key",
        "Record 3 is signed by another key.",
        &e,
        loose.clone(),
        &[(WRONG_KEY, 1), (PROOF_MISMATCH, 1), (VERDICT_MISMATCH, 1)],
    ));
    let mut e = ev.clone();
    let mut rec = pb::Record::decode(e.records[2].payload.as_slice()).unwrap_or_default();
    rec.node_id = "0".repeat(32);
    e.records[2] = e.lease.node().sign_message(types::RECORD, &rec);
    out.push(case(
        "wrong-node",
        "Record 3 names another node id (re-signed, so its countersignature no longer matches either).",
        &e,
        loose.clone(),
        &[(WRONG_NODE, 1), (BROKEN_LINK, 1), (PROOF_MISMATCH, 1), (VERDICT_MISMATCH, 1)],
    ));
    let mut e = ev.clone();
    e.rewrite(2, |a| a.lease_id = "l-other".into());
    out.push(case(
        "wrong-lease",
        "Record 3 names another lease (forged and re-linked).",
        &e,
        loose.clone(),
        &[
            (WRONG_LEASE, 1),
            (MISSING_COUNTERSIGNATURE, 3),
            (MISSING_CHALLENGE, 1),
            (PROOF_MISMATCH, 2),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 2),
        ],
    ));
    let mut e = ev.clone();
    e.records.remove(2);
    out.push(case(
        "seq-gap",
        "Record 3 is missing.",
        &e,
        loose.clone(),
        &[(SEQ_GAP, 1), (PROOF_MISMATCH, 1), (VERDICT_MISMATCH, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[3].prev_sha256 = vec![1; 32];
    let mut e = l.sign();
    e.rewrite(3, |a| a.prev_sha256 = vec![1; 32]);
    e.receipts[3..].iter_mut().zip(3..).for_each(|(r, i)| {
        *r = receipt(
            &e.lease.coordinator(),
            &e.lease.node(),
            &e.records[i],
            i as u64 + 1,
            T1 + (i as i64 + 1) * EPOCH + 500,
        )
    });
    e.reprove(T1, T1 + 6 * EPOCH);
    e.verdict = Some(e.coordinator_verdict());
    out.push(case(
        "broken-link",
        "Record 4 links to a digest that is no record's (an agent bug, countersigned as received).",
        &e,
        pinned(&e),
        &[(BROKEN_LINK, 1)],
    ));
    let mut e = ev.clone();
    e.receipts[4] = e
        .lease
        .node()
        .sign(types::RECEIPT, e.receipts[4].payload.clone());
    out.push(case(
        "bad-countersignature",
        "Receipt 5 is signed by the node instead of the coordinator.",
        &e,
        pinned(&e),
        &[
            (BAD_COUNTERSIGNATURE, 1),
            (MISSING_COUNTERSIGNATURE, 1),
            (MISSING_CHALLENGE, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 1),
        ],
    ));
    let mut e = ev.clone();
    e.challenges[1] = e
        .lease
        .node()
        .sign(types::CHALLENGE, e.challenges[1].payload.clone());
    out.push(case(
        "bad-challenge",
        "Challenge 2 is signed by the node instead of the coordinator.",
        &e,
        pinned(&e),
        &[(BAD_CHALLENGE, 1), (BROKEN_CHALLENGE_CHAIN, 1)],
    ));
    let mut l = honest.clone();
    l.attestations[4].challenges.clear();
    let e = l.sign();
    out.push(case(
        "missing-challenge",
        "Challenge 2 was never answered.",
        &e,
        pinned(&e),
        &[(MISSING_CHALLENGE, 1)],
    ));
    let mut l = honest.clone();
    let late = l.attestations[4].challenges.remove(0);
    l.attestations[5].challenges.push(late);
    l.delays_ms[5] = 40_000;
    let e = l.sign();
    out.push(case(
        "challenge-answered-late",
        "Challenge 2's answer is in window 6, which ends before the deadline, but reached the coordinator after it.",
        &e,
        pinned(&e),
        &[(MISSING_CHALLENGE, 1)],
    ));
    let mut e = ev.clone();
    e.records.clear();
    e.receipts.clear();
    out.push(case(
        "empty-chain",
        "No attestation at all (the coordinator's verdict still names the chain it had).",
        &e,
        pinned(&e),
        &[(EMPTY_CHAIN, 1), (PROOF_MISMATCH, 4), (VERDICT_MISMATCH, 3)],
    ));
    let mut e = ev.clone();
    e.proof = None;
    out.push(case(
        "no-proof",
        "The lease's proof is missing.",
        &e,
        pinned(&e),
        &[(NO_PROOF, 1)],
    ));
    let mut e = ev.clone();
    e.reprove_with(|pr| pr.kills = 1);
    out.push(case(
        "proof-mismatch",
        "The proof claims a kill the chain does not hold.",
        &e,
        pinned(&e),
        &[(PROOF_MISMATCH, 1)],
    ));
    let mut e = ev.clone();
    e.verdict = e
        .verdict
        .map(|v| e.lease.node().sign(types::VERDICT, v.payload));
    out.push(case(
        "bad-verdict",
        "The verdict is signed by the node, not the coordinator.",
        &e,
        pinned(&e),
        &[(BAD_VERDICT, 1)],
    ));
    let mut e = ev.clone();
    e.verdict = None;
    out.push(case(
        "no-verdict",
        "The coordinator has not judged the lease yet.",
        &e,
        pinned(&e),
        &[(NO_VERDICT, 1)],
    ));
    out.extend(edge_cases(&honest, &ev));
    out
}

/// Paths of the spec that the tampering above does not reach: each
/// failure path of the proof, placement by link, forks, malformed
/// coordinator items, the challenges' own chain, a pinned node key.
fn edge_cases(honest: &Lease, ev: &Evidence) -> Vec<Case> {
    use crate::chain::rule::*;
    let mut out = Vec::new();
    let mut loose = pinned(ev);
    loose.params.min_coverage = 0.5;

    let mut s = pinned(ev);
    s.trust.node_key = Some(Signer::from_seed(&[66; 32]).verifying_key());
    out.push(case(
        "pinned-node-key-mismatch",
        "The verifier pins another node key than the bundle's: that key is used, so nothing the node signed verifies and nothing the coordinator signed names it.",
        ev,
        s,
        &[
            (WRONG_KEY, 8),
            (EMPTY_CHAIN, 1),
            (BAD_COUNTERSIGNATURE, 6),
            (BAD_CHALLENGE, 2),
            (BROKEN_CHALLENGE_CHAIN, 1),
            (VERDICT_MISMATCH, 2),
        ],
    ));

    // An agent that put a telemetry body where attestation 3 belongs, linked
    // and countersigned as received: placed by the link, one failure.
    let mut e = ev.clone();
    let node = e.lease.node();
    e.records[2] = node.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: node.key_id().into(),
            seq: 106,
            time_unix_ms: T1 + 3 * EPOCH,
            start_id: "start-1".into(),
            body: Some(pb::record::Body::Telemetry(pb::Telemetry::default())),
        },
    );
    let mut next = pb::Record::decode(e.records[3].payload.as_slice()).unwrap_or_default();
    if let Some(pb::record::Body::Attestation(a)) = next.body.as_mut() {
        a.prev_sha256 = dsse::payload_sha256(&e.records[2]).to_vec();
    }
    e.records[3] = node.sign_message(types::RECORD, &next);
    e.relink_from(4);
    e.recountersign();
    e.reprove(T1, T1 + 6 * EPOCH);
    e.verdict = Some(e.coordinator_verdict());
    out.push(case(
        "not-an-attestation-linked",
        "Record 3 is a telemetry record that record 4 links to (an agent bug, countersigned as received): it fails once, keeps its place, and adds no coverage.",
        &e,
        loose.clone(),
        &[(BAD_PAYLOAD, 1)],
    ));

    let mut e = ev.clone();
    let mut fork = e.attestation(2);
    fork.sampled_ms = 1_000;
    let start = e.lease.start_ids[2].clone();
    e.records
        .insert(3, record(&e.lease.node(), 777, &start, fork));
    out.push(case(
        "seq-fork",
        "A second, different record claims lease seq 3 after the first: one seq-repeat; the first one stands.",
        &e,
        pinned(&e),
        &[(SEQ_REPEAT, 1)],
    ));

    let mut e = ev.clone();
    e.records.drain(..2);
    e.receipts.drain(..2);
    out.push(case(
        "first-records-missing",
        "Records 1 and 2 are missing: one seq-gap for 1..2; the first challenge, issued in a window no longer there, counts as in a gap.",
        &e,
        loose.clone(),
        &[(SEQ_GAP, 1), (PROOF_MISMATCH, 2), (VERDICT_MISMATCH, 1)],
    ));

    let mut b = ev.bundle().to_json();
    b["verdict"] = serde_json::json!({"payloadType": types::VERDICT});
    out.push(case_json(
        "malformed-verdict",
        "The verdict's JSON is not an envelope.",
        b,
        pinned(ev),
        &[(BAD_VERDICT, 1)],
    ));
    let mut b = ev.bundle().to_json();
    b["receipts"][2]
        .as_object_mut()
        .expect("an envelope")
        .remove("signatures");
    out.push(case_json(
        "malformed-receipt",
        "Receipt 3's JSON has no signatures: record 3 is then not countersigned.",
        b,
        pinned(ev),
        &[
            (BAD_COUNTERSIGNATURE, 1),
            (MISSING_COUNTERSIGNATURE, 1),
            (LOW_COVERAGE, 1),
            (VERDICT_MISMATCH, 1),
        ],
    ));
    let mut b = ev.bundle().to_json();
    b["challenges"][1]["payload"] = "not base64!".into();
    out.push(case_json(
        "malformed-challenge",
        "Challenge 2's payload is not base64.",
        b,
        pinned(ev),
        &[(BAD_CHALLENGE, 1), (BROKEN_CHALLENGE_CHAIN, 1)],
    ));

    let mut e = ev.clone();
    e.proof = Some(e.records[0].clone());
    out.push(case(
        "proof-not-a-proof",
        "The proof envelope holds an attestation: the span comes from the verdict.",
        &e,
        pinned(&e),
        &[(BAD_PAYLOAD, 1)],
    ));
    let mut e = ev.clone();
    e.proof = e
        .proof
        .map(|p| Signer::from_seed(&[5; 32]).sign(types::RECORD, p.payload));
    out.push(case(
        "proof-wrong-key",
        "The proof is signed by another key.",
        &e,
        pinned(&e),
        &[(WRONG_KEY, 1)],
    ));

    let coord = honest.coordinator();
    let rechallenge = |e: &mut Evidence, f: &dyn Fn(&mut pb::Challenge)| {
        let mut ch = pb::Challenge::decode(e.challenges[1].payload.as_slice()).unwrap_or_default();
        f(&mut ch);
        e.challenges[1] = coord.sign_message(types::CHALLENGE, &ch);
    };
    let mut e = ev.clone();
    rechallenge(&mut e, &|c| {
        c.index = 1;
        c.prev_sha256 = vec![0; 32];
    });
    out.push(case(
        "challenge-duplicate-index",
        "Two challenges both numbered 1 (a coordinator bug): the chain says so, and its last digest is not the verdict's.",
        &e,
        pinned(&e),
        &[(BROKEN_CHALLENGE_CHAIN, 2)],
    ));
    let mut e = ev.clone();
    rechallenge(&mut e, &|c| c.prev_sha256 = vec![0; 32]);
    out.push(case(
        "challenge-prev-mismatch",
        "Challenge 2 does not name challenge 1's digest.",
        &e,
        pinned(&e),
        &[(BROKEN_CHALLENGE_CHAIN, 2)],
    ));
    out
}

/// `text` with the unused low bits of its last base64 character set.
fn non_canonical(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let body = text.trim_end_matches('=');
    let pad = text.len() - body.len();
    let unused = match pad {
        1 => 0b11,
        2 => 0b1111,
        _ => return text.to_owned(),
    };
    let mut bytes = body.as_bytes().to_vec();
    let last = bytes.last_mut().expect("non-empty");
    let v = ALPHABET.iter().position(|c| c == last).expect("base64");
    *last = ALPHABET[v | unused];
    String::from_utf8(bytes).expect("ascii") + &"=".repeat(pad)
}

impl Case {
    /// The vector as its file holds it.
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.setup.trust;
        let p = &self.setup.params;
        serde_json::json!({
            "name": self.name,
            "description": self.description,
            "trust": {
                "coordinator_public_key": t.coordinator_key.as_ref().map(|k| k.to_base64()),
                "node_public_key": t.node_key.as_ref().map(|k| k.to_base64()),
                "self_asserted": t.self_asserted,
            },
            "params": {
                "now_unix_ms": p.now_unix_ms,
                "max_skew_ms": p.max_skew_ms,
                "min_coverage": p.min_coverage,
                "max_delay_ms": p.max_delay_ms,
            },
            "expected": {
                "holds": self.expected.is_empty(),
                "failures": self.expected,
            },
            "bundle": self.bundle,
        })
    }
}

/// A `Tally` over records, for tests that build proofs by hand.
pub fn tally(records: &[Envelope]) -> Tally {
    let mut t = Tally::default();
    for env in records {
        if let Ok(rec) = pb::Record::decode(env.payload.as_slice()) {
            if let Some(pb::record::Body::Attestation(a)) = &rec.body {
                t.add(&rec, a, dsse::payload_sha256(env));
            }
        }
    }
    t
}

/// Lease `n` of a cluster (id `l-` and `n` in 16 hex digits) on the node of
/// seed `[node_seed; 32]`: an honest lease of 6 windows on one GPU, signed
/// by the vectors' coordinator.
pub fn cluster_lease(n: u8, node_seed: u8) -> Evidence {
    let mut l = Lease::honest(6, 1);
    let id = format!("l-{n:016x}");
    l.lease_id = id.clone();
    l.node_seed = [node_seed; 32];
    for a in &mut l.attestations {
        a.lease_id = id.clone();
    }
    l.sign()
}

/// The cluster record's entry for a lease, as the coordinator makes it.
pub fn cluster_entry(ev: &Evidence) -> pb::ClusterLease {
    let node = ev.lease.node();
    pb::ClusterLease {
        lease_id: ev.lease.lease_id.clone(),
        node_id: node.key_id().to_owned(),
        node_public_key: node.public_key().to_vec(),
        gpu_uuids: ev.lease.gpus.clone(),
        mesh_address: "10.90.0.2/24".into(),
        joined_unix_ms: ev.lease.t1,
        left_unix_ms: ev.lease.t2,
        left_reason: "cluster-ended".into(),
    }
}

/// Cluster `c1`'s record listing `leases`, signed by `coord`.
pub fn cluster_record(coord: &Signer, leases: Vec<pb::ClusterLease>) -> Envelope {
    coord.sign_message(
        types::CLUSTER_RECORD,
        &pb::ClusterRecord {
            cluster_id: "c1".into(),
            coordinator_key_id: coord.key_id().to_owned(),
            coordinator_public_key: coord.public_key().to_vec(),
            leases,
            phase: "ended".into(),
            created_unix_ms: T1 - 1_000,
            ended_unix_ms: T1 + 6 * EPOCH,
            ..Default::default()
        },
    )
}

/// An exported cluster of `n` leases, each on a node of its own: the
/// record and the bundles.
pub fn cluster_set(n: u8) -> (Envelope, Vec<Bundle>) {
    let leases: Vec<Evidence> = (1..=n).map(|i| cluster_lease(i, i)).collect();
    let coord = Signer::from_seed(&COORDINATOR_SEED);
    let record = cluster_record(&coord, leases.iter().map(cluster_entry).collect());
    (record, leases.iter().map(Evidence::bundle).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vector gives exactly its expected rules (the files and
    /// `warden verify` are checked against the same in tests/verify.rs).
    #[test]
    fn every_case_fails_exactly_its_rules() {
        let mut wrong = Vec::new();
        for c in cases() {
            let b = Bundle::from_json(&c.bundle).expect("a bundle");
            let (report, _) = b.verify(&c.setup.trust, &c.setup.params);
            let mut got = report.rules();
            got.sort();
            if got != c.expected {
                wrong.push(format!(
                    "{}: expected {:?}\n  got {:?}\n  {}",
                    c.name,
                    c.expected,
                    got,
                    report
                        .failures
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join("\n  ")
                ));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n\n"));
    }
}
