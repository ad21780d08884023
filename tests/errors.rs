//! Bad input gets the documented error or recovery: unknown config keys,
//! an unsafe key file mode, a corrupt spool tail.

mod common;

use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use common::*;

fn agent_fails(config: &std::path::Path) -> String {
    let out = Command::new(WARDEN)
        .args(["agent", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the agent started anyway");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[spool]\nmax_byte = 10\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let err = agent_fails(&cfg);
    assert!(err.contains("unknown field `max_byte`"), "{err}");
    assert!(err.contains(cfg.to_str().unwrap()), "{err}");

    let coord_cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&coord_cfg, "listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap();
    let out = Command::new(WARDEN)
        .args(["coordinator", "--config", coord_cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listen_port`"));
}

#[test]
fn key_file_readable_by_others_stops_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let key = state.join("node.key");
    let (_, pkcs8) = warden_proto::dsse::Signer::generate().unwrap();
    std::fs::write(&key, pkcs8).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let err = agent_fails(&cfg);
    assert!(err.contains(key.to_str().unwrap()), "{err}");
    assert!(err.contains("0644"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");

    // A truncated key is named too.
    std::fs::write(&key, [0x30, 0x53, 0x02]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = agent_fails(&cfg);
    assert!(err.contains(key.to_str().unwrap()), "{err}");
    assert!(err.contains("not an Ed25519"), "{err}");
}

#[test]
fn new_key_file_is_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let agent = Agent::start(&dir, "[telemetry]\ninterval = \"1h\"\n");
    let mode = std::fs::metadata(dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mode = std::fs::metadata(agent.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let s = agent.status().unwrap();
    assert_eq!(s["coordinator"]["configured"], false);
    assert_eq!(s["node_id"].as_str().unwrap().len(), 32);
}

#[test]
fn corrupt_spool_tail_is_truncated_with_a_warning_and_nothing_earlier_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    // No coordinator: every record stays pending in the spool.
    let mut agent = Agent::start(&dir, "[telemetry]\ninterval = \"1ms\"\nmax_records = 25\n");
    wait_for("25 records spooled", Duration::from_secs(30), || {
        (agent.status()?["spool"]["pending"] == 25).then_some(())
    });
    assert!(
        agent.proc.terminate().success(),
        "{}",
        agent.proc.log_text()
    );

    // A torn write: garbage where the next frame would start.
    let seg = std::fs::read_dir(dir.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let good_len = bytes.len();
    bytes.extend_from_slice(&[0x55; 7]);
    std::fs::write(&seg, &bytes).unwrap();

    let cfg = dir.with_extension("toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[telemetry]\ninterval = \"1h\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let agent = Agent::start_with(&dir, &cfg);
    let s = wait_for("status", Duration::from_secs(10), || agent.status());
    // Without a coordinator every record ever made is pending: none lost, none reused.
    // (The restarted agent may already have made its first telemetry record.)
    let pending = s["spool"]["pending"].as_u64().unwrap();
    assert!(pending >= 25, "records before the torn tail were lost: {s}");
    assert_eq!(s["spool"]["next_seq"].as_u64().unwrap(), pending + 1);
    let log = agent.proc.log_text();
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains(seg.file_name().unwrap().to_str().unwrap()),
        "{log}"
    );
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len as u64);
}
