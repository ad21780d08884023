//! The Docker edge: a thin async wrapper over `bollard` that executes what
//! the caller decided. It holds no policy: the caller builds every
//! container config; this module creates, starts, stops, inspects and
//! watches, and turns Docker's answers into typed values and errors a
//! supplier can act on (Docker's own message is kept verbatim).
//!
//! The engine may be older than the API version `bollard` speaks by
//! default, so `connect` asks the engine for its API version first (an
//! unversioned `GET /_ping`, as the Docker CLI does) and sets the older of
//! the two. (bollard 0.21.1 in fact sends unversioned paths: its URI
//! builder joins an absolute path onto the versioned base, which drops the
//! `/vX.Y` prefix, so the engine answers in its own current version. The
//! negotiation keeps this module right if bollard starts prefixing, and
//! doubles as the reachability check.)

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bollard::{
    errors::Error as BollardError,
    models::{
        ContainerStateStatusEnum, ContainerSummary, ContainerSummaryStateEnum, CreateImageInfo,
        EventMessage, HealthStatusEnum, NetworkCreateRequest,
    },
    query_parameters::{
        CreateContainerOptions, CreateImageOptions, EventsOptions, ImportImageOptions,
        InspectContainerOptions, InspectNetworkOptions, ListContainersOptions, ListNetworksOptions,
        LogsOptions, RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
        WaitContainerOptions,
    },
    ClientVersion, API_DEFAULT_VERSION,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::confine::LABEL_MANAGED;

/// The container types of this API, re-exported so callers build configs
/// and read inspections without depending on `bollard` themselves.
pub use bollard::models::{ContainerCreateBody, HostConfig, MountPoint};

/// Limit on how long Docker may take to answer an ordinary request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit on loading an image archive (the upload is part of the request).
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Limit on connecting to the socket and reading the engine's API version.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Read size when streaming an image archive to Docker.
const ARCHIVE_CHUNK: usize = 256 << 10;

/// Why a Docker operation failed, worded so a supplier can act on it.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine could not be reached (socket missing, refused, no answer,
    /// or the connection dropped).
    #[error("cannot reach the Docker engine at {}: {reason} (is dockerd running, and may this user open its socket?)", socket.display())]
    Connect {
        /// The socket path that was tried.
        socket: PathBuf,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// Docker answered with an error; `message` is Docker's own text
    /// (e.g. the registry's reason for a failed pull, or "Conflict. ...").
    #[error("Docker could not {what}: {message}")]
    Api {
        /// The operation, e.g. "pull image nvidia/cuda:12.4.0-base".
        what: String,
        /// HTTP status, when the error came as a response rather than
        /// mid-stream.
        status: Option<u16>,
        /// Docker's message, verbatim.
        message: String,
    },
    /// The container or image does not exist (HTTP 404).
    #[error("Docker could not {what}: {message}")]
    NotFound {
        /// The operation, e.g. "inspect container abc".
        what: String,
        /// Docker's message, verbatim ("No such container: abc").
        message: String,
    },
    /// An image archive could not be read from disk.
    #[error("cannot read image archive {}: {source}", path.display())]
    Archive {
        /// The archive file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Docker's answer could not be understood (an engine this agent does
    /// not know how to talk to).
    #[error("Docker's answer to '{what}' could not be understood: {reason}")]
    Protocol {
        /// The operation.
        what: String,
        /// What could not be understood.
        reason: String,
    },
}

/// What a host whose Docker cannot serve GPU device requests needs.
pub const GPU_RUNTIME_FIX: &str = "install the NVIDIA Container Toolkit (package nvidia-container-toolkit), run `nvidia-ctk runtime configure --runtime=docker` and restart Docker";

/// Docker's message, with what to do when it is one a supplier can fix:
/// a GPU lease on a host without the NVIDIA Container Toolkit.
fn with_fix(message: String) -> String {
    if message.contains("could not select device driver") {
        format!("{message}: this node's Docker cannot give containers GPUs; {GPU_RUNTIME_FIX} (`warden doctor` checks it)")
    } else {
        message
    }
}

/// A handle on one Docker engine; cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Docker {
    api: bollard::Docker,
    socket: Arc<Path>,
}

/// How a one-shot container ended ([`Docker::run_to_end`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ended {
    /// None: it had not exited by the limit (it was removed, killed).
    pub exit_code: Option<i64>,
    /// Its stdout, at most `max` bytes and one more when there was more.
    pub stdout: Vec<u8>,
}

/// Output read by [`Docker::logs`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logs {
    pub data: Vec<u8>,
    pub truncated: bool,
    pub last_ns: i64,
}

