//! The checker: whether an answer proves the challenge's products were
//! computed. Cost per round: one Merkle path and one tile recomputation
//! per opened tile — 8 rows of A and 8 columns of B regenerated (16·n/64
//! SHA-256 blocks) and 64 dot products of length n. Never O(n²).

use super::{
    matrix::{self, Side},
    merkle,
    solve::{seed32, spot_tiles, tile_origin, ParamError, Params},
    SIDE, TILE,
};
use crate::pb;

/// Why an answer does not pass; each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("the challenge itself is malformed: {0}")]
    Challenge(#[from] ParamError),
    #[error("the answer is from node {got}, the challenge was for {want}")]
    OtherNode { got: String, want: String },
    #[error("the answer is for challenge {got}, not {want}")]
    OtherChallenge { got: String, want: String },
    #[error("the node's solver failed: {0}")]
    SolverFailed(String),
    #[error("the answer came {late_ms} ms after the deadline")]
    Late { late_ms: i64 },
    #[error("the answer was computed on GPU {got:?}, the challenge named {want}")]
    OtherGpu { got: String, want: String },
    #[error("the answer has {got} rounds; the challenge asked for {want}")]
    Rounds { got: usize, want: u32 },
    #[error("round {round}: the root is {len} bytes, not 32")]
    Root { round: usize, len: usize },
    #[error("round {round}: {got} tiles opened; the challenge asked for {want}")]
    Openings { round: usize, got: usize, want: u32 },
    #[error(
        "round {round}, opening {q}: tile {got} opened where the commitment selects tile {want}"
    )]
    WrongTileIndex {
        round: usize,
        q: usize,
        got: u64,
        want: u64,
    },
    #[error("round {round}, tile {index}: {len} bytes, not 256 (8×8 int32)")]
    TileLength {
        round: usize,
        index: u64,
        len: usize,
    },
    #[error("round {round}, tile {index}: the Merkle path has {got} levels, not {want}, or a level is not 32 bytes")]
    PathShape {
        round: usize,
        index: u64,
        got: usize,
        want: u32,
    },
    #[error("round {round}, tile {index}: its Merkle path does not lead to the round's root (the tile is not the committed one)")]
    NotCommitted { round: usize, index: u64 },
    #[error("round {round}, tile {index}: C[{row}, {col}] is {got}, A·B gives {want} (the product was not computed)")]
    WrongProduct {
        round: usize,
        index: u64,
        row: u64,
        col: u64,
        got: i32,
        want: i32,
    },
}

/// Checks `answer` to `ch`, received (by the coordinator's clock) at
/// `received_unix_ms`. Cheap checks first: the deadline before any tile.
pub fn check(
    ch: &pb::WorkChallenge,
    answer: &pb::WorkAnswer,
    received_unix_ms: i64,
) -> Result<(), CheckError> {
    let p = Params::of(ch)?;
    let seed = seed32(&ch.seed)?;
    if answer.node_id != ch.node_id {
        return Err(CheckError::OtherNode {
            got: answer.node_id.clone(),
            want: ch.node_id.clone(),
        });
    }
    if answer.challenge_id != ch.challenge_id {
        return Err(CheckError::OtherChallenge {
            got: answer.challenge_id.clone(),
            want: ch.challenge_id.clone(),
        });
    }
    if !answer.error.is_empty() {
        return Err(CheckError::SolverFailed(answer.error.clone()));
    }
    if received_unix_ms > ch.deadline_unix_ms {
        return Err(CheckError::Late {
            late_ms: received_unix_ms - ch.deadline_unix_ms,
        });
    }
    let uuid = answer.identity.as_ref().map(|i| i.uuid.as_str());
    if uuid != Some(ch.gpu_uuid.as_str()) {
        return Err(CheckError::OtherGpu {
            got: uuid.unwrap_or("(none)").to_owned(),
            want: ch.gpu_uuid.clone(),
        });
    }
    if answer.rounds.len() != p.rounds as usize {
        return Err(CheckError::Rounds {
            got: answer.rounds.len(),
            want: p.rounds,
        });
    }
    let mut seed_r = matrix::first_seed(&seed, &ch.node_id);
    for (r, round) in answer.rounds.iter().enumerate() {
        let root: [u8; 32] = round
            .root
            .as_slice()
            .try_into()
            .map_err(|_| CheckError::Root {
                round: r,
                len: round.root.len(),
            })?;
        check_round(&p, r, &seed_r, &root, &round.openings)?;
        seed_r = matrix::next_seed(&seed_r, &root);
    }
    Ok(())
}

