//! The largest payload the reference coordinator accepts for each message
//! type, far below the transport's 4 MiB: a record over its kind's cap is
//! refused (and stays in the agent's spool), so a node cannot fill the
//! coordinator's disk with a few huge records. A third-party agent keeps
//! under these; docs/protocol.md lists them.

use crate::{pb, types};

/// A Register (its inventory is most of it).
pub const REGISTER: usize = 256 << 10;
/// A Heartbeat.
pub const HEARTBEAT: usize = 4 << 10;
/// A LogChunk: its 256 KiB of output and the rest.
pub const LOGS: usize = 264 << 10;
/// A WorkAnswer: at most [`crate::workproof::MAX_ROUNDS`] rounds of
/// [`crate::workproof::MAX_SPOT_TILES`] openings (a tile and its path,
/// about 1.3 KiB each: 2.6 MiB) and a CC report (under 13 KiB); below the
/// coordinator's 4 MiB message cap.
pub const WORK_ANSWER: usize = 3 << 20;
/// The largest Record of any kind; each kind has its own cap below it.
pub const RECORD: usize = 512 << 10;

// Far below the transport's 4 MiB, as said above.
const _: () = assert!(RECORD * 8 <= 4 << 20);

/// What a Record carries: its caps differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Telemetry,
    Inventory,
    CommandResult,
    Attestation,
    LeaseProof,
    /// A record without a body.
    Empty,
}

impl RecordKind {
    pub fn of(rec: &pb::Record) -> Self {
        use pb::record::Body;
        match rec.body {
            Some(Body::Telemetry(_)) => Self::Telemetry,
            Some(Body::Inventory(_)) => Self::Inventory,
            Some(Body::CommandResult(_)) => Self::CommandResult,
            Some(Body::Attestation(_)) => Self::Attestation,
            Some(Body::LeaseProof(_)) => Self::LeaseProof,
            None => Self::Empty,
        }
    }

    /// The name used in refusals and docs (the field name in `Record`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Inventory => "inventory",
            Self::CommandResult => "command_result",
            Self::Attestation => "attestation",
            Self::LeaseProof => "lease_proof",
            Self::Empty => "empty",
        }
    }

    /// Largest payload (the encoded `Record`) of this kind. Telemetry and
    /// attestations grow with GPUs and processes; the rest are small.
    pub fn max_payload(self) -> usize {
        match self {
            Self::Telemetry | Self::Attestation => RECORD,
            Self::Inventory => 128 << 10,
            Self::CommandResult => 64 << 10,
            Self::LeaseProof => 4 << 10,
            Self::Empty => 1 << 10,
        }
    }

    pub const ALL: [RecordKind; 6] = [
        Self::Telemetry,
        Self::Inventory,
        Self::CommandResult,
        Self::Attestation,
        Self::LeaseProof,
        Self::Empty,
    ];
}

/// Largest payload of an agent message of this `payload_type` (a Record's
/// kind has its own, lower cap); None for a type agents do not send.
pub fn max_payload(payload_type: &str) -> Option<usize> {
    match payload_type {
        types::REGISTER => Some(REGISTER),
        types::HEARTBEAT => Some(HEARTBEAT),
        types::RECORD => Some(RECORD),
        types::WORK_ANSWER => Some(WORK_ANSWER),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_capped_far_below_the_transport_and_within_record() {
        for k in RecordKind::ALL {
            assert!(k.max_payload() <= RECORD, "{}", k.name());
        }
        assert_eq!(max_payload("text/plain"), None);
    }
}
