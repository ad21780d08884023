//! Under systemd (`Type=notify`): READY once registered, watchdog pings at
//! half `WatchdogSec`, STOPPING on SIGTERM.

mod common;

use std::{os::unix::net::UnixDatagram, path::Path, time::Duration};

use common::*;

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_watchdog_and_stopping_reach_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let mut agent = Agent::start_env(
        &tmp.path().join("agent"),
        &fast_agent_toml(&coord.link_toml(), "1h", 0),
        &[
            ("NOTIFY_SOCKET", &path),
            ("WATCHDOG_USEC", Path::new("200000")),
        ],
    );
    let ready = next(&sock);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains("STATUS=connected to the coordinator"),
        "{ready}"
    );
    // 200 ms watchdog: a ping every 100 ms.
    for _ in 0..3 {
        assert_eq!(next(&sock), "WATCHDOG=1");
    }
    assert!(agent.proc.terminate().success());
    // Whatever pings were queued, STOPPING=1 is among what came after.
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut rest = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
}
