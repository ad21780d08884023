//! Each lease's encrypted scratch volume, with the real agent, coordinator,
//! Docker and gocryptfs: what a container writes to /scratch is ciphertext
//! on the node's disk; when the lease ends the mount, its gocryptfs process
//! (with the key) and the ciphertext are gone, and a copy of the ciphertext
//! taken meanwhile cannot be opened. Another lease never reaches it, and a
//! volume left behind or killed with an agent is destroyed at the next start.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;
use warden_agent::workloads::scratch::{gocryptfs, Layout, FSTYPE};

use common::leases::{inspect, Node};

/// `required`: a host where the volume cannot be made fails these tests
/// instead of passing them with leases that have none.
fn node(tmp: &Path, extra: &str) -> Node {
    common::leases::node(tmp, "stop_grace = \"1s\"\nscratch = \"required\"", extra)
}

/// What only these tests ask of a node.
trait Scratch {
    fn layout(&self) -> Layout;
    fn start_note(&self, lease: &str) -> String;
}

impl Scratch for Node {
    fn layout(&self) -> Layout {
        Layout::new(&self.agent.dir)
    }

    /// What the renter is told of the lease as it started: `warden lease
    /// list`'s note (the node's answer, kept by the coordinator).
    fn start_note(&self, lease: &str) -> String {
        let out = self.warden(&["lease", "list", "--json"]);
        let leases: Value = serde_json::from_slice(&out.stdout).unwrap();
        leases
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["lease_id"] == lease)
            .and_then(|l| l["note"].as_str())
            .unwrap_or_default()
            .to_owned()
    }
}

/// Unmounts (lazily) every volume left under the test's directory when the
/// test ends, pass or fail, so no mount or gocryptfs outlives it.
struct Unmounts(PathBuf);

impl Drop for Unmounts {
    fn drop(&mut self) {
        let Ok(mounts) = gocryptfs::own_mounts() else {
            return;
        };
        for m in mounts.iter().filter(|m| m.mount_point.starts_with(&self.0)) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m.mount_point)
                .status();
        }
    }
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

