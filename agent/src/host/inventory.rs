//! The node's inventory: the host (procfs), its GPUs (NVML), free disk,
//! Docker and TUN. Sent at Register and again whenever it changes.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use crate::{
    delivery::outbox::Outbox,
    host::gpu::{GpuSource, Inventory},
};

/// Where the Docker engine listens by default.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Gathers everything. `gpus` is NVML's answer, or why there is none.
pub fn collect(state_dir: &Path, gpus: Result<&dyn GpuSource, String>) -> pb::InventorySummary {
    let mut s = crate::host::facts::summary();
    s.cpu_model = cpu_model(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    s.disk_free_bytes = free_bytes(state_dir).unwrap_or(0);
    s.docker = match docker_version(Path::new(DOCKER_SOCKET)) {
        Ok(v) => v,
        Err(e) => format!("unreachable: {e}"),
    };
    s.tun_available = tun_available();
    match gpus.and_then(|g| g.inventory().map_err(|e| e.to_string())) {
        Ok(Inventory {
            driver_version,
            cuda_version,
            gpus,
        }) => {
            s.nvml_status = "ok".into();
            s.driver_version = driver_version;
            s.cuda_version = cuda_version;
            s.gpu_count = gpus.len() as u32;
            s.gpus = gpus;
        }
        Err(why) => s.nvml_status = why,
    }
    s
}

/// Whether `new` differs from `old` in anything but free disk space, which
/// moves all the time and is not worth a record.
pub fn changed(old: &pb::InventorySummary, new: &pb::InventorySummary) -> bool {
    let strip = |i: &pb::InventorySummary| pb::InventorySummary {
        disk_free_bytes: 0,
        ..i.clone()
    };
    strip(old) != strip(new)
}

/// Re-reads the inventory every `interval`; when it changed, publishes it
/// (the next Register carries it) and sends it as an Inventory record.
pub async fn watch(
    state_dir: PathBuf,
    gpus: Result<Arc<dyn GpuSource>, String>,
    interval: Duration,
    outbox: Outbox,
    latest: watch::Sender<pb::InventorySummary>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await; // the first tick is now: the caller has just collected
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let (dir, g) = (state_dir.clone(), gpus.clone());
        let Ok(now) = tokio::task::spawn_blocking(move || {
            collect(&dir, g.as_ref().map(|g| g.as_ref()).map_err(String::clone))
        })
        .await
        else {
            continue;
        };
        let differs = changed(&latest.borrow(), &now);
        if differs {
            tracing::info!(gpus = now.gpus.len(), nvml = %now.nvml_status, docker = %now.docker, "inventory changed");
            latest.send_replace(now.clone());
            if !outbox.emit(pb::record::Body::Inventory(now)).await {
                return;
            }
        } else {
            latest.send_modify(|i| i.disk_free_bytes = now.disk_free_bytes);
        }
    }
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "cpu model").then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// Free bytes for an unprivileged user on `path`'s filesystem (the nearest
/// existing ancestor, so it works before the state dir is created).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let st = rustix::fs::statvfs(p)?;
    Ok(st.f_bavail * st.f_frsize)
}

/// Whether a TUN device can be opened (the mesh needs it).
pub fn tun_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok()
}

/// The Docker engine's version from `GET /version` on its socket.
pub fn docker_version(socket: &Path) -> Result<String, String> {
    let v = docker_get(socket, "/version")?;
    v["Version"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no Version in the answer of {}", socket.display()))
}

/// Docker's `/info`: its runtimes, CDI directories and the rest.
pub fn docker_info(socket: &Path) -> Result<serde_json::Value, String> {
    docker_get(socket, "/info")
}

/// One GET of the Engine API over its socket, its JSON answer.
fn docker_get(socket: &Path, path: &str) -> Result<serde_json::Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    s.set_write_timeout(Some(Duration::from_secs(2))).ok();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::from_str(body)
        .map_err(|e| format!("unexpected answer from {}: {e}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_disk_alone_is_no_change() {
        let a = pb::InventorySummary {
            hostname: "h".into(),
            disk_free_bytes: 1,
            ..Default::default()
        };
        let b = pb::InventorySummary {
            disk_free_bytes: 2,
            ..a.clone()
        };
        assert!(!changed(&a, &b));
        let c = pb::InventorySummary {
            docker: "unreachable".into(),
            ..a.clone()
        };
        assert!(changed(&a, &c));
    }

    #[test]
    fn cpu_model_is_read_from_cpuinfo() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(text), "AMD EPYC 7B13");
        assert_eq!(cpu_model(""), "");
    }

    #[test]
    fn free_bytes_of_a_missing_dir_uses_its_ancestor() {
        let d = tempfile::tempdir().unwrap();
        let a = free_bytes(d.path()).unwrap();
        let b = free_bytes(&d.path().join("not/yet/made")).unwrap();
        assert!(a > 0 && b > 0);
    }

    #[test]
    fn docker_answer_is_parsed_from_a_real_socket() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut req = [0u8; 256];
            let _ = c.read(&mut req).unwrap();
            c.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Version\":\"20.10.24\"}").unwrap();
        });
        assert_eq!(docker_version(&sock).unwrap(), "20.10.24");
        t.join().unwrap();
        let err = docker_version(&d.path().join("none.sock")).unwrap_err();
        assert!(err.contains("none.sock"), "{err}");
    }
}
