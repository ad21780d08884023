//! The database and its schema: a SQLite file opened private and checked,
//! or a PostgreSQL database reached over TLS; either brought up to date by
//! the migrations in order.

use std::{
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use rusqlite::Connection;

use super::{db::Conn, postgres::PostgresTarget, StoreError};

/// Opens (creating if needed) the SQLite database: the file and its -wal
/// and -shm private to the owner, a damaged file refused (SQLite's
/// quick_check), the schema migrated.
pub(super) fn open(path: &Path) -> Result<Conn, StoreError> {
    private_files(path)?;
    let open_err = |source: rusqlite::Error| StoreError::Open {
        path: path.display().to_string(),
        source: source.into(),
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    // Every statement the store runs stays prepared (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    let started = std::time::Instant::now();
    check_integrity(&conn, path)?;
    tracing::debug!(db = %path.display(), took = ?started.elapsed(), "database quick_check ok");
    init(&mut conn, path)?;
    Ok(Conn::Sqlite(conn))
}

/// Connects to the PostgreSQL database and migrates its schema: one
/// replica at a time (an advisory lock held by the migrating transaction),
/// so replicas that start together apply each migration once.
pub(super) fn open_postgres(target: &PostgresTarget) -> Result<Conn, StoreError> {
    let mut conn = target.connect()?;
    let migrated = conn.transaction(|tx| {
        tx.exec("SELECT pg_advisory_xact_lock(7146740590712435)", &[])?;
        tx.batch("CREATE TABLE IF NOT EXISTS warden_schema (version BIGINT NOT NULL)")?;
        let applied = tx.query_row("SELECT version FROM warden_schema", &[], |r| {
            r.get::<i64>(0)
        })?;
        if applied.is_none() {
            tx.exec("INSERT INTO warden_schema (version) VALUES (0)", &[])?;
        }
        let applied = applied.unwrap_or(0).max(0) as usize;
        if applied > MIGRATIONS.len() {
            return Ok(Err(applied));
        }
        for m in &MIGRATIONS[applied..] {
            tx.batch(m.postgres)?;
        }
        tx.exec(
            "UPDATE warden_schema SET version = ?1",
            super::db::args![MIGRATIONS.len() as i64],
        )?;
        Ok(Ok(()))
    });
    match migrated {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(found)) => Err(StoreError::Newer {
            database: target.to_string(),
            found,
            known: MIGRATIONS.len(),
        }),
        Err(source) => Err(StoreError::Connect {
            target: target.to_string(),
            source,
        }),
    }
}

/// One schema change, as each database writes it.
pub(super) struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Schema changes in order, for both databases from one list: version N is
/// the same tables on either. SQLite counts those applied in `PRAGMA
/// user_version`, PostgreSQL in `warden_schema`, so a database from an
/// older coordinator is brought up to date at open.
pub(super) const MIGRATIONS: &[Migration] = &[
    // 1: the first schema (SQLite databases made before versioning have it
    // already, hence IF NOT EXISTS).
    Migration {
        sqlite: "CREATE TABLE IF NOT EXISTS nodes (
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
        postgres: "CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            public_key BYTEA NOT NULL,
            agent_version TEXT NOT NULL,
            hostname TEXT NOT NULL,
            inventory BYTEA NOT NULL,
            start_id TEXT NOT NULL,
            peer_address TEXT NOT NULL,
            first_seen_ms BIGINT NOT NULL,
            last_seen_ms BIGINT NOT NULL,
            spool_state BYTEA
        );
        CREATE TABLE records (
            node_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            payload_type TEXT NOT NULL,
            payload BYTEA NOT NULL,
            keyid TEXT NOT NULL,
            sig BYTEA NOT NULL,
            payload_sha256 BYTEA NOT NULL,
            received_ms BIGINT NOT NULL,
            PRIMARY KEY (node_id, seq)
        );
        CREATE TABLE receipts (
            node_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            envelope BYTEA NOT NULL,
            PRIMARY KEY (node_id, seq)
        );",
    },
    // 2: the latest state per GPU, when the stored inventory was taken, and
    // the last link probe.
    Migration {
        sqlite: "ALTER TABLE nodes ADD COLUMN inventory_ms INTEGER NOT NULL DEFAULT 0;
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
        postgres: "ALTER TABLE nodes ADD COLUMN inventory_ms BIGINT NOT NULL DEFAULT 0;
            ALTER TABLE nodes ADD COLUMN link BYTEA;
            ALTER TABLE nodes ADD COLUMN link_ms BIGINT NOT NULL DEFAULT 0;
            CREATE TABLE gpus (
                node_id TEXT NOT NULL,
                uuid TEXT NOT NULL,
                idx BIGINT NOT NULL,
                sample BYTEA NOT NULL,
                time_ms BIGINT NOT NULL,
                PRIMARY KEY (node_id, uuid)
            );",
    },
    // 3: leases (the row is an encoded LeaseInfo) and the commands sent for them.
    Migration {
        sqlite: "CREATE TABLE leases (
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
        postgres: "CREATE TABLE leases (
                lease_id TEXT PRIMARY KEY,
                node_id TEXT NOT NULL,
                created_ms BIGINT NOT NULL,
                info BYTEA NOT NULL
            );
            CREATE TABLE commands (
                command_id TEXT PRIMARY KEY,
                node_id TEXT NOT NULL,
                lease_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                result BYTEA
            );",
    },
    // 4: each lease's chain records (by the node's record seq), its
    // challenges (in the order sent: SQLite's rowid, PostgreSQL's id) and
    // the verdict.
    Migration {
        sqlite: "CREATE TABLE lease_records (
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
        postgres: "CREATE TABLE lease_records (
                lease_id TEXT NOT NULL,
                node_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                lease_seq BIGINT NOT NULL,
                kind TEXT NOT NULL,
                payload_sha256 BYTEA NOT NULL,
                PRIMARY KEY (lease_id, seq)
            );
            CREATE TABLE challenges (
                id BIGSERIAL PRIMARY KEY,
                lease_id TEXT NOT NULL,
                issued_ms BIGINT NOT NULL,
                envelope BYTEA NOT NULL
            );
            CREATE INDEX challenges_lease ON challenges (lease_id);
            ALTER TABLE leases ADD COLUMN verdict BYTEA;",
    },
    // 5: the node's mesh key and endpoints, from its Register.
    Migration {
        sqlite: "ALTER TABLE nodes ADD COLUMN mesh_public_key BLOB NOT NULL DEFAULT x'';
            ALTER TABLE nodes ADD COLUMN mesh_endpoints TEXT NOT NULL DEFAULT '';",
        postgres: "ALTER TABLE nodes ADD COLUMN mesh_public_key BYTEA NOT NULL DEFAULT ''::bytea;
            ALTER TABLE nodes ADD COLUMN mesh_endpoints TEXT NOT NULL DEFAULT '';",
    },
    // 6: clusters (the row is an encoded ClusterInfo) and the MeshConfig
    // commands sent to their members.
    Migration {
        sqlite: "CREATE TABLE clusters (
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
        postgres: "CREATE TABLE clusters (
                cluster_id TEXT PRIMARY KEY,
                info BYTEA NOT NULL
            );
            CREATE TABLE mesh_commands (
                command_id TEXT PRIMARY KEY,
                node_id TEXT NOT NULL,
                cluster_id TEXT NOT NULL,
                generation BIGINT NOT NULL,
                result BYTEA
            );",
    },
    // 7: how each node was enrolled (the policy then), and the record bytes
    // it has stored (its storage quota).
    Migration {
        sqlite: "ALTER TABLE nodes ADD COLUMN enrolled TEXT NOT NULL DEFAULT 'open';
            ALTER TABLE nodes ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
            UPDATE nodes SET stored_bytes =
                (SELECT coalesce(sum(length(payload)), 0) FROM records r WHERE r.node_id = nodes.node_id);",
        postgres: "ALTER TABLE nodes ADD COLUMN enrolled TEXT NOT NULL DEFAULT 'open';
            ALTER TABLE nodes ADD COLUMN stored_bytes BIGINT NOT NULL DEFAULT 0;
            UPDATE nodes SET stored_bytes =
                (SELECT coalesce(sum(length(payload)), 0) FROM records r WHERE r.node_id = nodes.node_id);",
    },
    // 8: the labels the node declared in its last Register (encoded NodeLabels).
    Migration {
        sqlite: "ALTER TABLE nodes ADD COLUMN labels BLOB NOT NULL DEFAULT x'';",
        postgres: "ALTER TABLE nodes ADD COLUMN labels BYTEA NOT NULL DEFAULT ''::bytea;",
    },
    // 9: replicas on one database: each replica's last heartbeat, which
    // replica holds each node's stream, and what one replica relays to
    // another (a command for a node whose stream is there, an answer for
    // the replica that sent the command).
    Migration {
        sqlite: "CREATE TABLE replicas (
                replica_id TEXT PRIMARY KEY,
                seen_ms INTEGER NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE streams (
                node_id TEXT PRIMARY KEY,
                replica_id TEXT NOT NULL,
                session INTEGER NOT NULL,
                since_ms INTEGER NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE relay (
                id INTEGER PRIMARY KEY,
                to_replica TEXT NOT NULL,
                from_replica TEXT NOT NULL,
                node_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                body BLOB NOT NULL,
                created_ms INTEGER NOT NULL
            );
            CREATE INDEX relay_to ON relay (to_replica);",
        postgres: "CREATE TABLE replicas (
                replica_id TEXT PRIMARY KEY,
                seen_ms BIGINT NOT NULL
            );
            CREATE TABLE streams (
                node_id TEXT PRIMARY KEY,
                replica_id TEXT NOT NULL,
                session BIGINT NOT NULL,
                since_ms BIGINT NOT NULL
            );
            CREATE TABLE relay (
                id BIGSERIAL PRIMARY KEY,
                to_replica TEXT NOT NULL,
                from_replica TEXT NOT NULL,
                node_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                body BYTEA NOT NULL,
                created_ms BIGINT NOT NULL
            );
            CREATE INDEX relay_to ON relay (to_replica);",
    },
    // 10: SQLite's records in arrival order, found by (node, seq) through an
    // index. Clustered by (node, seq), each node's records went into the
    // middle of the tree, and with rows of a kilobyte or more every insert
    // rebalanced pages there: the commits wrote about seven times the
    // records' bytes. Appended at the end, a page is written once full.
    // PostgreSQL's tables are heaps already. On both, `receipt_seq`: the
    // seq under which the record's receipt is stored in `receipts` when one
    // envelope (a Receipts) acknowledged several records; NULL for its own.
    Migration {
        sqlite: "CREATE TABLE records_arrived (
                id INTEGER PRIMARY KEY,
                node_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                payload_type TEXT NOT NULL,
                payload BLOB NOT NULL,
                keyid TEXT NOT NULL,
                sig BLOB NOT NULL,
                payload_sha256 BLOB NOT NULL,
                received_ms INTEGER NOT NULL,
                receipt_seq INTEGER
            );
            INSERT INTO records_arrived (node_id, seq, payload_type, payload, keyid, sig,
                                         payload_sha256, received_ms)
                SELECT node_id, seq, payload_type, payload, keyid, sig, payload_sha256, received_ms
                FROM records ORDER BY received_ms, node_id, seq;
            DROP TABLE records;
            ALTER TABLE records_arrived RENAME TO records;
            CREATE UNIQUE INDEX records_node_seq ON records (node_id, seq);",
        postgres: "ALTER TABLE records ADD COLUMN receipt_seq BIGINT;",
    },
    // 11: each GPU's last work-challenge outcome, with the NVML identity and
    // confidential-computing report of its last pass: a restarted
    // coordinator, or another replica, knows which GPUs proved themselves.
    Migration {
        sqlite: "CREATE TABLE gpu_work (
                node_id TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                passed INTEGER NOT NULL,
                at_ms INTEGER NOT NULL,
                reason TEXT NOT NULL,
                identity BLOB,
                cc_report BLOB NOT NULL,
                cc_status TEXT NOT NULL,
                PRIMARY KEY (node_id, gpu_uuid)
            ) WITHOUT ROWID;",
        postgres: "CREATE TABLE gpu_work (
                node_id TEXT NOT NULL,
                gpu_uuid TEXT NOT NULL,
                passed BIGINT NOT NULL,
                at_ms BIGINT NOT NULL,
                reason TEXT NOT NULL,
                identity BYTEA,
                cc_report BYTEA NOT NULL,
                cc_status TEXT NOT NULL,
                PRIMARY KEY (node_id, gpu_uuid)
            );",
    },
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
            source: e.into(),
        },
    }
}

