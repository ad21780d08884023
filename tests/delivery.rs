//! Delivery under damage, end to end: real agent and coordinator processes
//! over TLS, with the agent's state dir changed behind its back (a replaced
//! node key, a wiped or restored spool, flipped bytes, a bogus watermark),
//! a coordinator that refuses records for good, and a long outage with a
//! small spool during a lease. Delivery must go on, lose nothing it could
//! keep, never reuse a seq, and say what it set aside, shed or found damaged.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// Agent TOML: quick reconnects, a telemetry burst, and `uplink` extras.
fn toml(link: &str, interval: &str, max_records: u64, uplink: &str) -> String {
    format!(
        "{link}\n[uplink]\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\nheartbeat_interval = \"1s\"\n{uplink}\n\
         [telemetry]\ninterval = \"{interval}\"\nmax_records = {max_records}\n"
    )
}

/// Waits until the agent's telemetry burst is over and every record has
/// left the spool (receipted, set aside or shed).
fn drained(agent: &Agent, timeout: Duration) -> Value {
    wait_for("telemetry done and the spool drained", timeout, || {
        if !agent
            .proc
            .log_text()
            .contains("telemetry.max_records reached")
        {
            return None;
        }
        let s = agent.status()?;
        (s["spool"]["pending"] == 0).then_some(s)
    })
}

/// Waits until the burst is over with every record still pending (no coordinator).
fn all_spooled(agent: &Agent, at_least: u64) -> Value {
    wait_for(
        "telemetry done, records spooled",
        Duration::from_secs(60),
        || {
            if !agent
                .proc
                .log_text()
                .contains("telemetry.max_records reached")
            {
                return None;
            }
            let s = agent.status()?;
            (s["spool"]["pending"].as_u64()? >= at_least).then_some(s)
        },
    )
}

fn next_seq(s: &Value) -> u64 {
    s["spool"]["next_seq"].as_u64().unwrap()
}

fn node_id(s: &Value) -> String {
    s["node_id"].as_str().unwrap().to_owned()
}

/// The seqs a coordinator stored for a node, in order.
fn stored_seqs(db: &Path, node: &str) -> Vec<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq FROM records WHERE node_id = ?1 ORDER BY seq")
        .unwrap();
    let rows = stmt
        .query_map([node], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|s| s.unwrap() as u64)
        .collect();
    rows
}

/// The stored payload digests of a node's seqs in `range`.
fn stored_digests(db: &Path, node: &str, range: std::ops::RangeInclusive<u64>) -> Vec<Vec<u8>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    range
        .map(|seq| {
            conn.query_row(
                "SELECT payload_sha256 FROM records WHERE node_id = ?1 AND seq = ?2",
                rusqlite::params![node, seq as i64],
                |r| r.get(0),
            )
            .unwrap()
        })
        .collect()
}

fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

/// Flips one payload byte of the frame holding `seq` (the spool's frame
/// format: u32 length (top bit: class), u32 CRC, u64 seq, payload).
fn flip_payload_byte(spool: &Path, seq: u64) {
    for seg in segments(spool) {
        let mut buf = std::fs::read(&seg).unwrap();
        let mut off = 0;
        while off + 16 <= buf.len() {
            let len =
                (u32::from_le_bytes(buf[off..off + 4].try_into().unwrap()) & 0x7fff_ffff) as usize;
            let s = u64::from_le_bytes(buf[off + 8..off + 16].try_into().unwrap());
            if s == seq {
                buf[off + 16 + len / 2] ^= 0x08;
                // In place, as bit rot would: same file, same length.
                std::fs::write(&seg, &buf).unwrap();
                return;
            }
            off += 16 + len;
        }
    }
    panic!("no frame with seq {seq} in {}", spool.display());
}

fn metrics(s: &Value) -> String {
    http_get(s["metrics_address"].as_str().unwrap(), "/metrics")
}

