//! Proof of Time-Lock. `procs` reads `/proc` for the holders of GPU device
//! nodes; `enforce` judges them (pure policy) and ends foreign processes
//! (`enforce::exec`); `attest` folds one epoch into an attestation (pure);
//! `core` is the time-lock's decisions as plain data fed events and a clock;
//! `task` is the time-lock task that drives them.

pub mod attest;
pub mod core;
pub mod enforce;
pub mod procs;
pub mod task;

pub use task::TimeLock;
