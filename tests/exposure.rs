//! A coordinator on a public address, attacked from outside with real
//! sockets while a real agent process tries to get in: idle TCP
//! connections, TLS handshakes left half done, TLS connections that never
//! ask for anything; enrollment with a join token; a damaged database.

mod common;

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A TCP connection to `to` from the loopback address `from` (all of
/// 127/8 is loopback, so each is a different client to the coordinator).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> Option<TcpStream> {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.connect(to))
        .await
        .ok()?
        .ok()
}

fn client_tls(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS ClientHello for `localhost`, to send and then say nothing more.
fn client_hello(cfg: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Reads until the peer closes (EOF or reset); how long that took, or None
/// if it stayed open past `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    within: Duration,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => {}
        }
    }
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_and_half_done_connections_are_capped_per_address_and_closed_while_an_agent_gets_in() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start_with(
        &tmp.path().join("coord"),
        free_port(),
        "[limits]\nmax_connections_per_ip = 16\nhandshake_timeout = \"2s\"\nidle_timeout = \"3s\"\n",
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], coord.port));
    let tls = client_tls(&coord.dir.join("tls/ca.pem"));
    let rt = runtime();

    // From 127.0.0.2: 150 connections that say nothing and 150 that send a
    // ClientHello and stop there.
    let hello = client_hello(&tls);
    let mut flood = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..300 {
            if let Some(mut s) = connect_from([127, 0, 0, 2], addr).await {
                if i % 2 == 1 {
                    let _ = s.write_all(&hello).await;
                }
                v.push(s);
            }
        }
        v
    });
    assert!(flood.len() >= 250, "{} connected", flood.len());
    // From 127.0.0.3: TLS done, then nothing asked.
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let mut quiet = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..8 {
            let tcp = connect_from([127, 0, 0, 3], addr).await.unwrap();
            let s = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            v.push((Instant::now(), s));
        }
        v
    });

    // The limit bit and said so.
    wait_for("the limit's log line", Duration::from_secs(30), || {
        let log = coord.proc.log_text();
        (log.contains("connection limit reached") && log.contains("127.0.0.2")).then_some(())
    });

    // A real agent, from 127.0.0.1, registers and delivers meanwhile.
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&coord.link_toml(), "5ms", 20),
    );
    wait_for("20 receipts", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["last_receipt_seq"] == 20).then_some(())
    });

    // Every flooding connection is closed: refused at once or, if it got
    // in, at its handshake deadline.
    rt.block_on(async {
        for s in &mut flood {
            assert!(
                closed_within(s, Duration::from_secs(60)).await.is_some(),
                "a flooding connection is still open"
            );
        }
        // TLS-complete connections with no RPC are closed at the idle
        // deadline, not before (the server's clock starts after ours).
        for (done, s) in &mut quiet {
            let at = closed_within(s, Duration::from_secs(60))
                .await
                .expect("an idle TLS connection is still open");
            assert!(
                at - *done >= Duration::from_millis(2900),
                "closed {:?} after its handshake, before limits.idle_timeout",
                at - *done
            );
        }
    });
    // The agent's own connection carries its stream, so it is not idle.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent.status().unwrap()["coordinator"]["connected"], true);
}

