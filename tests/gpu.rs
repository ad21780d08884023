//! GPUs through the real NVML FFI path against the fake library: inventory
//! with 0, 1 and 8 GPUs, sampling to the coordinator and /metrics, a GPU
//! turning lost, Xid errors, a missing library, doctor and the link probe.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::*;
use serde_json::Value;

fn inventory_json(lib: &Path, state: Option<&Path>, state_dir: &Path) -> Value {
    let mut cmd = Command::new(WARDEN);
    cmd.args([
        "inventory",
        "--json",
        "--nvml-lib",
        lib.to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
    ]);
    match state {
        Some(s) => cmd.env("FAKE_NVML_STATE", s),
        None => cmd.env_remove("FAKE_NVML_STATE"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn inventory_lists_zero_one_and_eight_gpus() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("gpus.json");
    let lib = fake_nvml();
    for n in [0usize, 1, 8] {
        let devices: Vec<_> = (0..n).map(fake_gpu).collect();
        write_fake_state(&state, &devices);
        let inv = inventory_json(&lib, Some(&state), tmp.path());
        assert_eq!(inv["nvml_status"], "ok", "{inv}");
        assert_eq!(inv["driver_version"], "550.54.15");
        assert_eq!(inv["cuda_version"], 12040);
        let gpus = inv["gpus"].as_array().unwrap();
        assert_eq!(gpus.len(), n, "{inv}");
        assert_eq!(inv["gpu_count"], n);
        for (i, g) in gpus.iter().enumerate() {
            assert_eq!(g["index"], i);
            assert_eq!(g["uuid"], fake_gpu(i)["uuid"]);
            assert_eq!(g["name"], "NVIDIA H100 80GB HBM3");
            assert_eq!(g["pci_bus_id"], fake_gpu(i)["pci_bus_id"]);
            assert_eq!(g["memory_total_bytes"], 81559u64 << 20);
        }
        // The host part is there whatever the GPUs.
        assert!(inv["cpu_cores"].as_u64().unwrap() >= 1);
        assert!(inv["memory_bytes"].as_u64().unwrap() > 0);
        assert!(inv["disk_free_bytes"].as_u64().unwrap() > 0);
        assert!(!inv["hostname"].as_str().unwrap().is_empty());
        assert!(!inv["docker"].as_str().unwrap().is_empty());
    }
}

#[test]
fn a_missing_nvml_library_means_a_cpu_only_node() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no/libnvidia-ml.so.1");
    let inv = inventory_json(&missing, None, tmp.path());
    assert!(
        inv["nvml_status"]
            .as_str()
            .unwrap()
            .contains("no/libnvidia-ml.so.1"),
        "{inv}"
    );
    assert!(inv["gpus"].as_array().is_none_or(|g| g.is_empty()));
    // The library is there but the driver is not (no state file): also CPU-only.
    let inv = inventory_json(&fake_nvml(), None, tmp.path());
    assert!(
        inv["nvml_status"]
            .as_str()
            .unwrap()
            .contains("driver is not loaded"),
        "{inv}"
    );

    // The agent runs, says so once, and its records still flow.
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &format!(
            "{}\n[gpu]\nnvml_library = \"{}\"\nsample_interval = \"100ms\"\n",
            fast_agent_toml(&coord.link_toml(), "100ms", 5),
            missing.display()
        ),
    );
    wait_for("records stored", Duration::from_secs(30), || {
        (record_stats(&coord.db()).0 >= 5).then_some(())
    });
    let s = agent.status().unwrap();
    assert!(
        s["nvml"].as_str().unwrap().contains("could not be loaded"),
        "{s}"
    );
    assert_eq!(s["gpus"].as_array().unwrap().len(), 0);
    let log = agent.proc.log_text();
    assert_eq!(log.matches("CPU-only").count(), 1, "{log}");
    let n = &nodes_json(&coord)[0];
    assert!(n["inventory"]["nvml_status"]
        .as_str()
        .unwrap()
        .contains("could not be loaded"));
}

fn gpu_agent_toml(coord: &Coordinator, lib: &Path, probe: bool) -> String {
    format!(
        "{}\n[gpu]\nnvml_library = \"{}\"\nsample_interval = \"100ms\"\ninventory_interval = \"200ms\"\n{}",
        fast_agent_toml(&coord.link_toml(), "1h", 0),
        lib.display(),
        if probe {
            "[probe]\ninterval = \"1h\"\nduration = \"300ms\"\npings = 3\n"
        } else {
            ""
        }
    )
}