#[test]
fn a_replaced_node_key_sets_the_old_records_aside_and_new_records_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let link = coord.link_toml();
    // Down while the first identity makes its records: they all stay spooled.
    coord.proc.kill9();
    let dir = tmp.path().join("agent");
    // A small window: with the old records refused one by one and kept in
    // it, nothing new could ever be sent.
    let cfg = |n| toml(&link, "2ms", n, "max_in_flight = 8\n");
    let mut agent = Agent::start(&dir, &cfg(300));
    let first = all_spooled(&agent, 300);
    let old_node = node_id(&first);
    let old_pending = first["spool"]["pending"].as_u64().unwrap();
    assert!(agent.proc.terminate().success());

    std::fs::remove_file(dir.join("node.key")).unwrap();
    let coord = Coordinator::start(&cdir, port);
    let agent = Agent::start(&dir, &cfg(100));
    let s = drained(&agent, Duration::from_secs(60));
    let new_node = node_id(&s);
    assert_ne!(new_node, old_node, "a new key is a new identity");
    assert_eq!(s["spool"]["set_aside"], old_pending, "{s}");
    let last = next_seq(&s) - 1;
    assert!(last >= 100, "{s}");
    assert_eq!(
        stored_seqs(&coord.db(), &new_node),
        (1..=last).collect::<Vec<_>>(),
        "the new identity's records start at 1, all delivered"
    );
    assert!(stored_seqs(&coord.db(), &old_node).is_empty());
    assert_eq!(s["coordinator"]["refusals"], 0, "nothing doomed was sent");
    assert!(
        metrics(&s).contains(&format!("warden_spool_set_aside_records {old_pending}\n")),
        "{}",
        metrics(&s)
    );
    // Kept on disk, with the reason.
    let reasons = std::fs::read_to_string(dir.join("spool/refused.txt")).unwrap();
    assert_eq!(reasons.lines().count() as u64, old_pending);
    assert!(reasons.contains("node.key was replaced"), "{reasons}");
    assert!(
        std::fs::metadata(dir.join("spool/refused.log"))
            .unwrap()
            .len()
            > 0,
        "the records themselves are kept"
    );
    let log = agent.proc.log_text();
    assert!(
        log.contains(&old_node) && log.contains("set aside"),
        "{log}"
    );
}

#[test]
fn records_refused_for_good_are_set_aside_and_never_stall_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let link = coord.link_toml();
    let dir = tmp.path().join("agent");
    let cfg = |interval, n| toml(&link, interval, n, "max_in_flight = 4\n");
    let mut agent = Agent::start(&dir, &cfg("5ms", 40));
    let s1 = drained(&agent, Duration::from_secs(60));
    let node = node_id(&s1);
    let n1 = next_seq(&s1) - 1;
    assert!(agent.proc.terminate().success());
    // A backup of the spool as it is now ...
    let backup = tmp.path().join("spool.bak");
    let ok = std::process::Command::new("cp")
        .args(["-a"])
        .arg(dir.join("spool"))
        .arg(&backup)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // ... then more records are delivered ...
    let mut agent = Agent::start(&dir, &cfg("5ms", 40));
    let s2 = drained(&agent, Duration::from_secs(60));
    let n2 = next_seq(&s2) - 1;
    assert!(n2 >= n1 + 40, "{n1} {n2}");
    assert!(agent.proc.terminate().success());
    coord.proc.kill9();
    let before = stored_digests(&coord.db(), &node, n1 + 1..=n2);
    // ... and the backup is restored: the agent numbers new records from
    // n1 + 1 again, under seqs the coordinator holds with other content.
    std::fs::remove_dir_all(dir.join("spool")).unwrap();
    std::fs::rename(&backup, dir.join("spool")).unwrap();
    let agent = Agent::start(&dir, &cfg("20ms", 150));
    wait_for("20 records made offline", Duration::from_secs(60), || {
        (agent.status()?["spool"]["pending"].as_u64()? >= 20).then_some(())
    });
    let coord = Coordinator::start(&cdir, port);
    let s = drained(&agent, Duration::from_secs(120));
    let last = next_seq(&s) - 1;
    assert!(last > n2, "{s}");
    let set_aside = s["spool"]["set_aside"].as_u64().unwrap();
    assert!(
        (20..=n2 - n1).contains(&set_aside),
        "the colliding records are set aside: {s}"
    );
    assert_eq!(s["coordinator"]["refusals_final"], set_aside, "{s}");
    assert_eq!(
        stored_seqs(&coord.db(), &node),
        (1..=last).collect::<Vec<_>>(),
        "everything after the collision was delivered"
    );
    assert_eq!(
        stored_digests(&coord.db(), &node, n1 + 1..=n2),
        before,
        "what the coordinator stored was never replaced"
    );
    let reasons = std::fs::read_to_string(dir.join("spool/refused.txt")).unwrap();
    assert_eq!(reasons.lines().count() as u64, set_aside);
    assert!(
        reasons.lines().all(|l| l.contains("REFUSAL_KIND_CONFLICT")),
        "{reasons}"
    );
}