impl Logs {
    /// Adds one stamped line ("2026-12-02T01:20:00.123456789Z text\n") if it
    /// is later than `since_ns` and fits in `limit`; false once full.
    fn take(&mut self, line: &[u8], since_ns: i64, limit: usize) -> bool {
        let (stamp, text) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (&line[..0], line),
        };
        let ns = std::str::from_utf8(stamp)
            .ok()
            .and_then(|s| humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        if ns != 0 && ns <= since_ns {
            return true;
        }
        if self.data.len() + text.len() > limit {
            self.truncated = true;
            return false;
        }
        self.data.extend_from_slice(text);
        self.last_ns = self.last_ns.max(ns);
        true
    }
}

/// A container Warden owns, as `list_managed` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    /// Docker's container id (64 hex digits).
    pub id: String,
    /// Without Docker's leading '/'.
    pub name: String,
    /// All its labels, Warden's among them.
    pub labels: HashMap<String, String>,
    /// Whether its state is "running" (paused counts as not).
    pub running: bool,
    /// Docker's state string: "created", "running", "exited", ...
    pub state: String,
}

/// The fields of a container's inspection Warden needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspected {
    /// Docker's container id (64 hex digits).
    pub id: String,
    /// Without Docker's leading '/'.
    pub name: String,
    /// Docker's State.Running (true while paused too).
    pub running: bool,
    /// The container's init process, as this host's pid namespace sees it
    /// (while it runs).
    pub pid: Option<u32>,
    /// Set once the container has exited (state "exited" or "dead");
    /// None while it is created, running or paused.
    pub exit_code: Option<i64>,
    /// Docker's State.OOMKilled. Docker 20.10 sets it only when
    /// containerd's OOM notice arrives before the exit, which under load it
    /// may not: an `EventKind::Oom`, or exit code 137 under a memory limit,
    /// is the surer sign.
    pub oom_killed: bool,
    /// "starting" | "healthy" | "unhealthy"; None without a health check.
    pub health: Option<String>,
    /// The labels it was created with.
    pub labels: HashMap<String, String>,
    /// As Docker reports it, for confinement checks.
    pub host_config: HostConfig,
    /// What is mounted into it, as Docker reports it.
    pub mounts: Vec<MountPoint>,
}

/// One event about a Warden container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerEvent {
    /// Docker's container id.
    pub id: String,
    /// The container's name (without '/').
    pub name: String,
    /// The container's labels as the event carries them (Docker mixes its
    /// own attributes in: name, image, exitCode, signal, execID and oldName
    /// are taken out).
    pub labels: HashMap<String, String>,
    /// What happened.
    pub kind: EventKind,
    /// When Docker saw it, in milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
}

/// What happened to a container.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Created (not yet started).
    Create,
    /// Its main process started.
    Start,
    /// Its main process exited; 137 is SIGKILL (stop after the grace, or
    /// the OOM killer).
    Die { exit_code: Option<i64> },
    /// The kernel's OOM killer acted in its cgroup. It may come before or
    /// after `Die`, more than once, and (cgroup v1: containerd watches only
    /// once the task has started) not at all for a process killed within
    /// moments of starting.
    Oom,
    /// "healthy" | "unhealthy" | "starting" (from "health_status: healthy").
    Health(String),
    /// A stop request completed.
    Stop,
    /// A signal was sent to it (by stop, kill or force-remove).
    Kill,
    /// Removed.
    Destroy,
    /// Any other action, verbatim ("attach", "exec_create: ...", ...).
    Other(String),
}

impl Docker {
    /// Connects over the unix socket and negotiates the API version: the
    /// engine may be older than `bollard` (API 1.41 for Docker 20.10), and a
    /// request with a newer version prefix fails with "client version is
    /// too new". Fails with `Connect` if the engine does not answer.
    pub async fn connect(socket: &Path) -> Result<Docker, DockerError> {
        let connect_err = |reason: String| DockerError::Connect {
            socket: socket.to_owned(),
            reason,
        };
        let (major, minor) = engine_api_version(socket).await.map_err(connect_err)?;
        let version = if (major, minor)
            < (
                API_DEFAULT_VERSION.major_version,
                API_DEFAULT_VERSION.minor_version,
            ) {
            ClientVersion {
                major_version: major,
                minor_version: minor,
            }
        } else {
            *API_DEFAULT_VERSION
        };
        let path = socket
            .to_str()
            .ok_or_else(|| connect_err("the socket path is not valid UTF-8".into()))?;
        let api = bollard::Docker::connect_with_unix(path, REQUEST_TIMEOUT.as_secs(), &version)
            .map_err(|e| connect_err(crate::error_chain(&e)))?;
        Ok(Docker {
            api,
            socket: Arc::from(socket),
        })
    }

    /// Engine version string, e.g. "20.10.24+dfsg1", for inventory and
    /// diagnostics.
    pub async fn version(&self) -> Result<String, DockerError> {
        let what = "report its version";
        let v = self.api.version().await.map_err(|e| self.error(what, e))?;
        v.version.ok_or_else(|| DockerError::Protocol {
            what: what.into(),
            reason: "no Version field".into(),
        })
    }

