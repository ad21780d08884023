//! The verifier, in one place: each envelope as it arrives (`envelope`),
//! and a lease's whole evidence when its proof is stored (`lease`). The
//! rules themselves are `warden_proto`'s (`dsse`, `limits`, `chain`), the
//! same a third-party verifier runs; this module applies them to what this
//! coordinator holds.

pub mod envelope;
pub mod lease;

pub use envelope::{check_register, node_state, Inbound, NodeCheck, OverLimit, RegisterError};
