//! The work challenge end to end (docs/attestation.md#work-challenge): a
//! real coordinator issues it, a real agent runs the CPU reference solver
//! (`warden challenge solve`) in a container built from this build's
//! binary on Docker, the coordinator checks the answer, and only then is
//! the node's GPU offered to a hire; a changed serial on the fake NVML
//! takes it out until it passes again.

mod common;

use std::time::Duration;

use common::{image::Remove, *};

/// Small challenges: what a test can wait for (`retry` follows).
fn work(retry: &str) -> String {
    format!("[work_challenge]\nenabled = true\nmax_n = 128\ntarget = \"0s\"\nallowance = \"60s\"\nspot_tiles = 8\nretry = \"{retry}\"\n\n[clusters]\nmin_duration = \"1s\"\n")
}

fn gpu(serial: &str) -> serde_json::Value {
    let mut g = fake_gpu(0);
    g["uuid"] = format!("GPU-{:08x}-0000-4000-8000-00000000beef", std::process::id()).into();
    g["processes"] = serde_json::json!([]);
    g["serial"] = serial.into();
    g["cc_report_hex"] = "c0ffee".into();
    g
}

/// A dry-run hire of one GPU: Ok(plan) or Err(why not).
fn hire(coord: &Coordinator) -> Result<serde_json::Value, String> {
    let out = coord.cli(
        "cluster",
        &["hire", "w1", "--gpus", "1", "--dry-run", "--json"],
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn log_count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

#[test]
fn a_gpu_is_offered_once_its_challenge_passes_in_a_container_and_again_after_its_serial_changes() {
    let tag = format!("warden-test/solver:{}", std::process::id());
    let _image = Remove::image(&tag);
    image::solver_image(&tag, WARDEN);
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let state = tmp.join("gpus.json");
    write_fake_state(&state, &[gpu("1320000000001")]);
    let coord = Coordinator::start_with(&tmp.join("coord"), free_port(), &work("2s"));
    let agent = Agent::start_env(
        &tmp.join("agent"),
        &format!(
            "{}\n[gpu]\nnvml_library = \"{}\"\ninventory_interval = \"500ms\"\n\n[work_challenge]\nimage = \"{tag}\"\n",
            fast_agent_toml(&coord.link_toml(), "1h", 0),
            fake_nvml().display(),
        ),
        &[("FAKE_NVML_STATE", state.as_path())],
    );
    let node = wait_for("agent connected", Duration::from_secs(30), || {
        agent
            .status()
            .filter(|s| s["coordinator"]["connected"] == true)
            .map(|s| s["node_id"].as_str().unwrap().to_owned())
    });

    // Offered only once the challenge passed.
    let passed = wait_for(
        "the work challenge to pass",
        Duration::from_secs(120),
        || {
            let log = coord.proc.log_text();
            (log_count(&log, "work challenge passed") >= 1).then_some(log)
        },
    );
    assert!(passed.contains(&node), "{passed}");
    assert!(passed.contains("cc=ok"), "the CC report was read: {passed}");
    let plan = wait_for("a plan", Duration::from_secs(10), || hire(&coord).ok());
    assert_eq!(
        plan["plan"]["members"][0]["node_id"],
        node.as_str(),
        "{plan:#}"
    );
    let nodes = nodes_json(&coord);
    let standing = &nodes[0]["work"][0];
    assert_eq!(standing["state"], "passed", "{nodes:#}");
    assert_eq!(standing["offered"], true);
    assert_eq!(standing["cc_status"], "ok");

    // The board's serial changes: out of matching until it passes again.
    write_fake_state(&state, &[gpu("9999999999999")]);
    let why = wait_for("the GPU out of matching", Duration::from_secs(30), || {
        hire(&coord).err()
    });
    assert!(why.contains("passed its work challenge"), "{why}");
    wait_for(
        "the work challenge to pass again",
        Duration::from_secs(120),
        || (log_count(&coord.proc.log_text(), "work challenge passed") >= 2).then_some(()),
    );
    let plan = wait_for("a plan again", Duration::from_secs(10), || {
        hire(&coord).ok()
    });
    assert_eq!(plan["plan"]["members"][0]["node_id"], node.as_str());

    // The coordinator restarts: the pass is stored, so the GPU is offered
    // again without a new challenge, CC status and all.
    let (dir, port) = (coord.dir.clone(), coord.port);
    let mut coord = coord;
    assert!(coord.proc.terminate().success());
    let coord = Coordinator::start_with(&dir, port, &work("2s"));
    wait_for("the agent back", Duration::from_secs(60), || {
        let n = nodes_json(&coord);
        (n[0]["connected"] == true).then_some(())
    });
    let plan = wait_for("a plan after the restart", Duration::from_secs(30), || {
        hire(&coord).ok()
    });
    assert_eq!(plan["plan"]["members"][0]["node_id"], node.as_str());
    let nodes = nodes_json(&coord);
    assert_eq!(nodes[0]["work"][0]["state"], "passed", "{nodes:#}");
    assert_eq!(nodes[0]["work"][0]["cc_status"], "ok");
    let log = coord.proc.log_text();
    assert_eq!(log_count(&log, "work challenge sent"), 0, "{log}");
    drop(agent);
}

#[test]
fn a_node_without_a_solver_is_never_offered_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let state = tmp.join("gpus.json");
    write_fake_state(&state, &[gpu("1")]);
    let coord = Coordinator::start_with(&tmp.join("coord"), free_port(), &work("1h"));
    let _agent = Agent::start_env(
        &tmp.join("agent"),
        &format!(
            "{}\n[gpu]\nnvml_library = \"{}\"\n",
            fast_agent_toml(&coord.link_toml(), "1h", 0),
            fake_nvml().display(),
        ),
        &[("FAKE_NVML_STATE", state.as_path())],
    );
    let log = wait_for("the challenge to fail", Duration::from_secs(60), || {
        let log = coord.proc.log_text();
        log.contains("work challenge failed").then_some(log)
    });
    assert!(
        log.contains("no solver image configured on the node (work_challenge.image)"),
        "{log}"
    );
    let why = hire(&coord).unwrap_err();
    assert!(why.contains("passed its work challenge"), "{why}");
    let nodes = nodes_json(&coord);
    let work = &nodes[0]["work"][0];
    assert_eq!(work["state"], "failed", "{nodes:#}");
    assert_eq!(work["offered"], false);
    assert!(
        work["reason"].as_str().unwrap().contains("no solver image"),
        "{nodes:#}"
    );
}
