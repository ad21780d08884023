//! Verification of a lease's evidence: the rules of docs/attestation.md
//! ("Verifying a lease"), as pure functions. The coordinator runs them at
//! lease end to sign its verdict; `warden verify` runs them offline on a
//! bundle, with keys it was given (never the bundle's own).
//!
//! The node's key signs the chain and the proof; the coordinator's key
//! signs what the node cannot rewrite afterwards: a countersignature
//! (receipt) of each attestation as it arrived, the challenges (chained),
//! and the verdict, which commits to the chain's head, its last seq, T1/T2,
//! the last challenge, the leased GPUs and the countersigned coverage.
//!
//! Every failure is reported with a stable rule name and a detail;
//! verification does not stop at the first one.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;

use crate::{
    dsse::{self, VerifyError, VerifyingKey},
    pb::{self, Envelope},
    states::{GuardMode, HolderClass},
    types,
};

/// The rule names, as the spec lists them, in the order they are checked.
pub mod rule {
    pub const UNTRUSTED: &str = "untrusted";
    pub const NO_VERDICT: &str = "no-verdict";
    pub const BAD_VERDICT: &str = "bad-verdict";
    pub const NO_PROOF: &str = "no-proof";
    pub const BAD_SIGNATURE: &str = "bad-signature";
    pub const WRONG_KEY: &str = "wrong-key";
    pub const BAD_PAYLOAD: &str = "bad-payload";
    pub const WRONG_NODE: &str = "wrong-node";
    pub const WRONG_LEASE: &str = "wrong-lease";
    pub const SEQ_REPEAT: &str = "seq-repeat";
    pub const SEQ_GAP: &str = "seq-gap";
    pub const BROKEN_LINK: &str = "broken-link";
    pub const WINDOW_BACKWARD: &str = "window-backward";
    pub const WINDOW_OVERLAP: &str = "window-overlap";
    pub const WINDOW_OUTSIDE: &str = "window-outside-lease";
    pub const WINDOW_FUTURE: &str = "window-future";
    pub const WRONG_GPUS: &str = "wrong-gpus";
    pub const EMPTY_CHAIN: &str = "empty-chain";
    pub const BAD_COUNTERSIGNATURE: &str = "bad-countersignature";
    pub const MISSING_COUNTERSIGNATURE: &str = "missing-countersignature";
    pub const BAD_CHALLENGE: &str = "bad-challenge";
    pub const BROKEN_CHALLENGE_CHAIN: &str = "broken-challenge-chain";
    pub const MISSING_CHALLENGE: &str = "missing-challenge";
    pub const LOW_COVERAGE: &str = "low-coverage";
    pub const PROOF_MISMATCH: &str = "proof-mismatch";
    pub const VERDICT_MISMATCH: &str = "verdict-mismatch";

    /// Every rule, in check order.
    pub const ALL: &[&str] = &[
        UNTRUSTED,
        NO_VERDICT,
        BAD_VERDICT,
        NO_PROOF,
        BAD_SIGNATURE,
        WRONG_KEY,
        BAD_PAYLOAD,
        WRONG_NODE,
        WRONG_LEASE,
        SEQ_REPEAT,
        SEQ_GAP,
        BROKEN_LINK,
        WINDOW_BACKWARD,
        WINDOW_OVERLAP,
        WINDOW_OUTSIDE,
        WINDOW_FUTURE,
        WRONG_GPUS,
        EMPTY_CHAIN,
        BAD_COUNTERSIGNATURE,
        MISSING_COUNTERSIGNATURE,
        BAD_CHALLENGE,
        BROKEN_CHALLENGE_CHAIN,
        MISSING_CHALLENGE,
        LOW_COVERAGE,
        PROOF_MISMATCH,
        VERDICT_MISMATCH,
    ];
}

/// The holder verdicts an attestation may carry (`states::HolderClass`'s text).
pub const HOLDER_VERDICTS: &[&str] = &["lease-container", "agent", "allowlisted", "foreign"];

/// The guard modes an attestation may carry (`states::GuardMode`'s text);
/// empty, from agents older than the field, reads as "scan".
pub const GUARD_MODES: &[&str] = &["open", "scan"];

/// Opens denied in a window: its entries' attempts and the rest.
pub fn prevented(a: &pb::Attestation) -> u64 {
    a.prevented
        .iter()
        .map(|p| p.attempts)
        .fold(a.prevented_more, u64::saturating_add)
}

/// What a verifier tolerates.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Clock difference allowed between node, coordinator and verifier.
    pub max_skew_ms: i64,
    /// Least acceptable countersigned coverage.
    pub min_coverage: f64,
    /// The verifier's clock: no window may end after `now + max_skew`.
    pub now_unix_ms: i64,
    /// An attestation countersigned more than this after its window ended
    /// proves nothing live: its window counts as not covered.
    pub max_delay_ms: i64,
}

/// The lateness bound of docs/attestation.md: two minutes.
pub const MAX_DELAY_MS: i64 = 120_000;

impl Default for Params {
    fn default() -> Self {
        Self {
            max_skew_ms: 5_000,
            min_coverage: 0.9,
            now_unix_ms: i64::MAX / 2,
            max_delay_ms: MAX_DELAY_MS,
        }
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// What the evidence adds up to, whether or not it holds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub lease_id: String,
    pub node_id: String,
    /// Attestations that verify and belong to this lease.
    pub records: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    #[serde(with = "hex_bytes")]
    pub head_sha256: [u8; 32],
    pub t1_unix_ms: i64,
    pub t2_unix_ms: i64,
    /// Sampled time of the windows that count for the node (not blind).
    pub sampled_ms: i64,
    /// `sampled_ms / (t2 − t1)`: what the proof must state.
    pub claimed_coverage: f64,
    /// Sampled time of the windows countersigned in time.
    pub countersigned_ms: i64,
    /// `countersigned_ms / (t2 − t1)`: what the lease is judged by.
    pub coverage: f64,
    /// Windows countersigned after the lateness bound.
    pub late: usize,
    /// Windows in which the agent could not see (`blind`).
    pub blind: usize,
    pub foreign_events: u64,
    pub kills: u64,
    pub container_stops: u64,
    /// Opens denied at the open (`prevented`).
    pub prevented: u64,
    /// Windows guarded at the open (`guard` "open"), of `records`.
    pub guarded_windows: usize,
    pub restarts: u32,
    pub start_ids: Vec<String>,
    pub challenges: usize,
    pub challenges_answered: usize,
    /// Challenges issued while no window was open (during a gap).
    pub challenges_in_gaps: usize,
    /// The coordinator's own judgement, when the verdict verifies.
    pub verdict_holds: Option<bool>,
    pub gpus: Vec<String>,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
}

/// The outcome: it holds when `failures` is empty.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub summary: Summary,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn holds(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn fail(&mut self, rule: &'static str, detail: String) {
        self.failures.push(Failure { rule, detail });
    }

    /// The rule names failed, in report order (with repeats).
    pub fn rules(&self) -> Vec<&'static str> {
        self.failures.iter().map(|f| f.rule).collect()
    }
}