    /// Whether an image is present locally, so the caller can skip a pull.
    pub async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.api.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match self.error(format!("inspect image {image}"), e) {
                DockerError::NotFound { .. } => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Pulls an image (":latest" when it names no tag or digest, as
    /// `docker pull` does; Docker would otherwise pull every tag), calling
    /// `progress` with each progress message (e.g.
    /// "a1b2c3: Downloading [=====>      ] 12.6MB/50.3MB"). A failed pull
    /// returns the registry's or daemon's reason verbatim inside the error.
    pub async fn pull(
        &self,
        image: &str,
        mut progress: impl FnMut(&str) + Send,
    ) -> Result<(), DockerError> {
        let options = CreateImageOptions {
            from_image: Some(with_default_tag(image)),
            ..Default::default()
        };
        let mut stream = self.api.create_image(Some(options), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| self.error(format!("pull image {image}"), e))?;
            if let Some(line) = progress_line(&info) {
                progress(&line);
            }
        }
        Ok(())
    }

    /// Loads an image archive (the `docker save` / `docker load` tar
    /// format) from a file, for nodes that receive images without a
    /// registry; returns the names (repo:tag, or ids for untagged images)
    /// Docker reports as loaded.
    pub async fn load_image(&self, archive: &Path) -> Result<Vec<String>, DockerError> {
        let archive_err = |source| DockerError::Archive {
            path: archive.to_owned(),
            source,
        };
        let file = tokio::fs::File::open(archive).await.map_err(archive_err)?;
        // A read error reaches Docker only as a broken upload; keep the
        // original to report it against the file.
        let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        let body = archive_stream(file, read_error.clone());
        let taken = || read_error.lock().ok().and_then(|mut e| e.take());
        let options = ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let api = self.api.clone().with_timeout(LOAD_TIMEOUT);
        let mut answers = api.import_image_stream(options, body, None);
        let mut loaded = Vec::new();
        while let Some(item) = answers.next().await {
            match item {
                Ok(info) => {
                    loaded.extend(info.stream.as_deref().map(loaded_names).unwrap_or_default())
                }
                Err(e) => {
                    if let Some(source) = taken() {
                        return Err(archive_err(source));
                    }
                    return Err(self.error(format!("load image archive {}", archive.display()), e));
                }
            }
        }
        if let Some(source) = taken() {
            return Err(archive_err(source));
        }
        Ok(loaded)
    }

    /// Creates a container with this exact config and name, then starts it;
    /// returns the container id. If start fails, the created container is
    /// removed (force, volumes) before the error is returned, so nothing is
    /// left behind.
    pub async fn create_and_start(
        &self,
        name: &str,
        config: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let created = self
            .api
            .create_container(Some(options), config)
            .await
            .map_err(|e| self.error(format!("create container {name}"), e))?;
        for warning in &created.warnings {
            tracing::warn!(container = name, "Docker warns: {warning}");
        }
        if let Err(e) = self
            .api
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
        {
            let err = self.error(format!("start container {name}"), e);
            if let Err(rm) = self.remove(&created.id).await {
                tracing::warn!(
                    container = name,
                    "could not remove the container that failed to start: {rm}"
                );
            }
            return Err(err);
        }
        Ok(created.id)
    }

    /// Creates, starts and waits up to `limit` for a one-shot container to
    /// exit; then its exit code (None: still running at `limit`, killed)
    /// and its stdout, cut at `max` bytes. The container is removed in every
    /// case, so nothing is left behind.
    pub async fn run_to_end(
        &self,
        name: &str,
        config: ContainerCreateBody,
        limit: Duration,
        max: usize,
    ) -> Result<Ended, DockerError> {
        let id = self.create_and_start(name, config).await?;
        let api = self.api.clone().with_timeout(limit + REQUEST_TIMEOUT);
        let waited = tokio::time::timeout(limit, async {
            let mut wait = api.wait_container(&id, None::<WaitContainerOptions>);
            match wait.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                // bollard reports a non-zero exit as an error carrying the code.
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
                Some(Err(e)) => Err(self.error(format!("wait for container {name}"), e)),
                None => Err(DockerError::Api {
                    what: format!("wait for container {name}"),
                    status: None,
                    message: "the engine ended the wait without a status".into(),
                }),
            }
        })
        .await;
        let result = match waited {
            Err(_) => Ok(Ended {
                exit_code: None,
                stdout: Vec::new(),
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(code)) => self.stdout(&id, max).await.map(|stdout| Ended {
                exit_code: Some(code),
                stdout,
            }),
        };
        if let Err(e) = self.remove(&id).await {
            tracing::warn!(
                container = name,
                "could not remove a finished container: {e}"
            );
        }
        result
    }

    /// A container's stdout, at most `max` bytes (more is cut).
    async fn stdout(&self, id: &str, max: usize) -> Result<Vec<u8>, DockerError> {
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: false,
            tail: "all".into(),
            ..Default::default()
        };
        let mut stream = self.api.logs(id, Some(options));
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let bytes = chunk
                .map_err(|e| self.error(format!("read the output of container {id}"), e))?
                .into_bytes();
            out.extend_from_slice(&bytes[..bytes.len().min(max + 1 - out.len().min(max + 1))]);
            if out.len() > max {
                break;
            }
        }
        Ok(out)
    }

    /// Stops (SIGTERM or the image's stop signal, then SIGKILL after
    /// `grace`) and removes the container with its anonymous volumes. A
    /// container already gone is not an error; a stopped one is just removed.
    pub async fn stop_and_remove(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        match self.stop(id, grace).await {
            Ok(()) => {}
            Err(DockerError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        match self.remove(id).await {
            Ok(()) | Err(DockerError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops (stop signal, then SIGKILL after `grace`, rounded up to whole
    /// seconds) without removing, so its state and logs stay inspectable.
    /// An already-stopped container is not an error; a missing one is.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let options = StopContainerOptions {
            t: Some(grace_seconds(grace)),
            signal: None,
        };
        // Docker answers only once the container has stopped.
        let api = self.api.clone().with_timeout(grace + REQUEST_TIMEOUT);
        api.stop_container(id, Some(options))
            .await
            .map_err(|e| self.error(format!("stop container {id}"), e))
    }

    /// Every container (running or not) labelled warden.managed=true, to
    /// reconcile after a restart.
    pub async fn list_managed(&self) -> Result<Vec<Managed>, DockerError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(managed_filter(false)),
            ..Default::default()
        };
        let list = self
            .api
            .list_containers(Some(options))
            .await
            .map_err(|e| self.error("list containers", e))?;
        Ok(list
            .into_iter()
            .map(|c| {
                let state = c.state.map(|s| s.to_string()).unwrap_or_default();
                Managed {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default(),
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                    state,
                }
            })
            .collect())
    }

    /// Every running container, managed or not.
    async fn running(&self) -> Result<Vec<ContainerSummary>, DockerError> {
        self.api
            .list_containers(Some(ListContainersOptions {
                all: false,
                ..Default::default()
            }))
            .await
            .map_err(|e| self.error("list containers", e))
    }

    /// The ids of every running container (managed or not): the time-lock
    /// task inspects them for GPU device requests.
    pub async fn list_running(&self) -> Result<Vec<String>, DockerError> {
        let list = self.running().await?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Creates a lease's own bridge network (labelled like its containers)
    /// unless one of that name exists; returns whether it was created.
    /// Docker keeps separate bridge networks apart (its isolation chains),
    /// so one lease's containers have no route to another's.
    pub async fn ensure_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<bool, DockerError> {
        match self
            .api
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => return Ok(false),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(self.error(format!("inspect network {name}"), e)),
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            internal: Some(false),
            attachable: Some(false),
            enable_ipv6: Some(false),
            labels: Some(labels),
            options: Some(HashMap::from([(
                // Containers of one lease talk to each other.
                "com.docker.network.bridge.enable_icc".to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        };
        self.api
            .create_network(request)
            .await
            .map_err(|e| self.error(format!("create network {name}"), e))?;
        Ok(true)
    }

    /// The host interface of a bridge network: the name it was given, or
    /// Docker's `br-` and the first 12 characters of its id.
    pub async fn network_bridge(&self, name: &str) -> Result<String, DockerError> {
        let net = self
            .api
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
            .map_err(|e| self.error(format!("inspect network {name}"), e))?;
        let given = net
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.bridge.name"))
            .filter(|b| !b.is_empty());
        match (given, net.id.as_deref()) {
            (Some(b), _) => Ok(b.clone()),
            (None, Some(id)) if id.len() >= 12 => Ok(format!("br-{}", &id[..12])),
            _ => Err(DockerError::Api {
                what: format!("inspect network {name}"),
                status: None,
                message: "it has no id".into(),
            }),
        }
    }

    /// Removes a network; one already gone is not an error.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.api.remove_network(name).await {
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(self.error(format!("remove network {name}"), e)),
        }
    }

    /// Every network labelled warden.managed=true: name and labels.
    pub async fn list_managed_networks(
        &self,
    ) -> Result<Vec<(String, HashMap<String, String>)>, DockerError> {
        let list = self
            .api
            .list_networks(Some(ListNetworksOptions {
                filters: Some(managed_filter(false)),
            }))
            .await
            .map_err(|e| self.error("list networks", e))?;
        Ok(list
            .into_iter()
            .map(|n| (n.name.unwrap_or_default(), n.labels.unwrap_or_default()))
            .collect())
    }

    /// The host sources of every writable bind mount and volume of the
    /// containers that can run now (running, paused, restarting; managed
    /// or not), resolved where they exist: what a container could change
    /// below while another container's mount is being made.
    pub async fn writable_mount_sources(&self) -> Result<Vec<PathBuf>, DockerError> {
        let list = self.running().await?;
        Ok(list
            .into_iter()
            .flat_map(|c| c.mounts.unwrap_or_default())
            .filter(|m| m.rw.unwrap_or(true))
            .filter_map(|m| m.source.filter(|s| !s.is_empty()))
            .map(|s| std::fs::canonicalize(&s).unwrap_or_else(|_| PathBuf::from(s)))
            .collect())
    }

    /// Runs `cmd` inside a running container (as its own user, never
    /// privileged) and returns its exit code and output, at most `limit`
    /// bytes of it; gives up after `wait`.
    pub async fn exec_output(
        &self,
        id: &str,
        cmd: Vec<String>,
        limit: usize,
        wait: Duration,
    ) -> Result<(i64, String), DockerError> {
        use bollard::exec::{StartExecOptions, StartExecResults};
        let what = || format!("exec in container {id}");
        // `output` chunks: stdout and stderr alike.
        let exec = self
            .api
            .create_exec(
                id,
                bollard::models::ExecConfig {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    privileged: Some(false),
                    cmd: Some(cmd),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.error(what(), e))?;
        let run = async {
            let mut out = Vec::new();
            if let StartExecResults::Attached { mut output, .. } = self
                .api
                .start_exec(&exec.id, None::<StartExecOptions>)
                .await
                .map_err(|e| self.error(what(), e))?
            {
                while let Some(chunk) = output.next().await {
                    let chunk = chunk.map_err(|e| self.error(what(), e))?;
                    let bytes = chunk.into_bytes();
                    let room = limit.saturating_sub(out.len());
                    out.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
            }
            let code = self
                .api
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| self.error(what(), e))?
                .exit_code
                .unwrap_or(-1);
            Ok((code, String::from_utf8_lossy(&out).into_owned()))
        };
        tokio::time::timeout(wait, run)
            .await
            .map_err(|_| DockerError::Api {
                what: what(),
                status: None,
                message: format!("no answer within {}s", wait.as_secs()),
            })?
    }

    /// A container's output (stdout and stderr, in order): the last `tail`
    /// lines (0: all) stamped after `since_ns` (ns since the epoch; 0: from
    /// the start), at most `limit` bytes of them, without Docker's stamps.
    /// Also whether lines were left out for room, and the stamp (ns) of the
    /// last line given.
    pub async fn logs(
        &self,
        id: &str,
        tail: u32,
        since_ns: i64,
        limit: usize,
    ) -> Result<Logs, DockerError> {
        let what = || format!("read the logs of container {id}");
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            // Docker takes whole seconds; the rest is filtered by stamp below.
            since: i32::try_from(since_ns / 1_000_000_000).unwrap_or(i32::MAX),
            timestamps: true,
            tail: if tail == 0 {
                "all".into()
            } else {
                tail.to_string()
            },
            ..Default::default()
        };
        let mut stream = self.api.logs(id, Some(options));
        let mut out = Logs::default();
        let mut partial = Vec::new();
        while let Some(chunk) = stream.next().await {
            partial.extend_from_slice(&chunk.map_err(|e| self.error(what(), e))?.into_bytes());
            // Whole lines only: a line split between chunks waits for its end.
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                if !out.take(&line, since_ns, limit) {
                    return Ok(out);
                }
            }
        }
        if !partial.is_empty() {
            partial.push(b'\n');
            out.take(&partial, since_ns, limit);
        }
        Ok(out)
    }

    /// Inspects one container: the fields Warden needs to report its state
    /// and check its confinement.
    pub async fn inspect(&self, id: &str) -> Result<Inspected, DockerError> {
        let c = self
            .api
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.error(format!("inspect container {id}"), e))?;
        let state = c.state.unwrap_or_default();
        let exited = matches!(
            state.status,
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
        );
        Ok(Inspected {
            id: c.id.unwrap_or_default(),
            name: c
                .name
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default(),
            running: state.running.unwrap_or(false),
            pid: state
                .pid
                .and_then(|p| u32::try_from(p).ok())
                .filter(|p| *p > 0),
            exit_code: if exited { state.exit_code } else { None },
            oom_killed: state.oom_killed.unwrap_or(false),
            health: state
                .health
                .and_then(|h| h.status)
                .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
                .map(|s| s.to_string()),
            labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
            host_config: c.host_config.unwrap_or_default(),
            mounts: c.mounts.unwrap_or_default(),
        })
    }

    /// Docker's event stream for containers labelled warden.managed=true,
    /// mapped to `ContainerEvent`, so the caller learns of exits, OOMs and
    /// health changes as they happen. Events count from this call, even
    /// though the request goes out on the first poll (it asks Docker for
    /// events since now, by this host's clock, which a local engine
    /// shares), so a caller may subscribe, then list, then poll.
    /// The stream ends, or yields an error, when the daemon goes away; the
    /// caller then reconnects and reconciles with `list_managed`.
    pub fn events(
        &self,
    ) -> impl Stream<Item = Result<ContainerEvent, DockerError>> + Send + 'static {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
            .ok();
        let options = EventsOptions {
            since,
            until: None,
            filters: Some(managed_filter(true)),
        };
        let this = self.clone();
        self.api.events(Some(options)).filter_map(move |item| {
            let out = match item {
                Ok(message) => to_event(message).map(Ok),
                Err(e) => Some(Err(this.error("stream events", e))),
            };
            futures::future::ready(out)
        })
    }

    /// Removes a container with its anonymous volumes, killing it if needed.
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions {
            v: true,
            force: true,
            link: false,
        };
        self.api
            .remove_container(id, Some(options))
            .await
            .map_err(|e| self.error(format!("remove container {id}"), e))
    }

    /// Sorts a bollard error into the variant a caller can act on.
    fn error(&self, what: impl Into<String>, e: BollardError) -> DockerError {
        let what = what.into();
        match e {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => DockerError::NotFound { what, message },
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => DockerError::Api {
                what,
                status: Some(status_code),
                message: with_fix(message),
            },
            BollardError::DockerStreamError { error } => DockerError::Api {
                what,
                status: None,
                message: error,
            },
            BollardError::DockerContainerWaitError { error, .. } => DockerError::Api {
                what,
                status: None,
                message: error,
            },
            e @ (BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::IOError { .. }
            | BollardError::SocketNotFoundError(_)
            | BollardError::RequestTimeoutError) => DockerError::Connect {
                socket: self.socket.to_path_buf(),
                reason: format!("{what}: {}", crate::error_chain(&e)),
            },
            e => DockerError::Protocol {
                what,
                reason: crate::error_chain(&e),
            },
        }
    }
}

