//! The fault suite: one place that breaks a running node every way the
//! outside audit did and asserts, for each fault, that no record is lost
//! or duplicated, that delivery resumes within a stated time, and that
//! where the operator must act the error says so and names what.
//!
//! Each scenario prints `FAULT <what>: …` lines with what it measured (the
//! figures in docs/security.md come from them); bounds are generous, since
//! CI is a loaded 2-core machine: timing reports, it never decides.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use warden_agent::delivery::spool::frame;

/// Delivery must resume within this after a fault ends.
const RESUME: Duration = Duration::from_secs(60);

fn stored(coord: &Coordinator) -> u64 {
    record_stats(&coord.db()).0
}

/// Waits for more than `before` records stored; how long it took.
fn resumed(coord: &Coordinator, before: u64, what: &str) -> Duration {
    let t = Instant::now();
    wait_for(what, RESUME, || (stored(coord) > before).then_some(()));
    t.elapsed()
}

/// The agent's spool empty and everything it numbered stored exactly once:
/// (records, lost, duplicated).
fn accounted(coord: &Coordinator, agent: &Agent) -> (u64, u64, u64) {
    let s = wait_for("spool drained", Duration::from_secs(180), || {
        let s = agent.status()?;
        (s["spool"]["pending"] == 0 && s["coordinator"]["connected"] == true).then_some(s)
    });
    let last = s["spool"]["next_seq"].as_u64().unwrap() - 1;
    let (n, distinct, min, max) = record_stats(&coord.db());
    let lost = last - distinct.min(last);
    let duplicated = n - distinct;
    assert_eq!((min, max), (1, last), "seqs 1..={last} stored");
    (last, lost, duplicated)
}

/// SIGKILL of either side, three times each, mid-stream.
#[test]
fn sigkills_of_either_side_lose_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut coord = Coordinator::start(&tmp.path().join("coord"), port);
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &fast_agent_toml(&coord.link_toml(), "5ms", 0));
    let config = agent.config.clone();
    let mut resumes = Vec::new();
    for round in 0..6 {
        wait_for("records flowing", RESUME, || {
            (stored(&coord) >= 200 * (round + 1)).then_some(())
        });
        if round % 2 == 0 {
            coord.proc.kill9();
            std::thread::sleep(Duration::from_millis(300));
            let before = stored(&coord);
            coord = Coordinator::start(&coord.dir, port);
            resumes.push((
                "coordinator",
                resumed(&coord, before, "after a coordinator restart"),
            ));
        } else {
            agent.proc.kill9();
            let before = stored(&coord);
            agent = Agent::start_with(&dir, &config);
            resumes.push(("agent", resumed(&coord, before, "after an agent restart")));
        }
    }
    // Stop producing, so that everything numbered can be accounted for.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("interval = \"5ms\"", "interval = \"1h\""),
    )
    .unwrap();
    agent.proc.kill9();
    agent = Agent::start_with(&dir, &config);
    let (records, lost, duplicated) = accounted(&coord, &agent);
    for (side, t) in &resumes {
        eprintln!(
            "FAULT sigkill {side}: delivery resumed {} ms after the restart",
            t.as_millis()
        );
    }
    eprintln!("FAULT sigkill: {records} records, {lost} lost, {duplicated} duplicated");
    assert_eq!((lost, duplicated), (0, 0));
}