/// One signed item as a bundle holds it: an envelope, or why its JSON is
/// not one (a malformed envelope is a rule failure, not a refusal of the
/// whole bundle).
pub type Item = Result<Envelope, String>;

/// Everything needed to judge one lease, with the keys the caller trusts.
pub struct Chain<'a> {
    pub lease_id: &'a str,
    pub node_key: &'a VerifyingKey,
    /// `None`: nothing the coordinator signed can be checked, so the lease
    /// cannot hold.
    pub coordinator_key: Option<&'a VerifyingKey>,
    /// The lease's attestation records (any order).
    pub records: &'a [Item],
    /// The coordinator's countersignatures (receipts) of those records.
    pub receipts: &'a [Item],
    /// The signed lease proof, if the lease has ended.
    pub proof: Option<&'a Item>,
    /// The coordinator's challenges for this lease.
    pub challenges: &'a [Item],
    /// The coordinator's verdict, if it has judged the lease.
    pub verdict: Option<&'a Item>,
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

    /// Whether an attestation at `lease_seq` naming `prev_sha256` is the
    /// next link after this head: the rule `link` stamps, as a check.
    pub fn follows(&self, lease_seq: u64, prev_sha256: &[u8]) -> bool {
        lease_seq == self.lease_seq + 1 && prev_sha256 == self.sha256.as_slice()
    }

    /// Moves past a signed record holding the attestation just linked.
    pub fn advance(&mut self, lease_seq: u64, record_payload: &[u8]) {
        self.lease_seq = lease_seq;
        self.sha256 = sha256(record_payload);
    }
}

/// SHA-256 of some bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// A kill that happened: action `kill` with a signal sent. A decision to
/// kill a process that was already gone is recorded but is not a kill.
pub fn is_kill(e: &pb::EnforcementEvent) -> bool {
    e.action == "kill" && e.sigterm_unix_ms > 0
}

/// The sampled time a window contributes: none when the agent was blind,
/// else `sampled_ms` clamped to the window.
pub fn window_sampled(a: &pb::Attestation) -> i64 {
    if !a.blind.is_empty() {
        return 0;
    }
    a.sampled_ms
        .clamp(0, (a.window_end_unix_ms - a.window_start_unix_ms).max(0))
}

/// Where a signature check failed, as a rule.
fn signature_rule(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::BadSignature { .. } => rule::BAD_SIGNATURE,
        VerifyError::UnknownKey { .. } | VerifyError::NoSignature => rule::WRONG_KEY,
        _ => rule::BAD_PAYLOAD,
    }
}

/// Opens a coordinator-signed item as `M`, or says why not under `rule`.
fn open_coordinator<M: Message + Default>(
    item: &Item,
    signed: Option<&Signed>,
    payload_type: &str,
    what: &str,
    rule: &'static str,
    report: &mut Report,
) -> Option<(M, [u8; 32])> {
    let env = match item {
        Ok(env) => env,
        Err(e) => {
            report.fail(rule, format!("{what}: {e}"));
            return None;
        }
    };
    let Some(signed) = signed else {
        report.fail(rule, format!("{what}: no coordinator key to check it with"));
        return None;
    };
    match decode::<M>(signed, payload_type) {
        Ok(m) => Some((m, dsse::payload_sha256(env))),
        Err(e) => {
            report.fail(rule, format!("{what}: {e}"));
            None
        }
    }
}

/// The outcome of an envelope's signature check: its payload, or why not.
type Signed<'a> = Result<&'a [u8], VerifyError>;

/// A verified payload decoded as `M` (what `dsse::open` does).
fn decode<M: Message + Default>(signed: &Signed, payload_type: &str) -> Result<M, VerifyError> {
    let payload = *signed.as_ref().map_err(Clone::clone)?;
    M::decode(payload).map_err(|e| VerifyError::Decode {
        payload_type: payload_type.to_owned(),
        reason: e.to_string(),
    })
}

/// Every signature of the evidence, checked in one batch up front
/// (`dsse::verify_many`): `None` where an item is malformed or there is no
/// key to check it with.
struct Verified<'a> {
    verdict: Option<Signed<'a>>,
    proof: Option<Signed<'a>>,
    records: Vec<Option<Signed<'a>>>,
    receipts: Vec<Option<Signed<'a>>>,
    challenges: Vec<Option<Signed<'a>>>,
}

#[derive(Clone, Copy)]
enum Slot {
    Verdict,
    Proof,
    Record(usize),
    Receipt(usize),
    Challenge(usize),
}

fn verify_signatures<'a>(c: &Chain<'a>) -> Verified<'a> {
    let mut checks: Vec<(&'a Envelope, &str, &'a VerifyingKey)> = Vec::new();
    let mut slots = Vec::new();
    let mut add =
        |item: Option<&'a Item>, ty: &'static str, key: Option<&'a VerifyingKey>, slot| {
            if let (Some(Ok(env)), Some(key)) = (item, key) {
                checks.push((env, ty, key));
                slots.push(slot);
            }
        };
    let ckey = c.coordinator_key;
    add(c.verdict, types::VERDICT, ckey, Slot::Verdict);
    add(c.proof, types::RECORD, Some(c.node_key), Slot::Proof);
    for (i, item) in c.records.iter().enumerate() {
        add(Some(item), types::RECORD, Some(c.node_key), Slot::Record(i));
    }
    for (i, item) in c.receipts.iter().enumerate() {
        add(Some(item), receipt_type(item), ckey, Slot::Receipt(i));
    }
    for (i, item) in c.challenges.iter().enumerate() {
        add(Some(item), types::CHALLENGE, ckey, Slot::Challenge(i));
    }
    let mut v = Verified {
        verdict: None,
        proof: None,
        records: vec![None; c.records.len()],
        receipts: vec![None; c.receipts.len()],
        challenges: vec![None; c.challenges.len()],
    };
    for (slot, result) in slots.into_iter().zip(dsse::verify_many(&checks)) {
        let place = match slot {
            Slot::Verdict => &mut v.verdict,
            Slot::Proof => &mut v.proof,
            Slot::Record(i) => &mut v.records[i],
            Slot::Receipt(i) => &mut v.receipts[i],
            Slot::Challenge(i) => &mut v.challenges[i],
        };
        *place = Some(result);
    }
    v
}

/// One record of the bundle, as far as it could be read.
struct Read {
    /// Position in the bundle, from 1.
    pos: usize,
    digest: Option<[u8; 32]>,
    /// The Record and its attestation, if the payload decodes as one
    /// (whether or not the signature verifies: the seq places it).
    record: Option<pb::Record>,
    /// It verifies, decodes, names this node and lease: it counts.
    valid: bool,
}

impl Read {
    fn attestation(&self) -> Option<&pb::Attestation> {
        match self.record.as_ref()?.body.as_ref()? {
            pb::record::Body::Attestation(a) => Some(a),
            _ => None,
        }
    }

