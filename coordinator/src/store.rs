//! SQLite storage of nodes, records and receipts.
//!
//! One thread owns the connection; sessions talk to it through a channel.
//! The thread drains whatever is queued and commits it in one transaction
//! (`synchronous=FULL`), so many agents' records share one fsync and a
//! receipt is only ever sent for a record that is durably stored.

use std::{
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    thread,
};

use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use warden_proto::{chain::Head, pb};

use crate::leases::{self, Kind};

/// Most commands folded into one transaction.
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
    /// How the node got in, when this registration (re)enrolls it; None
    /// keeps what is stored.
    pub enrolled: Option<crate::enrollment::EnrolledBy>,
}

/// A verified record to store, with the receipt that acknowledges it.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub node_id: String,
    pub seq: u64,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub keyid: String,
    pub sig: Vec<u8>,
    pub payload_sha256: [u8; 32],
    pub received_ms: i64,
    /// The encoded, signed receipt envelope.
    pub receipt: Vec<u8>,
    /// What the record says about the node's current state, applied only
    /// when it is newer than what is stored (replays come late).
    pub state: NodeState,
}

/// The node state a record carries: GPU samples and a new inventory.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// (uuid, index, encoded `GpuSample`, sample time).
    pub gpus: Vec<(String, u32, Vec<u8>, i64)>,
    /// (encoded `InventorySummary`, record time).
    pub inventory: Option<(Vec<u8>, i64)>,
    /// (encoded `LinkSample`, probe time).
    pub link: Option<(Vec<u8>, i64)>,
    /// Answers to commands: they move leases along.
    pub results: Vec<pb::CommandResult>,
    /// Container lifecycle the node reported.
    pub workload_events: Vec<pb::WorkloadEvent>,
    /// An attestation (lease id, lease seq, prev digest) or a proof (lease id).
    pub chain: Option<ChainItem>,
}

/// A record of a lease's chain, indexed so the lease's evidence can be gathered.
#[derive(Debug, Clone)]
pub enum ChainItem {
    Attestation {
        lease_id: String,
        lease_seq: u64,
        prev_sha256: Vec<u8>,
    },
    Proof {
        lease_id: String,
    },
}

/// Everything stored about one lease's chain, for verification and export.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub node_id: String,
    pub node_public_key: Vec<u8>,
    pub records: Vec<pb::Envelope>,
    /// The coordinator's receipt of each attestation, stored on its first
    /// arrival: the live countersignatures.
    pub receipts: Vec<pb::Envelope>,
    pub proof: Option<pb::Envelope>,
    pub challenges: Vec<pb::Envelope>,
    pub verdict: Option<pb::Envelope>,
    /// The lease as the coordinator keeps it (its GPUs, when it started and ended).
    pub lease: pb::LeaseInfo,
}

/// What storing one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Newly stored.
    Stored,
    /// The same record was already stored (a replay): acknowledge again.
    Duplicate,
    /// A different record is stored under this seq: refuse.
    Conflict { stored_sha256: Vec<u8> },
    /// Storing it would take the node past `limits.node_storage_bytes`:
    /// refuse (the agent keeps it).
    OverQuota { stored: u64, quota: u64 },
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
    /// Runs of seqs (first, last) below `last_seq` with no stored record, at most [`MAX_GAPS`].
    pub missing: Vec<(u64, u64)>,
}

/// Gap runs listed per node.
pub const MAX_GAPS: usize = 100;

/// What a registration found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The node's mesh key or endpoints are new or changed.
    pub mesh_changed: bool,
    /// The highest record seq stored for the node (0: none).
    pub last_seq: u64,
}

