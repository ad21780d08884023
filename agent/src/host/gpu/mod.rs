//! GPUs: what they are (inventory) and how they are doing (samples).
//!
//! `GpuSource` is the edge (NVML in production, the fake library in tests,
//! through the same FFI); `health_events` is the pure part that turns two
//! consecutive sampling cycles into events; `sampler` is the task.

pub mod nvml;
pub mod sampler;

use warden_proto::pb;

pub use sampler::watch_events;

/// What NVML reports about the machine's GPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    pub driver_version: String,
    pub cuda_version: i32,
    pub gpus: Vec<pb::GpuInfo>,
}

/// Why GPUs cannot be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GpuError {
    /// No usable NVML library: the node runs CPU-only.
    #[error("NVML library {library} could not be loaded: {reason}")]
    Load { library: String, reason: String },
    /// NVML loaded but failed.
    #[error("NVML: {0}")]
    Nvml(String),
}

/// A source of GPU inventory and samples. Calls may block (NVML does).
pub trait GpuSource: Send + Sync {
    fn inventory(&self) -> Result<Inventory, GpuError>;
    /// One cycle: a sample per GPU of the inventory, in index order. A GPU
    /// that fails gives a sample with `error` (and `lost`) set, never a panic.
    fn sample(&self) -> Vec<pb::GpuSample>;
    /// Blocks up to `timeout` for driver events (Xid errors), returning
    /// those that came; empty on timeout. Sources without events sleep.
    fn wait_events(&self, timeout: std::time::Duration) -> Vec<pb::GpuEvent>;
    /// The confidential-computing attestation report of GPU `uuid` over
    /// `nonce` (nvmlDeviceGetConfComputeGpuAttestationReport), verbatim.
    fn cc_report(&self, uuid: &str, nonce: [u8; 32]) -> Result<Vec<u8>, GpuError> {
        let _ = (uuid, nonce);
        Err(GpuError::Nvml("not supported".into()))
    }
}

/// Health changes between two sampling cycles, keyed by GPU uuid: a GPU
/// that became lost, failed, or recovered. Steady states give no events.
pub fn health_events(
    prev: &[pb::GpuSample],
    now: &[pb::GpuSample],
    time_unix_ms: i64,
) -> Vec<pb::GpuEvent> {
    let mut out = Vec::new();
    for s in now {
        let before = prev.iter().find(|p| p.uuid == s.uuid);
        let was = before
            .map(|p| (p.lost, !p.error.is_empty()))
            .unwrap_or((false, false));
        let is = (s.lost, !s.error.is_empty());
        let kind = match (was, is) {
            (w, i) if w == i => continue,
            (_, (true, _)) => "lost",
            (_, (false, true)) => "error",
            (_, (false, false)) => "recovered",
        };
        out.push(pb::GpuEvent {
            index: s.index,
            uuid: s.uuid.clone(),
            kind: kind.into(),
            detail: s.error.clone(),
            time_unix_ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(uuid: &str, lost: bool, error: &str) -> pb::GpuSample {
        pb::GpuSample {
            uuid: uuid.into(),
            lost,
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn steady_states_give_no_events() {
        let a = vec![s("a", false, ""), s("b", true, "GPU is lost")];
        assert!(health_events(&a, &a, 1).is_empty());
        assert!(health_events(&[], &[s("a", false, "")], 1).is_empty());
    }

    #[test]
    fn transitions_are_named() {
        let ok = vec![s("a", false, ""), s("b", false, "")];
        let bad = vec![s("a", true, "GPU is lost"), s("b", false, "Unknown Error")];
        let ev = health_events(&ok, &bad, 7);
        assert_eq!(
            ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["lost", "error"]
        );
        assert_eq!(ev[0].detail, "GPU is lost");
        assert_eq!(ev[0].time_unix_ms, 7);
        let ev = health_events(&bad, &ok, 8);
        assert_eq!(
            ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["recovered", "recovered"]
        );
        // A GPU first seen already lost is an event too.
        let ev = health_events(&[], &[s("c", true, "GPU is lost")], 9);
        assert_eq!(ev[0].kind, "lost");
    }
}
