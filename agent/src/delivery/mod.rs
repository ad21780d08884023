//! Delivery: every record the agent emits, from its producer to the
//! coordinator's receipt. `outbox` (the task that owns the spool) numbers,
//! signs and appends; `spool` is the disk; `uplink` (the task that owns the
//! connection) sends and acks; `session` decides what each coordinator
//! message and deadline means for one stream, and `window` is its in-flight
//! bookkeeping: both plain data fed events and a clock. `failover` picks
//! the coordinator address the next stream goes to (pure). `problem` says
//! why records are not being receipted, when they are not.

pub mod failover;
pub mod outbox;
pub mod problem;
pub mod session;
pub mod spool;
pub mod uplink;
pub mod window;

pub use window::{OnReceipt, OnRefusal, Window};
