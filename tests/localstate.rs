//! A process's own files on its host: one agent or coordinator per state
//! directory (and database), sockets that never replace someone else's
//! file, stale sockets and locks left by SIGKILL that do not block the
//! restart, and modes that stay private outside systemd whatever the umask.

mod common;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

const REFUSE_WITHIN: Duration = Duration::from_secs(30);

fn agent_toml(dir: &Path, coord: &Coordinator, extra: &str) -> PathBuf {
    let config = dir.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n{extra}",
            dir.display(),
            fast_agent_toml(&coord.link_toml(), "100ms", 0)
        ),
    )
    .unwrap();
    config
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn receipts(agent: &Agent) -> u64 {
    agent.status().unwrap()["last_receipt_seq"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_second_agent_on_the_same_state_exits_naming_the_holder_and_the_first_keeps_delivering() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let config = agent_toml(&dir, &coord, "");
    let first = Agent::start_with(&dir, &config);
    let before = wait_for("first receipts", Duration::from_secs(30), || {
        first
            .status()
            .filter(|s| s["last_receipt_seq"].as_u64() >= Some(1))
    });

    let mut second = Proc::spawn(
        &["agent", "--config", config.to_str().unwrap()],
        tmp.path().join("second.log"),
    );
    let code = second.wait_exit(REFUSE_WITHIN);
    let log = second.log_text();
    assert!(!code.success(), "{log}");
    let lock = dir.join("warden.lock");
    assert!(log.contains(lock.to_str().unwrap()), "{log}");
    assert!(
        log.contains(&format!("held by pid {}", first.proc.pid())),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        first.proc.pid().to_string()
    );

    // The first one still owns its socket and its stream.
    let s = first.status().expect("the first agent's socket answers");
    assert_eq!(s["start_id"], before["start_id"]);
    let seen = receipts(&first);
    wait_for(
        "the first agent's records still receipted",
        Duration::from_secs(30),
        || (receipts(&first) > seen).then_some(()),
    );
    let (count, distinct, _, _) = record_stats(&coord.db());
    assert_eq!(count, distinct, "no seq was sent twice");
}

#[test]
fn a_second_coordinator_on_the_same_state_dir_or_database_exits_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("coord");
    let first = Coordinator::start(&dir, free_port());
    let pid = first.proc.pid();

    // The same config, another port.
    let config = dir.with_extension("coordinator.toml");
    let mut same_dir = Proc::spawn(
        &[
            "coordinator",
            "--dev",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        tmp.path().join("same-dir.log"),
    );
    let code = same_dir.wait_exit(REFUSE_WITHIN);
    let log = same_dir.log_text();
    assert!(!code.success(), "{log}");
    assert!(
        log.contains(dir.join("warden.lock").to_str().unwrap()),
        "{log}"
    );
    assert!(log.contains(&format!("held by pid {pid}")), "{log}");

    // Its own state directory, the first one's database.
    let other = tmp.path().join("other");
    let other_config = tmp.path().join("other.toml");
    std::fs::write(
        &other_config,
        format!(
            "state_dir = \"{}\"\ndatabase = \"{}\"\n",
            other.display(),
            first.db().display()
        ),
    )
    .unwrap();
    let mut same_db = Proc::spawn(
        &[
            "coordinator",
            "--dev",
            "--config",
            other_config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        tmp.path().join("same-db.log"),
    );
    let code = same_db.wait_exit(REFUSE_WITHIN);
    let log = same_db.log_text();
    assert!(!code.success(), "{log}");
    assert!(log.contains("coordinator.db.lock"), "{log}");
    assert!(log.contains(&format!("held by pid {pid}")), "{log}");
    assert!(!other.join("admin.sock").exists());

    // The first one still answers on its admin socket.
    assert!(nodes_json(&first).as_array().is_some());
}

#[test]
fn a_socket_path_on_a_file_refuses_the_start_and_leaves_the_file_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("node.key");
    warden_proto::identity::load_or_create(&key).unwrap();
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "the operator's notes\n").unwrap();
    let key_bytes = std::fs::read(&key).unwrap();

    // One of the agent's own files (caught by the config check), and a
    // file of someone else's (caught where the socket is bound).
    for (socket, says) in [
        (&key, "is the agent's node key"),
        (&notes, "is a regular file, not a socket"),
    ] {
        let config = agent_toml(
            &dir,
            &coord,
            &format!("[status]\nsocket = \"{}\"\n", socket.display()),
        );
        let mut p = Proc::spawn(
            &["agent", "--config", config.to_str().unwrap()],
            tmp.path().join("agent.log"),
        );
        let code = p.wait_exit(REFUSE_WITHIN);
        let log = p.log_text();
        assert!(!code.success(), "{log}");
        assert!(log.contains("status.socket"), "{log}");
        assert!(
            log.contains(socket.to_str().unwrap()) && log.contains(says),
            "{log}"
        );
        assert!(std::fs::symlink_metadata(socket).unwrap().is_file());
    }
    assert_eq!(std::fs::read(&key).unwrap(), key_bytes);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "the operator's notes\n"
    );

    // The coordinator: its database, and someone else's file.
    let db = coord.db();
    let mut stopped = coord;
    assert!(stopped.proc.terminate().success());
    let db_bytes = std::fs::read(&db).unwrap();
    for (socket, says) in [
        (&db, "is the coordinator's database"),
        (&notes, "is a regular file, not a socket"),
    ] {
        let config = tmp.path().join("bad-coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nadmin_socket = \"{}\"\n",
                stopped.dir.display(),
                socket.display()
            ),
        )
        .unwrap();
        let mut p = Proc::spawn(
            &[
                "coordinator",
                "--dev",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ],
            tmp.path().join("coordinator.log"),
        );
        let code = p.wait_exit(REFUSE_WITHIN);
        let log = p.log_text();
        assert!(!code.success(), "{log}");
        assert!(log.contains("admin_socket"), "{log}");
        assert!(
            log.contains(socket.to_str().unwrap()) && log.contains(says),
            "{log}"
        );
    }
    assert_eq!(std::fs::read(&db).unwrap(), db_bytes);
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "the operator's notes\n"
    );
}

