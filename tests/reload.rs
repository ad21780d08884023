//! SIGHUP: a running agent re-reads its config file, applies what is safe
//! live, names each changed key that needs a restart, tells systemd
//! (RELOADING, then READY), and keeps running on a broken file.

mod common;

use std::{os::unix::net::UnixDatagram, path::Path, process::Command, time::Duration};

use common::*;

fn hup(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-HUP", &p.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP failed");
}

/// Every notification that arrives within `wait` of the last one.
fn drain(sock: &UnixDatagram, wait: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn sighup_applies_live_keys_names_the_rest_and_survives_a_broken_file() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let dir = tmp.path().join("agent");
    let base = format!(
        "state_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n",
        dir.display()
    );
    let link = coord.link_toml();
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, format!("{base}{link}")).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let mut agent = Agent::start_with_env(&dir, &config, &[("NOTIFY_SOCKET", &notify)]);
    wait_for("agent connected", Duration::from_secs(30), || {
        agent
            .status()
            .filter(|s| s["coordinator"]["connected"] == true)
    });
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"READY=1"));
    let before = agent.status().unwrap();
    assert_eq!(before["config"]["reloads"], 0);
    assert_eq!(
        before["config"]["file"].as_str(),
        Some(config.to_str().unwrap())
    );

    // One live key, two that need a restart (the address points nowhere:
    // were it applied, the agent would lose its coordinator).
    let moved = link.replace(
        &format!("localhost:{}", coord.port),
        &format!("localhost:{}", free_port()),
    );
    assert_ne!(moved, link, "the link names localhost:{}", coord.port);
    std::fs::write(
        &config,
        format!(
            "{base}{moved}\n[timelock]\nallow_exe = [\"nvidia-persistenced\", \"dcgm-exporter\"]\n[uplink]\nheartbeat_interval = \"7s\"\n"
        ),
    )
    .unwrap();
    hup(&agent.proc);
    let s = wait_for("the reload", Duration::from_secs(10), || {
        agent.status().filter(|s| s["config"]["reloads"] == 1)
    });
    assert_eq!(strings(&s["config"]["applied"]), ["timelock.allow_exe"]);
    assert_eq!(
        strings(&s["config"]["needs_restart"]),
        ["coordinator.address", "uplink.heartbeat_interval"]
    );
    assert!(s["config"]["last_error"].is_null());
    let log = agent.proc.log_text();
    assert!(log.contains("timelock.allow_exe changed: applied"), "{log}");
    assert!(
        log.contains("coordinator.address changed: takes effect after a restart"),
        "{log}"
    );
    assert!(
        log.contains("uplink.heartbeat_interval changed: takes effect after a restart"),
        "{log}"
    );
    let told = drain(&sock, Duration::from_secs(2));
    let reloading = told
        .iter()
        .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no RELOADING: {told:?}"));
    let ready = told
        .iter()
        .position(|m| m.starts_with("READY=1\nSTATUS=config reloaded: 1 applied; needs a restart: coordinator.address, uplink.heartbeat_interval"))
        .unwrap_or_else(|| panic!("no READY after the reload: {told:?}"));
    assert!(reloading < ready, "{told:?}");
    // Still on the coordinator it started with.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.status().unwrap()["coordinator"]["connected"], true);
    let out = Command::new(WARDEN)
        .args(["status", "--socket", agent.socket().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("reloaded 1 time(s); needs a restart for: coordinator.address, uplink.heartbeat_interval"),
        "{text}"
    );

    // A broken file: named in the log with what is wrong; nothing changes.
    std::fs::write(
        &config,
        format!("{base}{link}\n[uplink]\nheartbeat = \"5s\"\n"),
    )
    .unwrap();
    hup(&agent.proc);
    let s = wait_for("the refusal", Duration::from_secs(10), || {
        agent
            .status()
            .filter(|s| s["config"]["last_error"].is_string())
    });
    let err = s["config"]["last_error"].as_str().unwrap();
    assert!(err.contains(config.to_str().unwrap()), "{err}");
    assert!(err.contains("unknown field `heartbeat`"), "{err}");
    assert_eq!(s["config"]["reloads"], 1, "a refused file is no reload");
    assert_eq!(
        strings(&s["config"]["needs_restart"]),
        ["coordinator.address", "uplink.heartbeat_interval"]
    );
    let log = agent.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("config not reloaded"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(config.to_str().unwrap()), "{line}");
    assert!(line.contains("unknown field `heartbeat`"), "{line}");
    let told = drain(&sock, Duration::from_secs(2));
    assert!(
        told.iter()
            .any(|m| m.starts_with("READY=1\nSTATUS=config") && m.contains("not reloaded")),
        "{told:?}"
    );
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "the agent died"
    );
    assert_eq!(agent.status().unwrap()["coordinator"]["connected"], true);

    // A CA file that is gone: refused as well, naming the key, not taken
    // up to fail on the next connection.
    let ca = link
        .lines()
        .find_map(|l| l.strip_prefix("ca_cert = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned();
    let gone = link.replace(&ca, &format!("{ca}.gone"));
    std::fs::write(&config, format!("{base}{gone}")).unwrap();
    hup(&agent.proc);
    let s = wait_for("the CA refusal", Duration::from_secs(10), || {
        agent.status().filter(|s| {
            s["config"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("coordinator.ca_cert"))
        })
    });
    assert_eq!(s["config"]["reloads"], 1, "{s}");

    // The original file again: nothing waits for a restart any more.
    std::fs::write(&config, format!("{base}{link}")).unwrap();
    hup(&agent.proc);
    let s = wait_for("the second reload", Duration::from_secs(10), || {
        agent.status().filter(|s| s["config"]["reloads"] == 2)
    });
    assert!(strings(&s["config"]["needs_restart"]).is_empty(), "{s}");
    assert_eq!(strings(&s["config"]["applied"]), ["timelock.allow_exe"]);
    assert!(s["config"]["last_error"].is_null());
    assert!(agent.proc.terminate().success());
}

#[test]
fn sighup_in_dev_mode_is_ignored_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut p = Proc::spawn(
        &["agent", "--dev", "--state-dir", dir.to_str().unwrap()],
        tmp.path().join("dev.log"),
    );
    let sock = dir.join("agent").join("agent.sock");
    wait_for("dev agent", Duration::from_secs(30), || status(&sock));
    hup(&p);
    wait_for("the warning", Duration::from_secs(10), || {
        p.log_text().contains("SIGHUP ignored").then_some(())
    });
    assert!(p.child.try_wait().unwrap().is_none(), "SIGHUP ended it");
    assert!(status(Path::new(&sock)).is_some());
    assert!(p.terminate().success());
}
