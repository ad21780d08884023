//! The main job a newcomer runs: `warden agent --dev`.

mod common;

use std::{path::Path, time::Duration};

use common::*;

#[test]
fn dev_mode_runs_both_halves_and_stops_cleanly_on_sigint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let gpus = tmp.path().join("gpus.json");
    write_fake_state(&gpus, &[fake_gpu(0)]);
    let lib = fake_nvml();
    let mut p = Proc::spawn_env(
        &[
            "agent",
            "--dev",
            "--state-dir",
            dir.to_str().unwrap(),
            "--nvml-lib",
            lib.to_str().unwrap(),
        ],
        tmp.path().join("dev.log"),
        &[("FAKE_NVML_STATE", &gpus)],
    );
    let sock = dir.join("agent/agent.sock");
    let s = wait_for(
        "agent connected and receipted",
        Duration::from_secs(30),
        || {
            let s = status(&sock)?;
            (s["coordinator"]["connected"] == true && s["last_receipt_seq"].as_u64()? >= 1)
                .then_some(s)
        },
    );
    assert!(s["coordinator"]["address"]
        .as_str()
        .unwrap()
        .starts_with("https://localhost:"));
    let out = std::process::Command::new(WARDEN)
        .args([
            "nodes",
            "--json",
            "--socket",
            dir.join("coordinator/admin.sock").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes[0]["node_id"], s["node_id"]);
    // --nvml-lib reached the agent: its one GPU is sampled and served on /metrics.
    let s = wait_for("a GPU sample", Duration::from_secs(30), || {
        status(&sock).filter(|s| s["gpus"].as_array().is_some_and(|g| g.len() == 1))
    });
    // The human form is printed from the same typed report.
    let out = std::process::Command::new(WARDEN)
        .args(["status", "--socket", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        format!("node        {}", s["node_id"].as_str().unwrap()),
        format!(
            "coordinator {} connected",
            s["coordinator"]["address"].as_str().unwrap()
        ),
        "gpus        1".to_owned(),
        format!("  0   {}", s["gpus"][0]["uuid"].as_str().unwrap()),
    ] {
        assert!(text.contains(&line), "{line:?} in:\n{text}");
    }
    let metrics = http_get(s["metrics_address"].as_str().unwrap(), "/metrics");
    assert!(
        metrics.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"0\""),
        "{metrics}"
    );

    // The banner's export line is all `warden` needs to find both sockets.
    let log = p.log_text();
    let export = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("export "))
        .unwrap_or_else(|| panic!("no export line in:\n{log}"))
        .to_owned();
    let env: Vec<(String, String)> = export
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let warden = |args: &[&str]| {
        std::process::Command::new(WARDEN)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    };
    let out = warden(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("connected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A lease runs when Ctrl-C comes: dev mode ends it before it stops.
    let node = s["node_id"].as_str().unwrap().to_owned();
    let _clean = ContainersOf(node.clone());
    let image = image::busybox_image();
    let out = warden(&[
        "lease", "start", &node, "--image", &image, "--", "sleep", "600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let containers = || {
        let out = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=warden.node={node}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(!containers().is_empty(), "the lease runs a container");

    let _ = std::process::Command::new("kill")
        .args(["-INT", &p.pid().to_string()])
        .status();
    let start = std::time::Instant::now();
    let code = loop {
        if let Some(c) = p.child.try_wait().unwrap() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{}", p.log_text());
    let log = p.log_text();
    assert!(log.contains("spool flushed"), "{log}");
    assert!(log.contains("ending 1 lease(s)"), "{log}");
    assert!(!sock.exists(), "status socket left behind");
    assert_eq!(
        containers(),
        "",
        "dev mode left its lease's container behind"
    );
}

/// What a victim's file or directory looks like: kind, owner, mode, and
/// contents (a directory's names and their bytes).
fn snapshot(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    let mut s = format!("{:?} {}:{} {:o}", m.file_type(), m.uid(), m.gid(), m.mode());
    if m.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in names {
            s.push_str(&format!("\n  {}", snapshot(&n)));
        }
    } else if m.is_file() {
        s.push_str(&format!(" {:?}", std::fs::read(p).unwrap()));
    } else if m.file_type().is_symlink() {
        s.push_str(&format!(" -> {}", std::fs::read_link(p).unwrap().display()));
    }
    format!("{}: {s}", p.display())
}

/// Another user (nobody) prepares `$TMPDIR/warden-dev`, the name `--dev`
/// once used, with links into root's files; root's `warden agent --dev`
/// must touch none of it, and refuses it when named explicitly.
#[test]
fn dev_mode_never_uses_a_directory_another_user_prepared() {
    use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("tmp");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let victim_dir = tmp.path().join("victim-dir");
    std::fs::create_dir(&victim_dir).unwrap();
    std::fs::set_permissions(&victim_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(victim_dir.join("precious"), "root's data\n").unwrap();
    let victim_file = tmp.path().join("victim.conf");
    std::fs::write(&victim_file, "root's config\n").unwrap();
    std::fs::set_permissions(&victim_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let nobody = 65534;
    let planted = shared.join("warden-dev");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (name, target) in [
        ("agent", &victim_dir),
        ("coordinator", &victim_dir),
        ("tls", &victim_dir),
        ("agent-link.toml", &victim_file),
    ] {
        symlink(target, planted.join(name)).unwrap();
        lchown(planted.join(name), Some(nobody), Some(nobody)).unwrap();
    }
    chown(&planted, Some(nobody), Some(nobody)).unwrap();
    let linked = shared.join("warden-dev-link");
    symlink(&victim_dir, &linked).unwrap();
    lchown(&linked, Some(nobody), Some(nobody)).unwrap();
    let before: Vec<String> = [&victim_dir, &victim_file, &planted, &linked]
        .iter()
        .map(|p| snapshot(p))
        .collect();
    let unchanged = |when: &str| {
        for (p, b) in [&victim_dir, &victim_file, &planted, &linked]
            .iter()
            .zip(&before)
        {
            assert_eq!(&snapshot(p), b, "{when}");
        }
    };

    // The default: a fresh directory of its own, never the prepared one.
    // (/metrics on a free port: the other dev test may hold the default.)
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let mut p = Proc::spawn_env(
        &[
            "agent",
            "--dev",
            "--config",
            config.to_str().unwrap(),
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ],
        tmp.path().join("dev.log"),
        &[("TMPDIR", &shared)],
    );
    // Polled without panicking: whatever happens, the process is stopped
    // and the victim checked first, so a failure shows the damage.
    let started = std::time::Instant::now();
    let root = loop {
        let found = std::fs::read_dir(&shared).ok().and_then(|d| {
            let root = d.map(|e| e.unwrap().path()).find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("warden-dev.")
            })?;
            let s = status(&root.join("agent/agent.sock"))?;
            (s["coordinator"]["connected"] == true).then_some(root)
        });
        if found.is_some() || started.elapsed() > Duration::from_secs(30) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::process::Command::new("kill")
        .args(["-INT", &p.pid().to_string()])
        .status();
    let code = p.wait_exit(Duration::from_secs(20));
    unchanged("after a default --dev run");
    let root = root.unwrap_or_else(|| {
        panic!(
            "no fresh warden-dev.* directory came up in 30 s:\n{}",
            p.log_text()
        )
    });
    assert!(code.success(), "{}", p.log_text());
    assert_eq!(
        std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    assert!(
        root.join("agent/node.key").exists(),
        "the dev state went to {}",
        root.display()
    );

    // Named explicitly: refused, whether someone else's or their link.
    for (dir, says) in [
        (&planted, "belongs to uid 65534"),
        (&linked, "is a symbolic link owned by uid 65534"),
    ] {
        let mut p = Proc::spawn_env(
            &[
                "agent",
                "--dev",
                "--config",
                config.to_str().unwrap(),
                "--state-dir",
                dir.to_str().unwrap(),
            ],
            tmp.path().join("refused.log"),
            &[("TMPDIR", &shared)],
        );
        let code = p.wait_exit(Duration::from_secs(30));
        let log = p.log_text();
        assert!(!code.success(), "{log}");
        assert!(
            log.contains(dir.to_str().unwrap()) && log.contains(says),
            "{log}"
        );
        unchanged(&format!("after --dev --state-dir {}", dir.display()));
    }
}
