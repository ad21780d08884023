//! Replicas on one database: each one's heartbeat, which replica holds
//! each node's stream, and what one replica relays to another.

use std::collections::HashMap;

use super::{
    db::{args, DbError, Dialect, Tx},
    Store, StoreError,
};

/// A replica counts as alive while its last heartbeat is younger than
/// this; the streams it held are then nobody's.
pub const REPLICA_TIMEOUT_MS: i64 = 5_000;

/// What is relayed: a signed envelope for a node whose stream the
/// receiving replica holds, or a node's answer for the replica that sent
/// the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Envelope,
    Result,
}

impl RelayKind {
    fn as_str(self) -> &'static str {
        match self {
            RelayKind::Envelope => "envelope",
            RelayKind::Result => "result",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "envelope" => Some(RelayKind::Envelope),
            "result" => Some(RelayKind::Result),
            _ => None,
        }
    }
}

/// One relayed item, taken by the replica it was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub kind: RelayKind,
    pub node_id: String,
    pub from: String,
    /// The encoded `Envelope` or `CommandResult`.
    pub body: Vec<u8>,
}

/// What a replica learns at each heartbeat.
#[derive(Debug, Default)]
pub struct Beat {
    /// Nodes whose stream another live replica holds, and which.
    pub remote: HashMap<String, String>,
    /// What was relayed to this replica since the last beat.
    pub relayed: Vec<Relayed>,
}

impl Store {
    /// Notes that `replica` holds `node_id`'s stream (session `session`).
    pub fn stream_opened(&self, node_id: &str, replica: &str, session: u64) {
        let lane = node_id.to_owned();
        let (node_id, replica) = (node_id.to_owned(), replica.to_owned());
        self.write_later_for(&lane, move |tx| {
            tx.exec(
                "INSERT INTO streams (node_id, replica_id, session, since_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (node_id) DO UPDATE SET replica_id = excluded.replica_id,
                    session = excluded.session, since_ms = excluded.since_ms",
                args![node_id, replica, session as i64, crate::clock::now_ms()],
            )?;
            Ok(())
        });
    }

    /// Notes that the stream is gone, unless a newer one (here or on
    /// another replica) took its place.
    pub fn stream_closed(&self, node_id: &str, replica: &str, session: u64) {
        let lane = node_id.to_owned();
        let (node_id, replica) = (node_id.to_owned(), replica.to_owned());
        self.write_later_for(&lane, move |tx| {
            tx.exec(
                "DELETE FROM streams WHERE node_id = ?1 AND replica_id = ?2 AND session = ?3",
                args![node_id, replica, session as i64],
            )?;
            Ok(())
        });
    }

    /// Relays `body` to replica `to`, waking it (PostgreSQL's NOTIFY, sent
    /// at commit); done once committed.
    pub async fn relay(
        &self,
        to: &str,
        from: &str,
        node_id: &str,
        kind: RelayKind,
        body: Vec<u8>,
    ) -> Result<(), StoreError> {
        let (to, from, node_id) = (to.to_owned(), from.to_owned(), node_id.to_owned());
        self.write(move |tx| {
            tx.exec(
                "INSERT INTO relay (to_replica, from_replica, node_id, kind, body, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                args![
                    to,
                    from,
                    node_id,
                    kind.as_str(),
                    body,
                    crate::clock::now_ms()
                ],
            )?;
            if tx.dialect() == Dialect::Postgres {
                tx.exec("SELECT pg_notify('warden_relay', ?1)", args![to])?;
            }
            Ok(())
        })
        .await
    }
}

