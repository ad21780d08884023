//! What the benches share: starting real `warden` processes and reading a
//! process's CPU time and memory from procfs.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

/// (utime + stime) in clock ticks, and VmRSS in KiB, of a process.
pub fn proc_figures(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// A child killed on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a dev coordinator in `dir`; returns it and the agents' `[coordinator]` TOML.
pub fn coordinator(dir: &Path) -> (Killed, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(WARDEN)
        .args(["coordinator", "--dev", "--state-dir", dir.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let link = dir.join("agent-link.toml");
    let t0 = Instant::now();
    while !link.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "coordinator did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Killed(child), std::fs::read_to_string(&link).unwrap())
}

/// Steady-state figures of one agent process.
pub struct Steady {
    pub secs: f64,
    /// Percent of one core.
    pub cpu: f64,
    pub rss_mib: f64,
    pub max_rss_mib: f64,
}

/// Starts an agent with `config` (TOML after state_dir) in `dir/agent`.
pub fn spawn_agent(dir: &Path, config: &str, env: &[(&str, PathBuf)]) -> Killed {
    let adir = dir.join("agent");
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = \"{}\"\n{config}", adir.display()),
    )
    .unwrap();
    Killed(
        Command::new(WARDEN)
            .args(["agent", "--config", cfg.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Runs an agent with `config` (TOML after state_dir) and `env`, lets
/// start-up (and its link probe) settle for `settle`, then measures it for `secs`.
pub fn measure_agent(
    dir: &Path,
    config: &str,
    env: &[(&str, PathBuf)],
    settle: Duration,
    secs: u64,
) -> Steady {
    let adir = dir.join("agent");
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = \"{}\"\n{config}", adir.display()),
    )
    .unwrap();
    let agent = Killed(
        Command::new(WARDEN)
            .args(["agent", "--config", cfg.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    std::thread::sleep(settle);
    let (t_start, _) = proc_figures(pid);
    let start = Instant::now();
    let mut max_rss = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        max_rss = max_rss.max(proc_figures(pid).1);
    }
    let (t_end, rss) = proc_figures(pid);
    let elapsed = start.elapsed().as_secs_f64();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    Steady {
        secs: elapsed,
        cpu: (t_end - t_start) as f64 / ticks_per_s / elapsed * 100.0,
        rss_mib: rss as f64 / 1024.0,
        max_rss_mib: max_rss as f64 / 1024.0,
    }
}

/// Seconds from `WARDEN_BENCH_IDLE_SECS`, 30 by default.
pub fn steady_secs() -> u64 {
    std::env::var("WARDEN_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

/// Raises this process's open-file limit to its hard limit: every
/// simulated agent or held connection needs a descriptor.
pub fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A `warden coordinator --dev` process on a free loopback port with
/// `config` as its file: (process, port, its CA file), once it is up.
pub fn dev_coordinator(dir: &Path, config: &str) -> (Killed, u16, PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    dev_coordinator_on(dir, config, port)
}

/// As `dev_coordinator`, on `port` (a restart where its agents look for it).
pub fn dev_coordinator_on(dir: &Path, config: &str, port: u16) -> (Killed, u16, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let _ = std::fs::remove_file(dir.join("agent-link.toml"));
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new(WARDEN)
        .args(["coordinator", "--dev", "--config", cfg.to_str().unwrap()])
        .args(["--state-dir", dir.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !dir.join("agent-link.toml").exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no coordinator");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Killed(child), port, dir.join("tls/ca.pem"))
}

/// The fake library next to the warden binary, built if this run has not.
pub fn fake_nvml() -> PathBuf {
    let lib = Path::new(WARDEN).parent().unwrap().join("libfake_nvml.so");
    if !lib.exists() {
        let release = WARDEN.contains("/release/");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "fake-nvml"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success() && lib.exists(),
            "cannot build {}",
            lib.display()
        );
    }
    lib
}

/// A fake NVML state with `gpus` busy H100s, each listing one process
/// that does not exist.
pub fn write_gpu_state(path: &Path, gpus: usize) {
    let devices: Vec<_> = (0..gpus)
        .map(|i| {
            serde_json::json!({
                "uuid": format!("GPU-{i:08x}-0000-4000-8000-000000000000"),
                "name": "NVIDIA H100 80GB HBM3",
                "pci_bus_id": format!("00000000:{:02X}:00.0", i + 1),
                "memory_total_mib": 81559, "memory_used_mib": 40000,
                "utilization_gpu": 97, "utilization_memory": 60,
                "power_mw": 650000, "temperature_c": 71, "sm_clock_mhz": 1980,
                "processes": [{"pid": 99_999_000 + i, "used_memory_mib": 40000}],
            })
        })
        .collect();
    let state = serde_json::json!({"driver_version": "550.54.15", "cuda_version": 12040, "devices": devices});
    std::fs::write(path, serde_json::to_vec(&state).unwrap()).unwrap();
}

/// `n` idle `sleep` processes, killed on drop: a host with many processes.
pub fn idle_processes(n: usize) -> Vec<Killed> {
    (0..n)
        .map(|_| {
            Killed(
                Command::new("sleep")
                    .arg("3600")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect()
}

/// How many processes `/proc` lists.
pub fn process_count() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
        })
        .count()
}

/// `warden lease --socket SOCKET ARGS…`, which must succeed: how long it
/// took and what it printed.
pub fn warden_lease(socket: &Path, args: &[&str]) -> (Duration, String) {
    let t = Instant::now();
    let out = Command::new(WARDEN)
        .arg("lease")
        .args(["--socket", socket.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (took, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The node id of the agent answering on `status`, once it is connected to
/// its coordinator and reports at least `gpus` GPUs.
pub fn connected_node_id(status: &Path, gpus: usize) -> String {
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agent never connected"
        );
        let out = Command::new(WARDEN)
            .args(["status", "--json", "--socket", status.to_str().unwrap()])
            .output()
            .unwrap();
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if s["coordinator"]["connected"] == true && s["gpus"].as_array().map_or(0, Vec::len) >= gpus
        {
            return s["node_id"].as_str().unwrap().to_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
