//! Proof of Time-Lock end to end: real processes opening the test's own
//! GPU device node, the agent's enforcement, the signed chain at the
//! coordinator, the proof and verdict, the exported bundle verified offline.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// The coordinator's lease settings for these tests: challenges often,
/// and coverage judged at 0.5. On a loaded 2-core CI machine the agent's
/// 100 ms sampling ticks run late and are skipped, which costs coverage
/// (0.83-0.91 seen in a full run); nothing these tests prove depends on it.
const LEASES: &str =
    "[leases]\nchallenge_interval = \"700ms\"\nchallenge_deadline = \"5s\"\nmin_coverage = 0.5\n";

/// What `warden verify` is given unless a test says otherwise (see `LEASES`).
const MIN_COVERAGE: &str = "0.5";

/// A coordinator challenging often, an agent with one fake GPU (minor 0)
/// whose device node is `dev/nvidia0` under the test's directory.
struct Rig {
    coord: Coordinator,
    agent: Agent,
    node_id: String,
    dev: PathBuf,
    tmp: PathBuf,
}

fn rig(tmp: &Path) -> Rig {
    rig_with(tmp, "")
}

/// The scan-only time-lock (no open guard), as on a kernel without fanotify
/// permission events: foreign holders are found and ended.
const SCAN_ONLY: &str = "prevent = false\n";

/// `timelock` is added to the agent's `[timelock]` section.
fn rig_with(tmp: &Path, timelock: &str) -> Rig {
    rig_under(tmp, timelock, &[])
}

/// As `rig_with`, the agent started through `wrapper` (`Agent::start_under`).
fn rig_under(tmp: &Path, timelock: &str, wrapper: &[&str]) -> Rig {
    let dev_dir = tmp.join("dev");
    std::fs::create_dir_all(&dev_dir).unwrap();
    let dev = dev_dir.join("nvidia0");
    std::fs::write(&dev, b"").unwrap();
    let state = tmp.join("gpus.json");
    write_fake_state(&state, &[fake_gpu(0)]);
    let coord = Coordinator::start_with(&tmp.join("coord"), free_port(), LEASES);
    let agent_dir = tmp.join("agent");
    let config = Agent::write_config(
        &agent_dir,
        &format!(
            "{}\n[gpu]\nnvml_library = \"{}\"\nsample_interval = \"100ms\"\n\
             [timelock]\nepoch = \"1s\"\nkill_grace = \"300ms\"\ndevice_patterns = [\"{}/nvidia*\"]\n{timelock}",
            fast_agent_toml(&coord.link_toml(), "1h", 0),
            fake_nvml().display(),
            dev_dir.display()
        ),
    );
    let agent = Agent::start_under(wrapper, &agent_dir, &config, &[("FAKE_NVML_STATE", &state)]);
    let s = wait_for("agent connected", Duration::from_secs(30), || {
        agent.status().filter(|s| {
            s["coordinator"]["connected"] == true
                && s["gpus"].as_array().is_some_and(|g| g.len() == 1)
        })
    });
    Rig {
        node_id: s["node_id"].as_str().unwrap().to_owned(),
        coord,
        agent,
        dev,
        tmp: tmp.to_owned(),
    }
}

impl Rig {
    fn lease(&self, args: &[&str]) -> Output {
        Command::new(WARDEN)
            .args([
                "lease",
                "--socket",
                self.coord.admin_socket().to_str().unwrap(),
            ])
            .args(args)
            .output()
            .unwrap()
    }

