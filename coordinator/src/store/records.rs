//! Records: each node's signed records by seq, the receipts that
//! acknowledged them, each node's stored bytes (its quota), and the latest
//! node state they carry (GPU samples, inventory, link probe).
//!
//! A receipt is signed when its record is stored, in the same transaction:
//! the records of one node stored together are acknowledged by one
//! signature per lease among them (a `Receipts`; a `Receipt` for one), kept
//! once in `receipts` under the first of their seqs.

use std::sync::Arc;

use prost::Message;
use warden_proto::{
    dsse::Signer,
    pb::{self, Envelope},
    types,
};

use super::{
    db::{args, DbError, ToArg, Tx},
    Store, StoreError,
};

/// A verified record to store.
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
    /// What the record says about the node's current state, applied only
    /// when it is newer than what is stored (replays come late).
    pub state: NodeState,
}

/// The node state a record carries: GPU samples, a new inventory, a link
/// probe, answers to commands, container events, a link of a lease's chain.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    pub gpus: Vec<GpuState>,
    /// An encoded `InventorySummary`, stamped with the record's time.
    pub inventory: Option<Stamped>,
    /// An encoded `LinkSample`, stamped with the probe's time.
    pub link: Option<Stamped>,
    /// Answers to commands: they move leases along.
    pub results: Vec<pb::CommandResult>,
    /// Container lifecycle the node reported.
    pub workload_events: Vec<pb::WorkloadEvent>,
    /// An attestation (lease id, lease seq, prev digest) or a proof (lease id).
    pub chain: Option<ChainItem>,
}

/// One GPU's latest sample, kept per GPU (by uuid) in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuState {
    pub uuid: String,
    pub index: u32,
    /// The encoded `GpuSample`.
    pub sample: Vec<u8>,
    /// When it was sampled, by the node's clock: an older one never
    /// replaces a newer (replays come late).
    pub time_ms: i64,
}

/// Encoded bytes and when they were true, by the node's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    pub bytes: Vec<u8>,
    pub time_ms: i64,
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

/// What storing a record does beyond storing it (moving leases and
/// clusters along, indexing a lease's chain): rules that live above the
/// store, run in the transaction of the record they follow, for a record
/// newly stored (not a replay).
pub type Effects = fn(&mut Tx<'_>, &NewRecord) -> Result<(), DbError>;

/// No effects: the records are only stored.
pub fn no_effects(_: &mut Tx<'_>, _: &NewRecord) -> Result<(), DbError> {
    Ok(())
}

/// What storing some records did.
#[derive(Debug)]
pub struct Inserted {
    /// Each record with its outcome, in order.
    pub records: Vec<(NewRecord, Outcome)>,
    /// The receipts to send: for those newly stored, one envelope per node
    /// and lease among them; for a replay, the envelope stored when it was
    /// first stored. Each envelope once.
    pub receipts: Vec<Envelope>,
}

impl Inserted {
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.records.iter().map(|(_, o)| o.clone()).collect()
    }
}

impl Store {
    /// Stores records, their receipts signed by `signer`, running
    /// `effects` on each one newly stored, in the same transaction.
    pub async fn insert_with(
        &self,
        records: Vec<NewRecord>,
        effects: Effects,
        signer: Arc<Signer>,
    ) -> Result<Inserted, StoreError> {
        let quota = self.node_quota;
        let node = records
            .first()
            .map(|r| r.node_id.clone())
            .unwrap_or_default();
        self.write_for(&node, move |tx| {
            insert_records(tx, records, quota, effects, &signer)
        })
        .await
    }
}

#[cfg(test)]
impl Store {
    /// Stores records with no effects, receipts signed by the test key;
    /// one outcome per record, in order.
    pub async fn insert(&self, records: Vec<NewRecord>) -> Result<Vec<Outcome>, StoreError> {
        let signer = Arc::new(super::fixtures::coordinator_signer());
        Ok(self
            .insert_with(records, no_effects, signer)
            .await?
            .outcomes())
    }
}

