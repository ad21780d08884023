//! How a renter's container is confined: which specs are refused, and the
//! Docker configuration the agent builds for the ones it runs.
//!
//! Pure: a spec and the agent's config in, a refusal or a Docker config
//! out. Everything a spec may ask that could reach the host (privileged
//! mode, host namespaces, devices, capabilities, host paths, the Docker
//! socket) is refused here, before anything is created.

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use bollard::models::{
    ContainerCreateBody, DeviceRequest, EndpointSettings, HostConfig, Mount, MountType,
    NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use serde::{Deserialize, Serialize};
use warden_proto::pb;

/// Label marking a container as Warden's (value `"true"`): the filter for
/// listing and events, so Warden never touches what it does not own.
pub const LABEL_MANAGED: &str = "warden.managed";
/// Label carrying the lease a container runs for, to map it back after a restart.
pub const LABEL_LEASE: &str = "warden.lease";
/// Label carrying the node id that started the container.
pub const LABEL_NODE: &str = "warden.node";
/// Label carrying Warden's own name for the container.
pub const LABEL_NAME: &str = "warden.name";

/// The renter's containers: where Docker is and what they may have.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadConfig {
    pub docker_socket: PathBuf,
    /// Host paths (and what is below them) a container may bind-mount.
    /// Empty: none. The Docker socket is refused whatever this says.
    pub allowed_host_paths: Vec<PathBuf>,
    /// Capabilities a container may add beyond the default set.
    pub allowed_capabilities: Vec<String>,
    /// Memory limit of a container whose spec gives none; 0: 90 % of the host's memory.
    pub default_memory_bytes: u64,
    pub pids_limit: i64,
    /// SIGTERM, then SIGKILL after this long, when a lease ends.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Docker's device driver for GPU requests.
    pub gpu_driver: String,
    /// The host address a container's published ports bind to; loopback
    /// unless the operator opens them (`0.0.0.0`, or one address).
    pub publish_address: std::net::IpAddr,
    /// The lowest host port a container may publish (0 lets Docker choose
    /// one above it anyway).
    pub min_host_port: u16,
    /// Largest tolerated gap between a command's expiry and our clock,
    /// on top of its own expiry (clocks differ).
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Whether each lease gets an encrypted scratch volume at `/scratch`
    /// (`scratch`): `auto` where gocryptfs works, `required`, or `off`.
    pub scratch: super::scratch::ScratchMode,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            allowed_host_paths: Vec::new(),
            allowed_capabilities: Vec::new(),
            default_memory_bytes: 0,
            pids_limit: 4096,
            stop_grace: Duration::from_secs(10),
            gpu_driver: "nvidia".into(),
            publish_address: std::net::Ipv4Addr::LOCALHOST.into(),
            min_host_port: 1024,
            clock_skew: Duration::from_secs(5),
            scratch: super::scratch::ScratchMode::Auto,
        }
    }
}

/// Capabilities every container keeps (all others are dropped): what
/// ordinary images need to start as root and drop to a user, and nothing
/// that reaches beyond the container.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
];

/// Where Docker's socket lives on common hosts; never mountable.
const DOCKER_SOCKETS: &[&str] = &["/var/run/docker.sock", "/run/docker.sock"];

/// Capabilities no config may allow a container, each with what it gives:
/// every one of them reaches past the container to the host (or is all of
/// them). `workload.allowed_capabilities` naming one is refused at start
/// and at reload, and a spec asking for one is refused whatever the config.
pub const FORBIDDEN_CAPABILITIES: &[(&str, &str)] = &[
    ("ALL", "every capability, the host included"),
    (
        "SYS_ADMIN",
        "mounts, namespaces and most of the kernel: the host",
    ),
    ("SYS_MODULE", "loading kernel modules"),
    ("SYS_RAWIO", "raw I/O ports and memory"),
    (
        "SYS_PTRACE",
        "tracing the agent and other tenants' processes",
    ),
    (
        "DAC_READ_SEARCH",
        "open_by_handle_at, which reads any host file",
    ),
    ("SYS_BOOT", "rebooting the host"),
    (
        "SYS_TIME",
        "setting the host's clock, which the proofs rely on",
    ),
    ("MAC_ADMIN", "changing the host's MAC policy"),
    ("MAC_OVERRIDE", "bypassing the host's MAC policy"),
    ("BPF", "loading BPF programs into the host kernel"),
    ("PERFMON", "observing the host and other tenants"),
    (
        "NET_ADMIN",
        "changing network interfaces, routes and filters",
    ),
    ("SYSLOG", "the kernel log and its addresses"),
    ("AUDIT_CONTROL", "the host's audit rules"),
    ("LINUX_IMMUTABLE", "changing immutable host files' flags"),
    (
        "CHECKPOINT_RESTORE",
        "choosing pids and reading other processes",
    ),
];

