//! Coordinator replicas on one PostgreSQL database. Each replica keeps a
//! connection of its own beside the store's: every second (or at once when
//! another replica NOTIFYs it) it beats its heartbeat, reads which nodes'
//! streams the other live replicas hold (so the registry reaches them by
//! relay), and takes what was relayed to it. The same connection holds a
//! session advisory lock while it can: its holder is the leader, the one
//! replica that runs the periodic jobs (cluster timers, replacement,
//! housekeeping). A replica that dies loses its connection, and with it
//! the lock: another takes the lead within a beat.
//!
//! On SQLite there is one coordinator: it leads, and nothing runs here.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use crate::{
    clock::now_ms,
    registry::{Registry, COMMAND_TTL},
    store::{
        presence::{self, Beat, RelayKind},
        PostgresTarget,
    },
};

/// The lead lock's key (any constant the replicas agree on).
const LEAD_LOCK: i64 = 0x5741_5244_454e_4c44;

/// How often a replica beats when nothing wakes it.
const BEAT: Duration = Duration::from_secs(1);

/// This coordinator among its replicas.
#[derive(Clone)]
pub struct Replica {
    /// Its id: random at each start, in logs and in the database.
    pub id: String,
    leader: Arc<AtomicBool>,
}

impl Replica {
    /// The only coordinator on its database: it leads.
    pub fn alone() -> Self {
        Self {
            id: "local".into(),
            leader: Arc::new(AtomicBool::new(true)),
        }
    }

    /// A new replica id.
    pub fn fresh() -> Self {
        Self {
            id: format!("r-{}", hex::encode(rand::random::<[u8; 6]>())),
            leader: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether this replica runs the periodic jobs now.
    pub fn leads(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Starts beating on `target` (a thread with its own connection) and
    /// applying what each beat says to `registry`, until `shutdown`.
    pub fn start(&self, target: PostgresTarget, registry: Registry, shutdown: CancellationToken) {
        let (beats, mut rx) = mpsc::unbounded_channel();
        let (me, leader, stop) = (self.id.clone(), self.leader.clone(), shutdown.clone());
        let spawned = thread::Builder::new()
            .name("warden-replica".into())
            .spawn(move || beat_loop(&target, &me, &leader, &stop, &beats));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the replica thread: this replica neither leads nor reaches nodes on others");
            return;
        }
        let me = self.id.clone();
        tokio::spawn(async move {
            while let Some(beat) = rx.recv().await {
                apply(&registry, &me, beat);
            }
        });
    }
}

/// What a beat says, applied to the registry.
fn apply(registry: &Registry, me: &str, beat: Beat) {
    registry.set_remote(beat.remote);
    for r in beat.relayed {
        match r.kind {
            RelayKind::Envelope => match pb::Envelope::decode(r.body.as_slice()) {
                Ok(env) => registry.deliver(&r.node_id, env, &r.from),
                Err(e) => {
                    tracing::warn!(%me, from = %r.from, error = %e, "relayed envelope does not decode")
                }
            },
            RelayKind::Result => match pb::CommandResult::decode(r.body.as_slice()) {
                Ok(result) => {
                    registry.resolve_here(&r.node_id, &result);
                }
                Err(e) => {
                    tracing::warn!(%me, from = %r.from, error = %e, "relayed answer does not decode")
                }
            },
        }
    }
}

/// Connects, LISTENs and beats until `stop`; connects again when the
/// connection is lost (leading no more meanwhile).
fn beat_loop(
    target: &PostgresTarget,
    me: &str,
    leader: &AtomicBool,
    stop: &CancellationToken,
    beats: &mpsc::UnboundedSender<Beat>,
) {
    while !stop.is_cancelled() {
        let mut conn = match target.connect() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(replica = %me, error = %e, "replica connection failed; trying again");
                thread::sleep(BEAT);
                continue;
            }
        };
        if let Err(e) = conn.transaction(|tx| tx.batch("LISTEN warden_relay")) {
            tracing::warn!(replica = %me, error = %e, "cannot LISTEN for relayed items");
            thread::sleep(BEAT);
            continue;
        }
        tracing::info!(replica = %me, database = %target, "replica beating");
        while !stop.is_cancelled() {
            let was = leader.load(Ordering::Relaxed);
            let beat = conn.transaction(|tx| {
                let now = now_ms();
                let beat = presence::beat(tx, me, now)?;
                let leads = was
                    || tx
                        .query_row(
                            "SELECT CAST(pg_try_advisory_lock(?1) AS INTEGER)",
                            crate::store::db::args![LEAD_LOCK],
                            |r| r.get::<i64>(0),
                        )?
                        .unwrap_or(0)
                        == 1;
                if leads {
                    presence::sweep(tx, now, COMMAND_TTL.as_millis() as i64)?;
                }
                Ok((beat, leads))
            });
            match beat {
                Ok((beat, leads)) => {
                    if leads != was {
                        tracing::info!(replica = %me, "this replica leads: it runs the periodic jobs");
                        leader.store(leads, Ordering::Relaxed);
                    }
                    if beats.send(beat).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(replica = %me, error = %e, "replica beat failed");
                    if conn.is_closed() {
                        break;
                    }
                }
            }
            if let Err(e) = conn.wait_notification(BEAT) {
                tracing::warn!(replica = %me, error = %e, "replica connection lost");
                break;
            }
        }
        if leader.swap(false, Ordering::Relaxed) {
            tracing::warn!(replica = %me, "this replica no longer leads (its connection is gone)");
        }
    }
}
