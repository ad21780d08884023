//! The solver container's contract: the challenge in as environment
//! variables, the answer out as one JSON object on stdout. An operator's
//! CUDA image implements this; `warden challenge solve` is the CPU one.

use serde::{Deserialize, Serialize};

use super::solve::{seed32, ParamError, Params};
use crate::pb;

pub const ENV_SEED: &str = "WARDEN_WORK_SEED";
pub const ENV_NODE: &str = "WARDEN_WORK_NODE";
pub const ENV_N: &str = "WARDEN_WORK_N";
pub const ENV_ROUNDS: &str = "WARDEN_WORK_ROUNDS";
pub const ENV_SPOT: &str = "WARDEN_WORK_SPOT_TILES";
pub const ENV_GPU: &str = "WARDEN_WORK_GPU";

/// The most stdout the agent reads from a solver: the largest answer
/// (32 rounds × 64 tiles, hex) is about 6 MiB.
pub const MAX_OUTPUT: usize = 8 << 20;

/// What a solver is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub seed: [u8; 32],
    pub node_id: String,
    pub params: Params,
    pub gpu_uuid: String,
}

/// Why a solver's environment or output is unusable; names the variable or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{name} is {value:?}: {why}")]
    Bad {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error("the solver's output is not the answer JSON: {0}")]
    Output(String),
    #[error("the solver's output is {0} bytes; at most {MAX_OUTPUT} are read")]
    TooLarge(usize),
}

impl Input {
    pub fn of(ch: &pb::WorkChallenge) -> Result<Input, ContractError> {
        Ok(Input {
            seed: seed32(&ch.seed)?,
            node_id: ch.node_id.clone(),
            params: Params::of(ch)?,
            gpu_uuid: ch.gpu_uuid.clone(),
        })
    }

    /// `NAME=value` pairs for the container.
    pub fn to_env(&self) -> Vec<String> {
        vec![
            format!("{ENV_SEED}={}", hex::encode(self.seed)),
            format!("{ENV_NODE}={}", self.node_id),
            format!("{ENV_N}={}", self.params.n),
            format!("{ENV_ROUNDS}={}", self.params.rounds),
            format!("{ENV_SPOT}={}", self.params.spot_tiles),
            format!("{ENV_GPU}={}", self.gpu_uuid),
        ]
    }

    /// Reads the variables through `get` (the process environment in a solver).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Input, ContractError> {
        let var = |name: &'static str| get(name).ok_or(ContractError::Missing(name));
        let num = |name: &'static str| -> Result<u32, ContractError> {
            let v = var(name)?;
            v.parse()
                .map_err(|e: std::num::ParseIntError| ContractError::Bad {
                    name,
                    value: v.clone(),
                    why: e.to_string(),
                })
        };
        let seed_hex = var(ENV_SEED)?;
        let seed = hex::decode(&seed_hex)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| ContractError::Bad {
                name: ENV_SEED,
                value: seed_hex.clone(),
                why: "not 64 hex digits".into(),
            })?;
        let params = Params {
            n: num(ENV_N)?,
            rounds: num(ENV_ROUNDS)?,
            spot_tiles: num(ENV_SPOT)?,
        };
        params.validate()?;
        Ok(Input {
            seed,
            node_id: var(ENV_NODE)?,
            params,
            gpu_uuid: get(ENV_GPU).unwrap_or_default(),
        })
    }
}

/// The answer JSON: `{"rounds":[{"root":HEX,"openings":[{"index":N,"tile":HEX,"path":[HEX,…]}]}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub rounds: Vec<RoundOut>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundOut {
    pub root: String,
    pub openings: Vec<OpeningOut>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpeningOut {
    pub index: u64,
    pub tile: String,
    pub path: Vec<String>,
}

impl Output {
    pub fn of(rounds: &[pb::WorkRound]) -> Output {
        Output {
            rounds: rounds
                .iter()
                .map(|r| RoundOut {
                    root: hex::encode(&r.root),
                    openings: r
                        .openings
                        .iter()
                        .map(|o| OpeningOut {
                            index: o.index,
                            tile: hex::encode(&o.tile),
                            path: o.path.iter().map(hex::encode).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Parses a solver's stdout (surrounding whitespace allowed).
    pub fn parse(stdout: &[u8]) -> Result<Vec<pb::WorkRound>, ContractError> {
        if stdout.len() > MAX_OUTPUT {
            return Err(ContractError::TooLarge(stdout.len()));
        }
        let out: Output = serde_json::from_slice(stdout.trim_ascii())
            .map_err(|e| ContractError::Output(e.to_string()))?;
        let unhex = |what: &str, s: &str| {
            hex::decode(s).map_err(|e| ContractError::Output(format!("{what}: {e}")))
        };
        out.rounds
            .iter()
            .map(|r| {
                Ok(pb::WorkRound {
                    root: unhex("root", &r.root)?,
                    openings: r
                        .openings
                        .iter()
                        .map(|o| {
                            Ok(pb::TileOpening {
                                index: o.index,
                                tile: unhex("tile", &o.tile)?,
                                path: o
                                    .path
                                    .iter()
                                    .map(|h| unhex("path", h))
                                    .collect::<Result<_, _>>()?,
                            })
                        })
                        .collect::<Result<_, ContractError>>()?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_environment_round_trips_and_bad_values_are_named() {
        let input = Input {
            seed: [5; 32],
            node_id: "node-a".into(),
            params: Params {
                n: 128,
                rounds: 2,
                spot_tiles: 4,
            },
            gpu_uuid: "GPU-1".into(),
        };
        let env: HashMap<String, String> = input
            .to_env()
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        assert_eq!(Input::from_env(|k| env.get(k).cloned()), Ok(input));
        let mut bad = env.clone();
        bad.insert(ENV_N.into(), "12x".into());
        let e = Input::from_env(|k| bad.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("WARDEN_WORK_N is \"12x\""), "{e}");
        bad.insert(ENV_N.into(), "100".into());
        let e = Input::from_env(|k| bad.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(e.contains("n is 100"), "{e}");
        let mut none = env.clone();
        none.remove(ENV_SEED);
        assert_eq!(
            Input::from_env(|k| none.get(k).cloned()),
            Err(ContractError::Missing(ENV_SEED))
        );
    }

    #[test]
    fn the_output_round_trips_and_garbage_is_refused() {
        let rounds = crate::workproof::solve(
            &[1; 32],
            "n",
            &Params {
                n: 64,
                rounds: 2,
                spot_tiles: 3,
            },
            1,
        )
        .unwrap();
        let json = serde_json::to_vec(&Output::of(&rounds)).unwrap();
        assert_eq!(Output::parse(&json).unwrap(), rounds);
        assert!(matches!(
            Output::parse(b"hello"),
            Err(ContractError::Output(_))
        ));
        assert!(matches!(
            Output::parse(br#"{"rounds":[{"root":"zz","openings":[]}]}"#),
            Err(ContractError::Output(m)) if m.starts_with("root")
        ));
    }
}
