//! The Docker edge against the real engine on /var/run/docker.sock, with a
//! local busybox image (no registry is needed). Every test labels what it
//! creates with its own lease, and a guard force-removes that lease's
//! containers on drop, so a failing test leaves nothing behind.

mod common;

use std::{
    collections::HashMap,
    path::Path,
    pin::Pin,
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use common::image::{busybox_image, image_exists};
use tokio_stream::{Stream, StreamExt};
use warden_agent::workloads::{
    confine::{LABEL_LEASE, LABEL_MANAGED, LABEL_NAME, LABEL_NODE},
    docker::*,
};

const SOCKET: &str = "/var/run/docker.sock";

async fn docker() -> Docker {
    Docker::connect(Path::new(SOCKET))
        .await
        .expect("connect to the Docker engine")
}

/// A name no other test (or test run) uses.
fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "warden-test-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's lease: the labels it puts on its containers, and a guard that
/// force-removes every container carrying them on drop.
struct Lease {
    id: String,
}

impl Lease {
    fn new(what: &str) -> Lease {
        Lease { id: unique(what) }
    }

    fn labels(&self, name: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_LEASE.to_owned(), self.id.clone()),
            (LABEL_NODE.to_owned(), "node-test".to_owned()),
            (LABEL_NAME.to_owned(), name.to_owned()),
        ])
    }

    /// A busybox container config running `cmd` with this lease's labels.
    fn config(&self, name: &str, cmd: &[&str], host: HostConfig) -> ContainerCreateBody {
        ContainerCreateBody {
            image: Some(busybox_image()),
            cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
            labels: Some(self.labels(name)),
            host_config: Some(host),
            ..Default::default()
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label={LABEL_LEASE}={}", self.id))
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Removes an image tag on drop.
struct Tag(String);

impl Drop for Tag {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn docker_cli(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

type Events = Pin<Box<dyn Stream<Item = Result<ContainerEvent, DockerError>> + Send>>;

/// The kinds of `id`'s events, in order, until `done` says they are enough.
async fn events_until(
    events: &mut Events,
    id: &str,
    done: impl Fn(&[EventKind]) -> bool,
) -> Vec<EventKind> {
    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&kinds) {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, events.next()).await;
        let event = match next {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => panic!("event stream failed: {e}"),
            Ok(None) => panic!("event stream ended; saw {kinds:?}"),
            Err(_) => panic!("not enough events for {id} within 20 s; saw {kinds:?}"),
        };
        if event.id == id {
            kinds.push(event.kind);
        }
    }
    kinds
}

fn died(kinds: &[EventKind]) -> bool {
    kinds.iter().any(|k| matches!(k, EventKind::Die { .. }))
}

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_and_reports_the_engine_version() {
    let d = docker().await;
    let version = d.version().await.unwrap();
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .unwrap();
    assert_eq!(version, String::from_utf8_lossy(&out.stdout).trim());

    let missing = Path::new("/nonexistent/warden-docker.sock");
    match Docker::connect(missing).await {
        Err(e @ DockerError::Connect { .. }) => {
            eprintln!("missing socket: {e}");
            assert!(
                e.to_string().contains(&missing.display().to_string()),
                "{e}"
            )
        }
        other => panic!("expected Connect error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_container_runs_is_listed_and_is_removed() {
    let d = docker().await;
    let lease = Lease::new("run");
    let name = unique("run");
    let host = HostConfig {
        memory: Some(64 * MIB),
        pids_limit: Some(64),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        ..Default::default()
    };
    let id = d
        .create_and_start(&name, lease.config(&name, &["sleep", "300"], host))
        .await
        .unwrap();

    let c = d.inspect(&id).await.unwrap();
    assert_eq!(c.id, id);
    assert_eq!(c.name, name);
    assert!(c.running);
    assert_eq!(c.exit_code, None);
    assert!(!c.oom_killed);
    assert_eq!(c.health, None);
    assert_eq!(c.labels, lease.labels(&name));
    assert_eq!(c.host_config.memory, Some(64 * MIB));
    assert_eq!(c.host_config.pids_limit, Some(64));
    assert_eq!(c.host_config.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        c.host_config.security_opt,
        Some(vec!["no-new-privileges".to_owned()])
    );

    let listed = d.list_managed().await.unwrap();
    let mine = listed.iter().find(|m| m.id == id).expect("listed");
    assert_eq!(
        mine,
        &Managed {
            id: id.clone(),
            name: name.clone(),
            labels: lease.labels(&name),
            running: true,
            state: "running".into(),
        }
    );
    assert!(listed
        .iter()
        .all(|m| m.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")));

    // sleep is PID 1 and ignores SIGTERM: Docker kills it after the grace.
    // (Until runc's init has exec'd it, PID 1 is runc's Go init, which a
    // SIGTERM does end, so wait for sleep itself.)
    common::wait_for("sleep to run", Duration::from_secs(10), || {
        let out = Command::new("docker").args(["top", &id]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("sleep 300")
            .then_some(())
    });
    let start = Instant::now();
    d.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(15),
        "stop_and_remove took {took:?}"
    );
    match d.inspect(&id).await {
        Err(DockerError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    d.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_keeps_the_stopped_container() {
    let d = docker().await;
    let lease = Lease::new("stop");
    let name = unique("stop");
    let cmd = [
        "sh",
        "-c",
        "trap 'exit 0' TERM; echo ready; sleep 300 & wait",
    ];
    let id = d
        .create_and_start(&name, lease.config(&name, &cmd, HostConfig::default()))
        .await
        .unwrap();
    // Until the trap is set, sh (PID 1) would ignore SIGTERM.
    common::wait_for("the TERM trap", Duration::from_secs(10), || {
        let out = Command::new("docker").args(["logs", &id]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("ready")
            .then_some(())
    });

    // The trap answers SIGTERM at once, well inside the grace.
    let start = Instant::now();
    d.stop(&id, Duration::from_secs(20)).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    let c = d.inspect(&id).await.unwrap();
    assert!(!c.running);
    assert_eq!(c.exit_code, Some(0));
    let listed = d.list_managed().await.unwrap();
    let mine = listed.iter().find(|m| m.id == id).expect("still listed");
    assert!(!mine.running);
    assert_eq!(mine.state, "exited");

    d.stop(&id, Duration::from_secs(1)).await.unwrap();
    d.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    match d.stop(&id, Duration::from_secs(1)).await {
        Err(DockerError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_arrives_as_events() {
    let d = docker().await;
    let lease = Lease::new("exit");
    let name = unique("exit");
    let mut events: Events = Box::pin(d.events());
    let id = d
        .create_and_start(
            &name,
            lease.config(&name, &["sh", "-c", "exit 3"], HostConfig::default()),
        )
        .await
        .unwrap();

    let kinds = events_until(&mut events, &id, died).await;
    eprintln!("events of {name}: {kinds:?}");
    let start = kinds.iter().position(|k| *k == EventKind::Start);
    assert!(
        start.is_some() && kinds.contains(&EventKind::Create),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last(),
        Some(&EventKind::Die { exit_code: Some(3) }),
        "{kinds:?}"
    );

    let c = d.inspect(&id).await.unwrap();
    assert!(!c.running, "{c:?}");
    assert_eq!(c.exit_code, Some(3), "{c:?}");
    assert!(!c.oom_killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_name_labels_and_time() {
    let d = docker().await;
    let lease = Lease::new("evlabels");
    let name = unique("evlabels");
    let mut events: Events = Box::pin(d.events());
    let before_ms = warden_agent::now_ms();
    let id = d
        .create_and_start(&name, lease.config(&name, &["true"], HostConfig::default()))
        .await
        .unwrap();
    let deadline = Duration::from_secs(20);
    let event = tokio::time::timeout(deadline, async {
        loop {
            match events.next().await {
                Some(Ok(e)) if e.id == id => return e,
                Some(Ok(_)) => {}
                other => panic!("event stream: {other:?}"),
            }
        }
    })
    .await
    .expect("an event for the container");
    assert_eq!(event.name, name);
    assert_eq!(event.labels, lease.labels(&name));
    assert!(
        event.time_unix_ms >= before_ms - 1000 && event.time_unix_ms <= warden_agent::now_ms(),
        "event time {} vs now {before_ms}",
        event.time_unix_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_is_reported() {
    let d = docker().await;
    let lease = Lease::new("oom");
    let name = unique("oom");
    let host = HostConfig {
        memory: Some(16 * MIB),
        memory_swap: Some(16 * MIB),
        ..Default::default()
    };
    // `tail` buffers an endless line (/dev/zero has no newline) until the
    // kernel kills it. It waits a moment first: on cgroup v1, containerd's
    // shim watches for OOM only once the task has started, and a process
    // killed before that yields no "oom" event and, on Docker 20.10, no
    // OOMKilled either (only exit code 137). Two seconds, because on a
    // loaded 2-core machine half a second was seen not to be enough.
    let cmd = ["sh", "-c", "sleep 2; exec tail /dev/zero"];
    let mut events: Events = Box::pin(d.events());
    let id = d
        .create_and_start(&name, lease.config(&name, &cmd, host))
        .await
        .unwrap();

    // Docker reports the OOM and the exit as they come from containerd,
    // in either order, and may report several OOMs.
    let kinds = events_until(&mut events, &id, |k| died(k) && k.contains(&EventKind::Oom)).await;
    eprintln!("events of {name}: {kinds:?}");
    let dies: Vec<_> = kinds
        .iter()
        .filter(|k| matches!(k, EventKind::Die { .. }))
        .collect();
    assert_eq!(
        dies,
        vec![&EventKind::Die {
            exit_code: Some(137)
        }],
        "{kinds:?}"
    );
    let c = d.inspect(&id).await.unwrap();
    assert_eq!(c.exit_code, Some(137));
    // Docker 20.10 sets OOMKilled only when containerd's OOM event comes
    // before the exit; the two travel separately, and under load the OOM
    // can come second (the "oom" event still arrives, OOMKilled stays false).
    let oom_first = kinds.iter().position(|k| *k == EventKind::Oom)
        < kinds
            .iter()
            .position(|k| matches!(k, EventKind::Die { .. }));
    if oom_first {
        assert!(c.oom_killed, "{kinds:?} {c:?}");
    } else {
        eprintln!(
            "oom event after die ({kinds:?}): OOMKilled is {}",
            c.oom_killed
        );
    }
    assert_eq!(c.host_config.memory, Some(16 * MIB));
    assert_eq!(c.host_config.memory_swap, Some(16 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_pull_fails_with_dockers_reason() {
    let d = docker().await;
    assert!(d.image_present(&busybox_image()).await.unwrap());
    let missing = format!("warden-test/absent-{}:1", std::process::id());
    assert!(!d.image_present(&missing).await.unwrap());

    let mut lines = Vec::new();
    let err = d
        .pull(&missing, |line| lines.push(line.to_owned()))
        .await
        .expect_err("pull without a registry");
    eprintln!("pull error: {err}");
    match &err {
        DockerError::Api { message, .. } => assert!(!message.trim().is_empty(), "{err:?}"),
        other => panic!("expected Api error, got {other:?}"),
    }
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(!d.image_present(&missing).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_archive_loads() {
    let d = docker().await;
    let base = busybox_image();
    let tag = Tag(format!("warden-test/busybox-load:{}", unique("load")));
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("image.tar");
    docker_cli(&["tag", &base, &tag.0]);
    docker_cli(&["save", "-o", archive.to_str().unwrap(), &tag.0]);
    docker_cli(&["rmi", &tag.0]);
    assert!(!d.image_present(&tag.0).await.unwrap());
    assert!(image_exists(&base), "removing a second tag kept the image");

    let loaded = d.load_image(&archive).await.unwrap();
    assert_eq!(loaded, vec![tag.0.clone()]);
    assert!(d.image_present(&tag.0).await.unwrap());

    let missing = tmp.path().join("no-such-image.tar");
    match d.load_image(&missing).await {
        Err(e @ DockerError::Archive { .. }) => {
            eprintln!("missing archive: {e}");
            assert!(
                e.to_string().contains(&missing.display().to_string()),
                "{e}"
            )
        }
        other => panic!("expected Archive error, got {other:?}"),
    }

    let garbage = tmp.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar archive").unwrap();
    match d.load_image(&garbage).await {
        Err(e @ DockerError::Api { .. }) => eprintln!("garbage archive: {e}"),
        other => panic!("expected Api error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_leaves_nothing() {
    let d = docker().await;
    let lease = Lease::new("nostart");
    let name = unique("nostart");
    let err = d
        .create_and_start(
            &name,
            lease.config(&name, &["/no/such/binary"], HostConfig::default()),
        )
        .await
        .expect_err("start of a missing binary");
    eprintln!("start error: {err}");
    assert!(matches!(err, DockerError::Api { .. }), "{err:?}");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    let listed = d.list_managed().await.unwrap();
    assert!(listed.iter().all(|m| m.name != name), "{listed:?}");

    // A name already taken: Docker's "Conflict" comes back verbatim.
    let taken = unique("taken");
    let config = || lease.config(&taken, &["sleep", "300"], HostConfig::default());
    let id = d.create_and_start(&taken, config()).await.unwrap();
    match d.create_and_start(&taken, config()).await {
        Err(DockerError::Api {
            status: Some(409),
            message,
            ..
        }) => {
            eprintln!("conflict: {message}");
            assert!(message.contains("Conflict"), "{message}")
        }
        other => panic!("expected a 409 Conflict, got {other:?}"),
    }
    d.stop_and_remove(&id, Duration::ZERO).await.unwrap();
}

/// A stand-in engine on a socket of its own: answers /_ping, then sends one
/// event and drops the connection, as a dying daemon would. Returns the
/// events request line it saw.
async fn one_event_then_gone(listener: tokio::net::UnixListener) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let request = head.lines().next().unwrap_or("").to_owned();
        if request.contains("/_ping") {
            let answer = "HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK";
            conn.write_all(answer.as_bytes()).await.unwrap();
            continue;
        }
        let event = serde_json::json!({
            "Type": "container",
            "Action": "die",
            "Actor": {"ID": "c0ffee", "Attributes": {"exitCode": "3", "name": "job", "warden.managed": "true"}},
            "scope": "local",
            "time": 1_700_000_000,
            "timeNano": 1_700_000_000_500_000_000i64,
        })
        .to_string()
            + "\n";
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
            event.len()
        );
        conn.write_all(answer.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        return request; // dropping `conn` cuts the stream mid-body
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_end_when_the_daemon_goes_away() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(one_event_then_gone(listener));

    let d = Docker::connect(&socket).await.unwrap();
    let mut events: Events = Box::pin(d.events());
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event");
    let first = first.expect("an item").expect("an event, not an error");
    assert_eq!(first.id, "c0ffee");
    assert_eq!(first.name, "job");
    assert_eq!(first.kind, EventKind::Die { exit_code: Some(3) });
    assert_eq!(first.time_unix_ms, 1_700_000_000_500);

    // The connection is cut: the stream yields an error or ends, no hang.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut items = Vec::new();
        while let Some(item) = events.next().await {
            items.push(item);
        }
        items
    })
    .await
    .expect("the stream to end once the daemon is gone");
    assert!(
        rest.iter()
            .all(|r| matches!(r, Err(DockerError::Connect { .. }))),
        "{rest:?}"
    );
    eprintln!("after the daemon went away: {rest:?}");

    let request = server.await.unwrap();
    // bollard 0.21.1 drops the version prefix (see the module's docs).
    assert!(
        request.starts_with("GET /events?") || request.starts_with("GET /v1.41/events?"),
        "{request}"
    );
    assert!(request.contains("since="), "{request}");
    assert!(request.contains("warden.managed%3Dtrue"), "{request}");
}
