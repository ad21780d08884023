//! A real two-node Ray cluster with token authentication, in two containers
//! of the Ray image (tests/common/ray.rs) on a Docker bridge network of the
//! test's own: the head bound to its container's address, a worker joining
//! it with the token; a worker or a driver with a wrong token, or none, is
//! refused. These are the commands `warden cluster hire --purpose ray` runs
//! (docs/ray-notes.md).

mod common;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{image::Remove, ray::ray_image, wait_for};

/// Ray's object store per node: small, the machine is shared.
const OBJECT_STORE_BYTES: &str = "100000000";
/// `/dev/shm` must hold the object store (Ray falls back to /tmp, slowly).
const SHM: &str = "256m";
/// Each Ray process takes a while to start on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(240);

/// Removes the test's bridge network when the test ends, pass or fail
/// (after the containers: locals drop in reverse order).
struct Network(String);

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The last lines of a command's output, for the log.
fn tail(out: &Output) -> String {
    let t = text(out);
    let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("\n")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker exec` with the given environment, bounded by coreutils `timeout`
/// inside the container so nothing here can hang the test.
fn exec(container: &str, env: &[(&str, &str)], limit_s: u64, cmd: &[&str]) -> Output {
    let mut c = Command::new("docker");
    c.arg("exec");
    for (k, v) in env {
        c.args(["-e", &format!("{k}={v}")]);
    }
    c.arg(container)
        .args(["timeout", "-k", "5", &limit_s.to_string()])
        .args(cmd);
    c.output().expect("run docker exec")
}

/// A fresh random token, as `ray get-auth-token --generate` makes them
/// (64 hex digits).
fn new_token() -> String {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ip_of(container: &str, net: &str) -> String {
    let ip = ok(
        &docker(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            container,
        ]),
        "docker inspect",
    );
    assert!(
        ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "no address: {ip:?}"
    );
    ip
}

/// A driver script: connects to the cluster, prints the number of alive
/// nodes, and where a task pinned to `pin_ip` ran.
fn driver(gcs: &str, pin_ip: &str) -> String {
    format!(
        r#"
import ray
ray.init(address="{gcs}", logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print("ALIVE", len(alive))
if len(alive) >= 2:
    @ray.remote(num_cpus=0, resources={{"node:{pin_ip}": 0.01}})
    def where():
        return ray.util.get_node_ip_address()
    print("RAN_ON", ray.get(where.remote(), timeout=120))
"#
    )
}

/// The number in `ALIVE n`, if the driver got that far.
fn alive(out: &str) -> Option<usize> {
    out.lines()
        .find_map(|l| l.strip_prefix("ALIVE "))
        .and_then(|n| n.trim().parse().ok())
}

/// Whether Ray turned the command away for its token: the GCS answers
/// `InvalidAuthToken` (a wrong token, or none sent), or the client side
/// stops first (token mode on, no token given); both raise Ray's
/// `AuthenticationError`.
fn refused(out: &Output) -> bool {
    !out.status.success() && text(out).contains("AuthenticationError")
}

#[test]
fn two_node_cluster_with_token_auth() {
    let started = Instant::now();
    let image = ray_image();
    eprintln!("image {image} ready after {:.0?}", started.elapsed());

    let tag = format!("warden-ray-{}", std::process::id());
    let net = format!("{tag}-net");
    let head = format!("{tag}-head");
    let worker = format!("{tag}-worker");
    ok(
        &docker(&["network", "create", &net]),
        "docker network create",
    );
    let _net = Network(net.clone());
    let _containers = Remove::containers(&[&head, &worker]);
    for name in [&head, &worker] {
        ok(
            &docker(&[
                "run",
                "-d",
                "--name",
                name,
                "--hostname",
                name,
                "--network",
                &net,
                "--cpus",
                "1",
                "--memory",
                "3g",
                "--shm-size",
                SHM,
                &image,
                "sleep",
                "infinity",
            ]),
            "docker run",
        );
    }
    let head_ip = ip_of(&head, &net);
    let worker_ip = ip_of(&worker, &net);
    let gcs = format!("{head_ip}:6379");
    let token = new_token();
    let auth = [
        ("RAY_AUTH_MODE", "token"),
        ("RAY_AUTH_TOKEN", token.as_str()),
    ];
    let wrong = "0".repeat(64);
    let wrong_auth = [
        ("RAY_AUTH_MODE", "token"),
        ("RAY_AUTH_TOKEN", wrong.as_str()),
    ];
    let node_args = [
        "--num-cpus",
        "1",
        "--object-store-memory",
        OBJECT_STORE_BYTES,
        "--disable-usage-stats",
    ];

    // The head, advertising its container's address (the GCS, the raylet and
    // the workers still listen on 0.0.0.0: docs/ray-notes.md).
    let t = Instant::now();
    let mut cmd = vec![
        "ray",
        "start",
        "--head",
        "--node-ip-address",
        &head_ip,
        "--port",
        "6379",
        "--include-dashboard=false",
        "--ray-client-server-port",
        "10001",
    ];
    cmd.extend(node_args);
    ok(
        &exec(&head, &auth, SLOW.as_secs(), &cmd),
        "ray start --head",
    );
    eprintln!("head started in {:.0?}", t.elapsed());

    // A worker with the wrong token does not join.
    let mut join = vec![
        "ray",
        "start",
        "--address",
        &gcs,
        "--node-ip-address",
        &worker_ip,
    ];
    join.extend(node_args);
    let t = Instant::now();
    let bad = exec(&worker, &wrong_auth, SLOW.as_secs(), &join);
    eprintln!(
        "join with a wrong token: {:.0?}\n{}",
        t.elapsed(),
        tail(&bad)
    );
    assert!(refused(&bad), "joined with a wrong token:\n{}", text(&bad));
    // Whatever it left behind goes before the real join.
    let _ = exec(&worker, &[], 60, &["ray", "stop", "--force"]);

    // Nor does one with no token at all (auth mode left unset).
    let bad = exec(&worker, &[], SLOW.as_secs(), &join);
    eprintln!("join without a token:\n{}", tail(&bad));
    assert!(refused(&bad), "joined without a token:\n{}", text(&bad));
    let _ = exec(&worker, &[], 60, &["ray", "stop", "--force"]);

    // The worker with the token joins.
    let t = Instant::now();
    ok(
        &exec(&worker, &auth, SLOW.as_secs(), &join),
        "ray start --address (worker)",
    );
    eprintln!("worker started in {:.0?}", t.elapsed());

    // A driver with the token sees two alive nodes and runs a task on the
    // worker (Ray may take a moment to list the new node).
    let script = driver(&gcs, &worker_ip);
    let out = wait_for("two alive Ray nodes", SLOW, || {
        let out = exec(&head, &auth, 180, &["python3", "-c", &script]);
        let t = text(&out);
        (out.status.success() && alive(&t) == Some(2)).then_some(t)
    });
    assert!(
        out.contains(&format!("RAN_ON {worker_ip}")),
        "task did not run on the worker:\n{out}"
    );

    // `ray status` agrees.
    let status = ok(
        &exec(&worker, &auth, 120, &["ray", "status", "--address", &gcs]),
        "ray status",
    );
    eprintln!("ray status:\n{status}");

    // A driver with a wrong token, or none, is refused.
    for (what, env) in [
        ("a wrong token", &wrong_auth[..]),
        ("no token", &[("RAY_AUTH_MODE", "token")][..]),
        ("auth mode unset", &[][..]),
    ] {
        let t = Instant::now();
        let out = exec(&worker, env, 180, &["python3", "-c", &script]);
        eprintln!("driver with {what}: {:.0?}\n{}", t.elapsed(), tail(&out));
        assert!(
            refused(&out),
            "a driver with {what} was not refused:\n{}",
            text(&out)
        );
    }

    // The Ray client server (ray://head:10001) serves a client with the
    // token; one with a wrong token gets no session (the proxy refuses it
    // and the client gives up after its connection timeout).
    let client = format!(
        "import ray\nray.init(\"ray://{head_ip}:10001\", logging_level=\"ERROR\")\n\
         print(\"CLIENT_ALIVE\", len([n for n in ray.nodes() if n[\"Alive\"]]))\n"
    );
    // The client server starts a server process per client, which on a
    // loaded 2-core machine can miss its own start deadline ("Starting Ray
    // client server failed"): that, and only that, is tried again.
    let mut out = exec(&worker, &auth, 180, &["python3", "-c", &client]);
    for _ in 0..2 {
        if out.status.success() || !text(&out).contains("Starting Ray client server failed") {
            break;
        }
        eprintln!("ray:// with the token: the client server was slow to start; again");
        out = exec(&worker, &auth, 180, &["python3", "-c", &client]);
    }
    assert!(
        out.status.success() && text(&out).contains("CLIENT_ALIVE 2"),
        "ray:// with the token:\n{}",
        text(&out)
    );
    let out = exec(&worker, &wrong_auth, 180, &["python3", "-c", &client]);
    eprintln!("ray:// with a wrong token:\n{}", tail(&out));
    assert!(
        !out.status.success() && !text(&out).contains("CLIENT_ALIVE"),
        "ray:// with a wrong token was served:\n{}",
        text(&out)
    );

    // Listeners, logged for docs/ray-notes.md: in Ray 2.60 the GCS and the
    // raylet listen on 0.0.0.0 whatever --node-ip-address says.
    for (name, ip) in [(&head, &head_ip), (&worker, &worker_ip)] {
        let listening = ok(
            &exec(name, &[], 30, &["python3", "-c", LISTENERS]),
            "list listeners",
        );
        eprintln!("{name} ({ip}) listens on:\n{listening}");
    }
    eprintln!("test done in {:.0?}", started.elapsed());
}

/// Prints `addr:port process` for every listening TCP socket, from
/// /proc/net/tcp{,6} and the sockets in /proc/*/fd.
const LISTENERS: &str = r#"
import os, socket
owner = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        name = " ".join(os.path.basename(c.decode()) for c in cmd[:3] if c)[:60]
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                owner[link[8:-1]] = name
    except OSError:
        pass
for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
    try:
        lines = open(path).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        f = line.split()
        if f[3] != "0A":
            continue
        addr, port = f[1].split(":")
        raw = bytes.fromhex(addr)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        print(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}", owner.get(f[9], "?"))
"#;