/// Asks the engine for its API version with an unversioned `GET /_ping`
/// (every engine answers it, whatever version it speaks).
async fn engine_api_version(socket: &Path) -> Result<(usize, usize), String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream
            .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.take(64 << 10).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(PING_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer to /_ping within {PING_TIMEOUT:?}")),
    };
    let text = String::from_utf8_lossy(&answer);
    api_version_header(&text).ok_or_else(|| {
        let status = text.lines().next().unwrap_or("").trim();
        format!("the engine did not report its API version (answer to /_ping: {status:?})")
    })
}

/// The `Api-Version` header of an HTTP answer, as (major, minor).
fn api_version_header(answer: &str) -> Option<(usize, usize)> {
    let head = answer.split("\r\n\r\n").next()?;
    let value = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("api-version")
            .then(|| value.trim())
    })?;
    let (major, minor) = value.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The label filter for Warden's containers (`type=container` for events).
fn managed_filter(events: bool) -> HashMap<String, Vec<String>> {
    let mut filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")])]);
    if events {
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
    }
    filters
}

/// Docker's stop timeout is whole seconds; round a grace period up.
fn grace_seconds(grace: Duration) -> i32 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// `image` with ":latest" when it names neither a tag nor a digest.
fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// One pull progress message as text: "id: status [bar] current/total".
fn progress_line(info: &CreateImageInfo) -> Option<String> {
    let status = info.status.as_deref()?;
    let mut line = match info.id.as_deref() {
        Some(id) if !id.is_empty() => format!("{id}: {status}"),
        _ => status.to_owned(),
    };
    let detail = info.progress_detail.as_ref();
    let current = detail.and_then(|d| d.current).unwrap_or(0);
    let total = detail.and_then(|d| d.total).unwrap_or(0);
    if total > 0 {
        const WIDTH: i64 = 20;
        let filled = (current.clamp(0, total) * WIDTH / total).max(1);
        let bar = format!(
            "{}>{}",
            "=".repeat((filled - 1) as usize),
            " ".repeat((WIDTH - filled) as usize)
        );
        line.push_str(&format!(" [{bar}] {}/{}", human(current), human(total)));
    } else if current > 0 {
        line.push_str(&format!(" {}", human(current)));
    }
    Some(line)
}

