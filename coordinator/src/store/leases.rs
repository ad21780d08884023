//! Leases: each lease's row (an encoded `LeaseInfo`), the commands sent
//! for it and their answers, its chain records (indexed by lease seq), its
//! challenges and its verdict: what the lease's evidence is gathered from.

use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use warden_proto::{chain::Head, pb};

use super::{ChainItem, Store, StoreError};
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
            tx.execute(
                "INSERT OR REPLACE INTO commands (command_id, node_id, lease_id, kind) VALUES (?1, ?2, ?3, ?4)",
                params![command_id, info.node_id, info.lease_id, kind.as_str()],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_lease(&self, lease_id: &str) -> Result<Option<pb::LeaseInfo>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |conn| get_lease(conn, &lease_id)).await
    }

    /// A lease's chain, proof, challenges and verdict as stored (None: no such lease).
    pub async fn evidence(&self, lease_id: &str) -> Result<Option<Evidence>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |conn| evidence(conn, &lease_id)).await
    }

    /// A challenge sent (the signed envelope), counted on the lease.
    pub fn put_challenge(&self, lease_id: &str, env: pb::Envelope) {
        let lease_id = lease_id.to_owned();
        self.write_later(move |tx| {
            tx.execute(
                "INSERT INTO challenges (lease_id, issued_ms, envelope) VALUES (?1, ?2, ?3)",
                params![lease_id, crate::clock::now_ms(), env.encode_to_vec()],
            )?;
            if let Some(mut info) = get_lease(tx, &lease_id)? {
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
        self.read(move |conn| last_challenge(conn, &lease_id)).await
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
            tx.execute(
                "UPDATE leases SET verdict = ?2 WHERE lease_id = ?1",
                params![lease_id, env.encode_to_vec()],
            )?;
            if let Some(mut info) = get_lease(tx, &lease_id)? {
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
    tx: &Transaction,
    node_id: &str,
    result: &pb::CommandResult,
) -> rusqlite::Result<Option<SentCommand>> {
    let cmd: Option<(String, String)> = tx
        .query_row(
            "SELECT lease_id, kind FROM commands WHERE command_id = ?1 AND node_id = ?2",
            params![result.command_id, node_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let Some((lease_id, kind)) = cmd else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE commands SET result = ?2 WHERE command_id = ?1",
        params![result.command_id, result.encode_to_vec()],
    )?;
    Ok(Some(SentCommand {
        lease_id,
        kind: Kind::parse(&kind),
    }))
}

/// The head of the lease's stored attestations: what the next one must
/// follow (the chain's start when none is stored).
pub(crate) fn chain_head(tx: &Transaction, lease_id: &str) -> rusqlite::Result<Head> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT lease_seq, payload_sha256 FROM lease_records
             WHERE lease_id = ?1 AND kind = 'attestation' ORDER BY lease_seq DESC LIMIT 1",
            [lease_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    Ok(last.map_or(Head::default(), |(s, d)| Head {
        lease_seq: s as u64,
        // Stored from a [u8; 32]; anything else links to nothing.
        sha256: d.try_into().unwrap_or([0xff; 32]),
    }))
}

/// Indexes a node's record `seq` under its lease's chain (once).
pub(crate) fn index_chain_record(
    tx: &Transaction,
    node_id: &str,
    seq: u64,
    item: &ChainItem,
    payload_sha256: &[u8; 32],
) -> rusqlite::Result<()> {
    let (lease_id, lease_seq, kind) = match item {
        ChainItem::Attestation {
            lease_id,
            lease_seq,
            ..
        } => (lease_id, *lease_seq as i64, "attestation"),
        ChainItem::Proof { lease_id } => (lease_id, 0, "proof"),
    };
    tx.execute(
        "INSERT OR IGNORE INTO lease_records (lease_id, node_id, seq, lease_seq, kind, payload_sha256)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![lease_id, node_id, seq as i64, lease_seq, kind, &payload_sha256[..]],
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
            ChallengeTip {
                index,
                sha256: warden_proto::dsse::payload_sha256(&env),
            }
        }))
}

pub(crate) fn put_lease(tx: &Transaction, info: &pb::LeaseInfo) -> rusqlite::Result<()> {
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

pub(crate) fn get_lease(
    conn: &Connection,
    lease_id: &str,
) -> rusqlite::Result<Option<pb::LeaseInfo>> {
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
