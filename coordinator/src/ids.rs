//! Fresh identifiers for what the coordinator names itself (leases,
//! commands): a prefix saying what it is, then 64 random bits in hex.

use rand::Rng;

/// `prefix-` and 16 random hex digits, such as `l-9f2c…` for a lease.
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::rng().random::<u64>())
}
