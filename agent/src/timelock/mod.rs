//! Proof of Time-Lock. `procs` reads `/proc` for the holders of GPU device
//! nodes; `enforce` judges them (pure policy) and ends foreign processes
//! (`enforce::exec`); `attest` folds one epoch into an attestation (pure);
//! `guard` denies foreign opens of the leased GPUs' device nodes before
//! they succeed (fanotify); `core` is the time-lock's decisions as plain
//! data fed events and a clock; `task` is the time-lock task that drives them.

pub mod attest;
pub mod core;
pub mod enforce;
pub mod guard;
pub mod procs;
pub mod task;

pub use task::TimeLock;
