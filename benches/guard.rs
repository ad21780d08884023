//! What a lease costs the host, with and without the open guard. Run with
//! `cargo bench --bench guard`; prints numbers, asserts nothing.
//!
//! 1. The agent's CPU during a lease among ~1,100 processes (1,000 idle
//!    `sleep`s started here, plus the host's): a real agent with 8 fake GPUs
//!    (stand-in device nodes in a temp dir, every GPU leased), sampling every
//!    second with the default settings, measured over
//!    `WARDEN_BENCH_IDLE_SECS` (30) once the lease runs — first with
//!    `timelock.prevent = false` (a full /proc scan every cycle), then with
//!    the guard (a full scan every `timelock.safety_scan`, 30 s).
//! 2. What a guarded open costs the opener: `open(2)` + `close` of a
//!    stand-in node from an allowed process (the agent's own pid), marked
//!    and not, in-process; `WARDEN_BENCH_OPENS` (20,000) each.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use warden_agent::timelock::{
    enforce::Policy,
    guard::{self, fanotify::Guard},
};

/// The agent's CPU (% of one core) over `secs` of a lease of all its GPUs.
fn lease_cpu(
    tmp: &Path,
    link: &str,
    socket: &Path,
    dev: &Path,
    state: &Path,
    prevent: bool,
) -> f64 {
    let dir = tmp.join(format!("agent-prevent-{prevent}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "{link}\n[gpu]\nnvml_library = \"{}\"\n[probe]\ninterval = \"0s\"\n\
         [timelock]\nprevent = {prevent}\ndevice_patterns = [\"{}/nvidia*\"]\n",
        common::fake_nvml().display(),
        dev.display()
    );
    let agent = common::spawn_agent(&dir, &config, &[("FAKE_NVML_STATE", state.to_owned())]);
    let node = common::connected_node_id(&dir.join("agent/agent.sock"), 8);
    let lease = common::warden_lease(socket, &["start", &node, "--gpus", "all"]).1;
    // The lease's first cycles (and its first full scan) are not the steady state.
    std::thread::sleep(Duration::from_secs(5));
    let pid = agent.0.id();
    let (t0, _) = common::proc_figures(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(common::steady_secs()));
    let (t1, _) = common::proc_figures(pid);
    let cpu = (t1 - t0) as f64 / 100.0 / start.elapsed().as_secs_f64() * 100.0;
    common::warden_lease(socket, &["end", &lease]);
    drop(agent);
    cpu
}

fn opens(path: &Path, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            drop(std::fs::File::open(path).unwrap());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    format!(
        "mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs",
        v.iter().sum::<f64>() / n as f64,
        v[n / 2],
        v[n * 99 / 100]
    )
}

fn main() {
    common::raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    for i in 0..8 {
        std::fs::write(dev.join(format!("nvidia{i}")), b"").unwrap();
    }
    std::fs::write(dev.join("nvidiactl"), b"").unwrap();
    let state = tmp.path().join("gpus.json");
    common::write_gpu_state(&state, 8);

    // 2. A guarded open, in-process (before the 1,000 processes: it does not need them).
    let n: usize = std::env::var("WARDEN_BENCH_OPENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let node = dev.join("nvidia0");
    let plain = opens(&node, n);
    let mut g = Guard::start(PathBuf::from("/proc")).expect("fanotify permission events");
    let gpu = "GPU-00000000-0000-4000-8000-000000000000".to_owned();
    let targets = guard::targets(
        &[format!("{}/nvidia*", dev.display())],
        &[(gpu.clone(), 0)],
        false,
    );
    g.apply(&targets, Vec::new(), false, Policy::new(std::process::id()));
    let guarded = opens(&node, n);
    drop(g);
    println!("guard/open unguarded n={n}: {}", summary(plain));
    println!("guard/open guarded_allowed n={n}: {}", summary(guarded));

    // 1. The agent during a lease among 1,000 more processes.
    let t = Instant::now();
    let idle = common::idle_processes(1000);
    let procs = common::process_count();
    println!(
        "guard/setup: {} idle processes in {:.1} s; {procs} processes in /proc",
        idle.len(),
        t.elapsed().as_secs_f64()
    );
    let (_coord, link) = common::coordinator(&tmp.path().join("coord"));
    let socket = tmp.path().join("coord/admin.sock");
    let secs = common::steady_secs();
    for prevent in [false, true] {
        let cpu = lease_cpu(tmp.path(), &link, &socket, &dev, &state, prevent);
        println!(
            "guard/agent_cpu_during_lease prevent={prevent} gpus=8 procs={procs} sample=1s over {secs}s: {cpu:.2}% of one core"
        );
    }
    drop(idle);
}
