//! The .deb as a supplier gets it: built by `packaging/build-deb.sh` from
//! this build's binary, installed into a clean Debian 12 root (debootstrap,
//! then `docker import`: no registry is needed), upgraded with and without the
//! supplier's edits to the conffile, removed and purged; its units checked by
//! `systemd-analyze` and run under a real systemd.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use common::*;

const SUITE: &str = "bookworm";
/// Besides minbase: systemd, to verify and to run the units, procps, which
/// the package depends on (`/bin/kill` for ExecReload), and gocryptfs and
/// fuse3 (its `fusermount`), which it recommends (the scratch volumes). `dpkg -i` checks the package's
/// Depends against exactly this. debootstrap takes its mirror from its own
/// configuration.
const INCLUDE: &str = "systemd,systemd-sysv,procps,gocryptfs,fuse3";
/// Names the cached root: change it when the recipe above changes.
const ROOTFS: &str = "warden-test-debian-rootfs-bookworm-3.tar";
/// Upper bounds for `systemd-analyze security` (docs/security.md gives the figures).
/// The agent's was 3.2 offline before the open guard's `CAP_SYS_ADMIN` and
/// fanotify calls (+0.3, +0.2 as systemd weighs them): 3.6; with the
/// scratch volumes' `@mount` calls, `CAP_SYS_CHROOT`, `mnt` namespaces and
/// `CAP_SETUID`/`CAP_SETGID` (+0.2, +0.1, +0.1, +0.3) less `PrivateMounts=`
/// (-0.2): 4.0.
const MAX_EXPOSURE_AGENT: f64 = 4.0;
const MAX_EXPOSURE_COORDINATOR: f64 = 1.5;

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The Debian root as a tarball, made once with debootstrap and kept in the
/// target directory, so later runs download nothing.
fn rootfs_tar() -> PathBuf {
    static MAKING: Mutex<()> = Mutex::new(());
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let tar = Path::new(env!("CARGO_TARGET_TMPDIR")).join(ROOTFS);
    if tar.exists() {
        return tar;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("root");
    let started = Instant::now();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&root)
        .output()
        .expect("run debootstrap (apt-get install debootstrap; it needs root)");
    assert!(
        out.status.success(),
        "debootstrap failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Package lists and downloaded .debs are of no use in the image.
    for d in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("rm -rf {}/*", root.join(d).display()))
            .status();
    }
    let partial = tar.with_extension("tar.partial");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar of the Debian root failed");
    // Whole or absent, for a run that is interrupted or a second test process.
    std::fs::rename(&partial, &tar).unwrap();
    eprintln!(
        "made {} in {:.0?} (kept for later runs)",
        tar.display(),
        started.elapsed()
    );
    tar
}

/// The imported image; removed when the last test using it is done.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

fn debian_image() -> Arc<Image> {
    static SHARED: Mutex<Weak<Image>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = shared.upgrade() {
        return image;
    }
    // Per process: test runs of other checkouts share this Docker.
    let tag = format!("warden-test/debian:12-{}", std::process::id());
    let out = Command::new("docker")
        .args(["import", "--change", "CMD [\"/sbin/init\"]"])
        .arg(rootfs_tar())
        .arg(&tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = Arc::new(Image(tag));
    *shared = Arc::downgrade(&image);
    image
}

/// The packaged agent.toml as version B has it: one more comment line.
const B_COMMENT: &str = "## (version B of this file)";

/// Version A (the script's default version) and version B, whose agent.toml
/// differs, built at once. B is built by the same script from a copy of the
/// tree with the edited file.
fn build_debs(out: &Path) -> (PathBuf, PathBuf) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let copy = out.join("tree");
    std::fs::create_dir_all(&copy).unwrap();
    for part in ["packaging", "systemd", "docs", "README.md"] {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(repo.join(part))
            .arg(&copy)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp {part}");
    }
    let toml = copy.join("packaging/agent.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{text}\n{B_COMMENT}\n")).unwrap();

    let build = |script: PathBuf, version: Option<String>| {
        let dir = out.to_owned();
        std::thread::spawn(move || {
            let mut cmd = Command::new(script);
            cmd.arg(WARDEN).arg(&dir).args(version);
            let o = cmd.output().unwrap();
            assert!(
                o.status.success(),
                "build-deb.sh: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                o.stderr.is_empty(),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
        })
    };
    let a = build(repo.join("packaging/build-deb.sh"), None);
    let b = build(
        copy.join("packaging/build-deb.sh"),
        Some(format!("{}-2", version())),
    );
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(
        a.file_name().unwrap().to_str().unwrap(),
        format!("warden_{}-1_{}.deb", version(), arch.trim())
    );
    (a, b)
}