/// Host places whose contents a container may never see: an allowed host
/// path may not hold one of them (`/` holds them all).
const PROTECTED: &[&str] = &[
    "/etc",
    "/root",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/warden",
];

/// Host places an allowed host path may not lie inside either: kernel
/// interfaces, secrets, runtime sockets, Docker's own storage.
const NEVER_BELOW: &[&str] = &[
    "/etc",
    "/root",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/warden",
];

/// Why `path` may never be a bind-mount source or an allowed host path, or
/// `None`. `state_dir` (the node key) and `docker_socket` are this agent's
/// own, on top of the fixed list. Pure: callers pass the path as it
/// resolves on the host (`hostpath`) as well as the configured text.
pub fn host_path_danger(path: &Path, state_dir: &Path, docker_socket: &Path) -> Option<String> {
    if path == Path::new("/") {
        return Some("it is the host's whole file system".into());
    }
    let own = [state_dir, docker_socket];
    let protected = PROTECTED
        .iter()
        .chain(DOCKER_SOCKETS)
        .map(Path::new)
        .chain(own);
    for p in protected {
        if under(p, path) {
            return Some(format!("it holds {}", p.display()));
        }
    }
    let never_below = NEVER_BELOW.iter().map(Path::new).chain(own);
    for p in never_below {
        if under(path, p) {
            return Some(format!("it lies inside {}", p.display()));
        }
    }
    None
}

/// Why a capability may never be allowed, or `None`.
pub fn forbidden_capability(c: &str) -> Option<&'static str> {
    let c = normalize_cap(c);
    FORBIDDEN_CAPABILITIES
        .iter()
        .find(|(name, _)| *name == c)
        .map(|(_, why)| *why)
}

/// The source of a running container's writable bind mount that holds
/// `source` strictly below it, if any. Such a container can swap any
/// directory of `source` below its own mount for a symlink between our
/// check and Docker's mount, so the mount is refused while it runs. (Its
/// own mount point it cannot replace: that is what makes equality safe.)
pub fn swappable_by<'a>(source: &Path, writable: &'a [PathBuf]) -> Option<&'a Path> {
    writable
        .iter()
        .map(PathBuf::as_path)
        .find(|w| source != *w && under(source, w))
}

/// Docker's smallest memory limit.
pub const MIN_MEMORY: u64 = 6 << 20;

/// Longest container name within a lease.
const MAX_NAME: usize = 64;

/// Why a spec is refused, in words for the operator's terminal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {name}: {reason}")]
pub struct Refusal {
    pub name: String,
    pub reason: String,
}

/// Whether `c` is written like a capability (`SYS_NICE`, `CAP_SYS_NICE`).
pub fn is_capability_name(c: &str) -> bool {
    let c = c.strip_prefix("CAP_").unwrap_or(c);
    !c.is_empty() && c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_')
}

fn normalize_cap(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    up.strip_prefix("CAP_").unwrap_or(&up).to_owned()
}

/// A container name Docker and we both accept.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Docker's name for a lease's container.
pub fn docker_name(lease_id: &str, name: &str) -> String {
    format!("warden-{lease_id}-{name}")
}

/// Docker's name for a lease's own network.
pub fn network_name(lease_id: &str) -> String {
    format!("warden-{lease_id}")
}

/// The labels of a lease's network, like its containers' (no name).
pub fn network_labels(owner: &Owner) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_LEASE.to_owned(), owner.lease_id.to_owned()),
        (LABEL_NODE.to_owned(), owner.node_id.to_owned()),
    ])
}

/// Whether a spec needs its lease's network (every mode but `none`).
pub fn wants_network(spec: &pb::ContainerSpec) -> bool {
    spec.network_mode != "none"
}

/// Whether `path` is `base` or below it, comparing components (so
/// `/data2` is not under `/data`).
fn under(path: &Path, base: &Path) -> bool {
    path.starts_with(base)
}

