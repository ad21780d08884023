//! The Warden agent: the host daemon that turns a GPU machine into a
//! rentable, verifiable node. Each module owns one concern; `daemon`
//! wires them into tasks.

pub mod attest;
pub mod config;
pub mod confine;
pub mod daemon;
pub mod delivery;
pub mod docker;
pub mod doctor;
pub mod enforce;
pub mod gpu;
pub mod host;
pub mod inventory;
pub mod lease;
pub mod linkprobe;
pub mod mesh;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod procs;
pub mod reload;
pub mod spool;
pub mod status;
pub mod telemetry;
pub mod timelock;
pub mod uplink;
pub mod workload;

pub use config::AgentConfig;
pub use daemon::{run, AgentError, Reloader};

use warden_proto::pb;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random 128-bit id in hex (start ids).
pub fn random_id() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

/// The spool's figures as they go on the wire.
pub fn spool_state(s: &spool::SpoolStats) -> pb::SpoolState {
    pb::SpoolState {
        pending: s.pending,
        bytes: s.bytes,
        max_bytes: s.max_bytes,
        full: s.full,
        refused: s.refused,
        shed: s.shed,
        shedding: s.shedding,
        set_aside: s.set_aside,
        corrupt: s.corrupt,
    }
}

/// Replaces `path` with `bytes` durably: a temporary file beside it,
/// fsync, rename, fsync of the directory. Readers see the old file or the
/// new one, never half of either.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
