//! SQLite storage of nodes, records, leases and clusters; it stores and
//! keeps what it is told, the rules that decide what to store live above it.
//!
//! One thread owns the connection; callers queue work for it through a
//! channel. The thread drains whatever is queued and commits it in one
//! transaction (`synchronous=FULL`), so many agents' records share one
//! fsync and a receipt is only ever sent for a record that is durably
//! stored. Each file here holds one part of the schema and the work on it:
//! `schema` (the file, its checks and migrations), `nodes`, `records`,
//! `leases`, `clusters`.

use std::{path::Path, thread};

use rusqlite::{Connection, Transaction};
use tokio::sync::{mpsc, oneshot};

mod clusters;
mod leases;
mod nodes;
mod records;
mod schema;

pub(crate) use clusters::{answer_mesh_command, get_cluster, update_cluster};
pub use clusters::{ClusterWrite, MeshSent};
pub(crate) use leases::{answer_command, chain_head, get_lease, index_chain_record, put_lease};
pub use leases::{ChallengeTip, Evidence, SentCommand};
pub use nodes::{Gap, MeshIdentities, NodeRow, NodeStats, Registered, MAX_GAPS};
pub use records::{
    no_effects, read_payload, ChainItem, Effects, GpuState, NewRecord, NodeState, Outcome, Stamped,
};

/// Most jobs folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("database {path} is damaged ({detail}); the coordinator will not start on it. Stop it, keep a copy of the file (with its -wal and -shm), then restore your last backup, or salvage what SQLite can read: sqlite3 {path} .recover | sqlite3 {path}.recovered, check it and move it into place")]
    Corrupt { path: String, detail: String },
    #[error("database {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the store thread has stopped")]
    Stopped,
}

/// What runs once the batch a job was in has committed (or failed to):
/// the job's answer goes out only then.
type AfterCommit = Box<dyn FnOnce(Result<(), &rusqlite::Error>) + Send>;

/// Work for the store thread, run inside the batch's transaction. An error
/// aborts the whole batch (nothing of it is committed).
type Job = Box<dyn FnOnce(&Transaction) -> rusqlite::Result<Option<AfterCommit>> + Send>;

/// Cheap handle to the store thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::UnboundedSender<Job>,
    /// The most record payload bytes a node may store.
    node_quota: u64,
}

impl Store {
    /// Opens (creating if needed) the database and starts its thread, with
    /// no storage quota.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_quota(path, u64::MAX)
    }

    /// Opens (creating if needed) the database and starts its thread.
    /// The file and its -wal and -shm are private to the owner; a damaged
    /// database is refused (SQLite's quick_check) rather than served from.
    /// No node may store more than `node_quota` bytes of record payloads.
    pub fn open_with_quota(path: &Path, node_quota: u64) -> Result<Self, StoreError> {
        let conn = schema::open(path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        thread::Builder::new()
            .name("warden-store".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(e.into())))?;
        Ok(Self { tx, node_quota })
    }

    /// Runs `f` in the next batch and answers at once (before the commit:
    /// a read waits for nothing).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(move |tx| {
            let _ = reply.send(f(tx).map_err(StoreError::from));
            Ok(None)
        }))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Runs `f` in the next batch and answers once the batch is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(move |tx| {
            let value = f(tx)?;
            let after: AfterCommit = Box::new(move |committed| {
                let _ = reply.send(
                    committed
                        .map(|()| value)
                        .map_err(|e| StoreError::Sql(clone_err(e))),
                );
            });
            Ok(Some(after))
        }))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Runs `f` in the next batch; nobody waits for it.
    fn write_later(&self, f: impl FnOnce(&Transaction) -> rusqlite::Result<()> + Send + 'static) {
        let _ = self.submit(Box::new(move |tx| f(tx).map(|()| None)));
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.tx.send(job).map_err(|_| StoreError::Stopped)
    }
}

fn run(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        apply(&mut conn, batch);
    }
}

