//! Warden's wire format: the protobuf messages, DSSE envelopes and the
//! signing and verification rules. A third-party coordinator needs only this crate.

pub mod bundle;
pub mod chain;
pub mod cluster_record;
pub mod dsse;
pub mod identity;
pub mod json;
pub mod labels;
pub mod limits;
pub mod refusal;
pub mod sealed;
pub mod states;
pub mod types;
pub mod vectors;
pub mod workproof;

/// Generated protobuf and gRPC code for package `warden.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("warden.v1");
}

/// The encoded `FileDescriptorSet` of every Warden proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/warden_descriptor.bin"));

/// As [`FILE_DESCRIPTOR_SET`] without `warden.v1.Admin` (served only on the
/// admin unix socket): what reflection on the agents' TLS port describes.
pub const PUBLIC_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/warden_public_descriptor.bin"));