/// The receipts of the records of one node and one lease (or none)
/// stored together, kept under the first one's seq; or of replays among
/// them, signed again and not kept.
struct Group {
    node_id: String,
    lease_id: String,
    /// Newly stored (kept under `anchor`), or replays.
    kept: bool,
    anchor: u64,
    entries: Vec<pb::Receipt>,
}

fn insert_records(
    tx: &mut Tx<'_>,
    records: Vec<NewRecord>,
    quota: u64,
    effects: Effects,
    signer: &Signer,
) -> Result<Inserted, DbError> {
    let mut out = Vec::with_capacity(records.len());
    let mut groups: Vec<Group> = Vec::new();
    for r in records {
        let mut entry = receipt_of(&r);
        let group = |groups: &[Group], kept| {
            groups.iter().position(|g| {
                g.kept == kept && g.node_id == r.node_id && g.lease_id == entry.lease_id
            })
        };
        let at = group(&groups, true);
        let anchor = at.map_or(r.seq, |i| groups[i].anchor);
        let (outcome, first_received) = insert_record(tx, &r, quota, effects, anchor)?;
        let at = match outcome {
            Outcome::Stored => Some((at, true)),
            // A replay is receipted as it was first received, signed
            // again with the chunk's other replays: not the stored
            // envelope, which may hold hundreds of others' receipts (a
            // node replaying one record at a time would have each sent
            // whole).
            Outcome::Duplicate => {
                entry.time_unix_ms = first_received.unwrap_or(entry.time_unix_ms);
                Some((group(&groups, false), false))
            }
            Outcome::Conflict { .. } | Outcome::OverQuota { .. } => None,
        };
        match at {
            Some((Some(i), _)) => groups[i].entries.push(entry),
            Some((None, kept)) => groups.push(Group {
                node_id: r.node_id.clone(),
                lease_id: entry.lease_id.clone(),
                kept,
                anchor,
                entries: vec![entry],
            }),
            None => {}
        }
        out.push((r, outcome));
    }
    let mut envelopes = Vec::with_capacity(groups.len());
    for g in groups {
        let env = sign_receipts(signer, g.entries);
        if g.kept {
            tx.exec(
                "INSERT INTO receipts (node_id, seq, envelope) VALUES (?1, ?2, ?3)
                 ON CONFLICT (node_id, seq) DO UPDATE SET envelope = excluded.envelope",
                args![g.node_id, g.anchor as i64, env.encode_to_vec()],
            )?;
        }
        envelopes.push(env);
    }
    Ok(Inserted {
        records: out,
        receipts: envelopes,
    })
}

/// What a record's receipt says: when it arrived, and for an attestation
/// its lease and lease seq (the live countersignature of that link).
pub fn receipt_of(r: &NewRecord) -> pb::Receipt {
    let (lease_id, lease_seq) = match &r.state.chain {
        Some(ChainItem::Attestation {
            lease_id,
            lease_seq,
            ..
        }) => (lease_id.clone(), *lease_seq),
        _ => (String::new(), 0),
    };
    pb::Receipt {
        node_id: r.node_id.clone(),
        seq: r.seq,
        payload_sha256: r.payload_sha256.to_vec(),
        time_unix_ms: r.received_ms,
        lease_id,
        lease_seq,
    }
}

/// One signature over receipts of one node and lease: a `Receipt` alone,
/// a `Receipts` for several (signing each cost more than storing it).
pub fn sign_receipts(signer: &Signer, mut entries: Vec<pb::Receipt>) -> Envelope {
    if entries.len() == 1 {
        let one = entries.remove(0);
        return signer.sign_message(types::RECEIPT, &one);
    }
    signer.sign_message(types::RECEIPTS, &pb::Receipts { receipts: entries })
}

