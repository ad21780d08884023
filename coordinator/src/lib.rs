//! The reference Warden coordinator: verifies every envelope agents send,
//! stores nodes, records and receipts in SQLite or in a PostgreSQL shared by
//! several replicas, and answers each record with a signed receipt.

pub mod admin;
pub mod challenge;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod devtls;
pub mod enrollment;
pub mod export;
pub mod hire;
pub mod hiring;
pub mod ids;
pub mod ingest;
pub mod init;
pub mod leases;
pub mod listener;
pub mod matcher;
pub mod mesh;
pub mod probe;
pub mod ratelimit;
pub mod registry;
pub mod replicas;
pub mod server;
pub mod session;
pub mod store;
pub mod verifier;
pub mod workgate;
pub mod workissuer;

pub use config::CoordinatorConfig;
pub use server::{start, Running, ServeError, TlsPem};