#[test]
fn sockets_and_locks_left_by_sigkill_do_not_block_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("coord");
    let port = free_port();
    let mut coord = Coordinator::start(&dir, port);
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let config = agent_toml(&agent_dir, &coord, "");
    let mut agent = Agent::start_with(&agent_dir, &config);
    let node = agent.status().unwrap()["node_id"].clone();

    agent.proc.kill9();
    coord.proc.kill9();
    // What they leave: socket files nobody answers on, and lock files
    // naming dead pids (the kernel dropped the locks themselves).
    for sock in [agent.socket(), coord.admin_socket()] {
        let t = std::fs::symlink_metadata(&sock).unwrap().file_type();
        assert!(t.is_socket(), "{} left behind", sock.display());
    }
    assert!(agent_dir.join("warden.lock").exists());
    assert!(dir.join("warden.lock").exists());

    let coord = Coordinator::start(&dir, port);
    let agent = Agent::start_with(&agent_dir, &config);
    let s = wait_for(
        "the restarted agent connected",
        Duration::from_secs(30),
        || {
            agent
                .status()
                .filter(|s| s["coordinator"]["connected"] == true)
        },
    );
    assert_eq!(s["node_id"], node);
    assert_eq!(nodes_json(&coord)[0]["node_id"], node);
    assert_eq!(
        std::fs::read_to_string(agent_dir.join("warden.lock"))
            .unwrap()
            .trim(),
        agent.proc.pid().to_string()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("warden.lock"))
            .unwrap()
            .trim(),
        coord.proc.pid().to_string()
    );
}

/// A warden process under umask 000, as a careless shell outside systemd
/// would start it: nothing may rely on the umask for privacy.
fn spawn_umask_000(args: &[&str], log: PathBuf, env: &[(&str, &Path)]) -> Proc {
    let err = std::fs::File::create(&log).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(WARDEN)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// Every entry under `dir` with its mode, skipping the database files
/// (their mode is the store's concern and has its own test).
fn modes_under(dir: &Path) -> Vec<(PathBuf, std::fs::FileType, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("coordinator.db") && !name.ends_with(".lock") {
                continue;
            }
            // A lease's encrypted scratch volume: its root is open to every
            // uid (the renter's containers run as any user) and gocryptfs
            // makes its own files; it is reached only through the 0700
            // `scratch/<lease>` above it, which is checked.
            let in_volume = d.parent().and_then(Path::file_name) == Some("scratch".as_ref());
            if in_volume && (name == "cipher" || name == "plain") {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue; // a temporary file renamed meanwhile
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.push((p, m.file_type(), m.permissions().mode() & 0o7777));
        }
    }
    out
}