/// Stores one record (unless it is a replay, a conflict or over quota),
/// its receipt and the node state it carries, then runs `effects` on it.
/// Idempotent by (node, seq, digest) also across replicas: of two storing
/// the same record at once, one stores it and the other finds it stored.
/// The insert comes first (one index lookup for a new record, the common
/// case); what is there is read only when it did nothing. For a replay,
/// also when it was first received.
fn insert_record(
    tx: &mut Tx<'_>,
    r: &NewRecord,
    node_quota: u64,
    effects: Effects,
    receipt_seq: u64,
) -> Result<(Outcome, Option<i64>), DbError> {
    let seq = r.seq as i64;
    let size = r.payload.len() as i64;
    // The room is taken first, where the quota has it: the check and the
    // count in one statement.
    let quota = i64::try_from(node_quota).unwrap_or(i64::MAX);
    let took = tx.query_row(
        "UPDATE nodes SET stored_bytes = stored_bytes + ?2
         WHERE node_id = ?1 AND stored_bytes + ?2 <= ?3 RETURNING stored_bytes",
        args![r.node_id, size, quota],
        |row| row.get::<i64>(0),
    )?;
    if took.is_none() {
        let used: Option<i64> = tx.query_row(
            "SELECT stored_bytes FROM nodes WHERE node_id = ?1",
            args![r.node_id],
            |row| row.get(0),
        )?;
        // A node with no row has nothing to charge (tools, tests).
        if let Some(used) = used {
            // A replay is receipted again even over quota: it takes no room.
            return Ok(stored_as(tx, r)?.unwrap_or((
                Outcome::OverQuota {
                    stored: used.max(0) as u64,
                    quota: node_quota,
                },
                None,
            )));
        }
    }
    let inserted = tx.exec(
        "INSERT INTO records (node_id, seq, payload_type, payload, keyid, sig,
                              payload_sha256, received_ms, receipt_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (node_id, seq) DO NOTHING",
        args![
            r.node_id,
            seq,
            r.payload_type,
            r.payload,
            r.keyid,
            r.sig,
            &r.payload_sha256[..],
            r.received_ms,
            receipt_seq as i64
        ],
    )?;
    if inserted == 0 {
        // Stored before (a replay, perhaps through another replica): the
        // same record, or another under its seq. It takes no more room.
        if took.is_some() {
            tx.exec(
                "UPDATE nodes SET stored_bytes = stored_bytes - ?2 WHERE node_id = ?1",
                args![r.node_id, size],
            )?;
        }
        return Ok(stored_as(tx, r)?.unwrap_or((Outcome::Duplicate, None)));
    }
    keep_newest_state(tx, &r.node_id, &r.state)?;
    effects(tx, r)?;
    Ok((Outcome::Stored, None))
}

