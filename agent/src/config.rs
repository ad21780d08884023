//! The agent's configuration: a TOML file merged over documented defaults.
//!
//! Every key is listed in `docs/config.md`. Unknown keys and bad values are
//! errors that name the key, so a typo never silently falls back to a default.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use warden_proto::dsse::VerifyingKey;

/// The `[workload]` section lives beside the confinement it configures
/// (pure), so that `confine` needs nothing from this module.
pub use crate::workloads::confine::WorkloadConfig;

/// Why a configuration could not be used: the one type the agent and the
/// coordinator share, so a config error reads the same from both.
pub use warden_state::config::ConfigError;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where the node key, the spool and the status socket live.
    pub state_dir: PathBuf,
    /// The coordinator this node reports to; absent means records are
    /// spooled locally until one is configured.
    pub coordinator: Option<CoordinatorLink>,
    pub uplink: UplinkConfig,
    pub spool: SpoolConfig,
    pub telemetry: TelemetryConfig,
    pub status: StatusConfig,
    pub gpu: GpuConfig,
    pub metrics: MetricsConfig,
    pub probe: ProbeConfig,
    pub doctor: DoctorConfig,
    pub workload: WorkloadConfig,
    pub timelock: TimeLockConfig,
    pub mesh: MeshConfig,
    pub node: NodeConfig,
    pub work_challenge: crate::workproof::WorkConfig,
}

/// What the supplier declares about the node, for renters' filters
/// (`warden cluster hire --region/--tag`): sent as declared with each
/// Register, never verified. Bounds: `warden_proto::labels`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Region name, such as "eu-west" (empty: not declared).
    pub region: String,
    /// ISO 3166-1 alpha-2 country code, such as "DE".
    pub country: String,
    /// Free-form tags, such as "green-energy" or "soc2".
    pub tags: Vec<String>,
}

impl NodeConfig {
    /// As sent in the Register.
    pub fn labels(&self) -> warden_proto::pb::NodeLabels {
        warden_proto::pb::NodeLabels {
            region: self.region.clone(),
            country: self.country.clone(),
            tags: self.tags.clone(),
        }
    }
}

/// The node's mesh interface.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// UDP port of the mesh interface.
    pub listen_port: u16,
    /// Where other nodes reach it ("host:port"), announced at Register.
    pub endpoints: Vec<String>,
    /// The interface's name, made when the coordinator puts the node in a
    /// cluster.
    pub interface: String,
    /// Its MTU.
    pub mtu: u32,
    /// How often each peer is pinged over the mesh (round-trip time).
    #[serde(with = "humantime_serde")]
    pub rtt_interval: Duration,
    /// Where the interface's UAPI socket goes (`wg show` looks there).
    pub socket_dir: PathBuf,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            listen_port: 51820,
            endpoints: Vec::new(),
            interface: "warden0".into(),
            mtu: crate::mesh::ifaddr::DEFAULT_MTU,
            rtt_interval: Duration::from_secs(10),
            socket_dir: PathBuf::from(crate::mesh::control::SOCKET_DIR),
        }
    }
}

/// Proof of Time-Lock: who may hold a leased GPU, and the attestation epoch.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeLockConfig {
    /// One attestation per lease per epoch.
    #[serde(with = "humantime_serde")]
    pub epoch: Duration,
    /// GPU device nodes whose holders are found (a trailing `*` matches any rest).
    pub device_patterns: Vec<String>,
    /// Executables (paths or names) allowed to hold any GPU.
    pub allow_exe: Vec<String>,
    /// SIGTERM, then SIGKILL after this long, for a foreign process.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// Deny foreign opens of the leased GPUs' device nodes at the open
    /// (fanotify permission events); false, or a kernel without them: the
    /// `/proc` scan every cycle finds and ends foreign holders instead.
    pub prevent: bool,
    /// While every lease is guarded at the open, the full `/proc` scan (for
    /// what the guard cannot see) runs this often.
    #[serde(with = "humantime_serde")]
    pub safety_scan: Duration,
}

