//! Each GPU's last work-challenge outcome (docs/attestation.md#work-challenge),
//! kept so that a restarted coordinator, or another replica's matcher, knows
//! which GPUs proved themselves without challenging them all again.

use prost::Message as _;
use warden_proto::pb;

use super::{
    db::{args, DbError, Tx},
    Store, StoreError,
};

/// A GPU's last outcome, and what its last pass carried.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuWorkRow {
    pub node_id: String,
    pub gpu_uuid: String,
    /// The last challenge passed (false: it failed or went unanswered).
    pub passed: bool,
    /// When that was judged.
    pub at_ms: i64,
    /// Why it failed; empty when it passed.
    pub reason: String,
    /// The NVML identity the last passing answer carried (None: never passed).
    pub identity: Option<pb::GpuIdentity>,
    /// The confidential-computing report of the last pass (kept, not
    /// verified) and its status.
    pub cc_report: Vec<u8>,
    pub cc_status: String,
}

impl Store {
    /// Stores a GPU's outcome, replacing the one before.
    pub async fn put_gpu_work(&self, row: GpuWorkRow) -> Result<(), StoreError> {
        let node = row.node_id.clone();
        self.write_for(&node, move |tx| put(tx, &row)).await
    }

    /// Every GPU's stored outcome.
    pub async fn gpu_work(&self) -> Result<Vec<GpuWorkRow>, StoreError> {
        self.read(all).await
    }
}

fn put(tx: &mut Tx<'_>, r: &GpuWorkRow) -> Result<(), DbError> {
    tx.exec(
        "INSERT INTO gpu_work (node_id, gpu_uuid, passed, at_ms, reason, identity, cc_report, cc_status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (node_id, gpu_uuid) DO UPDATE SET
            passed = excluded.passed, at_ms = excluded.at_ms, reason = excluded.reason,
            identity = excluded.identity, cc_report = excluded.cc_report,
            cc_status = excluded.cc_status",
        args![
            r.node_id,
            r.gpu_uuid,
            i64::from(r.passed),
            r.at_ms,
            r.reason,
            r.identity.as_ref().map(|i| i.encode_to_vec()),
            r.cc_report,
            r.cc_status
        ],
    )?;
    Ok(())
}

fn all(tx: &mut Tx<'_>) -> Result<Vec<GpuWorkRow>, DbError> {
    tx.query_map(
        "SELECT node_id, gpu_uuid, passed, at_ms, reason, identity, cc_report, cc_status
         FROM gpu_work ORDER BY node_id, gpu_uuid",
        args![],
        |row| {
            let identity: Option<Vec<u8>> = row.get(5)?;
            Ok(GpuWorkRow {
                node_id: row.get(0)?,
                gpu_uuid: row.get(1)?,
                passed: row.get::<i64>(2)? != 0,
                at_ms: row.get(3)?,
                reason: row.get(4)?,
                // A row that does not decode is no proof: as if never passed.
                identity: identity.and_then(|b| pb::GpuIdentity::decode(b.as_slice()).ok()),
                cc_report: row.get(6)?,
                cc_status: row.get(7)?,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::databases;

    fn row(uuid: &str, passed: bool) -> GpuWorkRow {
        GpuWorkRow {
            node_id: "n1".into(),
            gpu_uuid: uuid.into(),
            passed,
            at_ms: 5,
            reason: if passed { String::new() } else { "late".into() },
            identity: passed.then(|| pb::GpuIdentity {
                uuid: uuid.into(),
                serial: "1320000000001".into(),
                memory_total_bytes: 80 << 30,
                ..Default::default()
            }),
            cc_report: vec![0xc0, 0xff, 0xee],
            cc_status: "ok".into(),
        }
    }

    #[tokio::test]
    async fn a_gpus_outcome_is_kept_and_replaced_by_the_next() {
        for db in databases() {
            let store = db.open();
            assert!(store.gpu_work().await.unwrap().is_empty(), "{db}");
            store.put_gpu_work(row("GPU-a", true)).await.unwrap();
            store.put_gpu_work(row("GPU-b", false)).await.unwrap();
            assert_eq!(
                store.gpu_work().await.unwrap(),
                [row("GPU-a", true), row("GPU-b", false)],
                "{db}"
            );
            let failed = GpuWorkRow {
                passed: false,
                reason: "no answer by the deadline".into(),
                at_ms: 9,
                ..row("GPU-a", true)
            };
            store.put_gpu_work(failed.clone()).await.unwrap();
            assert_eq!(store.gpu_work().await.unwrap()[0], failed, "{db}");
        }
    }
}
