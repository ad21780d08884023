//! The matcher at network scale: `matcher::plan` over N synthetic nodes
//! (1 to 8 GPUs each of four models, five regions, links from 100 Mbit/s
//! to 10 Gbit/s, a third of the GPUs leased, tags), for orders of 8, 64
//! and 512 GPUs, with and without filters. Median of repeated runs. Run
//! with `cargo bench --bench cluster` (`WARDEN_BENCH_NODES=10000,100000`);
//! prints figures, asserts nothing. Then the whole hire, order to ready by
//! phase, with real agents and Docker ([`whole_hire`]; root only).

mod whole_hire;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use warden_coordinator::matcher::{plan, Candidate, Gpu, Link, Order, Tier, Want};

/// A small deterministic generator (no dependency for a bench).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn nodes(n: usize) -> Vec<Candidate> {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let models = [
        ("NVIDIA H100 80GB HBM3", 80u64),
        ("NVIDIA A100-SXM4-40GB", 40),
        ("NVIDIA GeForce RTX 4090", 24),
        ("NVIDIA L40S", 48),
    ];
    let regions = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"];
    (0..n)
        .map(|i| {
            let (model, gb) = models[r.below(4) as usize];
            let count = 1 + r.below(8);
            let speed = [100.0, 300.0, 600.0, 1000.0, 10_000.0][r.below(5) as usize];
            let mut tags = BTreeSet::new();
            if r.below(3) == 0 {
                tags.insert("soc2".to_owned());
            }
            Candidate {
                node_id: format!("{i:032x}"),
                connected: r.below(20) != 0,
                healthy: r.below(50) != 0,
                gpus: (0..count)
                    .map(|g| Gpu {
                        uuid: format!("GPU-{i:08x}-{g}"),
                        model: model.to_owned(),
                        memory_bytes: gb << 30,
                        free: r.below(3) != 0,
                        verified: true,
                    })
                    .collect(),
                link: (r.below(10) != 0).then(|| Link {
                    down_mbps: speed,
                    up_mbps: speed,
                    rtt_ms: 1.0 + r.below(200) as f64,
                }),
                region: regions[r.below(5) as usize].to_owned(),
                tags,
            }
        })
        .collect()
}

fn order(gpus: u32, filtered: bool) -> Order {
    Order {
        want: Want::Gpus(gpus),
        gpu_model: filtered.then(|| "H100".to_owned()),
        min_gpu_memory_bytes: 0,
        min_tier: if filtered {
            Tier::Standard
        } else {
            Tier::Unmeasured
        },
        region: None,
        tags: if filtered {
            ["soc2".to_owned()].into()
        } else {
            BTreeSet::new()
        },
        exclude: BTreeSet::new(),
        seed: "bench".into(),
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("WARDEN_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000]);
    println!("matcher::plan, median of runs (each at least 1 s of runs or 5 runs)");
    for n in sizes {
        let candidates = nodes(n);
        for (gpus, filtered) in [(8, false), (64, false), (512, false), (64, true)] {
            let o = order(gpus, filtered);
            let mut times = Vec::new();
            let started = Instant::now();
            let mut members = 0;
            while times.len() < 5 || started.elapsed() < Duration::from_secs(1) {
                let t = Instant::now();
                let p = plan(&candidates, &o);
                times.push(t.elapsed());
                members = p.map(|p| p.members.len()).unwrap_or(0);
                if times.len() >= 200 {
                    break;
                }
            }
            times.sort();
            println!(
                "nodes {n:>7}  order {gpus:>4} GPUs{}  plan of {members:>3} nodes  median {:>9.3} ms  (runs {})",
                if filtered { " (H100, standard, soc2)" } else { "                       " },
                times[times.len() / 2].as_secs_f64() * 1000.0,
                times.len()
            );
        }
    }
    if std::env::var("WARDEN_BENCH_HIRES").as_deref() != Ok("0") {
        whole_hire::run();
    }
}
