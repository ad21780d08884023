//! Challenges: at random times the coordinator sends each running lease's
//! node a fresh nonce, signed, which must come back inside an attestation
//! before its deadline — evidence that the chain was built live, not
//! fabricated afterwards.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use warden_proto::{dsse::Signer, pb, states::LeaseState, types};

use crate::{clock::now_ms, config::LeasesConfig, registry::Registry, store::Store};

/// Runs until `shutdown`.
pub async fn run(
    store: Store,
    registry: Registry,
    signer: std::sync::Arc<Signer>,
    cfg: LeasesConfig,
    shutdown: CancellationToken,
) {
    if cfg.challenge_interval.is_zero() {
        return;
    }
    loop {
        let gap = cfg
            .challenge_interval
            .mul_f64(rand::rng().random_range(0.5..1.5))
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = tokio::time::sleep(gap) => {}
            _ = shutdown.cancelled() => return,
        }
        let leases = match store.list_leases().await {
            Ok(l) => l,
            Err(_) => return,
        };
        // A stopped lease is still attested: it is challenged too.
        for lease in leases.iter().filter(|l| {
            matches!(
                LeaseState::parse(&l.state),
                Some(LeaseState::Running | LeaseState::Stopped)
            )
        }) {
            // Only the replica holding the node's stream challenges it: once.
            let Some(tx) = registry.local_sender(&lease.node_id) else {
                continue;
            };
            // Chained per lease: each names the previous one, so a bundle
            // cannot drop one unseen.
            let (index, prev) = match store.last_challenge(&lease.lease_id).await {
                Ok(last) => last.map_or((1, [0u8; 32]), |t| (t.index + 1, t.sha256)),
                Err(_) => return,
            };
            let now = now_ms();
            let challenge = pb::Challenge {
                node_id: lease.node_id.clone(),
                lease_id: lease.lease_id.clone(),
                nonce: rand::rng().random::<[u8; 16]>().to_vec(),
                issued_unix_ms: now,
                deadline_unix_ms: now + cfg.challenge_deadline.as_millis() as i64,
                index,
                prev_sha256: prev.to_vec(),
            };
            let env = signer.sign_message(types::CHALLENGE, &challenge);
            // Stored first: a challenge counts once it is sent.
            store.put_challenge(&lease.lease_id, env.clone());
            if tx.send(Ok(env)).await.is_err() {
                continue;
            }
            tracing::debug!(lease = %lease.lease_id, nonce = %hex::encode(&challenge.nonce), "challenge sent");
        }
    }
}
