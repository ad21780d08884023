//! Leases: each lease's row (an encoded `LeaseInfo`), the commands sent
//! for it and their answers, its chain records (indexed by lease seq), its
//! challenges and its verdict: what the lease's evidence is gathered from.

use prost::Message;
use warden_proto::{chain::Head, pb};

use super::{
    db::{args, DbError, Dialect, Tx},
    ChainItem, Store, StoreError,
};
use crate::leases::Kind;

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

/// A lease's last challenge: what the next one chains to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChallengeTip {
    pub index: u64,
    pub sha256: [u8; 32],
}

/// A lease command as it was sent: which lease, and what kind (None: a
/// kind this coordinator does not know).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCommand {
    pub lease_id: String,
    pub kind: Option<Kind>,
}

impl Store {
    /// Saves a lease row and the command just sent for it.
    pub async fn put_lease(
        &self,
        info: pb::LeaseInfo,
        command_id: String,
        kind: Kind,
    ) -> Result<(), StoreError> {
        self.write(move |tx| {
            put_lease(tx, &info)?;
            tx.exec(
                "INSERT INTO commands (command_id, node_id, lease_id, kind) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (command_id) DO UPDATE SET node_id = excluded.node_id,
                    lease_id = excluded.lease_id, kind = excluded.kind, result = NULL",
                args![command_id, info.node_id, info.lease_id, kind.as_str()],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_lease(&self, lease_id: &str) -> Result<Option<pb::LeaseInfo>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |tx| get_lease(tx, &lease_id)).await
    }

    /// A lease's chain, proof, challenges and verdict as stored (None: no such lease).
    pub async fn evidence(&self, lease_id: &str) -> Result<Option<Evidence>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |tx| evidence(tx, &lease_id)).await
    }

    /// A challenge sent (the signed envelope), counted on the lease.
    pub fn put_challenge(&self, lease_id: &str, env: pb::Envelope) {
        let lease_id = lease_id.to_owned();
        self.write_later(move |tx| {
            tx.exec(
                "INSERT INTO challenges (lease_id, issued_ms, envelope) VALUES (?1, ?2, ?3)",
                args![lease_id, crate::clock::now_ms(), env.encode_to_vec()],
            )?;
            if let Some(mut info) = lease_to_change(tx, &lease_id)? {
                info.challenges_sent += 1;
                put_lease(tx, &info)?;
            }
            Ok(())
        });
    }

    /// The index and digest of the lease's last challenge (what the next
    /// one chains to), if any.
    pub async fn last_challenge(&self, lease_id: &str) -> Result<Option<ChallengeTip>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |tx| last_challenge(tx, &lease_id)).await
    }

    /// The coordinator's signed verdict, stored with the lease, whose row
    /// `apply` brings up to date (in the same transaction).
    pub fn put_verdict(
        &self,
        lease_id: &str,
        env: pb::Envelope,
        apply: impl FnOnce(&mut pb::LeaseInfo) + Send + 'static,
    ) {
        let lease_id = lease_id.to_owned();
        self.write_later(move |tx| {
            tx.exec(
                "UPDATE leases SET verdict = ?2 WHERE lease_id = ?1",
                args![lease_id, env.encode_to_vec()],
            )?;
            if let Some(mut info) = lease_to_change(tx, &lease_id)? {
                apply(&mut info);
                put_lease(tx, &info)?;
            }
            Ok(())
        });
    }

    pub async fn list_leases(&self) -> Result<Vec<pb::LeaseInfo>, StoreError> {
        self.read(list_leases).await
    }
}