#[test]
fn state_files_are_private_after_a_run_outside_systemd_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let coord_dir = tmp.path().join("coord");
    let port = free_port();
    let coord_config = tmp.path().join("coord.toml");
    std::fs::write(
        &coord_config,
        format!(
            "state_dir = \"{}\"\n[leases]\nchallenge_interval = \"0s\"\n",
            coord_dir.display()
        ),
    )
    .unwrap();
    let coord = Coordinator {
        dir: coord_dir.clone(),
        port,
        proc: spawn_umask_000(
            &[
                "coordinator",
                "--dev",
                "--config",
                coord_config.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ],
            tmp.path().join("coord.log"),
            &[],
        ),
    };
    wait_for("coordinator to start", Duration::from_secs(30), || {
        coord_dir.join("agent-link.toml").exists().then_some(())
    });

    // An agent with one fake GPU, so that a lease writes the book and the chains.
    let dev_dir = tmp.path().join("dev");
    std::fs::create_dir_all(&dev_dir).unwrap();
    let gpus = tmp.path().join("gpus.json");
    write_fake_state(&gpus, &[fake_gpu(0)]);
    let agent_dir = tmp.path().join("agent");
    let config = agent_toml(
        &agent_dir,
        &coord,
        &format!(
            "[gpu]\nnvml_library = \"{}\"\nsample_interval = \"100ms\"\n\
             [timelock]\nepoch = \"500ms\"\ndevice_patterns = [\"{}/nvidia*\"]\n",
            fake_nvml().display(),
            dev_dir.display()
        ),
    );
    let agent = Agent {
        dir: agent_dir.clone(),
        config: config.clone(),
        proc: spawn_umask_000(
            &["agent", "--config", config.to_str().unwrap()],
            tmp.path().join("agent.log"),
            &[("FAKE_NVML_STATE", &gpus)],
        ),
    };
    let s = wait_for("agent connected", Duration::from_secs(30), || {
        agent.status().filter(|s| {
            s["coordinator"]["connected"] == true
                && s["gpus"].as_array().is_some_and(|g| g.len() == 1)
        })
    });
    let node = s["node_id"].as_str().unwrap().to_owned();
    let lease = |args: &[&str]| {
        Command::new(WARDEN)
            .args(["lease", "--socket", coord.admin_socket().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = lease(&["start", &node, "--gpus", "all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    wait_for("an attestation stored", Duration::from_secs(30), || {
        let out = lease(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let l = list.as_array()?.iter().find(|l| l["lease_id"] == id)?;
        (l["attestations"].as_u64()? >= 1).then_some(())
    });
    wait_for(
        "the book and the chains written",
        Duration::from_secs(30),
        || {
            (agent_dir.join("book.json").exists() && agent_dir.join("chains.json").exists())
                .then_some(())
        },
    );

    let expect = [
        agent_dir.join("node.key"),
        agent_dir.join("mesh.key"),
        agent_dir.join("book.json"),
        agent_dir.join("chains.json"),
        agent_dir.join("warden.lock"),
        agent_dir.join("agent.sock"),
        agent_dir.join("spool/warden.lock"),
        coord_dir.join("coordinator.key"),
        coord_dir.join("warden.lock"),
        coord_dir.join("coordinator.db.lock"),
        coord_dir.join("admin.sock"),
        coord_dir.join("agent-link.toml"),
        coord_dir.join("tls/ca.pem"),
        coord_dir.join("tls/server.pem"),
        coord_dir.join("tls/server.key"),
    ];
    assert_private(&[&agent_dir, &coord_dir], &expect);
    assert!(
        modes_under(&agent_dir.join("spool"))
            .iter()
            .any(|(p, _, _)| p.file_name().unwrap().to_string_lossy().starts_with("seg-")),
        "no spool segment"
    );

    // Stopped: the spool's watermark is written on the way out, and
    // nothing left behind is any looser.
    let (mut agent, mut coord) = (agent, coord);
    assert!(
        agent.proc.terminate().success(),
        "{}",
        agent.proc.log_text()
    );
    assert!(
        coord.proc.terminate().success(),
        "{}",
        coord.proc.log_text()
    );
    assert_private(
        &[&agent_dir, &coord_dir],
        &[
            agent_dir.join("spool/acked"),
            agent_dir.join("book.json"),
            agent_dir.join("chains.json"),
        ],
    );
}

/// Every directory under `dirs` (and they) 0700, everything else 0600, and
/// each of `expect` among them.
fn assert_private(dirs: &[&Path], expect: &[PathBuf]) {
    let mut seen = Vec::new();
    for d in dirs {
        assert_eq!(mode(d), 0o700, "{}", d.display());
        seen.extend(modes_under(d));
    }
    let loose: Vec<String> = seen
        .iter()
        .filter(|(_, t, m)| *m != if t.is_dir() { 0o700 } else { 0o600 })
        .map(|(p, _, m)| format!("{} {m:04o}", p.display()))
        .collect();
    assert!(loose.is_empty(), "not private: {loose:#?}");
    for p in expect {
        assert!(
            seen.iter().any(|(q, _, _)| q == p),
            "{} missing: {seen:?}",
            p.display()
        );
    }
}