/// `docker exec` in a lease's container, as `user`; its stdout, or panics.
fn exec(container: &str, user: &str, script: &str) -> String {
    let out = docker(&["exec", "-u", user, container, "sh", "-c", script]);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn proc_mounts() -> String {
    std::fs::read_to_string("/proc/mounts").unwrap()
}

/// Whether a process is gone (or exited, waiting for its reaper).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// gocryptfs run by the test itself on `cipher` with `password`: its
/// output. `stderr` is not a pipe where the mount succeeds: its daemon
/// would hold the pipe open for as long as it runs.
fn try_open(cipher: &Path, mountpoint: &Path, password: &str, stderr: Stdio) -> Output {
    std::fs::create_dir_all(mountpoint).unwrap();
    fed(
        Command::new("gocryptfs")
            .args(["-q", "-nosyslog", "-passfile", "/dev/stdin", "--"])
            .arg(cipher)
            .arg(mountpoint)
            .stdout(Stdio::null())
            .stderr(stderr),
        format!("{password}\n").as_bytes(),
    )
}

#[test]
fn what_a_lease_writes_is_ciphertext_on_disk_and_is_shredded_when_it_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    let n = node(tmp.path(), "");
    let _clean = ContainersOf(n.node_id.clone());
    let image = image::busybox_image();
    let marker = format!("renter-secret-{}", std::process::id());
    let id = n
        .start(&[
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            &format!(
                "mkdir /scratch/deep && echo {marker} > /scratch/deep/{marker}.txt && sleep 300"
            ),
        ])
        .unwrap();
    let name = format!("warden-{id}-main");
    let layout = n.layout();
    let (cipher, plain, source) = (layout.cipher(&id), layout.plain(&id), layout.source(&id));

    // The container sees the volume at /scratch, and its users other than
    // root may write to it (allow_other, mode 1777).
    wait_for("the marker written", Duration::from_secs(20), || {
        let out = docker(&["exec", &name, "cat", &format!("/scratch/deep/{marker}.txt")]);
        out.status.success().then_some(())
    });
    exec(
        &name,
        "65534",
        &format!("echo {marker} > /scratch/by-nobody"),
    );
    let c = inspect(&name).unwrap();
    let mounts = c["Mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0]["Destination"], "/scratch");
    assert_eq!(mounts[0]["Source"], source.to_str().unwrap());
    assert_eq!(mounts[0]["RW"], true);
    // The renter is told.
    let note = n.start_note(&id);
    assert!(
        note.contains("/scratch is an encrypted scratch volume"),
        "{note}"
    );

    // On the host: a gocryptfs mount, nosuid and nodev, over ciphertext
    // that holds neither the marker nor the file's name.
    let mounted = gocryptfs::own_mounts()
        .unwrap()
        .into_iter()
        .find(|m| m.mount_point == plain)
        .expect("the volume is mounted");
    assert_eq!(mounted.fstype, FSTYPE);
    assert!(
        mounted.options.contains("nosuid") && mounted.options.contains("nodev"),
        "{mounted:?}"
    );
    let on_disk = files(&cipher);
    assert!(on_disk.len() >= 4, "conf, diriv and two files: {on_disk:?}");
    for f in &on_disk {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "plaintext in {}",
            f.display()
        );
        assert!(
            !f.to_string_lossy().contains(&marker),
            "a plaintext name: {}",
            f.display()
        );
    }
    // Through the mount it reads back (the check above is not vacuous).
    assert_eq!(
        std::fs::read_to_string(source.join("deep").join(format!("{marker}.txt"))).unwrap(),
        format!("{marker}\n")
    );
    // The master key is in one process's memory: gocryptfs serving it.
    let pids = gocryptfs::holders(&cipher);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // A thief's copy of the disk, taken while the lease runs.
    let copy = tmp.path().join("stolen");
    let cp = Command::new("cp")
        .args(["-a"])
        .arg(&cipher)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());

    n.end(&id);

    // The mount, its process (the key), the ciphertext and the wrapped key
    // are gone; nothing on the host names the volume any more.
    assert!(
        !proc_mounts().contains(plain.to_str().unwrap()),
        "still in /proc/mounts"
    );
    assert!(
        pids.iter().all(|p| exited(*p)),
        "gocryptfs {pids:?} still runs"
    );
    assert!(gocryptfs::holders(&cipher).is_empty());
    assert!(
        !layout.dir(&id).exists(),
        "the volume's directory is removed"
    );
    let scratch_path = layout.dir(&id);
    for f in files(&n.agent.dir) {
        assert!(
            !f.starts_with(&scratch_path),
            "{} is left of the volume",
            f.display()
        );
        if f.file_name().is_some_and(|n| n == "book.json") {
            let book = std::fs::read_to_string(&f).unwrap();
            assert!(
                !book.contains(&id),
                "the book still names the lease: {book}"
            );
        }
    }
    // The stolen copy is a real volume whose key is wrapped under a
    // password that nobody has: it does not open.
    assert!(copy.join("gocryptfs.conf").is_file());
    let conf = std::fs::read_to_string(copy.join("gocryptfs.conf")).unwrap();
    assert!(conf.contains("EncryptedKey"), "{conf}");
    let wrong = "0".repeat(64);
    let out = try_open(&copy, &tmp.path().join("thief"), &wrong, Stdio::piped());
    assert_eq!(
        out.status.code(),
        Some(12),
        "gocryptfs's exit code for a wrong password: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Password incorrect"));
    assert!(!proc_mounts().contains(tmp.path().join("thief").to_str().unwrap()));
}

#[test]
fn another_lease_never_reaches_a_leases_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let n = node(
        tmp.path(),
        &format!("allowed_host_paths = [\"{}\"]\n", data.display()),
    );
    let _clean = ContainersOf(n.node_id.clone());
    let image = image::busybox_image();
    let marker = format!("tenant-a-{}", std::process::id());
    let a = n
        .start_sh(&image, &format!("echo {marker} > /scratch/a && sleep 300"))
        .unwrap();
    let (a_plain, a_source) = (n.layout().plain(&a), n.layout().source(&a));
    wait_for("A wrote", Duration::from_secs(20), || {
        std::fs::read_to_string(a_source.join("a")).ok()
    });
    // Within a lease the volume is shared: a container added later sees it.
    let out = n.warden(&[
        "lease", "run", &a, "--name", "side", "--image", &image, "--", "sleep", "300",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        exec(&format!("warden-{a}-side"), "65534", "cat /scratch/a").trim(),
        marker
    );
    let b = n.start(&["--image", &image, "--", "sleep", "300"]).unwrap();
    // B's /scratch is its own, empty volume.
    let listing = exec(
        &format!("warden-{b}-main"),
        "0",
        "ls -A /scratch; grep -r . /scratch || true",
    );
    assert!(listing.trim().is_empty(), "B sees: {listing}");

    // A spec naming A's volume as a host path is refused: it lies in the
    // agent's state directory, never mountable.
    let mount = |src: &Path, dst: &str| format!("{}:{dst}", src.display());
    for src in [a_plain.clone(), a_source, n.layout().cipher(&a)] {
        let err = n
            .start_mounting(&image, &mount(&src, "/x"))
            .expect_err("another lease's volume as a mount");
        assert!(err.contains("not allowed"), "{err}");
    }
    // Nor through a link planted in an allowed path.
    std::os::unix::fs::symlink(&a_plain, data.join("link")).unwrap();
    let err = n
        .start_mounting(&image, &mount(&data.join("link"), "/x"))
        .expect_err("a link to another lease's volume");
    assert!(err.contains("symbolic link"), "{err}");
    // Nor by mounting something else in the volume's place.
    let err = n
        .start_mounting(&image, &mount(&data, "/scratch"))
        .expect_err("a mount over /scratch");
    assert!(err.contains("encrypted scratch volume"), "{err}");
    n.end(&b);
    n.end(&a);
}

