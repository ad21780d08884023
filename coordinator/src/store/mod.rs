//! Storage of nodes, records, leases and clusters, in SQLite (embedded,
//! the default) or PostgreSQL (shared by coordinator replicas); it stores
//! and keeps what it is told, the rules that decide what to store live
//! above it.
//!
//! One thread owns the connection; callers queue work for it through a
//! channel. The thread drains whatever is queued and commits it in one
//! transaction (SQLite's `synchronous=FULL`, PostgreSQL's commit), so many
//! agents' records share one flush and a receipt is only ever sent for a
//! record that is durably stored. Each file here holds one part of the
//! schema and the work on it: `db` (the SQL both databases speak),
//! `schema` (opening, checks and migrations), `postgres` (reaching one),
//! `nodes`, `records`, `leases`, `clusters`.

use std::{path::Path, thread, time::Duration};

use std::sync::mpsc;

use tokio::sync::oneshot;

mod clusters;
pub(crate) mod db;
mod leases;
mod nodes;
mod postgres;
pub mod presence;
mod records;
mod schema;
mod work;

pub(crate) use clusters::{answer_mesh_command, cluster_to_change, update_cluster};
pub use clusters::{ClusterWrite, MeshSent};
pub use db::{DbError, Dialect, Tx};
pub(crate) use leases::{
    answer_command, chain_head, index_chain_record, lease_to_change, put_lease,
};
pub use leases::{ChallengeTip, Evidence, SentCommand};
pub use nodes::{Gap, MeshIdentities, NodeRow, NodeStats, Registered, MAX_GAPS};
pub use postgres::PostgresTarget;
pub use records::{
    no_effects, receipt_of, sign_receipts, ChainItem, Effects, GpuState, Inserted, NewRecord,
    NodeState, Outcome, Stamped,
};
pub use work::GpuWorkRow;

use db::Conn;

/// Most jobs folded into one transaction.
const MAX_BATCH: usize = 4096;

/// How long a batch stays open for more jobs after its first: thousands of
/// agents' records and heartbeats, each arriving alone, share one commit
/// (one fsync) instead of paying one each; a receipt waits at most this
/// much longer.
const LINGER: Duration = Duration::from_millis(2);

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: String, source: DbError },
    #[error("database {path} is damaged ({detail}); the coordinator will not start on it. Stop it, keep a copy of the file (with its -wal and -shm), then restore your last backup, or salvage what SQLite can read: sqlite3 {path} .recover | sqlite3 {path}.recovered, check it and move it into place")]
    Corrupt { path: String, detail: String },
    #[error("database {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("database {database} has schema version {found}, newer than this coordinator knows ({known}): a newer coordinator migrated it; run that version (all replicas the same)")]
    Newer {
        database: String,
        found: usize,
        known: usize,
    },
    #[error("{why}")]
    PostgresConfig { why: String },
    #[error("database {target}: {source}")]
    Connect { target: String, source: DbError },
    #[error("database: {0}")]
    Sql(#[from] DbError),
    #[error("the store thread has stopped")]
    Stopped,
}

/// What runs once the batch a job was in has committed (or failed to):
/// the job's answer goes out only then.
type AfterCommit = Box<dyn FnOnce(Result<(), &DbError>) + Send>;

/// Work for the store thread, run inside the batch's transaction. An error
/// aborts the whole batch (nothing of it is committed); the jobs queued
/// after it are then given the error instead of a transaction, so each
/// caller hears what failed.
type Job = Box<dyn FnOnce(Slot<'_, '_>) -> Result<Option<AfterCommit>, DbError> + Send>;

/// What a job gets: the batch's transaction, or the error that aborted the
/// batch before the job's turn.
enum Slot<'a, 'c> {
    Run(&'a mut Tx<'c>),
    Failed(&'a DbError),
}

/// Cheap handle to the store thread.
#[derive(Clone)]
pub struct Store {
    /// Each connection's thread. Lane 0 takes everything but what belongs
    /// to one node (its records, registration, liveness), which goes to
    /// the lane its id hashes to: one node's writes stay in order, and on
    /// PostgreSQL several connections store at once instead of one waiting
    /// on each statement's round trip. SQLite has one lane (one writer).
    lanes: std::sync::Arc<[mpsc::Sender<Job>]>,
    /// The most record payload bytes a node may store.
    node_quota: u64,
}

impl Store {
    /// Opens (creating if needed) the SQLite database and starts its
    /// thread, with no storage quota.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_quota(path, u64::MAX)
    }

