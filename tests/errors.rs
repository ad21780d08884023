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

/// A coordinator CA file that is missing or holds no certificate stops the
/// agent at start, naming the key and the fix, instead of a retry forever.
#[test]
fn a_missing_or_empty_ca_file_stops_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let (signer, _) = warden_proto::dsse::Signer::generate().unwrap();
    let empty = tmp.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for (ca, says) in [
        (tmp.path().join("no-such-ca.pem"), "cannot read"),
        (empty, "holds no PEM certificate"),
    ] {
        let cfg = tmp.path().join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "state_dir = \"{}\"\n[coordinator]\naddress = \"https://localhost:1\"\npublic_key = \"{}\"\nca_cert = \"{}\"\n",
                tmp.path().join("state").display(),
                signer.verifying_key().to_base64(),
                ca.display()
            ),
        )
        .unwrap();
        let err = agent_fails(&cfg);
        assert!(
            err.contains("coordinator.ca_cert") && err.contains(says),
            "{err}"
        );
        assert!(err.contains("warden coordinator init"), "{err}");
    }
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
fn corrupt_spool_tail_is_skipped_with_a_warning_nothing_earlier_is_lost_and_no_seq_reused() {
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
            "state_dir = \"{}\"\n[telemetry]\ninterval = \"1h\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let agent = Agent::start_with(&dir, &cfg);
    let s = wait_for("status", Duration::from_secs(10), || agent.status());
    // Without a coordinator every record ever made is pending: none lost.
    // (The restarted agent may already have made its first telemetry record.)
    let pending = s["spool"]["pending"].as_u64().unwrap();
    assert!(pending >= 25, "records before the torn tail were lost: {s}");
    // The 7 bytes could have held (the start of) one frame: its seq, 26, is
    // never given out again, so the new records start at 27.
    assert_eq!(s["spool"]["next_seq"].as_u64().unwrap(), pending + 2, "{s}");
    assert_eq!(s["spool"]["corrupt"], 1, "{s}");
    let log = agent.proc.log_text();
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains(seg.file_name().unwrap().to_str().unwrap()),
        "{log}"
    );
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        good_len as u64 + 7,
        "new records never follow the damaged bytes: they go to a new segment"
    );
}

#[test]
fn a_full_spool_sheds_telemetry_says_so_and_keeps_every_old_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    // No coordinator and a tiny cap: the spool fills within a second.
    let agent = Agent::start(
        &dir,
        "[spool]\nmax_bytes = 65536\nsegment_bytes = 65536\n[telemetry]\ninterval = \"1ms\"\n",
    );
    let s = wait_for("spool shedding", Duration::from_secs(30), || {
        let s = agent.status()?;
        (s["spool"]["shedding"] == true && s["spool"]["shed"].as_u64()? > 0).then_some(s)
    });
    // Only telemetry samples are shed; no evidence was refused.
    assert_eq!(s["spool"]["full"], false, "{s}");
    assert_eq!(s["spool"]["refused"], 0, "{s}");
    let pending = s["spool"]["pending"].as_u64().unwrap();
    assert!(pending > 100, "{s}");
    assert_eq!(
        s["spool"]["next_seq"].as_u64().unwrap(),
        pending + 1,
        "a spooled record was dropped, or a shed sample took a seq"
    );
    assert!(s["spool"]["bytes"].as_u64().unwrap() <= 65536);
    let later = wait_for("more shed", Duration::from_secs(30), || {
        let l = agent.status()?;
        (l["spool"]["shed"].as_u64()? > s["spool"]["shed"].as_u64()?).then_some(l)
    });
    assert_eq!(
        later["spool"]["pending"].as_u64().unwrap(),
        pending,
        "old records must stay"
    );
    let log = agent.proc.log_text();
    assert_eq!(log.matches("spool full").count(), 1, "said once: {log}");
    assert!(log.contains("shedding telemetry"), "{log}");
}