/// Checks a spec against the agent's config. The first problem found is
/// the refusal; nothing has been created when this fails.
pub fn check(spec: &pb::ContainerSpec, cfg: &WorkloadConfig) -> Result<(), Refusal> {
    let refuse = |reason: String| Refusal {
        name: spec.name.clone(),
        reason,
    };
    if !valid_name(&spec.name) {
        return Err(refuse(format!(
            "the name `{}` is not 1-{MAX_NAME} characters of [A-Za-z0-9_.-] starting with a letter or digit",
            spec.name
        )));
    }
    if spec.image.trim().is_empty() {
        return Err(refuse("no image given".into()));
    }
    if spec.privileged {
        return Err(refuse(
            "privileged mode is refused: it gives the container the whole host".into(),
        ));
    }
    match spec.network_mode.as_str() {
        "" | "bridge" | "default" | "none" => {}
        "host" => {
            return Err(refuse(
                "network mode `host` is refused: containers get their own network namespace".into(),
            ))
        }
        other => {
            return Err(refuse(format!(
                "network mode `{other}` is refused: only bridge (the default) or none"
            )))
        }
    }
    if !spec.pid_mode.is_empty() {
        return Err(refuse(format!(
            "pid mode `{}` is refused: containers never share another PID namespace",
            spec.pid_mode
        )));
    }
    match spec.ipc_mode.as_str() {
        "" | "private" | "none" => {}
        other => {
            return Err(refuse(format!(
                "ipc mode `{other}` is refused: only private (the default) or none"
            )))
        }
    }
    if let Some(d) = spec.devices.first() {
        return Err(refuse(format!(
            "device {d} is refused: a container gets the lease's GPUs and no other device"
        )));
    }
    for opt in &spec.security_opt {
        if !matches!(opt.as_str(), "no-new-privileges" | "no-new-privileges:true") {
            return Err(refuse(format!(
                "security option `{opt}` is refused: the agent sets the security options"
            )));
        }
    }
    let allowed: Vec<String> = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| c.to_string())
        .chain(cfg.allowed_capabilities.iter().map(|c| normalize_cap(c)))
        .collect();
    for cap in &spec.cap_add {
        let c = normalize_cap(cap);
        if forbidden_capability(&c).is_some() || !allowed.contains(&c) {
            return Err(refuse(format!(
                "capability {c} is refused (allowed: {}; more only through workload.allowed_capabilities)",
                allowed.join(", ")
            )));
        }
    }
    for m in &spec.mounts {
        check_mount(m, cfg).map_err(refuse)?;
    }
    for e in &spec.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(refuse(format!("environment entry `{e}` is not KEY=VALUE")));
        }
    }
    for p in &spec.ports {
        if p.container_port == 0 || p.container_port > 65535 || p.host_port > 65535 {
            return Err(refuse(format!(
                "port {}:{} is out of range",
                p.host_port, p.container_port
            )));
        }
        if p.host_port != 0 && p.host_port < u32::from(cfg.min_host_port) {
            return Err(refuse(format!(
                "host port {} is refused: below workload.min_host_port ({}); 0 lets Docker choose one",
                p.host_port, cfg.min_host_port
            )));
        }
        if !matches!(p.protocol.as_str(), "" | "tcp" | "udp") {
            return Err(refuse(format!(
                "protocol `{}` is not tcp or udp",
                p.protocol
            )));
        }
    }
    if spec.memory_bytes != 0 && spec.memory_bytes < MIN_MEMORY {
        return Err(refuse(format!(
            "memory limit {} bytes is below Docker's minimum (6 MiB)",
            spec.memory_bytes
        )));
    }
    if spec.memory_bytes > i64::MAX as u64 {
        // Docker's field is signed: larger would wrap to "no limit".
        return Err(refuse(format!(
            "memory limit {} bytes is too large",
            spec.memory_bytes
        )));
    }
    if !spec.cpus.is_finite() || spec.cpus < 0.0 {
        return Err(refuse(format!("cpus {} is not a number >= 0", spec.cpus)));
    }
    Ok(())
}

