//! The work challenge (docs/attestation.md#work-challenge): a seeded int8
//! matrix product on the claimed GPU, committed 8×8 tile by tile in a Merkle
//! tree, opened where the commitment itself points, checked by
//! recomputing only the opened tiles.
//!
//! Everything here is pure: the matrices ([`matrix`]), the commitment
//! ([`merkle`]), the CPU reference solver ([`solve`]), the checker any
//! coordinator can run ([`check`]), the size and deadline of a challenge
//! for a claimed GPU ([`sizing`]) and the NVML identity rule
//! ([`identity`]).

pub mod check;
pub mod contract;
pub mod identity;
pub mod matrix;
pub mod merkle;
pub mod sizing;
pub mod solve;

pub use check::{check, CheckError};
pub use solve::{solve, ParamError, Params};

/// Side of one committed tile of C: tile (I, J) is C[8I .. 8I+8, 8J .. 8J+8].
/// Square, so checking one costs 8 rows of A and 8 columns of B (16 lines),
/// where a 1×64 tile cost 65 (4× the checker's time).
pub const SIDE: usize = 8;
/// Entries of C in one tile.
pub const TILE: usize = SIDE * SIDE;
/// n must be a multiple of this (whole SHA-256 blocks per line).
pub const N_STEP: u32 = 64;
/// The largest matrix side a challenge may name (a 192 GB card at 0.6 fill
/// is ~128k; the cap keeps tile indices and tree depths small).
pub const MAX_N: u32 = 1 << 18;
/// The most products one challenge may ask for (bounds the answer's size).
pub const MAX_ROUNDS: u32 = 32;
/// The most tiles opened per round (bounds the answer's size).
pub const MAX_SPOT_TILES: u32 = 64;
/// The domain prefix of every hash but the Merkle tree's.
pub const DOMAIN: &[u8; 14] = b"warden-work-v1";