fn apply(conn: &mut Connection, batch: Vec<Job>) {
    let mut after = Vec::new();
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        for job in batch {
            if let Some(a) = job(&tx)? {
                after.push(a);
            }
        }
        tx.commit()
    })();
    for a in after {
        a(result.as_ref().map(|_| ()));
    }
    if let Err(e) = result {
        tracing::error!(error = %e, "store transaction failed; its records were not acknowledged");
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn rec(seq: u64, digest: u8) -> NewRecord {
        NewRecord {
            node_id: "n1".into(),
            seq,
            payload_type: "t".into(),
            payload: vec![digest],
            keyid: "k".into(),
            sig: vec![0; 64],
            payload_sha256: [digest; 32],
            received_ms: 1,
            receipt: vec![9],
            state: NodeState::default(),
        }
    }

    fn node() -> NodeRow {
        NodeRow {
            node_id: "n1".into(),
            public_key: vec![1; 32],
            agent_version: "0.1.0".into(),
            hostname: "h".into(),
            inventory: vec![],
            start_id: "s".into(),
            peer_address: "127.0.0.1:1".into(),
            time_ms: 10,
            inventory_ms: 10,
            mesh_public_key: vec![],
            mesh_endpoints: vec![],
            enrolled: None,
        }
    }

    #[tokio::test]
    async fn registration_says_when_the_mesh_identity_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
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

    #[tokio::test]
    async fn stores_once_and_flags_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        store.register(node()).await.unwrap();
        let out = store.insert(vec![rec(1, 1), rec(2, 2)]).await.unwrap();
        assert_eq!(out, vec![Outcome::Stored, Outcome::Stored]);
        let out = store.insert(vec![rec(2, 2), rec(3, 3)]).await.unwrap();
        assert_eq!(out, vec![Outcome::Duplicate, Outcome::Stored]);
        let out = store.insert(vec![rec(3, 7)]).await.unwrap();
        assert_eq!(
            out,
            vec![Outcome::Conflict {
                stored_sha256: vec![3; 32]
            }]
        );
        store.seen("n1", 99, Some(vec![0x20, 0x01]));
        let nodes = store.list_nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].records, 3);
        assert_eq!(nodes[0].last_seq, 3);
        assert_eq!(nodes[0].last_seen_ms, 99);
        assert_eq!(nodes[0].first_seen_ms, 10);
        assert_eq!(nodes[0].spool_state, Some(vec![0x20, 0x01]));
        assert!(nodes[0].missing.is_empty());
    }

    #[tokio::test]
    async fn registration_says_the_last_seq_and_listing_names_the_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
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

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = Store::open(&path).unwrap();
            store.register(node()).await.unwrap();
            store.insert(vec![rec(1, 1)]).await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.insert(vec![rec(1, 1)]).await.unwrap(),
            vec![Outcome::Duplicate]
        );
        let conn = Connection::open(&path).unwrap();
        assert_eq!(read_payload(&conn, "n1", 1).unwrap(), Some(vec![1]));
    }

    #[tokio::test]
    async fn keeps_the_newest_gpu_state_and_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        store.register(node()).await.unwrap();
        let with = |seq, gpus: Vec<(&str, u32, u8, i64)>, inv: Option<(u8, i64)>| NewRecord {
            state: NodeState {
                gpus: gpus
                    .into_iter()
                    .map(|(u, i, b, t)| GpuState {
                        uuid: u.to_owned(),
                        index: i,
                        sample: vec![b],
                        time_ms: t,
                    })
                    .collect(),
                inventory: inv.map(|(b, t)| Stamped {
                    bytes: vec![b],
                    time_ms: t,
                }),
                link: None,
                ..Default::default()
            },
            ..rec(seq, seq as u8)
        };
        store
            .insert(vec![
                with(
                    1,
                    vec![("GPU-b", 1, 10, 100), ("GPU-a", 0, 20, 100)],
                    Some((1, 100)),
                ),
                // A replayed older record must not roll the state back.
                with(2, vec![("GPU-a", 0, 21, 200)], Some((2, 200))),
                with(3, vec![("GPU-a", 0, 19, 50)], Some((3, 50))),
            ])
            .await
            .unwrap();
        let n = &store.list_nodes().await.unwrap()[0];
        assert_eq!(
            n.gpus,
            vec![vec![21], vec![10]],
            "index order, newest sample"
        );
        assert_eq!(n.inventory, vec![2]);
        // A duplicate carries no new state either.
        store
            .insert(vec![with(2, vec![("GPU-a", 0, 99, 999)], None)])
            .await
            .unwrap();
        assert_eq!(store.list_nodes().await.unwrap()[0].gpus[0], vec![21]);
    }

    #[tokio::test]
    async fn a_node_over_its_storage_quota_is_refused_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_quota(&dir.path().join("c.db"), 2500).unwrap();
        store.register(node()).await.unwrap();
        store
            .register(NodeRow {
                node_id: "n2".into(),
                ..node()
            })
            .await
            .unwrap();
        let big = |node: &str, seq| NewRecord {
            node_id: node.into(),
            payload: vec![seq as u8; 1000],
            ..rec(seq, seq as u8)
        };
        let out = store
            .insert(vec![big("n1", 1), big("n1", 2), big("n1", 3), big("n2", 1)])
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![
                Outcome::Stored,
                Outcome::Stored,
                Outcome::OverQuota {
                    stored: 2000,
                    quota: 2500
                },
                Outcome::Stored
            ]
        );
        // A replay of a stored record is still receipted.
        assert_eq!(
            store.insert(vec![big("n1", 2)]).await.unwrap(),
            vec![Outcome::Duplicate]
        );
        // Counted across reopen (from the column, kept by migration 7).
        drop(store);
        let store = Store::open_with_quota(&dir.path().join("c.db"), 2500).unwrap();
        assert!(matches!(
            store.insert(vec![big("n1", 3)]).await.unwrap()[0],
            Outcome::OverQuota { stored: 2000, .. }
        ));
    }

    #[tokio::test]
    async fn enrollment_is_kept_and_only_changed_when_given() {
        use crate::enrollment::EnrolledBy;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
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

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn database_and_its_wal_and_shm_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = Store::open(&path).unwrap();
        store.register(node()).await.unwrap();
        // The -wal and -shm exist while the store's connection is open.
        for p in [
            path.clone(),
            dir.path().join("c.db-wal"),
            dir.path().join("c.db-shm"),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        drop(store);
        // One made 0644 by an older coordinator is tightened at open.
        let old = dir.path().join("old.db");
        Connection::open(&old)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        Store::open(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
    }

    /// A database with `n` records, closed (its WAL checkpointed away).
    async fn filled(path: &Path, n: u64) {
        let store = Store::open(path).unwrap();
        store.register(node()).await.unwrap();
        let recs = (1..=n)
            .map(|i| NewRecord {
                payload: vec![i as u8; 700],
                ..rec(i, i as u8)
            })
            .collect();
        store.insert(recs).await.unwrap();
        drop(store);
        // The store thread closes the connection when its channel closes.
        for _ in 0..200 {
            if !path.with_extension("db-wal").exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_damaged_database_stops_the_start_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        filled(&path, 200).await;
        // Garbage over a page in the middle of the records' b-tree.
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        assert!(bytes.len() > 8 * page, "{}", bytes.len());
        let mid = (bytes.len() / page / 2) * page;
        bytes[mid..mid + page].fill(0xA5);
        std::fs::write(&path, &bytes).unwrap();
        let err = Store::open(&path).err().expect("a damaged database opened");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(msg.contains("restore") && msg.contains(".recover"), "{msg}");

        // A file that is not SQLite at all.
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x5A; 3 * page]).unwrap();
        let err = Store::open(&junk).err().expect("junk opened");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(junk.to_str().unwrap()), "{err}");
    }

    #[tokio::test]
    async fn migrates_a_database_made_before_versioning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The first schema exactly as the first coordinator made it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO nodes VALUES ('n1', x'01', '0.1.0', 'h', x'', 's', 'p', 1, 2, NULL)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let n = &store.list_nodes().await.unwrap()[0];
        assert_eq!((n.node_id.as_str(), n.last_seen_ms), ("n1", 2));
        assert!(n.gpus.is_empty());
        drop(store);
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, schema::MIGRATIONS.len());
        // Opening again applies nothing twice.
        Store::open(&path).unwrap();
    }
}