#[test]
fn coordinator_without_tls_paths_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n[enrollment]\npolicy = \"open\"\n",
            tmp.path().join("c").display()
        ),
    )
    .unwrap();
    let out = Command::new(WARDEN)
        .args(["coordinator", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`tls.cert`"), "{err}");
}

#[test]
fn coordinator_with_configured_tls_serves_an_agent() {
    let tmp = tempfile::tempdir().unwrap();
    // Certificates made once by a dev coordinator, then used as production files.
    let port = free_port();
    let dev = Coordinator::start(&tmp.path().join("dev"), port);
    drop(dev);
    let tls = tmp.path().join("dev/tls");
    let cdir = tmp.path().join("prod");
    let cfg = tmp.path().join("coordinator.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[enrollment]\npolicy = \"open\"\n",
            cdir.display(),
            tls.join("server.pem").display(),
            tls.join("server.key").display()
        ),
    )
    .unwrap();
    let _coord = Proc::spawn(
        &["coordinator", "--config", cfg.to_str().unwrap()],
        tmp.path().join("prod.log"),
    );
    let key_file = cdir.join("coordinator.key");
    wait_for("coordinator key", Duration::from_secs(30), || {
        key_file.exists().then_some(())
    });
    let key = warden_proto::identity::load(&key_file)
        .unwrap()
        .verifying_key();
    let link = format!(
        "[coordinator]\naddress = \"https://localhost:{port}\"\npublic_key = \"{}\"\nca_cert = \"{}\"\n",
        key.to_base64(),
        tls.join("ca.pem").display()
    );
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&link, "5ms", 10),
    );
    wait_for("10 receipts", Duration::from_secs(30), || {
        let s = agent.status()?;
        (s["last_receipt_seq"] == 10 && s["spool"]["pending"] == 0).then_some(())
    });
}

#[test]
fn an_agent_pinned_to_another_coordinator_key_sends_nothing_and_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let (impostor, _) = warden_proto::dsse::Signer::generate().unwrap();
    let link = coord
        .link_toml()
        .replace(&coord.public_key(), &impostor.verifying_key().to_base64());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&link, "5ms", 10),
    );
    // Its receipts could not be trusted: not one record goes to it.
    let s = wait_for(
        "the records spooled and the cause said",
        Duration::from_secs(30),
        || {
            agent
                .status()
                .filter(|s| s["spool"]["pending"] == 10 && !s["problem"].is_null())
        },
    );
    assert_eq!(s["last_receipt_seq"], 0);
    assert_eq!(record_stats(&coord.db()).0, 0);
    assert!(agent
        .proc
        .log_text()
        .contains("not with the pinned coordinator.public_key"));
}

#[test]
fn coordinator_key_readable_by_others_stops_the_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("coord");
    std::fs::create_dir_all(&state).unwrap();
    let key = state.join("coordinator.key");
    let (_, pkcs8) = warden_proto::dsse::Signer::generate().unwrap();
    std::fs::write(&key, pkcs8).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = Command::new(WARDEN)
        .args([
            "coordinator",
            "--dev",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("0640"),
        "{err}"
    );
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn a_shedding_spool_shows_at_the_coordinator_through_heartbeats() {
    let tmp = tempfile::tempdir().unwrap();
    // The coordinator takes five envelopes a second from a node that emits
    // a thousand: its spool can only fill. One record in flight at a time,
    // so each heartbeat is read soon after it is sent.
    let coord = Coordinator::start_with(
        &tmp.path().join("coord"),
        free_port(),
        "[limits]\nnode_envelopes_per_second = 5\n",
    );
    let _agent = Agent::start(
        &tmp.path().join("agent"),
        &format!(
            "{}\n[spool]\nmax_bytes = 65536\nsegment_bytes = 65536\n",
            fast_agent_toml(&coord.link_toml(), "1ms", 0)
                .replace("[uplink]\n", "[uplink]\nmax_in_flight = 1\n")
        ),
    );
    let nodes = wait_for(
        "coordinator sees the full spool",
        Duration::from_secs(30),
        || {
            let out = Command::new(WARDEN)
                .args([
                    "nodes",
                    "--json",
                    "--socket",
                    coord.admin_socket().to_str().unwrap(),
                ])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v[0]["spool"]["shedding"] == true).then_some(v)
        },
    );
    assert!(nodes[0]["spool"]["shed"].as_u64().unwrap() > 0, "{nodes}");
    assert_eq!(nodes[0]["spool"]["max_bytes"], 65536);
}
