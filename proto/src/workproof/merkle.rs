//! The commitment to one round's C: a Merkle tree over its tiles in
//! row-major order, padded to a power of two with all-zero leaves.
//! leaf = SHA-256(0x00 ‖ tile bytes); node = SHA-256(0x01 ‖ left ‖ right)
//! (the prefixes of RFC 6962, so a node never passes for a leaf).

use ring::digest::{Context, SHA256};

use super::matrix::to32;

/// A padding leaf, past the last tile.
pub const EMPTY: [u8; 32] = [0; 32];

/// The leaf of one tile (its 8×8 int32, little-endian).
pub fn leaf(tile: &[u8]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(&[0]);
    c.update(tile);
    to32(c.finish().as_ref())
}

/// An inner node.
pub fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(&[1]);
    c.update(left);
    c.update(right);
    to32(c.finish().as_ref())
}

/// Levels of a path for `leaves` leaves: log2 of the next power of two.
pub fn depth(leaves: u64) -> u32 {
    leaves.max(1).next_power_of_two().trailing_zeros()
}

/// A whole tree, kept by the solver to open tiles.
pub struct Tree {
    /// levels[0] are the leaves (padded); the last level is the root.
    levels: Vec<Vec<[u8; 32]>>,
}

impl Tree {
    pub fn new(mut leaves: Vec<[u8; 32]>) -> Tree {
        leaves.resize(leaves.len().max(1).next_power_of_two(), EMPTY);
        let mut levels = vec![leaves];
        while levels.last().map_or(0, Vec::len) > 1 {
            let up = levels
                .last()
                .map(|l| l.chunks_exact(2).map(|p| node(&p[0], &p[1])).collect())
                .unwrap_or_default();
            levels.push(up);
        }
        Tree { levels }
    }

    pub fn root(&self) -> [u8; 32] {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or(EMPTY)
    }

    /// The siblings from the leaf's level up to just below the root.
    pub fn path(&self, mut index: usize) -> Vec<[u8; 32]> {
        let mut out = Vec::with_capacity(self.levels.len() - 1);
        for level in &self.levels[..self.levels.len() - 1] {
            out.push(level[index ^ 1]);
            index /= 2;
        }
        out
    }
}

/// The root a leaf at `index` and its path lead to.
pub fn root_from_path(leaf: [u8; 32], mut index: u64, path: &[[u8; 32]]) -> [u8; 32] {
    let mut h = leaf;
    for sib in path {
        h = if index & 1 == 0 {
            node(&h, sib)
        } else {
            node(sib, &h)
        };
        index >>= 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_leaf_opens_to_the_root_and_only_at_its_place(count in 1usize..70, pick in 0usize..70) {
            let leaves: Vec<[u8; 32]> = (0..count).map(|i| leaf(&[i as u8; 8])).collect();
            let t = Tree::new(leaves.clone());
            let i = pick % count;
            let path = t.path(i);
            prop_assert_eq!(path.len() as u32, depth(count as u64));
            prop_assert_eq!(root_from_path(leaves[i], i as u64, &path), t.root());
            if count > 1 {
                let j = (i + 1) % count;
                prop_assert_ne!(root_from_path(leaves[i], j as u64, &path), t.root());
                prop_assert_ne!(root_from_path(leaves[j], i as u64, &path), t.root());
            }
        }
    }

    #[test]
    fn one_leaf_is_its_own_root_with_an_empty_path() {
        let t = Tree::new(vec![leaf(b"x")]);
        assert_eq!(t.root(), leaf(b"x"));
        assert!(t.path(0).is_empty());
        assert_eq!(depth(1), 0);
        assert_eq!(depth(5), 3);
    }
}
