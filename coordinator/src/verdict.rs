//! The coordinator's judgement of a lease: when the proof arrives, the
//! whole chain is verified against it (`warden_proto::chain`), and a signed
//! verdict is stored with the lease and included in its bundle.

use warden_proto::{
    bundle::Bundle,
    chain::Params,
    dsse::{KeyError, Signer, VerifyingKey},
    pb, types,
};

use crate::store::{Evidence, Store};

/// The lease's evidence as a bundle (the same thing `warden verify` reads).
pub fn bundle(
    lease_id: &str,
    ev: &Evidence,
    coordinator: &VerifyingKey,
) -> Result<Bundle, KeyError> {
    Ok(Bundle {
        lease_id: lease_id.to_owned(),
        node_key: VerifyingKey::from_bytes(&ev.node_public_key)?,
        coordinator_key: Some(coordinator.clone()),
        records: ev.records.clone(),
        proof: ev.proof.clone(),
        challenges: ev.challenges.clone(),
        verdict: ev.verdict.clone(),
    })
}

/// Verifies a lease whose proof has been stored, signs the verdict and stores it.
pub async fn judge(store: &Store, signer: &Signer, lease_id: &str, min_coverage: f64) {
    let ev = match store.evidence(lease_id).await {
        Ok(Some(ev)) => ev,
        Ok(None) => return,
        Err(e) => {
            return tracing::error!(lease = lease_id, error = %e, "cannot read the lease's evidence")
        }
    };
    let b = match bundle(lease_id, &ev, &signer.verifying_key()) {
        Ok(b) => b,
        Err(e) => return tracing::error!(lease = lease_id, error = %e, "bad node key"),
    };
    let report = b.verify(&Params {
        min_coverage,
        now_unix_ms: crate::session::now_ms(),
        ..Default::default()
    });
    let verdict = pb::LeaseVerdict {
        lease_id: lease_id.to_owned(),
        node_id: ev.node_id.clone(),
        holds: report.holds(),
        reasons: report.failures.iter().map(|f| f.to_string()).collect(),
        coverage: report.summary.coverage,
        head_sha256: report.summary.head_sha256.to_vec(),
        time_unix_ms: crate::session::now_ms(),
    };
    if verdict.holds {
        tracing::info!(
            lease = lease_id,
            coverage = verdict.coverage,
            records = report.summary.records,
            "lease proof holds"
        );
    } else {
        tracing::warn!(lease = lease_id, reasons = ?verdict.reasons, "lease proof does not hold");
    }
    let env = signer.sign_message(types::VERDICT, &verdict);
    store.put_verdict(lease_id, env, verdict);
}