    /// Opens (creating if needed) the SQLite database and starts its
    /// thread. The file and its -wal and -shm are private to the owner; a
    /// damaged database is refused (SQLite's quick_check) rather than
    /// served from. No node may store more than `node_quota` bytes of
    /// record payloads.
    pub fn open_with_quota(path: &Path, node_quota: u64) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let lane = lane(move || schema::open(&path), None)?;
        Ok(Self {
            lanes: vec![lane].into(),
            node_quota,
        })
    }

    /// Connects to the PostgreSQL database, migrates it and starts the
    /// store's `connections` threads (at least one), each of which
    /// connects again whenever its connection is lost (what was queued on
    /// it meanwhile fails, and is sent again).
    pub fn open_postgres(
        target: PostgresTarget,
        node_quota: u64,
        connections: usize,
    ) -> Result<Self, StoreError> {
        let first = target.clone();
        let mut lanes = vec![lane(
            move || schema::open_postgres(&first),
            Some(target.clone()),
        )?];
        for _ in 1..connections.max(1) {
            let t = target.clone();
            lanes.push(lane(move || t.connect(), Some(target.clone()))?);
        }
        Ok(Self {
            lanes: lanes.into(),
            node_quota,
        })
    }

    /// The lane of what belongs to `node_id`.
    fn lane_of(&self, node_id: &str) -> &mpsc::Sender<Job> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(node_id);
        &self.lanes[(h % self.lanes.len() as u64) as usize]
    }

    /// Runs `f` in the next batch and answers at once (before the commit:
    /// a read waits for nothing).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(move |slot| {
            match slot {
                Slot::Run(tx) => {
                    let _ = reply.send(f(tx).map_err(StoreError::from));
                }
                Slot::Failed(e) => {
                    let _ = reply.send(Err(StoreError::Sql(e.copy())));
                }
            }
            Ok(None)
        }))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Runs `f` in the next batch and answers once the batch is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(write_job(f, reply))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Runs `f` in the next batch; nobody waits for it.
    fn write_later(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<(), DbError> + Send + 'static) {
        let _ = self.submit(Box::new(move |slot| match slot {
            Slot::Run(tx) => f(tx).map(|()| None),
            Slot::Failed(_) => Ok(None),
        }));
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.lanes[0].send(job).map_err(|_| StoreError::Stopped)
    }

    /// `write` on the lane of `node_id`'s writes.
    async fn write_for<T: Send + 'static>(
        &self,
        node_id: &str,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = write_job(f, reply);
        self.lane_of(node_id)
            .send(job)
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// `write_later` on the lane of `node_id`'s writes.
    fn write_later_for(
        &self,
        node_id: &str,
        f: impl FnOnce(&mut Tx<'_>) -> Result<(), DbError> + Send + 'static,
    ) {
        let _ = self.lane_of(node_id).send(Box::new(move |slot| match slot {
            Slot::Run(tx) => f(tx).map(|()| None),
            Slot::Failed(_) => Ok(None),
        }));
    }

    /// Reads one stored record's payload; for tests and tools.
    pub async fn payload(&self, node_id: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let node_id = node_id.to_owned();
        self.read(move |tx| {
            tx.query_row(
                "SELECT payload FROM records WHERE node_id = ?1 AND seq = ?2",
                db::args![node_id, seq as i64],
                |r| r.get(0),
            )
        })
        .await
    }
}

/// Opens a connection on a thread of its own (PostgreSQL's client runs a
/// runtime of its own, which may not start inside the caller's), waits for
/// it, and leaves the thread serving what is sent to the lane.
fn lane(
    open: impl FnOnce() -> Result<Conn, StoreError> + Send + 'static,
    reconnect: Option<PostgresTarget>,
) -> Result<mpsc::Sender<Job>, StoreError> {
    let (tx, rx) = mpsc::channel();
    let (opened, is_open) = mpsc::sync_channel(1);
    thread::Builder::new()
        .name("warden-store".into())
        .spawn(move || match open() {
            Ok(conn) => {
                let _ = opened.send(Ok(()));
                run(conn, reconnect, rx)
            }
            Err(e) => {
                let _ = opened.send(Err(e));
            }
        })
        .map_err(|e| StoreError::Sql(DbError::Failed(format!("store thread: {e}"))))?;
    is_open.recv().map_err(|_| StoreError::Stopped)??;
    Ok(tx)
}