    fn start(&self) -> String {
        let out = self.lease(&["start", &self.node_id, "--gpus", "all"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn info(&self, id: &str) -> Value {
        let out = self.lease(&["list", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["lease_id"] == id)
            .cloned()
            .unwrap()
    }

    fn end(&self, id: &str) {
        let out = self.lease(&["end", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits for the coordinator's verdict, exports the bundle, returns its path.
    fn export(&self, id: &str) -> (Value, PathBuf) {
        let info = wait_for("the verdict", Duration::from_secs(30), || {
            let i = self.info(id);
            (!i["verdict"].as_str().unwrap_or("").is_empty()).then_some(i)
        });
        let path = self.tmp.join(format!("{id}.json"));
        let out = self.lease(&["export", id, "-o", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (info, path)
    }

    /// What `warden status` says of the open guard, once the time-lock has
    /// said it.
    fn guard_status(&self) -> String {
        wait_for("the guard's status", Duration::from_secs(30), || {
            let g = self.agent.status()?["guard"].as_str()?.to_owned();
            (!g.is_empty()).then_some(g)
        })
    }

    /// A few epochs, so that challenges come; then one more epoch signed
    /// after the first challenge, so that it is answered.
    fn answered_epochs(&self, id: &str) {
        let signed = wait_for(
            "attestations and a challenge",
            Duration::from_secs(30),
            || {
                let i = self.info(id);
                let n = i["attestations"].as_u64()?;
                (n >= 3 && i["challenges_sent"].as_u64()? >= 1).then_some(n)
            },
        );
        wait_for(
            "an epoch after the challenge",
            Duration::from_secs(30),
            || (self.info(id)["attestations"].as_u64()? > signed).then_some(()),
        );
    }

    /// A host process that opens the GPU's device node and ignores SIGTERM.
    fn squatter(&self) -> Child {
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "exec 3<{}; trap '' TERM; while :; do sleep 0.05; done",
                    self.dev.display()
                ),
            ])
            .spawn()
            .unwrap()
    }
}

/// `warden verify` pinning the coordinator's key from the file it writes
/// beside its signing key (what an operator hands verifiers).
fn run_verify(r: &Rig, path: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(WARDEN);
    cmd.arg("verify")
        .arg(path)
        .arg("--coordinator-key")
        .arg(r.coord.dir.join("coordinator.pub"))
        .args(extra);
    if !extra.contains(&"--min-coverage") {
        cmd.args(["--min-coverage", MIN_COVERAGE]);
    }
    cmd.output().unwrap()
}

/// (holds, what it printed).
fn verify(r: &Rig, path: &Path, extra: &[&str]) -> (bool, String) {
    let out = run_verify(r, path, extra);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_foreign_process_is_killed_during_a_lease_and_the_kill_is_in_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig_with(tmp.path(), SCAN_ONLY);

    // Outside a lease the same process is left alone.
    let mut before = r.squatter();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(&mut before), "killed outside a lease");
    kill(&mut before);

    let id = r.start();
    let mut squatter = r.squatter();
    wait_for("the squatter killed", Duration::from_secs(30), || {
        (!alive(&mut squatter)).then_some(())
    });
    // The agent logs the outcome once it has seen the exit, which may be
    // after the test has; the event is in the epoch from then on.
    let killed = format!("enforced pid={} ", squatter.id());
    wait_for("the kill logged", Duration::from_secs(30), || {
        let log = r.agent.proc.log_text();
        log.lines()
            .any(|l| l.contains(&killed) && l.contains("outcome=killed"))
            .then_some(())
    });
    assert!(
        r.agent
            .proc
            .log_text()
            .contains("foreign process on a leased GPU"),
        "logged before the kill began"
    );
    r.answered_epochs(&id);
    r.end(&id);

    let (info, bundle) = r.export(&id);
    assert_eq!(info["verdict"], "holds", "{info:#}");
    assert!(
        info["chain_errors"].as_array().unwrap().is_empty(),
        "{info:#}"
    );
    let (ok, out) = verify(&r, &bundle, &[]);
    assert!(ok, "{out}");
    // The shell ignored SIGTERM: it took the SIGKILL (outcome=killed, above).
    let kills: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("enforcement "))
        .and_then(|l| l.split(", ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        kills >= 1,
        "{out}\n{}",
        r.agent
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("enforced") || l.contains("foreign"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(out.contains("restarts    0 ("), "{out}");
    assert!(
        out.contains("prevention  0 opens denied at the open; 0 of "),
        "no window of a scan-only agent is guarded at the open: {out}"
    );
    let b: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    assert!(!b["challenges"].as_array().unwrap().is_empty());
    assert!(!b["verdict"].is_null());

    // The same evidence judged more strictly: the verifier says why it fails.
    let (_, out) = verify(&r, &bundle, &["--min-coverage", "1.01"]);
    assert!(out.contains("low-coverage"), "{out}");
}

/// `sh -c SCRIPT` to its end: what it printed.
fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_foreign_open_of_a_leased_gpu_is_denied_at_the_open_and_counted_in_the_proof() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig(tmp.path());
    let dev = r.dev.display().to_string();
    let try_open = format!("{{ :; }} 3<'{dev}' 2>/dev/null && echo opened || echo denied");
    assert_eq!(r.guard_status(), "on");

    // A holder from before the lease: there is no open left to deny; the
    // full scan made when the lease comes under the guard ends it.
    let mut early = r.squatter();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(&mut early), "killed outside a lease");
    assert_eq!(sh(&try_open).trim(), "opened", "denied outside a lease");
    let id = r.start();
    wait_for("the early holder ended", Duration::from_secs(30), || {
        (!alive(&mut early)).then_some(())
    });
    wait_for("the guard on the node", Duration::from_secs(30), || {
        (sh(&try_open).trim() == "denied").then_some(())
    });

    // A host process trying twenty times: each open denied, the process
    // itself left alone (it runs to its end).
    let out = sh(&format!(
        "i=0; while [ $i -lt 20 ]; do {try_open}; i=$((i+1)); done; echo finished"
    ));
    assert_eq!(out.matches("denied").count(), 20, "{out}");
    assert!(!out.contains("opened") && out.contains("finished"), "{out}");

    // A container of no lease with the node mounted in: denied too, and
    // recorded with its container id.
    let image = image::busybox_image();
    let name = format!("opener-{}", std::process::id());
    let _rm = image::Remove::containers(&[&name]);
    let out = Command::new("docker")
        .args([
            "run",
            "--name",
            &name,
            "-v",
            &format!("{dev}:{dev}"),
            &image,
        ])
        .args(["sh", "-c", &try_open])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "denied",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let container_denied = wait_for(
        "the container's open logged",
        Duration::from_secs(30),
        || {
            r.agent
                .proc
                .log_text()
                .lines()
                .find(|l| {
                    l.contains("open of a leased GPU denied")
                        && l.split("container=").nth(1).is_some_and(|c| c.len() >= 64)
                })
                .map(str::to_owned)
        },
    );
    assert!(container_denied.contains(&dev), "{container_denied}");

    r.answered_epochs(&id);
    r.end(&id);
    // The lease is over: the guard lets go of the node.
    wait_for("the node free again", Duration::from_secs(30), || {
        (sh(&try_open).trim() == "opened").then_some(())
    });

    let (info, bundle) = r.export(&id);
    assert_eq!(info["verdict"], "holds", "{info:#}");
    let (ok, out) = verify(&r, &bundle, &[]);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("prevention  "))
        .unwrap_or_else(|| panic!("{out}"));
    let denied: u64 = line.split(' ').next().unwrap().parse().unwrap();
    // At least the twenty, the container's, and the probes above.
    assert!(denied >= 22, "{out}");
    let guarded: u64 = line
        .split("; ")
        .nth(1)
        .and_then(|w| w.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(guarded >= 3, "{out}");
    let kills: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("enforcement "))
        .and_then(|l| l.split(", ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(kills >= 1, "the early holder: {out}");
    // What the windows list: the container's denial under its id, the
    // looping process as one entry with its attempts.
    let b: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    let prevented: Vec<_> = attestations_of(&b)
        .into_iter()
        .flat_map(|a| a.prevented)
        .collect();
    assert!(
        prevented
            .iter()
            .any(|p| p.container.len() == 64 && p.device == dev),
        "{prevented:?}"
    );
    assert!(prevented.iter().any(|p| p.attempts >= 20), "{prevented:?}");
}

#[test]
fn an_agent_that_cannot_use_fanotify_scans_instead_and_every_window_says_why() {
    // Root without CAP_SYS_ADMIN (as under a unit that leaves it out):
    // fanotify permission events are refused, the guard is off.
    let tmp = tempfile::tempdir().unwrap();
    let r = rig_under(
        tmp.path(),
        "",
        &["setpriv", "--bounding-set=-sys_admin", "--"],
    );
    wait_for("the agent's warning", Duration::from_secs(30), || {
        r.agent
            .proc
            .log_text()
            .contains("no open guard")
            .then_some(())
    });
    let guard = r.guard_status();
    assert!(
        guard.starts_with("off: fanotify permission events are unavailable"),
        "{guard}"
    );
    let id = r.start();
    let (bundle, windows) = scanned_lease(&r, &id);
    let (ok, out) = verify(&r, &bundle, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("prevention  0 opens denied at the open; 0 of "),
        "{out}"
    );
    // Each window says how it was guarded, and why not at the open.
    assert!(windows.len() >= 3);
    for a in &windows {
        assert_eq!(a.guard, "scan", "{a:?}");
        assert!(
            a.unguarded
                .starts_with("fanotify permission events are unavailable"),
            "{a:?}"
        );
    }
    let log = r.agent.proc.log_text();
    let warned = log
        .lines()
        .find(|l| l.contains("no open guard"))
        .unwrap()
        .to_owned();
    assert!(
        warned.contains("fanotify permission events are unavailable")
            && warned.contains("CAP_SYS_ADMIN"),
        "{warned}"
    );
}

#[test]
fn a_restarted_agent_continues_the_chain_and_the_gap_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = rig(tmp.path());
    let id = r.start();
    wait_for("two attestations", Duration::from_secs(30), || {
        (r.info(&id)["attestations"].as_u64()? >= 2).then_some(())
    });
    r.agent.proc.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let config = r.agent.config.clone();
    let state = r.tmp.join("gpus.json");
    r.agent = Agent::start_with_env(
        &r.tmp.join("agent"),
        &config,
        &[("FAKE_NVML_STATE", &state)],
    );
    // Long enough (1 s epochs) that the epoch lost to the restart is a
    // small part of the lease.
    wait_for(
        "attestations after the restart",
        Duration::from_secs(90),
        || (r.info(&id)["attestations"].as_u64()? >= 30).then_some(()),
    );
    r.end(&id);
    let (info, bundle) = r.export(&id);
    assert!(
        info["chain_errors"].as_array().unwrap().is_empty(),
        "{info:#}"
    );
    // It holds; the lost epoch shows as a restart and as coverage under 1.
    let (ok, out) = verify(&r, &bundle, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("restarts    1 ("), "{out}");
    assert_eq!(info["verdict"], "holds", "{info:#}");
    let coverage = info["coverage"].as_f64().unwrap();
    assert!(
        coverage < 0.99,
        "a 1.5 s outage must cost coverage: {coverage}"
    );
}

/// The coordinator is down for a few seconds mid-lease: the agent goes on
/// attesting into its spool, the records arrive late but well within the
/// lateness bound, are countersigned then, and the lease holds at the
/// default coverage. With a bound shorter than the outage, the same
/// evidence counts those windows as late.
#[test]
fn a_lease_holds_across_a_coordinator_outage_shorter_than_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = rig(tmp.path());
    let id = r.start();
    wait_for("two attestations", Duration::from_secs(30), || {
        (r.info(&id)["attestations"].as_u64()? >= 2).then_some(())
    });
    let port = r.coord.port;
    r.coord.proc.kill9();
    std::thread::sleep(Duration::from_secs(5));
    r.coord = Coordinator::start_with(&r.tmp.join("coord"), port, LEASES);
    let after = wait_for("the spooled attestations", Duration::from_secs(60), || {
        let n = r.info(&id)["attestations"].as_u64()?;
        (n >= 9).then_some(n)
    });
    wait_for("more after the outage", Duration::from_secs(30), || {
        (r.info(&id)["attestations"].as_u64()? >= after + 2).then_some(())
    });
    r.end(&id);
    let (info, bundle) = r.export(&id);
    assert_eq!(info["verdict"], "holds", "{info:#}");
    let (ok, report) = verify_json(&r, &bundle, &[]);
    assert!(ok, "{report:#}");
    let summary = &report["summary"];
    assert_eq!(summary["late"], 0, "{report:#}");
    assert_eq!(summary["restarts"], 0, "{report:#}");

    // Some windows did arrive seconds after they ended: the outage is in the receipts.
    let b: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    let delays = receipt_delays(&b);
    let worst = delays.iter().max().copied().unwrap_or(0);
    assert!(
        worst >= 3_000,
        "no window waited out the outage: {delays:?}"
    );
    // A verifier with a bound shorter than the outage counts them as late.
    let (_, strict) = verify_json(&r, &bundle, &["--max-delay-ms", "2000"]);
    assert!(
        strict["summary"]["late"].as_u64().unwrap() >= 1,
        "{strict:#}"
    );
    assert!(
        strict["summary"]["coverage"].as_f64().unwrap() < summary["coverage"].as_f64().unwrap(),
        "{strict:#}"
    );
}

/// `warden verify --json`: (holds, the report).
fn verify_json(r: &Rig, path: &Path, extra: &[&str]) -> (bool, Value) {
    let out = run_verify(r, path, &[&["--json"], extra].concat());
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

fn b64(v: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

/// The attestations among a bundle's records, decoded.
/// A lease whose GPU is not guarded at the open: a foreign holder is not
/// stopped there but found by the scan and ended; the lease is then ended
/// and exported, and its proof holds. The bundle and its windows.
fn scanned_lease(r: &Rig, id: &str) -> (PathBuf, Vec<warden_proto::pb::Attestation>) {
    let mut squatter = r.squatter();
    wait_for("the squatter killed", Duration::from_secs(30), || {
        (!alive(&mut squatter)).then_some(())
    });
    r.answered_epochs(id);
    r.end(id);
    let (info, bundle) = r.export(id);
    assert_eq!(info["verdict"], "holds", "{info:#}");
    let b: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    (bundle, attestations_of(&b))
}

fn attestations_of(b: &Value) -> Vec<warden_proto::pb::Attestation> {
    use prost::Message;
    use warden_proto::pb;
    b["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| {
            match pb::Record::decode(b64(&r["payload"]).as_slice())
                .unwrap()
                .body
            {
                Some(pb::record::Body::Attestation(a)) => Some(a),
                _ => None,
            }
        })
        .collect()
}

/// For each attestation of a bundle: how long after its window ended the
/// coordinator countersigned it.
fn receipt_delays(b: &Value) -> Vec<i64> {
    use prost::Message;
    use warden_proto::pb;
    let ends: std::collections::HashMap<u64, i64> = attestations_of(b)
        .into_iter()
        .map(|a| (a.lease_seq, a.window_end_unix_ms))
        .collect();
    // After the outage the spool's attestations come in together: one
    // Receipts acknowledges them, each entry a receipt.
    b["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let payload = b64(&r["payload"]);
            if r["payloadType"] == warden_proto::types::RECEIPTS {
                pb::Receipts::decode(payload.as_slice()).unwrap().receipts
            } else {
                vec![pb::Receipt::decode(payload.as_slice()).unwrap()]
            }
        })
        .filter_map(|rc| Some(rc.time_unix_ms - ends.get(&rc.lease_seq)?))
        .collect()
}

#[test]
fn a_container_not_of_the_lease_holding_a_leased_gpu_is_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig_with(tmp.path(), SCAN_ONLY);
    let image = image::busybox_image();
    let name = format!("squatter-{}", std::process::id());
    let _rm = image::Remove::containers(&[&name]);
    let dev = r.dev.display().to_string();
    let id = r.start();
    // Mounted at the same path, so the process inside holds a node the pattern matches.
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &name,
            "-v",
            &format!("{dev}:{dev}"),
            &image,
        ])
        .args(["sh", "-c", &format!("exec 3<{dev}; sleep 300")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the container stopped", Duration::from_secs(30), || {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", &name])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).trim() == "false").then_some(())
    });
    assert!(r
        .agent
        .proc
        .log_text()
        .contains("foreign container on a leased GPU"));
    // Docker's stop returns after the container is seen stopped: wait for
    // the agent to log the outcome, so the event is in the epoch before the end.
    wait_for("the stop logged", Duration::from_secs(30), || {
        r.agent
            .proc
            .log_text()
            .lines()
            .any(|l| {
                l.contains("enforced") && l.contains("action=stop") && l.contains("outcome=stopped")
            })
            .then_some(())
    });
    r.end(&id);
    let (_, bundle) = r.export(&id);
    let (_, out) = verify(&r, &bundle, &["--min-coverage", "0"]);
    assert!(out.contains("1 containers stopped"), "{out}");
}