/// The lease command `command_id`, if it was sent to `node_id` (a node
/// answers only its own commands); its answer is kept with it.
pub(crate) fn answer_command(
    tx: &mut Tx<'_>,
    node_id: &str,
    result: &pb::CommandResult,
) -> Result<Option<SentCommand>, DbError> {
    let cmd: Option<(String, String)> = tx.query_row(
        "SELECT lease_id, kind FROM commands WHERE command_id = ?1 AND node_id = ?2",
        args![result.command_id, node_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let Some((lease_id, kind)) = cmd else {
        return Ok(None);
    };
    tx.exec(
        "UPDATE commands SET result = ?2 WHERE command_id = ?1",
        args![result.command_id, result.encode_to_vec()],
    )?;
    Ok(Some(SentCommand {
        lease_id,
        kind: Kind::parse(&kind),
    }))
}

/// The head of the lease's stored attestations: what the next one must
/// follow (the chain's start when none is stored).
pub(crate) fn chain_head(tx: &mut Tx<'_>, lease_id: &str) -> Result<Head, DbError> {
    let last: Option<(i64, Vec<u8>)> = tx.query_row(
        "SELECT lease_seq, payload_sha256 FROM lease_records
         WHERE lease_id = ?1 AND kind = 'attestation' ORDER BY lease_seq DESC LIMIT 1",
        args![lease_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok(last.map_or(Head::default(), |(s, d)| Head {
        lease_seq: s as u64,
        // Stored from a [u8; 32]; anything else links to nothing.
        sha256: d.try_into().unwrap_or([0xff; 32]),
    }))
}

/// Indexes a node's record `seq` under its lease's chain (once).
pub(crate) fn index_chain_record(
    tx: &mut Tx<'_>,
    node_id: &str,
    seq: u64,
    item: &ChainItem,
    payload_sha256: &[u8; 32],
) -> Result<(), DbError> {
    let (lease_id, lease_seq, kind) = match item {
        ChainItem::Attestation {
            lease_id,
            lease_seq,
            ..
        } => (lease_id, *lease_seq as i64, "attestation"),
        ChainItem::Proof { lease_id } => (lease_id, 0, "proof"),
    };
    tx.exec(
        "INSERT INTO lease_records (lease_id, node_id, seq, lease_seq, kind, payload_sha256)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        args![
            lease_id,
            node_id,
            seq as i64,
            lease_seq,
            kind,
            &payload_sha256[..]
        ],
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

fn evidence(tx: &mut Tx<'_>, lease_id: &str) -> Result<Option<Evidence>, DbError> {
    let row: Option<(String, Vec<u8>, Option<Vec<u8>>)> = tx.query_row(
        "SELECT l.node_id, n.public_key, l.verdict FROM leases l JOIN nodes n ON n.node_id = l.node_id
         WHERE l.lease_id = ?1",
        args![lease_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let Some((node_id, node_public_key, verdict)) = row else {
        return Ok(None);
    };
    let rows = tx.query_map(
        "SELECT lr.kind, r.payload_type, r.payload, r.keyid, r.sig, rc.envelope FROM lease_records lr
         JOIN records r ON r.node_id = lr.node_id AND r.seq = lr.seq
         JOIN receipts rc ON rc.node_id = r.node_id AND rc.seq = coalesce(r.receipt_seq, r.seq)
         WHERE lr.lease_id = ?1 ORDER BY lr.lease_seq, lr.seq",
        args![lease_id],
        |r| {
            Ok((
                r.get::<String>(0)?,
                envelope(r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
                r.get::<Vec<u8>>(5)?,
            ))
        },
    )?;
    let mut records = Vec::new();
    let mut receipts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut proof = None;
    for (kind, env, receipt) in rows {
        if kind == "proof" {
            proof = Some(env);
        } else {
            records.push(env);
            // One Receipts may acknowledge several of the lease's records.
            if seen.insert(receipt.clone()) {
                if let Ok(r) = pb::Envelope::decode(receipt.as_slice()) {
                    receipts.push(r);
                }
            }
        }
    }
    // In the order sent: SQLite's rowid, PostgreSQL's serial id.
    let sql = match tx.dialect() {
        Dialect::Sqlite => {
            "SELECT envelope FROM challenges WHERE lease_id = ?1 ORDER BY issued_ms, rowid"
        }
        Dialect::Postgres => {
            "SELECT envelope FROM challenges WHERE lease_id = ?1 ORDER BY issued_ms, id"
        }
    };
    let challenges = tx
        .query_map(sql, args![lease_id], |r| r.get::<Vec<u8>>(0))?
        .into_iter()
        .filter_map(|b| pb::Envelope::decode(b.as_slice()).ok())
        .collect();
    let lease = get_lease(tx, lease_id)?.unwrap_or_default();
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

fn last_challenge(tx: &mut Tx<'_>, lease_id: &str) -> Result<Option<ChallengeTip>, DbError> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT envelope FROM challenges WHERE lease_id = ?1 ORDER BY issued_ms DESC, rowid DESC LIMIT 1",
        Dialect::Postgres => "SELECT envelope FROM challenges WHERE lease_id = ?1 ORDER BY issued_ms DESC, id DESC LIMIT 1",
    };
    let blob: Option<Vec<u8>> = tx.query_row(sql, args![lease_id], |r| r.get(0))?;
    Ok(blob
        .and_then(|b| pb::Envelope::decode(b.as_slice()).ok())
        .map(|env| {
            let index = pb::Challenge::decode(env.payload.as_slice())
                .map(|c| c.index)
                .unwrap_or(0);
            ChallengeTip {
                index,
                sha256: warden_proto::dsse::payload_sha256(&env),
            }
        }))
}

pub(crate) fn put_lease(tx: &mut Tx<'_>, info: &pb::LeaseInfo) -> Result<(), DbError> {
    tx.exec(
        "INSERT INTO leases (lease_id, node_id, created_ms, info) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (lease_id) DO UPDATE SET info = excluded.info",
        args![
            info.lease_id,
            info.node_id,
            info.created_unix_ms,
            info.encode_to_vec()
        ],
    )?;
    Ok(())
}

/// A lease about to be changed in this transaction: on PostgreSQL its row
/// is locked until commit, so that a replica changing the same lease
/// meanwhile waits for this change instead of overwriting it.
pub(crate) fn lease_to_change(
    tx: &mut Tx<'_>,
    lease_id: &str,
) -> Result<Option<pb::LeaseInfo>, DbError> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT info FROM leases WHERE lease_id = ?1",
        Dialect::Postgres => "SELECT info FROM leases WHERE lease_id = ?1 FOR UPDATE",
    };
    let blob: Option<Vec<u8>> = tx.query_row(sql, args![lease_id], |r| r.get(0))?;
    Ok(blob.and_then(|b| pb::LeaseInfo::decode(b.as_slice()).ok()))
}

pub(crate) fn get_lease(tx: &mut Tx<'_>, lease_id: &str) -> Result<Option<pb::LeaseInfo>, DbError> {
    let blob: Option<Vec<u8>> = tx.query_row(
        "SELECT info FROM leases WHERE lease_id = ?1",
        args![lease_id],
        |r| r.get(0),
    )?;
    Ok(blob.and_then(|b| pb::LeaseInfo::decode(b.as_slice()).ok()))
}

fn list_leases(tx: &mut Tx<'_>) -> Result<Vec<pb::LeaseInfo>, DbError> {
    let rows = tx.query_map(
        "SELECT info FROM leases ORDER BY created_ms, lease_id",
        &[],
        |r| r.get::<Vec<u8>>(0),
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|b| pb::LeaseInfo::decode(b.as_slice()).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{databases, node, rec};
    use crate::store::{NewRecord, NodeState};
    use warden_proto::states::LeaseState;

    fn challenge(index: u64) -> pb::Envelope {
        let c = pb::Challenge {
            lease_id: "l-1".into(),
            index,
            ..Default::default()
        };
        envelope("t".into(), c.encode_to_vec(), "k".into(), vec![index as u8])
    }

    #[tokio::test]
    async fn a_leases_commands_chain_challenges_and_verdict_are_its_evidence() {
        for db in databases() {
            let store = db.open();
            store.register(node()).await.unwrap();
            let lease = pb::LeaseInfo {
                lease_id: "l-1".into(),
                node_id: "n1".into(),
                created_unix_ms: 5,
                state: LeaseState::Starting.into(),
                ..Default::default()
            };
            store
                .put_lease(lease.clone(), "c-1".into(), Kind::LeaseStart)
                .await
                .unwrap();
            // Sent again under the same command id: one row, its answer cleared.
            store
                .put_lease(lease, "c-1".into(), Kind::LeaseStart)
                .await
                .unwrap();
            let link = |seq: u64, lease_seq| NewRecord {
                state: NodeState {
                    chain: Some(ChainItem::Attestation {
                        lease_id: "l-1".into(),
                        lease_seq,
                        prev_sha256: vec![0; 32],
                    }),
                    ..Default::default()
                },
                ..rec(seq, seq as u8)
            };
            let proof = NewRecord {
                state: NodeState {
                    chain: Some(ChainItem::Proof {
                        lease_id: "l-1".into(),
                    }),
                    ..Default::default()
                },
                ..rec(9, 9)
            };
            store
                .insert_with(
                    vec![link(2, 2), link(1, 1), proof],
                    crate::ingest::effects,
                    std::sync::Arc::new(crate::store::fixtures::coordinator_signer()),
                )
                .await
                .unwrap();
            assert_eq!(store.last_challenge("l-1").await.unwrap(), None);
            for i in [1, 2, 3] {
                store.put_challenge("l-1", challenge(i));
            }
            let tip = store.last_challenge("l-1").await.unwrap().unwrap();
            assert_eq!(tip.index, 3, "{db}");
            store.put_verdict("l-1", challenge(99), |info| {
                info.verdict = "valid".into();
            });
            let ev = store.evidence("l-1").await.unwrap().unwrap();
            assert_eq!(ev.node_id, "n1");
            assert_eq!(ev.node_public_key, vec![1; 32]);
            // In lease order, whatever order they arrived in.
            let sigs = |envs: &[pb::Envelope]| -> Vec<u8> {
                envs.iter().map(|e| e.signatures[0].sig[0]).collect()
            };
            assert_eq!(ev.records.len(), 2, "{db}");
            assert_eq!(ev.records[0].payload, vec![1]);
            assert_eq!(ev.records[1].payload, vec![2]);
            // Both links stored together: one Receipts acknowledges them,
            // given once, with the coordinator's signature.
            assert_eq!(ev.receipts.len(), 1, "{db}");
            let key = crate::store::fixtures::coordinator_signer().verifying_key();
            let set: pb::Receipts =
                warden_proto::dsse::open(&ev.receipts[0], warden_proto::types::RECEIPTS, &key)
                    .unwrap();
            let links: Vec<(u64, u64, &str)> = set
                .receipts
                .iter()
                .map(|r| (r.seq, r.lease_seq, r.lease_id.as_str()))
                .collect();
            assert_eq!(links, [(2, 2, "l-1"), (1, 1, "l-1")], "{db}");
            assert_eq!(ev.proof.unwrap().payload, vec![9]);
            assert_eq!(sigs(&ev.challenges), vec![1, 2, 3], "{db}");
            assert_eq!(ev.verdict.unwrap().signatures[0].sig, vec![99]);
            assert_eq!(ev.lease.verdict, "valid");
            assert_eq!(ev.lease.challenges_sent, 3);
            assert_eq!(ev.lease.attestations, 2);
            let all = store.list_leases().await.unwrap();
            assert_eq!(all.len(), 1);
            assert_eq!(all[0].verdict, "valid");
            assert!(store.evidence("l-2").await.unwrap().is_none());
        }
    }
}