    fn what(&self) -> String {
        match self.attestation() {
            Some(a) => format!("record {} (lease seq {})", self.pos, a.lease_seq),
            None => format!("record {}", self.pos),
        }
    }
}

/// Reads one record item: signature, payload, naming; the content rules
/// of a valid attestation are checked later, in chain order.
fn read_record(
    pos: usize,
    item: &Item,
    signed: Option<&Signed>,
    node_id: &str,
    lease_id: &str,
    report: &mut Report,
) -> Read {
    let mut r = Read {
        pos,
        digest: None,
        record: None,
        valid: false,
    };
    let env = match item {
        Ok(env) => env,
        Err(e) => {
            report.fail(rule::BAD_PAYLOAD, format!("record {pos}: {e}"));
            return r;
        }
    };
    r.digest = Some(dsse::payload_sha256(env));
    let signed = signed.cloned().unwrap_or(Err(VerifyError::NoSignature));
    if let Err(e) = &signed {
        report.fail(signature_rule(e), format!("record {pos}: {e}"));
        if matches!(
            e,
            VerifyError::WrongPayloadType { .. } | VerifyError::TooLarge { .. }
        ) {
            return r;
        }
    }
    match pb::Record::decode(env.payload.as_slice()) {
        Ok(rec) => r.record = Some(rec),
        Err(e) => {
            if signed.is_ok() {
                report.fail(
                    rule::BAD_PAYLOAD,
                    format!("record {pos}: the payload is not a Record: {e}"),
                );
            }
            return r;
        }
    }
    if signed.is_err() {
        return r;
    }
    let Some(a) = r.attestation() else {
        report.fail(
            rule::BAD_PAYLOAD,
            format!("record {pos}: the record is not an Attestation"),
        );
        return r;
    };
    let what = r.what();
    let rec = r.record.as_ref().expect("decoded above");
    let mut named = true;
    if rec.node_id != node_id {
        report.fail(
            rule::WRONG_NODE,
            format!("{what}: names node {}, the key is {node_id}", rec.node_id),
        );
        named = false;
    }
    if a.lease_id != lease_id {
        report.fail(
            rule::WRONG_LEASE,
            format!("{what}: is for lease {}, not {lease_id}", a.lease_id),
        );
        named = false;
    }
    r.valid = named;
    r
}

/// Checks a lease's evidence against every rule.
pub fn verify(c: &Chain, p: &Params) -> Report {
    check(c, p, None)
}

/// What the coordinator checks before it has a verdict to sign: every rule
/// but the verdict's own, with the GPUs it leased in place of the verdict's.
/// `c.verdict` is ignored.
pub fn judge(c: &Chain, p: &Params, leased_gpus: &[String]) -> Report {
    check(c, p, Some(leased_gpus))
}

fn check(c: &Chain, p: &Params, judging: Option<&[String]>) -> Report {
    let mut report = Report::default();
    let node_id = c.node_key.key_id().to_owned();
    report.summary.lease_id = c.lease_id.to_owned();
    report.summary.node_id = node_id.clone();

    let verified = verify_signatures(c);
    let verdict = check_verdict(c, &verified, judging, &node_id, &mut report);
    let proof = check_proof(c, &verified, &node_id, &mut report);
    // The lease's span: the proof's, else the verdict's.
    let span = proof
        .as_ref()
        .map(|pr| (pr.t1_unix_ms, pr.t2_unix_ms))
        .or_else(|| verdict.as_ref().map(|v| (v.t1_unix_ms, v.t2_unix_ms)));
    let chain = place_records(c, &verified, &node_id, &mut report);
    let leased = judging.or(verdict.as_ref().map(|v| v.gpus.as_slice()));
    let watched = check_windows(&chain, span, leased, p, &mut report);
    let counted = check_countersignatures(c, &verified, &chain, &node_id, p, &mut report);
    let challenges = check_challenges(
        c,
        &verified,
        &chain,
        &watched,
        &counted,
        verdict.as_ref(),
        span,
        &node_id,
        p,
        &mut report,
    );
    let mut s = std::mem::take(&mut report.summary);
    s.gpus = leased.map(<[String]>::to_vec).unwrap_or_default();
    s.verdict_holds = verdict.as_ref().map(|v| v.holds);
    s.challenges = challenges.issued;
    s.challenges_answered = challenges.answered;
    s.challenges_in_gaps = challenges.in_gaps;
    s.late = counted.late;
    s.blind = counted.blind;
    s.countersigned_ms = counted.sampled_ms;
    summarise(&mut s, &chain, &watched, span, p, &mut report);
    if let Some(pr) = &proof {
        check_proof_figures(pr, &s, &watched.tally, &mut report);
    }
    if let Some(v) = &verdict {
        check_verdict_commitments(v, proof.as_ref(), &s, &mut report);
    }
    report.summary = s;
    report
}

/// Step 1, the verdict: what the coordinator committed to (none when judging).
fn check_verdict(
    c: &Chain,
    verified: &Verified,
    judging: Option<&[String]>,
    node_id: &str,
    report: &mut Report,
) -> Option<pb::LeaseVerdict> {
    if judging.is_some() {
        return None;
    }
    let Some(item) = c.verdict else {
        report.fail(
            rule::NO_VERDICT,
            "the coordinator has not judged the lease (no verdict)".into(),
        );
        return None;
    };
    let (v, _) = open_coordinator::<pb::LeaseVerdict>(
        item,
        verified.verdict.as_ref(),
        types::VERDICT,
        "verdict",
        rule::BAD_VERDICT,
        report,
    )?;
    if v.lease_id != c.lease_id {
        report.fail(
            rule::VERDICT_MISMATCH,
            format!("verdict: is for lease {}, not {}", v.lease_id, c.lease_id),
        );
    }
    if v.node_id != node_id {
        report.fail(
            rule::VERDICT_MISMATCH,
            format!(
                "verdict: names node {}, the node key is {node_id}",
                v.node_id
            ),
        );
    }
    Some(v)
}

/// Step 2, the proof: the node's own totals, and T1/T2.
fn check_proof(
    c: &Chain,
    verified: &Verified,
    node_id: &str,
    report: &mut Report,
) -> Option<pb::LeaseProof> {
    match c.proof {
        None => {
            report.fail(rule::NO_PROOF, "the lease has no proof (not ended?)".into());
            return None;
        }
        Some(Err(e)) => {
            report.fail(rule::BAD_PAYLOAD, format!("proof: {e}"));
            return None;
        }
        Some(Ok(_)) => {}
    }
    // Checked with the node key, which is always there.
    let signed = verified
        .proof
        .clone()
        .unwrap_or(Err(VerifyError::NoSignature));
    let rec = match decode::<pb::Record>(&signed, types::RECORD) {
        Ok(rec) => rec,
        Err(e) => {
            report.fail(signature_rule(&e), format!("proof: {e}"));
            return None;
        }
    };
    let Some(pb::record::Body::LeaseProof(pr)) = rec.body else {
        report.fail(
            rule::BAD_PAYLOAD,
            "proof: the record is not a LeaseProof".into(),
        );
        return None;
    };
    if rec.node_id != node_id {
        report.fail(
            rule::WRONG_NODE,
            format!("proof: names node {}, the key is {node_id}", rec.node_id),
        );
    }
    if pr.lease_id != c.lease_id {
        report.fail(
            rule::WRONG_LEASE,
            format!("proof: is for lease {}, not {}", pr.lease_id, c.lease_id),
        );
    }
    Some(pr)
}