enum Cmd {
    Register(NodeRow, oneshot::Sender<Result<Registered, StoreError>>),
    /// How a node was enrolled (None: never seen).
    Enrolled(
        String,
        oneshot::Sender<Result<Option<crate::enrollment::EnrolledBy>, StoreError>>,
    ),
    Seen {
        node_id: String,
        time_ms: i64,
        spool: Option<Vec<u8>>,
    },
    Insert(
        Vec<NewRecord>,
        oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
    ),
    ListNodes(oneshot::Sender<Result<Vec<NodeStats>, StoreError>>),
    /// A new lease (or a new command on one): the lease row as it now is,
    /// and the command sent for it.
    PutLease {
        info: pb::LeaseInfo,
        command_id: String,
        kind: Kind,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    GetLease(
        String,
        oneshot::Sender<Result<Option<pb::LeaseInfo>, StoreError>>,
    ),
    Evidence(
        String,
        oneshot::Sender<Result<Option<Evidence>, StoreError>>,
    ),
    /// A challenge sent (the signed envelope), counted on the lease.
    PutChallenge(String, pb::Envelope),
    /// The lease's last challenge: its index and payload digest.
    LastChallenge(
        String,
        oneshot::Sender<Result<Option<ChallengeTip>, StoreError>>,
    ),
    /// The coordinator's signed verdict, and what it says.
    PutVerdict(String, pb::Envelope, pb::LeaseVerdict),
    ListLeases(oneshot::Sender<Result<Vec<pb::LeaseInfo>, StoreError>>),
    /// A cluster as it now is (`None`: deleted), and the mesh configs just
    /// sent for it.
    PutCluster {
        cluster_id: String,
        info: ClusterWrite,
        sent: Vec<MeshSent>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    ListClusters(oneshot::Sender<Result<Vec<pb::ClusterInfo>, StoreError>>),
    MeshIdentities(oneshot::Sender<Result<MeshIdentities, StoreError>>),
}

/// A lease's last challenge: its index and payload digest.
pub type ChallengeTip = (u64, [u8; 32]);

/// Every node's announced mesh key and endpoints, by node id.
pub type MeshIdentities = std::collections::HashMap<String, crate::cluster::MeshIdentity>;

/// What a cluster write does to the cluster's row.
#[derive(Debug, Clone)]
pub enum ClusterWrite {
    /// Leaves it as it is (only commands are recorded).
    Keep,
    Put(pb::ClusterInfo),
    Delete,
}

/// A MeshConfig command sent to a node, so its answer finds its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSent {
    pub command_id: String,
    pub node_id: String,
    pub cluster_id: String,
    pub generation: u64,
}

/// Cheap handle to the store thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::UnboundedSender<Cmd>,
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
        private_files(path)?;
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let started = std::time::Instant::now();
        check_integrity(&conn, path)?;
        tracing::debug!(db = %path.display(), took = ?started.elapsed(), "database quick_check ok");
        init(&mut conn).map_err(|e| corrupt_or(path, e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        thread::Builder::new()
            .name("warden-store".into())
            .spawn(move || run(conn, rx, node_quota))
            .map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(e.into())))?;
        Ok(Self { tx })
    }

    /// Stores a registration: whether the node's mesh key or endpoints are
    /// new or changed (its cluster's peers then need them), and the last
    /// seq stored for it (the agent's Welcome says it).
    pub async fn register(&self, node: NodeRow) -> Result<Registered, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Register(node, tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// How a node was enrolled; None for a node never registered.
    pub async fn enrolled(
        &self,
        node_id: &str,
    ) -> Result<Option<crate::enrollment::EnrolledBy>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Enrolled(node_id.to_owned(), tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Notes that a node was heard from, with the spool state its last
    /// heartbeat reported (encoded `SpoolState`); written with the next batch.
    pub fn seen(&self, node_id: &str, time_ms: i64, spool: Option<Vec<u8>>) {
        let _ = self.send(Cmd::Seen {
            node_id: node_id.to_owned(),
            time_ms,
            spool,
        });
    }

    /// Stores records; one outcome per record, in order, after commit.
    pub async fn insert(&self, records: Vec<NewRecord>) -> Result<Vec<Outcome>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Insert(records, tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeStats>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::ListNodes(tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Saves a lease row and the command just sent for it.
    pub async fn put_lease(
        &self,
        info: pb::LeaseInfo,
        command_id: String,
        kind: Kind,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::PutLease {
            info,
            command_id,
            kind,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn get_lease(&self, lease_id: &str) -> Result<Option<pb::LeaseInfo>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::GetLease(lease_id.to_owned(), tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// A lease's chain, proof, challenges and verdict as stored (None: no such lease).
    pub async fn evidence(&self, lease_id: &str) -> Result<Option<Evidence>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Evidence(lease_id.to_owned(), tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    pub fn put_challenge(&self, lease_id: &str, env: pb::Envelope) {
        let _ = self.send(Cmd::PutChallenge(lease_id.to_owned(), env));
    }

    /// The index and digest of the lease's last challenge (what the next
    /// one chains to), if any.
    pub async fn last_challenge(&self, lease_id: &str) -> Result<Option<ChallengeTip>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::LastChallenge(lease_id.to_owned(), tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    pub fn put_verdict(&self, lease_id: &str, env: pb::Envelope, verdict: pb::LeaseVerdict) {
        let _ = self.send(Cmd::PutVerdict(lease_id.to_owned(), env, verdict));
    }

    pub async fn list_leases(&self) -> Result<Vec<pb::LeaseInfo>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::ListLeases(tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Writes a cluster and records the mesh commands sent for it.
    pub async fn put_cluster(
        &self,
        cluster_id: &str,
        info: ClusterWrite,
        sent: Vec<MeshSent>,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::PutCluster {
            cluster_id: cluster_id.to_owned(),
            info,
            sent,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Every node's mesh key and endpoints (without the per-node figures
    /// `list_nodes` adds up).
    pub async fn mesh_identities(&self) -> Result<MeshIdentities, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::MeshIdentities(tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn list_clusters(&self) -> Result<Vec<pb::ClusterInfo>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::ListClusters(tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
        self.tx.send(cmd).map_err(|_| StoreError::Stopped)
    }
}

/// Schema changes in order; `PRAGMA user_version` counts those applied, so
/// a database from an older coordinator is brought up to date at open.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema (databases made before versioning have it already,
    // hence IF NOT EXISTS).
    "CREATE TABLE IF NOT EXISTS nodes (
            node_id TEXT PRIMARY KEY,
            public_key BLOB NOT NULL,
            agent_version TEXT NOT NULL,
            hostname TEXT NOT NULL,
            inventory BLOB NOT NULL,
            start_id TEXT NOT NULL,
            peer_address TEXT NOT NULL,
            first_seen_ms INTEGER NOT NULL,
            last_seen_ms INTEGER NOT NULL,
            spool_state BLOB
        );
        CREATE TABLE IF NOT EXISTS records (
            node_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            payload_type TEXT NOT NULL,
            payload BLOB NOT NULL,
            keyid TEXT NOT NULL,
            sig BLOB NOT NULL,
            payload_sha256 BLOB NOT NULL,
            received_ms INTEGER NOT NULL,
            PRIMARY KEY (node_id, seq)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS receipts (
            node_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (node_id, seq)
        ) WITHOUT ROWID;",
    // 2: the latest state per GPU, when the stored inventory was taken, and
    // the last link probe.
    "ALTER TABLE nodes ADD COLUMN inventory_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE nodes ADD COLUMN link BLOB;
     ALTER TABLE nodes ADD COLUMN link_ms INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE gpus (
         node_id TEXT NOT NULL,
         uuid TEXT NOT NULL,
         idx INTEGER NOT NULL,
         sample BLOB NOT NULL,
         time_ms INTEGER NOT NULL,
         PRIMARY KEY (node_id, uuid)
     ) WITHOUT ROWID;",
    // 3: leases (the row is an encoded LeaseInfo) and the commands sent for them.
    "CREATE TABLE leases (
         lease_id TEXT PRIMARY KEY,
         node_id TEXT NOT NULL,
         created_ms INTEGER NOT NULL,
         info BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE commands (
         command_id TEXT PRIMARY KEY,
         node_id TEXT NOT NULL,
         lease_id TEXT NOT NULL,
         kind TEXT NOT NULL,
         result BLOB
     ) WITHOUT ROWID;",
    // 4: each lease's chain records (by the node's record seq), its
    // challenges and the verdict.
    "CREATE TABLE lease_records (
         lease_id TEXT NOT NULL,
         node_id TEXT NOT NULL,
         seq INTEGER NOT NULL,
         lease_seq INTEGER NOT NULL,
         kind TEXT NOT NULL,
         payload_sha256 BLOB NOT NULL,
         PRIMARY KEY (lease_id, seq)
     ) WITHOUT ROWID;
     CREATE TABLE challenges (
         lease_id TEXT NOT NULL,
         issued_ms INTEGER NOT NULL,
         envelope BLOB NOT NULL
     );
     CREATE INDEX challenges_lease ON challenges (lease_id);
     ALTER TABLE leases ADD COLUMN verdict BLOB;",
    // 5: the node's mesh key and endpoints, from its Register.
    "ALTER TABLE nodes ADD COLUMN mesh_public_key BLOB NOT NULL DEFAULT x'';
     ALTER TABLE nodes ADD COLUMN mesh_endpoints TEXT NOT NULL DEFAULT '';",
    // 6: clusters (the row is an encoded ClusterInfo) and the MeshConfig
    // commands sent to their members.
    "CREATE TABLE clusters (
         cluster_id TEXT PRIMARY KEY,
         info BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE mesh_commands (
         command_id TEXT PRIMARY KEY,
         node_id TEXT NOT NULL,
         cluster_id TEXT NOT NULL,
         generation INTEGER NOT NULL,
         result BLOB
     ) WITHOUT ROWID;",
    // 7: how each node was enrolled (the policy then), and the record bytes
    // it has stored (its storage quota).
    "ALTER TABLE nodes ADD COLUMN enrolled TEXT NOT NULL DEFAULT 'open';
     ALTER TABLE nodes ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
     UPDATE nodes SET stored_bytes =
         (SELECT coalesce(sum(length(payload)), 0) FROM records r WHERE r.node_id = nodes.node_id);",
];

/// Creates the database file with mode 0600 (SQLite gives its -wal and
/// -shm the database's mode), and takes group and other access away from
/// files an older coordinator made 0644.
fn private_files(path: &Path) -> Result<(), StoreError> {
    let file_err = |p: &Path| {
        let p = p.display().to_string();
        move |source| StoreError::File { path: p, source }
    };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    let mut names = vec![path.to_owned()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        names.push(p.into());
    }
    for p in names {
        match std::fs::metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(file_err(&p))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&p)(e)),
        }
    }
    Ok(())
}

/// SQLite's quick_check (every page and index entry readable and in order;
/// O(size), without integrity_check's cross-checks of indexes against
/// tables): a damaged file stops the start instead of failing later, one
/// record at a time.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let rows: Vec<String> = (|| {
        let mut stmt = conn.prepare("PRAGMA quick_check(20)")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })()
    .map_err(|e| corrupt_or(path, e))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        path: path.display().to_string(),
        detail: format!("quick_check: {}", rows.join("; ")),
    })
}

/// SQLite's "not a database" and "malformed" are a damaged file; anything
/// else (permissions, a full disk) is reported as it is.
fn corrupt_or(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::Corrupt {
                path: path.display().to_string(),
                detail: e.to_string(),
            }
        }
        _ => StoreError::Open {
            path: path.display().to_string(),
            source: e,
        },
    }
}