impl Default for TimeLockConfig {
    fn default() -> Self {
        Self {
            epoch: Duration::from_secs(10),
            device_patterns: crate::timelock::procs::parse::default_patterns(),
            allow_exe: crate::timelock::enforce::DEFAULT_ALLOW_EXE
                .iter()
                .map(|s| s.to_string())
                .collect(),
            kill_grace: Duration::from_secs(2),
            prevent: true,
            safety_scan: Duration::from_secs(30),
        }
    }
}

/// The link probe against the coordinator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Time between probes, the first at start; 0 turns probing off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long each of download and upload runs.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Round trips timed for the RTT (the median is reported).
    pub pings: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(6 * 3600),
            duration: Duration::from_secs(2),
            pings: 10,
        }
    }
}

/// The supplier minimums `warden doctor` checks against.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DoctorConfig {
    /// Installed memory, in GB (10^9 bytes).
    pub min_memory_gb: f64,
    /// Free space on the state directory's filesystem, in GB.
    pub min_disk_free_gb: f64,
    pub min_download_mbps: f64,
    pub min_upload_mbps: f64,
    /// Round trip to the coordinator must be below this.
    pub max_rtt_ms: f64,
    /// Largest tolerated difference between our clock and the coordinator's.
    pub max_clock_offset_ms: f64,
}

impl Default for DoctorConfig {
    fn default() -> Self {
        Self {
            min_memory_gb: 12.0,
            min_disk_free_gb: 500.0,
            min_download_mbps: 500.0,
            min_upload_mbps: 250.0,
            max_rtt_ms: 30.0,
            max_clock_offset_ms: 1000.0,
        }
    }
}

/// GPU sampling through NVML.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// The NVML library; defaults to the driver's `libnvidia-ml.so.1`.
    pub nvml_library: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// How often the inventory is re-read to notice a change.
    #[serde(with = "humantime_serde")]
    pub inventory_interval: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            nvml_library: None,
            sample_interval: Duration::from_secs(1),
            inventory_interval: Duration::from_secs(60),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on; loopback by default. Empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9477".into(),
        }
    }
}

/// How to reach and trust the coordinator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorLink {
    /// `https://host:port` of the coordinator's gRPC endpoint, or a list of
    /// them: replicas of one coordinator (one signing key, one CA), tried
    /// in turn when the stream dies.
    pub address: Addresses,
    /// The coordinator's Ed25519 public key (base64 or hex): messages not
    /// signed by it are ignored.
    pub public_key: String,
    /// PEM file of the CA that signed the coordinator's TLS certificate.
    pub ca_cert: PathBuf,
    /// Name to check in the coordinator's certificate; defaults to the
    /// address's host.
    pub server_name: Option<String>,
    /// The coordinator operator's join token, sent in the Register so that a
    /// new node may enroll with a coordinator whose policy is "token" (not
    /// needed once enrolled). Serialized only as a digest, never in clear.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "token_digest"
    )]
    pub join_token: Option<String>,
}

/// `coordinator.address`: one `https://host:port`, or a list of them.
/// Written back as it was given (a string for one), so reload diffs and
/// `warden status` show the key as the supplier wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(Vec<String>);

impl Addresses {
    /// The addresses in the order the uplink tries them.
    pub fn list(&self) -> &[String] {
        &self.0
    }