#[test]
fn volumes_left_behind_or_killed_with_the_agent_are_destroyed_at_its_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    let mut n = node(tmp.path(), "");
    let _clean = ContainersOf(n.node_id.clone());
    let image = image::busybox_image();
    let id = n
        .start_sh(&image, "echo x > /scratch/x && sleep 300")
        .unwrap();
    let layout = n.layout();
    wait_for("written", Duration::from_secs(20), || {
        std::fs::read_to_string(layout.source(&id).join("x")).ok()
    });
    // The agent dies and, as under systemd (its cgroup), gocryptfs with it:
    // the key is gone while the lease's container runs on.
    n.agent.proc.kill9();
    for pid in gocryptfs::holders(&layout.cipher(&id)) {
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    // And a volume of no lease at all, mounted, as a crash mid-end leaves it.
    let ghost = "ghost-lease";
    std::fs::create_dir_all(layout.cipher(ghost)).unwrap();
    std::fs::create_dir_all(layout.plain(ghost)).unwrap();
    let init = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo pw | gocryptfs -init -q -scryptn 10 -passfile /dev/stdin {c} && echo pw | gocryptfs -q -nosyslog -passfile /dev/stdin {c} {p}",
            c = layout.cipher(ghost).display(),
            p = layout.plain(ghost).display()
        ))
        .status()
        .unwrap();
    assert!(init.success());
    assert_eq!(gocryptfs::holders(&layout.cipher(ghost)).len(), 1);

    let config = n.agent.config.clone();
    n.agent = Agent::start_with(&tmp.path().join("agent"), &config);
    let gone = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !layout.dir(ghost).exists() && !layout.dir(&id).exists()
    });
    assert!(
        gone,
        "volumes left: {:?}\n{}",
        std::fs::read_dir(&layout.root)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
        n.agent.proc.log_text()
    );
    let mounts = proc_mounts();
    assert!(!mounts.contains(layout.root.to_str().unwrap()), "{mounts}");
    assert!(gocryptfs::holders(&layout.cipher(ghost)).is_empty());
    let log = wait_for("reported", Duration::from_secs(10), || {
        let log = n.agent.proc.log_text();
        (log.contains("scratch volume of no active lease")
            && log.contains("scratch volume is lost"))
        .then_some(log)
    });
    assert!(log.contains(ghost), "{log}");
    // The lease runs on, but a new container of it would find /scratch
    // unencrypted: refused.
    let out = n.warden(&[
        "lease", "run", &id, "--name", "side", "--image", &image, "--", "sleep", "300",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scratch volume was lost"), "{err}");
    n.end(&id);
}

/// `unshare --mount --propagation MODE` with the agent's bounding set
/// less `drop` (if any): a mount namespace of its own, as the systemd
/// unit's `ProtectSystem=` and the rest give it (slave: the host's mounts
/// reach it, its own never reach Docker's).
fn own_namespace<'a>(propagation: &'a str, drop: Option<&'a str>) -> Vec<&'a str> {
    let mut w = vec!["unshare", "--mount", "--propagation", propagation];
    if let Some(cap) = drop {
        w.extend(["setpriv", "--bounding-set", cap]);
    }
    w
}

/// The gocryptfs mounts in a process's mount namespace.
fn volumes_seen_by(pid: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    warden_agent::workloads::scratch::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.fstype == FSTYPE)
        .map(|m| m.mount_point)
        .collect()
}

