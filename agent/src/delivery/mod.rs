//! Delivery: every record the agent emits, from its producer to the
//! coordinator's receipt. `outbox` (the task that owns the spool) numbers,
//! signs and appends; `spool` is the disk; `uplink` (the task that owns the
//! connection) sends and acks; `window` is the uplink's bookkeeping as plain
//! data fed events and a clock.

pub mod outbox;
pub mod spool;
pub mod uplink;
pub mod window;

pub use window::{OnReceipt, OnRefusal, Window};