    /// The value as TOML (`"https://…"` or `["https://…", …]`), for a
    /// `[coordinator]` section printed for others to paste.
    pub fn to_toml(&self) -> String {
        match self.0.as_slice() {
            [one] => toml_string(one),
            many => format!(
                "[{}]",
                many.iter()
                    .map(|a| toml_string(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// A TOML basic string (a JSON string is one, for what an address holds).
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

impl From<String> for Addresses {
    fn from(one: String) -> Self {
        Addresses(vec![one])
    }
}

impl From<Vec<String>> for Addresses {
    fn from(list: Vec<String>) -> Self {
        Addresses(list)
    }
}

impl Serialize for Addresses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Addresses;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an \"https://host:port\" string or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Addresses, E> {
                Ok(Addresses(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Addresses, A::Error> {
                let mut list = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    list.push(a);
                }
                Ok(Addresses(list))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A join token as `warden status` and reload diffs show it: a short
/// SHA-256, so a changed token is seen as changed and never printed.
fn token_digest<S: serde::Serializer>(t: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => {
            let d = ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
            s.serialize_str(&format!("sha256:{}", hex::encode(&d.as_ref()[..8])))
        }
        None => s.serialize_none(),
    }
}

/// The gRPC stream to the coordinator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// HTTP/2 pings on an idle stream; one unanswered this long ends the
    /// stream, so a dead path (an address gone, a cut cable) is noticed
    /// and the agent reconnects instead of waiting for TCP to give up.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// Records sent but not yet acknowledged, at most.
    pub max_in_flight: usize,
}

/// The durable spool of records awaiting acknowledgement.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Defaults to `<state_dir>/spool`.
    pub dir: Option<PathBuf>,
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

/// Host telemetry records.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Stop after this many telemetry records from this process (0: never).
    /// For load tests and benchmarks.
    pub max_records: u64,
}

/// The local status socket read by `warden status`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Defaults to `<state_dir>/agent.sock`.
    pub socket: Option<PathBuf>,
}

/// Default state directory of a packaged agent.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/warden";

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            coordinator: None,
            uplink: UplinkConfig::default(),
            spool: SpoolConfig::default(),
            telemetry: TelemetryConfig::default(),
            status: StatusConfig::default(),
            gpu: GpuConfig::default(),
            metrics: MetricsConfig::default(),
            probe: ProbeConfig::default(),
            doctor: DoctorConfig::default(),
            workload: WorkloadConfig::default(),
            timelock: TimeLockConfig::default(),
            mesh: MeshConfig::default(),
            node: NodeConfig::default(),
            work_challenge: Default::default(),
        }
    }
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(20),
            max_in_flight: 512,
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 1 << 30,
            segment_bytes: 8 << 20,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            max_records: 0,
        }
    }
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = warden_state::config::read(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = warden_state::config::parse_toml(text, origin)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use warden_proto::labels::LabelError;
        if let Err(e) = warden_proto::labels::check(&self.node.labels()) {
            let key = match e {
                LabelError::Region(_) => "node.region",
                LabelError::Country(_) => "node.country",
                _ => "node.tags",
            };
            return Err(invalid(key, e.to_string()));
        }
        let u = &self.uplink;
        nonzero("uplink.heartbeat_interval", u.heartbeat_interval)?;
        nonzero("uplink.backoff_initial", u.backoff_initial)?;
        nonzero("uplink.connect_timeout", u.connect_timeout)?;
        nonzero("uplink.keepalive", u.keepalive)?;
        if u.backoff_max < u.backoff_initial {
            return Err(invalid(
                "uplink.backoff_max",
                format!(
                    "{} is shorter than uplink.backoff_initial ({})",
                    humantime::format_duration(u.backoff_max),
                    humantime::format_duration(u.backoff_initial)
                ),
            ));
        }
        if !(1..=65_536).contains(&u.max_in_flight) {
            return Err(invalid(
                "uplink.max_in_flight",
                format!("{} is outside 1..=65536", u.max_in_flight),
            ));
        }
        nonzero("telemetry.interval", self.telemetry.interval)?;
        nonzero("gpu.sample_interval", self.gpu.sample_interval)?;
        nonzero("gpu.inventory_interval", self.gpu.inventory_interval)?;
        nonzero("probe.duration", self.probe.duration)?;
        nonzero("timelock.epoch", self.timelock.epoch)?;
        if let Some(e) = self.mesh.endpoints.iter().find(|e| {
            e.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        }) {
            return Err(invalid("mesh.endpoints", format!("`{e}` is not host:port")));
        }
        nonzero("mesh.rtt_interval", self.mesh.rtt_interval)?;
        if !(576..=65535).contains(&self.mesh.mtu) {
            return Err(invalid(
                "mesh.mtu",
                format!("{} is outside 576..=65535", self.mesh.mtu),
            ));
        }
        let name = &self.mesh.interface;
        if name.is_empty()
            || name.len() > crate::mesh::tun::MAX_NAME
            || name.contains(['/', '%'])
            || name.contains(char::is_whitespace)
        {
            return Err(invalid(
                "mesh.interface",
                format!("`{name}` is not an interface name (1 to 15 bytes, no `/`, `%` or spaces)"),
            ));
        }
        if self.timelock.epoch < self.gpu.sample_interval {
            return Err(invalid(
                "timelock.epoch",
                "must be at least gpu.sample_interval".into(),
            ));
        }
        let w = &self.workload;
        if w.pids_limit < 16 {
            return Err(invalid(
                "workload.pids_limit",
                format!("{} is below 16", w.pids_limit),
            ));
        }
        if let Some(p) = w.allowed_host_paths.iter().find(|p| !p.is_absolute()) {
            return Err(invalid(
                "workload.allowed_host_paths",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        // Values that would undo confinement are refused here, so at start
        // and at reload alike.
        for p in &w.allowed_host_paths {
            if let Some(why) =
                crate::workloads::confine::host_path_danger(p, &self.state_dir, &w.docker_socket)
            {
                return Err(invalid(
                    "workload.allowed_host_paths",
                    format!(
                        "{} is refused: {why}; allow only directories of data to mount",
                        p.display()
                    ),
                ));
            }
        }
        for c in &w.allowed_capabilities {
            if !crate::workloads::confine::is_capability_name(c) {
                return Err(invalid(
                    "workload.allowed_capabilities",
                    format!("`{c}` is not a capability name (e.g. SYS_NICE)"),
                ));
            }
            if let Some(why) = crate::workloads::confine::forbidden_capability(c) {
                return Err(invalid(
                    "workload.allowed_capabilities",
                    format!("{c} is refused: it gives a container {why}"),
                ));
            }
        }
        if w.default_memory_bytes != 0
            && w.default_memory_bytes < crate::workloads::confine::MIN_MEMORY
        {
            return Err(invalid(
                "workload.default_memory_bytes",
                format!(
                    "{} is below Docker's minimum of {} bytes (6 MiB); 0 means 90 % of the host's memory",
                    w.default_memory_bytes,
                    crate::workloads::confine::MIN_MEMORY
                ),
            ));
        }
        if self.probe.pings == 0 {
            return Err(invalid("probe.pings", "must be at least 1".into()));
        }
        let d = &self.doctor;
        for (key, v) in [
            ("doctor.min_memory_gb", d.min_memory_gb),
            ("doctor.min_disk_free_gb", d.min_disk_free_gb),
            ("doctor.min_download_mbps", d.min_download_mbps),
            ("doctor.min_upload_mbps", d.min_upload_mbps),
            ("doctor.max_rtt_ms", d.max_rtt_ms),
            ("doctor.max_clock_offset_ms", d.max_clock_offset_ms),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(key, format!("{v} is not a number >= 0")));
            }
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "`{}` is not host:port (an IP address and a port)",
                    self.metrics.listen
                ),
            ));
        }
        if self.spool.segment_bytes < 64 << 10 {
            return Err(invalid(
                "spool.segment_bytes",
                format!("{} is below the minimum of 65536", self.spool.segment_bytes),
            ));
        }
        if self.spool.max_bytes < self.spool.segment_bytes {
            return Err(invalid(
                "spool.max_bytes",
                format!(
                    "{} is smaller than spool.segment_bytes ({})",
                    self.spool.max_bytes, self.spool.segment_bytes
                ),
            ));
        }
        let socket = self.status_socket();
        if let Some((_, what)) = self.own_paths().iter().find(|(p, _)| *p == socket) {
            return Err(invalid(
                "status.socket",
                format!(
                    "{} is the agent's {what}; give the socket a path of its own (default <state_dir>/agent.sock)",
                    socket.display()
                ),
            ));
        }
        if let Some(c) = &self.coordinator {
            c.check_addresses()?;
            VerifyingKey::parse(&c.public_key)
                .map_err(|e| invalid("coordinator.public_key", e.to_string()))?;
            if let Some(t) = &c.join_token {
                if t.is_empty() || t.chars().any(char::is_whitespace) {
                    return Err(invalid(
                        "coordinator.join_token",
                        "is empty or holds spaces; paste the token exactly as the coordinator's operator gave it, or remove the key".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The spool directory, defaulted under the state directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("spool"))
    }

    /// The status socket path, defaulted under the state directory.
    pub fn status_socket(&self) -> PathBuf {
        self.status
            .socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("agent.sock"))
    }

    /// The node key file.
    pub fn key_file(&self) -> PathBuf {
        self.state_dir.join("node.key")
    }

    /// The mesh (WireGuard) key file.
    pub fn mesh_key_file(&self) -> PathBuf {
        self.state_dir.join("mesh.key")
    }

    /// The lease book (`workload`).
    pub fn book_file(&self) -> PathBuf {
        self.state_dir.join("book.json")
    }

    /// The commands acted on (a replay is refused across restarts).
    pub fn commands_file(&self) -> PathBuf {
        self.state_dir.join("commands.json")
    }

    /// The lease chains (`timelock`).
    pub fn chains_file(&self) -> PathBuf {
        self.state_dir.join("chains.json")
    }

    /// The lock that keeps one agent per state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join(warden_state::lock::LOCK_FILE)
    }

    /// What the configuration names on disk that must exist for it to
    /// work (the coordinator's CA): checked at start and at each reload.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        match &self.coordinator {
            Some(link) => link.check_ca(),
            None => Ok(()),
        }
    }

    /// The agent's own files and directories, by what they are: none of
    /// them may double as the status socket.
    pub fn own_paths(&self) -> [(PathBuf, &'static str); 8] {
        [
            (self.state_dir.clone(), "state directory"),
            (self.key_file(), "node key"),
            (self.mesh_key_file(), "mesh key"),
            (self.book_file(), "lease book"),
            (self.commands_file(), "admitted commands"),
            (self.chains_file(), "lease chains"),
            (self.lock_file(), "lock file"),
            (self.spool_dir(), "spool directory"),
        ]
    }
}