#[test]
fn an_agent_in_a_mount_namespace_of_its_own_mounts_the_volume_where_docker_sees_it() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    // Private, not slave: not even propagation brings the volume back to
    // the agent, so all its work on it must happen in Docker's namespace.
    let n = common::leases::node_under(
        tmp.path(),
        &own_namespace("private", None),
        "stop_grace = \"1s\"\nscratch = \"required\"",
        "",
    );
    let _clean = ContainersOf(n.node_id.clone());
    let agent_pid = n.agent.proc.child.id();
    let image = image::busybox_image();
    let marker = format!("from-own-namespace-{}", std::process::id());
    let id = n
        .start_sh(&image, &format!("echo {marker} > /scratch/m && sleep 300"))
        .expect("required: the volume is made");
    let layout = n.layout();
    let source = layout.source(&id);
    wait_for(
        "the marker, through the host's mount",
        Duration::from_secs(20),
        || std::fs::read_to_string(source.join("m")).ok(),
    );
    // Mounted where Docker (and this test, in the host's namespace) sees
    // it, not in the agent's own.
    let plain = layout.plain(&id);
    assert!(volumes_seen_by(std::process::id()).contains(&plain));
    let dockerd = Command::new("pidof").arg("dockerd").output().unwrap();
    let dockerd: u32 = String::from_utf8_lossy(&dockerd.stdout)
        .split_whitespace()
        .next()
        .expect("dockerd runs")
        .parse()
        .unwrap();
    assert!(volumes_seen_by(dockerd).contains(&plain));
    assert!(
        !volumes_seen_by(agent_pid).contains(&plain),
        "the agent's namespace is private: the mount is not there"
    );
    assert!(holding(&layout.cipher(&id), marker.as_bytes()).is_empty());
    assert!(n.start_note(&id).contains("is an encrypted scratch volume"));
    let holders = gocryptfs::holders(&layout.cipher(&id));
    assert_eq!(holders.len(), 1, "{holders:?}");

    // The end unmounts it there too, the key's process exits, the
    // ciphertext goes.
    n.end(&id);
    assert!(!volumes_seen_by(dockerd).contains(&plain));
    assert!(holders.iter().all(|p| exited(*p)));
    assert!(!layout.dir(&id).exists());
}

#[test]
fn an_agent_that_cannot_enter_dockers_namespace_never_hands_a_container_the_bare_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    // setns into a mount namespace needs CAP_SYS_CHROOT besides SYS_ADMIN.
    let n = common::leases::node_under(
        tmp.path(),
        &own_namespace("slave", Some("-sys_chroot")),
        "stop_grace = \"1s\"",
        "",
    );
    let _clean = ContainersOf(n.node_id.clone());
    let image = image::busybox_image();
    let id = n
        .start(&["--image", &image, "--", "sleep", "300"])
        .expect("auto: the lease runs without the volume");
    let c = inspect(&format!("warden-{id}-main")).unwrap();
    assert!(
        c["Mounts"].as_array().is_none_or(|m| m.is_empty()),
        "the bare mount point was handed over: {}",
        c["Mounts"]
    );
    let note = n.start_note(&id);
    assert!(
        note.starts_with("no encrypted scratch volume: cannot enter the mount namespace of")
            && note.contains("setns"),
        "{note}"
    );
    assert!(!n.layout().dir(&id).exists());
    n.end(&id);
}

#[test]
fn a_volume_docker_does_not_see_is_refused_by_docker_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    // An agent that sees no dockerd (a PID namespace of its own) takes its
    // own namespace for Docker's; being private, the volume never reaches
    // Docker, and no check of the agent can tell. The bind source, made
    // inside the volume, does not exist where Docker looks: it refuses the
    // container instead of giving it the bare directory.
    let mut wrapper = own_namespace("private", None);
    // --kill-child: the agent (PID 1 there) ends with the unshare the test
    // kills, instead of living on as an orphan.
    wrapper.extend(["--pid", "--fork", "--kill-child", "--mount-proc"]);
    let n = common::leases::node_under(tmp.path(), &wrapper, "stop_grace = \"1s\"", "");
    let _clean = ContainersOf(n.node_id.clone());
    let image = image::busybox_image();
    let err = n
        .start_sh(&image, "echo plaintext > /scratch/x; sleep 300")
        .expect_err("the lease cannot start with a volume Docker does not see");
    assert!(err.contains("bind source path does not exist"), "{err}");
    let leftover = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=warden.node={}", n.node_id),
    ]);
    assert!(leftover.stdout.is_empty(), "a container was made");
    // The failed start took its volume with it.
    let dirs = std::fs::read_dir(n.layout().root)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(dirs, 0);
}

/// `warden doctor --json`'s scratch row.
fn doctor_scratch(cfg: &Path, path: Option<&str>) -> Value {
    let mut cmd = Command::new(WARDEN);
    cmd.args(["doctor", "--json", "--config", cfg.to_str().unwrap()]);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "scratch")
        .cloned()
        .unwrap_or_else(|| panic!("no scratch row: {report:#}"))
}