/// Docker goes away for a while during a lease: records keep flowing, the
/// lease is adopted again when Docker is back.
#[test]
fn docker_going_away_does_not_stop_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("docker.sock");
    let proxy = DockerProxy::start(&sock);
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &format!(
            "{}\n[workload]\ndocker_socket = \"{}\"\nstop_grace = \"1s\"\n",
            fast_agent_toml(&coord.link_toml(), "20ms", 0),
            sock.display()
        ),
    );
    let s = wait_for("connected", Duration::from_secs(30), || {
        agent
            .status()
            .filter(|s| s["coordinator"]["connected"] == true)
    });
    let node = s["node_id"].as_str().unwrap().to_owned();
    let image = image::busybox_image();
    let admin = coord.admin_socket();
    let lease = |args: &[&str]| {
        Command::new(WARDEN)
            .args(["lease", "--socket", admin.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = lease(&["start", &node, "--image", &image, "--", "sleep", "300"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let _clean = ContainersOf(node.clone());

    proxy.cut();
    let before = stored(&coord);
    let during = resumed(&coord, before + 20, "records while Docker is away");
    let t = Instant::now();
    let _back = DockerProxy::start(&sock);
    wait_for("the lease adopted again", RESUME, || {
        let s = agent.status()?;
        (s["leases"][0]["id"] == id.as_str()
            && std::fs::read_to_string(agent.proc.log.clone())
                .ok()?
                .contains("adopted a lease container"))
        .then_some(())
    });
    let adopted = t.elapsed();
    let out = lease(&["end", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("interval = \"20ms\"", "interval = \"1h\""),
    )
    .unwrap();
    let mut agent = agent;
    agent.proc.kill9();
    let agent = Agent::start_with(&agent.dir.clone(), &agent.config.clone());
    let (records, lost, duplicated) = accounted(&coord, &agent);
    eprintln!(
        "FAULT docker away: 20 records stored {} ms into the outage; lease adopted {} ms after Docker came back; {records} records, {lost} lost, {duplicated} duplicated",
        during.as_millis(),
        adopted.as_millis()
    );
    assert_eq!((lost, duplicated), (0, 0));
}

/// A long outage with a small spool: telemetry is shed, nothing else is
/// lost, nothing duplicated, and delivery resumes.
#[test]
fn a_full_spool_through_an_outage_loses_no_evidence() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut coord = Coordinator::start(&tmp.path().join("coord"), port);
    let dir = tmp.path().join("agent");
    let agent = Agent::start(
        &dir,
        &format!(
            "{}\n[spool]\nmax_bytes = 65536\nsegment_bytes = 65536\n",
            fast_agent_toml(&coord.link_toml(), "2ms", 0)
        ),
    );
    wait_for("records flowing", RESUME, || {
        (stored(&coord) >= 50).then_some(())
    });
    coord.proc.kill9();
    wait_for("the spool full and shedding", RESUME, || {
        (agent.status()?["spool"]["shed"].as_u64()? > 200).then_some(())
    });
    let before = stored(&coord);
    coord = Coordinator::start(&coord.dir, port);
    let resume = resumed(&coord, before, "after the outage");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("interval = \"2ms\"", "interval = \"1h\""),
    )
    .unwrap();
    let mut agent = agent;
    agent.proc.kill9();
    let agent = Agent::start_with(&dir, &agent.config.clone());
    let s = wait_for("spool drained", Duration::from_secs(180), || {
        let s = agent.status()?;
        (s["spool"]["pending"] == 0 && s["coordinator"]["connected"] == true).then_some(s)
    });
    let last = s["spool"]["next_seq"].as_u64().unwrap() - 1;
    let (n, distinct, _, max) = record_stats(&coord.db());
    // Telemetry evicted for room leaves named gaps; everything else arrived.
    let gaps: u64 = nodes_json(&coord)[0]["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_u64().unwrap() - r[0].as_u64().unwrap() + 1)
        .sum();
    eprintln!(
        "FAULT full spool: delivery resumed {} ms after the coordinator came back; {last} numbered, {distinct} stored, {gaps} telemetry samples evicted (named gaps), {} duplicated",
        resume.as_millis(),
        n - distinct
    );
    assert_eq!(n, distinct, "no duplicate");
    assert_eq!(max, last);
    assert_eq!(distinct + gaps, last, "every seq is stored or a named gap");
}

/// Each state file damaged while the process is down: it recovers and
/// delivers, or it refuses to start with an error naming the file.
#[test]
fn each_damaged_state_file_recovers_or_names_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut coord = Coordinator::start(&tmp.path().join("coord"), port);
    let dir = tmp.path().join("agent");
    let mut agent = Agent::start(&dir, &fast_agent_toml(&coord.link_toml(), "20ms", 0));
    let config = agent.config.clone();
    wait_for("records flowing", RESUME, || {
        (stored(&coord) >= 30).then_some(())
    });

    // Files an agent recovers from (with a warning): what is written over
    // them (none: a byte flipped in the newest spool segment), and what the
    // agent says.
    let recovers: [(&str, Option<&[u8]>, &str); 4] = [
        ("book.json", Some(b"{not json"), "not valid JSON"),
        ("chains.json", Some(b"[["), "chains.json"),
        ("spool/acked", Some(b"999999999\n"), "999999999"),
        ("spool segment", None, "damaged"),
    ];
    // The highest seq on disk when the segment was damaged (read after the
    // kill, so nothing is numbered after it): gaps above it are seqs never
    // given out (skipped for safety), not lost records.
    let mut written_at_flip = 0;
    for (file, garbage, says) in recovers {
        agent.proc.kill9();
        if garbage.is_none() {
            written_at_flip = highest_seq_on_disk(&dir.join("spool"));
        }
        let path = match garbage {
            Some(bytes) => {
                let p = dir.join(file);
                std::fs::write(&p, bytes).unwrap();
                p
            }
            None => flip_a_byte_in_the_newest_frames(&dir.join("spool")),
        };
        let before = stored(&coord);
        agent = Agent::start_with(&dir, &config);
        let t = resumed(&coord, before, "delivery after a damaged file");
        // Said when the part that owns the file loads it, which may come
        // after delivery resumed.
        let said = Instant::now() + Duration::from_secs(30);
        while !agent.proc.log_text().contains(says) && Instant::now() < said {
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = agent.proc.log_text();
        assert!(log.contains(says), "{file}: {}\n{log}", path.display());
        eprintln!(
            "FAULT damaged {file}: agent recovered, delivery resumed in {} ms",
            t.as_millis()
        );
    }

    // Files the operator must act on: the process refuses, naming the file.
    for (file, says) in [("node.key", "node.key"), ("mesh.key", "mesh.key")] {
        agent.proc.kill9();
        let path = dir.join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, b"\x30\x05garbage").unwrap();
        let mut p = Proc::spawn(
            &["agent", "--config", config.to_str().unwrap()],
            tmp.path().join(format!("{file}.log")),
        );
        let status = p.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{file}: started on a damaged key");
        let log = p.log_text();
        assert!(
            log.contains(says) && log.contains(path.to_str().unwrap()),
            "{file}: {log}"
        );
        eprintln!(
            "FAULT damaged {file}: the agent refuses to start: {}",
            first_error(&log)
        );
        std::fs::write(&path, good).unwrap();
        agent = Agent::start_with(&dir, &config);
    }
    for (file, says) in [
        ("coordinator.db", "coordinator.db"),
        ("coordinator.key", "coordinator.key"),
    ] {
        coord.proc.kill9();
        let path = coord.dir.join(file);
        let good = std::fs::read(&path).unwrap();
        // The database's committed tail lives in its WAL: kept aside with
        // it, as the error tells the operator to do, and restored with it.
        let sides: Vec<(PathBuf, Vec<u8>)> = ["-wal", "-shm"]
            .iter()
            .map(|side| coord.dir.join(format!("{file}{side}")))
            .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
            .collect();
        let mut bad = good.clone();
        bad.truncate(bad.len().min(200));
        bad.iter_mut().skip(16).take(64).for_each(|b| *b ^= 0xa5);
        std::fs::write(&path, &bad).unwrap();
        for (p, _) in &sides {
            std::fs::remove_file(p).unwrap();
        }
        let mut p = Proc::spawn(
            &[
                "coordinator",
                "--dev",
                "--config",
                coord
                    .dir
                    .with_extension("coordinator.toml")
                    .to_str()
                    .unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ],
            tmp.path().join(format!("{file}.log")),
        );
        let status = p.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{file}: started on a damaged file");
        let log = p.log_text();
        assert!(log.contains(says), "{file}: {log}");
        eprintln!(
            "FAULT damaged {file}: the coordinator refuses to start: {}",
            first_error(&log)
        );
        std::fs::write(&path, good).unwrap();
        for (p, bytes) in sides {
            std::fs::write(p, bytes).unwrap();
        }
        coord = Coordinator::start(&coord.dir, port);
    }
    let before = stored(&coord);
    resumed(
        &coord,
        before,
        "delivery after the keys and database are restored",
    );

    // Two agents on one state directory: the second is refused, the first goes on.
    let mut second = Proc::spawn(
        &["agent", "--config", config.to_str().unwrap()],
        tmp.path().join("second.log"),
    );
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = second.log_text();
    assert!(log.contains("held by pid"), "{log}");
    eprintln!(
        "FAULT second agent on one state dir: refused: {}",
        first_error(&log)
    );
    let before = stored(&coord);
    resumed(&coord, before, "the first agent still delivering");

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("interval = \"20ms\"", "interval = \"1h\""),
    )
    .unwrap();
    agent.proc.kill9();
    let agent = Agent::start_with(&dir, &config);
    let s = wait_for("spool drained", Duration::from_secs(180), || {
        let s = agent.status()?;
        (s["spool"]["pending"] == 0 && s["coordinator"]["connected"] == true).then_some(s)
    });
    let last = s["spool"]["next_seq"].as_u64().unwrap() - 1;
    let (n, distinct, _, _) = record_stats(&coord.db());
    let ranges: Vec<(u64, u64)> = nodes_json(&coord)[0]["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    let gaps: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    // A record on disk at the flip and never stored was lost: one frame
    // holds one record, so at most the damaged frame's (none if it had been
    // delivered before the kill).
    let lost: u64 = ranges
        .iter()
        .map(|&(a, b)| (b.min(written_at_flip) + 1).saturating_sub(a))
        .sum();
    eprintln!(
        "FAULT damaged files: {last} numbered, {distinct} stored, {gaps} in named gaps ({lost} records in the damaged frame, the rest seqs skipped and never given out), {} duplicated",
        n - distinct
    );
    assert_eq!(n, distinct, "no duplicate");
    assert_eq!(distinct + gaps, last, "every seq is stored or a named gap");
    assert!(
        lost <= 1,
        "only the damaged frame's record is lost: {lost} (gaps {ranges:?}, highest seq on disk at the flip {written_at_flip})"
    );
}

/// The highest seq of a frame that verifies in the spool's segments.
fn highest_seq_on_disk(spool: &Path) -> u64 {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).unwrap();
            frame::scan(&bytes, 0).frames.last().map(|(_, f)| f.seq)
        })
        .max()
        .expect("a segment with a frame")
}