#[test]
fn a_wiped_spool_with_the_key_kept_continues_after_the_coordinators_last_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let link = coord.link_toml();
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &toml(&link, "5ms", 50, ""));
    let s1 = drained(&agent, Duration::from_secs(60));
    let node = node_id(&s1);
    let n1 = next_seq(&s1) - 1;
    assert!(agent.proc.terminate().success());
    // The spool goes, the key stays; the coordinator is down while the
    // agent numbers its first records afresh (from 1).
    coord.proc.kill9();
    std::fs::remove_dir_all(dir.join("spool")).unwrap();
    let agent = Agent::start(&dir, &toml(&link, "20ms", 100, ""));
    let early = wait_for("records made offline", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["spool"]["pending"].as_u64()? >= 10).then_some(s)
    });
    assert_eq!(early["spool"]["anchored"], false, "{early}");
    let coord = Coordinator::start(&cdir, port);
    let s = drained(&agent, Duration::from_secs(60));
    assert_eq!(node_id(&s), node);
    let last = next_seq(&s) - 1;
    assert!(last >= n1 + 100, "continued after {n1}: {s}");
    assert_eq!(
        stored_seqs(&coord.db(), &node),
        (1..=last).collect::<Vec<_>>(),
        "no gap, no collision"
    );
    assert_eq!(
        s["coordinator"]["refusals"], 0,
        "nothing refused as a duplicate"
    );
    assert_eq!(s["spool"]["set_aside"], 0);
    let log = agent.proc.log_text();
    assert!(log.contains("renumbered"), "{log}");
}

#[test]
fn a_flipped_byte_in_a_spooled_frame_costs_that_record_only_and_the_gap_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let link = coord.link_toml();
    coord.proc.kill9();
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &toml(&link, "2ms", 100, ""));
    all_spooled(&agent, 100);
    assert!(agent.proc.terminate().success());
    flip_payload_byte(&dir.join("spool"), 50);

    let coord = Coordinator::start(&cdir, port);
    let agent = Agent::start(&dir, &toml(&link, "2ms", 10, ""));
    let s = drained(&agent, Duration::from_secs(60));
    assert_eq!(s["spool"]["corrupt"], 1, "{s}");
    let last = next_seq(&s) - 1;
    assert!(last > 100);
    let expected: Vec<u64> = (1..=last).filter(|q| *q != 50).collect();
    assert_eq!(
        stored_seqs(&coord.db(), &node_id(&s)),
        expected,
        "every record but the damaged one, and seq 50 never reused"
    );
    let nodes = nodes_json(&coord);
    assert_eq!(
        nodes[0]["missing"],
        serde_json::json!([[50, 50]]),
        "{nodes}"
    );
    assert!(metrics(&s).contains("warden_spool_corrupt_total 1\n"));
    let log = agent.proc.log_text();
    assert!(log.contains("damaged spool frame skipped"), "{log}");
}

#[test]
fn a_byte_flipped_while_the_agent_runs_does_not_stop_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let link = coord.link_toml();
    coord.proc.kill9();
    let dir = tmp.path().join("agent");
    let agent = Agent::start(&dir, &toml(&link, "2ms", 100, ""));
    all_spooled(&agent, 100);
    flip_payload_byte(&dir.join("spool"), 50);
    let coord = Coordinator::start(&cdir, port);
    let s = wait_for("the rest delivered", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["spool"]["pending"] == 0).then_some(s)
    });
    assert_eq!(s["spool"]["corrupt"], 1, "{s}");
    let last = next_seq(&s) - 1;
    let expected: Vec<u64> = (1..=last).filter(|q| *q != 50).collect();
    assert_eq!(stored_seqs(&coord.db(), &node_id(&s)), expected);
    assert_eq!(
        nodes_json(&coord)[0]["missing"],
        serde_json::json!([[50, 50]])
    );
    let log = agent.proc.log_text();
    assert!(
        log.contains("seq=50") && log.contains("damaged on disk"),
        "{log}"
    );
}

#[test]
fn an_acked_watermark_beyond_the_spool_is_ignored_and_nothing_pending_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let link = coord.link_toml();
    coord.proc.kill9();
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &toml(&link, "5ms", 30, ""));
    let s1 = all_spooled(&agent, 30);
    let pending = s1["spool"]["pending"].as_u64().unwrap();
    assert!(agent.proc.terminate().success());
    std::fs::write(dir.join("spool/acked"), "999999999\n").unwrap();

    let coord = Coordinator::start(&cdir, port);
    let agent = Agent::start(&dir, &toml(&link, "5ms", 5, ""));
    let s = drained(&agent, Duration::from_secs(60));
    let last = next_seq(&s) - 1;
    assert!(
        last >= pending + 5 && last < 1000,
        "the next seq jumped: {s}"
    );
    assert_eq!(
        stored_seqs(&coord.db(), &node_id(&s)),
        (1..=last).collect::<Vec<_>>(),
        "every pending record was delivered"
    );
    let log = agent.proc.log_text();
    assert!(
        log.contains("999999999") && log.contains("ignored"),
        "{log}"
    );
}

