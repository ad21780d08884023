//! What a newly stored record does beyond being stored: a node's answers
//! move its leases and its cluster membership along, its workload events
//! update its leases' containers, and an attestation or proof is indexed
//! under its lease with the chain's link rule checked as it arrives.
//!
//! Runs inside the store's transaction (`store::Effects`), so a record and
//! what it did commit together; the rules themselves are the pure ones of
//! `leases`, `cluster` and `warden_proto::chain`.

use crate::{
    clock::now_ms,
    cluster, leases,
    store::{self, ChainItem, DbError, NewRecord, NodeState, Tx},
};

/// The effects of one record newly stored (a `store::Effects`).
pub fn effects(tx: &mut Tx<'_>, r: &NewRecord) -> Result<(), DbError> {
    apply_leases(tx, &r.node_id, &r.state)?;
    apply_mesh_results(tx, &r.node_id, &r.state)?;
    if let Some(item) = &r.state.chain {
        index_chain(tx, r, item)?;
    }
    Ok(())
}

/// Moves leases along with what a node answered and reported. A node can
/// only touch its own leases and answer its own commands.
fn apply_leases(tx: &mut Tx<'_>, node_id: &str, st: &NodeState) -> Result<(), DbError> {
    let now = now_ms();
    for r in &st.results {
        let Some(sent) = store::answer_command(tx, node_id, r)? else {
            continue;
        };
        let (Some(kind), Some(mut info)) = (sent.kind, store::lease_to_change(tx, &sent.lease_id)?)
        else {
            continue;
        };
        leases::apply_result(&mut info, kind, r, now);
        store::put_lease(tx, &info)?;
    }
    for ev in st.workload_events.iter().filter(|e| !e.lease_id.is_empty()) {
        if let Some(mut info) =
            store::lease_to_change(tx, &ev.lease_id)?.filter(|i| i.node_id == node_id)
        {
            leases::apply_event(&mut info, ev);
            store::put_lease(tx, &info)?;
        }
    }
    Ok(())
}

/// A member's answer to a MeshConfig moves its state in its cluster.
fn apply_mesh_results(tx: &mut Tx<'_>, node_id: &str, st: &NodeState) -> Result<(), DbError> {
    for r in &st.results {
        let Some(sent) = store::answer_mesh_command(tx, node_id, r)? else {
            continue;
        };
        let Some(mut info) = store::cluster_to_change(tx, &sent.cluster_id)? else {
            continue;
        };
        cluster::apply_result(&mut info, node_id, sent.generation, r);
        store::update_cluster(tx, &sent.cluster_id, &info)?;
    }
    Ok(())
}

/// Indexes a chain record under its lease, checking the link live: a record
/// that does not follow the last one stored is noted on the lease (it is
/// stored all the same: the verdict judges the whole chain).
fn index_chain(tx: &mut Tx<'_>, r: &NewRecord, item: &ChainItem) -> Result<(), DbError> {
    let lease_id = match item {
        ChainItem::Attestation { lease_id, .. } | ChainItem::Proof { lease_id } => lease_id,
    };
    let Some(mut info) = store::lease_to_change(tx, lease_id)?.filter(|i| i.node_id == r.node_id)
    else {
        return Ok(()); // not a lease of this node: nothing to index
    };
    if let ChainItem::Attestation {
        lease_seq,
        prev_sha256,
        ..
    } = item
    {
        let head = store::chain_head(tx, lease_id)?;
        if !head.follows(*lease_seq, prev_sha256) {
            info.chain_errors
                .push(link_error(r.seq, *lease_seq, head.lease_seq));
        }
        info.attestations += 1;
        store::put_lease(tx, &info)?;
    }
    store::index_chain_record(tx, &r.node_id, r.seq, item, &r.payload_sha256)
}

fn link_error(seq: u64, lease_seq: u64, head: u64) -> String {
    format!("record seq {seq}: lease seq {lease_seq} does not follow {head} (or its link is wrong)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        leases::Kind,
        store::{
            fixtures::{coordinator_signer, databases, node, rec},
            NodeRow,
        },
    };
    use warden_proto::{pb, states::LeaseState};

    #[tokio::test]
    async fn a_nodes_answer_moves_its_lease_and_a_broken_link_is_noted() {
        for db in databases() {
            let store = db.open();
            let signer = std::sync::Arc::new(coordinator_signer());
            store.register(node()).await.unwrap();
            let other = NodeRow {
                node_id: "n2".into(),
                ..node()
            };
            store.register(other).await.unwrap();
            let lease = pb::LeaseInfo {
                lease_id: "l-1".into(),
                node_id: "n1".into(),
                state: LeaseState::Starting.into(),
                ..Default::default()
            };
            store
                .put_lease(lease, "c-1".into(), Kind::LeaseStart)
                .await
                .unwrap();
            let answer = |node_id: &str, seq| NewRecord {
                node_id: node_id.into(),
                state: NodeState {
                    results: vec![pb::CommandResult {
                        command_id: "c-1".into(),
                        ok: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ..rec(seq, seq as u8)
            };
            // `rec(seq, d)` hashes to [d; 32].
            let link = |seq: u64, lease_seq, prev: u8| NewRecord {
                state: NodeState {
                    chain: Some(ChainItem::Attestation {
                        lease_id: "l-1".into(),
                        lease_seq,
                        prev_sha256: vec![prev; 32],
                    }),
                    ..Default::default()
                },
                ..rec(seq, seq as u8)
            };
            // Another node cannot answer n1's command.
            store
                .insert_with(vec![answer("n2", 1)], effects, signer.clone())
                .await
                .unwrap();
            assert_eq!(
                store.get_lease("l-1").await.unwrap().unwrap().state,
                LeaseState::Starting
            );
            store
                .insert_with(
                    vec![answer("n1", 1), link(2, 1, 0), link(3, 2, 2), link(4, 3, 9)],
                    effects,
                    signer,
                )
                .await
                .unwrap();
            let info = store.get_lease("l-1").await.unwrap().unwrap();
            assert_eq!(info.state, LeaseState::Running);
            assert_eq!(info.attestations, 3);
            assert_eq!(
                info.chain_errors,
                ["record seq 4: lease seq 3 does not follow 2 (or its link is wrong)"]
            );
            assert_eq!(
                store.evidence("l-1").await.unwrap().unwrap().records.len(),
                3
            );
        }
    }
}
