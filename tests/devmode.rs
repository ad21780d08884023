//! The main job a newcomer runs: `warden agent --dev`.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn dev_mode_runs_both_halves_and_stops_cleanly_on_sigint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let gpus = tmp.path().join("gpus.json");
    write_fake_state(&gpus, &[fake_gpu(0)]);
    let lib = fake_nvml();
    let mut p = Proc::spawn_env(
        &[
            "agent",
            "--dev",
            "--state-dir",
            dir.to_str().unwrap(),
            "--nvml-lib",
            lib.to_str().unwrap(),
        ],
        tmp.path().join("dev.log"),
        &[("FAKE_NVML_STATE", &gpus)],
    );
    let sock = dir.join("agent/agent.sock");
    let s = wait_for(
        "agent connected and receipted",
        Duration::from_secs(30),
        || {
            let s = status(&sock)?;
            (s["coordinator"]["connected"] == true && s["last_receipt_seq"].as_u64()? >= 1)
                .then_some(s)
        },
    );
    assert!(s["coordinator"]["address"]
        .as_str()
        .unwrap()
        .starts_with("https://localhost:"));
    let out = std::process::Command::new(WARDEN)
        .args([
            "nodes",
            "--json",
            "--socket",
            dir.join("coordinator/admin.sock").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes[0]["node_id"], s["node_id"]);
    // --nvml-lib reached the agent: its one GPU is sampled and served on /metrics.
    let s = wait_for("a GPU sample", Duration::from_secs(30), || {
        status(&sock).filter(|s| s["gpus"].as_array().is_some_and(|g| g.len() == 1))
    });
    let metrics = http_get(s["metrics_address"].as_str().unwrap(), "/metrics");
    assert!(
        metrics.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"0\""),
        "{metrics}"
    );

    let _ = std::process::Command::new("kill")
        .args(["-INT", &p.pid().to_string()])
        .status();
    let start = std::time::Instant::now();
    let code = loop {
        if let Some(c) = p.child.try_wait().unwrap() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{}", p.log_text());
    let log = p.log_text();
    assert!(log.contains("spool flushed"), "{log}");
    assert!(!sock.exists(), "status socket left behind");
}