/// One round: the openings are the tiles the root selects, each is in the
/// tree under the root, and each equals A·B there.
pub fn check_round(
    p: &Params,
    round: usize,
    seed_r: &[u8; 32],
    root: &[u8; 32],
    openings: &[pb::TileOpening],
) -> Result<(), CheckError> {
    let want = spot_tiles(seed_r, root, p.tiles(), p.spot_tiles);
    if openings.len() != want.len() {
        return Err(CheckError::Openings {
            round,
            got: openings.len(),
            want: p.spot_tiles,
        });
    }
    let depth = merkle::depth(p.tiles());
    for (q, (o, &want)) in openings.iter().zip(&want).enumerate() {
        if o.index != want {
            return Err(CheckError::WrongTileIndex {
                round,
                q,
                got: o.index,
                want,
            });
        }
        if o.tile.len() != TILE * 4 {
            return Err(CheckError::TileLength {
                round,
                index: o.index,
                len: o.tile.len(),
            });
        }
        let path: Option<Vec<[u8; 32]>> = o
            .path
            .iter()
            .map(|h| h.as_slice().try_into().ok())
            .collect();
        let path = match path {
            Some(p) if p.len() == depth as usize => p,
            _ => {
                return Err(CheckError::PathShape {
                    round,
                    index: o.index,
                    got: o.path.len(),
                    want: depth,
                })
            }
        };
        if merkle::root_from_path(merkle::leaf(&o.tile), o.index, &path) != *root {
            return Err(CheckError::NotCommitted {
                round,
                index: o.index,
            });
        }
        check_tile(p.n, round, seed_r, o)?;
    }
    Ok(())
}