#[test]
fn a_process_nvml_reports_on_a_leased_gpu_is_killed_too() {
    // No descriptor on the device node: only NVML's process list names it.
    let tmp = tempfile::tempdir().unwrap();
    let r = rig(tmp.path());
    let id = r.start();
    let mut quiet = Command::new("sleep").arg("300").spawn().unwrap();
    let mut gpu = fake_gpu(0);
    gpu["processes"] = serde_json::json!([{"pid": quiet.id(), "used_memory_mib": 100}]);
    write_fake_state(&r.tmp.join("gpus.json"), &[gpu]);
    wait_for(
        "the NVML-listed process ended",
        Duration::from_secs(30),
        || (!alive(&mut quiet)).then_some(()),
    );
    // Logged once the agent has seen the exit: possibly after the test did.
    let enforced = format!("enforced pid={} ", quiet.id());
    wait_for("the kill logged", Duration::from_secs(30), || {
        r.agent.proc.log_text().contains(&enforced).then_some(())
    });
    r.end(&id);
}

/// A GPU node is a character device. Where the kernel delivers no
/// fanotify permission events for those (Linux 6.18, this test machine),
/// the guard must not claim the GPU: it says why, and the lease is scanned
/// every cycle, so a foreign holder is ended and the proof holds; where the
/// kernel does deliver them, the open is denied.
#[test]
fn a_gpu_node_without_permission_events_is_scanned_and_every_window_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig(tmp.path());
    std::fs::remove_file(&r.dev).unwrap();
    run(&["mknod", r.dev.to_str().unwrap(), "c", "1", "3"]);
    assert_eq!(r.guard_status(), "on");
    let id = r.start();
    let try_open = format!(
        "{{ :; }} 3<'{}' 2>/dev/null && echo opened || echo denied",
        r.dev.display()
    );
    // Denied at the open, or said not to be guardable.
    let delivered = wait_for(
        "the guard's verdict on the node",
        Duration::from_secs(30),
        || {
            if sh(&try_open).trim() == "denied" {
                return Some(true);
            }
            let log = r.agent.proc.log_text();
            log.contains("open guard: no permission events for this node")
                .then_some(false)
        },
    );
    if delivered {
        eprintln!("this kernel delivers permission events for character devices");
        assert_eq!(sh(&try_open).trim(), "denied");
        r.end(&id);
        return;
    }
    assert_eq!(sh(&try_open).trim(), "opened");
    let (_, windows) = scanned_lease(&r, &id);
    assert!(windows.len() >= 2);
    for a in windows.iter().filter(|a| !a.gpus.is_empty()) {
        assert_eq!(a.guard, "scan", "{a:?}");
        assert!(
            a.unguarded.contains("delivers no permission event")
                && a.unguarded.contains("a character device"),
            "{a:?}"
        );
    }
}
