//! `warden coordinator init` from zero to a first node: the files it
//! writes start a coordinator as the packaged unit does (TLS as systemd
//! credentials), and the section it prints connects an agent.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use common::*;

fn init(config: &Path, state: &Path, port: u16, extra: &[&str]) -> Output {
    Command::new(WARDEN)
        .args(["coordinator", "init", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--name", "localhost", "--name", "127.0.0.1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The `[coordinator]` section as printed, up to its last key.
fn section(stdout: &str) -> String {
    let start = stdout.find("[coordinator]").expect(stdout);
    let lines: Vec<&str> = stdout[start..]
        .lines()
        .take_while(|l| !l.is_empty())
        .collect();
    lines.join("\n") + "\n"
}

fn key(config: &Path) -> String {
    let o = Command::new(WARDEN)
        .args(["coordinator", "key", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn init_then_a_first_node_connects() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    let config = etc.join("coordinator.toml");
    let state = tmp.path().join("state");
    let port = free_port();

    let first = init(&config, &state, port, &[]);
    assert!(first.status.success(), "{first:?}");
    assert_eq!(mode(&state.join("coordinator.key")), 0o600);
    assert_eq!(mode(&etc.join("coordinator.key")), 0o600);
    assert_eq!(mode(&config), 0o644);
    let signing_key = key(&config);

    // Again: refused, nothing replaced.
    let again = init(&config, &state, port, &[]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(config.to_str().unwrap()) && err.contains("--force"),
        "{err}"
    );
    // Forced: new config, CA and token; the signing key is kept and said so.
    let forced = init(&config, &state, port, &["--force"]);
    assert!(forced.status.success(), "{forced:?}");
    let out = String::from_utf8(forced.stdout).unwrap();
    assert!(out.contains("kept the existing signing key"), "{out}");
    assert_eq!(key(&config), signing_key);
    let link = section(&out);
    assert!(
        link.contains(&format!("public_key = \"{signing_key}\"")),
        "{link}"
    );
    let token = link
        .lines()
        .find_map(|l| l.strip_prefix("join_token = "))
        .expect(&link)
        .trim_matches('"')
        .to_owned();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains(&token), "only the digest is in the config");

    // The coordinator as the packaged unit starts it: systemd hands the TLS
    // pair over in $CREDENTIALS_DIRECTORY.
    let creds = tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(etc.join("coordinator.crt"), creds.join("tls.crt")).unwrap();
    std::fs::copy(etc.join("coordinator.key"), creds.join("tls.key")).unwrap();
    let proc = Proc::spawn_env(
        &["coordinator", "--config", config.to_str().unwrap()],
        tmp.path().join("coordinator.log"),
        &[("CREDENTIALS_DIRECTORY", &creds)],
    );
    let coord = Coordinator {
        dir: state.clone(),
        port,
        proc,
    };
    wait_for("the coordinator to start", Duration::from_secs(30), || {
        coord.admin_socket().exists().then_some(())
    });

    // The supplier copies the CA and pastes the section.
    let node_ca = tmp.path().join("node-ca.pem");
    std::fs::copy(etc.join("coordinator-ca.pem"), &node_ca).unwrap();
    let link = link.replace("/etc/warden/coordinator-ca.pem", node_ca.to_str().unwrap());
    let agent = Agent::start(&tmp.path().join("agent"), &link);
    let status = wait_for("the agent to connect", Duration::from_secs(30), || {
        agent
            .status()
            .filter(|s| s["coordinator"]["connected"] == true)
    });
    let nodes = nodes_json(&coord);
    assert_eq!(nodes[0]["node_id"], status["node_id"], "{nodes}");
    assert_eq!(nodes[0]["connected"], true, "{nodes}");
}
