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
pub(crate) mod fixtures {
    //! Rows the store's tests build on.
    use super::*;

    pub fn rec(seq: u64, digest: u8) -> NewRecord {
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

    pub fn node() -> NodeRow {
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
            labels: Default::default(),
            enrolled: None,
        }
    }
}
