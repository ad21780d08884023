//! Nodes: each node's registration, when it was last heard from, how it
//! enrolled, its mesh identity, and the per-node figures the admin API lists.

use prost::Message as _;
use warden_proto::pb;

use super::{
    db::{args, DbError, Tx},
    Store, StoreError,
};
use crate::{cluster::MeshIdentity, enrollment::EnrolledBy};

/// A node as it registered.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub node_id: String,
    pub public_key: Vec<u8>,
    pub agent_version: String,
    pub hostname: String,
    pub inventory: Vec<u8>,
    pub start_id: String,
    pub peer_address: String,
    pub time_ms: i64,
    /// When the inventory was taken, by the node's clock (as records are).
    pub inventory_ms: i64,
    /// The node's WireGuard public key and reachable endpoints.
    pub mesh_public_key: Vec<u8>,
    pub mesh_endpoints: Vec<String>,
    /// What the supplier declared (region, country, tags).
    pub labels: pb::NodeLabels,
    /// How the node got in, when this registration (re)enrolls it; None
    /// keeps what is stored.
    pub enrolled: Option<EnrolledBy>,
}

/// What a registration found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The node's mesh key or endpoints are new or changed.
    pub mesh_changed: bool,
    /// The highest record seq stored for the node (0: none).
    pub last_seq: u64,
}

/// Per-node figures for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub node_id: String,
    pub public_key: Vec<u8>,
    pub agent_version: String,
    pub hostname: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub peer_address: String,
    pub records: u64,
    pub last_seq: u64,
    /// Encoded `SpoolState` from the last heartbeat, if any.
    pub spool_state: Option<Vec<u8>>,
    /// Encoded `InventorySummary`, the newest the node sent.
    pub inventory: Vec<u8>,
    /// Encoded `GpuSample`s, the latest per GPU, in index order.
    pub gpus: Vec<Vec<u8>>,
    /// Encoded `LinkSample`, the node's last link probe.
    pub link: Option<Vec<u8>>,
    pub mesh_public_key: Vec<u8>,
    pub mesh_endpoints: Vec<String>,
    /// Runs of seqs below `last_seq` with no stored record, at most [`MAX_GAPS`].
    pub missing: Vec<Gap>,
    /// As declared in the node's last Register.
    pub labels: pb::NodeLabels,
}

/// Seqs `first..=last` of a node with no stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub first: u64,
    pub last: u64,
}

/// Gap runs listed per node.
pub const MAX_GAPS: usize = 100;

/// Every node's announced mesh key and endpoints, by node id.
pub type MeshIdentities = std::collections::HashMap<String, MeshIdentity>;

impl Store {
    /// Stores a registration: whether the node's mesh key or endpoints are
    /// new or changed (its cluster's peers then need them), and the last
    /// seq stored for it (the agent's Welcome says it).
    pub async fn register(&self, node: NodeRow) -> Result<Registered, StoreError> {
        let id = node.node_id.clone();
        self.write_for(&id, move |tx| {
            let mesh_changed = upsert_node(tx, &node)?;
            let last_seq: Option<i64> = tx
                .query_row(
                    "SELECT max(seq) FROM records WHERE node_id = ?1",
                    args![node.node_id],
                    |row| row.get(0),
                )?
                .flatten();
            Ok(Registered {
                mesh_changed,
                last_seq: last_seq.unwrap_or(0) as u64,
            })
        })
        .await
    }

    /// How a node was enrolled; None for a node never registered.
    pub async fn enrolled(&self, node_id: &str) -> Result<Option<EnrolledBy>, StoreError> {
        let node_id = node_id.to_owned();
        self.read(move |tx| {
            tx.query_row(
                "SELECT enrolled FROM nodes WHERE node_id = ?1",
                args![node_id],
                |r| r.get::<String>(0),
            )
            .map(|o| o.map(|s| EnrolledBy::parse(&s)))
        })
        .await
    }

