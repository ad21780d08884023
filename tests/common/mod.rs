//! Helpers for end-to-end tests: real `warden` processes, killed on drop
//! so a failing test leaves nothing running.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A child process killed (SIGKILL) on drop; its stderr goes to a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], log: PathBuf) -> Proc {
        Self::spawn_env(args, log, &[])
    }

    pub fn spawn_env(args: &[&str], log: PathBuf, env: &[(&str, &Path)]) -> Proc {
        Self::spawn_in(None, args, log, env)
    }

    /// As `spawn_env`, inside network namespace `ns` when given (`ip netns
    /// exec` execs warden, so the pid is warden's).
    pub fn spawn_in(ns: Option<&str>, args: &[&str], log: PathBuf, env: &[(&str, &Path)]) -> Proc {
        match ns {
            Some(ns) => Self::spawn_under(&["ip", "netns", "exec", ns], args, log, env),
            None => Self::spawn_under(&[], args, log, env),
        }
    }

    /// As `spawn_env`, through `wrapper` (a command that execs the rest,
    /// such as `ip netns exec NS` or `setpriv …`, so the pid is warden's).
    pub fn spawn_under(
        wrapper: &[&str],
        args: &[&str],
        log: PathBuf,
        env: &[(&str, &Path)],
    ) -> Proc {
        let err = std::fs::File::create(&log).unwrap();
        let mut cmd = match wrapper {
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(WARDEN);
                c
            }
            [] => Command::new(WARDEN),
        };
        let child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            // What it prints (a banner) goes in the log too.
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .spawn()
            .expect("spawn warden");
        Proc { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "process did not stop on SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself, for at most `timeout`
    /// (a process that should have refused to start must not hang the test).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "still running after {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator in dev mode (throwaway TLS in its state dir).
pub struct Coordinator {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: Proc,
}

impl Coordinator {
    pub fn start(dir: &Path, port: u16) -> Coordinator {
        Self::start_with(dir, port, "")
    }

    /// As `start`, with `extra` TOML (e.g. a `[leases]` section) in a config file.
    pub fn start_with(dir: &Path, port: u16, extra: &str) -> Coordinator {
        Self::start_in(None, dir, &format!("127.0.0.1:{port}"), extra)
    }

    /// As `start_with`, listening on `listen` inside namespace `ns`.
    pub fn start_in(ns: Option<&str>, dir: &Path, listen: &str, extra: &str) -> Coordinator {
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        let link = dir.join("agent-link.toml");
        let _ = std::fs::remove_file(&link);
        let config = dir.with_extension("coordinator.toml");
        std::fs::write(
            &config,
            format!("state_dir = \"{}\"\n{extra}\n", dir.display()),
        )
        .unwrap();
        let proc = Proc::spawn_in(
            ns,
            &[
                "coordinator",
                "--dev",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                listen,
            ],
            dir.with_extension(format!("coordinator-{}.log", crate_now())),
            &[],
        );
        let c = Coordinator {
            dir: dir.to_owned(),
            port,
            proc,
        };
        wait_for("coordinator to start", Duration::from_secs(30), || {
            link.exists().then_some(())
        });
        c
    }

    /// The `[coordinator]` TOML section an agent needs.
    pub fn link_toml(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent-link.toml")).unwrap()
    }

    pub fn db(&self) -> PathBuf {
        self.dir.join("coordinator.db")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// `warden COMMAND --socket ADMIN ARGS…` (the socket first, so that
    /// ARGS may end with `-- CMD…`).
    pub fn cli(&self, command: &str, args: &[&str]) -> std::process::Output {
        Command::new(WARDEN)
            .arg(command)
            .args(["--socket", self.admin_socket().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    /// Another dev coordinator in `dir` on `port`, with its own database,
    /// presenting this one's TLS certificate (one CA) and, when `same_key`,
    /// signing with this one's key: a replica behind a second address. With
    /// `same_key` false it is a coordinator agents pinned to this one's key
    /// must not trust.
    pub fn start_beside(&self, dir: &Path, port: u16, same_key: bool) -> Coordinator {
        self.start_beside_with(dir, port, same_key, "")
    }

    /// As `start_beside`, with `extra` TOML (e.g. the `[postgres]` the
    /// replicas share).
    pub fn start_beside_with(
        &self,
        dir: &Path,
        port: u16,
        same_key: bool,
        extra: &str,
    ) -> Coordinator {
        self.start_beside_in(None, dir, &format!("127.0.0.1:{port}"), same_key, extra)
    }

    /// As `start_beside_with`, listening on `listen` inside namespace `ns`.
    pub fn start_beside_in(
        &self,
        ns: Option<&str>,
        dir: &Path,
        listen: &str,
        same_key: bool,
        extra: &str,
    ) -> Coordinator {
        use std::os::unix::fs::PermissionsExt;
        let private = |d: &Path| {
            std::fs::create_dir_all(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        };
        private(dir);
        private(&dir.join("tls"));
        let mut files = vec!["tls/ca.pem", "tls/server.pem", "tls/server.key"];
        if same_key {
            files.push("coordinator.key");
        }
        for f in files {
            // fs::copy keeps the mode (0600).
            std::fs::copy(self.dir.join(f), dir.join(f)).unwrap();
        }
        Coordinator::start_in(ns, dir, listen, extra)
    }

    /// Its address as agents on this host dial it.
    pub fn address(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The `[coordinator]` section of this one (its key, its CA) with
    /// `address` listing the coordinators on `ports`, in that order.
    pub fn link_toml_to(&self, ports: &[u16]) -> String {
        let list: Vec<String> = ports
            .iter()
            .map(|p| format!("\"https://localhost:{p}\""))
            .collect();
        self.link_toml()
            .lines()
            .map(|l| match l.starts_with("address") {
                true => format!("address = [{}]", list.join(", ")),
                false => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The coordinator's public key as written in agent-link.toml.
    pub fn public_key(&self) -> String {
        let text = self.link_toml();
        let line = text.lines().find(|l| l.starts_with("public_key")).unwrap();
        line.split('"').nth(1).unwrap().to_owned()
    }
}

fn crate_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// (count, distinct seqs, min seq, max seq) of one database's records.
pub fn record_stats(db: &Path) -> (u64, u64, u64, u64) {
    let conn =
        match rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        {
            Ok(c) => c,
            Err(_) => return (0, 0, 0, 0),
        };
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT count(*), count(DISTINCT node_id || ':' || seq), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM records",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
            ))
        },
    )
    .unwrap_or((0, 0, 0, 0))
}

/// The seqs of one database's records (with repeats, if any).
pub fn stored_seqs(db: &Path) -> Vec<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn.prepare("SELECT seq FROM records").unwrap();
    let seqs = stmt
        .query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|s| s.unwrap() as u64)
        .collect();
    seqs
}

pub fn count(db: &Path, sql: &str) -> u64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64
}

/// An agent process with a config written into its state dir.
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proc: Proc,
}

impl Agent {
    /// Writes `extra` TOML (sections) after the state dir line and starts.
    /// Unless `extra` says otherwise, /metrics gets a free port and the
    /// link probe is off, so agents of parallel tests do not collide.
    pub fn start(dir: &Path, extra: &str) -> Agent {
        Self::start_env(dir, extra, &[])
    }

    /// As `start`, with environment variables (e.g. `FAKE_NVML_STATE`).
    pub fn start_env(dir: &Path, extra: &str, env: &[(&str, &Path)]) -> Agent {
        Self::start_with_env(dir, &Self::write_config(dir, extra), env)
    }

    /// The config file `start_env` runs with: `state_dir` = `dir`, `extra`,
    /// metrics on a free port and no link probe unless `extra` says.
    pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.with_extension("toml");
        let mut text = format!("state_dir = \"{}\"\n{extra}\n", dir.display());
        if !extra.contains("[metrics]") {
            text.push_str("[metrics]\nlisten = \"127.0.0.1:0\"\n");
        }
        if !extra.contains("[probe]") {
            text.push_str("[probe]\ninterval = \"0s\"\n");
        }
        std::fs::write(&config, text).unwrap();
        config
    }

    pub fn start_with(dir: &Path, config: &Path) -> Agent {
        Self::start_with_env(dir, config, &[])
    }

    pub fn start_with_env(dir: &Path, config: &Path, env: &[(&str, &Path)]) -> Agent {
        Self::start_in(None, dir, config, env)
    }

    /// An agent inside network namespace `ns` (its status socket is a file,
    /// so the test still reads it from outside).
    pub fn start_in(ns: Option<&str>, dir: &Path, config: &Path, env: &[(&str, &Path)]) -> Agent {
        match ns {
            Some(ns) => Self::start_under(&["ip", "netns", "exec", ns], dir, config, env),
            None => Self::start_under(&[], dir, config, env),
        }
    }

    /// An agent started through `wrapper` (see [`Proc::spawn_under`]).
    pub fn start_under(
        wrapper: &[&str],
        dir: &Path,
        config: &Path,
        env: &[(&str, &Path)],
    ) -> Agent {
        let proc = Proc::spawn_under(
            wrapper,
            &["agent", "--config", config.to_str().unwrap()],
            dir.with_extension(format!("agent-{}.log", crate_now())),
            env,
        );
        let a = Agent {
            dir: dir.to_owned(),
            config: config.to_owned(),
            proc,
        };
        let sock = a.socket();
        wait_for("agent status socket", Duration::from_secs(30), || {
            status(&sock)
        });
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        status(&self.socket())
    }
}

/// `warden status --json` against a socket, parsed; None if unreachable.
/// The `mesh` part of an agent's status (null when it runs none).
pub fn mesh_status(a: &Agent) -> serde_json::Value {
    a.status()
        .map(|s| s["mesh"].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// The peer `node` in an agent's mesh status.
pub fn mesh_peer(mesh: &serde_json::Value, node: &str) -> Option<serde_json::Value> {
    mesh["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node)
        .cloned()
}

/// Waits until every agent in `who` has an answered ping to every node
/// in `to` (except itself).
pub fn wait_pings(agents: &[(&Agent, &str)], to: &[&str], what: &str) {
    wait_for(what, Duration::from_secs(60), || {
        agents
            .iter()
            .all(|(a, me)| {
                let m = mesh_status(a);
                to.iter()
                    .filter(|n| *n != me)
                    .all(|n| mesh_peer(&m, n).is_some_and(|p| p["rtt_ms"].is_f64()))
            })
            .then_some(())
    });
}

pub fn status(socket: &Path) -> Option<serde_json::Value> {
    let out = Command::new(WARDEN)
        .args(["status", "--json", "--socket", socket.to_str().unwrap()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Agent TOML for fast tests: quick reconnects and a telemetry burst.
pub fn fast_agent_toml(link: &str, interval: &str, max_records: u64) -> String {
    format!(
        "{link}\n[uplink]\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\nheartbeat_interval = \"1s\"\n\n[telemetry]\ninterval = \"{interval}\"\nmax_records = {max_records}\n"
    )
}

/// The fake NVML library, built on first use if this test run has not
/// built it (it is a workspace member, so `cargo test --workspace` does).
pub fn fake_nvml() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let lib = Path::new(WARDEN).parent().unwrap().join("libfake_nvml.so");
            if !lib.exists() {
                // Beside the binary in use: a bench's is the release one.
                let release = lib.parent().is_some_and(|d| d.ends_with("release"));
                let ok = Command::new(env!("CARGO"))
                    .args(["build", "-p", "fake-nvml"])
                    .args(release.then_some("--release"))
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .status()
                    .unwrap()
                    .success();
                assert!(ok && lib.exists(), "could not build {}", lib.display());
            }
            lib
        })
        .clone()
}

/// The pid the fake GPU 0 reports running on it: above any kernel's
/// pid_max, so no real process is ever mistaken for it (a lease would kill it).
pub const FAKE_PID: u32 = 99_999_999;

/// One fake GPU as the fake library's state file describes it.
pub fn fake_gpu(i: usize) -> serde_json::Value {
    serde_json::json!({
        "uuid": format!("GPU-{i:08x}-0000-4000-8000-000000000000"),
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": format!("00000000:{:02X}:00.0", i + 1),
        "memory_total_mib": 81559,
        "memory_used_mib": 1024 * i,
        "utilization_gpu": 10 + i,
        "utilization_memory": i,
        "power_mw": 70000 + 1000 * i,
        "temperature_c": 35,
        "sm_clock_mhz": 1980,
        "processes": if i == 0 { serde_json::json!([{"pid": FAKE_PID, "used_memory_mib": 512}]) } else { serde_json::json!([]) },
        "lost": false,
    })
}

/// Writes the fake library's state atomically (write, then rename), so the
/// agent never reads half a file.
pub fn write_fake_state(path: &Path, devices: &[serde_json::Value]) {
    let state = serde_json::json!({
        "driver_version": "550.54.15",
        "cuda_version": 12040,
        "devices": devices,
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The agent's status once it is connected to the coordinator at `address`.
pub fn connected_at(agent: &Agent, address: &str) -> Option<serde_json::Value> {
    let s = agent.status()?;
    (s["coordinator"]["connected"] == true && s["coordinator"]["address"] == address).then_some(s)
}

/// `warden nodes --json` against a coordinator, parsed.
pub fn nodes_json(c: &Coordinator) -> serde_json::Value {
    let out = Command::new(WARDEN)
        .args([
            "nodes",
            "--json",
            "--socket",
            c.admin_socket().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every stored record of a coordinator's database, decoded.
pub fn stored_records(db: &Path) -> Vec<warden_proto::pb::Record> {
    use prost::Message;
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare("SELECT payload FROM records ORDER BY seq")
        .unwrap();
    let rows = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|b| warden_proto::pb::Record::decode(b.unwrap().as_slice()).unwrap())
        .collect();
    rows
}

/// One HTTP GET, the whole answer (head and body).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
/// Every file below `dir` (not following links).
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            out.extend(files(&e.path()));
        } else if kind.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// Every file below `dir` whose bytes hold `needle`.
pub fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        .collect()
}

pub mod hire;
pub mod image;
pub mod lan;
pub mod leases;
pub mod ray;

#[allow(unused_imports)]
pub use lan::{fed, run, spawn_in, wg_keypair, Hosts, InNs, Lan};

/// A stand-in for the Docker socket that forwards to the real one, and
/// can be cut: to the agent, Docker went away.
pub struct DockerProxy {
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl DockerProxy {
    pub fn start(path: &Path) -> DockerProxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<UnixStream>::new()));
        let (s, c) = (stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(docker) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let mut list = c.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(docker.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), docker.try_clone().unwrap()),
                    (docker, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        DockerProxy {
            path: path.to_owned(),
            stop,
            conns,
        }
    }

    /// Docker "goes away": no new connections, and the open ones are cut.
    pub fn cut(self) {
        drop(self);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Removes a node's containers and networks when the test ends, pass or fail.
pub struct ContainersOf(pub String);

impl Drop for ContainersOf {
    fn drop(&mut self) {
        let label = format!("label=warden.node={}", self.0);
        for (list, remove) in [
            (&["ps", "-aq"][..], &["rm", "-f", "-v"][..]),
            (&["network", "ls", "-q"][..], &["network", "rm"][..]),
        ] {
            let Ok(out) = Command::new("docker")
                .args(list)
                .args(["--filter", &label])
                .output()
            else {
                continue;
            };
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(remove).arg(id).output();
            }
        }
    }
}