/// Two agents with their own state directories but one `spool.dir` would
/// give the same seqs to different records: the second is refused, naming
/// the holder (the same state directory is tests/localstate.rs's case).
#[test]
fn a_second_agent_on_the_same_spool_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("shared-spool");
    let extra = format!(
        "[telemetry]\ninterval = \"1h\"\n[spool]\ndir = \"{}\"\n",
        spool.display()
    );
    let agent = Agent::start(&tmp.path().join("a"), &extra);
    let config = tmp.path().join("b.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[status]\nsocket = \"{}\"\n[metrics]\nlisten = \"\"\n{extra}",
            tmp.path().join("b").display(),
            tmp.path().join("b.sock").display()
        ),
    )
    .unwrap();
    let mut second = Proc::spawn(
        &["agent", "--config", config.to_str().unwrap()],
        tmp.path().join("second.log"),
    );
    let status = wait_for("the second agent to exit", Duration::from_secs(30), || {
        second.child.try_wait().unwrap()
    });
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains(&spool.display().to_string()) && log.contains("held by pid"),
        "{log}"
    );
    assert!(agent.status().is_some(), "the first agent runs on");
}

/// Head seq of the one lease chain in the agent's chains.json.
fn chain_head(agent_dir: &Path) -> Option<u64> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(agent_dir.join("chains.json")).ok()?).ok()?;
    v.as_object()?.values().next()?["head_seq"].as_u64()
}