fn flip_a_byte_in_the_newest_frames(spool: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect();
    segs.sort();
    // The newest that holds a frame (a segment just rotated to is empty).
    let (seg, mut bytes) = segs
        .into_iter()
        .rev()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .find(|(_, b)| !frame::scan(b, 0).frames.is_empty())
        .expect("a segment with a frame");
    // Inside the first frame's payload: one record damaged, the rest intact.
    let at = frame::HEADER + 4;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, bytes).unwrap();
    seg
}

fn first_error(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("error") || l.contains("ERROR"))
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// Hundreds of idle connections held open against the coordinator: a new
/// agent still registers and delivers.
#[test]
fn an_idle_connection_flood_does_not_keep_an_agent_out() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let coord = Coordinator::start(&tmp.path().join("coord"), port);
    // From another loopback address than the agent's, at the per-address cap.
    let held: Vec<std::net::TcpStream> = (0..256)
        .filter_map(|_| connect_from("127.0.0.9", port))
        .collect();
    let t = Instant::now();
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&coord.link_toml(), "20ms", 0),
    );
    wait_for("records from the new agent", RESUME, || {
        (stored(&coord) >= 10).then_some(())
    });
    eprintln!(
        "FAULT idle flood: {} idle connections held; a new agent's first 10 records stored {} ms after it started",
        held.len(),
        t.elapsed().as_millis()
    );
    assert!(
        held.len() >= 200,
        "the flood was not opened: {}",
        held.len()
    );
    drop(agent);
}

/// A TCP connection to 127.0.0.1:`port` from `source` (std has no
/// bind-before-connect; a raw socket does it).
fn connect_from(source: &str, port: u16) -> Option<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let src: std::net::Ipv4Addr = source.parse().ok()?;
    // SAFETY: plain socket calls on a descriptor this function owns until
    // it hands it to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as u16;
        a.sin_addr.s_addr = u32::from(src).to_be();
        if libc::bind(
            fd,
            &a as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&a) as u32,
        ) != 0
        {
            libc::close(fd);
            return None;
        }
        a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        a.sin_port = port.to_be();
        if libc::connect(
            fd,
            &a as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&a) as u32,
        ) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(std::net::TcpStream::from_raw_fd(fd))
    }
}