/// A container removed when the test ends, pass or fail.
struct Container {
    name: String,
    _remove: image::Remove,
}

impl Container {
    fn run(image: &Image, args: &[&str], cmd: &[&str]) -> Container {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "warden-pkg-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let c = Container {
            _remove: image::Remove::containers(&[&name]),
            name,
        };
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &c.name])
            .args(args)
            .arg(&image.0)
            .args(cmd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    fn sh(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `script`, which must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(
            o.status.success(),
            "`{script}` failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn copy_in(&self, from: &Path, to: &str) {
        let ok = Command::new("docker")
            .arg("cp")
            .arg(from)
            .arg(format!("{}:{to}", self.name))
            .status()
            .unwrap()
            .success();
        assert!(ok, "docker cp {}", from.display());
    }

    fn exists(&self, path: &str) -> bool {
        self.sh(&format!("test -e {path} || test -L {path}"))
            .status
            .success()
    }
}

/// Debian booted in a container with systemd as PID 1, `extra` added to
/// `docker run`.
fn booted(image: &Image, extra: &[&str]) -> Container {
    // What systemd needs in a container: to manage cgroups and mounts. The
    // agent's capabilities beyond Docker's default set are added so that its
    // bounding set is real.
    let mut args = vec![
        "--network",
        "none",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-add",
        "SYS_PTRACE",
        "--cap-add",
        "DAC_READ_SEARCH",
        "--cap-add",
        "NET_ADMIN",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--cgroupns=host",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/run/lock",
    ];
    args.extend_from_slice(extra);
    let c = Container::run(image, &args, &["/sbin/init"]);
    wait_for("systemd to boot", Duration::from_secs(60), || {
        let state = c.sh("systemctl is-system-running").stdout;
        let state = String::from_utf8_lossy(&state);
        matches!(state.trim(), "running" | "degraded").then_some(())
    });
    // systemd keeps / private inside a container, so the credentials it
    // mounts for a service would not reach it; on a host it is shared.
    c.ok("mount --make-rshared /");
    c
}

/// `warden coordinator init`, then the coordinator's unit started: the
/// `[coordinator]` section init printed for agents, and the key it names.
fn coordinator_up(c: &Container) -> (String, String) {
    let init = c.ok("warden coordinator init --name localhost --listen 127.0.0.1:7443");
    let section: String = init[init.find("[coordinator]").expect(&init)..]
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let printed_key = section
        .lines()
        .find_map(|l| l.strip_prefix("public_key = "))
        .expect(&section)
        .trim_matches('"')
        .to_owned();
    c.ok("systemctl start warden-coordinator");
    (section, printed_key)
}

/// "MODE OWNER GROUP" of a path in the container.
fn mode(c: &Container, path: &str) -> String {
    c.ok(&format!("stat -c '%a %U %G' {path}"))
        .trim()
        .to_owned()
}

/// The overall figure of `systemd-analyze security`.
fn exposure(c: &Container, unit: &str) -> f64 {
    let out = c.ok(&format!(
        "systemd-analyze security --offline=yes --no-pager /lib/systemd/system/{unit}"
    ));
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{out}"));
    line.split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

const AGENT_TOML: &str = "/etc/warden/agent.toml";
const PACKAGED_TOML: &str = include_str!("../packaging/agent.toml");
const COORDINATOR_EXAMPLE: &str = "/usr/share/doc/warden/examples/coordinator.toml";

#[test]
fn the_deb_installs_upgrades_keeps_the_suppliers_edits_and_purges() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let image = debian_image();
    let (a, b) = build_debs(tmp.path());
    // No systemd running here, as in a container or a chroot: the scripts must cope.
    let c = Container::run(&image, &["--network", "none"], &["sleep", "infinity"]);
    c.copy_in(&a, "/a.deb");
    c.copy_in(&b, "/b.deb");

    // Install: the message's first step is the doctor.
    let msg = c.ok("dpkg -i /a.deb");
    let first = msg
        .lines()
        .find(|l| l.trim_start().starts_with("1."))
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(first.contains("warden doctor"), "{msg}");
    assert!(
        msg.contains("not started: no coordinator is configured"),
        "{msg}"
    );
    assert_eq!(mode(&c, "/usr/bin/warden"), "755 root root");
    assert_eq!(
        mode(&c, "/lib/systemd/system/warden-agent.service"),
        "644 root root"
    );
    assert_eq!(
        mode(&c, "/lib/systemd/system/warden-coordinator.service"),
        "644 root root"
    );
    assert_eq!(mode(&c, AGENT_TOML), "640 root root");
    assert_eq!(mode(&c, "/var/lib/warden"), "700 root root");
    assert_eq!(c.ok(&format!("cat {AGENT_TOML}")), PACKAGED_TOML);
    assert!(c
        .ok("dpkg-query -W -f='${Conffiles}' warden")
        .contains(AGENT_TOML));
    assert!(c.exists("/usr/share/doc/warden/security.md"));
    assert!(c.exists("/usr/share/doc/warden/coordinator.md"));
    // The coordinator's example config: beside the docs, not in /etc, where
    // `warden coordinator init` writes the real one.
    assert_eq!(mode(&c, COORDINATOR_EXAMPLE), "644 root root");
    assert_eq!(
        c.ok(&format!("cat {COORDINATOR_EXAMPLE}")),
        include_str!("../packaging/coordinator.toml")
    );
    assert!(!c.exists("/etc/warden/coordinator.toml"));
    // Enabled (deb-systemd-helper works without a running systemd), not started.
    assert_eq!(
        c.ok("readlink /etc/systemd/system/multi-user.target.wants/warden-agent.service")
            .trim(),
        "/lib/systemd/system/warden-agent.service"
    );
    assert_eq!(
        c.ok("warden --version").trim(),
        format!("warden {}", version())
    );

    // The doctor runs and fails this container (no Docker, no GPU): a table
    // of every check, and the failures named.
    let o = c.sh("warden doctor");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let table = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        rows,
        [
            "memory", "disk", "download", "upload", "rtt", "docker", "nvml", "runtime", "tun",
            "guard", "scratch", "delivery", "key", "clock"
        ],
        "{table}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let failed: Vec<&str> = err
        .lines()
        .find_map(|l| l.split_once("check(s) failed: "))
        .unwrap_or_else(|| panic!("{err}"))
        .1
        .split(", ")
        .collect();
    assert!(
        failed.contains(&"docker") && failed.contains(&"nvml"),
        "{err}"
    );
    for f in &failed {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(f) && l.contains(" FAIL ")),
            "{f}: {table}"
        );
    }

    // The units as installed: systemd-analyze finds nothing to say.
    let o = c.sh("systemd-analyze verify /lib/systemd/system/warden-agent.service /lib/systemd/system/warden-coordinator.service");
    assert!(o.status.success(), "{o:?}");
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (agent, coordinator) = (
        exposure(&c, "warden-agent.service"),
        exposure(&c, "warden-coordinator.service"),
    );
    eprintln!("systemd-analyze security: agent {agent}, coordinator {coordinator}");
    assert!(agent <= MAX_EXPOSURE_AGENT, "agent exposure {agent}");
    assert!(
        coordinator <= MAX_EXPOSURE_COORDINATOR,
        "coordinator exposure {coordinator}"
    );

    // Upgrade, the file unedited: dpkg puts the new one in place.
    c.ok("echo node > /var/lib/warden/marker");
    c.ok("dpkg -i /b.deb");
    assert!(c
        .ok(&format!("cat {AGENT_TOML}"))
        .ends_with(&format!("{B_COMMENT}\n")));
    assert!(!c.exists(&format!("{AGENT_TOML}.dpkg-dist")));
    assert_eq!(c.ok("cat /var/lib/warden/marker"), "node\n");

    // Remove: the binary goes; state and config stay.
    c.ok("dpkg -r warden");
    assert!(!c.exists("/usr/bin/warden"));
    assert_eq!(c.ok("cat /var/lib/warden/marker"), "node\n");
    assert!(c.exists(AGENT_TOML));
    assert_eq!(
        c.ok("dpkg-query -W -f='${Status}' warden"),
        "deinstall ok config-files"
    );

    // Reinstall A, edit, upgrade to B: the edit stays, B's file is set beside it.
    c.ok("dpkg -i /a.deb");
    let edited = c.ok(&format!(
        "printf '\\n[doctor]\\nmin_memory_gb = 1.5\\n' >> {AGENT_TOML} && cat {AGENT_TOML}"
    ));
    c.ok("dpkg -i --force-confold /b.deb");
    assert_eq!(c.ok(&format!("cat {AGENT_TOML}")), edited);
    assert!(c
        .ok(&format!("cat {AGENT_TOML}.dpkg-dist"))
        .ends_with(&format!("{B_COMMENT}\n")));
    assert_eq!(
        c.ok("dpkg-query -W -f='${Version}' warden"),
        format!("{}-2", version())
    );
    // And the agent reads the edited file.
    let report: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &c.sh("warden doctor --json").stdout,
    ))
    .unwrap();
    let memory = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "memory")
        .unwrap();
    assert_eq!(memory["threshold"], ">= 1.5 GB", "{memory}");

    // Purge: state, config and the unit's links are gone.
    c.ok("dpkg -P warden");
    for gone in [
        "/var/lib/warden",
        "/etc/warden",
        "/usr/bin/warden",
        "/etc/systemd/system/multi-user.target.wants/warden-agent.service",
        "/etc/systemd/system/warden-agent.service",
    ] {
        assert!(!c.exists(gone), "{gone} is still there");
    }
    eprintln!("package test took {:.1?}", started.elapsed());
}

