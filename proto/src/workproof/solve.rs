//! The CPU reference solver: what a GPU solver must produce, bit for bit,
//! computed plainly. O(n³) per round: for tests, small n and the bench.

use ring::digest::{Context, SHA256};

use super::{
    matrix::{self, Side},
    merkle::{self, Tree},
    DOMAIN, MAX_N, MAX_ROUNDS, MAX_SPOT_TILES, N_STEP, SIDE, TILE,
};
use crate::pb;

/// The shape of a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub n: u32,
    pub rounds: u32,
    pub spot_tiles: u32,
}

/// Why a challenge's shape is not one a solver takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("n is {0}: it must be a multiple of 64 between 64 and {MAX_N}")]
    N(u32),
    #[error("rounds is {0}: it must be between 1 and {MAX_ROUNDS}")]
    Rounds(u32),
    #[error("spot_tiles is {got}: it must be between 1 and {max} (at most {MAX_SPOT_TILES}, and no more than the {tiles} tiles of a round)", max = (*tiles).min(MAX_SPOT_TILES as u64))]
    Spot { got: u32, tiles: u64 },
    #[error("the seed is {0} bytes, not 32")]
    Seed(usize),
}

impl Params {
    pub fn of(ch: &pb::WorkChallenge) -> Result<Params, ParamError> {
        let p = Params {
            n: ch.n,
            rounds: ch.rounds,
            spot_tiles: ch.spot_tiles,
        };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        if self.n < N_STEP || self.n > MAX_N || !self.n.is_multiple_of(N_STEP) {
            return Err(ParamError::N(self.n));
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(ParamError::Rounds(self.rounds));
        }
        let tiles = self.tiles();
        if self.spot_tiles == 0
            || self.spot_tiles > MAX_SPOT_TILES
            || self.spot_tiles as u64 > tiles
        {
            return Err(ParamError::Spot {
                got: self.spot_tiles,
                tiles,
            });
        }
        Ok(())
    }

    /// Tiles (Merkle leaves before padding) in one round: (n/8)².
    pub fn tiles(&self) -> u64 {
        self.n as u64 * self.n as u64 / TILE as u64
    }

    /// Tiles in one row of tiles: n/8.
    pub fn tiles_per_row(&self) -> u64 {
        self.n as u64 / SIDE as u64
    }
}

/// The seed as 32 bytes.
pub fn seed32(seed: &[u8]) -> Result<[u8; 32], ParamError> {
    seed.try_into().map_err(|_| ParamError::Seed(seed.len()))
}

/// The tiles round r must open, chosen by its own commitment (Fiat–Shamir):
/// for q = 0, 1, …, the first 8 bytes (LE) of SHA-256(DOMAIN ‖ `Q` ‖ seed_r
/// ‖ root_r ‖ q as u32 LE) modulo the round's tiles, skipping repeats,
/// until `count` distinct indices.
pub fn spot_tiles(seed_r: &[u8; 32], root_r: &[u8; 32], tiles: u64, count: u32) -> Vec<u64> {
    let count = (count as u64).min(tiles) as usize;
    let mut out = Vec::with_capacity(count);
    let mut q: u32 = 0;
    while out.len() < count {
        let mut c = Context::new(&SHA256);
        c.update(DOMAIN);
        c.update(b"Q");
        c.update(seed_r);
        c.update(root_r);
        c.update(&q.to_le_bytes());
        let h = c.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.as_ref()[..8]);
        let index = u64::from_le_bytes(first) % tiles;
        if !out.contains(&index) {
            out.push(index);
        }
        q = q.wrapping_add(1);
    }
    out
}

/// Round r's product C = A·B, row-major, on up to `threads` threads.
pub fn product(seed_r: &[u8; 32], n: usize, threads: usize) -> Vec<i32> {
    let mut a = vec![0i8; n * n];
    let mut bt = vec![0i8; n * n];
    for (i, row) in a.chunks_exact_mut(n).enumerate() {
        matrix::line(seed_r, Side::A, i as u32, row);
    }
    for (j, col) in bt.chunks_exact_mut(n).enumerate() {
        matrix::line(seed_r, Side::B, j as u32, col);
    }
    let mut c = vec![0i32; n * n];
    let per = n.div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for (t, rows) in c.chunks_mut(per * n).enumerate() {
            let (a, bt) = (&a, &bt);
            s.spawn(move || {
                for (k, out) in rows.chunks_exact_mut(n).enumerate() {
                    let ar = &a[(t * per + k) * n..][..n];
                    for (j, v) in out.iter_mut().enumerate() {
                        *v = matrix::dot(ar, &bt[j * n..][..n]);
                    }
                }
            });
        }
    });
    c
}