    /// Notes that a node was heard from, with the spool state its last
    /// heartbeat reported (encoded `SpoolState`); written with the next batch.
    pub fn seen(&self, node_id: &str, time_ms: i64, spool: Option<Vec<u8>>) {
        let lane = node_id.to_owned();
        let node_id = node_id.to_owned();
        self.write_later_for(&lane, move |tx| {
            tx.exec(
                "UPDATE nodes SET
                    last_seen_ms = CASE WHEN last_seen_ms > ?2 THEN last_seen_ms ELSE ?2 END,
                    spool_state = coalesce(?3, spool_state)
                 WHERE node_id = ?1",
                args![node_id, time_ms, spool],
            )?;
            Ok(())
        });
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeStats>, StoreError> {
        self.read(list_nodes).await
    }

    /// Every node's mesh key and endpoints (without the per-node figures
    /// `list_nodes` adds up).
    pub async fn mesh_identities(&self) -> Result<MeshIdentities, StoreError> {
        self.read(mesh_identities).await
    }
}

/// Whether the node's mesh key or endpoints differ from those stored (a
/// new node: true).
fn upsert_node(tx: &mut Tx<'_>, n: &NodeRow) -> Result<bool, DbError> {
    let endpoints = n.mesh_endpoints.join("\n");
    let before: Option<(Vec<u8>, String)> = tx.query_row(
        "SELECT mesh_public_key, mesh_endpoints FROM nodes WHERE node_id = ?1",
        args![n.node_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    tx.exec(
        "INSERT INTO nodes (node_id, public_key, agent_version, hostname, inventory, start_id,
                            peer_address, first_seen_ms, last_seen_ms, inventory_ms,
                            mesh_public_key, mesh_endpoints, enrolled, labels)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11, coalesce(?12, 'open'), ?13)
         ON CONFLICT (node_id) DO UPDATE SET
            agent_version = excluded.agent_version, hostname = excluded.hostname,
            inventory = excluded.inventory, inventory_ms = excluded.inventory_ms,
            mesh_public_key = excluded.mesh_public_key, mesh_endpoints = excluded.mesh_endpoints,
            start_id = excluded.start_id, labels = excluded.labels,
            peer_address = excluded.peer_address,
            enrolled = coalesce(?12, nodes.enrolled),
            last_seen_ms = CASE WHEN nodes.last_seen_ms > excluded.last_seen_ms
                                THEN nodes.last_seen_ms ELSE excluded.last_seen_ms END",
        args![
            n.node_id,
            n.public_key,
            n.agent_version,
            n.hostname,
            n.inventory,
            n.start_id,
            n.peer_address,
            n.time_ms,
            n.inventory_ms,
            n.mesh_public_key,
            endpoints,
            n.enrolled.map(|e| e.as_str()),
            n.labels.encode_to_vec()
        ],
    )?;
    Ok(before != Some((n.mesh_public_key.clone(), endpoints)))
}

fn list_nodes(tx: &mut Tx<'_>) -> Result<Vec<NodeStats>, DbError> {
    let mut nodes = tx.query_map(
        "SELECT n.node_id, n.public_key, n.agent_version, n.hostname, n.first_seen_ms,
                n.last_seen_ms, n.peer_address,
                (SELECT count(*) FROM records r WHERE r.node_id = n.node_id),
                (SELECT max(seq) FROM records r WHERE r.node_id = n.node_id),
                n.spool_state, n.inventory, n.link, n.mesh_public_key, n.mesh_endpoints,
                n.labels
         FROM nodes n ORDER BY n.node_id",
        &[],
        |row| {
            Ok(NodeStats {
                node_id: row.get(0)?,
                public_key: row.get(1)?,
                agent_version: row.get(2)?,
                hostname: row.get(3)?,
                first_seen_ms: row.get(4)?,
                last_seen_ms: row.get(5)?,
                peer_address: row.get(6)?,
                records: row.get::<i64>(7)? as u64,
                last_seq: row.get::<Option<i64>>(8)?.unwrap_or(0) as u64,
                spool_state: row.get(9)?,
                inventory: row.get(10)?,
                gpus: Vec::new(),
                link: row.get(11)?,
                mesh_public_key: row.get(12)?,
                mesh_endpoints: row.get::<String>(13)?.lines().map(str::to_owned).collect(),
                missing: Vec::new(),
                // Checked before it was stored; a row an older coordinator
                // wrote has none.
                labels: pb::NodeLabels::decode(row.get::<Vec<u8>>(14)?.as_slice())
                    .unwrap_or_default(),
            })
        },
    )?;
    for n in &mut nodes {
        n.gpus = tx.query_map(
            "SELECT sample FROM gpus WHERE node_id = ?1 ORDER BY idx, uuid",
            args![n.node_id],
            |row| row.get(0),
        )?;
        // Each stored seq whose successor is not stored, with the next stored one.
        n.missing = tx.query_map(
            "SELECT seq, next FROM (
                 SELECT seq, lead(seq) OVER (ORDER BY seq) AS next FROM records WHERE node_id = ?1
                 UNION ALL SELECT 0, (SELECT min(seq) FROM records WHERE node_id = ?1)
             ) AS runs WHERE next > seq + 1 ORDER BY seq LIMIT ?2",
            args![n.node_id, MAX_GAPS as i64],
            |row| {
                Ok(Gap {
                    first: row.get::<i64>(0)? as u64 + 1,
                    last: row.get::<i64>(1)? as u64 - 1,
                })
            },
        )?;
    }
    Ok(nodes)
}