/// The records as placed in the chain.
struct Placed {
    reads: Vec<Read>,
    /// Lease seq → the record (index into `reads`) standing there.
    members: BTreeMap<u64, usize>,
}

impl Placed {
    /// The valid members, in lease-seq order.
    fn valid(&self) -> impl Iterator<Item = &Read> {
        self.members
            .values()
            .map(|&i| &self.reads[i])
            .filter(|r| r.valid)
    }
}

/// Step 3, the records: read and placed by lease seq (bundle order does not
/// matter), then their repeats, gaps and links.
fn place_records(c: &Chain, verified: &Verified, node_id: &str, report: &mut Report) -> Placed {
    let reads: Vec<Read> = c
        .records
        .iter()
        .enumerate()
        .map(|(i, item)| {
            read_record(
                i + 1,
                item,
                verified.records[i].as_ref(),
                node_id,
                c.lease_id,
                report,
            )
        })
        .collect();
    let mut placed: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in reads.iter().enumerate() {
        if let Some(a) = r.attestation() {
            placed.entry(a.lease_seq).or_default().push(i);
        }
    }
    // A record that is no attestation still takes the place its successor
    // links it at, so it is reported once, not again as a gap or a break.
    for (i, r) in reads.iter().enumerate() {
        let Some(d) = r.digest.filter(|_| r.attestation().is_none()) else {
            continue;
        };
        let linked_at = reads.iter().find_map(|n| {
            let a = n.attestation()?;
            (a.lease_seq >= 2 && a.prev_sha256 == d).then_some(a.lease_seq - 1)
        });
        if let Some(seq) = linked_at {
            placed.entry(seq).or_default().push(i);
        }
    }
    let mut members = BTreeMap::new();
    for (seq, idx) in &placed {
        let first = idx[0];
        for &other in &idx[1..] {
            let detail = if reads[other].digest == reads[first].digest {
                format!(
                    "record {} repeats record {} (lease seq {seq})",
                    reads[other].pos, reads[first].pos
                )
            } else {
                format!(
                    "records {} and {} both claim lease seq {seq}",
                    reads[first].pos, reads[other].pos
                )
            };
            report.fail(rule::SEQ_REPEAT, detail);
        }
        members.insert(*seq, first);
    }
    let chain = Placed { reads, members };
    check_gaps(&chain, report);
    check_links(&chain, report);
    chain
}

/// Seq gaps: the chain starts at 1 and has no hole.
fn check_gaps(chain: &Placed, report: &mut Report) {
    let seqs: Vec<u64> = chain.members.keys().copied().collect();
    match seqs.first() {
        Some(0) => report.fail(
            rule::SEQ_GAP,
            "lease seqs start at 1; this chain starts at 0".into(),
        ),
        Some(&n) if n > 1 => report.fail(
            rule::SEQ_GAP,
            format!("lease seqs 1..{} are missing", n - 1),
        ),
        _ => {}
    }
    for w in seqs.windows(2) {
        if w[1] > w[0] + 1 {
            report.fail(
                rule::SEQ_GAP,
                format!("lease seqs {}..{} are missing", w[0] + 1, w[1] - 1),
            );
        }
    }
}

/// Links: each attestation names the digest of the record before it.
fn check_links(chain: &Placed, report: &mut Report) {
    let lowest = chain.members.keys().next().copied();
    for (&seq, &i) in &chain.members {
        let r = &chain.reads[i];
        let Some(a) = r.attestation() else {
            continue;
        };
        let expected = if Some(seq) == lowest && seq <= 1 {
            Some([0u8; 32])
        } else {
            seq.checked_sub(1)
                .and_then(|prev| chain.members.get(&prev))
                .and_then(|&j| chain.reads[j].digest)
        };
        if let Some(want) = expected.filter(|want| a.prev_sha256.as_slice() != want) {
            report.fail(
                rule::BROKEN_LINK,
                format!(
                    "{}: prev_sha256 is {}, the previous record's payload hashes to {}",
                    r.what(),
                    hex::encode(&a.prev_sha256),
                    hex::encode(want)
                ),
            );
        }
    }
}

/// What the valid windows add up to.
struct Watched {
    /// Their `[start, end)`, in lease-seq order.
    windows: Vec<(i64, i64)>,
    tally: Tally,
}

/// The content of each valid attestation, in chain order.
fn check_windows(
    chain: &Placed,
    span: Option<(i64, i64)>,
    leased: Option<&[String]>,
    p: &Params,
    report: &mut Report,
) -> Watched {
    let mut watched = Watched {
        windows: Vec::new(),
        tally: Tally::default(),
    };
    for r in chain.valid() {
        let a = r.attestation().expect("valid records are attestations");
        let what = r.what();
        check_payload(a, &what, report);
        let (start, end) = (a.window_start_unix_ms, a.window_end_unix_ms);
        if end <= start {
            report.fail(
                rule::WINDOW_BACKWARD,
                format!("{what}: window [{start}, {end}) does not move forward"),
            );
        }
        if let Some(&(_, prev_end)) = watched.windows.last() {
            if start < prev_end {
                report.fail(
                    rule::WINDOW_OVERLAP,
                    format!("{what}: window starts at {start}, before the previous one ended ({prev_end})"),
                );
            }
        }
        if let Some((t1, t2)) = span {
            if start < t1 - p.max_skew_ms || end > t2 + p.max_skew_ms {
                report.fail(
                    rule::WINDOW_OUTSIDE,
                    format!("{what}: window [{start}, {end}) is outside the lease [{t1}, {t2}) beyond the allowed skew"),
                );
            }
        }
        if end > p.now_unix_ms.saturating_add(p.max_skew_ms) {
            report.fail(
                rule::WINDOW_FUTURE,
                format!(
                    "{what}: window ends at {end}, {} ms after the verifier's clock",
                    end.saturating_sub(p.now_unix_ms)
                ),
            );
        }
        if let Some(leased) = leased {
            check_gpus(a, leased, &what, report);
        }
        watched.tally.add(
            r.record.as_ref().expect("decoded"),
            a,
            r.digest.expect("read"),
        );
        watched.windows.push((start, end));
    }
    if watched.windows.is_empty() {
        report.fail(
            rule::EMPTY_CHAIN,
            "the lease has no attestation record that verifies".into(),
        );
    }
    watched
}