/// A job that runs `f` and answers on `reply` once its batch is committed
/// (or failed).
fn write_job<T: Send + 'static>(
    f: impl FnOnce(&mut Tx<'_>) -> Result<T, DbError> + Send + 'static,
    reply: oneshot::Sender<Result<T, StoreError>>,
) -> Job {
    Box::new(move |slot| {
        let value = match slot {
            Slot::Run(tx) => match f(tx) {
                Ok(v) => v,
                Err(e) => {
                    let _ = reply.send(Err(StoreError::Sql(e.copy())));
                    return Err(e);
                }
            },
            Slot::Failed(e) => {
                let _ = reply.send(Err(StoreError::Sql(e.copy())));
                return Ok(None);
            }
        };
        let after: AfterCommit = Box::new(move |committed| {
            let _ = reply.send(
                committed
                    .map(|()| value)
                    .map_err(|e| StoreError::Sql(e.copy())),
            );
        });
        Ok(Some(after))
    })
}

fn run(mut conn: Conn, reconnect: Option<PostgresTarget>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let close = std::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            let left = close.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        // What queued meanwhile, even past the linger.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        if conn.is_closed() {
            if let Some(target) = &reconnect {
                match target.connect() {
                    Ok(c) => {
                        tracing::info!(database = %target, "reconnected to the database");
                        conn = c;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "database unreachable; this batch fails and its records are not acknowledged");
                        // Not a hot loop while the database is down.
                        thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        }
        apply(&mut conn, batch);
    }
}

fn apply(conn: &mut Conn, batch: Vec<Job>) {
    let mut after = Vec::new();
    let mut jobs = batch.into_iter();
    let result = conn.transaction(|tx| {
        for job in jobs.by_ref() {
            if let Some(a) = job(Slot::Run(tx))? {
                after.push(a);
            }
        }
        Ok(())
    });
    for a in after {
        a(result.as_ref().map(|_| ()));
    }
    if let Err(e) = result {
        tracing::error!(error = %e, "store transaction failed; its records were not acknowledged");
        for job in jobs {
            let _ = job(Slot::Failed(&e));
        }
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Rows the store's tests build on, and the databases they run on.
    use super::*;

    /// A database a test runs on, opened (and opened again) as a Store.
    pub enum TestDb {
        Sqlite(tempfile::TempDir),
        Postgres(Box<PostgresTarget>),
    }

    impl TestDb {
        pub fn open(&self) -> Store {
            self.open_with_quota(u64::MAX)
        }

        pub fn open_with_quota(&self, quota: u64) -> Store {
            match self {
                TestDb::Sqlite(dir) => Store::open_with_quota(&dir.path().join("c.db"), quota),
                TestDb::Postgres(t) => Store::open_postgres((**t).clone(), quota, 2),
            }
            .unwrap_or_else(|e| panic!("{self}: {e}"))
        }
    }

    impl std::fmt::Display for TestDb {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                TestDb::Sqlite(_) => f.write_str("sqlite"),
                TestDb::Postgres(t) => write!(f, "postgres {t}"),
            }
        }
    }

    /// Every database the store's tests run on: SQLite always; PostgreSQL
    /// too when `WARDEN_TEST_POSTGRES` names a server (scripts/test.sh
    /// starts one), each test in a fresh schema of its own.
    pub fn databases() -> Vec<TestDb> {
        let mut dbs = vec![TestDb::Sqlite(tempfile::tempdir().unwrap())];
        if let Some(t) = test_postgres() {
            dbs.push(TestDb::Postgres(Box::new(t)));
        }
        dbs
    }

    /// A fresh schema in the test PostgreSQL, as a target whose
    /// connections use it; None when no test server is named.
    pub fn test_postgres() -> Option<PostgresTarget> {
        let url = std::env::var("WARDEN_TEST_POSTGRES").ok()?;
        let ca = std::env::var_os("WARDEN_TEST_POSTGRES_CA").map(std::path::PathBuf::from);
        let target = PostgresTarget::new(&url, ca.as_deref(), None)
            .unwrap_or_else(|e| panic!("WARDEN_TEST_POSTGRES: {e}"));
        let schema = format!("t{}", hex::encode(rand::random::<[u8; 8]>()));
        // Off the test's runtime: the client runs one of its own.
        let admin = target.clone();
        let made = schema.clone();
        std::thread::spawn(move || {
            let mut conn = admin.connect().unwrap_or_else(|e| panic!("{e}"));
            conn.transaction(|tx| tx.batch(&format!("CREATE SCHEMA {made}")))
                .unwrap_or_else(|e| panic!("{admin}: {e}"));
        })
        .join()
        .unwrap();
        Some(target.with_options(&format!("-c search_path={schema}")))
    }

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
            state: NodeState::default(),
        }
    }

    /// The key the store's tests sign receipts with.
    pub fn coordinator_signer() -> warden_proto::dsse::Signer {
        warden_proto::dsse::Signer::from_seed(&[7; 32])
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