fn mesh_identities(tx: &mut Tx<'_>) -> Result<MeshIdentities, DbError> {
    let rows = tx.query_map(
        "SELECT node_id, mesh_public_key, mesh_endpoints FROM nodes",
        &[],
        |row| {
            let endpoints: String = row.get(2)?;
            Ok((
                row.get::<String>(0)?,
                MeshIdentity {
                    public_key: row.get(1)?,
                    endpoints: endpoints.lines().map(str::to_owned).collect(),
                },
            ))
        },
    )?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{databases, node, rec};

    #[tokio::test]
    async fn registration_says_when_the_mesh_identity_changed() {
        for db in databases() {
            let store = db.open();
            let mut n = node();
            n.mesh_public_key = vec![7; 32];
            n.mesh_endpoints = vec!["192.0.2.1:51820".into()];
            let changed = |r: Registered| r.mesh_changed;
            assert!(
                changed(store.register(n.clone()).await.unwrap()),
                "a new node"
            );
            assert!(
                !changed(store.register(n.clone()).await.unwrap()),
                "the same again"
            );
            n.mesh_endpoints = vec!["192.0.2.2:51820".into()];
            assert!(
                changed(store.register(n.clone()).await.unwrap()),
                "a new endpoint"
            );
            n.mesh_public_key = vec![8; 32];
            assert!(changed(store.register(n).await.unwrap()), "a new key");
        }
    }

    #[tokio::test]
    async fn registration_says_the_last_seq_and_listing_names_the_gaps() {
        for db in databases() {
            let store = db.open();
            assert_eq!(store.register(node()).await.unwrap().last_seq, 0);
            store
                .insert(vec![rec(3, 3), rec(4, 4), rec(7, 7), rec(10, 10)])
                .await
                .unwrap();
            assert_eq!(store.register(node()).await.unwrap().last_seq, 10);
            let nodes = store.list_nodes().await.unwrap();
            let gap = |first, last| Gap { first, last };
            assert_eq!(nodes[0].missing, vec![gap(1, 2), gap(5, 6), gap(8, 9)]);
        }
    }

    #[tokio::test]
    async fn labels_are_stored_as_the_last_register_declared_them() {
        for db in databases() {
            let store = db.open();
            store.register(node()).await.unwrap();
            assert_eq!(
                store.list_nodes().await.unwrap()[0].labels,
                pb::NodeLabels::default()
            );
            let labels = pb::NodeLabels {
                region: "eu-west".into(),
                country: "DE".into(),
                tags: vec!["soc2".into()],
            };
            store
                .register(NodeRow {
                    labels: labels.clone(),
                    ..node()
                })
                .await
                .unwrap();
            assert_eq!(store.list_nodes().await.unwrap()[0].labels, labels);
        }
    }

    #[tokio::test]
    async fn enrollment_is_kept_and_only_changed_when_given() {
        use crate::enrollment::EnrolledBy;
        for db in databases() {
            let store = db.open();
            assert_eq!(store.enrolled("n1").await.unwrap(), None);
            store.register(node()).await.unwrap();
            assert_eq!(store.enrolled("n1").await.unwrap(), Some(EnrolledBy::Open));
            store
                .register(NodeRow {
                    enrolled: Some(EnrolledBy::Token),
                    ..node()
                })
                .await
                .unwrap();
            store.register(node()).await.unwrap();
            assert_eq!(store.enrolled("n1").await.unwrap(), Some(EnrolledBy::Token));
        }
    }
}