/// Bytes in Docker's decimal units ("12.6MB").
fn human(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// The names in `docker load`'s output lines ("Loaded image: repo:tag",
/// "Loaded image ID: sha256:...").
fn loaded_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            line.strip_prefix("Loaded image: ")
                .or_else(|| line.strip_prefix("Loaded image ID: "))
                .map(|name| name.trim().to_owned())
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The file as a stream of chunks; a read error ends it, and the original
/// error is kept in `failed`.
fn archive_stream(
    file: tokio::fs::File,
    failed: Arc<Mutex<Option<std::io::Error>>>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(Some(file), move |file| {
        let failed = failed.clone();
        async move {
            let mut file = file?;
            let mut buf = vec![0u8; ARCHIVE_CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some(file)))
                }
                Err(e) => {
                    let relayed = std::io::Error::new(e.kind(), e.to_string());
                    if let Ok(mut slot) = failed.lock() {
                        *slot = Some(e);
                    }
                    Some((Err(relayed), None))
                }
            }
        }
    })
}

/// Attribute keys Docker adds to container events besides the labels.
const DOCKER_ATTRIBUTES: [&str; 6] = ["name", "image", "exitCode", "signal", "execID", "oldName"];

/// A Docker event message as a `ContainerEvent`; None without a container id.
fn to_event(message: EventMessage) -> Option<ContainerEvent> {
    let actor = message.actor?;
    let id = actor.id.filter(|id| !id.is_empty())?;
    let mut labels = actor.attributes.unwrap_or_default();
    let kind = event_kind(message.action.as_deref().unwrap_or(""), &labels);
    let name = labels.get("name").cloned().unwrap_or_default();
    for key in DOCKER_ATTRIBUTES {
        labels.remove(key);
    }
    let time_unix_ms = message
        .time_nano
        .map(|ns| ns / 1_000_000)
        .or(message.time.map(|s| s * 1000))
        .unwrap_or(0);
    Some(ContainerEvent {
        id,
        name,
        labels,
        kind,
        time_unix_ms,
    })
}