fn check_mount(m: &pb::MountSpec, cfg: &WorkloadConfig) -> Result<(), String> {
    let src = Path::new(&m.source);
    if !src.is_absolute() || src.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "mount source `{}` must be an absolute path without `..`",
            m.source
        ));
    }
    if !Path::new(&m.target).is_absolute() {
        return Err(format!("mount target `{}` must be absolute", m.target));
    }
    // Compared by components: `/scratch/` and `/scratch/.` are the same place.
    if Path::new(&m.target)
        .components()
        .eq(Path::new(super::scratch::TARGET).components())
    {
        return Err(format!(
            "mount target {} is the lease's encrypted scratch volume; mount elsewhere",
            m.target
        ));
    }
    // The socket itself, or any directory that holds it.
    let socket_hit = DOCKER_SOCKETS
        .iter()
        .map(PathBuf::from)
        .chain(std::iter::once(cfg.docker_socket.clone()))
        .any(|sock| under(&sock, src))
        || src.file_name().is_some_and(|n| n == "docker.sock");
    if socket_hit {
        return Err(format!(
            "mounting {} is refused: it would expose the Docker socket, which is the host",
            m.source
        ));
    }
    if !cfg.allowed_host_paths.iter().any(|base| under(src, base)) {
        return Err(format!(
            "host path {} is not allowed (workload.allowed_host_paths: {})",
            m.source,
            if cfg.allowed_host_paths.is_empty() {
                "none".to_owned()
            } else {
                cfg.allowed_host_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    Ok(())
}

/// Who a container belongs to, for its labels.
pub struct Owner<'a> {
    pub lease_id: &'a str,
    pub node_id: &'a str,
}

/// The Docker configuration for a checked spec: everything dropped that
/// the spec does not need, the lease's GPUs by uuid, Warden's labels.
pub fn container_config(
    spec: &pb::ContainerSpec,
    owner: &Owner,
    gpus: &[String],
    cfg: &WorkloadConfig,
    default_memory: i64,
) -> ContainerCreateBody {
    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_LEASE.to_owned(), owner.lease_id.to_owned()),
        (LABEL_NODE.to_owned(), owner.node_id.to_owned()),
        (LABEL_NAME.to_owned(), spec.name.clone()),
    ]);
    let mut cap_add: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    for c in &spec.cap_add {
        let c = normalize_cap(c);
        if !cap_add.contains(&c) {
            cap_add.push(c);
        }
    }
    let memory = if spec.memory_bytes > 0 {
        spec.memory_bytes as i64
    } else {
        default_memory
    };
    let mut exposed = Vec::new();
    let mut bindings = HashMap::new();
    for p in &spec.ports {
        let key = format!(
            "{}/{}",
            p.container_port,
            if p.protocol.is_empty() {
                "tcp"
            } else {
                &p.protocol
            }
        );
        exposed.push(key.clone());
        bindings.insert(
            key,
            Some(vec![PortBinding {
                // Where the operator says, loopback by default: never every
                // address of the host unless the config asks for it.
                host_ip: Some(cfg.publish_address.to_string()),
                host_port: Some(if p.host_port == 0 {
                    String::new()
                } else {
                    p.host_port.to_string()
                }),
            }]),
        );
    }
    let device_requests = (!gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some(cfg.gpu_driver.clone()),
            count: None,
            device_ids: Some(gpus.to_vec()),
            capabilities: Some(vec![vec!["gpu".to_owned()]]),
            options: None,
        }]
    });
    let mounts: Vec<Mount> = spec
        .mounts
        .iter()
        .map(|m| Mount {
            target: Some(m.target.clone()),
            source: Some(m.source.clone()),
            typ: Some(MountType::BIND),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect();
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: (!spec.env.is_empty()).then(|| spec.env.clone()),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(cap_add),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            pids_limit: Some(cfg.pids_limit),
            memory: Some(memory),
            // No swap beyond the memory limit.
            memory_swap: Some(memory),
            nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
            // The lease's own network: no route to another lease's.
            network_mode: Some(if wants_network(spec) {
                network_name(owner.lease_id)
            } else {
                "none".into()
            }),
            ipc_mode: Some(if spec.ipc_mode == "none" {
                "none".into()
            } else {
                "private".into()
            }),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            mounts: (!mounts.is_empty()).then_some(mounts),
            device_requests,
            // tini as PID 1: signals reach the workload and zombies are reaped,
            // so a lease ends on SIGTERM instead of waiting out the grace period.
            init: Some(true),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        // Within its lease a container is reached by its Warden name.
        networking_config: wants_network(spec).then(|| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network_name(owner.lease_id),
                EndpointSettings {
                    aliases: Some(vec![spec.name.clone()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::ContainerSpec {
        pb::ContainerSpec {
            name: "main".into(),
            image: "busybox".into(),
            command: vec!["sleep".into(), "60".into()],
            ..Default::default()
        }
    }

    fn refused(f: impl FnOnce(&mut pb::ContainerSpec)) -> String {
        refused_with(f, &WorkloadConfig::default())
    }

    fn refused_with(f: impl FnOnce(&mut pb::ContainerSpec), cfg: &WorkloadConfig) -> String {
        let mut s = spec();
        f(&mut s);
        check(&s, cfg).expect_err("should be refused").to_string()
    }

    #[test]
    fn a_plain_spec_passes() {
        check(&spec(), &WorkloadConfig::default()).unwrap();
    }

    #[test]
    fn every_way_to_reach_the_host_is_refused_with_a_reason() {
        assert!(refused(|s| s.privileged = true).contains("privileged mode is refused"));
        assert!(refused(|s| s.network_mode = "host".into()).contains("network mode `host`"));
        assert!(refused(|s| s.network_mode = "container:x".into()).contains("container:x"));
        assert!(refused(|s| s.pid_mode = "host".into()).contains("pid mode `host`"));
        assert!(refused(|s| s.ipc_mode = "host".into()).contains("ipc mode `host`"));
        assert!(refused(|s| s.devices = vec!["/dev/sda".into()]).contains("device /dev/sda"));
        assert!(refused(|s| s.cap_add = vec!["SYS_ADMIN".into()]).contains("capability SYS_ADMIN"));
        assert!(refused(|s| s.cap_add = vec!["all".into()]).contains("capability ALL"));
        assert!(
            refused(|s| s.security_opt = vec!["seccomp=unconfined".into()])
                .contains("seccomp=unconfined")
        );
        let mount = |src: &str| pb::MountSpec {
            source: src.into(),
            target: "/x".into(),
            read_only: false,
        };
        assert!(
            refused(|s| s.mounts = vec![mount("/etc")]).contains("host path /etc is not allowed")
        );
        assert!(refused(|s| s.mounts = vec![mount("relative")]).contains("absolute"));
        assert!(refused(|s| s.mounts = vec![mount("/data/../etc")]).contains("without `..`"));
        // Nothing may take the scratch volume's place, whatever the config allows.
        let data = WorkloadConfig {
            allowed_host_paths: vec!["/data".into()],
            ..Default::default()
        };
        for target in ["/scratch", "/scratch/", "//scratch/."] {
            let r = refused_with(
                |s| {
                    s.mounts = vec![pb::MountSpec {
                        source: "/data".into(),
                        target: target.into(),
                        read_only: true,
                    }]
                },
                &data,
            );
            assert!(r.contains("encrypted scratch volume"), "{target}: {r}");
        }
        // The Docker socket, and the directories holding it, even when allowlisted.
        let cfg = WorkloadConfig {
            allowed_host_paths: vec!["/".into()],
            ..Default::default()
        };
        for src in [
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/var/run",
            "/run",
            "/",
            "/srv/x/docker.sock",
        ] {
            let r = refused_with(|s| s.mounts = vec![mount(src)], &cfg);
            assert!(r.contains("Docker socket"), "{src}: {r}");
        }
        assert!(refused(|s| s.name = "../x".into()).contains("name"));
        assert!(refused(|s| s.image = " ".into()).contains("no image"));
        assert!(refused(|s| s.env = vec!["NOVALUE".into()]).contains("KEY=VALUE"));
        assert!(refused(|s| s.memory_bytes = 1024).contains("6 MiB"));
        assert!(refused(|s| s.memory_bytes = u64::MAX).contains("too large"));
        let port = |host_port| pb::PortSpec {
            container_port: 80,
            protocol: String::new(),
            host_port,
        };
        assert!(refused(|s| s.ports = vec![port(80)]).contains("below workload.min_host_port"));
        let low_ok = WorkloadConfig {
            min_host_port: 80,
            ..Default::default()
        };
        let mut s = spec();
        s.ports = vec![port(80), port(0)];
        check(&s, &low_ok).unwrap();
    }

    #[test]
    fn a_forbidden_capability_is_refused_even_if_the_config_lists_it() {
        // The config check refuses this too; the spec check does not rely on it.
        let cfg = WorkloadConfig {
            allowed_capabilities: vec!["SYS_ADMIN".into(), "SYS_PTRACE".into()],
            ..Default::default()
        };
        for cap in ["SYS_ADMIN", "cap_sys_ptrace"] {
            let r = refused_with(|s| s.cap_add = vec![cap.into()], &cfg);
            assert!(r.contains("is refused"), "{cap}: {r}");
        }
    }

    #[test]
    fn protected_host_places_are_named() {
        let state = Path::new("/var/lib/warden");
        let sock = Path::new("/var/run/docker.sock");
        let danger = |p: &str| host_path_danger(Path::new(p), state, sock);
        assert!(danger("/").unwrap().contains("whole file system"));
        assert!(danger("/var").unwrap().contains("holds"));
        assert!(danger("/var/lib").unwrap().contains("/var/lib/docker"));
        assert!(danger("/etc/ssl").unwrap().contains("inside /etc"));
        assert!(danger("/var/lib/docker/volumes/x")
            .unwrap()
            .contains("inside"));
        assert!(danger("/var/lib/warden/spool").unwrap().contains("inside"));
        assert!(danger("/dev/shm").unwrap().contains("inside /dev"));
        assert_eq!(danger("/srv/data"), None);
        assert_eq!(danger("/usr/local/models"), None);
        assert_eq!(danger("/var/lib/dockerish"), None, "components, not text");
    }

    #[test]
    fn a_source_below_a_running_writable_mount_is_swappable() {
        let writable = vec![PathBuf::from("/srv/data"), PathBuf::from("/srv/other/x")];
        let swappable = |p: &str| swappable_by(Path::new(p), &writable);
        assert_eq!(swappable("/srv/data/sub"), Some(Path::new("/srv/data")));
        assert_eq!(swappable("/srv/data/a/b"), Some(Path::new("/srv/data")));
        // The writer cannot replace its own mount point, nor reach above it.
        assert_eq!(swappable("/srv/data"), None);
        assert_eq!(swappable("/srv"), None);
        assert_eq!(swappable("/srv/other"), None);
        assert_eq!(swappable("/srv/data2"), None);
    }

    #[test]
    fn the_config_can_allow_paths_and_capabilities() {
        let cfg = WorkloadConfig {
            allowed_host_paths: vec!["/data".into()],
            allowed_capabilities: vec!["CAP_SYS_NICE".into()],
            ..Default::default()
        };
        let mut s = spec();
        s.mounts = vec![pb::MountSpec {
            source: "/data/set1".into(),
            target: "/in".into(),
            read_only: true,
        }];
        s.cap_add = vec!["sys_nice".into(), "CHOWN".into()];
        check(&s, &cfg).unwrap();
        // A sibling with a shared prefix is not under the allowed path.
        s.mounts[0].source = "/data2".into();
        assert!(check(&s, &cfg).is_err());
    }

    #[test]
    fn the_docker_config_confines_by_default() {
        let mut s = spec();
        s.ports = vec![pb::PortSpec {
            container_port: 8080,
            protocol: String::new(),
            host_port: 0,
        }];
        s.cpus = 1.5;
        let cfg = WorkloadConfig::default();
        let c = container_config(
            &s,
            &Owner {
                lease_id: "l1",
                node_id: "n1",
            },
            &["GPU-a".into()],
            &cfg,
            1 << 30,
        );
        let h = c.host_config.unwrap();
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.cap_add.unwrap().len(), DEFAULT_CAPABILITIES.len());
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(h.pids_limit, Some(4096));
        assert_eq!(h.memory, Some(1 << 30));
        assert_eq!(h.memory_swap, Some(1 << 30));
        assert_eq!(h.nano_cpus, Some(1_500_000_000));
        assert_eq!(h.network_mode.as_deref(), Some("warden-l1"));
        let eps = c.networking_config.unwrap().endpoints_config.unwrap();
        assert_eq!(eps["warden-l1"].aliases, Some(vec!["main".to_owned()]));
        let bound = &h.port_bindings.as_ref().unwrap()["8080/tcp"]
            .as_ref()
            .unwrap()[0];
        assert_eq!(bound.host_ip.as_deref(), Some("127.0.0.1"));
        assert!(h.mounts.is_none() && h.binds.is_none() && h.devices.is_none());
        assert_eq!(h.pid_mode, None);
        let dr = &h.device_requests.unwrap()[0];
        assert_eq!(dr.driver.as_deref(), Some("nvidia"));
        assert_eq!(dr.device_ids, Some(vec!["GPU-a".to_owned()]));
        assert_eq!(dr.capabilities, Some(vec![vec!["gpu".to_owned()]]));
        let labels = c.labels.unwrap();
        assert_eq!(labels["warden.managed"], "true");
        assert_eq!(labels["warden.lease"], "l1");
        assert_eq!(labels["warden.node"], "n1");
        assert!(h.port_bindings.unwrap().contains_key("8080/tcp"));
        // No GPUs, no device request.
        let c = container_config(
            &spec(),
            &Owner {
                lease_id: "l",
                node_id: "n",
            },
            &[],
            &cfg,
            1 << 30,
        );
        assert!(c.host_config.unwrap().device_requests.is_none());
    }
}
