//! The matrices of each round, regenerated from the seed one line at a
//! time, so the checker builds only the rows and columns it needs.
//!
//! Entries are SHA-256 in counter mode: block `b` of line `l` of side `s`
//! is SHA-256(DOMAIN ‖ s ‖ seed_r ‖ l as u32 LE ‖ b as u32 LE), 55 bytes:
//! one compression. Its 32 bytes give 64 entries, byte k the entries 2k
//! (low nibble) and 2k+1 (high nibble), each `nibble - 8`, in [-8, 7].
//! A line of A is a row; a line of B is a column (B is generated as Bᵀ).

use ring::digest::{digest, Context, SHA256};

use super::DOMAIN;

/// Which matrix a line belongs to; the byte is its domain tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Rows of A: tag `A`.
    A,
    /// Columns of B: tag `B`.
    B,
}

impl Side {
    fn tag(self) -> u8 {
        match self {
            Side::A => b'A',
            Side::B => b'B',
        }
    }
}

/// Entries per SHA-256 block.
pub const PER_BLOCK: usize = 64;

/// The first round's seed: SHA-256(DOMAIN ‖ `S` ‖ seed ‖ node_id as UTF-8).
/// The node id is in it so no two nodes ever get the same matrices.
pub fn first_seed(seed: &[u8; 32], node_id: &str) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(DOMAIN);
    c.update(b"S");
    c.update(seed);
    c.update(node_id.as_bytes());
    to32(c.finish().as_ref())
}

/// The next round's seed: SHA-256(DOMAIN ‖ `C` ‖ seed_r ‖ root_r). Round
/// r+1 cannot start before round r is committed: rounds are sequential.
pub fn next_seed(seed_r: &[u8; 32], root_r: &[u8; 32]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(DOMAIN);
    c.update(b"C");
    c.update(seed_r);
    c.update(root_r);
    to32(c.finish().as_ref())
}

/// Fills `out` (its length is n, a multiple of 64) with line `line` of side `side`.
pub fn line(seed_r: &[u8; 32], side: Side, line: u32, out: &mut [i8]) {
    debug_assert_eq!(out.len() % PER_BLOCK, 0);
    let mut input = [0u8; 55];
    input[..14].copy_from_slice(DOMAIN);
    input[14] = side.tag();
    input[15..47].copy_from_slice(seed_r);
    input[47..51].copy_from_slice(&line.to_le_bytes());
    for (b, chunk) in out.chunks_exact_mut(PER_BLOCK).enumerate() {
        input[51..55].copy_from_slice(&(b as u32).to_le_bytes());
        let block = digest(&SHA256, &input);
        for (k, byte) in block.as_ref().iter().enumerate() {
            chunk[2 * k] = (byte & 0x0f) as i8 - 8;
            chunk[2 * k + 1] = (byte >> 4) as i8 - 8;
        }
    }
}

/// The dot product of a row of A and a column of B. |sum| ≤ 64·n < 2^31
/// for n ≤ 2^25: int32 never overflows, and any order of summation gives
/// these same bits (what a GPU's int8 GEMM with int32 accumulation gives).
pub fn dot(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

pub(crate) fn to32(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_its_blocks_nibbles_minus_eight() {
        let seed = [7u8; 32];
        let mut row = vec![0i8; 128];
        line(&seed, Side::A, 3, &mut row);
        // Block 1 by hand: the spec, not the code, decides the bytes.
        let mut input = Vec::new();
        input.extend_from_slice(b"warden-work-v1A");
        input.extend_from_slice(&seed);
        input.extend_from_slice(&3u32.to_le_bytes());
        input.extend_from_slice(&1u32.to_le_bytes());
        assert_eq!(input.len(), 55);
        let h = digest(&SHA256, &input);
        for (k, byte) in h.as_ref().iter().enumerate() {
            assert_eq!(row[64 + 2 * k], (byte & 15) as i8 - 8);
            assert_eq!(row[64 + 2 * k + 1], (byte >> 4) as i8 - 8);
        }
        assert!(row.iter().all(|&v| (-8..=7).contains(&v)));
    }

    #[test]
    fn sides_lines_and_seeds_give_different_lines() {
        let mut a = vec![0i8; 64];
        let mut b = vec![0i8; 64];
        line(&[1; 32], Side::A, 0, &mut a);
        line(&[1; 32], Side::B, 0, &mut b);
        assert_ne!(a, b);
        line(&[1; 32], Side::A, 1, &mut b);
        assert_ne!(a, b);
        line(&[2; 32], Side::A, 0, &mut b);
        assert_ne!(a, b);
        assert_ne!(first_seed(&[1; 32], "n1"), first_seed(&[1; 32], "n2"));
        assert_ne!(next_seed(&[1; 32], &[0; 32]), next_seed(&[1; 32], &[1; 32]));
    }

    #[test]
    fn entries_are_spread_over_the_sixteen_values() {
        let mut row = vec![0i8; 64 * 256];
        line(&[9; 32], Side::B, 0, &mut row);
        let mut counts = [0usize; 16];
        for v in &row {
            counts[(v + 8) as usize] += 1;
        }
        // 1024 expected per value; far outside means a broken generator.
        assert!(
            counts.iter().all(|&c| (800..1250).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_largest_sums_stay_exact_in_int32() {
        let n = super::super::MAX_N as usize;
        let a = vec![-8i8; n];
        assert_eq!(dot(&a, &a), 64 * n as i32);
    }
}