fn lease(coord: &Coordinator, args: &[&str]) -> std::process::Output {
    std::process::Command::new(WARDEN)
        .args(["lease", "--socket", coord.admin_socket().to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn lease_info(coord: &Coordinator, id: &str) -> Option<Value> {
    let out = lease(coord, &["list", "--json"]);
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()?
        .as_array()?
        .iter()
        .find(|l| l["lease_id"] == id)
        .cloned()
}

#[test]
fn a_small_spool_through_an_outage_keeps_every_attestation_and_sheds_telemetry() {
    let tmp = tempfile::tempdir().unwrap();
    let dev_dir = tmp.path().join("dev");
    std::fs::create_dir_all(&dev_dir).unwrap();
    std::fs::write(dev_dir.join("nvidia0"), b"").unwrap();
    let state = tmp.path().join("gpus.json");
    write_fake_state(&state, &[fake_gpu(0)]);
    let port = free_port();
    let cdir = tmp.path().join("coord");
    let mut coord = Coordinator::start(&cdir, port);
    let dir = tmp.path().join("agent");
    // A 64 KiB spool and a telemetry sample every 2 ms: full within seconds of an outage.
    let agent = Agent::start_env(
        &dir,
        &format!(
            "{}\n[spool]\nmax_bytes = 65536\nsegment_bytes = 65536\n\
             [gpu]\nnvml_library = \"{}\"\nsample_interval = \"100ms\"\n\
             [timelock]\nepoch = \"1s\"\nkill_grace = \"300ms\"\ndevice_patterns = [\"{}/nvidia*\"]\n",
            toml(&coord.link_toml(), "2ms", 0, ""),
            fake_nvml().display(),
            dev_dir.display()
        ),
        &[("FAKE_NVML_STATE", &state)],
    );
    let s = wait_for("agent connected", Duration::from_secs(30), || {
        agent.status().filter(|s| {
            s["coordinator"]["connected"] == true
                && s["gpus"].as_array().is_some_and(|g| g.len() == 1)
        })
    });
    let out = lease(&coord, &["start", &node_id(&s), "--gpus", "all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    wait_for("two attestations stored", Duration::from_secs(30), || {
        (lease_info(&coord, &id)?["attestations"].as_u64()? >= 2).then_some(())
    });

    // The outage: six epochs and more while the spool is full.
    coord.proc.kill9();
    let head_at_kill = chain_head(&dir).unwrap();
    wait_for(
        "six epochs attested while shedding",
        Duration::from_secs(60),
        || {
            let s = agent.status()?;
            (chain_head(&dir)? >= head_at_kill + 6
                && s["spool"]["shedding"] == true
                && s["spool"]["shed"].as_u64()? > 0)
                .then_some(())
        },
    );
    let coord = Coordinator::start(&cdir, port);
    wait_for("reconnected", Duration::from_secs(30), || {
        (agent.status()?["coordinator"]["connected"] == true).then_some(())
    });
    let out = lease(&coord, &["end", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = wait_for("the verdict", Duration::from_secs(60), || {
        let i = lease_info(&coord, &id)?;
        (!i["verdict"].as_str().unwrap_or("").is_empty()).then_some(i)
    });
    assert!(
        info["chain_errors"].as_array().unwrap().is_empty(),
        "an attestation went missing: {info:#}"
    );
    assert!(
        info["attestations"].as_u64().unwrap() >= head_at_kill + 6,
        "{info:#}"
    );
    // Coverage depends on how promptly this (loaded) machine sampled, so the
    // verdict may only fail on it; a lost attestation would be a seq gap.
    let reasons = info["verdict_reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .all(|r| r.as_str().unwrap().starts_with("low-coverage")),
        "{info:#}"
    );
    // The whole chain, checked offline: complete, every link and seq in place.
    let bundle = tmp.path().join("bundle.json");
    let out = lease(&coord, &["export", &id, "-o", bundle.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(WARDEN)
        .arg("verify")
        .arg(&bundle)
        .arg("--coordinator-key")
        .arg(cdir.join("coordinator.pub"))
        .args(["--min-coverage", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = agent.status().unwrap();
    assert!(s["spool"]["shed"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["spool"]["refused"], 0, "no evidence refused: {s}");
    assert!(metrics(&s).contains("warden_spool_shed_total "));
    let log = agent.proc.log_text();
    assert!(log.contains("shedding telemetry"), "{log}");
}

/// A tmpfs mounted for one test, unmounted on drop (even when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros to `path` until the file system is full.
fn fill_disk(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 << 10];
    while f.write_all(&chunk).and_then(|_| f.sync_data()).is_ok() {}
    // What the last partial write left may still fit a page: fill the rest byte by byte.
    while f.write_all(&[0]).and_then(|_| f.sync_data()).is_ok() {}
}

#[test]
fn records_the_coordinator_cannot_store_now_are_sent_again_and_none_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    // The coordinator's database on a file system the test fills up.
    let disk = Tmpfs::mount(&tmp.path().join("disk"), "32m");
    let cdir = disk.0.join("coord");
    let coord = Coordinator::start(&cdir, free_port());
    let dir = tmp.path().join("agent");
    let agent = Agent::start(&dir, &toml(&coord.link_toml(), "5ms", 2000, ""));
    let s = wait_for("records stored", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["last_receipt_seq"].as_u64()? >= 50).then_some(s)
    });
    let node = node_id(&s);
    let filler = disk.0.join("filler");
    fill_disk(&filler);
    let refused = wait_for("records refused for now", Duration::from_secs(60), || {
        let s = agent.status()?;
        (s["coordinator"]["retrying"].as_u64()? > 0).then_some(s)
    });
    assert_eq!(refused["coordinator"]["refusals_final"], 0, "{refused}");
    assert!(
        refused["coordinator"]["last_refusal"]
            .as_str()
            .unwrap()
            .contains("REFUSAL_KIND_RETRY_LATER"),
        "{refused}"
    );
    // Room again: the waiting records go on their next try.
    std::fs::remove_file(&filler).unwrap();
    let s = drained(&agent, Duration::from_secs(120));
    assert_eq!(s["coordinator"]["retrying"], 0, "{s}");
    assert_eq!(s["spool"]["set_aside"], 0, "{s}");
    let last = next_seq(&s) - 1;
    assert!(last >= 2000, "{s}");
    assert_eq!(
        stored_seqs(&coord.db(), &node),
        (1..=last).collect::<Vec<_>>(),
        "every record stored once"
    );
    let log = agent.proc.log_text();
    assert_eq!(
        log.matches("connected to coordinator").count(),
        1,
        "the stream stayed up: {log}"
    );
    // Said when records start waiting, not once per refusal.
    let said = log.matches("refused a record for now").count() as u64;
    let refusals = s["coordinator"]["refusals"].as_u64().unwrap();
    assert!(
        said >= 1 && said * 10 <= refusals.max(10),
        "{said} of {refusals}: {log}"
    );
    assert!(
        log.contains("every record refused for now has been sent again"),
        "{log}"
    );
}