/// A replica's heartbeat at `now`: what other live replicas hold, and what
/// was relayed to it (taken, so it is handled once).
pub fn beat(tx: &mut Tx<'_>, me: &str, now: i64) -> Result<Beat, DbError> {
    tx.exec(
        "INSERT INTO replicas (replica_id, seen_ms) VALUES (?1, ?2)
         ON CONFLICT (replica_id) DO UPDATE SET seen_ms = excluded.seen_ms",
        args![me, now],
    )?;
    let remote = tx
        .query_map(
            "SELECT s.node_id, s.replica_id FROM streams s
             JOIN replicas r ON r.replica_id = s.replica_id
             WHERE s.replica_id <> ?1 AND r.seen_ms > ?2",
            args![me, now - REPLICA_TIMEOUT_MS],
            |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
        )?
        .into_iter()
        .collect();
    let taken = tx.query_map(
        "DELETE FROM relay WHERE to_replica = ?1
         RETURNING id, kind, node_id, from_replica, body",
        args![me],
        |r| {
            Ok((
                r.get::<i64>(0)?,
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<Vec<u8>>(4)?,
            ))
        },
    )?;
    let mut relayed: Vec<(i64, Relayed)> = taken
        .into_iter()
        .filter_map(|(id, kind, node_id, from, body)| {
            let kind = RelayKind::parse(&kind)?;
            Some((
                id,
                Relayed {
                    kind,
                    node_id,
                    from,
                    body,
                },
            ))
        })
        .collect();
    // In the order relayed (RETURNING promises none).
    relayed.sort_by_key(|(id, _)| *id);
    Ok(Beat {
        remote,
        relayed: relayed.into_iter().map(|(_, r)| r).collect(),
    })
}

/// The leader's housekeeping at `now`: replicas gone for an hour, the
/// streams of replicas no longer alive, and relayed items nobody took
/// within `ttl_ms`.
pub fn sweep(tx: &mut Tx<'_>, now: i64, ttl_ms: i64) -> Result<(), DbError> {
    tx.exec(
        "DELETE FROM replicas WHERE seen_ms < ?1",
        args![now - 3_600_000],
    )?;
    tx.exec(
        "DELETE FROM streams WHERE replica_id NOT IN
            (SELECT replica_id FROM replicas WHERE seen_ms > ?1)",
        args![now - REPLICA_TIMEOUT_MS],
    )?;
    tx.exec(
        "DELETE FROM relay WHERE created_ms < ?1",
        args![now - ttl_ms],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::databases;

    #[tokio::test]
    async fn streams_of_live_replicas_and_relayed_items_are_seen_once() {
        for db in databases() {
            let store = db.open();
            let beat_at = |me: &'static str, now: i64| store.write(move |tx| beat(tx, me, now));
            beat_at("a", 1_000).await.unwrap();
            beat_at("b", 1_000).await.unwrap();
            store.stream_opened("n1", "a", 1);
            store.stream_opened("n2", "b", 1);
            // n2 moved to a; b's late close of its old session changes nothing.
            store.stream_opened("n2", "a", 2);
            store.stream_closed("n2", "b", 1);
            let seen = beat_at("b", 2_000).await.unwrap();
            let want: HashMap<String, String> = [
                ("n1".to_string(), "a".to_string()),
                ("n2".into(), "a".into()),
            ]
            .into();
            assert_eq!(seen.remote, want, "{db}");
            assert!(beat_at("a", 2_000).await.unwrap().remote.is_empty());

            let relay =
                |to: &'static str, kind, body: u8| store.relay(to, "x", "n1", kind, vec![body]);
            relay("a", RelayKind::Envelope, 1).await.unwrap();
            relay("a", RelayKind::Result, 2).await.unwrap();
            relay("b", RelayKind::Envelope, 3).await.unwrap();
            let got = beat_at("a", 3_000).await.unwrap().relayed;
            let bodies: Vec<_> = got.iter().map(|r| (r.kind, r.body[0])).collect();
            assert_eq!(
                bodies,
                [(RelayKind::Envelope, 1), (RelayKind::Result, 2)],
                "{db}"
            );
            assert_eq!((got[0].from.as_str(), got[0].node_id.as_str()), ("x", "n1"));
            assert!(
                beat_at("a", 3_000).await.unwrap().relayed.is_empty(),
                "taken once"
            );

            // a stops beating: its streams are nobody's.
            let later = 3_000 + REPLICA_TIMEOUT_MS + 1;
            let b = beat_at("b", later).await.unwrap();
            assert!(b.remote.is_empty(), "{db}");
            assert_eq!(b.relayed[0].body, vec![3]);
            // An item for a replica that never takes it is swept after the ttl.
            relay("gone", RelayKind::Envelope, 4).await.unwrap();
            let now = crate::clock::now_ms();
            store
                .write(move |tx| sweep(tx, now + 61_000, 60_000))
                .await
                .unwrap();
            assert!(
                beat_at("gone", now).await.unwrap().relayed.is_empty(),
                "{db}"
            );
        }
    }
}
