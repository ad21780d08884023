//! `cluster export`: which leases a hired cluster ever had, and the record
//! of them this coordinator signs (docs/clusters.md, "Proof per cluster").
//! Pure: the admin service reads the rows and signs.

use std::collections::BTreeMap;

use warden_proto::{
    dsse::VerifyingKey,
    pb,
    states::{ClusterEventKind, ClusterPhase, LeaseState, MemberState},
};

/// A lease of the cluster as stored: the lease and its node's public key.
#[derive(Debug, Clone)]
pub struct LeaseRow {
    pub lease: pb::LeaseInfo,
    pub node_public_key: Vec<u8>,
}

/// Why a cluster has no record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error(
        "cluster {0} was made with `cluster set`: it has no order and no leases of its own to prove \
         (export its nodes' leases with `warden lease export`)"
    )]
    NotHired(String),
}

/// Every lease the cluster ever had, once each: its members' now, then
/// those its events name (members lost, replaced or scaled away, and their
/// replacements), in event order.
pub fn lease_ids(c: &pb::ClusterInfo) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let named = c.members.iter().map(|m| m.lease_id.as_str()).chain(
        c.events
            .iter()
            .flat_map(|e| [e.lease_id.as_str(), e.replacement_lease_id.as_str()]),
    );
    for id in named {
        if !id.is_empty() && !out.iter().any(|o| o == id) {
            out.push(id.to_owned());
        }
    }
    out
}

/// When and why a lease left the cluster: the last event that took it out
/// (at the lease's end, or the event's time while the lease has not ended:
/// a lost node may never say), else how the lease or the cluster ended;
/// (0, "") while it is a member.
fn left(c: &pb::ClusterInfo, lease: Option<&pb::LeaseInfo>, lease_id: &str) -> (i64, String) {
    let state = lease.and_then(|l| LeaseState::parse(&l.state));
    let ended_at = lease.map_or(0, |l| l.ended_unix_ms);
    if let Some(e) = c.events.iter().rev().find(|e| {
        e.lease_id == lease_id
            && matches!(
                ClusterEventKind::parse(&e.kind),
                Some(ClusterEventKind::ScaledDown | ClusterEventKind::Lost)
            )
    }) {
        let at = if ended_at > 0 {
            ended_at
        } else {
            e.time_unix_ms
        };
        return (at, e.kind.clone());
    }
    if ended_at == 0 && state != Some(LeaseState::Failed) {
        return (0, String::new());
    }
    let why = match (ClusterPhase::parse(&c.phase), state) {
        (Some(ClusterPhase::Ending | ClusterPhase::Ended), _) => "cluster-ended",
        (Some(ClusterPhase::Failed), _) => "cluster-failed",
        (_, Some(LeaseState::Failed)) => "lease-failed",
        _ => "lease-ended",
    };
    (ended_at, why.to_owned())
}