#[test]
fn at_the_connection_cap_new_connections_are_closed_at_once_without_spinning_and_the_agent_gets_in_once_they_go(
) {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start_with(
        &tmp.path().join("coord"),
        free_port(),
        "[limits]\nmax_connections = 40\nhandshake_timeout = \"4s\"\n",
    );
    let pid = coord.proc.pid();
    let fds_before = open_fds(pid);
    let addr = SocketAddr::from(([127, 0, 0, 1], coord.port));
    let rt = runtime();
    // 120 idle connections from several addresses (no per-address cap bites).
    let mut held = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..120u8 {
            if let Some(s) = connect_from([127, 0, 1, 1 + i % 6], addr).await {
                v.push(s);
            }
        }
        v
    });
    wait_for("the limit's log line", Duration::from_secs(30), || {
        let log = coord.proc.log_text();
        log.contains("connection limit reached: 40 connections open (limits.max_connections)")
            .then_some(())
    });
    // Held at the cap: the coordinator's descriptors grow by the cap, not by the flood,
    // and it does not spin while refusing.
    let cpu0 = cpu_time(pid);
    let extra: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..40 {
            v.extend(connect_from([127, 0, 2, 1], addr).await);
        }
        v
    });
    std::thread::sleep(Duration::from_secs(2));
    let fds = open_fds(pid);
    assert!(
        fds <= fds_before + 40 + 10,
        "{fds} descriptors open (before the flood: {fds_before})"
    );
    let spent = cpu_time(pid) - cpu0;
    assert!(
        spent < Duration::from_millis(1500),
        "{spent:?} of CPU while at the cap"
    );
    // An agent started now gets in once the held connections reach their
    // handshake deadline.
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&coord.link_toml(), "5ms", 10),
    );
    wait_for("10 receipts", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["last_receipt_seq"] == 10).then_some(())
    });
    held.extend(extra);
    rt.block_on(async {
        for s in &mut held {
            assert!(closed_within(s, Duration::from_secs(60)).await.is_some());
        }
    });
}

#[test]
fn a_token_coordinator_turns_away_an_agent_without_its_token_and_says_what_to_set() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(WARDEN).args(["join-token"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|r| r.split('"').nth(1))
            .unwrap_or_else(|| panic!("no {key} in: {text}"))
            .to_owned()
    };
    let (token, sha) = (value("join_token = "), value("join_token_sha256 = ["));
    let coord = Coordinator::start_with(
        &tmp.path().join("coord"),
        free_port(),
        &format!("[enrollment]\npolicy = \"token\"\njoin_token_sha256 = [\"{sha}\"]\n"),
    );
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &fast_agent_toml(&coord.link_toml(), "5ms", 5));
    let err = wait_for("the refusal", Duration::from_secs(30), || {
        let s = agent.status()?;
        s["coordinator"]["last_error"].as_str().map(str::to_owned)
    });
    assert!(err.contains("coordinator.join_token"), "{err}");
    assert_eq!(agent.status().unwrap()["coordinator"]["connected"], false);
    assert_eq!(count(&coord.db(), "SELECT count(*) FROM nodes"), 0);
    assert!(agent.proc.log_text().contains("registration refused"));
    agent.proc.terminate();

    // With the token in its config it enrolls and delivers.
    let link = coord.link_toml().replace(
        "[coordinator]\n",
        &format!("[coordinator]\njoin_token = \"{token}\"\n"),
    );
    let agent = Agent::start(&dir, &fast_agent_toml(&link, "5ms", 5));
    wait_for("the records receipted", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["last_receipt_seq"].as_u64()? >= 5 && s["spool"]["pending"] == 0).then_some(())
    });
    assert_eq!(
        count(
            &coord.db(),
            "SELECT count(*) FROM nodes WHERE enrolled = 'token'"
        ),
        1
    );
    // Its status shows the token only as a digest.
    let shown = Command::new(WARDEN)
        .args([
            "status",
            "--json",
            "--socket",
            agent.socket().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&shown.stdout).contains(&token));
}

#[test]
fn a_coordinator_outside_dev_must_be_told_who_may_enroll() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n",
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
    for word in [
        "enrollment.policy",
        "\"token\"",
        "\"allowlist\"",
        "\"open\"",
    ] {
        assert!(err.contains(word), "{word}: {err}");
    }
    assert!(
        !tmp.path().join("c/coordinator.db").exists(),
        "it started anyway"
    );
}

#[test]
fn the_database_is_private_and_a_damaged_one_stops_the_coordinator_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&dir, free_port());
    for name in ["coordinator.db", "coordinator.db-wal", "coordinator.db-shm"] {
        let mode = std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    assert!(coord.proc.terminate().success());

    let db = dir.join("coordinator.db");
    std::fs::write(&db, vec![0x5A; 16384]).unwrap();
    let _ = std::fs::remove_file(dir.join("coordinator.db-wal"));
    let out = Command::new(WARDEN)
        .args(["coordinator", "--dev", "--state-dir", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(db.to_str().unwrap()), "{err}");
    assert!(err.contains("damaged") && err.contains("restore"), "{err}");
}
