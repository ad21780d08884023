//! Verification of a lease's attestation chain and proof: the rules of
//! docs/attestation.md ("Verifying a lease"), as pure functions. The
//! coordinator runs them live and again at lease end; `warden verify` runs
//! them offline on a bundle.
//!
//! Every failure is reported with a stable rule name (the reason string of
//! the spec) and a detail; verification does not stop at the first one.

use std::collections::BTreeSet;

use prost::Message;

use crate::{
    dsse::{self, VerifyError, VerifyingKey},
    pb::{self, Envelope},
    types,
};

/// The rule names, as the spec lists them.
pub mod rule {
    pub const BAD_SIGNATURE: &str = "bad-signature";
    pub const WRONG_KEY: &str = "wrong-key";
    pub const BAD_PAYLOAD: &str = "bad-payload";
    pub const WRONG_NODE: &str = "wrong-node";
    pub const WRONG_LEASE: &str = "wrong-lease";
    pub const SEQ_GAP: &str = "seq-gap";
    pub const SEQ_REPEAT: &str = "seq-repeat";
    pub const BROKEN_LINK: &str = "broken-link";
    pub const WINDOW_BACKWARD: &str = "window-backward";
    pub const WINDOW_OVERLAP: &str = "window-overlap";
    pub const WINDOW_OUTSIDE: &str = "window-outside-lease";
    pub const WINDOW_FUTURE: &str = "window-future";
    pub const BAD_CHALLENGE: &str = "bad-challenge";
    pub const MISSING_CHALLENGE: &str = "missing-challenge";
    pub const LOW_COVERAGE: &str = "low-coverage";
    pub const NO_PROOF: &str = "no-proof";
    pub const PROOF_MISMATCH: &str = "proof-mismatch";
    pub const EMPTY_CHAIN: &str = "empty-chain";
}

/// What a verifier tolerates.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Clock difference allowed between node, coordinator and verifier.
    pub max_skew_ms: i64,
    /// Least acceptable coverage (sampled time over lease time).
    pub min_coverage: f64,
    /// The verifier's clock: no window may end after `now + max_skew`.
    pub now_unix_ms: i64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            max_skew_ms: 5_000,
            min_coverage: 0.9,
            now_unix_ms: i64::MAX / 2,
        }
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// What the chain adds up to, whether or not it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub lease_id: String,
    pub node_id: String,
    pub records: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub head_sha256: [u8; 32],
    pub t1_unix_ms: i64,
    pub t2_unix_ms: i64,
    pub sampled_ms: i64,
    pub coverage: f64,
    pub foreign_events: u64,
    pub kills: u64,
    pub container_stops: u64,
    pub restarts: u32,
    pub start_ids: Vec<String>,
    pub challenges_answered: usize,
    /// Challenges issued while no window was open (during a gap).
    pub challenges_in_gaps: usize,
}

/// The outcome: it holds when `failures` is empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub summary: Summary,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn holds(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, rule: &'static str, detail: String) {
        self.failures.push(Failure { rule, detail });
    }
}

/// Everything needed to judge one lease.
pub struct Chain<'a> {
    pub lease_id: &'a str,
    pub node_key: &'a VerifyingKey,
    /// The lease's attestation records, in the order they were made.
    pub records: &'a [Envelope],
    /// The signed lease proof, if the lease has ended.
    pub proof: Option<&'a Envelope>,
    /// The coordinator's challenges for this lease, and its key to check them.
    pub challenges: &'a [Envelope],
    pub coordinator_key: Option<&'a VerifyingKey>,
}

/// The head of a lease's chain: what the next attestation links to. The
/// agent keeps it (persisted) so a restarted agent continues the chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Head {
    /// The last attestation's lease seq (0: none yet).
    pub lease_seq: u64,
    /// SHA-256 of the last attestation's Record payload (zeros: none yet).
    pub sha256: [u8; 32],
}

impl Head {
    /// Stamps `a` as the next link: its lease seq and previous digest.
    pub fn link(&self, a: &mut pb::Attestation) {
        a.lease_seq = self.lease_seq + 1;
        a.prev_sha256 = self.sha256.to_vec();
    }