/// The record of a hired cluster as of `now`: a function of what the
/// coordinator stores (the cluster, its leases' rows by lease id) and its
/// own key. A lease with no row keeps what the cluster says of it, with
/// no node key.
pub fn record(
    c: &pb::ClusterInfo,
    rows: &BTreeMap<String, LeaseRow>,
    coordinator: &VerifyingKey,
    now: i64,
) -> Result<pb::ClusterRecord, ExportError> {
    let order = c
        .order
        .as_ref()
        .ok_or_else(|| ExportError::NotHired(c.cluster_id.clone()))?;
    let leases = lease_ids(c)
        .into_iter()
        .map(|id| {
            let row = rows.get(&id);
            let member = c.members.iter().find(|m| m.lease_id == id);
            let event_node = c.events.iter().find_map(|e| {
                if e.lease_id == id {
                    Some(e.node_id.clone())
                } else if e.replacement_lease_id == id {
                    Some(e.replacement_node_id.clone())
                } else {
                    None
                }
            });
            let node_id = row
                .map(|r| r.lease.node_id.clone())
                .or_else(|| member.map(|m| m.node_id.clone()))
                .or(event_node)
                .unwrap_or_default();
            let mut gpu_uuids = match row {
                Some(r) if !r.lease.gpu_uuids.is_empty() => r.lease.gpu_uuids.clone(),
                _ => member.map(|m| m.gpu_uuids.clone()).unwrap_or_default(),
            };
            gpu_uuids.sort();
            let lease = row.map(|r| &r.lease);
            let (left_unix_ms, left_reason) = left(c, lease, &id);
            pb::ClusterLease {
                left_reason,
                left_unix_ms,
                lease_id: id,
                node_id,
                node_public_key: row.map(|r| r.node_public_key.clone()).unwrap_or_default(),
                gpu_uuids,
                mesh_address: member
                    .filter(|m| MemberState::parse(&m.state) != Some(MemberState::Left))
                    .map(|m| m.address.clone())
                    .unwrap_or_default(),
                joined_unix_ms: lease.map_or(0, |l| l.started_unix_ms),
            }
        })
        .collect::<Vec<_>>();
    let total_ms = c.timings.as_ref().map_or(0, |t| t.total_ms);
    let over = matches!(
        ClusterPhase::parse(&c.phase),
        Some(ClusterPhase::Ended | ClusterPhase::Failed)
    );
    let ended_unix_ms = if over {
        leases.iter().map(|l| l.left_unix_ms).max().unwrap_or(0)
    } else {
        0
    };
    Ok(pb::ClusterRecord {
        cluster_id: c.cluster_id.clone(),
        coordinator_key_id: coordinator.key_id().to_owned(),
        coordinator_public_key: coordinator.as_bytes().to_vec(),
        order: Some(pb::ClusterOrderSummary {
            renter: order.renter.clone(),
            gpus: order.gpus,
            nodes: order.nodes,
            purpose: order.purpose.clone(),
            duration_seconds: order.duration_seconds,
            gpu_model: order.gpu_model.clone(),
            min_tier: order.min_tier.clone(),
            region: order.region.clone(),
            tags: order.tags.clone(),
            image: order
                .container
                .as_ref()
                .map(|s| s.image.clone())
                .unwrap_or_default(),
        }),
        created_unix_ms: c.created_unix_ms,
        ready_unix_ms: if total_ms > 0 {
            c.created_unix_ms
                .saturating_add(i64::try_from(total_ms).unwrap_or(i64::MAX))
        } else {
            0
        },
        ends_unix_ms: c.ends_unix_ms,
        ended_unix_ms,
        phase: c.phase.clone(),
        leases,
        events: c
            .events
            .iter()
            .map(|e| pb::ClusterRecordEvent {
                time_unix_ms: e.time_unix_ms,
                kind: e.kind.clone(),
                node_id: e.node_id.clone(),
                lease_id: e.lease_id.clone(),
                replacement_node_id: e.replacement_node_id.clone(),
                replacement_lease_id: e.replacement_lease_id.clone(),
                detail: e.detail.clone(),
            })
            .collect(),
        time_unix_ms: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::dsse::Signer;

    fn member(node: &str, lease: &str, addr: &str, gpus: &[&str]) -> pb::ClusterMember {
        pb::ClusterMember {
            node_id: node.into(),
            address: addr.into(),
            state: "applied".into(),
            lease_id: lease.into(),
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }
    }

    fn row(lease: &str, node: &str, gpus: &[&str], started: i64, ended: i64) -> LeaseRow {
        LeaseRow {
            lease: pb::LeaseInfo {
                lease_id: lease.into(),
                node_id: node.into(),
                state: if ended > 0 { "ended" } else { "running" }.into(),
                gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
                started_unix_ms: started,
                ended_unix_ms: ended,
                ..Default::default()
            },
            node_public_key: vec![node.len() as u8; 32],
        }
    }

    /// Two members; a third was lost and replaced by the second.
    fn cluster() -> (pb::ClusterInfo, BTreeMap<String, LeaseRow>) {
        let c = pb::ClusterInfo {
            cluster_id: "c1".into(),
            created_unix_ms: 1_000,
            ends_unix_ms: 3_601_000,
            phase: "ready".into(),
            timings: Some(pb::ClusterTimings {
                total_ms: 50,
                ..Default::default()
            }),
            order: Some(pb::ClusterOrder {
                gpus: 4,
                purpose: "none".into(),
                renter: "r".into(),
                duration_seconds: 3600,
                container: Some(pb::ContainerSpec {
                    image: "img".into(),
                    env: vec!["SECRET=x".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            members: vec![
                member("n1", "l-1", "10.90.0.1/24", &["g2", "g1"]),
                member("n3", "l-3", "10.90.0.3/24", &["g5", "g6"]),
            ],
            events: vec![
                pb::ClusterEvent {
                    time_unix_ms: 2_000,
                    kind: "lost".into(),
                    node_id: "n2".into(),
                    lease_id: "l-2".into(),
                    ..Default::default()
                },
                pb::ClusterEvent {
                    time_unix_ms: 2_500,
                    kind: "replaced".into(),
                    node_id: "n2".into(),
                    lease_id: "l-2".into(),
                    replacement_node_id: "n3".into(),
                    replacement_lease_id: "l-3".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let rows = [
            row("l-1", "n1", &["g1", "g2"], 1_010, 0),
            row("l-2", "n2", &["g3", "g4"], 1_020, 2_000),
            row("l-3", "n3", &["g6", "g5"], 2_400, 0),
        ]
        .into_iter()
        .map(|r| (r.lease.lease_id.clone(), r))
        .collect();
        (c, rows)
    }

    fn key() -> VerifyingKey {
        Signer::from_seed(&[42; 32]).verifying_key()
    }

    #[test]
    fn every_lease_ever_is_listed_once_members_first() {
        let (c, _) = cluster();
        assert_eq!(lease_ids(&c), ["l-1", "l-3", "l-2"]);
    }

    #[test]
    fn the_record_says_who_joined_and_left_and_why() {
        let (c, rows) = cluster();
        let r = record(&c, &rows, &key(), 9_000).unwrap();
        assert_eq!(r.cluster_id, "c1");
        assert_eq!(r.coordinator_key_id, key().key_id());
        assert_eq!(r.ready_unix_ms, 1_050);
        assert_eq!(r.ended_unix_ms, 0, "still running");
        assert_eq!(r.time_unix_ms, 9_000);
        let order = r.order.as_ref().unwrap();
        assert_eq!((order.gpus, order.image.as_str()), (4, "img"));
        let ids: Vec<_> = r.leases.iter().map(|l| l.lease_id.as_str()).collect();
        assert_eq!(ids, ["l-1", "l-3", "l-2"]);
        let l1 = &r.leases[0];
        assert_eq!(l1.gpu_uuids, ["g1", "g2"], "sorted");
        assert_eq!(l1.mesh_address, "10.90.0.1/24");
        assert_eq!((l1.joined_unix_ms, l1.left_unix_ms), (1_010, 0));
        assert_eq!(l1.left_reason, "");
        assert_eq!(l1.node_public_key, vec![2; 32]);
        let l2 = &r.leases[2];
        assert_eq!((l2.node_id.as_str(), l2.left_unix_ms), ("n2", 2_000));
        assert_eq!(l2.left_reason, "lost");
        assert_eq!(l2.mesh_address, "", "no longer a member");
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[1].replacement_lease_id, "l-3");
    }

    #[test]
    fn the_same_inputs_make_the_same_bytes() {
        use prost::Message as _;
        let (c, rows) = cluster();
        let a = record(&c, &rows, &key(), 9_000).unwrap().encode_to_vec();
        let b = record(&c, &rows, &key(), 9_000).unwrap().encode_to_vec();
        assert_eq!(a, b);
    }

    #[test]
    fn an_ended_cluster_ends_with_its_last_lease() {
        let (mut c, mut rows) = cluster();
        c.phase = "ended".into();
        for (id, t) in [("l-1", 5_000), ("l-3", 5_100)] {
            let r = rows.get_mut(id).unwrap();
            r.lease.ended_unix_ms = t;
            r.lease.state = "ended".into();
        }
        let r = record(&c, &rows, &key(), 9_000).unwrap();
        assert_eq!(r.ended_unix_ms, 5_100);
        assert_eq!(r.leases[0].left_reason, "cluster-ended");
        assert_eq!(r.leases[2].left_reason, "lost", "the event, not the end");
    }

    #[test]
    fn a_lost_member_whose_lease_never_ended_left_at_the_event() {
        let (c, mut rows) = cluster();
        let r = rows.get_mut("l-2").unwrap();
        r.lease.ended_unix_ms = 0;
        r.lease.state = "running".into();
        let r = record(&c, &rows, &key(), 9_000).unwrap();
        let l2 = &r.leases[2];
        assert_eq!((l2.left_unix_ms, l2.left_reason.as_str()), (2_000, "lost"));
    }

    #[test]
    fn a_lease_without_a_row_keeps_what_the_cluster_says() {
        let (c, mut rows) = cluster();
        rows.remove("l-2");
        let r = record(&c, &rows, &key(), 9_000).unwrap();
        let l2 = &r.leases[2];
        assert_eq!(l2.node_id, "n2");
        assert!(l2.node_public_key.is_empty());
    }

    #[test]
    fn a_cluster_without_an_order_has_no_record() {
        let (mut c, rows) = cluster();
        c.order = None;
        assert_eq!(
            record(&c, &rows, &key(), 0),
            Err(ExportError::NotHired("c1".into()))
        );
    }
}