/// The units under a real systemd (PID 1 of a container): the install
/// enables the agent but leaves it stopped until a coordinator is set; the
/// coordinator runs as a dynamic user with its TLS files as credentials; the
/// agent reports READY once registered, reloads on `systemctl reload`, is
/// restarted by an upgrade, and stops cleanly within 10 s.
#[test]
fn the_units_run_under_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let image = debian_image();
    let (a, b) = build_debs(tmp.path());

    let c = booted(&image, &[]);
    c.copy_in(&a, "/a.deb");
    c.copy_in(&b, "/b.deb");
    let msg = c.ok("dpkg -i /a.deb");
    assert!(
        msg.contains("not started: no coordinator is configured"),
        "{msg}"
    );
    assert_eq!(c.ok("systemctl is-enabled warden-agent").trim(), "enabled");
    assert_eq!(
        String::from_utf8_lossy(&c.sh("systemctl is-active warden-agent").stdout).trim(),
        "inactive"
    );

    // Without a config the coordinator's unit refuses to start.
    let o = c.sh("systemctl start warden-coordinator");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Assertion failed"), "{err}");
    assert_eq!(
        c.ok("systemctl show -P AssertResult warden-coordinator")
            .trim(),
        "no"
    );

    // The coordinator, as its operator sets it up: init, then start.
    let (section, printed_key) = coordinator_up(&c);
    assert_eq!(mode(&c, "/etc/warden/coordinator.toml"), "644 root root");
    assert_eq!(mode(&c, "/etc/warden/coordinator.key"), "600 root root");
    let key = wait_for("the coordinator's key", Duration::from_secs(20), || {
        let log = c.ok("journalctl -u warden-coordinator --no-pager -o cat");
        log.lines()
            .find_map(|l| l.split_once("(key ")?.1.split_once(')'))
            .map(|(k, _)| k.to_owned())
    });
    assert_eq!(key, printed_key, "init made the key the coordinator uses");
    // Its key belongs to the dynamic user it runs as (systemd's range 61184–65519).
    let owner: u32 = c
        .ok("stat -c %u /var/lib/private/warden-coordinator/coordinator.key")
        .trim()
        .parse()
        .unwrap();
    assert!((61184..=65519).contains(&owner), "owner {owner}");
    let pid = c.ok("systemctl show -P MainPID warden-coordinator");
    assert_eq!(
        c.ok(&format!("stat -c %u /proc/{}", pid.trim())).trim(),
        owner.to_string()
    );

    // The supplier sets the coordinator and starts the agent: `systemctl
    // start` returns once the agent said READY, i.e. once it registered.
    // (Its CA is already where the section says: init wrote it there.)
    c.ok(&format!(
        "cat >> {AGENT_TOML} <<'EOF'\n\n{section}[probe]\ninterval = \"0s\"\nEOF"
    ));
    c.ok("systemctl start warden-agent");
    assert_eq!(
        c.ok("systemctl show -P StatusText warden-agent").trim(),
        "connected to the coordinator"
    );
    let nodes = c.ok("warden nodes --json");
    assert!(nodes.contains("\"connected\": true"), "{nodes}");

    // Reload: what was applied and what needs a restart, in the journal
    // and in systemd's status line.
    c.ok(&format!(
        "printf '[timelock]\\nallow_exe = [\"nvidia-persistenced\", \"dcgm\"]\\n' >> {AGENT_TOML} && sed -i 's/^interval = \"0s\"/interval = \"1h\"/' {AGENT_TOML}"
    ));
    c.ok("systemctl reload warden-agent");
    wait_for("the reload", Duration::from_secs(10), || {
        let s = c.ok("systemctl show -P StatusText warden-agent");
        s.starts_with("config reloaded").then_some(())
    });
    assert_eq!(
        c.ok("systemctl show -P StatusText warden-agent").trim(),
        "config reloaded: 1 applied; needs a restart: probe.interval"
    );
    let log = c.ok("journalctl -u warden-agent --no-pager -o cat");
    assert!(log.contains("timelock.allow_exe changed: applied"), "{log}");
    assert!(
        log.contains("probe.interval changed: takes effect after a restart"),
        "{log}"
    );

    // An upgrade restarts the running agent.
    let pid = c.ok("systemctl show -P MainPID warden-agent");
    let msg = c.ok("dpkg -i --force-confold /b.deb");
    assert!(msg.contains("warden-agent is running"), "{msg}");
    assert_ne!(c.ok("systemctl show -P MainPID warden-agent"), pid);
    assert_eq!(c.ok("systemctl is-active warden-agent").trim(), "active");

    // Stop: SIGTERM, the stream closed, the spool flushed, within 10 s.
    let t = Instant::now();
    c.ok("systemctl stop warden-agent");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    let log = c.ok("journalctl -u warden-agent --no-pager -o cat");
    assert!(log.contains("agent stopped; spool flushed"), "{log}");
    assert!(
        !log.contains("Killing") && !log.contains("SIGKILL"),
        "{log}"
    );
    let nodes = c.ok("warden nodes --json");
    assert!(nodes.contains("\"connected\": false"), "{nodes}");
}

