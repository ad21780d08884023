//! The coordinator's judgement of a lease: when the proof arrives, the
//! whole evidence is checked (`warden_proto::chain::judge`), and a signed
//! verdict committing to what the coordinator holds is stored with the
//! lease and included in its bundle.

use warden_proto::{
    bundle::Bundle,
    chain::{self, rule, Chain, Item, Params},
    dsse::{self, KeyError, Signer, VerifyingKey},
    pb, types,
};

use crate::store::{Evidence, Store};

/// The lease's evidence as a bundle (the same thing `warden verify` reads).
/// The keys it carries are hints; a verifier pins the coordinator's.
pub fn bundle(
    lease_id: &str,
    ev: &Evidence,
    coordinator: &VerifyingKey,
) -> Result<Bundle, KeyError> {
    let items = |v: &[pb::Envelope]| v.iter().cloned().map(Ok).collect::<Vec<Item>>();
    Ok(Bundle {
        lease_id: lease_id.to_owned(),
        node_key: VerifyingKey::from_bytes(&ev.node_public_key)?,
        coordinator_key: Some(coordinator.clone()),
        records: items(&ev.records),
        receipts: items(&ev.receipts),
        proof: ev.proof.clone().map(Ok),
        challenges: items(&ev.challenges),
        verdict: ev.verdict.clone().map(Ok),
    })
}

/// The bundle as `warden lease export` writes it (pretty JSON): one helper
/// for a lease's export and a cluster's.
pub fn bundle_json(
    lease_id: &str,
    ev: &Evidence,
    coordinator: &VerifyingKey,
) -> Result<String, KeyError> {
    Ok(format!(
        "{:#}",
        bundle(lease_id, ev, coordinator)?.to_json()
    ))
}

/// The verdict on a lease's evidence, as of `now`: every rule of the chain,
/// plus T1/T2 checked against when this coordinator saw the lease start and
/// end (a node cannot move its lease in time).
pub fn verdict(
    ev: &Evidence,
    signer: &Signer,
    params: &Params,
    now: i64,
) -> Result<pb::LeaseVerdict, KeyError> {
    let node_key = VerifyingKey::from_bytes(&ev.node_public_key)?;
    let ckey = signer.verifying_key();
    let items = |v: &[pb::Envelope]| v.iter().cloned().map(Ok).collect::<Vec<Item>>();
    let (records, receipts, challenges) = (
        items(&ev.records),
        items(&ev.receipts),
        items(&ev.challenges),
    );
    let proof = ev.proof.clone().map(Ok);
    let lease = &ev.lease;
    let mut report = chain::judge(
        &Chain {
            lease_id: &lease.lease_id,
            node_key: &node_key,
            coordinator_key: Some(&ckey),
            records: &records,
            receipts: &receipts,
            proof: proof.as_ref(),
            challenges: &challenges,
            verdict: None,
        },
        params,
        &lease.gpu_uuids,
    );
    let (t1, t2) = (report.summary.t1_unix_ms, report.summary.t2_unix_ms);
    let skew = params.max_skew_ms;
    // The node's T1 is when its containers started: after the lease was
    // made here, and before the node's answer saying so arrived.
    if lease.started_unix_ms > 0
        && (t1 < lease.created_unix_ms - skew || t1 > lease.started_unix_ms + skew)
    {
        report.fail(
            rule::PROOF_MISMATCH,
            format!(
                "t1 {t1} is outside [{}, {}], when this coordinator made the lease and heard it started",
                lease.created_unix_ms, lease.started_unix_ms
            ),
        );
    }
    if lease.ended_unix_ms > 0 && (t2 < lease.started_unix_ms || t2 > lease.ended_unix_ms + skew) {
        report.fail(
            rule::PROOF_MISMATCH,
            format!(
                "t2 {t2} is outside [{}, {}], when this coordinator heard the lease start and end",
                lease.started_unix_ms, lease.ended_unix_ms
            ),
        );
    }
    let last = ev.challenges.last().map(dsse::payload_sha256);
    Ok(chain::verdict_for(&report, &lease.gpu_uuids, last, now))
}