    /// Moves past a signed record holding the attestation just linked.
    pub fn advance(&mut self, lease_seq: u64, record_payload: &[u8]) {
        self.lease_seq = lease_seq;
        self.sha256 = sha256(record_payload);
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// WRONG_NODE / WRONG_LEASE when a record names another node (`node`:
/// named, expected) or lease (`lease`: named, expected) than the chain's.
fn names_this(report: &mut Report, what: &str, node: (&str, &str), lease: (&str, &str)) {
    if node.0 != node.1 {
        report.fail(
            rule::WRONG_NODE,
            format!("{what}: names node {}, the key is {}", node.0, node.1),
        );
    }
    if lease.0 != lease.1 {
        report.fail(
            rule::WRONG_LEASE,
            format!("{what}: is for lease {}, not {}", lease.0, lease.1),
        );
    }
}

/// Opens one record envelope: signature by the node key, a Record payload.
fn open_record(
    env: &Envelope,
    key: &VerifyingKey,
    what: &str,
    report: &mut Report,
) -> Option<pb::Record> {
    match dsse::open::<pb::Record>(env, types::RECORD, key) {
        Ok(r) => Some(r),
        Err(VerifyError::BadSignature { keyid }) => {
            report.fail(
                rule::BAD_SIGNATURE,
                format!("{what}: the signature by {keyid} does not verify"),
            );
            None
        }
        Err(e @ (VerifyError::UnknownKey { .. } | VerifyError::NoSignature)) => {
            report.fail(rule::WRONG_KEY, format!("{what}: {e}"));
            None
        }
        Err(e) => {
            report.fail(rule::BAD_PAYLOAD, format!("{what}: {e}"));
            None
        }
    }
}

/// A kill that happened: action `kill` with a signal sent. A decision to
/// kill a process that was already gone is recorded but is not a kill.
pub fn is_kill(e: &pb::EnforcementEvent) -> bool {
    e.action == "kill" && e.sigterm_unix_ms > 0
}

/// Checks a lease's chain (and proof, if given) against every rule.
pub fn verify(c: &Chain, p: &Params) -> Report {
    let mut report = Report::default();
    let node_id = c.node_key.key_id().to_owned();
    report.summary.lease_id = c.lease_id.to_owned();
    report.summary.node_id = node_id.clone();

    // The proof first: it bounds the windows.
    let proof = match c.proof {
        None => None,
        Some(env) => match open_record(env, c.node_key, "proof", &mut report) {
            Some(r) => match r.body {
                Some(pb::record::Body::LeaseProof(pr)) => {
                    names_this(
                        &mut report,
                        "proof",
                        (&r.node_id, &node_id),
                        (&pr.lease_id, c.lease_id),
                    );
                    Some(pr)
                }
                _ => {
                    report.fail(
                        rule::BAD_PAYLOAD,
                        "proof: the record is not a LeaseProof".into(),
                    );
                    None
                }
            },
            None => None,
        },
    };

    let mut prev: Option<(u64, [u8; 32], i64)> = None; // (lease_seq, digest, window end)
    let mut seen_seqs = BTreeSet::new();
    let mut nonces: Vec<(Vec<u8>, i64)> = Vec::new(); // (nonce, window end)
    let mut windows: Vec<(i64, i64)> = Vec::new();
    let mut tally = Tally::default();
    let s = &mut report.summary.clone();
    for (i, env) in c.records.iter().enumerate() {
        let what = format!("record {}", i + 1);
        let Some(rec) = open_record(env, c.node_key, &what, &mut report) else {
            // An unreadable record still counts as a link: the next one cannot be checked against it.
            prev = prev.map(|(seq, _, end)| (seq + 1, dsse::payload_sha256(env), end));
            continue;
        };
        let Some(pb::record::Body::Attestation(a)) = &rec.body else {
            report.fail(
                rule::BAD_PAYLOAD,
                format!("{what}: the record is not an Attestation"),
            );
            continue;
        };
        let what = format!("record {} (lease seq {})", i + 1, a.lease_seq);
        names_this(
            &mut report,
            &what,
            (&rec.node_id, &node_id),
            (&a.lease_id, c.lease_id),
        );
        if !seen_seqs.insert(a.lease_seq) {
            report.fail(
                rule::SEQ_REPEAT,
                format!("{what}: lease seq {} appears twice", a.lease_seq),
            );
        }
        let expected_seq = prev.map_or(1, |(seq, _, _)| seq + 1);
        if a.lease_seq > expected_seq {
            report.fail(
                rule::SEQ_GAP,
                format!(
                    "{what}: expected lease seq {expected_seq}, so {}..{} are missing",
                    expected_seq,
                    a.lease_seq - 1
                ),
            );
        } else if a.lease_seq < expected_seq
            && !report
                .failures
                .iter()
                .any(|f| f.rule == rule::SEQ_REPEAT && f.detail.starts_with(&what))
        {
            report.fail(
                rule::SEQ_REPEAT,
                format!(
                    "{what}: lease seq goes back from {} to {}",
                    expected_seq - 1,
                    a.lease_seq
                ),
            );
        }
        let expected_link = prev.map_or([0u8; 32], |(_, d, _)| d);
        if a.prev_sha256.as_slice() != expected_link {
            report.fail(
                rule::BROKEN_LINK,
                format!(
                    "{what}: prev_sha256 is {}, the previous record's payload hashes to {}",
                    hex::encode(&a.prev_sha256),
                    hex::encode(expected_link)
                ),
            );
        }
        let (start, end) = (a.window_start_unix_ms, a.window_end_unix_ms);
        if end <= start {
            report.fail(
                rule::WINDOW_BACKWARD,
                format!("{what}: window [{start}, {end}) does not move forward"),
            );
        }
        if let Some((_, _, prev_end)) = prev {
            if start < prev_end {
                report.fail(rule::WINDOW_OVERLAP, format!("{what}: window starts at {start}, before the previous one ended ({prev_end})"));
            }
        }
        if end > p.now_unix_ms.saturating_add(p.max_skew_ms) {
            report.fail(
                rule::WINDOW_FUTURE,
                format!(
                    "{what}: window ends at {end}, {} ms after the verifier's clock",
                    end - p.now_unix_ms
                ),
            );
        }
        if let Some(pr) = &proof {
            if start < pr.t1_unix_ms - p.max_skew_ms || end > pr.t2_unix_ms + p.max_skew_ms {
                report.fail(
                    rule::WINDOW_OUTSIDE,
                    format!("{what}: window [{start}, {end}) is outside the lease [{}, {}) beyond the allowed skew", pr.t1_unix_ms, pr.t2_unix_ms),
                );
            }
        }
        if a.sampled_ms < 0 || a.sampled_ms > (end - start).max(0) {
            report.fail(
                rule::BAD_PAYLOAD,
                format!(
                    "{what}: sampled_ms {} is not within its window",
                    a.sampled_ms
                ),
            );
        }
        // The same totals an honest agent signs in its proof.
        tally.add(&rec, a, &env.payload);
        for n in &a.challenges {
            nonces.push((n.clone(), end));
        }
        windows.push((start, end));
        if s.records == 0 {
            s.t1_unix_ms = start;
        }
        s.records += 1;
        s.t2_unix_ms = end;
        prev = Some((a.lease_seq.max(expected_seq), tally.head_sha256, end));
    }
    s.first_seq = tally.first_seq;
    s.last_seq = tally.last_seq;
    s.head_sha256 = tally.head_sha256;
    s.sampled_ms = tally.sampled_ms;
    s.foreign_events = tally.foreign_events;
    s.kills = tally.kills;
    s.container_stops = tally.container_stops;
    s.restarts = tally.start_ids.len().saturating_sub(1) as u32;
    s.start_ids = tally.start_ids;

    // Challenges: each signed by the coordinator, each answered in time.
    for (i, env) in c.challenges.iter().enumerate() {
        let what = format!("challenge {}", i + 1);
        let Some(key) = c.coordinator_key else {
            report.fail(
                rule::BAD_CHALLENGE,
                format!("{what}: no coordinator key to check it with"),
            );
            continue;
        };
        let ch = match dsse::open::<pb::Challenge>(env, types::CHALLENGE, key) {
            Ok(ch) => ch,
            Err(e) => {
                report.fail(rule::BAD_CHALLENGE, format!("{what}: {e}"));
                continue;
            }
        };
        if ch.lease_id != c.lease_id || ch.node_id != node_id {
            report.fail(
                rule::BAD_CHALLENGE,
                format!(
                    "{what}: is for lease {} on node {}",
                    ch.lease_id, ch.node_id
                ),
            );
            continue;
        }
        // Issued once the lease was over: nothing to answer it with.
        if proof
            .as_ref()
            .is_some_and(|pr| ch.issued_unix_ms >= pr.t2_unix_ms)
        {
            continue;
        }
        // Issued while no window was open (the agent was down): the gap
        // already costs coverage; the challenge is not counted against it.
        if !windows
            .iter()
            .any(|(s, e)| *s <= ch.issued_unix_ms && ch.issued_unix_ms < *e)
        {
            s.challenges_in_gaps += 1;
            continue;
        }
        let answered = nonces
            .iter()
            .any(|(n, end)| *n == ch.nonce && *end <= ch.deadline_unix_ms + p.max_skew_ms);
        if answered {
            s.challenges_answered += 1;
        } else {
            report.fail(
                rule::MISSING_CHALLENGE,
                format!(
                    "{what}: nonce {} (issued {}, due {}) is in no record ending by its deadline",
                    hex::encode(&ch.nonce),
                    ch.issued_unix_ms,
                    ch.deadline_unix_ms
                ),
            );
        }
    }

    if s.records == 0 {
        report.fail(
            rule::EMPTY_CHAIN,
            "the lease has no attestation records".into(),
        );
    }
    // Coverage is over the lease as the proof states it (or the chain's span).
    let (t1, t2) = proof.as_ref().map_or((s.t1_unix_ms, s.t2_unix_ms), |pr| {
        (pr.t1_unix_ms, pr.t2_unix_ms)
    });
    s.coverage = if t2 > t1 {
        s.sampled_ms as f64 / (t2 - t1) as f64
    } else {
        0.0
    };
    if s.records > 0 && s.coverage < p.min_coverage {
        report.fail(
            rule::LOW_COVERAGE,
            format!(
                "coverage {:.4} is below {:.4} ({} ms sampled of {} ms)",
                s.coverage,
                p.min_coverage,
                s.sampled_ms,
                t2 - t1
            ),
        );
    }

    match &proof {
        None if c.proof.is_none() => {
            report.fail(rule::NO_PROOF, "the lease has no proof (not ended?)".into())
        }
        None => {}
        Some(pr) => {
            let mut mismatch = |field: &str, proof: String, chain: String| {
                if proof != chain {
                    report.fail(
                        rule::PROOF_MISMATCH,
                        format!("{field}: the proof says {proof}, the records say {chain}"),
                    );
                }
            };
            mismatch(
                "first_seq",
                pr.first_seq.to_string(),
                s.first_seq.to_string(),
            );
            mismatch("last_seq", pr.last_seq.to_string(), s.last_seq.to_string());
            mismatch(
                "head_sha256",
                hex::encode(&pr.head_sha256),
                hex::encode(s.head_sha256),
            );
            mismatch(
                "foreign_events",
                pr.foreign_events.to_string(),
                s.foreign_events.to_string(),
            );
            mismatch("kills", pr.kills.to_string(), s.kills.to_string());
            mismatch(
                "container_stops",
                pr.container_stops.to_string(),
                s.container_stops.to_string(),
            );
            mismatch("restarts", pr.restarts.to_string(), s.restarts.to_string());
            if (pr.coverage - s.coverage).abs() > 1e-6 {
                mismatch(
                    "coverage",
                    format!("{:.6}", pr.coverage),
                    format!("{:.6}", s.coverage),
                );
            }
            if pr.t2_unix_ms <= pr.t1_unix_ms {
                report.fail(
                    rule::PROOF_MISMATCH,
                    format!("t2 {} is not after t1 {}", pr.t2_unix_ms, pr.t1_unix_ms),
                );
            }
        }
    }
    report.summary = s.clone();
    report
}

/// Running totals of a lease's chain, kept by the agent as it signs each
/// attestation (and persisted with the lease), so that at lease end it can
/// sign the proof without keeping every record.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub first_seq: u64,
    pub last_seq: u64,
    pub head_sha256: [u8; 32],
    pub sampled_ms: i64,
    pub foreign_events: u64,
    pub kills: u64,
    pub container_stops: u64,
    pub start_ids: Vec<String>,
}

impl Tally {
    /// Counts one signed attestation record (its Record and payload bytes).
    pub fn add(&mut self, rec: &pb::Record, a: &pb::Attestation, payload: &[u8]) {
        if self.first_seq == 0 {
            self.first_seq = a.lease_seq;
        }
        self.last_seq = a.lease_seq;
        self.head_sha256 = sha256(payload);
        self.sampled_ms += a
            .sampled_ms
            .clamp(0, (a.window_end_unix_ms - a.window_start_unix_ms).max(0));
        self.foreign_events += a.holders.iter().filter(|h| h.verdict == "foreign").count() as u64;
        self.kills += a.enforcement.iter().filter(|e| is_kill(e)).count() as u64;
        self.container_stops += a.enforcement.iter().filter(|e| e.action == "stop").count() as u64;
        if !self.start_ids.contains(&rec.start_id) {
            self.start_ids.push(rec.start_id.clone());
        }
    }

