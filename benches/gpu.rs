//! GPU sampling figures, through the real NVML FFI path against the fake
//! library with 8 GPUs. Run with `cargo bench --bench gpu`; prints numbers,
//! asserts nothing.
//!
//! 1. The cost of one sampling cycle (every reading of all 8 GPUs), in-process.
//! 2. CPU and RSS of an agent process sampling 8 GPUs every second, connected
//!    to a coordinator, over `WARDEN_BENCH_IDLE_SECS` (30). Targets: < 0.5 %
//!    of one core, < 30 MiB.

mod common;

use std::time::{Duration, Instant};

use warden_agent::host::gpu::{nvml::NvmlSource, GpuSource};

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("gpus.json");
    common::write_gpu_state(&state, 8);
    let lib = common::fake_nvml();

    // 1. One cycle, in-process.
    std::env::set_var("FAKE_NVML_STATE", &state);
    let src = NvmlSource::load(Some(&lib)).unwrap();
    assert_eq!(src.sample().len(), 8);
    let n = 5000;
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let s = src.sample();
            let us = t.elapsed().as_secs_f64() * 1e6;
            assert!(s.iter().all(|g| g.error.is_empty()));
            us
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / n as f64;
    println!(
        "gpu/sample_cycle gpus=8 n={n}: mean {mean:.1} µs, p50 {:.1} µs, p99 {:.1} µs",
        times[n / 2],
        times[n * 99 / 100]
    );

    // 2. The agent process, sampling every second.
    let (_coord, link) = common::coordinator(&tmp.path().join("coord"));
    let config = format!(
        "{link}\n[gpu]\nnvml_library = \"{}\"\nsample_interval = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        lib.display()
    );
    let secs = common::steady_secs();
    let s = common::measure_agent(
        tmp.path(),
        &config,
        &[("FAKE_NVML_STATE", state.clone())],
        Duration::from_secs(8),
        secs,
    );
    println!(
        "agent/gpu_sampling gpus=8 interval=1s over {:.0}s: cpu {:.3}% of one core, rss {:.1} MiB (max {:.1} MiB)",
        s.secs, s.cpu, s.rss_mib, s.max_rss_mib
    );
}