/// A host directory at the same path inside a container and out, a shared
/// mount on the host (a bind of itself), so that what is mounted below it
/// inside (`rshared`) reaches the host's Docker. Unmounted and removed when
/// the test ends.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new() -> SharedDir {
        // Not under /tmp or /home: the unit gives the agent a /tmp of its
        // own and no /home.
        let dir = PathBuf::from(format!(
            "/var/lib/warden-test-scratch-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let d = SharedDir(dir);
        let path = d.0.to_str().unwrap();
        run(&["mount", "--bind", path, path]);
        run(&["mount", "--make-shared", path]);
        d
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The encrypted scratch volume with the agent under its shipped unit: its
/// mount namespace is its own (ProtectSystem= and the rest) and its system
/// calls are filtered, yet the volume is mounted where Docker (the host's,
/// through the socket) binds it, and what a lease writes there is on the
/// disk as ciphertext only, gone when the lease ends.
#[test]
fn the_agent_under_its_unit_gives_a_lease_an_encrypted_scratch_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let image = debian_image();
    let (a, _) = build_debs(tmp.path());
    let busybox = image::busybox_image();
    let shared = SharedDir::new();
    let state = shared.0.to_str().unwrap().to_owned();
    let volume = format!("{state}:{state}:rshared");
    let c = booted(
        &image,
        &[
            "--device",
            "/dev/fuse",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            &volume,
        ],
    );
    c.copy_in(&a, "/a.deb");
    c.ok("dpkg -i /a.deb");
    let (section, _) = coordinator_up(&c);
    // The state directory at the shared path (a drop-in lets the unit write
    // there, as StateDirectory= does for /var/lib/warden); nothing else of
    // the unit changes.
    c.ok(&format!(
        "printf 'state_dir = \"{state}\"\\n' | cat - {AGENT_TOML} > /tmp/a && mv /tmp/a {AGENT_TOML} && chmod 640 {AGENT_TOML}"
    ));
    c.ok(&format!(
        "cat >> {AGENT_TOML} <<'EOF'\n\n{section}[probe]\ninterval = \"0s\"\n[workload]\nscratch = \"required\"\nstop_grace = \"1s\"\nEOF"
    ));
    c.ok(&format!(
        "mkdir -p /etc/systemd/system/warden-agent.service.d && printf '[Service]\\nReadWritePaths={state}\\n' > /etc/systemd/system/warden-agent.service.d/state.conf && systemctl daemon-reload"
    ));
    c.ok("systemctl start warden-agent");
    let node = wait_for("the node registered", Duration::from_secs(30), || {
        let nodes: serde_json::Value = serde_json::from_str(&c.ok("warden nodes --json")).ok()?;
        let n = nodes.as_array()?.first()?;
        (n["connected"] == true).then(|| n["node_id"].as_str().unwrap().to_owned())
    });
    let _clean = ContainersOf(node.clone());

    let marker = format!("under-the-unit-{}", std::process::id());
    let start = c.sh(&format!(
        "warden lease start {node} --image {busybox} --network none -- sh -c 'echo {marker} > /scratch/m; sleep 300'"
    ));
    let journal = || c.ok("journalctl -u warden-agent --no-pager -o cat");
    assert!(
        start.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&start.stderr),
        journal()
    );
    let lease = String::from_utf8_lossy(&start.stdout).trim().to_owned();
    let layout = warden_agent::workloads::scratch::Layout::new(&shared.0);
    // On the host, outside the container: Docker's namespace has the
    // volume, the container wrote through it, the disk holds ciphertext.
    let written = wait_for(
        "the marker, seen on the host",
        Duration::from_secs(20),
        || std::fs::read_to_string(layout.source(&lease).join("m")).ok(),
    );
    assert_eq!(written.trim(), marker);
    // A user other than root writes too: gocryptfs creates the file as that
    // user (what CAP_SETUID, CAP_SETGID and setreuid are in the unit for).
    let by_nobody = run(&[
        "docker",
        "exec",
        "-u",
        "65534",
        &format!("warden-{lease}-main"),
        "sh",
        "-c",
        "echo nobody > /scratch/n && stat -c %u /scratch/n",
    ]);
    assert_eq!(String::from_utf8_lossy(&by_nobody.stdout).trim(), "65534");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let plain = layout.plain(&lease);
    assert!(
        mounts.lines().any(|l| l.contains(plain.to_str().unwrap())
            && l.contains(warden_agent::workloads::scratch::FSTYPE)),
        "{mounts}"
    );
    let on_disk = files(&layout.cipher(&lease));
    assert!(on_disk.len() >= 3, "conf, diriv and the file: {on_disk:?}");
    let plaintext = holding(&layout.cipher(&lease), marker.as_bytes());
    assert!(plaintext.is_empty(), "plaintext in {plaintext:?}");
    let list = c.ok("warden lease list --json");
    assert!(list.contains("is an encrypted scratch volume"), "{list}");
    // gocryptfs runs in the agent's cgroup: stopping the unit ends it, and
    // the key with it.
    // systemd's own hierarchy: cgroup v2's, or v1's name=systemd.
    let cgroups = c.ok(
        "for p in $(pidof gocryptfs); do grep -E '^(0::|[0-9]+:name=systemd:)' /proc/$p/cgroup | tail -n1; done",
    );
    assert_eq!(cgroups.lines().count(), 1, "one gocryptfs: {cgroups}");
    assert!(
        cgroups.trim().ends_with("/warden-agent.service"),
        "{cgroups}"
    );

    c.ok(&format!("warden lease end {lease}"));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(plain.to_str().unwrap()), "{mounts}");
    assert!(
        !layout.dir(&lease).exists(),
        "the volume's directory is removed"
    );
    let log = journal();
    assert!(log.contains("encrypted scratch volume mounted"), "{log}");

    // A restart of the unit ends gocryptfs with the agent (its cgroup): the
    // key is gone, and the new agent destroys the dead volume, in Docker's
    // namespace, and refuses new containers of that lease.
    let start = c.sh(&format!(
        "warden lease start {node} --image {busybox} --network none -- sleep 300"
    ));
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    let second = String::from_utf8_lossy(&start.stdout).trim().to_owned();
    let plain = layout.plain(&second);
    assert!(std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(plain.to_str().unwrap()));
    c.ok("systemctl restart warden-agent");
    wait_for("the dead volume destroyed", Duration::from_secs(30), || {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        (!mounts.contains(plain.to_str().unwrap()) && !layout.dir(&second).exists()).then_some(())
    });
    assert_eq!(
        c.ok("pidof gocryptfs || true").trim(),
        "",
        "the key's process"
    );
    let log = journal();
    assert!(log.contains("scratch volume is lost"), "{log}");
    let run = c.sh(&format!(
        "warden lease run {second} --name side --image {busybox} --network none -- sleep 300"
    ));
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("scratch volume was lost"), "{err}");
    c.ok(&format!("warden lease end {second}"));
}