/// An event's action and attributes as an `EventKind`.
fn event_kind(action: &str, attributes: &HashMap<String, String>) -> EventKind {
    match action {
        "create" => EventKind::Create,
        "start" => EventKind::Start,
        "die" => EventKind::Die {
            exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
        },
        "oom" => EventKind::Oom,
        "stop" => EventKind::Stop,
        "kill" => EventKind::Kill,
        "destroy" => EventKind::Destroy,
        _ => match action.strip_prefix("health_status:") {
            Some(status) => EventKind::Health(status.trim().to_owned()),
            None => EventKind::Other(action.to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_taken_after_their_stamp_and_within_the_limit() {
        let mut l = Logs::default();
        assert!(l.take(b"2026-12-02T01:20:00.500000000Z one\n", 0, 100));
        // At or before `since`: left out (it was given last time).
        let mut again = Logs::default();
        assert!(again.take(b"2026-12-02T01:20:00.500000000Z one\n", l.last_ns, 100));
        assert!(again.data.is_empty());
        assert!(l.take(b"2026-12-02T01:20:01.000000000Z two\n", 0, 100));
        assert_eq!(l.data, b"one\ntwo\n");
        assert_eq!(l.last_ns, 1_796_174_401_000_000_000);
        // Full: stops and says so.
        assert!(!l.take(b"2026-12-02T01:20:02.000000000Z three\n", 0, 10));
        assert!(l.truncated);
        assert_eq!(l.data, b"one\ntwo\n");
    }

    #[test]
    fn a_gpu_request_docker_cannot_serve_says_what_to_install() {
        let m =
            with_fix("could not select device driver \"nvidia\" with capabilities: [[gpu]]".into());
        assert!(
            m.contains("nvidia-container-toolkit") && m.contains("warden doctor"),
            "{m}"
        );
        assert_eq!(with_fix("Conflict.".into()), "Conflict.");
    }
    use crate::workloads::confine::LABEL_LEASE;
    use bollard::models::{EventActor, ProgressDetail};

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn event_kinds() {
        let none = HashMap::new();
        assert_eq!(
            event_kind("die", &attrs(&[("exitCode", "137"), ("name", "x")])),
            EventKind::Die {
                exit_code: Some(137)
            }
        );
        assert_eq!(event_kind("die", &none), EventKind::Die { exit_code: None });
        assert_eq!(
            event_kind("die", &attrs(&[("exitCode", "nope")])),
            EventKind::Die { exit_code: None }
        );
        assert_eq!(event_kind("oom", &none), EventKind::Oom);
        assert_eq!(
            event_kind("health_status: unhealthy", &none),
            EventKind::Health("unhealthy".into())
        );
        assert_eq!(
            event_kind("health_status: healthy", &none),
            EventKind::Health("healthy".into())
        );
        assert_eq!(event_kind("create", &none), EventKind::Create);
        assert_eq!(event_kind("start", &none), EventKind::Start);
        assert_eq!(event_kind("stop", &none), EventKind::Stop);
        assert_eq!(
            event_kind("kill", &attrs(&[("signal", "15")])),
            EventKind::Kill
        );
        assert_eq!(event_kind("destroy", &none), EventKind::Destroy);
        assert_eq!(
            event_kind("attach", &none),
            EventKind::Other("attach".into())
        );
        assert_eq!(
            event_kind("exec_create: sh -c true", &none),
            EventKind::Other("exec_create: sh -c true".into())
        );
        assert_eq!(event_kind("", &none), EventKind::Other(String::new()));
    }

    #[test]
    fn event_from_message() {
        let message = EventMessage {
            action: Some("die".into()),
            actor: Some(EventActor {
                id: Some("abc".into()),
                attributes: Some(attrs(&[
                    ("exitCode", "3"),
                    ("image", "busybox"),
                    ("name", "job-1"),
                    (LABEL_MANAGED, "true"),
                    (LABEL_LEASE, "L1"),
                ])),
            }),
            time: Some(1_700_000_000),
            time_nano: Some(1_700_000_000_123_456_789),
            ..Default::default()
        };
        assert_eq!(
            to_event(message),
            Some(ContainerEvent {
                id: "abc".into(),
                name: "job-1".into(),
                labels: attrs(&[(LABEL_MANAGED, "true"), (LABEL_LEASE, "L1")]),
                kind: EventKind::Die { exit_code: Some(3) },
                time_unix_ms: 1_700_000_000_123,
            })
        );
        let seconds_only = EventMessage {
            action: Some("start".into()),
            actor: Some(EventActor {
                id: Some("abc".into()),
                attributes: None,
            }),
            time: Some(5),
            ..Default::default()
        };
        assert_eq!(to_event(seconds_only).map(|e| e.time_unix_ms), Some(5000));
        assert_eq!(to_event(EventMessage::default()), None);
    }

    #[test]
    fn api_version_from_ping() {
        let answer = "HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nServer: Docker/20.10.24\r\n\r\nOK";
        assert_eq!(api_version_header(answer), Some((1, 41)));
        assert_eq!(
            api_version_header("HTTP/1.1 200 OK\r\napi-version:1.53\r\n\r\n"),
            Some((1, 53))
        );
        assert_eq!(
            api_version_header("HTTP/1.0 200 OK\r\n\r\nApi-Version: 1.41"),
            None
        );
        assert_eq!(
            api_version_header("HTTP/1.0 200 OK\r\nApi-Version: x\r\n\r\n"),
            None
        );
    }

    #[test]
    fn default_tag() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(with_default_tag("busybox:1.36"), "busybox:1.36");
        assert_eq!(
            with_default_tag("localhost:5000/team/app"),
            "localhost:5000/team/app:latest"
        );
        assert_eq!(
            with_default_tag("localhost:5000/app:2"),
            "localhost:5000/app:2"
        );
        assert_eq!(
            with_default_tag("app@sha256:0123abcd"),
            "app@sha256:0123abcd"
        );
    }

    #[test]
    fn progress_lines() {
        let info = |id: Option<&str>, status: Option<&str>, current, total| CreateImageInfo {
            id: id.map(Into::into),
            status: status.map(Into::into),
            progress_detail: Some(ProgressDetail { current, total }),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&info(
                Some("a1b2"),
                Some("Downloading"),
                Some(12_600_000),
                Some(50_300_000)
            ))
            .as_deref(),
            Some("a1b2: Downloading [====>               ] 12.6MB/50.3MB")
        );
        assert_eq!(
            progress_line(&info(Some("a1b2"), Some("Pull complete"), None, None)).as_deref(),
            Some("a1b2: Pull complete")
        );
        assert_eq!(
            progress_line(&info(
                None,
                Some("Pulling from library/busybox"),
                None,
                None
            ))
            .as_deref(),
            Some("Pulling from library/busybox")
        );
        assert_eq!(
            progress_line(&info(Some("a1"), Some("Extracting"), Some(900), None)).as_deref(),
            Some("a1: Extracting 900B")
        );
        assert_eq!(progress_line(&info(None, None, None, None)), None);
    }

    #[test]
    fn loaded_image_names() {
        assert_eq!(
            loaded_names("Loaded image: warden-test/busybox:1\n"),
            vec!["warden-test/busybox:1".to_owned()]
        );
        assert_eq!(
            loaded_names("Loaded image ID: sha256:abc\nLoaded image: a:b\n"),
            vec!["sha256:abc".to_owned(), "a:b".to_owned()]
        );
        assert!(loaded_names("something else\n").is_empty());
    }

    #[test]
    fn grace_rounds_up() {
        assert_eq!(grace_seconds(Duration::ZERO), 0);
        assert_eq!(grace_seconds(Duration::from_millis(1)), 1);
        assert_eq!(grace_seconds(Duration::from_secs(10)), 10);
        assert_eq!(grace_seconds(Duration::from_secs(u64::MAX)), i32::MAX);
    }
}
