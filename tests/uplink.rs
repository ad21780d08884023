//! End to end: separate agent and coordinator processes over real TLS on
//! loopback, killed and restarted mid-stream.

mod common;

use std::time::Duration;

use common::*;

/// The agent's spool is empty and its last record is `last`.
fn drained(agent: &Agent, last: u64) -> Option<serde_json::Value> {
    let s = agent.status()?;
    (s["spool"]["pending"] == 0 && s["spool"]["next_seq"] == last + 1).then_some(s)
}

#[test]
fn coordinator_sigkilled_mid_stream_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut coord = Coordinator::start(&tmp.path().join("coord"), port);
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&coord.link_toml(), "2ms", 1000),
    );

    // Kill the coordinator while records are flowing.
    wait_for("200 records stored", Duration::from_secs(60), || {
        (record_stats(&coord.db()).0 >= 200).then_some(())
    });
    coord.proc.kill9();
    let stored_at_kill = record_stats(&coord.db()).0;
    assert!(stored_at_kill < 1000, "the stream was not cut mid-way");
    wait_for("agent to notice", Duration::from_secs(30), || {
        (agent.status()?["coordinator"]["connected"] == false).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let coord = Coordinator::start(&coord.dir, port);

    let status = wait_for("spool drained", Duration::from_secs(120), || {
        drained(&agent, 1000)
    });
    assert_eq!(status["last_receipt_seq"], 1000);
    assert_eq!(status["coordinator"]["connected"], true);
    let (n, distinct, min, max) = record_stats(&coord.db());
    assert_eq!((n, distinct, min, max), (1000, 1000, 1, 1000));
    let log = agent.proc.log_text();
    assert_eq!(log.matches("connected to coordinator").count(), 2, "{log}");
    assert_eq!(
        log.matches("coordinator unreachable").count(),
        1,
        "each state change is logged once: {log}"
    );
    assert_eq!(count(&coord.db(), RECEIPTED), 1000);
    assert_eq!(count(&coord.db(), "SELECT count(*) FROM nodes"), 1);
    // Fully acknowledged segments are gone from disk.
    let segs = std::fs::read_dir(agent.dir.join("spool"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("seg-")
        })
        .count();
    assert!(segs <= 1, "{segs} segment files left");
}

/// Records whose receipt is stored (one Receipts may stand for many).
const RECEIPTED: &str = "SELECT count(*) FROM records r JOIN receipts rc
     ON rc.node_id = r.node_id AND rc.seq = coalesce(r.receipt_seq, r.seq)";

#[test]
fn agent_sigkilled_mid_stream_resumes_without_loss_or_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &fast_agent_toml(&coord.link_toml(), "2ms", 600));
    let node_id = agent.status().unwrap()["node_id"].clone();

    wait_for("150 records stored", Duration::from_secs(60), || {
        (record_stats(&coord.db()).0 >= 150).then_some(())
    });
    agent.proc.kill9();
    let seq_at_kill = record_stats(&coord.db()).3;
    assert!(seq_at_kill < 600, "the agent was not killed mid-stream");

    let agent = Agent::start_with(&dir, &agent.config);
    let first = agent.status().unwrap();
    assert_eq!(first["node_id"], node_id, "identity must survive a restart");
    // The restarted process emits 600 more; wait until they are all acknowledged.
    let status = wait_for(
        "spool drained after restart",
        Duration::from_secs(120),
        || {
            let s = agent.status()?;
            let next = s["spool"]["next_seq"].as_u64()?;
            (s["spool"]["pending"] == 0 && next > 600 + seq_at_kill).then_some(s)
        },
    );
    let last = status["spool"]["next_seq"].as_u64().unwrap() - 1;
    let (n, distinct, min, max) = record_stats(&coord.db());
    assert_eq!(
        (n, distinct, min, max),
        (last, last, 1, last),
        "gap or duplicate"
    );
    // Two agent processes wrote records: the restart is visible.
    assert_eq!(count(&coord.db(), RECEIPTED), last);
}

#[test]
fn coordinator_admin_lists_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&coord.link_toml(), "5ms", 20),
    );
    wait_for("20 records acknowledged", Duration::from_secs(60), || {
        drained(&agent, 20)
    });
    let node_id = agent.status().unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new(WARDEN)
        .args([
            "nodes",
            "--json",
            "--socket",
            coord.admin_socket().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes[0]["node_id"], node_id.as_str());
    assert_eq!(nodes[0]["connected"], true);
    assert_eq!(nodes[0]["records"], 20);
    assert!(nodes[0]["last_seen_unix_ms"].as_i64().unwrap() > 0);
    // The admin socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(coord.admin_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Human output names the node too.
    let out = std::process::Command::new(WARDEN)
        .args(["nodes", "--socket", coord.admin_socket().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&node_id));
}
