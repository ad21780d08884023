//! Clusters: each cluster's row (an encoded `ClusterInfo`) and the
//! MeshConfig commands sent to its members, with their answers.

use prost::Message;
use warden_proto::pb;

use super::{
    db::{args, DbError, Dialect, Tx},
    Store, StoreError,
};

/// What a cluster write does to the cluster's row.
#[derive(Debug, Clone)]
pub enum ClusterWrite {
    /// Leaves it as it is (only commands are recorded).
    Keep,
    Put(Box<pb::ClusterInfo>),
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

impl Store {
    /// Writes a cluster and records the mesh commands sent for it.
    pub async fn put_cluster(
        &self,
        cluster_id: &str,
        info: ClusterWrite,
        sent: Vec<MeshSent>,
    ) -> Result<(), StoreError> {
        let cluster_id = cluster_id.to_owned();
        self.write(move |tx| {
            match info {
                ClusterWrite::Put(info) => tx.exec(
                    "INSERT INTO clusters (cluster_id, info) VALUES (?1, ?2)
                     ON CONFLICT (cluster_id) DO UPDATE SET info = excluded.info",
                    args![cluster_id, info.encode_to_vec()],
                )?,
                ClusterWrite::Delete => tx.exec(
                    "DELETE FROM clusters WHERE cluster_id = ?1",
                    args![cluster_id],
                )?,
                ClusterWrite::Keep => 0,
            };
            for m in sent {
                tx.exec(
                    "INSERT INTO mesh_commands (command_id, node_id, cluster_id, generation)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (command_id) DO UPDATE SET node_id = excluded.node_id,
                        cluster_id = excluded.cluster_id, generation = excluded.generation,
                        result = NULL",
                    args![m.command_id, m.node_id, m.cluster_id, m.generation as i64],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Changes a stored cluster in one transaction (member answers landing
    /// meanwhile are not overwritten); the cluster as written, or None if
    /// there is no such cluster.
    pub async fn edit_cluster(
        &self,
        cluster_id: &str,
        edit: impl FnOnce(&mut pb::ClusterInfo) + Send + 'static,
    ) -> Result<Option<pb::ClusterInfo>, StoreError> {
        let edited = self
            .try_edit_cluster(cluster_id, move |c| {
                edit(c);
                Ok::<(), std::convert::Infallible>(())
            })
            .await?;
        Ok(edited.map(|r| match r {
            Ok(c) => c,
            Err(never) => match never {},
        }))
    }

    /// As [`Store::edit_cluster`], for a change that may be refused: the
    /// row is written only when `edit` says Ok.
    pub async fn try_edit_cluster<E: Send + 'static>(
        &self,
        cluster_id: &str,
        edit: impl FnOnce(&mut pb::ClusterInfo) -> Result<(), E> + Send + 'static,
    ) -> Result<Option<Result<pb::ClusterInfo, E>>, StoreError> {
        let cluster_id = cluster_id.to_owned();
        self.write(move |tx| {
            let Some(mut info) = cluster_to_change(tx, &cluster_id)? else {
                return Ok(None);
            };
            if let Err(e) = edit(&mut info) {
                return Ok(Some(Err(e)));
            }
            update_cluster(tx, &cluster_id, &info)?;
            Ok(Some(Ok(info)))
        })
        .await
    }

    /// One cluster as stored.
    pub async fn cluster(&self, cluster_id: &str) -> Result<Option<pb::ClusterInfo>, StoreError> {
        let cluster_id = cluster_id.to_owned();
        self.read(move |tx| get_cluster(tx, &cluster_id)).await
    }

    pub async fn list_clusters(&self) -> Result<Vec<pb::ClusterInfo>, StoreError> {
        self.read(list_clusters).await
    }
}

/// The MeshConfig command a result answers, if it was sent to `node_id`
/// (a node answers only its own commands); its answer is kept with it.
pub(crate) fn answer_mesh_command(
    tx: &mut Tx<'_>,
    node_id: &str,
    result: &pb::CommandResult,
) -> Result<Option<MeshSent>, DbError> {
    let sent: Option<(String, i64)> = tx.query_row(
        "SELECT cluster_id, generation FROM mesh_commands WHERE command_id = ?1 AND node_id = ?2",
        args![result.command_id, node_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let Some((cluster_id, generation)) = sent else {
        return Ok(None);
    };
    tx.exec(
        "UPDATE mesh_commands SET result = ?2 WHERE command_id = ?1",
        args![result.command_id, result.encode_to_vec()],
    )?;
    Ok(Some(MeshSent {
        command_id: result.command_id.clone(),
        node_id: node_id.to_owned(),
        cluster_id,
        generation: generation as u64,
    }))
}

/// A cluster about to be changed in this transaction: on PostgreSQL its
/// row is locked until commit (as [`super::leases::lease_to_change`]).
pub(crate) fn cluster_to_change(
    tx: &mut Tx<'_>,
    cluster_id: &str,
) -> Result<Option<pb::ClusterInfo>, DbError> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT info FROM clusters WHERE cluster_id = ?1",
        Dialect::Postgres => "SELECT info FROM clusters WHERE cluster_id = ?1 FOR UPDATE",
    };
    let info: Option<Vec<u8>> = tx.query_row(sql, args![cluster_id], |row| row.get(0))?;
    Ok(info.and_then(|b| pb::ClusterInfo::decode(b.as_slice()).ok()))
}

/// One cluster as stored (None: no such cluster, or a row that does not decode).
pub(crate) fn get_cluster(
    tx: &mut Tx<'_>,
    cluster_id: &str,
) -> Result<Option<pb::ClusterInfo>, DbError> {
    let info: Option<Vec<u8>> = tx.query_row(
        "SELECT info FROM clusters WHERE cluster_id = ?1",
        args![cluster_id],
        |row| row.get(0),
    )?;
    Ok(info.and_then(|b| pb::ClusterInfo::decode(b.as_slice()).ok()))
}

/// Rewrites an existing cluster's row.
pub(crate) fn update_cluster(
    tx: &mut Tx<'_>,
    cluster_id: &str,
    info: &pb::ClusterInfo,
) -> Result<(), DbError> {
    tx.exec(
        "UPDATE clusters SET info = ?2 WHERE cluster_id = ?1",
        args![cluster_id, info.encode_to_vec()],
    )?;
    Ok(())
}

fn list_clusters(tx: &mut Tx<'_>) -> Result<Vec<pb::ClusterInfo>, DbError> {
    let rows = tx.query_map(
        "SELECT info FROM clusters ORDER BY cluster_id",
        &[],
        |row| row.get::<Vec<u8>>(0),
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|b| pb::ClusterInfo::decode(b.as_slice()).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::databases;

    #[tokio::test]
    async fn clusters_their_edits_and_their_members_answers() {
        for db in databases() {
            let store = db.open();
            let info = pb::ClusterInfo {
                cluster_id: "k-1".into(),
                ..Default::default()
            };
            let sent = |id: &str, node: &str, generation| MeshSent {
                command_id: id.into(),
                node_id: node.into(),
                cluster_id: "k-1".into(),
                generation,
            };
            store
                .put_cluster(
                    "k-1",
                    ClusterWrite::Put(Box::new(info)),
                    vec![sent("m-1", "n1", 1), sent("m-2", "n2", 1)],
                )
                .await
                .unwrap();
            let edited = store
                .edit_cluster("k-1", |c| c.subnet = "acme".into())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(edited.subnet, "acme", "{db}");
            let refused = store
                .try_edit_cluster("k-1", |c| {
                    c.subnet = "other".into();
                    Err("no")
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(refused, Err("no"));
            assert_eq!(store.cluster("k-1").await.unwrap().unwrap().subnet, "acme");
            assert!(store.edit_cluster("k-9", |_| {}).await.unwrap().is_none());

            // A member answers its own command; another node cannot.
            let answer = |node: &'static str, id: &'static str| {
                let result = pb::CommandResult {
                    command_id: id.into(),
                    ok: true,
                    ..Default::default()
                };
                store.write(move |tx| answer_mesh_command(tx, node, &result))
            };
            assert_eq!(answer("n2", "m-1").await.unwrap(), None, "{db}");
            assert_eq!(
                answer("n1", "m-1").await.unwrap(),
                Some(sent("m-1", "n1", 1))
            );
            // Sent again with a new generation: the same id finds the new one.
            store
                .put_cluster("k-1", ClusterWrite::Keep, vec![sent("m-1", "n1", 2)])
                .await
                .unwrap();
            assert_eq!(
                answer("n1", "m-1").await.unwrap(),
                Some(sent("m-1", "n1", 2))
            );

            assert_eq!(store.list_clusters().await.unwrap().len(), 1);
            store
                .put_cluster("k-1", ClusterWrite::Delete, vec![])
                .await
                .unwrap();
            assert!(store.cluster("k-1").await.unwrap().is_none(), "{db}");
            assert!(store.list_clusters().await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn two_replicas_editing_one_cluster_lose_no_change() {
        for db in databases() {
            let (a, b) = (db.open(), db.open());
            let info = pb::ClusterInfo {
                cluster_id: "k-1".into(),
                ..Default::default()
            };
            a.put_cluster("k-1", ClusterWrite::Put(Box::new(info)), vec![])
                .await
                .unwrap();
            let mut edits = Vec::new();
            for store in [a.clone(), b.clone()] {
                for _ in 0..25 {
                    let store = store.clone();
                    edits.push(tokio::spawn(async move {
                        store.edit_cluster("k-1", |c| c.generation += 1).await
                    }));
                }
            }
            for e in edits {
                e.await.unwrap().unwrap_or_else(|e| panic!("{db}: {e}"));
            }
            let c = b.cluster("k-1").await.unwrap().unwrap();
            // Without the row lock PostgreSQL lost half of them.
            assert_eq!(c.generation, 50, "{db}: every edit counted once");
        }
    }
}