/// What a record already stored under this seq makes of `r`: the same one
/// (a replay, with when it was first received) or a different one
/// (a conflict); None when there is none.
fn stored_as(tx: &mut Tx<'_>, r: &NewRecord) -> Result<Option<(Outcome, Option<i64>)>, DbError> {
    let stored: Option<(Vec<u8>, i64)> = tx.query_row(
        "SELECT payload_sha256, received_ms FROM records WHERE node_id = ?1 AND seq = ?2",
        args![r.node_id, r.seq as i64],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok(stored.map(|(stored, at)| {
        if stored == r.payload_sha256 {
            (Outcome::Duplicate, Some(at))
        } else {
            (
                Outcome::Conflict {
                    stored_sha256: stored,
                },
                None,
            )
        }
    }))
}

/// Keeps the newest of what is stored and what the record says.
fn keep_newest_state(tx: &mut Tx<'_>, node_id: &str, st: &NodeState) -> Result<(), DbError> {
    // One row per GPU, the newest sample of each: a uuid twice in one
    // statement is an error on PostgreSQL, which would fail the whole batch
    // (other nodes' records too) for one node's malformed sample.
    let mut newest: Vec<&GpuState> = Vec::with_capacity(st.gpus.len());
    for g in &st.gpus {
        match newest.iter_mut().find(|n| n.uuid == g.uuid) {
            Some(n) if n.time_ms <= g.time_ms => *n = g,
            Some(_) => {}
            None => newest.push(g),
        }
    }
    // A sample's GPUs in one statement (a round trip each on PostgreSQL).
    for gpus in newest.chunks(GPUS_PER_STATEMENT) {
        let mut args = vec![node_id.arg()];
        for g in gpus {
            args.extend([g.uuid.arg(), g.index.arg(), g.sample.arg(), g.time_ms.arg()]);
        }
        tx.exec(gpus_upsert(gpus.len()), &args)?;
    }
    if let Some(link) = &st.link {
        tx.exec(
            "UPDATE nodes SET link = ?2, link_ms = ?3 WHERE node_id = ?1 AND link_ms <= ?3",
            args![node_id, link.bytes, link.time_ms],
        )?;
    }
    if let Some(inv) = &st.inventory {
        tx.exec(
            "UPDATE nodes SET inventory = ?2, inventory_ms = ?3 WHERE node_id = ?1 AND inventory_ms <= ?3",
            args![node_id, inv.bytes, inv.time_ms],
        )?;
    }
    Ok(())
}

/// GPUs upserted by one statement, at most.
const GPUS_PER_STATEMENT: usize = 16;

/// The upsert of `n` GPUs' latest samples (1 ≤ n ≤ GPUS_PER_STATEMENT):
/// `?1` the node, then uuid, index, sample and time of each. An older
/// sample never replaces a newer one (replays come late).
fn gpus_upsert(n: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        (1..=GPUS_PER_STATEMENT)
            .map(|n| {
                let rows: Vec<String> = (0..n)
                    .map(|i| {
                        let p = 2 + 4 * i;
                        format!("(?1, ?{}, ?{}, ?{}, ?{})", p, p + 1, p + 2, p + 3)
                    })
                    .collect();
                format!(
                    "INSERT INTO gpus (node_id, uuid, idx, sample, time_ms) VALUES {}
                     ON CONFLICT (node_id, uuid) DO UPDATE SET
                        idx = excluded.idx, sample = excluded.sample, time_ms = excluded.time_ms
                     WHERE excluded.time_ms >= gpus.time_ms",
                    rows.join(", ")
                )
            })
            .collect()
    });
    &all[n - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        fixtures::{databases, node, rec},
        NodeRow,
    };

    #[tokio::test]
    async fn stores_once_and_flags_conflicts() {
        for db in databases() {
            let store = db.open();
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
            assert!(nodes[0].missing.is_empty(), "{db}");
        }
    }

    #[tokio::test]
    async fn records_stored_together_get_one_signature_per_lease_and_a_replay_the_same() {
        for db in databases() {
            let store = db.open();
            store.register(node()).await.unwrap();
            let signer = Arc::new(crate::store::fixtures::coordinator_signer());
            let key = signer.verifying_key();
            let link = |seq: u64, lease: &str| NewRecord {
                state: NodeState {
                    chain: Some(ChainItem::Attestation {
                        lease_id: lease.into(),
                        lease_seq: seq,
                        prev_sha256: vec![0; 32],
                    }),
                    ..Default::default()
                },
                ..rec(seq, seq as u8)
            };
            let first = store
                .insert_with(
                    vec![
                        rec(1, 1),
                        link(2, "l-a"),
                        rec(3, 3),
                        link(4, "l-a"),
                        link(5, "l-b"),
                    ],
                    no_effects,
                    signer.clone(),
                )
                .await
                .unwrap();
            assert!(first.outcomes().iter().all(|o| *o == Outcome::Stored));
            // No lease, l-a, l-b: three envelopes; one alone is a Receipt.
            let kinds: Vec<&str> = first
                .receipts
                .iter()
                .map(|e| e.payload_type.as_str())
                .collect();
            assert_eq!(
                kinds,
                [types::RECEIPTS, types::RECEIPTS, types::RECEIPT],
                "{db}"
            );
            let set: pb::Receipts =
                warden_proto::dsse::open(&first.receipts[1], types::RECEIPTS, &key).unwrap();
            let seqs: Vec<(u64, &str, u64)> = set
                .receipts
                .iter()
                .map(|r| (r.seq, r.lease_id.as_str(), r.lease_seq))
                .collect();
            assert_eq!(seqs, [(2, "l-a", 2), (4, "l-a", 4)], "{db}");
            // Replays of 2 and 4 (and a conflict under 3), arriving later:
            // receipted together as first received, which is the set they
            // were given; nothing for the conflict.
            let later = |r: NewRecord| NewRecord {
                received_ms: 99,
                ..r
            };
            let again = store
                .insert_with(
                    vec![later(link(2, "l-a")), rec(3, 9), later(link(4, "l-a"))],
                    no_effects,
                    signer.clone(),
                )
                .await
                .unwrap();
            assert_eq!(
                again.outcomes(),
                [
                    Outcome::Duplicate,
                    Outcome::Conflict {
                        stored_sha256: vec![3; 32]
                    },
                    Outcome::Duplicate
                ],
                "{db}"
            );
            assert_eq!(again.receipts, [first.receipts[1].clone()], "{db}");
            // A node replaying one record of a set gets its own receipt,
            // not the whole set again (an amplifier otherwise).
            let one = store
                .insert_with(vec![later(link(4, "l-a"))], no_effects, signer)
                .await
                .unwrap();
            assert_eq!(one.receipts.len(), 1, "{db}");
            let r: pb::Receipt =
                warden_proto::dsse::open(&one.receipts[0], types::RECEIPT, &key).unwrap();
            assert_eq!((r.seq, r.lease_seq, r.time_unix_ms), (4, 4, 1), "{db}");
        }
    }

    #[tokio::test]
    async fn survives_reopen() {
        for db in databases() {
            {
                let store = db.open();
                store.register(node()).await.unwrap();
                store.insert(vec![rec(1, 1)]).await.unwrap();
            }
            let store = db.open();
            assert_eq!(
                store.insert(vec![rec(1, 1)]).await.unwrap(),
                vec![Outcome::Duplicate],
                "{db}"
            );
            assert_eq!(store.payload("n1", 1).await.unwrap(), Some(vec![1]));
        }
    }

    #[tokio::test]
    async fn keeps_the_newest_gpu_state_and_inventory() {
        for db in databases() {
            let store = db.open();
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
            assert_eq!(
                store.list_nodes().await.unwrap()[0].gpus[0],
                vec![21],
                "{db}"
            );
        }
    }

    #[tokio::test]
    async fn a_node_over_its_storage_quota_is_refused_and_others_are_not() {
        for db in databases() {
            let store = db.open_with_quota(2500);
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
            let store = db.open_with_quota(2500);
            assert!(
                matches!(
                    store.insert(vec![big("n1", 3)]).await.unwrap()[0],
                    Outcome::OverQuota { stored: 2000, .. }
                ),
                "{db}"
            );
        }
    }

    #[tokio::test]
    async fn two_replicas_storing_the_same_records_at_once_store_each_once() {
        for db in databases() {
            let (a, b) = (db.open(), db.open());
            a.register(node()).await.unwrap();
            let batch = |from: u64| -> Vec<NewRecord> {
                (from..from + 300)
                    .map(|i| NewRecord {
                        payload: vec![i as u8; 100],
                        ..rec(i, i as u8)
                    })
                    .collect()
            };
            // Overlapping runs, in seq order as an agent resends them.
            let mut runs = Vec::new();
            for (store, from) in [(&a, 1), (&b, 1), (&a, 151), (&b, 151)] {
                let store = store.clone();
                let recs = batch(from);
                runs.push(tokio::spawn(async move { store.insert(recs).await }));
            }
            let mut stored = 0;
            for run in runs {
                for out in run.await.unwrap().unwrap_or_else(|e| panic!("{db}: {e}")) {
                    match out {
                        Outcome::Stored => stored += 1,
                        Outcome::Duplicate => {}
                        other => panic!("{db}: {other:?}"),
                    }
                }
            }
            assert_eq!(stored, 450, "{db}: each of 1..=450 stored once");
            let n = &b.list_nodes().await.unwrap()[0];
            assert_eq!((n.records, n.last_seq), (450, 450), "{db}");
            assert!(n.missing.is_empty());
            // Counted once towards the quota too.
            let quota = db.open_with_quota(450 * 100 + 99);
            assert!(
                matches!(
                    quota.insert(vec![batch(451).remove(0)]).await.unwrap()[0],
                    Outcome::OverQuota { stored: 45_000, .. }
                ),
                "{db}"
            );
        }
    }

    #[tokio::test]
    async fn many_gpus_and_a_uuid_twice_in_one_sample_fail_nothing() {
        for db in databases() {
            let store = db.open();
            store.register(node()).await.unwrap();
            let gpu = |i: u32, b: u8, t| GpuState {
                uuid: format!("GPU-{i}"),
                index: i,
                sample: vec![b],
                time_ms: t,
            };
            // 20 GPUs (more than one statement holds), GPU-3 twice.
            let mut gpus: Vec<GpuState> = (0..20).map(|i| gpu(i, i as u8, 100)).collect();
            gpus.push(gpu(3, 99, 101));
            gpus.push(gpu(3, 98, 50));
            let sample = NewRecord {
                state: NodeState {
                    gpus,
                    ..Default::default()
                },
                ..rec(1, 1)
            };
            // Another node's record in the same batch is stored all the same.
            store
                .register(NodeRow {
                    node_id: "n2".into(),
                    ..node()
                })
                .await
                .unwrap();
            let other = NewRecord {
                node_id: "n2".into(),
                ..rec(1, 1)
            };
            let out = store.insert(vec![sample, other]).await.unwrap();
            assert_eq!(out, [Outcome::Stored, Outcome::Stored], "{db}");
            let n = store.list_nodes().await.unwrap();
            assert_eq!(n[0].gpus.len(), 20, "{db}");
            assert_eq!(n[0].gpus[3], vec![99], "{db}: the newest of the two");
        }
    }

    #[tokio::test]
    async fn a_lost_database_connection_fails_one_batch_and_the_next_reconnects() {
        let Some(target) = crate::store::fixtures::test_postgres() else {
            return; // PostgreSQL only: SQLite has no connection to lose
        };
        let store = Store::open_postgres(target.clone(), u64::MAX, 1).unwrap();
        store.register(node()).await.unwrap();
        store.insert(vec![rec(1, 1)]).await.unwrap();
        let pid = store
            .read(|tx| tx.query_row("SELECT pg_backend_pid()", &[], |r| r.get::<i64>(0)))
            .await
            .unwrap()
            .unwrap();
        // The server ends the store's connection (a restart, a failover).
        std::thread::spawn(move || {
            let mut admin = target.connect().unwrap();
            admin
                .transaction(|tx| {
                    tx.query_row(
                        "SELECT CAST(pg_terminate_backend(CAST(?1 AS INTEGER)) AS INTEGER)",
                        args![pid],
                        |r| r.get::<i64>(0),
                    )
                })
                .unwrap();
        })
        .join()
        .unwrap();
        // The batch that meets the dead connection fails: its records are
        // not acknowledged (the agent sends them again)...
        let mut outcome = store.insert(vec![rec(2, 2)]).await;
        for _ in 0..20 {
            if outcome.is_ok() {
                break;
            }
            // ...and a later one is stored on a new connection.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            outcome = store.insert(vec![rec(2, 2)]).await;
        }
        assert_eq!(outcome.unwrap(), [Outcome::Stored]);
        assert_eq!(store.payload("n1", 2).await.unwrap(), Some(vec![2]));
        assert_eq!(store.list_nodes().await.unwrap()[0].records, 2);
    }
}
