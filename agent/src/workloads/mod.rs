//! The renter's containers. `book` (pure) is the node's leases and the
//! commands already acted on; `confine` (pure) refuses specs and builds the
//! Docker configuration of the ones run; `hostpath` resolves a bind mount's
//! source without following a renter's links; `isolation` keeps lease
//! networks apart with Warden's own filter rules; `scratch` is each lease's
//! encrypted volume (gocryptfs); `docker` is the edge (bollard);
//! `task` is the workload task, the only owner of the book.

pub mod book;
pub mod confine;
pub mod docker;
pub mod hostpath;
pub mod isolation;
pub mod scratch;
pub mod task;

pub use task::Workload;
