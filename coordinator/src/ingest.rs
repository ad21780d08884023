//! What a newly stored record does beyond being stored: a node's answers
//! move its leases and its cluster membership along, its workload events
//! update its leases' containers, and an attestation or proof is indexed
//! under its lease with the chain's link rule checked as it arrives.
//!
//! Runs inside the store's transaction (`store::Effects`), so a record and
//! what it did commit together; the rules themselves are the pure ones of
//! `leases`, `cluster` and `warden_proto::chain`.

use rusqlite::Transaction;

use crate::{
    clock::now_ms,
    cluster, leases,
    store::{self, ChainItem, NewRecord, NodeState},
};

/// The effects of one record newly stored (a `store::Effects`).
pub fn effects(tx: &Transaction, r: &NewRecord) -> rusqlite::Result<()> {
    apply_leases(tx, &r.node_id, &r.state)?;
    apply_mesh_results(tx, &r.node_id, &r.state)?;
    if let Some(item) = &r.state.chain {
        index_chain(tx, r, item)?;
    }
    Ok(())
}

/// Moves leases along with what a node answered and reported. A node can
/// only touch its own leases and answer its own commands.
fn apply_leases(tx: &Transaction, node_id: &str, st: &NodeState) -> rusqlite::Result<()> {
    let now = now_ms();
    for r in &st.results {
        let Some(sent) = store::answer_command(tx, node_id, r)? else {
            continue;
        };
        let (Some(kind), Some(mut info)) = (sent.kind, store::get_lease(tx, &sent.lease_id)?)
        else {
            continue;
        };
        leases::apply_result(&mut info, kind, r, now);
        store::put_lease(tx, &info)?;
    }
    for ev in st.workload_events.iter().filter(|e| !e.lease_id.is_empty()) {
        if let Some(mut info) = store::get_lease(tx, &ev.lease_id)?.filter(|i| i.node_id == node_id)
        {
            leases::apply_event(&mut info, ev);
            store::put_lease(tx, &info)?;
        }
    }
    Ok(())
}

/// A member's answer to a MeshConfig moves its state in its cluster.
fn apply_mesh_results(tx: &Transaction, node_id: &str, st: &NodeState) -> rusqlite::Result<()> {
    for r in &st.results {
        let Some(sent) = store::answer_mesh_command(tx, node_id, r)? else {
            continue;
        };
        let Some(mut info) = store::get_cluster(tx, &sent.cluster_id)? else {
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
fn index_chain(tx: &Transaction, r: &NewRecord, item: &ChainItem) -> rusqlite::Result<()> {
    let lease_id = match item {
        ChainItem::Attestation { lease_id, .. } | ChainItem::Proof { lease_id } => lease_id,
    };
    let Some(mut info) = store::get_lease(tx, lease_id)?.filter(|i| i.node_id == r.node_id) else {
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