fn init(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let step = |conn: &mut Connection| -> rusqlite::Result<Option<usize>> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // 16 MiB of pages (the default is 2 MiB): the pages thousands of
        // nodes append to stay in memory instead of being read back at
        // each insert. Not much more: SQLite walks the cache at each commit.
        conn.pragma_update(None, "cache_size", -16384)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let applied: usize =
            conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        if applied > MIGRATIONS.len() {
            return Ok(Some(applied));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = conn.transaction()?;
            tx.execute_batch(m.sqlite)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(None)
    };
    match step(conn).map_err(|e| corrupt_or(path, e))? {
        None => Ok(()),
        Some(found) => Err(StoreError::Newer {
            database: path.display().to_string(),
            found,
            known: MIGRATIONS.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        fixtures::{node, rec},
        NewRecord, Store, StoreError,
    };
    use std::path::Path;

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
            conn.execute_batch(MIGRATIONS[0].sqlite).unwrap();
            conn.execute(
                "INSERT INTO nodes VALUES ('n1', x'01', '0.1.0', 'h', x'', 's', 'p', 1, 2, NULL)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO records VALUES ('n1', 1, 't', x'0102', 'k', x'00', zeroblob(32), 5)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        // The record kept through the records' new table (migration 10).
        assert_eq!(store.payload("n1", 1).await.unwrap(), Some(vec![1, 2]));
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
