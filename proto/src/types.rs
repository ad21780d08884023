//! The `payload_type` of every envelope Warden sends: which message is inside.

/// Coordinator → agent, first on every stream: [`crate::pb::Hello`] (the
/// nonce the Register must carry).
pub const HELLO: &str = "application/vnd.warden.hello.v1+protobuf";
/// Coordinator → agent, once the Register is accepted: [`crate::pb::Registered`].
pub const REGISTERED: &str = "application/vnd.warden.registered.v1+protobuf";
/// Agent → coordinator, first on every stream: [`crate::pb::Register`].
pub const REGISTER: &str = "application/vnd.warden.register.v1+protobuf";
/// Agent → coordinator: [`crate::pb::Heartbeat`].
pub const HEARTBEAT: &str = "application/vnd.warden.heartbeat.v1+protobuf";
/// Agent → coordinator, spooled until receipted: [`crate::pb::Record`].
pub const RECORD: &str = "application/vnd.warden.record.v1+protobuf";
/// Coordinator → agent: [`crate::pb::Receipt`].
pub const RECEIPT: &str = "application/vnd.warden.receipt.v1+protobuf";
/// Coordinator → agent: [`crate::pb::Receipts`], several receipts of one
/// node (and one lease, or none) under one signature.
pub const RECEIPTS: &str = "application/vnd.warden.receipts.v1+protobuf";
/// Coordinator → agent: [`crate::pb::Refusal`].
pub const REFUSAL: &str = "application/vnd.warden.refusal.v1+protobuf";
/// Coordinator → agent, first on every accepted stream: [`crate::pb::Welcome`].
pub const WELCOME: &str = "application/vnd.warden.welcome.v1+protobuf";
/// Coordinator → agent: [`crate::pb::Command`] (lease and workload orders).
pub const COMMAND: &str = "application/vnd.warden.command.v1+protobuf";
/// Coordinator → agent: [`crate::pb::Challenge`] (a nonce to attest).
pub const CHALLENGE: &str = "application/vnd.warden.challenge.v1+protobuf";
/// Coordinator's judgement of a lease: [`crate::pb::LeaseVerdict`].
pub const VERDICT: &str = "application/vnd.warden.verdict.v1+protobuf";
/// Agent → coordinator: [`crate::pb::LogChunk`], a container's output
/// answering a ContainerLogs command; sent once, never spooled nor stored.
pub const LOGS: &str = "application/vnd.warden.logs.v1+protobuf";
/// Coordinator's record of a hired cluster's leases: [`crate::pb::ClusterRecord`].
pub const CLUSTER_RECORD: &str = "application/vnd.warden.cluster-record.v1+protobuf";
/// Coordinator → agent: [`crate::pb::WorkChallenge`] (a seeded matrix
/// product to run on one GPU; docs/attestation.md#work-challenge).
pub const WORK_CHALLENGE: &str = "application/vnd.warden.work-challenge.v1+protobuf";
/// Agent → coordinator: [`crate::pb::WorkAnswer`], sent once on the live
/// stream, never spooled nor receipted.
pub const WORK_ANSWER: &str = "application/vnd.warden.work-answer.v1+protobuf";
