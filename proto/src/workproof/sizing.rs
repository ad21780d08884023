//! How big a challenge is for a claimed GPU, and how long it may take:
//! n from the memory NVML reports, rounds and deadline from the claimed
//! model's int8 throughput (the table in docs/attestation.md#work-challenge).

use std::time::Duration;

use super::{solve::Params, MAX_N, MAX_ROUNDS, N_STEP, TILE};

/// A claimed model's conservative int8 (dense, int32-accumulate) figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    /// Matched as a substring of NVML's name, first match in the table wins.
    pub name: &'static str,
    /// Half the datasheet's dense int8 tensor TOPS: what a plain cuBLASLt
    /// int8 GEMM of this size reaches with room to spare.
    pub int8_tops: f64,
}

/// Most specific names first ("H100 PCIe" before "H100", "A100" before "A10").
pub const MODELS: &[Model] = &[
    Model {
        name: "B200",
        int8_tops: 2250.0,
    },
    Model {
        name: "H200",
        int8_tops: 990.0,
    },
    Model {
        name: "H100 PCIe",
        int8_tops: 756.0,
    },
    Model {
        name: "H100 NVL",
        int8_tops: 835.0,
    },
    Model {
        name: "H100",
        int8_tops: 990.0,
    },
    Model {
        name: "A100",
        int8_tops: 312.0,
    },
    Model {
        name: "L40S",
        int8_tops: 366.0,
    },
    Model {
        name: "L40",
        int8_tops: 181.0,
    },
    Model {
        name: "RTX 6000 Ada",
        int8_tops: 364.0,
    },
    Model {
        name: "RTX 4090",
        int8_tops: 330.0,
    },
    Model {
        name: "RTX A6000",
        int8_tops: 155.0,
    },
    Model {
        name: "RTX 3090",
        int8_tops: 142.0,
    },
    Model {
        name: "A40",
        int8_tops: 150.0,
    },
    Model {
        name: "A10",
        int8_tops: 125.0,
    },
    Model {
        name: "L4",
        int8_tops: 121.0,
    },
    Model {
        name: "T4",
        int8_tops: 65.0,
    },
];

/// The row of [`MODELS`] NVML's name claims, if any.
pub fn model(gpu_name: &str) -> Option<&'static Model> {
    MODELS.iter().find(|m| gpu_name.contains(m.name))
}

/// The coordinator's settings for sizing (its config `[work_challenge]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Share of the GPU's memory the honest solver's A, B, C and tree fill
    /// (7·n² bytes).
    pub fill: f64,
    /// Upper bound on n (tests and small deployments set it low).
    pub max_n: u32,
    /// GPU time the claimed model should need: rounds are added up to it.
    pub target: Duration,
    /// Added to the deadline for starting the container and the round trip.
    pub allowance: Duration,
    /// The deadline allows this many times the claimed model's time.
    pub slack: f64,
    pub spot_tiles: u32,
    /// Throughput assumed for a model not in [`MODELS`]: low, so an unknown
    /// card is not failed for being slow (it then proves little of its speed).
    pub unknown_tops: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            fill: 0.6,
            max_n: MAX_N,
            target: Duration::from_secs(30),
            allowance: Duration::from_secs(10),
            slack: 1.25,
            spot_tiles: 32,
            unknown_tops: 20.0,
        }
    }
}

/// One challenge's shape and time limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub params: Params,
    /// From issue to the answer's arrival.
    pub deadline: Duration,
    /// What the claimed model should need for all rounds.
    pub expected: Duration,
    /// The figure used, and the table row it came from (None: unknown model).
    pub int8_tops: f64,
    pub model: Option<&'static str>,
}

/// Sizes a challenge for a GPU claiming `memory_total_bytes` and `gpu_name`.
pub fn plan(memory_total_bytes: u64, gpu_name: &str, policy: &Policy) -> Plan {
    let m = model(gpu_name);
    let tops = m.map_or(policy.unknown_tops, |m| m.int8_tops).max(1e-3);
    let fit = (policy.fill.clamp(0.0, 1.0) * memory_total_bytes as f64 / 7.0).sqrt();
    let cap = policy.max_n.min(MAX_N) / N_STEP * N_STEP;
    let n = ((fit as u64 / N_STEP as u64) as u32 * N_STEP).clamp(N_STEP, cap.max(N_STEP));
    let per_round = 2.0 * (n as f64).powi(3) / (tops * 1e12);
    let rounds = ((policy.target.as_secs_f64() / per_round).ceil() as u64)
        .clamp(1, MAX_ROUNDS as u64) as u32;
    let tiles = n as u64 * n as u64 / TILE as u64;
    let spot_tiles = (policy.spot_tiles.max(1) as u64).min(tiles) as u32;
    let expected = Duration::from_secs_f64(per_round * rounds as f64);
    Plan {
        params: Params {
            n,
            rounds,
            spot_tiles: spot_tiles.min(super::MAX_SPOT_TILES),
        },
        deadline: policy.allowance + expected.mul_f64(policy.slack.max(1.0)),
        expected,
        int8_tops: tops,
        model: m.map(|m| m.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_their_own_row_not_a_shorter_one() {
        for (name, row) in [
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("NVIDIA H100 PCIe", "H100 PCIe"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA GH200 480GB", "H200"),
            ("NVIDIA A100-SXM4-80GB", "A100"),
            ("NVIDIA A10", "A10"),
            ("NVIDIA L40S", "L40S"),
            ("NVIDIA L4", "L4"),
            ("NVIDIA GeForce RTX 4090", "RTX 4090"),
            ("Tesla T4", "T4"),
        ] {
            assert_eq!(model(name).map(|m| m.name), Some(row), "{name}");
        }
        assert_eq!(model("Fake GPU 9000"), None);
    }

    #[test]
    fn an_h200_fills_its_memory_and_half_a_minute_and_an_a100_would_miss() {
        let h200 = plan(141 << 30, "NVIDIA H200", &Policy::default());
        assert_eq!(h200.params.n % 64, 0);
        // 7·n² within 60 % of the memory, and within one tile of it.
        let bytes = |n: u64| 7 * n * n;
        assert!(bytes(h200.params.n as u64) as f64 <= 0.6 * (141u64 << 30) as f64);
        assert!(bytes(h200.params.n as u64 + 64) as f64 > 0.6 * (141u64 << 30) as f64);
        assert!(h200.expected >= Duration::from_secs(30));
        assert!(h200.expected < Duration::from_secs(35));
        // The same work at an A100's rate takes longer than the deadline.
        let a100_time = h200.expected.mul_f64(990.0 / 312.0);
        assert!(
            a100_time > h200.deadline,
            "{a100_time:?} vs {:?}",
            h200.deadline
        );
    }

    #[test]
    fn a_small_cap_gives_the_tests_a_small_challenge() {
        let p = Policy {
            max_n: 128,
            target: Duration::ZERO,
            spot_tiles: 8,
            ..Policy::default()
        };
        let plan = plan(80 << 30, "Fake GPU 9000", &p);
        assert_eq!(
            plan.params,
            Params {
                n: 128,
                rounds: 1,
                spot_tiles: 8
            }
        );
        assert_eq!(plan.model, None);
        assert_eq!(plan.int8_tops, 20.0);
        assert!(plan.params.validate().is_ok());
    }
}
