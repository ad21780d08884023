//! Enforcement figures among ~1,100 processes: 1,000 idle `sleep`s started
//! here, plus the host's. Run with `cargo bench --bench enforce`; prints
//! numbers, asserts nothing about them.
//!
//! 1. The duration of one `procs::scan` of `/proc`.
//! 2. Detection to SIGKILL sent: a host process that ignores SIGTERM opens a
//!    stand-in device node (a temp file `nvidia0`, GPU minor 0, leased); a
//!    loop like the agent's (scan, decide, `kill_process`; 100 ms between
//!    scans) ends it. Measured from the start of the scan that first sees
//!    it to the SIGKILL being sent, with grace 2 s (target p99 < grace +
//!    500 ms) and grace 0 (target p99 < 500 ms). `WARDEN_BENCH_TRIALS`
//!    (100) trials each, one at a time. The times are `KillOutcome`'s wall
//!    clock in whole ms, so each figure is good to ±1 ms.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::Killed;
use warden_agent::{
    now_ms,
    timelock::{
        enforce::{self, exec, LeaseView, Policy, Seen, Verdict},
        procs,
    },
};

const GPU: &str = "GPU-00000000-0000-4000-8000-000000000000";

fn trials() -> usize {
    std::env::var("WARDEN_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn pct(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>, unit: &str) -> String {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    format!(
        "mean {mean:.1} {unit}, p50 {:.1} {unit}, p99 {:.1} {unit}, max {:.1} {unit}",
        pct(&v, 50),
        pct(&v, 99),
        v[v.len() - 1]
    )
}

/// One trial: start a stubborn holder, find it, kill it; the ms from the
/// start of the finding scan to SIGKILL sent.
async fn trial(dev: &Path, patterns: &[String], grace: Duration) -> f64 {
    let script = format!(
        "trap '' TERM; exec 3<'{}'; while :; do sleep 0.05 3<&-; done",
        dev.display()
    );
    let mut holder = Killed(
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = holder.0.id();
    let leases = [LeaseView {
        lease_id: "bench".to_owned(),
        gpus: vec![GPU.to_owned()],
        containers: vec![],
    }];
    let policy = Policy::new(std::process::id());
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < Duration::from_secs(10), "holder never seen");
        let scan_at_ms = now_ms();
        let seen = Seen::resolve(procs::scan(Path::new("/proc"), patterns).holders, |minor| {
            (minor == 0).then(|| GPU.to_owned())
        });
        let decisions = enforce::decide(&seen, &leases, false, &policy);
        if let Some(d) = decisions
            .iter()
            .find(|d| d.pid == pid && d.verdict == Verdict::KillProcess)
        {
            let out = exec::kill_process(d.pid, d.start_time, grace).await;
            assert_eq!(out.outcome, exec::KillResult::Killed, "{out:?}");
            let _ = holder.0.wait();
            return (out.sigkill_at_ms.unwrap() - scan_at_ms) as f64;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("nvidia0");
    std::fs::write(&dev, "").unwrap();
    let patterns = vec![format!("{}/nvidia*", tmp.path().display())];

    let t = Instant::now();
    let idle = common::idle_processes(1000);
    let procs_now = common::process_count();
    println!(
        "enforce/setup: {} idle processes started in {:.1} s; {procs_now} processes in /proc",
        idle.len(),
        t.elapsed().as_secs_f64()
    );

    // 1. One scan.
    let n = 200;
    let scans: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let found = procs::scan(Path::new("/proc"), &patterns).holders;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert!(found.is_empty());
            ms
        })
        .collect();
    println!(
        "enforce/scan procs={procs_now} n={n}: {}",
        summary(scans, "ms")
    );

    // 2. Detection to SIGKILL.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let trials = trials();
    for grace in [Duration::ZERO, Duration::from_secs(2)] {
        let t = Instant::now();
        let lat: Vec<f64> = (0..trials)
            .map(|_| rt.block_on(trial(&dev, &patterns, grace)))
            .collect();
        println!(
            "enforce/detect_to_sigkill grace={}ms n={trials}: {} ({:.0} s)",
            grace.as_millis(),
            summary(lat, "ms"),
            t.elapsed().as_secs_f64()
        );
    }
    drop(idle);
}