#[test]
fn doctor_makes_a_real_volume_and_says_when_it_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cfg = tmp.path().join("agent.toml");
    let write = |mode: &str| {
        std::fs::write(
            &cfg,
            format!(
                "state_dir = \"{}\"\n[workload]\nscratch = \"{mode}\"\n",
                state.display()
            ),
        )
        .unwrap()
    };
    write("auto");
    let row = doctor_scratch(&cfg, None);
    assert_eq!(row["verdict"], "pass", "{row}");
    assert!(
        row["value"]
            .as_str()
            .unwrap()
            .contains("found encrypted on disk"),
        "{row}"
    );
    // The probe's volume is gone again: nothing mounted, nothing left.
    assert!(!proc_mounts().contains(state.to_str().unwrap()));
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);

    // Without gocryptfs: a warning under auto, a failure under required.
    let row = doctor_scratch(&cfg, Some("/nonexistent"));
    assert_eq!(row["verdict"], "warn", "{row}");
    assert!(row["fix"]
        .as_str()
        .unwrap()
        .contains("apt-get install gocryptfs"));
    write("required");
    let row = doctor_scratch(&cfg, Some("/nonexistent"));
    assert_eq!(row["verdict"], "fail", "{row}");
    assert!(row["value"]
        .as_str()
        .unwrap()
        .contains("every lease is refused"));
    write("off");
    assert_eq!(doctor_scratch(&cfg, None)["verdict"], "skip");
}

#[test]
fn the_renter_who_asks_gets_the_key_and_nobody_else_can_open_it() {
    let tmp = tempfile::tempdir().unwrap();
    let _unmount = Unmounts(tmp.path().to_owned());
    let n = node(tmp.path(), "");
    let _clean = ContainersOf(n.node_id.clone());
    let image = image::busybox_image();
    let (key, public) = wg_keypair(tmp.path(), "renter.key");
    let marker = format!("renters-own-{}", std::process::id());
    let start = n.warden(&[
        "lease",
        "start",
        &n.node_id,
        "--scratch-key-to",
        &public,
        "--image",
        &image,
        "--",
        "sh",
        "-c",
        &format!("echo {marker} > /scratch/m && sleep 300"),
    ]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    let id = String::from_utf8_lossy(&start.stdout).trim().to_owned();
    assert!(n.start_note(&id).contains("sealed to the renter's"));
    let layout = n.layout();
    wait_for("written", Duration::from_secs(20), || {
        std::fs::read_to_string(layout.source(&id).join("m")).ok()
    });
    // The renter's copy of the ciphertext, taken while the lease runs.
    let copy = tmp.path().join("renters-copy");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(layout.cipher(&id))
        .arg(&copy)
        .status()
        .unwrap()
        .success());

    let scratch_key = |file: &Path| {
        n.warden(&[
            "lease",
            "scratch-key",
            &id,
            "--private-key",
            file.to_str().unwrap(),
        ])
    };
    let out = scratch_key(&key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let password = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(password.len(), 64, "{password}");
    // The same from the spec alone (docs/workloads.md), in Python.
    let list: Value =
        serde_json::from_slice(&n.warden(&["lease", "list", "--json"]).stdout).unwrap();
    let sealed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lease_id"] == id.as_str())
        .and_then(|l| l["sealed_scratch_key"].as_str())
        .unwrap()
        .to_owned();
    let py = run(&[
        "python3",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/py/open_sealed.py"
        ),
        key.to_str().unwrap(),
        &id,
        &sealed,
    ]);
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), password);

    // Another key opens nothing; the password is on no disk of the node or
    // the coordinator (the records hold it sealed).
    let (other, _) = wg_keypair(tmp.path(), "other.key");
    let out = scratch_key(&other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not open with this key"), "{err}");
    for dir in [&n.agent.dir, &tmp.path().join("coord")] {
        let found = holding(dir, password.as_bytes());
        assert!(found.is_empty(), "the password in {found:?}");
    }

    n.end(&id);
    // The node's copy is gone; the renter's key opens the renter's copy.
    assert!(!layout.dir(&id).exists());
    let mnt = tmp.path().join("renters-mount");
    let opened = try_open(&copy, &mnt, &password, Stdio::null());
    assert!(opened.status.success(), "the renter's key opens the copy");
    let read = std::fs::read_to_string(mnt.join("data/m"));
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(read.unwrap().trim(), marker);

    // A key that is not 32 bytes is refused before anything starts.
    let out = n.warden(&[
        "lease",
        "start",
        &n.node_id,
        "--scratch-key-to",
        "c2hvcnQ=",
        "--image",
        &image,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32 bytes, not 5"), "{err}");
}
