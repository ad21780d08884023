//! Work challenge figures (docs/attestation.md#work-challenge). Run with
//! `cargo bench --bench workproof`; prints numbers, asserts nothing.
//!
//! 1. The CPU reference solver, one round, for a few small n (all threads).
//! 2. The coordinator's whole check of that answer (32 tiles).
//! 3. One opened tile's check at the n the sizing gives real GPUs (8 rows
//!    of A and 8 columns of B regenerated, 64 dot products, the Merkle
//!    path), and from it the check of a whole challenge for each model:
//!    rounds × spot tiles × that (the checker does nothing else of size).
//! 4. The coordinator's gate over a million GPUs (125,000 nodes of 8;
//!    `WARDEN_BENCH_GATE_NODES` for another count): what the issuer does
//!    with it every tick (feed the inventories, expire, pick what is due).

use std::time::Instant;

use warden_proto::{
    pb,
    workproof::{
        self,
        check::check_tile,
        matrix::{self, Side},
        merkle,
        sizing::{self, Policy},
        solve, Params, SIDE, TILE,
    },
};

fn secs<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64())
}

/// The correct tile `index` of round seed `s` (8 rows of A, 8 columns of B).
fn tile(s: &[u8; 32], n: u32, index: u64) -> pb::TileOpening {
    let (row0, col0) = solve::tile_origin(n, index);
    let mut a = vec![0i8; n as usize];
    let mut b = vec![0i8; n as usize];
    let mut bytes = Vec::with_capacity(TILE * 4);
    for r in 0..SIDE as u64 {
        matrix::line(s, Side::A, (row0 + r) as u32, &mut a);
        for c in 0..SIDE as u64 {
            matrix::line(s, Side::B, (col0 + c) as u32, &mut b);
            bytes.extend_from_slice(&matrix::dot(&a, &b).to_le_bytes());
        }
    }
    pb::TileOpening {
        index,
        tile: bytes,
        path: vec![],
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU reference solver and full check, 1 round, 32 spot tiles ({threads} threads):");
    for n in [256u32, 512, 1024] {
        let ch = pb::WorkChallenge {
            node_id: "bench".into(),
            challenge_id: "c".into(),
            seed: vec![1; 32],
            gpu_uuid: "GPU-b".into(),
            n,
            rounds: 1,
            spot_tiles: 32,
            deadline_unix_ms: i64::MAX,
            ..Default::default()
        };
        let p = Params::of(&ch).expect("valid");
        let (rounds, solve_s) =
            secs(|| workproof::solve(&[1; 32], "bench", &p, threads).expect("solves"));
        let answer = pb::WorkAnswer {
            node_id: "bench".into(),
            challenge_id: "c".into(),
            rounds,
            identity: Some(pb::GpuIdentity {
                uuid: "GPU-b".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (ok, check_s) = secs(|| workproof::check(&ch, &answer, 0));
        assert_eq!(ok, Ok(()));
        println!(
            "  n {n:>5}: solve {:>8.1} ms, check {:>6.2} ms, answer {} bytes",
            solve_s * 1e3,
            check_s * 1e3,
            prost::Message::encoded_len(&answer)
        );
    }

    println!("One opened tile's check at the sizes real GPUs get (median of 5):");
    let seed = [2u8; 32];
    let mut per_tile = Vec::new();
    for n in [4096u32, 16384, 65536, 110_464] {
        let index = (n as u64 / 16) * (n as u64 / SIDE as u64) + 3;
        let o = tile(&seed, n, index);
        let depth = merkle::depth(n as u64 * n as u64 / TILE as u64);
        let path = vec![[7u8; 32]; depth as usize];
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                secs(|| {
                    let _ = merkle::root_from_path(merkle::leaf(&o.tile), index, &path);
                    check_tile(n, 0, &seed, &o).expect("correct tile")
                })
                .1
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!("  n {n:>6}: {:>7.2} ms per tile", times[2] * 1e3);
        per_tile.push((n, times[2]));
    }
    // Check cost is linear in n (16 lines of n entries): scaled from the nearest n measured.
    let at = |n: u32| {
        let (m, t) = per_tile
            .iter()
            .min_by_key(|(m, _)| m.abs_diff(n))
            .copied()
            .expect("measured");
        t * n as f64 / m as f64
    };
    println!(
        "Whole challenge per model (default policy: fill 0.6, 30 s target, 32 tiles per round):"
    );
    for (name, mem) in [
        ("NVIDIA H200", 141u64 << 30),
        ("NVIDIA H100 80GB HBM3", 80 << 30),
        ("NVIDIA A100-SXM4-80GB", 80 << 30),
        ("NVIDIA A100-PCIE-40GB", 40 << 30),
        ("NVIDIA L40S", 48 << 30),
        ("NVIDIA GeForce RTX 4090", 24 << 30),
        ("Tesla T4", 16 << 30),
    ] {
        let plan = sizing::plan(mem, name, &Policy::default());
        let p = plan.params;
        let tiles = p.rounds as f64 * p.spot_tiles as f64;
        println!(
            "  {name:<24} n {:>6}, rounds {:>2}, expected {:>5.1} s, deadline {:>5.1} s, coordinator check ~{:>6.0} ms",
            p.n,
            p.rounds,
            plan.expected.as_secs_f64(),
            plan.deadline.as_secs_f64(),
            tiles * at(p.n) * 1e3
        );
    }

    gate_at_scale();
}

fn gate_at_scale() {
    use warden_coordinator::workgate::{Gate, Settings};
    // WARDEN_BENCH_GATE_NODES for another size.
    let nodes: usize = std::env::var("WARDEN_BENCH_GATE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(125_000);
    let per = 8usize;
    let inventories: Vec<(String, Vec<pb::GpuInfo>)> = (0..nodes)
        .map(|n| {
            let gpus = (0..per)
                .map(|i| pb::GpuInfo {
                    uuid: format!("GPU-{n:08x}-{i}"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                    serial: format!("{n}{i}"),
                    ..Default::default()
                })
                .collect();
            (format!("node-{n:08x}"), gpus)
        })
        .collect();
    let settings = Settings {
        interval: std::time::Duration::from_secs(3600),
        retry: std::time::Duration::from_secs(60),
        sizing: Policy::default(),
    };
    let mut gate = Gate::default();
    println!(
        "The gate over {} GPUs ({nodes} nodes of {per}), one issuer tick's work (median of 5):",
        nodes * per
    );
    let mut feed = Vec::new();
    let mut due = Vec::new();
    for _ in 0..5 {
        feed.push(
            secs(|| {
                for (node, gpus) in &inventories {
                    gate.inventory(node, gpus);
                }
            })
            .1,
        );
        let (d, t) = secs(|| {
            gate.expire(0, std::time::Duration::from_secs(5));
            gate.due(0, &settings, |_, _| true)
        });
        assert_eq!(d.len(), nodes, "one due per node");
        due.push(t);
    }
    feed.sort_by(f64::total_cmp);
    due.sort_by(f64::total_cmp);
    println!(
        "  feed every inventory {:>7.1} ms; expire and pick the due {:>7.1} ms",
        feed[2] * 1e3,
        due[2] * 1e3
    );
}