/// The latest GPU state the coordinator stored for the one node.
fn coordinator_gpus(coord: &Coordinator) -> Vec<Value> {
    nodes_json(coord)
        .get(0)
        .and_then(|n| n["gpus"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn eight_gpus_are_sampled_to_the_coordinator_and_scraped() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("gpus.json");
    let mut devices: Vec<_> = (0..8).map(fake_gpu).collect();
    write_fake_state(&state, &devices);
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let agent = Agent::start_env(
        &tmp.path().join("agent"),
        &gpu_agent_toml(&coord, &fake_nvml(), true),
        &[("FAKE_NVML_STATE", &state)],
    );

    // Every GPU's readings reach the coordinator.
    let gpus = wait_for("8 GPUs at the coordinator", Duration::from_secs(30), || {
        let g = coordinator_gpus(&coord);
        (g.len() == 8).then_some(g)
    });
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g["uuid"], fake_gpu(i)["uuid"]);
        assert_eq!(g["utilization_gpu"], 10 + i);
        assert_eq!(g["memory_used_bytes"], (1024 * i as u64) << 20);
        assert_eq!(g["power_mw"], 70000 + 1000 * i);
        assert_eq!(g["sm_clock_mhz"], 1980);
        assert_eq!(g["lost"], false);
    }
    assert_eq!(gpus[0]["processes"][0]["pid"], FAKE_PID);
    assert_eq!(gpus[0]["processes"][0]["used_memory_bytes"], 512u64 << 20);

    // The state file is read live: a change shows up without a restart.
    devices[2]["utilization_gpu"] = 77.into();
    write_fake_state(&state, &devices);
    wait_for("GPU 2 at 77%", Duration::from_secs(30), || {
        (coordinator_gpus(&coord)[2]["utilization_gpu"] == 77).then_some(())
    });

    // An Xid error raised through the event API is recorded and logged.
    devices[5]["xid_errors"] = serde_json::json!([79]);
    write_fake_state(&state, &devices);
    wait_for("the Xid event stored", Duration::from_secs(30), || {
        stored_records(&coord.db())
            .iter()
            .find_map(|r| match &r.body {
                Some(warden_proto::pb::record::Body::Telemetry(t)) => t
                    .gpu_events
                    .iter()
                    .find(|e| e.kind == "xid" && e.detail == "Xid 79" && e.index == 5)
                    .map(|_| ()),
                _ => None,
            })
    });
    assert!(agent.proc.log_text().contains("Xid 79"));

    // /metrics: DCGM names per GPU, agent health, the link probe.
    let s = wait_for("link probe", Duration::from_secs(30), || {
        agent.status().filter(|s| !s["link"].is_null())
    });
    let link = &s["link"];
    assert_eq!(link["error"], "", "{link}");
    assert!(link["download_mbps"].as_f64().unwrap() > 0.0, "{link}");
    assert!(link["upload_mbps"].as_f64().unwrap() > 0.0, "{link}");
    assert!(link["rtt_ms"].as_f64().unwrap() > 0.0, "{link}");
    let addr = s["metrics_address"].as_str().unwrap().to_owned();
    let text = http_get(&addr, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    // Header names are case-insensitive (hyper writes them in lower case).
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    let util: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{"))
        .collect();
    assert_eq!(util.len(), 8, "{text}");
    let uuid2 = fake_gpu(2)["uuid"].as_str().unwrap().to_owned();
    assert!(
        util.iter().any(|l| l.contains("gpu=\"2\"")
            && l.contains(&format!("UUID=\"{uuid2}\""))
            && l.ends_with(" 77")),
        "{util:?}"
    );
    assert!(text.contains("DCGM_FI_DEV_FB_USED{gpu=\"1\""));
    assert!(text
        .lines()
        .any(|l| l.starts_with("warden_gpu_processes{gpu=\"0\"")
            && l.contains("kind=\"compute\"")
            && l.ends_with(" 1")));
    assert!(
        text.contains("\nwarden_coordinator_connected 1\n"),
        "{text}"
    );
    assert!(text.contains("\nwarden_gpus 8\n"));
    assert!(text.contains("\nwarden_nvml_loaded 1\n"));
    assert!(text.contains("\nwarden_spool_pending_records "));
    let sent: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("warden_records_sent_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent > 0.0);
    assert!(text.contains("\nwarden_link_rtt_ms "));
    assert!(http_get(&addr, "/nothing").starts_with("HTTP/1.1 404"));
    // The coordinator keeps the node's last link probe too.
    assert!(
        nodes_json(&coord)[0]["link"]["download_mbps"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn a_gpu_turning_lost_is_an_event_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("gpus.json");
    let mut devices: Vec<_> = (0..2).map(fake_gpu).collect();
    write_fake_state(&state, &devices);
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let agent = Agent::start_env(
        &tmp.path().join("agent"),
        &gpu_agent_toml(&coord, &fake_nvml(), false),
        &[("FAKE_NVML_STATE", &state)],
    );
    wait_for("2 GPUs at the coordinator", Duration::from_secs(30), || {
        (coordinator_gpus(&coord).len() == 2).then_some(())
    });

    devices[1]["lost"] = true.into();
    write_fake_state(&state, &devices);
    let g = wait_for(
        "GPU 1 lost at the coordinator",
        Duration::from_secs(30),
        || {
            let g = coordinator_gpus(&coord);
            (g.len() == 2 && g[1]["lost"] == true).then_some(g)
        },
    );
    assert!(
        g[1]["error"].as_str().unwrap().contains("GPU is lost"),
        "{g:?}"
    );
    assert_eq!(g[0]["lost"], false, "the other GPU keeps reporting");
    let kinds = |records: &[warden_proto::pb::Record]| -> Vec<String> {
        records
            .iter()
            .filter_map(|r| match &r.body {
                Some(warden_proto::pb::record::Body::Telemetry(t)) => Some(t.gpu_events.clone()),
                _ => None,
            })
            .flatten()
            .filter(|e| e.index == 1)
            .map(|e| e.kind)
            .collect()
    };
    wait_for("a lost event", Duration::from_secs(30), || {
        kinds(&stored_records(&coord.db()))
            .contains(&"lost".to_owned())
            .then_some(())
    });
    // The sampler publishes locally after the record is spooled, so the
    // coordinator may have it first: wait for the status to catch up.
    let s = wait_for("GPU 1 lost in the status", Duration::from_secs(30), || {
        agent.status().filter(|s| s["gpus"][1]["lost"] == true)
    });
    let text = http_get(s["metrics_address"].as_str().unwrap(), "/metrics");
    assert!(
        text.lines()
            .any(|l| l.starts_with("warden_gpu_lost{gpu=\"1\"") && l.ends_with(" 1")),
        "{text}"
    );
    assert!(
        !text.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"1\""),
        "a lost GPU has no readings"
    );

    devices[1]["lost"] = false.into();
    write_fake_state(&state, &devices);
    wait_for("GPU 1 back", Duration::from_secs(30), || {
        (coordinator_gpus(&coord)[1]["lost"] == false).then_some(())
    });
    wait_for("a recovered event", Duration::from_secs(30), || {
        (kinds(&stored_records(&coord.db())) == ["lost", "recovered"]).then_some(())
    });
    let log = agent.proc.log_text();
    assert_eq!(log.matches("GPU health changed").count(), 1, "{log}");
    assert!(log.contains("GPU answers again"));
}

#[test]
fn an_inventory_change_is_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("gpus.json");
    write_fake_state(&state, &[fake_gpu(0)]);
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let _agent = Agent::start_env(
        &tmp.path().join("agent"),
        &gpu_agent_toml(&coord, &fake_nvml(), false),
        &[("FAKE_NVML_STATE", &state)],
    );
    let inv_gpus = || {
        nodes_json(&coord)
            .get(0)
            .and_then(|n| n["inventory"]["gpus"].as_array().map(|g| g.len()))
    };
    wait_for("the inventory at Register", Duration::from_secs(30), || {
        (inv_gpus()? == 1).then_some(())
    });
    write_fake_state(&state, &[fake_gpu(0), fake_gpu(1)]);
    wait_for("the new inventory", Duration::from_secs(30), || {
        (inv_gpus()? == 2).then_some(())
    });
    let sent = stored_records(&coord.db())
        .into_iter()
        .filter(|r| matches!(r.body, Some(warden_proto::pb::record::Body::Inventory(_))))
        .count();
    assert_eq!(sent, 1, "one Inventory record for one change");
}

fn free_disk_gb(path: &Path) -> f64 {
    warden_agent::host::inventory::free_bytes(path).unwrap() as f64 / 1e9
}

#[test]
fn doctor_holds_this_machine_to_the_minimums() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(WARDEN)
        .args([
            "doctor",
            "--json",
            "--state-dir",
            tmp.path().to_str().unwrap(),
        ])
        .env_remove("FAKE_NVML_STATE")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
            .clone()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let disk = check("disk");
    // This machine (and CI's) has far less than 500 GB free: the check must say so.
    if free_disk_gb(tmp.path()) < 500.0 {
        assert_eq!(disk["verdict"], "fail", "{disk}");
        assert!(!out.status.success());
        assert!(report["failed"]
            .as_array()
            .unwrap()
            .contains(&"disk".into()));
        assert!(stderr.contains("disk"), "{stderr}");
        assert!(disk["fix"].as_str().unwrap().contains("state_dir"));
    } else {
        assert_eq!(disk["verdict"], "pass", "{disk}");
    }
    assert!(disk["value"].as_str().unwrap().contains("GB free"));
    assert_eq!(disk["threshold"], ">= 500 GB");
    // No coordinator configured: the link is not measured, and says why.
    assert_eq!(check("download")["verdict"], "skip");
    // No NVIDIA driver here.
    assert_eq!(check("nvml")["verdict"], "fail");
    assert_eq!(report["ok"], false);
    for name in ["memory", "upload", "rtt", "docker", "tun", "clock"] {
        check(name);
    }
    // This kernel has fanotify permission events, and the doctor runs as
    // root; whether it delivers them for character devices (GPU nodes) is
    // the kernel's to say: 6.18 does not, and then the row warns, naming it.
    let guard = check("guard");
    assert!(
        guard["verdict"] == "pass"
            || (guard["verdict"] == "warn"
                && guard["value"]
                    .as_str()
                    .is_some_and(|v| v.contains("a character device"))),
        "{report:#}"
    );
    assert_eq!(
        check("key")["verdict"],
        "pass",
        "no key yet is fine: it is made 0600"
    );

    // A key file others can read fails the key check, naming the file.
    let key = tmp.path().join("node.key");
    std::fs::write(&key, [0u8; 85]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(WARDEN)
        .args([
            "doctor",
            "--json",
            "--state-dir",
            tmp.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key_check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "key")
        .unwrap()
        .clone();
    assert_eq!(key_check["verdict"], "fail", "{key_check}");
    assert!(
        key_check["value"].as_str().unwrap().contains("node.key"),
        "{key_check}"
    );
    std::fs::remove_file(&key).unwrap();

    // The human form names the failures too, with a fix under each.
    let out = Command::new(WARDEN)
        .args(["doctor", "--state-dir", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nvml      FAIL"), "{text}");
    assert!(text.contains("fix: install the NVIDIA driver"));
}

#[test]
fn doctor_measures_the_link_and_reads_thresholds_from_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let state = tmp.path().join("gpus.json");
    write_fake_state(&state, &[fake_gpu(0)]);
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n{}\n[gpu]\nnvml_library = \"{}\"\n[probe]\nduration = \"300ms\"\npings = 3\n\
             [doctor]\nmin_disk_free_gb = 0.5\nmin_download_mbps = 1\nmin_upload_mbps = 1\nmax_rtt_ms = 1000\n",
            tmp.path().join("agent").display(),
            coord.link_toml(),
            fake_nvml().display()
        ),
    )
    .unwrap();
    let out = Command::new(WARDEN)
        .args(["doctor", "--json", "--config", cfg.to_str().unwrap()])
        .env("FAKE_NVML_STATE", &state)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&str> = report["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for name in [
        "disk", "download", "upload", "rtt", "nvml", "clock", "key", "memory",
    ] {
        assert!(!failed.contains(&name), "{name} failed: {report:#}");
    }
    let check = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(check("download")["verdict"], "pass");
    assert!(check("download")["value"]
        .as_str()
        .unwrap()
        .ends_with("Mbit/s"));
    assert_eq!(check("rtt")["threshold"], "< 1000 ms");
    assert!(check("nvml")["value"]
        .as_str()
        .unwrap()
        .starts_with("1 GPU(s), driver 550.54.15"));
    assert!(check("clock")["value"]
        .as_str()
        .unwrap()
        .contains("from the coordinator"));
}