/// Values an attestation may not hold.
fn check_payload(a: &pb::Attestation, what: &str, report: &mut Report) {
    let window = (a.window_end_unix_ms - a.window_start_unix_ms).max(0);
    if a.sampled_ms < 0 || a.sampled_ms > window {
        report.fail(
            rule::BAD_PAYLOAD,
            format!(
                "{what}: sampled_ms {} is not within its window",
                a.sampled_ms
            ),
        );
    }
    if let Some(h) = a
        .holders
        .iter()
        .find(|h| HolderClass::parse(&h.verdict).is_none())
    {
        report.fail(
            rule::BAD_PAYLOAD,
            format!(
                "{what}: holder pid {} has verdict `{}`, not one of {}",
                h.pid,
                h.verdict,
                HOLDER_VERDICTS.join(", ")
            ),
        );
    }
    if !a.guard.is_empty() && GuardMode::parse(&a.guard).is_none() {
        report.fail(
            rule::BAD_PAYLOAD,
            format!(
                "{what}: guard `{}` is not one of {}",
                a.guard,
                GUARD_MODES.join(", ")
            ),
        );
    }
    if let Some(p) = a.prevented.iter().find(|p| p.attempts == 0) {
        report.fail(
            rule::BAD_PAYLOAD,
            format!(
                "{what}: a prevented open by pid {} counts 0 attempts",
                p.pid
            ),
        );
    }
}

/// Every leased GPU reported, once, and no other.
fn check_gpus(a: &pb::Attestation, leased: &[String], what: &str, report: &mut Report) {
    let attested: BTreeSet<&str> = a.gpus.iter().map(|g| g.uuid.as_str()).collect();
    let leased_set: BTreeSet<&str> = leased.iter().map(String::as_str).collect();
    if attested != leased_set || attested.len() != a.gpus.len() {
        report.fail(
            rule::WRONG_GPUS,
            format!(
                "{what}: reports GPUs [{}], the lease has [{}]",
                a.gpus
                    .iter()
                    .map(|g| g.uuid.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                leased.join(", ")
            ),
        );
    }
}

/// The payload type a receipt item is checked as: a `Receipts` (several
/// under one signature) as itself, anything else as a `Receipt`.
fn receipt_type(item: &Item) -> &'static str {
    match item {
        Ok(env) if env.payload_type == types::RECEIPTS => types::RECEIPTS,
        _ => types::RECEIPT,
    }
}

/// What the countersignatures say of the valid windows.
#[derive(Default)]
struct Counted {
    /// Lease seq → when the coordinator received it.
    at: BTreeMap<u64, i64>,
    /// Sampled time of the windows countersigned in time.
    sampled_ms: i64,
    late: usize,
    blind: usize,
}

/// Step 4, countersignatures: each valid attestation, countersigned as it arrived.
fn check_countersignatures(
    c: &Chain,
    verified: &Verified,
    chain: &Placed,
    node_id: &str,
    p: &Params,
    report: &mut Report,
) -> Counted {
    let mut received: BTreeMap<(u64, [u8; 32]), i64> = BTreeMap::new();
    for (i, item) in c.receipts.iter().enumerate() {
        let what = format!("receipt {}", i + 1);
        let ty = receipt_type(item);
        let signed = verified.receipts[i].as_ref();
        let rule = rule::BAD_COUNTERSIGNATURE;
        // Each entry of a Receipts counts as a Receipt signed alone would.
        let entries: Vec<(String, pb::Receipt)> = if ty == types::RECEIPTS {
            match open_coordinator::<pb::Receipts>(item, signed, ty, &what, rule, report) {
                Some((set, _)) => set
                    .receipts
                    .into_iter()
                    .enumerate()
                    .map(|(j, rc)| (format!("{what} entry {}", j + 1), rc))
                    .collect(),
                None => continue,
            }
        } else {
            match open_coordinator::<pb::Receipt>(item, signed, ty, &what, rule, report) {
                Some((rc, _)) => vec![(what, rc)],
                None => continue,
            }
        };
        for (what, rc) in entries {
            count_receipt(&what, rc, node_id, c.lease_id, &mut received, report);
        }
    }
    let mut counted = Counted::default();
    for r in chain.valid() {
        let a = r.attestation().expect("valid");
        if !a.blind.is_empty() {
            counted.blind += 1;
        }
        let Some(&at) = received.get(&(a.lease_seq, r.digest.expect("read"))) else {
            report.fail(
                rule::MISSING_COUNTERSIGNATURE,
                if c.coordinator_key.is_some() {
                    format!("{}: the coordinator never countersigned it", r.what())
                } else {
                    format!(
                        "{}: no coordinator key to check a countersignature with",
                        r.what()
                    )
                },
            );
            continue;
        };
        counted.at.insert(a.lease_seq, at);
        if at > a.window_end_unix_ms.saturating_add(p.max_delay_ms) {
            counted.late += 1;
        } else {
            counted.sampled_ms += window_sampled(a);
        }
    }
    counted
}

/// One receipt (alone, or an entry of a Receipts) indexed by what it
/// countersigns, unless it names another node or lease or has no digest.
fn count_receipt(
    what: &str,
    rc: pb::Receipt,
    node_id: &str,
    lease_id: &str,
    received: &mut BTreeMap<(u64, [u8; 32]), i64>,
    report: &mut Report,
) {
    if rc.node_id != node_id || rc.lease_id != lease_id {
        report.fail(
            rule::BAD_COUNTERSIGNATURE,
            format!(
                "{what}: countersigns lease {} of node {}, not lease {lease_id} of node {node_id}",
                rc.lease_id, rc.node_id
            ),
        );
        return;
    }
    let Ok(digest) = <[u8; 32]>::try_from(rc.payload_sha256.as_slice()) else {
        report.fail(
            rule::BAD_COUNTERSIGNATURE,
            format!("{what}: payload_sha256 is not 32 bytes"),
        );
        return;
    };
    let at = received
        .entry((rc.lease_seq, digest))
        .or_insert(rc.time_unix_ms);
    *at = (*at).min(rc.time_unix_ms);
}

/// How the lease's challenges went.
struct Challenged {
    issued: usize,
    answered: usize,
    in_gaps: usize,
}

/// The lease's challenges by index (more than one at an index is a break
/// of their chain), each with its payload digest.
type ByIndex = BTreeMap<u64, Vec<(pb::Challenge, [u8; 32])>>;

/// Step 5, challenges: signed, chained, each answered live.
#[allow(clippy::too_many_arguments)]
fn check_challenges(
    c: &Chain,
    verified: &Verified,
    chain: &Placed,
    watched: &Watched,
    counted: &Counted,
    verdict: Option<&pb::LeaseVerdict>,
    span: Option<(i64, i64)>,
    node_id: &str,
    p: &Params,
    report: &mut Report,
) -> Challenged {
    let by_index = read_challenges(c, verified, node_id, report);
    let issued = by_index.values().map(Vec::len).sum::<usize>();
    let last = check_challenge_chain(&by_index, report);
    if let Some(v) = verdict {
        check_challenge_count(v, issued, last, report);
    }
    let (answered, in_gaps) = check_answers(&by_index, chain, watched, counted, span, p, report);
    Challenged {
        issued,
        answered,
        in_gaps,
    }
}