/// The first row and column of tile `index` (row-major over (n/8)² tiles).
pub fn tile_origin(n: u32, index: u64) -> (u64, u64) {
    let per_row = n as u64 / SIDE as u64;
    (index / per_row * SIDE as u64, index % per_row * SIDE as u64)
}

/// The bytes of tile `index` of C (n×n, row-major): its 8 rows of 8
/// int32, row after row, little-endian.
pub fn tile_bytes(c: &[i32], n: u32, index: u64) -> Vec<u8> {
    let (row, col) = tile_origin(n, index);
    let mut out = Vec::with_capacity(TILE * 4);
    for r in 0..SIDE {
        let at = (row as usize + r) * n as usize + col as usize;
        out.extend(c[at..at + SIDE].iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}

/// Solves a challenge on the CPU: every round's root and openings.
pub fn solve(
    seed: &[u8; 32],
    node_id: &str,
    p: &Params,
    threads: usize,
) -> Result<Vec<pb::WorkRound>, ParamError> {
    p.validate()?;
    let n = p.n as usize;
    let mut seed_r = matrix::first_seed(seed, node_id);
    let mut rounds = Vec::with_capacity(p.rounds as usize);
    for _ in 0..p.rounds {
        let c = product(&seed_r, n, threads);
        let leaves = (0..p.tiles())
            .map(|t| merkle::leaf(&tile_bytes(&c, p.n, t)))
            .collect();
        let tree = Tree::new(leaves);
        let root = tree.root();
        let openings = spot_tiles(&seed_r, &root, p.tiles(), p.spot_tiles)
            .into_iter()
            .map(|t| pb::TileOpening {
                index: t,
                tile: tile_bytes(&c, p.n, t),
                path: tree.path(t as usize).iter().map(|h| h.to_vec()).collect(),
            })
            .collect();
        rounds.push(pb::WorkRound {
            root: root.to_vec(),
            openings,
        });
        seed_r = matrix::next_seed(&seed_r, &root);
    }
    Ok(rounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_is_a_times_b() {
        let n = 64;
        let seed = [3u8; 32];
        let c = product(&seed, n, 3);
        let mut a = vec![0i8; n];
        let mut b = vec![0i8; n];
        for (i, j) in [(0, 0), (5, 63), (63, 17)] {
            matrix::line(&seed, Side::A, i, &mut a);
            matrix::line(&seed, Side::B, j, &mut b);
            let want: i32 = (0..n).map(|k| a[k] as i32 * b[k] as i32).sum();
            assert_eq!(c[i as usize * n + j as usize], want);
        }
        // Threads do not change a bit.
        assert_eq!(product(&seed, n, 1), c);
    }

    #[test]
    fn spot_tiles_are_distinct_in_range_and_follow_the_root() {
        let s = spot_tiles(&[1; 32], &[2; 32], 64, 64);
        let mut sorted = s.clone();
        sorted.sort();
        assert_eq!(sorted, (0..64).collect::<Vec<u64>>());
        assert_ne!(
            spot_tiles(&[1; 32], &[2; 32], 1 << 20, 8),
            spot_tiles(&[1; 32], &[3; 32], 1 << 20, 8)
        );
    }

    #[test]
    fn shapes_out_of_range_are_refused_naming_the_field() {
        let ok = Params {
            n: 128,
            rounds: 2,
            spot_tiles: 16,
        };
        assert_eq!(ok.validate(), Ok(()));
        for (p, what) in [
            (Params { n: 100, ..ok }, "n is 100"),
            (Params { n: 0, ..ok }, "n is 0"),
            (Params { rounds: 0, ..ok }, "rounds is 0"),
            (Params { rounds: 33, ..ok }, "rounds is 33"),
            (
                Params {
                    spot_tiles: 0,
                    ..ok
                },
                "spot_tiles is 0",
            ),
            (
                Params {
                    n: 64,
                    spot_tiles: 65,
                    ..ok
                },
                "spot_tiles is 65",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }
}