    /// The proof for a lease that ran from `t1` to `t2`.
    pub fn proof(&self, lease_id: &str, t1: i64, t2: i64) -> pb::LeaseProof {
        pb::LeaseProof {
            lease_id: lease_id.to_owned(),
            t1_unix_ms: t1,
            t2_unix_ms: t2,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            head_sha256: if self.last_seq == 0 {
                Vec::new()
            } else {
                self.head_sha256.to_vec()
            },
            coverage: if t2 > t1 {
                self.sampled_ms as f64 / (t2 - t1) as f64
            } else {
                0.0
            },
            foreign_events: self.foreign_events,
            kills: self.kills,
            container_stops: self.container_stops,
            restarts: self.start_ids.len().saturating_sub(1) as u32,
        }
    }
}

/// The proof an honest agent signs for a chain (what `verify` expects).
pub fn proof_for(lease_id: &str, t1: i64, t2: i64, records: &[Envelope]) -> pb::LeaseProof {
    let mut tally = Tally::default();
    for env in records {
        let Ok(rec) = pb::Record::decode(env.payload.as_slice()) else {
            continue;
        };
        if let Some(pb::record::Body::Attestation(a)) = &rec.body {
            tally.add(&rec, a, &env.payload);
        }
    }
    tally.proof(lease_id, t1, t2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsse::Signer;

    const LEASE: &str = "l-test";

    /// An honest chain: `n` windows of 10 s from t=1_000_000, fully sampled.
    struct Fixture {
        node: Signer,
        coord: Signer,
        records: Vec<Envelope>,
        challenges: Vec<Envelope>,
        t1: i64,
        t2: i64,
    }

    fn record(node: &Signer, seq: u64, start_id: &str, a: pb::Attestation) -> Envelope {
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

    fn chain(n: u64) -> Fixture {
        let node = Signer::from_seed(&[7; 32]);
        let coord = Signer::from_seed(&[9; 32]);
        let t1 = 1_000_000;
        let mut records = Vec::new();
        let mut head = Head::default();
        for i in 0..n {
            let start = t1 + i as i64 * 10_000;
            let mut a = pb::Attestation {
                lease_id: LEASE.into(),
                window_start_unix_ms: start,
                window_end_unix_ms: start + 10_000,
                sampled_ms: 10_000,
                challenges: if i == 1 {
                    vec![b"nonce-1".to_vec()]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            head.link(&mut a);
            let env = record(&node, 100 + i * 3, "start-a", a);
            head.advance(i + 1, &env.payload);
            records.push(env);
        }
        let challenges = vec![coord.sign_message(
            types::CHALLENGE,
            &pb::Challenge {
                node_id: node.key_id().into(),
                lease_id: LEASE.into(),
                nonce: b"nonce-1".to_vec(),
                issued_unix_ms: t1 + 12_000,
                deadline_unix_ms: t1 + 30_000,
            },
        )];
        Fixture {
            node,
            coord,
            records,
            challenges,
            t1,
            t2: t1 + n as i64 * 10_000,
        }
    }

    impl Fixture {
        fn proof(&self) -> Envelope {
            self.proof_with(|_| {})
        }

        fn proof_with(&self, f: impl FnOnce(&mut pb::LeaseProof)) -> Envelope {
            let mut p = proof_for(LEASE, self.t1, self.t2, &self.records);
            f(&mut p);
            self.node.sign_message(
                types::RECORD,
                &pb::Record {
                    node_id: self.node.key_id().into(),
                    seq: 999,
                    time_unix_ms: self.t2,
                    start_id: "start-a".into(),
                    body: Some(pb::record::Body::LeaseProof(p)),
                },
            )
        }

        fn verify_with(&self, records: &[Envelope], proof: &Envelope) -> Report {
            let key = self.node.verifying_key();
            let ckey = self.coord.verifying_key();
            verify(
                &Chain {
                    lease_id: LEASE,
                    node_key: &key,
                    records,
                    proof: Some(proof),
                    challenges: &self.challenges,
                    coordinator_key: Some(&ckey),
                },
                &Params::default(),
            )
        }

        fn rules(&self, records: &[Envelope], proof: &Envelope) -> Vec<&'static str> {
            let mut r: Vec<_> = self
                .verify_with(records, proof)
                .failures
                .iter()
                .map(|f| f.rule)
                .collect();
            r.dedup();
            r
        }
    }

    /// Re-signs a record after `f` changed its attestation (a forger with the key).
    fn resign(node: &Signer, env: &Envelope, f: impl FnOnce(&mut pb::Attestation)) -> Envelope {
        let mut rec = pb::Record::decode(env.payload.as_slice()).unwrap();
        if let Some(pb::record::Body::Attestation(a)) = rec.body.as_mut() {
            f(a);
        }
        node.sign_message(types::RECORD, &rec)
    }

    #[test]
    fn an_honest_chain_holds() {
        let fx = chain(6);
        let r = fx.verify_with(&fx.records, &fx.proof());
        assert!(r.holds(), "{:?}", r.failures);
        assert_eq!(r.summary.records, 6);
        assert_eq!((r.summary.first_seq, r.summary.last_seq), (1, 6));
        assert_eq!(r.summary.coverage, 1.0);
        assert_eq!(r.summary.challenges_answered, 1);
        assert_eq!(r.summary.restarts, 0);
    }

    #[test]
    fn each_tampering_is_named() {
        let fx = chain(5);
        let proof = fx.proof();
        // A flipped byte: the signature no longer verifies.
        let mut recs = fx.records.clone();
        recs[2].payload[5] ^= 1;
        assert!(fx.rules(&recs, &proof).contains(&rule::BAD_SIGNATURE));
        // Signed by another key.
        let other = Signer::from_seed(&[1; 32]);
        let mut recs = fx.records.clone();
        recs[1] = other.sign(types::RECORD, recs[1].payload.clone());
        assert!(fx.rules(&recs, &proof).contains(&rule::WRONG_KEY));
        // A record dropped: a gap, and the next link is broken.
        let mut recs = fx.records.clone();
        recs.remove(2);
        let r = fx.rules(&recs, &proof);
        assert!(
            r.contains(&rule::SEQ_GAP) && r.contains(&rule::BROKEN_LINK),
            "{r:?}"
        );
        // A record repeated.
        let mut recs = fx.records.clone();
        recs.insert(3, recs[2].clone());
        assert!(fx.rules(&recs, &proof).contains(&rule::SEQ_REPEAT));
        // Re-signed with a wrong link.
        let mut recs = fx.records.clone();
        recs[3] = resign(&fx.node, &recs[3], |a| a.prev_sha256 = vec![1; 32]);
        assert!(fx.rules(&recs, &proof).contains(&rule::BROKEN_LINK));
        // Overlapping and backward windows.
        let mut recs = fx.records.clone();
        recs[2] = resign(&fx.node, &recs[2], |a| a.window_start_unix_ms -= 5_000);
        assert!(fx.rules(&recs, &proof).contains(&rule::WINDOW_OVERLAP));
        let mut recs = fx.records.clone();
        recs[2] = resign(&fx.node, &recs[2], |a| {
            a.window_end_unix_ms = a.window_start_unix_ms - 1
        });
        assert!(fx.rules(&recs, &proof).contains(&rule::WINDOW_BACKWARD));
        // A window beyond the lease and the allowed skew.
        let mut recs = fx.records.clone();
        let last = recs.len() - 1;
        recs[last] = resign(&fx.node, &recs[last], |a| a.window_end_unix_ms += 60_000);
        assert!(fx.rules(&recs, &proof).contains(&rule::WINDOW_OUTSIDE));
        // Coverage too low.
        let mut recs = fx.records.clone();
        recs[0] = resign(&fx.node, &recs[0], |a| a.sampled_ms = 0);
        recs[1] = resign(&fx.node, &recs[1], |a| a.sampled_ms = 0);
        assert!(fx.rules(&recs, &proof).contains(&rule::LOW_COVERAGE));
        // The challenge left unanswered.
        let mut recs = fx.records.clone();
        recs[1] = resign(&fx.node, &recs[1], |a| a.challenges.clear());
        assert!(fx.rules(&recs, &proof).contains(&rule::MISSING_CHALLENGE));
        // A proof that disagrees with the records.
        for f in [
            (|p: &mut pb::LeaseProof| p.last_seq += 1) as fn(&mut pb::LeaseProof),
            |p| p.head_sha256 = vec![0; 32],
            |p| p.coverage = 0.5,
            |p| p.kills = 3,
            |p| p.restarts = 1,
        ] {
            assert_eq!(
                fx.rules(&fx.records, &fx.proof_with(f)),
                [rule::PROOF_MISMATCH]
            );
        }
    }

    #[test]
    fn future_windows_and_foreign_challenges() {
        let fx = chain(3);
        let key = fx.node.verifying_key();
        let ckey = fx.coord.verifying_key();
        let proof = fx.proof();
        let params = Params {
            now_unix_ms: fx.t1 + 15_000,
            ..Default::default()
        };
        let r = verify(
            &Chain {
                lease_id: LEASE,
                node_key: &key,
                records: &fx.records,
                proof: Some(&proof),
                challenges: &fx.challenges,
                coordinator_key: Some(&ckey),
            },
            &params,
        );
        assert!(
            r.failures.iter().any(|f| f.rule == rule::WINDOW_FUTURE),
            "{:?}",
            r.failures
        );
        // A challenge not signed by the coordinator is not evidence either way.
        let forged = fx
            .node
            .sign_message(types::CHALLENGE, &pb::Challenge::default());
        let r = verify(
            &Chain {
                lease_id: LEASE,
                node_key: &key,
                records: &fx.records,
                proof: Some(&proof),
                challenges: &[forged],
                coordinator_key: Some(&ckey),
            },
            &Params::default(),
        );
        assert_eq!(
            r.failures.iter().map(|f| f.rule).collect::<Vec<_>>(),
            [rule::BAD_CHALLENGE]
        );
    }

    #[test]
    fn a_restart_is_visible_and_still_holds() {
        let fx = chain(4);
        // Records 3 and 4 come from a new agent process: new start id, same chain.
        let mut recs = fx.records[..2].to_vec();
        let mut prev = sha256(&recs[1].payload);
        for env in &fx.records[2..] {
            let mut rec = pb::Record::decode(env.payload.as_slice()).unwrap();
            rec.start_id = "start-b".into();
            if let Some(pb::record::Body::Attestation(a)) = rec.body.as_mut() {
                a.prev_sha256 = prev.to_vec();
            }
            let e = fx.node.sign_message(types::RECORD, &rec);
            prev = sha256(&e.payload);
            recs.push(e);
        }
        let fx2 = Fixture {
            records: recs.clone(),
            ..chain(4)
        };
        let r = fx2.verify_with(&recs, &fx2.proof());
        assert!(r.holds(), "{:?}", r.failures);
        assert_eq!(r.summary.restarts, 1);
        assert_eq!(r.summary.start_ids, ["start-a", "start-b"]);
    }

    #[test]
    fn challenges_issued_in_a_gap_are_not_required() {
        let node = Signer::from_seed(&[7; 32]);
        let coord = Signer::from_seed(&[9; 32]);
        let mut head = Head::default();
        let mut records = Vec::new();
        // [0, 10 s), then the agent is down until 15 s, then [15 s, 25 s).
        for (i, (start, end)) in [(0i64, 10_000i64), (15_000, 25_000)]
            .into_iter()
            .enumerate()
        {
            let mut a = pb::Attestation {
                lease_id: LEASE.into(),
                window_start_unix_ms: start,
                window_end_unix_ms: end,
                sampled_ms: end - start,
                ..Default::default()
            };
            head.link(&mut a);
            let env = record(&node, i as u64 + 1, "s", a);
            head.advance(i as u64 + 1, &env.payload);
            records.push(env);
        }
        let challenge = |issued: i64| {
            coord.sign_message(
                types::CHALLENGE,
                &pb::Challenge {
                    node_id: node.key_id().into(),
                    lease_id: LEASE.into(),
                    nonce: issued.to_le_bytes().to_vec(),
                    issued_unix_ms: issued,
                    deadline_unix_ms: issued + 5_000,
                },
            )
        };
        let proof = node.sign_message(
            types::RECORD,
            &pb::Record {
                node_id: node.key_id().into(),
                seq: 3,
                time_unix_ms: 0,
                start_id: "s".into(),
                body: Some(pb::record::Body::LeaseProof(proof_for(
                    LEASE, 0, 25_000, &records,
                ))),
            },
        );
        let (key, ckey) = (node.verifying_key(), coord.verifying_key());
        let run = |challenges: &[Envelope]| {
            verify(
                &Chain {
                    lease_id: LEASE,
                    node_key: &key,
                    records: &records,
                    proof: Some(&proof),
                    challenges,
                    coordinator_key: Some(&ckey),
                },
                &Params {
                    min_coverage: 0.5,
                    ..Default::default()
                },
            )
        };
        let r = run(&[challenge(12_000)]);
        assert!(r.holds(), "{:?}", r.failures);
        assert_eq!(r.summary.challenges_in_gaps, 1);
        let r = run(&[challenge(17_000)]);
        assert_eq!(
            r.failures.iter().map(|f| f.rule).collect::<Vec<_>>(),
            [rule::MISSING_CHALLENGE]
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Honest chains of any length hold.
            #[test]
            fn honest_chains_hold(n in 1u64..20) {
                let fx = chain(n.max(2));
                let r = fx.verify_with(&fx.records, &fx.proof());
                prop_assert!(r.holds(), "{:?}", r.failures);
            }

            /// Any single flipped payload bit is caught.
            #[test]
            fn any_flipped_bit_fails(n in 2u64..8, which in 0usize..8, byte in 0usize..64, bit in 0u8..8) {
                let fx = chain(n);
                let proof = fx.proof();
                let mut recs = fx.records.clone();
                let i = which % recs.len();
                let b = byte % recs[i].payload.len();
                recs[i].payload[b] ^= 1 << bit;
                prop_assert!(!fx.verify_with(&recs, &proof).holds());
            }

            /// Dropping, duplicating or swapping records is caught.
            #[test]
            fn reordering_fails(n in 3u64..10, i in 0usize..10, j in 0usize..10, op in 0u8..3) {
                let fx = chain(n);
                let proof = fx.proof();
                let mut recs = fx.records.clone();
                let (i, j) = (i % recs.len(), j % recs.len());
                match op {
                    0 => { recs.remove(i); }
                    1 => { let r = recs[i].clone(); recs.insert(j, r); }
                    _ => { if i == j { return Ok(()); } recs.swap(i, j); }
                }
                prop_assert!(!fx.verify_with(&recs, &proof).holds());
            }
        }
    }
}