impl CoordinatorLink {
    /// Every address is an `https://host:port` URL, and there is at least
    /// one, none listed twice.
    pub fn check_addresses(&self) -> Result<(), ConfigError> {
        let list = self.address.list();
        if list.is_empty() {
            return Err(invalid(
                "coordinator.address",
                "the list is empty; give at least one \"https://host:port\"".into(),
            ));
        }
        for (i, a) in list.iter().enumerate() {
            host_of(a)?;
            if list[..i].contains(a) {
                return Err(invalid(
                    "coordinator.address",
                    format!("`{a}` is listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// The TLS name to expect in the certificate of the coordinator at
    /// `address`: `server_name` when set (for every address), else the
    /// address's own host.
    pub fn tls_name(&self, address: &str) -> Result<String, ConfigError> {
        match &self.server_name {
            Some(n) => Ok(n.clone()),
            None => host_of(address).map(str::to_owned),
        }
    }

    /// The addresses in the order to try them starting from `first` (one
    /// of them; else from the first configured).
    pub fn addresses_from(&self, first: &str) -> Vec<&str> {
        let list = self.address.list();
        let start = list.iter().position(|a| a == first).unwrap_or(0);
        list[start..]
            .iter()
            .chain(&list[..start])
            .map(String::as_str)
            .collect()
    }

    /// Whether `ca_cert` holds a certificate the uplink can trust: a
    /// missing or empty file would only show as a retry forever.
    pub fn check_ca(&self) -> Result<(), ConfigError> {
        let why = match std::fs::read(&self.ca_cert) {
            Err(e) => format!("cannot read {}: {e}", self.ca_cert.display()),
            Ok(pem) if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => {
                format!("{} holds no PEM certificate", self.ca_cert.display())
            }
            Ok(_) => return Ok(()),
        };
        Err(invalid(
            "coordinator.ca_cert",
            format!("{why}; copy the coordinator's CA certificate there (the ca.pem `warden coordinator init` wrote, from its operator)"),
        ))
    }

    /// The pinned coordinator key.
    pub fn pinned_key(&self) -> Result<VerifyingKey, ConfigError> {
        VerifyingKey::parse(&self.public_key)
            .map_err(|e| invalid("coordinator.public_key", e.to_string()))
    }
}

/// The host part of a coordinator address, checked to be an
/// `https://host:port` URL.
pub fn host_of(address: &str) -> Result<&str, ConfigError> {
    let rest = address.strip_prefix("https://").ok_or_else(|| {
        invalid(
            "coordinator.address",
            format!("`{address}` must start with https:// (TLS is required)"),
        )
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(invalid(
            "coordinator.address",
            format!("`{address}` has no host"),
        ));
    }
    Ok(host)
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

fn nonzero(key: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be longer than zero".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = AgentConfig::parse("", "test").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/warden"));
        assert_eq!(c.uplink.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.spool.max_bytes, 1 << 30);
        assert_eq!(c.spool_dir(), PathBuf::from("/var/lib/warden/spool"));
        assert_eq!(
            c.status_socket(),
            PathBuf::from("/var/lib/warden/agent.sock")
        );
        assert!(c.coordinator.is_none());
    }

    #[test]
    fn a_status_socket_on_one_of_the_agents_own_files_is_refused() {
        for (file, what) in [
            ("node.key", "node key"),
            ("book.json", "lease book"),
            ("commands.json", "admitted commands"),
            ("spool", "spool directory"),
        ] {
            let e = AgentConfig::parse(
                &format!("state_dir = \"/s\"\n[status]\nsocket = \"/s/{file}\"\n"),
                "a.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("`status.socket`"), "{e}");
            assert!(
                e.contains(&format!("/s/{file} is the agent's {what}")),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = AgentConfig::parse("[uplink]\nheartbeat = \"5s\"\n", "agent.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("agent.toml"), "{msg}");
        assert!(msg.contains("unknown field `heartbeat`"), "{msg}");
    }

    #[test]
    fn node_labels_are_read_and_bad_ones_name_their_key() {
        let c = AgentConfig::parse(
            "[node]\nregion = \"eu-west\"\ncountry = \"DE\"\ntags = [\"green-energy\", \"soc2\"]\n",
            "a",
        )
        .unwrap();
        assert_eq!(c.node.labels().tags, ["green-energy", "soc2"]);
        for (text, key) in [
            ("region = \"EU West\"", "node.region"),
            ("country = \"germany\"", "node.country"),
            ("tags = [\"x\", \"x\"]", "node.tags"),
        ] {
            let e = AgentConfig::parse(&format!("[node]\n{text}\n"), "a").unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = AgentConfig::parse("stat_dir = \"/x\"\n", "agent.toml").unwrap_err();
        assert!(e.to_string().contains("stat_dir"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = AgentConfig::parse("[uplink]\nheartbeat_interval = \"soon\"\n", "a").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("heartbeat_interval"), "{msg}");
    }

    #[test]
    fn zero_interval_is_refused() {
        let e = AgentConfig::parse("[telemetry]\ninterval = \"0s\"\n", "a").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "telemetry.interval",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn backoff_max_below_initial_is_refused() {
        let e = AgentConfig::parse(
            "[uplink]\nbackoff_initial = \"10s\"\nbackoff_max = \"1s\"\n",
            "a",
        )
        .unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Invalid {
                key: "uplink.backoff_max",
                ..
            }
        ));
    }

    #[test]
    fn plain_http_coordinator_is_refused() {
        let key = "A".repeat(43) + "=";
        let text = format!(
            "[coordinator]\naddress = \"http://c:7443\"\npublic_key = \"{key}\"\nca_cert = \"/ca.pem\"\n"
        );
        let e = AgentConfig::parse(&text, "a").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "coordinator.address",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn values_that_undo_confinement_are_refused() {
        let refused = |workload: &str| {
            AgentConfig::parse(
                &format!("state_dir = \"/srv/warden\"\n[workload]\n{workload}\n"),
                "a",
            )
            .unwrap_err()
            .to_string()
        };
        for (text, key, why) in [
            (
                "allowed_capabilities = [\"ALL\"]",
                "allowed_capabilities",
                "ALL is refused",
            ),
            (
                "allowed_capabilities = [\"CAP_SYS_ADMIN\"]",
                "allowed_capabilities",
                "CAP_SYS_ADMIN is refused: it gives a container mounts",
            ),
            (
                "allowed_capabilities = [\"DAC_READ_SEARCH\"]",
                "allowed_capabilities",
                "open_by_handle_at",
            ),
            (
                "allowed_host_paths = [\"/\"]",
                "allowed_host_paths",
                "whole file system",
            ),
            (
                "allowed_host_paths = [\"/var\"]",
                "allowed_host_paths",
                "it holds /var/run",
            ),
            (
                "allowed_host_paths = [\"/srv\"]",
                "allowed_host_paths",
                "it holds /srv/warden",
            ),
            (
                "allowed_host_paths = [\"/srv/warden/spool\"]",
                "allowed_host_paths",
                "lies inside /srv/warden",
            ),
            (
                "allowed_host_paths = [\"/proc/1\"]",
                "allowed_host_paths",
                "lies inside /proc",
            ),
            (
                "docker_socket = \"/data/d.sock\"\nallowed_host_paths = [\"/data\"]",
                "allowed_host_paths",
                "it holds /data/d.sock",
            ),
            ("default_memory_bytes = 1", "default_memory_bytes", "6 MiB"),
        ] {
            let e = refused(text);
            assert!(e.contains(&format!("workload.{key}")), "{text}: {e}");
            assert!(e.contains(why), "{text}: {e}");
        }
        // What stays allowed: data directories, harmless capabilities.
        AgentConfig::parse(
            "[workload]\nallowed_host_paths = [\"/srv/data\", \"/usr/local/models\"]\nallowed_capabilities = [\"SYS_NICE\", \"IPC_LOCK\"]\ndefault_memory_bytes = 6291456\n",
            "a",
        )
        .unwrap();
    }

    #[test]
    fn bad_pinned_key_is_refused() {
        let text = "[coordinator]\naddress = \"https://c:7443\"\npublic_key = \"nope\"\nca_cert = \"/ca.pem\"\n";
        let e = AgentConfig::parse(text, "a").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "coordinator.public_key",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// The commented default file the .deb installs as /etc/warden/agent.toml.
    const PACKAGED: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/agent.toml"
    ));

    /// The packaged file with every `# key = value` and `# [section]` line uncommented.
    fn packaged_uncommented() -> String {
        PACKAGED
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_packaged_file_parses_to_the_defaults() {
        let c = AgentConfig::parse(PACKAGED, "packaging/agent.toml").unwrap();
        assert!(crate::reload::changed_keys(&AgentConfig::default(), &c).is_empty());
    }

    /// Every value the packaged file shows is the real default, and every
    /// key is shown (but the coordinator, whose values are examples, and
    /// the paths that default to a place under state_dir or to the driver's).
    #[test]
    fn the_packaged_file_shows_every_key_with_its_default() {
        // The placeholder key is refused on purpose: a supplier who forgets it is told.
        let text = packaged_uncommented();
        assert!(AgentConfig::parse(&text, "a").is_err());
        let text = text.replace(
            "BASE64-OF-THE-COORDINATORS-ED25519-KEY=",
            "5866666666666666666666666666666666666666666666666666666666666666",
        );
        let c = AgentConfig::parse(&text, "uncommented packaging/agent.toml").unwrap();
        let changed = crate::reload::changed_keys(&AgentConfig::default(), &c);
        assert!(
            changed.iter().all(|k| k.starts_with("coordinator.")),
            "{changed:?}"
        );
        let mut shown = Vec::new();
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            match v.as_table() {
                Some(t) => t.iter().for_each(|(k, v)| {
                    walk(&format!("{prefix}{k}."), v, out);
                }),
                None => out.push(prefix.trim_end_matches('.').to_owned()),
            }
        }
        walk(
            "",
            &toml::Value::Table(toml::from_str(&text).unwrap()),
            &mut shown,
        );
        let all = serde_json::to_value(AgentConfig::default()).unwrap();
        let mut missing = Vec::new();
        for (section, v) in all.as_object().unwrap() {
            let keys: Vec<String> = match v.as_object() {
                Some(o) => o.keys().map(|k| format!("{section}.{k}")).collect(),
                None => vec![section.clone()],
            };
            for k in keys {
                let implied = [
                    "spool.dir",
                    "status.socket",
                    "gpu.nvml_library",
                    "coordinator",
                ];
                if !shown.contains(&k) && !implied.contains(&k.as_str()) {
                    missing.push(k);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "not in packaging/agent.toml: {missing:?}"
        );
    }

    #[test]
    fn join_token_is_checked_and_never_serialized_in_clear() {
        let key = "5866666666666666666666666666666666666666666666666666666666666666";
        let with = |t: &str| {
            format!("[coordinator]\naddress = \"https://c:7443\"\npublic_key = \"{key}\"\nca_cert = \"/ca.pem\"\njoin_token = \"{t}\"\n")
        };
        let c = AgentConfig::parse(&with("0f1e2d3c4b5a"), "a").unwrap();
        assert_eq!(
            c.coordinator.as_ref().unwrap().join_token.as_deref(),
            Some("0f1e2d3c4b5a")
        );
        let shown = serde_json::to_string(&c).unwrap();
        assert!(!shown.contains("0f1e2d3c4b5a"), "{shown}");
        assert!(shown.contains("\"join_token\":\"sha256:"), "{shown}");
        for bad in ["", "a b"] {
            let e = AgentConfig::parse(&with(bad), "a").unwrap_err();
            assert!(e.to_string().contains("coordinator.join_token"), "{e}");
        }
    }

    #[test]
    fn coordinator_host_is_taken_from_address() {
        let link = CoordinatorLink {
            address: Addresses::from(vec![]),
            public_key: String::new(),
            ca_cert: PathBuf::new(),
            server_name: None,
            join_token: None,
        };
        assert_eq!(
            link.tls_name("https://coord.example:7443").unwrap(),
            "coord.example"
        );
        assert_eq!(link.tls_name("https://[::1]:7443/").unwrap(), "::1");
        assert_eq!(link.tls_name("https://localhost").unwrap(), "localhost");
        assert!(host_of("https://:7443").is_err());
        let named = CoordinatorLink {
            server_name: Some("coord.internal".into()),
            ..link
        };
        assert_eq!(
            named.tls_name("https://10.0.0.2:7443").unwrap(),
            "coord.internal",
            "server_name applies to every address"
        );
    }

    const KEY: &str = "5866666666666666666666666666666666666666666666666666666666666666";

    fn with_address(value: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(
            &format!(
                "[coordinator]\naddress = {value}\npublic_key = \"{KEY}\"\nca_cert = \"/ca.pem\"\n"
            ),
            "a.toml",
        )
    }

    #[test]
    fn address_is_one_string_or_a_list() {
        let one = with_address("\"https://c1:7443\"").unwrap();
        let link = one.coordinator.unwrap();
        assert_eq!(link.address.list(), ["https://c1:7443"]);
        // Shown as written: a string stays a string.
        assert_eq!(
            serde_json::to_value(&link).unwrap()["address"],
            "https://c1:7443"
        );
        assert_eq!(link.address.to_toml(), "\"https://c1:7443\"");

        let many = with_address("[\"https://c1:7443\", \"https://c2:7443\"]").unwrap();
        let link = many.coordinator.unwrap();
        assert_eq!(link.address.list(), ["https://c1:7443", "https://c2:7443"]);
        assert_eq!(
            serde_json::to_value(&link).unwrap()["address"],
            serde_json::json!(["https://c1:7443", "https://c2:7443"])
        );
        assert_eq!(
            link.address.to_toml(),
            "[\"https://c1:7443\", \"https://c2:7443\"]"
        );
        assert_eq!(
            link.addresses_from("https://c2:7443"),
            ["https://c2:7443", "https://c1:7443"]
        );
        assert_eq!(
            link.addresses_from("https://elsewhere:1"),
            ["https://c1:7443", "https://c2:7443"]
        );
        // The TOML printed for others reads back the same.
        let again = with_address(&link.address.to_toml()).unwrap();
        assert_eq!(again.coordinator.unwrap().address, link.address);
    }

    #[test]
    fn every_listed_address_is_checked_and_an_empty_list_is_refused() {
        for (value, why) in [
            ("[]", "the list is empty"),
            (
                "[\"https://c1:7443\", \"http://c2:7443\"]",
                "`http://c2:7443` must start with https://",
            ),
            ("[\"https://c1:7443\", \"https://:1\"]", "has no host"),
            ("[\"https://c1:7443\", \"https://c1:7443\"]", "listed twice"),
        ] {
            let e = with_address(value).unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        key: "coordinator.address",
                        ..
                    }
                ),
                "{value}: {e}"
            );
            assert!(e.to_string().contains(why), "{value}: {e}");
        }
        // Not a string nor a list of strings: the parser names the key.
        for value in ["7443", "[7443]", "{ host = \"c1\" }"] {
            let e = with_address(value).unwrap_err().to_string();
            assert!(e.contains("address"), "{value}: {e}");
        }
    }
}