/// Recomputes one opened tile from 8 rows of A and 8 columns of B.
pub fn check_tile(
    n: u32,
    round: usize,
    seed_r: &[u8; 32],
    o: &pb::TileOpening,
) -> Result<(), CheckError> {
    let (row0, col0) = tile_origin(n, o.index);
    let n = n as usize;
    let mut a = vec![0i8; n * SIDE];
    let mut b = vec![0i8; n * SIDE];
    for (k, line) in a.chunks_exact_mut(n).enumerate() {
        matrix::line(seed_r, Side::A, (row0 + k as u64) as u32, line);
    }
    for (k, line) in b.chunks_exact_mut(n).enumerate() {
        matrix::line(seed_r, Side::B, (col0 + k as u64) as u32, line);
    }
    for (k, got) in o.tile.chunks_exact(4).enumerate() {
        let (r, c) = (k / SIDE, k % SIDE);
        let want = matrix::dot(&a[r * n..][..n], &b[c * n..][..n]);
        let got = i32::from_le_bytes([got[0], got[1], got[2], got[3]]);
        if got != want {
            return Err(CheckError::WrongProduct {
                round,
                index: o.index,
                row: row0 + r as u64,
                col: col0 + c as u64,
                got,
                want,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workproof::{merkle::Tree, solve};
    use proptest::prelude::*;

    const NODE: &str = "node-a";

    fn challenge(n: u32, rounds: u32, spot: u32) -> pb::WorkChallenge {
        pb::WorkChallenge {
            node_id: NODE.into(),
            challenge_id: "ch-1".into(),
            seed: vec![42; 32],
            gpu_uuid: "GPU-1".into(),
            n,
            rounds,
            spot_tiles: spot,
            issued_unix_ms: 1_000,
            deadline_unix_ms: 10_000,
            cc_nonce: vec![0; 32],
        }
    }

    fn answer(ch: &pb::WorkChallenge) -> pb::WorkAnswer {
        let p = Params::of(ch).unwrap();
        pb::WorkAnswer {
            node_id: ch.node_id.clone(),
            challenge_id: ch.challenge_id.clone(),
            rounds: solve::solve(&seed32(&ch.seed).unwrap(), &ch.node_id, &p, 2).unwrap(),
            identity: Some(pb::GpuIdentity {
                uuid: ch.gpu_uuid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_honest_answer_passes_and_every_tampering_fails_naming_it() {
        let ch = challenge(128, 2, 8);
        let good = answer(&ch);
        assert_eq!(check(&ch, &good, 10_000), Ok(()));

        let mut a = good.clone();
        a.rounds[1].openings[3].tile[5] ^= 1;
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::NotCommitted { round: 1, .. })
        ));

        let mut a = good.clone();
        a.rounds[0].openings[0].index ^= 1;
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::WrongTileIndex { round: 0, q: 0, .. })
        ));

        let mut a = good.clone();
        a.rounds[0].root[0] ^= 1;
        // Another root selects other tiles (or the same with paths that no longer lead to it).
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::WrongTileIndex { round: 0, .. }
                | CheckError::NotCommitted { round: 0, .. })
        ));

        let mut a = good.clone();
        a.rounds[0].openings.pop();
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::Openings {
                round: 0,
                got: 7,
                want: 8
            })
        ));

        let mut a = good.clone();
        a.rounds[0].openings[2].path.pop();
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::PathShape { round: 0, .. })
        ));

        let mut a = good.clone();
        a.rounds[0].openings[2].tile.truncate(100);
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::TileLength { len: 100, .. })
        ));

        let mut a = good.clone();
        a.rounds.pop();
        assert_eq!(
            check(&ch, &a, 0),
            Err(CheckError::Rounds { got: 1, want: 2 })
        );

        let e = check(&ch, &good, 10_001).unwrap_err();
        assert_eq!(e, CheckError::Late { late_ms: 1 });
        assert_eq!(e.to_string(), "the answer came 1 ms after the deadline");

        let mut a = good.clone();
        a.identity = Some(pb::GpuIdentity {
            uuid: "GPU-2".into(),
            ..Default::default()
        });
        assert!(matches!(
            check(&ch, &a, 0),
            Err(CheckError::OtherGpu { .. })
        ));

        let mut a = good.clone();
        a.error = "no GPU".into();
        assert_eq!(
            check(&ch, &a, 0),
            Err(CheckError::SolverFailed("no GPU".into()))
        );
    }

    #[test]
    fn an_answer_to_another_seed_node_or_challenge_fails() {
        let ch = challenge(64, 1, 8);
        let good = answer(&ch);
        let other_seed = pb::WorkChallenge {
            seed: vec![43; 32],
            ..ch.clone()
        };
        assert!(check(&other_seed, &good, 0).is_err());
        // The same seed for another node derives other matrices.
        let other_node = pb::WorkChallenge {
            node_id: "node-b".into(),
            ..ch.clone()
        };
        let relabelled = pb::WorkAnswer {
            node_id: "node-b".into(),
            ..good.clone()
        };
        assert!(check(&other_node, &relabelled, 0).is_err());
        assert!(matches!(
            check(&other_node, &good, 0),
            Err(CheckError::OtherNode { .. })
        ));
        let other_id = pb::WorkChallenge {
            challenge_id: "ch-2".into(),
            ..ch.clone()
        };
        assert!(matches!(
            check(&other_id, &good, 0),
            Err(CheckError::OtherChallenge { .. })
        ));
    }

    #[test]
    fn the_cheap_shortcut_a_times_b_r_is_no_answer() {
        // A committed C whose tiles are A·B only where a cheater guessed the
        // spots would be: it must compute its root first, which moves them.
        let ch = challenge(128, 1, 8);
        let p = Params::of(&ch).unwrap();
        let seed_r = crate::workproof::matrix::first_seed(&seed32(&ch.seed).unwrap(), NODE);
        let honest = solve::product(&seed_r, 128, 2);
        let mut c = honest.clone();
        // Half the rows not computed (zeros).
        for v in c[64 * 128..].iter_mut() {
            *v = 0;
        }
        let tree = Tree::new(
            (0..p.tiles())
                .map(|t| merkle::leaf(&solve::tile_bytes(&c, p.n, t)))
                .collect(),
        );
        let root = tree.root();
        let openings: Vec<pb::TileOpening> = spot_tiles(&seed_r, &root, p.tiles(), 8)
            .into_iter()
            .map(|t| pb::TileOpening {
                index: t,
                tile: solve::tile_bytes(&c, p.n, t),
                path: tree.path(t as usize).iter().map(|h| h.to_vec()).collect(),
            })
            .collect();
        let e = check_round(&p, 0, &seed_r, &root, &openings).unwrap_err();
        assert!(
            matches!(e, CheckError::WrongProduct { row, .. } if row >= 64),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn whatever_a_node_sends_the_checker_answers_without_panicking(
            junk in proptest::collection::vec(any::<u8>(), 0..2048),
            flip in any::<usize>(),
            bit in 0u8..8,
        ) {
            use prost::Message;
            let ch = challenge(64, 2, 8);
            if let Ok(a) = pb::WorkAnswer::decode(junk.as_slice()) {
                let _ = check(&ch, &a, 0);
            }
            let _ = crate::workproof::contract::Output::parse(&junk);
            // An honest answer with one bit flipped anywhere in its encoding.
            let mut bytes = answer(&ch).encode_to_vec();
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            if let Ok(a) = pb::WorkAnswer::decode(bytes.as_slice()) {
                let _ = check(&ch, &a, 0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_one_wrong_entry_in_an_opened_tile_is_caught(q in 0usize..8, k in 0usize..64, delta in 1i32..1000) {
            // Recommitted honestly around the wrong entry: the path holds,
            // the product does not.
            let ch = challenge(64, 1, 8);
            let p = Params::of(&ch).unwrap();
            let seed_r = crate::workproof::matrix::first_seed(&seed32(&ch.seed).unwrap(), NODE);
            let c = solve::product(&seed_r, 64, 1);
            let tree = Tree::new((0..p.tiles()).map(|t| merkle::leaf(&solve::tile_bytes(&c, p.n, t))).collect());
            let root = tree.root();
            let spots = spot_tiles(&seed_r, &root, p.tiles(), 8);
            let mut c2 = c.clone();
            let (r0, c0) = tile_origin(64, spots[q]);
            c2[(r0 as usize + k / SIDE) * 64 + c0 as usize + k % SIDE] += delta;
            // Try the cheater's root: its own spots, its own paths.
            let tree2 = Tree::new((0..p.tiles()).map(|t| merkle::leaf(&solve::tile_bytes(&c2, p.n, t))).collect());
            let root2 = tree2.root();
            let openings: Vec<pb::TileOpening> = spot_tiles(&seed_r, &root2, p.tiles(), 8).into_iter().map(|t| pb::TileOpening {
                index: t,
                tile: solve::tile_bytes(&c2, p.n, t),
                path: tree2.path(t as usize).iter().map(|h| h.to_vec()).collect(),
            }).collect();
            // n = 64 has 64 tiles and 8 spots: the wrong tile may not be
            // among the new spots; when it is, the check must say so.
            let wrong = spots[q];
            let opened = openings.iter().any(|o| o.index == wrong);
            let r = check_round(&p, 0, &seed_r, &root2, &openings);
            prop_assert_eq!(r.is_err(), opened);
            if opened {
                let is_wrong_product = matches!(r, Err(CheckError::WrongProduct { .. }));
                prop_assert!(is_wrong_product);
            }
        }
    }
}