/// Judges a lease whose proof has been stored, signs the verdict and stores it.
pub async fn judge(store: &Store, signer: &Signer, lease_id: &str, min_coverage: f64) {
    let ev = match store.evidence(lease_id).await {
        Ok(Some(ev)) => ev,
        Ok(None) => return,
        Err(e) => {
            return tracing::error!(lease = lease_id, error = %e, "cannot read the lease's evidence")
        }
    };
    let now = crate::clock::now_ms();
    let params = Params {
        min_coverage,
        now_unix_ms: now,
        ..Default::default()
    };
    let verdict = match verdict(&ev, signer, &params, now) {
        Ok(v) => v,
        Err(e) => return tracing::error!(lease = lease_id, error = %e, "bad node key"),
    };
    if verdict.holds {
        tracing::info!(
            lease = lease_id,
            coverage = verdict.coverage,
            records = ev.records.len(),
            "lease proof holds"
        );
    } else {
        tracing::warn!(lease = lease_id, reasons = ?verdict.reasons, "lease proof does not hold");
    }
    let env = signer.sign_message(types::VERDICT, &verdict);
    store.put_verdict(lease_id, env, move |info| {
        crate::leases::apply_verdict(info, verdict)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::vectors::{Lease, T1};

    fn evidence(l: &Lease, created: i64, started: i64, ended: i64) -> Evidence {
        let ev = l.sign();
        Evidence {
            node_id: l.node().key_id().to_owned(),
            node_public_key: l.node().public_key().to_vec(),
            records: ev.records,
            receipts: ev.receipts,
            proof: ev.proof,
            challenges: ev.challenges,
            verdict: None,
            lease: pb::LeaseInfo {
                lease_id: l.lease_id.clone(),
                node_id: l.node().key_id().to_owned(),
                gpu_uuids: l.gpus.clone(),
                created_unix_ms: created,
                started_unix_ms: started,
                ended_unix_ms: ended,
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_verdict_commits_to_the_evidence_and_holds_for_an_honest_lease() {
        let l = Lease::honest(6, 1);
        let ev = evidence(&l, T1 - 500, T1 + 300, l.t2 + 800);
        let v = verdict(&ev, &l.coordinator(), &Params::default(), 1).unwrap();
        assert!(v.holds, "{:?}", v.reasons);
        assert_eq!((v.t1_unix_ms, v.t2_unix_ms, v.last_seq), (l.t1, l.t2, 6));
        assert_eq!(v.challenges, 2);
        assert_eq!(
            v.last_challenge_sha256,
            dsse::payload_sha256(&ev.challenges[1]).to_vec()
        );
        assert_eq!(v.gpus, l.gpus);
        assert_eq!(v.coverage, 1.0);
    }

    #[test]
    fn a_proof_moved_in_time_against_what_the_coordinator_saw_fails() {
        let l = Lease::honest(6, 1);
        // The node claims T1 well before the coordinator even made the lease.
        let ev = evidence(&l, T1 + 20_000, T1 + 21_000, l.t2 + 800);
        let v = verdict(&ev, &l.coordinator(), &Params::default(), 1).unwrap();
        assert!(!v.holds);
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("proof-mismatch: t1")),
            "{:?}",
            v.reasons
        );
        // T2 after the node said the lease had ended.
        let ev = evidence(&l, T1 - 500, T1 + 300, l.t2 - 30_000);
        let v = verdict(&ev, &l.coordinator(), &Params::default(), 1).unwrap();
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("proof-mismatch: t2")),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn an_attestation_without_the_leased_gpu_fails_the_coordinators_judgement() {
        let mut l = Lease::honest(4, 1);
        l.attestations[2].gpus.clear();
        let mut ev = evidence(&l, T1 - 500, T1 + 300, l.t2 + 800);
        let v = verdict(&ev, &l.coordinator(), &Params::default(), 1).unwrap();
        assert!(
            v.reasons.iter().any(|r| r.starts_with("wrong-gpus")),
            "{:?}",
            v.reasons
        );
        // An all-GPU lease is judged against what the node said "all" meant.
        l.attestations[2] = l.attestations[1].clone();
        ev.lease.gpu_uuids = vec!["GPU-other".into()];
        let v = verdict(&ev, &l.coordinator(), &Params::default(), 1).unwrap();
        assert!(
            v.reasons.iter().any(|r| r.starts_with("wrong-gpus")),
            "{:?}",
            v.reasons
        );
    }
}