fn init(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let applied: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn run(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Cmd>, node_quota: u64) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        apply(&mut conn, batch, node_quota);
    }
}

/// Replies waiting for the commit of one batch.
enum Reply {
    /// Ok once committed (a registration, a lease row).
    Done(oneshot::Sender<Result<(), StoreError>>),
    Insert(
        oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
        Vec<Outcome>,
    ),
    /// A registration, and what it found.
    Registered(oneshot::Sender<Result<Registered, StoreError>>, Registered),
}

fn apply(conn: &mut Connection, batch: Vec<Cmd>, node_quota: u64) {
    let mut replies = Vec::new();
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        for cmd in batch {
            match cmd {
                Cmd::Register(node, reply) => {
                    let mesh_changed = upsert_node(&tx, &node)?;
                    let last_seq: Option<i64> = tx.query_row(
                        "SELECT max(seq) FROM records WHERE node_id = ?1",
                        params![node.node_id],
                        |row| row.get(0),
                    )?;
                    replies.push(Reply::Registered(
                        reply,
                        Registered {
                            mesh_changed,
                            last_seq: last_seq.unwrap_or(0) as u64,
                        },
                    ));
                }
                Cmd::Enrolled(node_id, reply) => {
                    let by = tx
                        .query_row(
                            "SELECT enrolled FROM nodes WHERE node_id = ?1",
                            params![node_id],
                            |r| r.get::<_, String>(0),
                        )
                        .optional()
                        .map(|o| o.map(|s| crate::enrollment::EnrolledBy::parse(&s)))
                        .map_err(StoreError::from);
                    let _ = reply.send(by);
                }
                Cmd::Seen {
                    node_id,
                    time_ms,
                    spool,
                } => {
                    tx.execute(
                        "UPDATE nodes SET last_seen_ms = max(last_seen_ms, ?2),
                                          spool_state = coalesce(?3, spool_state)
                         WHERE node_id = ?1",
                        params![node_id, time_ms, spool],
                    )?;
                }
                Cmd::Insert(records, reply) => {
                    let outcomes = records
                        .iter()
                        .map(|r| insert_record(&tx, r, node_quota))
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    replies.push(Reply::Insert(reply, outcomes));
                }
                Cmd::ListNodes(reply) => {
                    let _ = reply.send(list_nodes(&tx).map_err(StoreError::from));
                }
                Cmd::PutLease {
                    info,
                    command_id,
                    kind,
                    reply,
                } => {
                    put_lease(&tx, &info)?;
                    tx.execute(
                        "INSERT OR REPLACE INTO commands (command_id, node_id, lease_id, kind) VALUES (?1, ?2, ?3, ?4)",
                        params![command_id, info.node_id, info.lease_id, kind.as_str()],
                    )?;
                    replies.push(Reply::Done(reply));
                }
                Cmd::GetLease(id, reply) => {
                    let _ = reply.send(get_lease(&tx, &id).map_err(StoreError::from));
                }
                Cmd::Evidence(id, reply) => {
                    let _ = reply.send(evidence(&tx, &id).map_err(StoreError::from));
                }
                Cmd::PutChallenge(lease_id, env) => {
                    tx.execute(
                        "INSERT INTO challenges (lease_id, issued_ms, envelope) VALUES (?1, ?2, ?3)",
                        params![lease_id, crate::clock::now_ms(), env.encode_to_vec()],
                    )?;
                    if let Some(mut info) = get_lease(&tx, &lease_id)? {
                        info.challenges_sent += 1;
                        put_lease(&tx, &info)?;
                    }
                }
                Cmd::LastChallenge(id, reply) => {
                    let _ = reply.send(last_challenge(&tx, &id).map_err(StoreError::from));
                }
                Cmd::PutVerdict(lease_id, env, v) => {
                    tx.execute(
                        "UPDATE leases SET verdict = ?2 WHERE lease_id = ?1",
                        params![lease_id, env.encode_to_vec()],
                    )?;
                    if let Some(mut info) = get_lease(&tx, &lease_id)? {
                        info.verdict = if v.holds { "holds" } else { "fails" }.into();
                        info.verdict_reasons = v.reasons;
                        info.coverage = v.coverage;
                        put_lease(&tx, &info)?;
                    }
                }
                Cmd::ListLeases(reply) => {
                    let _ = reply.send(list_leases(&tx).map_err(StoreError::from));
                }
                Cmd::PutCluster {
                    cluster_id,
                    info,
                    sent,
                    reply,
                } => {
                    match info {
                        ClusterWrite::Put(info) => tx.execute(
                            "INSERT OR REPLACE INTO clusters (cluster_id, info) VALUES (?1, ?2)",
                            params![cluster_id, info.encode_to_vec()],
                        )?,
                        ClusterWrite::Delete => tx.execute(
                            "DELETE FROM clusters WHERE cluster_id = ?1",
                            params![cluster_id],
                        )?,
                        ClusterWrite::Keep => 0,
                    };
                    for m in sent {
                        tx.execute(
                            "INSERT OR REPLACE INTO mesh_commands (command_id, node_id, cluster_id, generation) VALUES (?1, ?2, ?3, ?4)",
                            params![m.command_id, m.node_id, m.cluster_id, m.generation as i64],
                        )?;
                    }
                    replies.push(Reply::Done(reply));
                }
                Cmd::ListClusters(reply) => {
                    let _ = reply.send(list_clusters(&tx).map_err(StoreError::from));
                }
                Cmd::MeshIdentities(reply) => {
                    let _ = reply.send(mesh_identities(&tx).map_err(StoreError::from));
                }
            }
        }
        tx.commit()
    })();
    for r in replies {
        match (r, &result) {
            (Reply::Done(tx), Ok(())) => {
                let _ = tx.send(Ok(()));
            }
            (Reply::Insert(tx, outcomes), Ok(())) => {
                let _ = tx.send(Ok(outcomes));
            }
            (Reply::Done(tx), Err(e)) => {
                let _ = tx.send(Err(StoreError::Sql(clone_err(e))));
            }
            (Reply::Insert(tx, _), Err(e)) => {
                let _ = tx.send(Err(StoreError::Sql(clone_err(e))));
            }
            (Reply::Registered(tx, changed), Ok(())) => {
                let _ = tx.send(Ok(changed));
            }
            (Reply::Registered(tx, _), Err(e)) => {
                let _ = tx.send(Err(StoreError::Sql(clone_err(e))));
            }
        }
    }
    if let Err(e) = result {
        tracing::error!(error = %e, "store transaction failed; its records were not acknowledged");
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

/// Whether the node's mesh key or endpoints differ from those stored (a
/// new node: true).
fn upsert_node(tx: &rusqlite::Transaction, n: &NodeRow) -> rusqlite::Result<bool> {
    let endpoints = n.mesh_endpoints.join("\n");
    let before: Option<(Vec<u8>, String)> = tx
        .query_row(
            "SELECT mesh_public_key, mesh_endpoints FROM nodes WHERE node_id = ?1",
            params![n.node_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    tx.execute(
        "INSERT INTO nodes (node_id, public_key, agent_version, hostname, inventory, start_id,
                            peer_address, first_seen_ms, last_seen_ms, inventory_ms,
                            mesh_public_key, mesh_endpoints, enrolled)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11, coalesce(?12, 'open'))
         ON CONFLICT (node_id) DO UPDATE SET
            agent_version = excluded.agent_version, hostname = excluded.hostname,
            inventory = excluded.inventory, inventory_ms = excluded.inventory_ms,
            mesh_public_key = excluded.mesh_public_key, mesh_endpoints = excluded.mesh_endpoints,
            start_id = excluded.start_id,
            peer_address = excluded.peer_address,
            enrolled = coalesce(?12, enrolled),
            last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
        params![
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
            n.enrolled.map(|e| e.as_str())
        ],
    )?;
    Ok(before != Some((n.mesh_public_key.clone(), endpoints)))
}

fn insert_record(
    tx: &rusqlite::Transaction,
    r: &NewRecord,
    node_quota: u64,
) -> rusqlite::Result<Outcome> {
    let seq = r.seq as i64;
    // A replay is receipted again even over quota: it takes no room.
    let stored: Option<Vec<u8>> = tx
        .query_row(
            "SELECT payload_sha256 FROM records WHERE node_id = ?1 AND seq = ?2",
            params![r.node_id, seq],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(stored) = stored {
        return Ok(if stored == r.payload_sha256 {
            Outcome::Duplicate
        } else {
            Outcome::Conflict {
                stored_sha256: stored,
            }
        });
    }
    let used: u64 = tx
        .query_row(
            "SELECT stored_bytes FROM nodes WHERE node_id = ?1",
            params![r.node_id],
            |row| row.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0)
        .max(0) as u64;
    if used.saturating_add(r.payload.len() as u64) > node_quota {
        return Ok(Outcome::OverQuota {
            stored: used,
            quota: node_quota,
        });
    }
    tx.execute(
        "INSERT INTO records (node_id, seq, payload_type, payload, keyid, sig,
                              payload_sha256, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            r.node_id,
            seq,
            r.payload_type,
            r.payload,
            r.keyid,
            r.sig,
            &r.payload_sha256[..],
            r.received_ms
        ],
    )?;
    tx.execute(
        "UPDATE nodes SET stored_bytes = stored_bytes + ?2 WHERE node_id = ?1",
        params![r.node_id, r.payload.len() as i64],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO receipts (node_id, seq, envelope) VALUES (?1, ?2, ?3)",
        params![r.node_id, seq, r.receipt],
    )?;
    apply_state(tx, &r.node_id, &r.state)?;
    if let Some(item) = &r.state.chain {
        index_chain(tx, r, item)?;
    }
    Ok(Outcome::Stored)
}

/// Indexes a chain record under its lease, checking the link live: a record
/// that does not follow the last one stored is noted on the lease (it is
/// stored all the same: the verdict judges the whole chain).
fn index_chain(
    tx: &rusqlite::Transaction,
    r: &NewRecord,
    item: &ChainItem,
) -> rusqlite::Result<()> {
    let (lease_id, lease_seq, kind) = match item {
        ChainItem::Attestation {
            lease_id,
            lease_seq,
            ..
        } => (lease_id, *lease_seq as i64, "attestation"),
        ChainItem::Proof { lease_id } => (lease_id, 0, "proof"),
    };
    let Some(mut info) = get_lease(tx, lease_id)?.filter(|i| i.node_id == r.node_id) else {
        return Ok(()); // not a lease of this node: nothing to index
    };
    if let ChainItem::Attestation {
        lease_seq,
        prev_sha256,
        ..
    } = item
    {
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT lease_seq, payload_sha256 FROM lease_records
                 WHERE lease_id = ?1 AND kind = 'attestation' ORDER BY lease_seq DESC LIMIT 1",
                [lease_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        // The head the next attestation must follow (the chain's rule,
        // `chain::Head`); none stored yet: the chain's start.
        let head = last.map_or(Head::default(), |(s, d)| Head {
            lease_seq: s as u64,
            sha256: d.try_into().unwrap_or([0xff; 32]),
        });
        if !head.follows(*lease_seq, prev_sha256) {
            info.chain_errors.push(format!(
                "record seq {}: lease seq {} does not follow {} (or its link is wrong)",
                r.seq, lease_seq, head.lease_seq
            ));
        }
        info.attestations += 1;
        put_lease(tx, &info)?;
    }
    tx.execute(
        "INSERT OR IGNORE INTO lease_records (lease_id, node_id, seq, lease_seq, kind, payload_sha256)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![lease_id, r.node_id, r.seq as i64, lease_seq, kind, &r.payload_sha256[..]],
    )?;
    Ok(())
}

fn envelope(payload_type: String, payload: Vec<u8>, keyid: String, sig: Vec<u8>) -> pb::Envelope {
    pb::Envelope {
        payload_type,
        payload,
        signatures: vec![pb::Signature { keyid, sig }],
    }
}

fn evidence(conn: &Connection, lease_id: &str) -> rusqlite::Result<Option<Evidence>> {
    let row: Option<(String, Vec<u8>, Option<Vec<u8>>)> = conn
        .query_row(
            "SELECT l.node_id, n.public_key, l.verdict FROM leases l JOIN nodes n ON n.node_id = l.node_id
             WHERE l.lease_id = ?1",
            [lease_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((node_id, node_public_key, verdict)) = row else {
        return Ok(None);
    };
    let mut stmt = conn.prepare(
        "SELECT lr.kind, r.payload_type, r.payload, r.keyid, r.sig, rc.envelope FROM lease_records lr
         JOIN records r ON r.node_id = lr.node_id AND r.seq = lr.seq
         JOIN receipts rc ON rc.node_id = lr.node_id AND rc.seq = lr.seq
         WHERE lr.lease_id = ?1 ORDER BY lr.lease_seq, lr.seq",
    )?;
    let mut records = Vec::new();
    let mut receipts = Vec::new();
    let mut proof = None;
    let rows = stmt.query_map([lease_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            envelope(r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
            r.get::<_, Vec<u8>>(5)?,
        ))
    })?;
    for row in rows {
        let (kind, env, receipt) = row?;
        if kind == "proof" {
            proof = Some(env);
        } else {
            records.push(env);
            if let Ok(r) = pb::Envelope::decode(receipt.as_slice()) {
                receipts.push(r);
            }
        }
    }
    let mut stmt = conn
        .prepare("SELECT envelope FROM challenges WHERE lease_id = ?1 ORDER BY issued_ms, rowid")?;
    let challenges = stmt
        .query_map([lease_id], |r| r.get::<_, Vec<u8>>(0))?
        .filter_map(|b| b.ok().and_then(|b| pb::Envelope::decode(b.as_slice()).ok()))
        .collect();
    let lease = get_lease(conn, lease_id)?.unwrap_or_default();
    Ok(Some(Evidence {
        node_id,
        node_public_key,
        records,
        receipts,
        proof,
        challenges,
        verdict: verdict.and_then(|b| pb::Envelope::decode(b.as_slice()).ok()),
        lease,
    }))
}

fn last_challenge(conn: &Connection, lease_id: &str) -> rusqlite::Result<Option<ChallengeTip>> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT envelope FROM challenges WHERE lease_id = ?1 ORDER BY issued_ms DESC, rowid DESC LIMIT 1",
            [lease_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(blob
        .and_then(|b| pb::Envelope::decode(b.as_slice()).ok())
        .map(|env| {
            let index = pb::Challenge::decode(env.payload.as_slice())
                .map(|c| c.index)
                .unwrap_or(0);
            (index, warden_proto::dsse::payload_sha256(&env))
        }))
}

fn put_lease(tx: &rusqlite::Transaction, info: &pb::LeaseInfo) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO leases (lease_id, node_id, created_ms, info) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (lease_id) DO UPDATE SET info = excluded.info",
        params![
            info.lease_id,
            info.node_id,
            info.created_unix_ms,
            info.encode_to_vec()
        ],
    )?;
    Ok(())
}

fn get_lease(conn: &Connection, lease_id: &str) -> rusqlite::Result<Option<pb::LeaseInfo>> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT info FROM leases WHERE lease_id = ?1",
            [lease_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(blob.and_then(|b| pb::LeaseInfo::decode(b.as_slice()).ok()))
}

fn list_leases(conn: &Connection) -> rusqlite::Result<Vec<pb::LeaseInfo>> {
    let mut stmt = conn.prepare("SELECT info FROM leases ORDER BY created_ms, lease_id")?;
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for b in rows {
        if let Ok(info) = pb::LeaseInfo::decode(b?.as_slice()) {
            out.push(info);
        }
    }
    Ok(out)
}

/// Moves leases along with what a node answered and reported. A node can
/// only touch its own leases and answer its own commands.
fn apply_leases(tx: &rusqlite::Transaction, node_id: &str, st: &NodeState) -> rusqlite::Result<()> {
    let now = crate::clock::now_ms();
    for r in &st.results {
        let cmd: Option<(String, String)> = tx
            .query_row(
                "SELECT lease_id, kind FROM commands WHERE command_id = ?1 AND node_id = ?2",
                params![r.command_id, node_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((lease_id, kind)) = cmd else {
            continue;
        };
        tx.execute(
            "UPDATE commands SET result = ?2 WHERE command_id = ?1",
            params![r.command_id, r.encode_to_vec()],
        )?;
        let (Some(kind), Some(mut info)) = (Kind::parse(&kind), get_lease(tx, &lease_id)?) else {
            continue;
        };
        leases::apply_result(&mut info, kind, r, now);
        put_lease(tx, &info)?;
    }
    for ev in st.workload_events.iter().filter(|e| !e.lease_id.is_empty()) {
        if let Some(mut info) = get_lease(tx, &ev.lease_id)?.filter(|i| i.node_id == node_id) {
            leases::apply_event(&mut info, ev);
            put_lease(tx, &info)?;
        }
    }
    Ok(())
}

/// A member's answer to a MeshConfig moves its state in its cluster.
fn apply_mesh_results(
    tx: &rusqlite::Transaction,
    node_id: &str,
    st: &NodeState,
) -> rusqlite::Result<()> {
    for r in &st.results {
        let sent: Option<(String, i64)> = tx
            .query_row(
                "SELECT cluster_id, generation FROM mesh_commands WHERE command_id = ?1 AND node_id = ?2",
                params![r.command_id, node_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((cluster_id, generation)) = sent else {
            continue;
        };
        tx.execute(
            "UPDATE mesh_commands SET result = ?2 WHERE command_id = ?1",
            params![r.command_id, r.encode_to_vec()],
        )?;
        let info: Option<Vec<u8>> = tx
            .query_row(
                "SELECT info FROM clusters WHERE cluster_id = ?1",
                params![cluster_id],
                |row| row.get(0),
            )
            .optional()?;
        let Some(mut info) = info.and_then(|b| pb::ClusterInfo::decode(b.as_slice()).ok()) else {
            continue;
        };
        crate::cluster::apply_result(&mut info, node_id, generation as u64, r);
        tx.execute(
            "UPDATE clusters SET info = ?2 WHERE cluster_id = ?1",
            params![cluster_id, info.encode_to_vec()],
        )?;
    }
    Ok(())
}

fn mesh_identities(conn: &Connection) -> rusqlite::Result<MeshIdentities> {
    let mut stmt = conn.prepare("SELECT node_id, mesh_public_key, mesh_endpoints FROM nodes")?;
    let rows = stmt.query_map([], |row| {
        let endpoints: String = row.get(2)?;
        Ok((
            row.get::<_, String>(0)?,
            crate::cluster::MeshIdentity {
                public_key: row.get(1)?,
                endpoints: endpoints.lines().map(str::to_owned).collect(),
            },
        ))
    })?;
    rows.collect()
}

fn list_clusters(conn: &Connection) -> rusqlite::Result<Vec<pb::ClusterInfo>> {
    let mut stmt = conn.prepare("SELECT info FROM clusters ORDER BY cluster_id")?;
    let rows = stmt.query_map([], |row| row.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for b in rows {
        if let Ok(c) = pb::ClusterInfo::decode(b?.as_slice()) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Keeps the newest of what is stored and what the record says.
fn apply_state(tx: &rusqlite::Transaction, node_id: &str, st: &NodeState) -> rusqlite::Result<()> {
    apply_leases(tx, node_id, st)?;
    apply_mesh_results(tx, node_id, st)?;
    for (uuid, idx, sample, time_ms) in &st.gpus {
        tx.execute(
            "INSERT INTO gpus (node_id, uuid, idx, sample, time_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (node_id, uuid) DO UPDATE SET
                idx = excluded.idx, sample = excluded.sample, time_ms = excluded.time_ms
             WHERE excluded.time_ms >= gpus.time_ms",
            params![node_id, uuid, idx, sample, time_ms],
        )?;
    }
    if let Some((link, time_ms)) = &st.link {
        tx.execute(
            "UPDATE nodes SET link = ?2, link_ms = ?3 WHERE node_id = ?1 AND link_ms <= ?3",
            params![node_id, link, time_ms],
        )?;
    }
    if let Some((inv, time_ms)) = &st.inventory {
        tx.execute(
            "UPDATE nodes SET inventory = ?2, inventory_ms = ?3 WHERE node_id = ?1 AND inventory_ms <= ?3",
            params![node_id, inv, time_ms],
        )?;
    }
    Ok(())
}

fn list_nodes(conn: &Connection) -> rusqlite::Result<Vec<NodeStats>> {
    let mut stmt = conn.prepare(
        "SELECT n.node_id, n.public_key, n.agent_version, n.hostname, n.first_seen_ms,
                n.last_seen_ms, n.peer_address,
                (SELECT count(*) FROM records r WHERE r.node_id = n.node_id),
                (SELECT max(seq) FROM records r WHERE r.node_id = n.node_id),
                n.spool_state, n.inventory, n.link, n.mesh_public_key, n.mesh_endpoints
         FROM nodes n ORDER BY n.node_id",
    )?;
    let mut gpus = conn.prepare("SELECT sample FROM gpus WHERE node_id = ?1 ORDER BY idx, uuid")?;
    // Each stored seq whose successor is not stored, with the next stored one.
    let mut gaps = conn.prepare(
        "SELECT seq, next FROM (
             SELECT seq, lead(seq) OVER (ORDER BY seq) AS next FROM records WHERE node_id = ?1
             UNION ALL SELECT 0, (SELECT min(seq) FROM records WHERE node_id = ?1)
         ) WHERE next > seq + 1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(NodeStats {
            node_id: row.get(0)?,
            public_key: row.get(1)?,
            agent_version: row.get(2)?,
            hostname: row.get(3)?,
            first_seen_ms: row.get(4)?,
            last_seen_ms: row.get(5)?,
            peer_address: row.get(6)?,
            records: row.get::<_, i64>(7)? as u64,
            last_seq: row.get::<_, Option<i64>>(8)?.unwrap_or(0) as u64,
            spool_state: row.get(9)?,
            inventory: row.get(10)?,
            gpus: Vec::new(),
            link: row.get(11)?,
            mesh_public_key: row.get(12)?,
            mesh_endpoints: row
                .get::<_, String>(13)?
                .lines()
                .map(str::to_owned)
                .collect(),
            missing: Vec::new(),
        })
    })?;
    let mut nodes = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    for n in &mut nodes {
        n.gpus = gpus
            .query_map([&n.node_id], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        n.missing = gaps
            .query_map(params![n.node_id, MAX_GAPS as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64 + 1,
                    row.get::<_, i64>(1)? as u64 - 1,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
    }
    Ok(nodes)
}

/// Reads one stored record's payload; for tests and tools.
pub fn read_payload(
    conn: &Connection,
    node_id: &str,
    seq: u64,
) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT payload FROM records WHERE node_id = ?1 AND seq = ?2",
        params![node_id, seq as i64],
        |row| row.get(0),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(nodes[0].missing, vec![(1, 2), (5, 6), (8, 9)]);
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
                    .map(|(u, i, b, t)| (u.to_owned(), i, vec![b], t))
                    .collect(),
                inventory: inv.map(|(b, t)| (vec![b], t)),
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
            conn.execute_batch(MIGRATIONS[0]).unwrap();
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
        assert_eq!(v as usize, MIGRATIONS.len());
        // Opening again applies nothing twice.
        Store::open(&path).unwrap();
    }
}