/// Bad challenges: each signed by the coordinator, for this lease and node.
fn read_challenges(c: &Chain, verified: &Verified, node_id: &str, report: &mut Report) -> ByIndex {
    let mut by_index = ByIndex::new();
    for (i, item) in c.challenges.iter().enumerate() {
        let what = format!("challenge {}", i + 1);
        let Some((ch, digest)) = open_coordinator::<pb::Challenge>(
            item,
            verified.challenges[i].as_ref(),
            types::CHALLENGE,
            &what,
            rule::BAD_CHALLENGE,
            report,
        ) else {
            continue;
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
        by_index.entry(ch.index).or_default().push((ch, digest));
    }
    by_index
}

/// The verdict's count of challenges and its last one are the bundle's.
fn check_challenge_count(
    v: &pb::LeaseVerdict,
    issued: usize,
    last: Option<[u8; 32]>,
    report: &mut Report,
) {
    let last = last.map(|d| d.to_vec()).unwrap_or_default();
    if v.challenges != issued as u64 || v.last_challenge_sha256 != last {
        report.fail(
            rule::BROKEN_CHALLENGE_CHAIN,
            format!(
                "the verdict counts {} challenges ending with {}; the bundle has {issued} ending with {}",
                v.challenges,
                hex::encode(&v.last_challenge_sha256),
                hex::encode(&last)
            ),
        );
    }
}

/// Missing challenges: each issued while a window was open is answered in
/// a record made after it and countersigned by its deadline. Returns how
/// many were answered, and how many fell in gaps (no window open).
fn check_answers(
    by_index: &ByIndex,
    chain: &Placed,
    watched: &Watched,
    counted: &Counted,
    span: Option<(i64, i64)>,
    p: &Params,
    report: &mut Report,
) -> (usize, usize) {
    // Nonces answered in valid windows: (nonce, window end, when received).
    let answers: Vec<(&[u8], i64, Option<i64>)> = chain
        .valid()
        .map(|r| r.attestation().expect("valid"))
        .flat_map(|a| {
            let at = counted.at.get(&a.lease_seq).copied();
            a.challenges
                .iter()
                .map(move |n| (n.as_slice(), a.window_end_unix_ms, at))
        })
        .collect();
    let (mut answered, mut in_gaps) = (0, 0);
    for (ch, _) in by_index.values().map(|l| &l[0]) {
        if span.is_some_and(|(_, t2)| ch.issued_unix_ms >= t2) {
            continue; // issued once the lease was over
        }
        if !watched
            .windows
            .iter()
            .any(|(s, e)| *s <= ch.issued_unix_ms && ch.issued_unix_ms < *e)
        {
            // Issued while no window was open (the agent was down): the gap
            // already costs coverage.
            in_gaps += 1;
            continue;
        }
        let due = ch.deadline_unix_ms.saturating_add(p.max_skew_ms);
        let live = answers.iter().any(|(n, end, at)| {
            *n == ch.nonce.as_slice()
                && *end > ch.issued_unix_ms - p.max_skew_ms
                && *end <= due
                && at.is_some_and(|at| at <= due)
        });
        if live {
            answered += 1;
        } else {
            report.fail(
                rule::MISSING_CHALLENGE,
                format!(
                    "challenge {}: nonce {} (issued {}, due {}) is in no record made after it was issued and countersigned by its deadline",
                    ch.index,
                    hex::encode(&ch.nonce),
                    ch.issued_unix_ms,
                    ch.deadline_unix_ms
                ),
            );
        }
    }
    (answered, in_gaps)
}

/// The challenges' own chain: indexes from 1, each naming the one before.
/// Returns the digest of the last.
fn check_challenge_chain(by_index: &ByIndex, report: &mut Report) -> Option<[u8; 32]> {
    let mut prev_digest = [0u8; 32];
    let mut expected = 1u64;
    let mut last = None;
    for (&index, list) in by_index {
        if list.len() > 1 {
            report.fail(
                rule::BROKEN_CHALLENGE_CHAIN,
                format!("{} challenges claim index {index}", list.len()),
            );
        }
        let (ch, digest) = &list[0];
        if index != expected {
            report.fail(
                rule::BROKEN_CHALLENGE_CHAIN,
                if index > expected {
                    format!("challenges {expected}..{} are missing", index - 1)
                } else {
                    format!("challenge index {index}: challenges are numbered from 1")
                },
            );
        } else if ch.prev_sha256.as_slice() != prev_digest {
            report.fail(
                rule::BROKEN_CHALLENGE_CHAIN,
                format!(
                    "challenge {index}: prev_sha256 is {}, the previous challenge hashes to {}",
                    hex::encode(&ch.prev_sha256),
                    hex::encode(prev_digest)
                ),
            );
        }
        prev_digest = *digest;
        expected = index + 1;
        last = Some(*digest);
    }
    last
}

/// Step 6, the chain's totals and coverage, and `low-coverage`.
fn summarise(
    s: &mut Summary,
    chain: &Placed,
    watched: &Watched,
    span: Option<(i64, i64)>,
    p: &Params,
    report: &mut Report,
) {
    let tally = &watched.tally;
    s.records = watched.windows.len();
    s.first_seq = tally.first_seq;
    s.last_seq = chain.members.keys().next_back().copied().unwrap_or(0);
    s.head_sha256 = chain
        .members
        .values()
        .next_back()
        .and_then(|&i| chain.reads[i].digest)
        .unwrap_or_default();
    s.sampled_ms = tally.sampled_ms;
    s.foreign_events = tally.foreign_events;
    s.kills = tally.kills;
    s.container_stops = tally.container_stops;
    s.prevented = tally.prevented;
    s.guarded_windows = tally.guarded_windows;
    s.restarts = tally.start_ids.len().saturating_sub(1) as u32;
    s.start_ids = tally.start_ids.clone();
    let (t1, t2) = span.unwrap_or_else(|| {
        (
            watched.windows.first().map_or(0, |w| w.0),
            watched.windows.last().map_or(0, |w| w.1),
        )
    });
    s.t1_unix_ms = t1;
    s.t2_unix_ms = t2;
    let ratio = |ms: i64| {
        if t2 > t1 {
            ms as f64 / (t2 - t1) as f64
        } else {
            0.0
        }
    };
    s.claimed_coverage = ratio(s.sampled_ms);
    s.coverage = ratio(s.countersigned_ms);
    if s.records > 0 && s.coverage < p.min_coverage {
        report.fail(
            rule::LOW_COVERAGE,
            format!(
                "countersigned coverage {:.4} is below {:.4} ({} ms sampled in windows countersigned in time, of {} ms; {} late, {} blind)",
                s.coverage,
                p.min_coverage,
                s.countersigned_ms,
                t2 - t1,
                s.late,
                s.blind
            ),
        );
    }
}

/// The proof's figures against the valid records'.
fn check_proof_figures(pr: &pb::LeaseProof, s: &Summary, tally: &Tally, report: &mut Report) {
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
    mismatch(
        "last_seq",
        pr.last_seq.to_string(),
        tally.last_seq.to_string(),
    );
    mismatch(
        "head_sha256",
        hex::encode(&pr.head_sha256),
        head_hex(&tally.head_sha256),
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
    mismatch(
        "prevented",
        pr.prevented.to_string(),
        s.prevented.to_string(),
    );
    mismatch("restarts", pr.restarts.to_string(), s.restarts.to_string());
    if (pr.coverage - s.claimed_coverage).abs() > 1e-6 {
        mismatch(
            "coverage",
            format!("{:.6}", pr.coverage),
            format!("{:.6}", s.claimed_coverage),
        );
    }
    if pr.t2_unix_ms <= pr.t1_unix_ms {
        report.fail(
            rule::PROOF_MISMATCH,
            format!("t2 {} is not after t1 {}", pr.t2_unix_ms, pr.t1_unix_ms),
        );
    }
}

/// The verdict's commitments against the bundle.
fn check_verdict_commitments(
    v: &pb::LeaseVerdict,
    proof: Option<&pb::LeaseProof>,
    s: &Summary,
    report: &mut Report,
) {
    let mut mismatch = |field: &str, verdict: String, here: String| {
        if verdict != here {
            report.fail(
                rule::VERDICT_MISMATCH,
                format!("{field}: the verdict says {verdict}, the bundle says {here}"),
            );
        }
    };
    if let Some(pr) = proof {
        mismatch("t1", v.t1_unix_ms.to_string(), pr.t1_unix_ms.to_string());
        mismatch("t2", v.t2_unix_ms.to_string(), pr.t2_unix_ms.to_string());
    }
    mismatch("last_seq", v.last_seq.to_string(), s.last_seq.to_string());
    mismatch(
        "head_sha256",
        hex::encode(&v.head_sha256),
        head_hex(&s.head_sha256),
    );
    if (v.coverage - s.coverage).abs() > 1e-6 {
        mismatch(
            "coverage",
            format!("{:.6}", v.coverage),
            format!("{:.6}", s.coverage),
        );
    }
}

/// The verdict a coordinator signs for a report of its own evidence: the
/// commitments are taken from what it holds, so that a bundle changed
/// afterwards disagrees with them.
pub fn verdict_for(
    report: &Report,
    gpus: &[String],
    last_challenge_sha256: Option<[u8; 32]>,
    now_unix_ms: i64,
) -> pb::LeaseVerdict {
    let s = &report.summary;
    let mut gpus = gpus.to_vec();
    gpus.sort();
    pb::LeaseVerdict {
        lease_id: s.lease_id.clone(),
        node_id: s.node_id.clone(),
        holds: report.holds(),
        reasons: report.failures.iter().map(|f| f.to_string()).collect(),
        coverage: s.coverage,
        head_sha256: hex::decode(head_hex(&s.head_sha256)).unwrap_or_default(),
        time_unix_ms: now_unix_ms,
        t1_unix_ms: s.t1_unix_ms,
        t2_unix_ms: s.t2_unix_ms,
        last_seq: s.last_seq,
        challenges: s.challenges as u64,
        last_challenge_sha256: last_challenge_sha256
            .map(|d| d.to_vec())
            .unwrap_or_default(),
        gpus,
    }
}

/// A chain head in hex; empty when there is none (all zeros: no digest is).
fn head_hex(head: &[u8; 32]) -> String {
    if *head == [0; 32] {
        String::new()
    } else {
        hex::encode(head)
    }
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
    /// Absent from chains saved before the field: 0.
    #[serde(default)]
    pub prevented: u64,
    #[serde(default)]
    pub guarded_windows: usize,
    pub start_ids: Vec<String>,
}

impl Tally {
    /// Counts one signed attestation record (its Record and payload digest).
    pub fn add(&mut self, rec: &pb::Record, a: &pb::Attestation, payload_sha256: [u8; 32]) {
        if self.start_ids.is_empty() {
            // The first record (every record adds its start id if new).
            self.first_seq = a.lease_seq;
        }
        self.last_seq = a.lease_seq;
        self.head_sha256 = payload_sha256;
        self.sampled_ms += window_sampled(a);
        self.foreign_events += a
            .holders
            .iter()
            .filter(|h| h.verdict == HolderClass::Foreign)
            .count() as u64;
        self.kills += a.enforcement.iter().filter(|e| is_kill(e)).count() as u64;
        self.container_stops += a.enforcement.iter().filter(|e| e.action == "stop").count() as u64;
        self.prevented = self.prevented.saturating_add(prevented(a));
        if a.guard == GuardMode::Open {
            self.guarded_windows += 1;
        }
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
            head_sha256: hex::decode(head_hex(&self.head_sha256)).unwrap_or_default(),
            coverage: if t2 > t1 {
                self.sampled_ms as f64 / (t2 - t1) as f64
            } else {
                0.0
            },
            foreign_events: self.foreign_events,
            kills: self.kills,
            container_stops: self.container_stops,
            prevented: self.prevented,
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
            tally.add(&rec, a, dsse::payload_sha256(env));
        }
    }
    tally.proof(lease_id, t1, t2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bundle::Trust,
        vectors::{self, Lease},
    };

    fn pinned(l: &Lease) -> Trust {
        Trust {
            coordinator_key: Some(l.coordinator().verifying_key()),
            ..Default::default()
        }
    }

    fn run(ev: &vectors::Evidence) -> Report {
        ev.bundle().verify(&pinned(&ev.lease), &vectors::params()).0
    }

    #[test]
    fn a_link_follows_the_head_that_stamped_it_and_nothing_else() {
        let mut head = Head::default();
        let mut a = pb::Attestation::default();
        head.link(&mut a);
        assert!(head.follows(a.lease_seq, &a.prev_sha256), "the first link");
        head.advance(a.lease_seq, b"record 1");
        assert!(!head.follows(a.lease_seq, &a.prev_sha256), "a repeat");
        head.link(&mut a);
        assert!(head.follows(2, &a.prev_sha256));
        assert!(!head.follows(3, &a.prev_sha256), "a gap");
        assert!(!head.follows(2, &[0; 32]), "a broken link");
    }

    #[test]
    fn an_honest_lease_holds_with_its_figures() {
        let ev = Lease::honest(6, 2).sign();
        let r = run(&ev);
        assert!(r.holds(), "{:?}", r.failures);
        let s = &r.summary;
        assert_eq!((s.records, s.first_seq, s.last_seq), (6, 1, 6));
        assert_eq!((s.coverage, s.claimed_coverage), (1.0, 1.0));
        assert_eq!((s.challenges, s.challenges_answered), (2, 2));
        assert_eq!((s.late, s.blind, s.restarts), (0, 0, 0));
        assert_eq!(s.verdict_holds, Some(true));
        assert_eq!(s.gpus.len(), 2);
    }

    #[test]
    fn a_late_window_is_not_covered_but_is_not_a_failure() {
        let mut l = Lease::honest(10, 1);
        l.delays_ms[3] = MAX_DELAY_MS + 1;
        let r = run(&l.sign());
        assert!(r.holds(), "{:?}", r.failures);
        assert_eq!(r.summary.late, 1);
        assert!((r.summary.coverage - 0.9).abs() < 1e-9);
        assert_eq!(r.summary.claimed_coverage, 1.0);
    }

    #[test]
    fn the_coordinator_judges_without_a_verdict_and_checks_the_gpus() {
        let mut l = Lease::honest(3, 1);
        l.attestations[1].gpus.clear();
        let ev = l.sign();
        let items = |v: &[Envelope]| v.iter().cloned().map(Ok).collect::<Vec<Item>>();
        let (records, receipts, challenges) = (
            items(&ev.records),
            items(&ev.receipts),
            items(&ev.challenges),
        );
        let proof = ev.proof.clone().map(Ok);
        let (nk, ck) = (l.node().verifying_key(), l.coordinator().verifying_key());
        let r = judge(
            &Chain {
                lease_id: &l.lease_id,
                node_key: &nk,
                coordinator_key: Some(&ck),
                records: &records,
                receipts: &receipts,
                proof: proof.as_ref(),
                challenges: &challenges,
                verdict: None,
            },
            &vectors::params(),
            &l.gpus,
        );
        assert_eq!(r.rules(), [rule::WRONG_GPUS]);
        let v = verdict_for(&r, &l.gpus, None, 7);
        assert!(!v.holds);
        assert_eq!(v.last_seq, 3);
        assert_eq!(v.head_sha256, dsse::payload_sha256(&ev.records[2]).to_vec());
    }

    #[test]
    fn receipts_under_one_signature_countersign_as_each_alone_would() {
        let signed = || Lease::honest(6, 1).sign();
        let entries = |ev: &vectors::Evidence| -> Vec<pb::Receipt> {
            ev.receipts
                .iter()
                .map(|e| pb::Receipt::decode(e.payload.as_slice()).unwrap())
                .collect()
        };
        let set = |by: &dsse::Signer, rs: &[pb::Receipt]| {
            by.sign_message(
                types::RECEIPTS,
                &pb::Receipts {
                    receipts: rs.to_vec(),
                },
            )
        };
        // Two sets (4 and 2 entries) stand for the six receipts.
        let mut ev = signed();
        let (rs, c) = (entries(&ev), ev.lease.coordinator());
        ev.receipts = vec![set(&c, &rs[..4]), set(&c, &rs[4..])];
        let r = run(&ev);
        assert!(r.holds(), "{:?}", r.failures);
        assert_eq!(r.summary.coverage, 1.0);

        // Signed by the node key, not the coordinator's: none counts.
        let mut ev = signed();
        let rs = entries(&ev);
        ev.receipts = vec![set(&ev.lease.node(), &rs)];
        let r = run(&ev);
        let missing = |r: &Report| -> Vec<String> {
            r.failures
                .iter()
                .filter(|f| f.rule == rule::MISSING_COUNTERSIGNATURE)
                .map(|f| f.detail.clone())
                .collect()
        };
        assert_eq!(r.rules()[0], rule::BAD_COUNTERSIGNATURE, "{:?}", r.failures);
        assert_eq!(missing(&r).len(), 6);

        // An entry naming another lease fails alone; the others count.
        let mut ev = signed();
        let (mut rs, c) = (entries(&ev), ev.lease.coordinator());
        rs[5].lease_id = "l-other".into();
        ev.receipts = vec![set(&c, &rs)];
        let r = run(&ev);
        assert_eq!(r.rules()[0], rule::BAD_COUNTERSIGNATURE, "{:?}", r.failures);
        assert!(
            r.failures[0].detail.starts_with("receipt 1 entry 6:"),
            "{:?}",
            r.failures
        );
        let missing = missing(&r);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].contains("lease seq 6"), "{missing:?}");

        // A flipped bit in the set: none counts.
        let mut ev = signed();
        let (rs, c) = (entries(&ev), ev.lease.coordinator());
        ev.receipts = vec![set(&c, &rs)];
        ev.receipts[0].payload[3] ^= 1;
        assert!(!run(&ev).holds());
    }

    #[test]
    fn an_oversize_record_is_a_bad_payload_where_it_stands() {
        let mut ev = Lease::honest(3, 1).sign();
        ev.records.push(
            ev.lease
                .node()
                .sign(types::RECORD, vec![0; dsse::MAX_PAYLOAD + 1]),
        );
        let r = run(&ev);
        assert_eq!(r.rules(), [rule::BAD_PAYLOAD]);
        assert!(r.failures[0].detail.contains("exceeds"), "{:?}", r.failures);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// Honest leases of any length and GPU count hold.
            #[test]
            fn honest_leases_hold(n in 1usize..16, gpus in 0usize..4) {
                let r = run(&Lease::honest(n, gpus).sign());
                prop_assert!(r.holds(), "{:?}", r.failures);
            }

            /// Any flipped bit of any signed item is caught.
            #[test]
            fn any_flipped_bit_fails(which in 0usize..4, i in 0usize..8, byte in 0usize..4096, bit in 0u8..8) {
                let mut ev = Lease::honest(6, 1).sign();
                let env = match which {
                    0 => &mut ev.records[i % 6],
                    1 => &mut ev.receipts[i % 6],
                    2 => &mut ev.challenges[i % 2],
                    _ => ev.verdict.as_mut().unwrap(),
                };
                let b = byte % env.payload.len();
                env.payload[b] ^= 1 << bit;
                prop_assert!(!run(&ev).holds());
            }

            /// Dropping or duplicating a record is caught; reordering the
            /// bundle changes nothing (the chain is placed by lease seq).
            #[test]
            fn drops_and_repeats_fail_and_order_does_not_matter(i in 0usize..6, j in 0usize..6, op in 0u8..3) {
                let mut ev = Lease::honest(6, 1).sign();
                match op {
                    0 => { ev.records.remove(i); prop_assert!(!run(&ev).holds()); }
                    1 => { let r = ev.records[i].clone(); ev.records.insert(j, r); prop_assert!(!run(&ev).holds()); }
                    _ => {
                        ev.records.swap(i, j);
                        ev.receipts.swap(j, i);
                        let r = run(&ev);
                        prop_assert!(r.holds(), "{:?}", r.failures);
                    }
                }
            }

            /// A duplicate costs exactly one seq-repeat, wherever it lands.
            #[test]
            fn a_duplicate_is_one_failure(i in 0usize..6, j in 0usize..7) {
                let mut ev = Lease::honest(6, 1).sign();
                let r = ev.records[i].clone();
                ev.records.insert(j, r);
                prop_assert_eq!(run(&ev).rules(), vec![rule::SEQ_REPEAT]);
            }
        }
    }
}
