//! `warden`: the agent, the reference coordinator and the tools that talk
//! to them, in one binary.

mod dev;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use warden_agent::AgentConfig;
use warden_coordinator::{config::EnrollmentPolicy, CoordinatorConfig, TlsPem};

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Warden: a verifiable GPU worker node and its coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent (as a systemd service, or with --dev to try it out).
    Agent {
        /// Agent config file [default: /etc/warden/agent.toml when it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run an embedded coordinator too, with throwaway TLS, in one process.
        #[arg(long)]
        dev: bool,
        /// State directory (overrides the config's state_dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The NVML library (overrides gpu.nvml_library).
        #[arg(long)]
        nvml_lib: Option<PathBuf>,
    },
    /// Show what this machine offers: host, Docker, TUN and every GPU.
    Inventory {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        local: Local,
    },
    /// Check this machine against the supplier minimums; exits non-zero
    /// naming each check that fails.
    Doctor {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        local: Local,
    },
    /// Start, list and end leases (talks to a coordinator's admin socket).
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
        /// The coordinator's admin socket [default: /var/lib/warden-coordinator/admin.sock].
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
    /// Group nodes into a cluster joined by a WireGuard mesh (talks to a
    /// coordinator's admin socket).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        /// The coordinator's admin socket [default: /var/lib/warden-coordinator/admin.sock].
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
    /// Check a lease bundle offline against the coordinator key you trust:
    /// signatures, chain, countersignatures, challenges, coverage, proof and
    /// verdict. Exit 0 when it holds; 1 with each broken rule when not.
    Verify {
        bundle: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Least acceptable countersigned coverage.
        #[arg(long, default_value_t = 0.9)]
        min_coverage: f64,
        /// Clock difference tolerated between node, coordinator and this machine.
        #[arg(long, default_value_t = 5000)]
        max_skew_ms: i64,
        /// A window countersigned later than this after it ended counts as not covered.
        #[arg(long, default_value_t = warden_proto::chain::MAX_DELAY_MS)]
        max_delay_ms: i64,
        /// The verifier's clock, ms since the Unix epoch (default: now), for reproducible runs.
        #[arg(long)]
        now: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Userspace WireGuard interfaces.
    Mesh {
        #[command(subcommand)]
        command: MeshCommand,
    },
    /// Docker images on this node.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run the reference coordinator.
    Coordinator {
        #[command(subcommand)]
        command: Option<CoordinatorCommand>,
        /// Coordinator config file [default: /etc/warden/coordinator.toml when it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use throwaway TLS certificates made in the state directory.
        #[arg(long)]
        dev: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Listen address for agents (overrides the config's listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Show a running agent's status.
    Status {
        #[arg(long)]
        json: bool,
        /// The agent's status socket [default: /var/lib/warden/agent.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// List the nodes a running coordinator knows.
    Nodes {
        #[arg(long)]
        json: bool,
        /// The coordinator's admin socket [default: /var/lib/warden-coordinator/admin.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Make a join token for a coordinator whose enrollment policy is
    /// "token": the token for agents, its SHA-256 for the coordinator.
    JoinToken,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum LeaseCommand {
    /// Lease GPUs of a node and run a container on them; prints the lease id.
    Start {
        node_id: String,
        /// A GPU of the lease, by uuid (repeat for more).
        #[arg(long = "gpu", value_name = "UUID", conflicts_with = "gpus")]
        gpu: Vec<String>,
        /// `all`: every GPU of the node.
        #[arg(long, value_name = "all", value_parser = ["all"])]
        gpus: Option<String>,
        #[arg(long)]
        renter: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Run one more container in a running lease.
    Run {
        lease_id: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Stop and remove one container of a lease (the lease goes on).
    Stop {
        lease_id: String,
        /// The container's name within the lease.
        name: String,
        #[arg(long)]
        grace: Option<u32>,
        #[arg(long, default_value_t = 60)]
        timeout: u32,
    },
    /// Write a lease's evidence (node key, records, proof, challenges,
    /// verdict) as a bundle that `warden verify` checks offline.
    Export {
        lease_id: String,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Leases the coordinator knows, with their containers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// End a lease: its containers are stopped and removed, its GPUs freed.
    End {
        lease_id: String,
        /// Seconds between SIGTERM and SIGKILL (default: the node's workload.stop_grace).
        #[arg(long)]
        grace: Option<u32>,
        #[arg(long, default_value_t = 60)]
        timeout: u32,
    },
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Print the coordinator's public key (what verifiers pin) without
    /// starting it.
    Key {
        /// Coordinator config file [default: /etc/warden/coordinator.toml when it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// The keys `warden verify` trusts: never the bundle's own, unless asked.
#[derive(clap::Args)]
struct TrustArgs {
    /// The coordinator's public key (base64 or hex, or a file holding it),
    /// from its operator (`warden coordinator key`).
    #[arg(long, value_name = "KEY|FILE")]
    coordinator_key: Option<String>,
    /// The node's public key, to pin it too (otherwise the bundle's, bound
    /// to the lease by the coordinator's verdict and countersignatures).
    #[arg(long, value_name = "KEY|FILE")]
    node_key: Option<String>,
    /// A file of trusted keys: lines `coordinator KEY` and `node KEY` (# comments).
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// With no key pinned, take the bundle's own keys and say so: a
    /// self-asserted check that proves nothing against the node's owner.
    #[arg(long)]
    self_asserted: bool,
}

/// What to run: the container spec, as `lease start` and `lease run` take it.
#[derive(clap::Args)]
struct SpecArgs {
    /// The image to run. `lease start` without it reserves the GPUs and
    /// runs nothing yet (`lease run` adds containers).
    #[arg(long)]
    image: Option<String>,
    /// The container's name within the lease.
    #[arg(long, default_value = "main")]
    name: String,
    /// KEY=VALUE (repeat for more).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// CONTAINER_PORT[/udp] or HOST_PORT:CONTAINER_PORT[/udp] (repeat for more).
    #[arg(long = "port", value_name = "PORT")]
    port: Vec<String>,
    /// Memory limit: bytes, or with k, m, g (1024-based).
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    cpus: Option<f64>,
    /// Requests the node refuses unless its config allows them; they exist
    /// so that the refusal, with its reason, reaches this terminal.
    #[arg(long)]
    privileged: bool,
    #[arg(long)]
    network: Option<String>,
    #[arg(long)]
    pid: Option<String>,
    #[arg(long)]
    ipc: Option<String>,
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// HOST_PATH:CONTAINER_PATH[:ro]
    #[arg(long = "mount", value_name = "SRC:DST[:ro]")]
    mount: Vec<String>,
    #[arg(long = "device", value_name = "PATH")]
    device: Vec<String>,
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Seconds to wait for the node's answer.
    #[arg(long, default_value_t = 60)]
    timeout: u32,
    /// The command to run in the container.
    #[arg(last = true)]
    cmd: Vec<String>,
}

impl SpecArgs {
    /// The container spec, or None when no image was given.
    fn spec(self) -> Result<Option<warden_proto::pb::ContainerSpec>> {
        let Some(image) = self.image else {
            return Ok(None);
        };
        Ok(Some(warden_proto::pb::ContainerSpec {
            name: self.name,
            image,
            command: self.cmd,
            env: self.env,
            ports: self
                .port
                .iter()
                .map(|p| parse_port(p))
                .collect::<Result<_>>()?,
            memory_bytes: self
                .memory
                .as_deref()
                .map(parse_size)
                .transpose()?
                .unwrap_or(0),
            cpus: self.cpus.unwrap_or(0.0),
            privileged: self.privileged,
            network_mode: self.network.unwrap_or_default(),
            pid_mode: self.pid.unwrap_or_default(),
            ipc_mode: self.ipc.unwrap_or_default(),
            cap_add: self.cap_add,
            mounts: self
                .mount
                .iter()
                .map(|m| parse_mount(m))
                .collect::<Result<_>>()?,
            devices: self.device,
            security_opt: self.security_opt,
        }))
    }
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Run interface IFNAME in the foreground, driven by stock `wg` through
    /// /var/run/wireguard/IFNAME.sock, until SIGINT or SIGTERM.
    Up {
        ifname: String,
        /// Where the UAPI socket goes.
        #[arg(long, default_value = warden_agent::mesh::control::SOCKET_DIR)]
        socket_dir: PathBuf,
        /// A plain TUN device: one packet per read and write, no TCP
        /// segmentation offload (the fallback the kernel may force anyway).
        #[arg(long)]
        no_offload: bool,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Load an image archive (`docker save` format) into this node's Docker,
    /// for suppliers without a registry.
    Load {
        archive: PathBuf,
        /// Docker's socket [default: the agent config's workload.docker_socket].
        #[arg(long)]
        docker_socket: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// How the local tools find the agent's settings.
#[derive(clap::Args)]
struct Local {
    /// Agent config file [default: /etc/warden/agent.toml when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (overrides the config's state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The NVML library (overrides gpu.nvml_library).
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
}

impl Local {
    fn load(self) -> Result<AgentConfig> {
        let mut cfg = load_agent_config(self.config)?;
        if let Some(d) = self.state_dir {
            cfg.state_dir = d;
        }
        if let Some(l) = self.nvml_lib {
            cfg.gpu.nvml_library = Some(l);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn main() {
    // Errors are for people: the cause chain, never a backtrace (RUST_BACKTRACE
    // is often set on servers), and exit status 1.
    if let Err(e) = run() {
        // Each cause once: many messages already quote their source.
        eprintln!(
            "error: {}",
            warden_agent::delivery::uplink::error_chain(e.as_ref())
        );
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a file on a full disk)
        // is lost, not reported with eprintln!, which panics the task that
        // logged — a coordinator's stream task, silently, mid-stream.
        .log_internal_errors(false)
        // No colour codes in the journal or in files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Agent {
                config,
                dev,
                state_dir,
                nvml_lib,
            } => run_agent(config, dev, state_dir, nvml_lib).await,
            Command::Inventory { json, local } => inventory(json, local.load()?).await,
            Command::Lease { command, socket } => lease(command, socket).await,
            Command::Cluster { command, socket } => cluster(command, socket).await,
            Command::Mesh {
                command:
                    MeshCommand::Up {
                        ifname,
                        socket_dir,
                        no_offload,
                    },
            } => mesh_up(&ifname, &socket_dir, !no_offload).await,
            Command::Verify {
                bundle,
                trust,
                min_coverage,
                max_skew_ms,
                max_delay_ms,
                now,
                json,
            } => verify(
                &bundle,
                &trust,
                &warden_proto::chain::Params {
                    max_skew_ms,
                    min_coverage,
                    now_unix_ms: now.unwrap_or_else(warden_agent::now_ms),
                    max_delay_ms,
                },
                json,
            ),
            Command::Image {
                command:
                    ImageCommand::Load {
                        archive,
                        docker_socket,
                        config,
                    },
            } => image_load(archive, docker_socket, config).await,
            Command::Doctor { json, local } => doctor(json, local.load()?).await,
            Command::Coordinator {
                command: Some(CoordinatorCommand::Key { config, json }),
                ..
            } => coordinator_key(config, json),
            Command::Coordinator {
                command: None,
                config,
                dev,
                state_dir,
                listen,
            } => run_coordinator(config, dev, state_dir, listen).await,
            Command::Status { json, socket } => status(json, socket).await,
            Command::Nodes { json, socket } => nodes(json, socket).await,
            Command::JoinToken => {
                join_token();
                Ok(())
            }
        }
    })
}

/// Cancels the token on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

/// One message per SIGHUP; the handler is in place when this returns, so
/// a SIGHUP from then on never kills the process.
fn reload_on_sighup() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    // A reload already waiting reads the file after this signal too.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot watch SIGHUP: config reload is off"),
    }
    rx
}

const AGENT_CONFIG: &str = "/etc/warden/agent.toml";

/// The agent's config file (or the defaults without one) with the command
/// line's overrides, validated: at start and at each reload.
fn agent_config(
    file: Option<&Path>,
    state_dir: Option<&Path>,
    nvml_lib: Option<&Path>,
) -> Result<AgentConfig, warden_agent::config::ConfigError> {
    let mut cfg = match file {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(d) = state_dir {
        cfg.state_dir = d.to_owned();
    }
    if let Some(l) = nvml_lib {
        cfg.gpu.nvml_library = Some(l.to_owned());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// An explicit path must exist; the default path is used only if it does.
fn config_path(given: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    given.or_else(|| Some(PathBuf::from(default)).filter(|p| p.exists()))
}

fn load_agent_config(path: Option<PathBuf>) -> Result<AgentConfig> {
    Ok(match config_path(path, AGENT_CONFIG) {
        Some(p) => AgentConfig::load(&p)?,
        None => AgentConfig::default(),
    })
}

fn load_coordinator_config(path: Option<PathBuf>) -> Result<CoordinatorConfig> {
    Ok(match config_path(path, "/etc/warden/coordinator.toml") {
        Some(p) => CoordinatorConfig::load(&p)?,
        None => CoordinatorConfig::default(),
    })
}

async fn run_agent(
    config: Option<PathBuf>,
    dev: bool,
    state_dir: Option<PathBuf>,
    nvml_lib: Option<PathBuf>,
) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let reloads = reload_on_sighup();
    if !dev {
        let file = config.clone().unwrap_or_else(|| AGENT_CONFIG.into());
        // The default file is read if it exists at the time, at start or reload.
        let load = move || {
            let file = config_path(config.clone(), AGENT_CONFIG);
            agent_config(file.as_deref(), state_dir.as_deref(), nvml_lib.as_deref())
        };
        let cfg = load()?;
        let reload = warden_agent::Reloader {
            requests: reloads,
            load: Box::new(load),
            file,
        };
        return Ok(warden_agent::run(cfg, Some(reload), shutdown).await?);
    }
    let mut cfg = load_agent_config(config)?;
    if let Some(l) = nvml_lib {
        cfg.gpu.nvml_library = Some(l);
    }
    // Dev mode makes its config in code: SIGHUP only says so.
    let mut reloads = reloads;
    tokio::spawn(async move {
        while reloads.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP ignored: --dev has no config file to re-read; restart to change settings"
            );
        }
    });

    // A given directory must be a private one of ours; by default a fresh
    // one, since any user can prepare a predictable name in a shared $TMPDIR
    // (with links into root's files) before root runs --dev.
    let fresh = state_dir.is_none();
    let root = match state_dir {
        Some(d) => {
            warden_state::dir::ensure_private(&d)?;
            d
        }
        None => warden_state::dir::fresh_private(&std::env::temp_dir(), "warden-dev.")?,
    };
    let mut coord_cfg = CoordinatorConfig {
        state_dir: root.join("coordinator"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..CoordinatorConfig::default()
    };
    // Dev mode enrolls anyone: it listens on loopback only.
    coord_cfg.enrollment.policy = Some(EnrollmentPolicy::Open);
    let tls = warden_coordinator::devtls::ensure(&root.join("tls"))?;
    let coordinator = warden_coordinator::start(&coord_cfg, tls.server, shutdown.clone()).await?;
    cfg.state_dir = root.join("agent");
    cfg.coordinator = Some(dev::link(
        coordinator.addr.port(),
        &coordinator.public_key.to_base64(),
        &tls.ca_cert,
    ));
    // A second dev agent (or anything else on the port) must not stop a newcomer.
    if std::net::TcpListener::bind(&cfg.metrics.listen).is_err() {
        cfg.metrics.listen = "127.0.0.1:0".into();
    }
    cfg.validate()?;
    let exe = std::env::current_exe().unwrap_or_else(|_| "warden".into());
    // Made now (the agent would make it at start) so the banner can name the node.
    warden_state::dir::ensure_private(&cfg.state_dir)?;
    let (signer, _) = warden_proto::identity::load_or_create(&cfg.key_file())?;
    println!(
        "\nWarden dev mode: an embedded coordinator and an agent in one process.\n\
         \n  state dir          {root}{fresh}\
         \n  coordinator        https://localhost:{port} (TLS, CA {ca})\
         \n  coordinator key    {key}\
         \n  coordinator db     {db}\
         \n  agent status       {exe} status --socket {status}\
         \n  nodes              {exe} nodes --socket {admin}\
         \n  run a lease        {exe} lease --socket {admin} start {node} --image IMAGE -- CMD\
         \n  metrics            {metrics}\
         \n\nPress Ctrl-C to stop.\n",
        root = root.display(),
        fresh = if fresh {
            " (new for this run; --state-dir DIR keeps one across runs)"
        } else {
            ""
        },
        port = coordinator.addr.port(),
        ca = tls.ca_cert.display(),
        key = coordinator.public_key.to_base64(),
        db = coordinator.database.display(),
        exe = exe.display(),
        status = cfg.status_socket().display(),
        admin = coordinator.admin_socket.display(),
        node = signer.key_id(),
        metrics = if cfg.metrics.listen.ends_with(":0") {
            "on a free port (warden status shows it)".to_owned()
        } else {
            format!("http://{}/metrics", cfg.metrics.listen)
        },
    );
    let agent = warden_agent::run(cfg, None, shutdown.clone()).await;
    shutdown.cancel();
    coordinator.wait().await?;
    Ok(agent?)
}

async fn run_coordinator(
    config: Option<PathBuf>,
    dev: bool,
    state_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<()> {
    let mut cfg = load_coordinator_config(config)?;
    if let Some(d) = state_dir {
        cfg.state_dir = d;
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if dev {
        // Dev mode enrolls anyone unless its config chose otherwise.
        cfg.enrollment.policy.get_or_insert(EnrollmentPolicy::Open);
    }
    // Before the TLS files: who may enroll is the first thing to decide.
    cfg.enrollment_policy()?;
    credentials_for_tls(
        &mut cfg,
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    );
    let shutdown = shutdown_on_signal();
    let (tls, ca) = if dev {
        let t = warden_coordinator::devtls::ensure(&cfg.state_dir.join("tls"))?;
        (t.server, Some(t.ca_cert))
    } else {
        (TlsPem::from_config(&cfg)?, None)
    };
    let running = warden_coordinator::start(&cfg, tls, shutdown).await?;
    if let Some(ca) = ca {
        // Agents started by hand (and the tests) read their [coordinator] section from here.
        let link = dev::link(running.addr.port(), &running.public_key.to_base64(), &ca);
        let path = cfg.state_dir.join("agent-link.toml");
        // Whole or absent: whoever waits for the file never reads half of it.
        warden_state::file::write_private(&path, dev::link_toml(&link).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "agents connect with the [coordinator] section in {}",
            path.display()
        );
    }
    println!(
        "coordinator listening on {} (key {}); admin socket {}",
        running.addr,
        running.public_key.to_base64(),
        running.admin_socket.display()
    );
    running.wait().await?;
    Ok(())
}

/// Prints a new join token and the line the coordinator's config needs.
fn join_token() {
    let (token, sha) = warden_coordinator::enrollment::new_token();
    println!(
        "# For each agent, in /etc/warden/agent.toml (keep the file private: chmod 600):\n\
         [coordinator]\n\
         join_token = \"{token}\"\n\
         \n\
         # For the coordinator, in /etc/warden/coordinator.toml (only the digest; it is not a secret):\n\
         [enrollment]\n\
         policy = \"token\"\n\
         join_token_sha256 = [\"{sha}\"]"
    );
}

/// Under systemd the packaged unit hands the TLS certificate and key over as
/// credentials (`LoadCredential=tls.crt:…`), since its dynamic user cannot
/// read root's files: they fill `tls.cert` and `tls.key` unless the config sets them.
fn credentials_for_tls(cfg: &mut CoordinatorConfig, dir: Option<PathBuf>) {
    let Some(dir) = dir else { return };
    let found = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
    if cfg.tls.cert.is_none() {
        cfg.tls.cert = found("tls.crt");
    }
    if cfg.tls.key.is_none() {
        cfg.tls.key = found("tls.key");
    }
}

async fn status(json: bool, socket: Option<PathBuf>) -> Result<()> {
    let socket = socket.unwrap_or_else(|| {
        load_agent_config(None)
            .map(|c| c.status_socket())
            .unwrap_or_else(|_| {
                Path::new(warden_agent::config::DEFAULT_STATE_DIR).join("agent.sock")
            })
    });
    let v = warden_agent::status::query(&socket)
        .await
        .with_context(|| "is the agent running? (warden agent, or systemctl status warden)")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let c = &v["coordinator"];
    let s = &v["spool"];
    println!("node        {}", v["node_id"].as_str().unwrap_or("?"));
    println!(
        "version     {}  (start {})",
        v["version"].as_str().unwrap_or("?"),
        v["start_id"].as_str().unwrap_or("?")
    );
    if c["configured"].as_bool() == Some(true) {
        let state = if c["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "disconnected"
        };
        println!(
            "coordinator {} {}",
            c["address"].as_str().unwrap_or("?"),
            state
        );
        if let Some(e) = c["last_error"].as_str() {
            println!("            last error: {e}");
        }
    } else {
        println!("coordinator none configured");
    }
    println!(
        "spool       {} pending, {} of {} bytes{}{}",
        s["pending"],
        s["bytes"],
        s["max_bytes"],
        if s["full"].as_bool() == Some(true) {
            format!(", FULL of evidence ({} refused)", s["refused"])
        } else {
            String::new()
        },
        if s["shedding"].as_bool() == Some(true) {
            ", shedding telemetry"
        } else {
            ""
        }
    );
    let nonzero = |k: &str| s[k].as_u64().filter(|n| *n > 0);
    if let Some(n) = nonzero("shed") {
        println!("            {n} telemetry samples shed for lack of room since start");
    }
    if let Some(n) = nonzero("set_aside") {
        println!(
            "            {n} records set aside (refused for good; spool/refused.log, refused.txt)"
        );
    }
    if let Some(n) = nonzero("corrupt") {
        println!("            {n} damaged frames skipped since start (see the log for their seqs)");
    }
    if s["anchored"].as_bool() == Some(false) {
        println!("            waiting for the coordinator's last seq before sending (the spool was started empty)");
    }
    println!("receipts    last seq {}", v["last_receipt_seq"]);
    let cfg = &v["config"];
    if let Some(file) = cfg["file"].as_str() {
        let restart: Vec<&str> = cfg["needs_restart"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        println!(
            "config      {file}, reloaded {} time(s){}",
            cfg["reloads"],
            if restart.is_empty() {
                String::new()
            } else {
                format!("; needs a restart for: {}", restart.join(", "))
            }
        );
        if let Some(e) = cfg["last_error"].as_str() {
            println!("            last reload refused: {e}");
        }
    }
    let gpus = v["gpus"].as_array().cloned().unwrap_or_default();
    match v["nvml"].as_str() {
        Some("ok") => println!("gpus        {}", gpus.len()),
        Some(why) => println!("gpus        none: CPU-only node ({why})"),
        None => {}
    }
    for g in &gpus {
        if g["lost"] == true || g["error"].as_str().is_some_and(|e| !e.is_empty()) {
            println!(
                "  {:<3} {}  {}",
                g["index"],
                g["uuid"].as_str().unwrap_or("?"),
                g["error"].as_str().unwrap_or("")
            );
        } else {
            println!(
                "  {:<3} {}  {:>3}% util  {:>6} MiB used  {:>4} W  {:>3} C  {} processes",
                g["index"],
                g["uuid"].as_str().unwrap_or("?"),
                g["utilization_gpu"],
                g["memory_used_bytes"].as_u64().unwrap_or(0) >> 20,
                g["power_mw"].as_u64().unwrap_or(0) / 1000,
                g["temperature_c"],
                g["processes"].as_array().map_or(0, |p| p.len()),
            );
        }
    }
    let l = &v["link"];
    if !l.is_null() {
        if l["error"].as_str().is_some_and(|e| !e.is_empty()) {
            println!(
                "link        probe failed: {}",
                l["error"].as_str().unwrap_or("")
            );
        } else {
            println!(
                "link        down {:.0} Mbit/s, up {:.0} Mbit/s, rtt {:.2} ms",
                l["download_mbps"].as_f64().unwrap_or(0.0),
                l["upload_mbps"].as_f64().unwrap_or(0.0),
                l["rtt_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(m) = v["metrics_address"].as_str() {
        println!("metrics     http://{m}/metrics");
    }
    for l in v["leases"].as_array().cloned().unwrap_or_default() {
        let containers: Vec<String> = l["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["name"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!(
            "lease       {}  {} GPU(s)  {}",
            l["id"].as_str().unwrap_or("?"),
            l["gpus"].as_array().map_or(0, |g| g.len()),
            if containers.is_empty() {
                "no containers".to_owned()
            } else {
                containers.join(", ")
            }
        );
    }
    let m = &v["mesh"];
    if !m.is_null() {
        println!(
            "mesh        {} {} in cluster {} (generation {}), port {}",
            m["interface"].as_str().unwrap_or("?"),
            m["address"].as_str().unwrap_or("?"),
            m["cluster_id"].as_str().unwrap_or("?"),
            m["generation"],
            m["listen_port"],
        );
        let now = warden_agent::now_ms();
        for p in m["peers"].as_array().cloned().unwrap_or_default() {
            let hs = p["last_handshake_unix_ms"].as_i64().unwrap_or(0);
            println!(
                "  peer {}  {}  endpoint {}  handshake {}  rx {} B  tx {} B  rtt {}",
                p["node_id"].as_str().unwrap_or("?"),
                p["allowed_ips"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default(),
                p["endpoint"].as_str().unwrap_or("unknown"),
                if hs == 0 {
                    "never".to_owned()
                } else {
                    format!("{} s ago", (now - hs).max(0) / 1000)
                },
                p["rx_bytes"],
                p["tx_bytes"],
                p["rtt_ms"]
                    .as_f64()
                    .map_or("no answer".to_owned(), |r| format!("{r:.2} ms")),
            );
        }
        for e in m["errors"].as_array().cloned().unwrap_or_default() {
            println!("  problem: {}", e.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

async fn cluster(command: ClusterCommand, socket: Option<PathBuf>) -> Result<()> {
    use warden_proto::pb;
    let mut client = admin_client(socket).await?;
    let print = |c: &pb::ClusterInfo, json: bool| -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(&cluster_json(c))?);
            return Ok(());
        }
        println!(
            "cluster {}  subnet {}  generation {}",
            c.cluster_id, c.subnet, c.generation
        );
        for m in &c.members {
            println!(
                "  {}  {:<16} {:<8} {}",
                m.node_id, m.address, m.state, m.error
            );
        }
        Ok(())
    };
    match command {
        ClusterCommand::Set {
            cluster_id,
            nodes,
            subnet,
            timeout,
            json,
        } => {
            let started = std::time::Instant::now();
            let c = client
                .set_cluster(pb::SetClusterRequest {
                    cluster_id,
                    node_ids: nodes,
                    subnet: subnet.unwrap_or_default(),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print(&c, json)?;
            if !json {
                let applied = c.members.iter().filter(|m| m.state == "applied").count();
                println!(
                    "{applied} of {} member(s) applied it in {:.2} s",
                    c.members.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        ClusterCommand::Delete {
            cluster_id,
            timeout,
        } => {
            let c = client
                .delete_cluster(pb::DeleteClusterRequest {
                    cluster_id,
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print(&c, false)?;
        }
        ClusterCommand::List { json } => {
            let list = client
                .list_clusters(pb::ListClustersRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .clusters;
            if json {
                let v: Vec<_> = list.iter().map(cluster_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if list.is_empty() {
                println!("no clusters");
            } else {
                for c in &list {
                    print(c, false)?;
                }
            }
        }
    }
    Ok(())
}

fn cluster_json(c: &warden_proto::pb::ClusterInfo) -> serde_json::Value {
    serde_json::json!({
        "cluster_id": c.cluster_id,
        "subnet": c.subnet,
        "generation": c.generation,
        "created_unix_ms": c.created_unix_ms,
        "members": c.members.iter().map(|m| serde_json::json!({
            "node_id": m.node_id,
            "address": m.address,
            "state": m.state,
            "error": m.error,
            "applied_generation": m.applied_generation,
        })).collect::<Vec<_>>(),
    })
}

async fn nodes(json: bool, socket: Option<PathBuf>) -> Result<()> {
    let mut client = admin_client(socket).await?;
    let nodes = client
        .list_nodes(warden_proto::pb::ListNodesRequest {})
        .await
        .context("listing nodes")?
        .into_inner()
        .nodes;
    if json {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node_id": n.node_id,
                    "hostname": n.hostname,
                    "agent_version": n.agent_version,
                    "connected": n.connected,
                    "records": n.records,
                    "last_seq": n.last_seq,
                    "missing": n.missing.iter().map(|r| [r.first, r.last]).collect::<Vec<_>>(),
                    "first_seen_unix_ms": n.first_seen_unix_ms,
                    "last_seen_unix_ms": n.last_seen_unix_ms,
                    "peer_address": n.peer_address,
                    "public_key": hex::encode(&n.public_key),
                    "spool": n.spool,
                    "inventory": n.inventory,
                    "gpus": n.gpus,
                    "link": n.link,
                    "mesh_public_key": base64_std(&n.mesh_public_key),
                    "mesh_endpoints": n.mesh_endpoints,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if nodes.is_empty() {
        println!("no nodes yet");
        return Ok(());
    }
    println!(
        "{:<34} {:<16} {:<10} {:>5} {:>9} {:>8}  last seen",
        "NODE", "HOST", "STATE", "GPUS", "RECORDS", "LAST SEQ"
    );
    let now = warden_agent::now_ms();
    for n in nodes {
        println!(
            "{:<34} {:<16} {:<10} {:>5} {:>9} {:>8}  {}s ago{}{}",
            n.node_id,
            n.hostname,
            if n.connected { "connected" } else { "offline" },
            n.inventory.as_ref().map_or(0, |i| i.gpus.len()),
            n.records,
            n.last_seq,
            (now - n.last_seen_unix_ms).max(0) / 1000,
            match &n.spool {
                Some(s) if s.full => format!("  SPOOL FULL ({} records refused)", s.refused),
                Some(s) if s.shedding => format!("  SHEDDING TELEMETRY ({} shed)", s.shed),
                _ => String::new(),
            },
            match n.gpus.iter().filter(|g| g.lost).count() {
                0 => String::new(),
                lost => format!("  {lost} GPU(s) LOST"),
            }
        );
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

async fn inventory(json: bool, cfg: AgentConfig) -> Result<()> {
    let inv = tokio::task::spawn_blocking(move || {
        let gpus = warden_agent::host::gpu::nvml::NvmlSource::load(cfg.gpu.nvml_library.as_deref());
        let src = gpus
            .as_ref()
            .map(|g| g as &dyn warden_agent::host::gpu::GpuSource)
            .map_err(|e| e.to_string());
        warden_agent::host::inventory::collect(&cfg.state_dir, src)
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    println!(
        "host       {} ({}), kernel {}",
        inv.hostname, inv.os, inv.kernel
    );
    println!("cpu        {}, {} cores", inv.cpu_model, inv.cpu_cores);
    println!("memory     {}", gib(inv.memory_bytes));
    println!(
        "disk free  {} (state dir filesystem)",
        gib(inv.disk_free_bytes)
    );
    println!("docker     {}", inv.docker);
    println!(
        "tun        {}",
        if inv.tun_available {
            "available"
        } else {
            "unavailable"
        }
    );
    if inv.nvml_status == "ok" {
        println!(
            "nvml       driver {}, CUDA {}.{}",
            inv.driver_version,
            inv.cuda_version / 1000,
            inv.cuda_version % 1000 / 10
        );
    } else {
        println!("nvml       not loaded: {} (CPU-only node)", inv.nvml_status);
    }
    if !inv.gpus.is_empty() {
        println!(
            "\n{:<4} {:<42} {:<28} {:>10}  PCI",
            "GPU", "UUID", "NAME", "MEMORY"
        );
        for g in &inv.gpus {
            println!(
                "{:<4} {:<42} {:<28} {:>10}  {}",
                g.index,
                g.uuid,
                g.name,
                gib(g.memory_total_bytes),
                g.pci_bus_id
            );
        }
    }
    Ok(())
}

async fn doctor(json: bool, cfg: AgentConfig) -> Result<()> {
    use warden_agent::host::doctor;
    let facts = doctor::gather(&cfg).await;
    let checks = doctor::evaluate(&facts, &cfg.doctor);
    let failed = doctor::failed(&checks);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed.is_empty(),
                "failed": failed,
                "checks": checks,
            }))?
        );
    } else {
        for c in &checks {
            let verdict = match c.verdict {
                doctor::Verdict::Pass => "pass",
                doctor::Verdict::Warn => "warn",
                doctor::Verdict::Fail => "FAIL",
                doctor::Verdict::Skip => "skip",
            };
            println!(
                "{:<9} {:<5} {}  (want {})",
                c.name, verdict, c.value, c.threshold
            );
            if !c.fix.is_empty() && c.verdict != doctor::Verdict::Pass {
                println!("{:<15} fix: {}", "", c.fix);
            }
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    // A verdict, not an error: the names and exit status 1, no backtrace.
    eprintln!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    std::process::exit(1);
}

/// `512m`, `2g`, `1048576`: bytes, 1024-based suffixes.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("--memory {s}: not a size (e.g. 512m, 2g)"))?;
    anyhow::ensure!(n >= 0.0 && n.is_finite(), "--memory {s}: not a size");
    Ok((n * mult as f64) as u64)
}

/// `8080`, `8080/udp`, `9000:8080`, `9000:8080/udp`.
fn parse_port(s: &str) -> Result<warden_proto::pb::PortSpec> {
    let (ports, protocol) = match s.split_once('/') {
        Some((p, proto)) => (p, proto.to_owned()),
        None => (s, String::new()),
    };
    let bad = || {
        anyhow::anyhow!(
            "--port {s}: expected CONTAINER_PORT or HOST_PORT:CONTAINER_PORT, with /udp for UDP"
        )
    };
    let (host, container) = match ports.split_once(':') {
        Some((h, c)) => (h.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?),
        None => (0, ports.parse().map_err(|_| bad())?),
    };
    Ok(warden_proto::pb::PortSpec {
        container_port: container,
        protocol,
        host_port: host,
    })
}

fn parse_mount(s: &str) -> Result<warden_proto::pb::MountSpec> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [src, dst] => (src, dst, false),
        [src, dst, "ro"] => (src, dst, true),
        [src, dst, "rw"] => (src, dst, false),
        _ => anyhow::bail!("--mount {s}: expected HOST_PATH:CONTAINER_PATH[:ro]"),
    };
    Ok(warden_proto::pb::MountSpec {
        source: source.to_string(),
        target: target.to_string(),
        read_only,
    })
}

/// A client of the coordinator's admin socket: `socket`, or the one the
/// coordinator's config names, or the default.
async fn admin_client(
    socket: Option<PathBuf>,
) -> Result<warden_proto::pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let socket = socket.unwrap_or_else(|| {
        load_coordinator_config(None)
            .map(|c| c.admin_socket_path())
            .unwrap_or_else(|_| {
                Path::new(warden_coordinator::config::DEFAULT_STATE_DIR).join("admin.sock")
            })
    });
    warden_coordinator::admin::connect(&socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the coordinator admin socket {}",
                socket.display()
            )
        })
}

/// An admin call refused: the node's (or coordinator's) own words, not
/// gRPC's framing, reach the terminal.
fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create a cluster or set its members; waits for them to apply their mesh.
    Set {
        cluster_id: String,
        /// Node ids: the members after this call.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// IPv4 prefix of mesh addresses [default: 10.90.0.0/24 for a new cluster].
        #[arg(long)]
        subnet: Option<String>,
        /// Seconds to wait for the members' answers.
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        #[arg(long)]
        json: bool,
    },
    /// Take every member out of the mesh and forget the cluster.
    Delete {
        cluster_id: String,
        #[arg(long, default_value_t = 30)]
        timeout: u32,
    },
    /// Clusters, their members, addresses and states.
    List {
        #[arg(long)]
        json: bool,
    },
}

async fn lease(command: LeaseCommand, socket: Option<PathBuf>) -> Result<()> {
    use warden_proto::pb;
    let mut client = admin_client(socket).await?;
    match command {
        LeaseCommand::Start {
            node_id,
            gpu,
            gpus,
            renter,
            spec,
        } => {
            let timeout = spec.timeout;
            let info = client
                .start_lease(pb::StartLeaseRequest {
                    node_id,
                    gpu_uuids: gpu,
                    all_gpus: gpus.is_some(),
                    container: spec.spec()?,
                    renter: renter.unwrap_or_default(),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!("{}", info.lease_id);
        }
        LeaseCommand::Run { lease_id, spec } => {
            let timeout = spec.timeout;
            let name = spec.name.clone();
            client
                .run_container(pb::RunContainerRequest {
                    lease_id: lease_id.clone(),
                    container: Some(spec.spec()?.context("lease run needs --image")?),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?;
            println!("{lease_id} {name} running");
        }
        LeaseCommand::Stop {
            lease_id,
            name,
            grace,
            timeout,
        } => {
            client
                .stop_container(pb::StopContainerRequest {
                    lease_id: lease_id.clone(),
                    name: name.clone(),
                    grace_seconds: grace.unwrap_or(0),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?;
            println!("{lease_id} {name} removed");
        }
        LeaseCommand::Export { lease_id, output } => {
            let json = client
                .export_lease(pb::ExportLeaseRequest {
                    lease_id: lease_id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .bundle_json;
            std::fs::write(&output, json)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{lease_id} → {}", output.display());
        }
        LeaseCommand::List { json } => {
            let leases = client
                .list_leases(pb::ListLeasesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .leases;
            if json {
                let list: Vec<_> = leases
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "lease_id": l.lease_id,
                            "node_id": l.node_id,
                            "state": l.state,
                            "gpu_uuids": l.gpu_uuids,
                            "all_gpus": l.all_gpus,
                            "renter": l.renter,
                            "created_unix_ms": l.created_unix_ms,
                            "started_unix_ms": l.started_unix_ms,
                            "ended_unix_ms": l.ended_unix_ms,
                            "error": l.error,
                            "containers": l.containers,
                            "verdict": l.verdict,
                            "verdict_reasons": l.verdict_reasons,
                            "coverage": l.coverage,
                            "chain_errors": l.chain_errors,
                            "attestations": l.attestations,
                            "challenges_sent": l.challenges_sent,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if leases.is_empty() {
                println!("no leases yet");
                return Ok(());
            }
            println!(
                "{:<20} {:<34} {:<9} {:<6} CONTAINERS",
                "LEASE", "NODE", "STATE", "GPUS"
            );
            for l in leases {
                let containers: Vec<String> = l
                    .containers
                    .iter()
                    .map(|c| match c.state.as_str() {
                        "exited" | "oom-killed" => {
                            format!("{} {} ({})", c.name, c.state, c.exit_code)
                        }
                        _ if !c.health.is_empty() => format!("{} {} {}", c.name, c.state, c.health),
                        _ => format!("{} {}", c.name, c.state),
                    })
                    .collect();
                println!(
                    "{:<20} {:<34} {:<9} {:<6} {}{}{}",
                    l.lease_id,
                    l.node_id,
                    l.state,
                    if l.all_gpus {
                        "all".to_owned()
                    } else {
                        l.gpu_uuids.len().to_string()
                    },
                    containers.join(", "),
                    if l.error.is_empty() {
                        String::new()
                    } else {
                        format!("  error: {}", l.error)
                    },
                    match l.verdict.as_str() {
                        "" => String::new(),
                        v => format!("  proof {v} (coverage {:.1} %)", l.coverage * 100.0),
                    }
                );
            }
        }
        LeaseCommand::End {
            lease_id,
            grace,
            timeout,
        } => {
            let info = client
                .end_lease(pb::EndLeaseRequest {
                    lease_id,
                    grace_seconds: grace.unwrap_or(0),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!("{} {}", info.lease_id, info.state);
        }
    }
    Ok(())
}

async fn image_load(
    archive: PathBuf,
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => load_agent_config(config)?.workload.docker_socket,
    };
    let docker = warden_agent::workloads::docker::Docker::connect(&socket).await?;
    let loaded = docker.load_image(&archive).await?;
    for name in loaded {
        println!("loaded {name}");
    }
    Ok(())
}

/// `warden coordinator key`: the public half of the coordinator's signing
/// key, read from its key file (never made here: the coordinator makes it
/// on its first start).
fn coordinator_key(config: Option<PathBuf>, json: bool) -> Result<()> {
    let cfg = load_coordinator_config(config)?;
    let path = cfg.key_path();
    if !path.exists() {
        anyhow::bail!(
            "no coordinator key at {} yet: the coordinator makes it when it first starts",
            path.display()
        );
    }
    let key = warden_proto::identity::load(&path)?.verifying_key();
    if json {
        println!(
            "{}",
            serde_json::json!({"public_key": key.to_base64(), "key_id": key.key_id(), "key_file": path})
        );
    } else {
        println!("{}", key.to_base64());
        println!("# key id {} ({})", key.key_id(), path.display());
    }
    Ok(())
}

/// A key given on the command line: the key itself, or a file holding it.
fn parse_key(text: &str, what: &str) -> Result<warden_proto::dsse::VerifyingKey> {
    use warden_proto::dsse::VerifyingKey;
    if let Ok(k) = VerifyingKey::parse(text.trim()) {
        return Ok(k);
    }
    let path = Path::new(text);
    let contents = std::fs::read_to_string(path).with_context(|| {
        format!("{what} `{text}` is neither a key (base64 or hex) nor a readable file")
    })?;
    // The first word of the first non-comment line (`warden coordinator key` prints it first).
    let key = contents
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("");
    VerifyingKey::parse(key).with_context(|| format!("{what} in {}", path.display()))
}

/// The trust anchors from `--coordinator-key`, `--node-key` and `--keys`.
fn trust_from(args: &TrustArgs) -> Result<warden_proto::bundle::Trust> {
    let mut trust = warden_proto::bundle::Trust {
        self_asserted: args.self_asserted,
        ..Default::default()
    };
    if let Some(file) = &args.keys {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading keys file {}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", file.display(), n + 1);
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["coordinator", key] => {
                    trust.coordinator_key = Some(parse_key(key, &at())?);
                }
                ["node", key] => trust.node_key = Some(parse_key(key, &at())?),
                _ => anyhow::bail!("{}: expected `coordinator KEY` or `node KEY`", at()),
            }
        }
    }
    if let Some(k) = &args.coordinator_key {
        trust.coordinator_key = Some(parse_key(k, "--coordinator-key")?);
    }
    if let Some(k) = &args.node_key {
        trust.node_key = Some(parse_key(k, "--node-key")?);
    }
    Ok(trust)
}

fn verify(
    path: &Path,
    trust: &TrustArgs,
    params: &warden_proto::chain::Params,
    json: bool,
) -> Result<()> {
    use warden_proto::bundle::Bundle;
    let trust = trust_from(trust)?;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let bundle = Bundle::from_json(&value)?;
    let (report, keys) = bundle.verify(&trust, params);
    let s = &report.summary;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "holds": report.holds(),
                "keys": keys,
                "summary": s,
                "failures": report.failures,
            }))?
        );
    } else {
        println!(
            "trusted     coordinator key {} ({}); node key {} ({})",
            keys.coordinator_key_id.as_deref().unwrap_or("-"),
            keys.coordinator_key_source,
            keys.node_key_id,
            keys.node_key_source
        );
        println!("lease       {} on node {}", s.lease_id, s.node_id);
        println!(
            "chain       {} records, lease seq {}..{}, head {}",
            s.records,
            s.first_seq,
            s.last_seq,
            hex::encode(s.head_sha256)
        );
        println!(
            "coverage    {:.2} % countersigned in time ({:.2} % claimed; {} late, {} blind windows)",
            s.coverage * 100.0,
            s.claimed_coverage * 100.0,
            s.late,
            s.blind
        );
        println!("restarts    {} ({})", s.restarts, s.start_ids.join(", "));
        println!(
            "enforcement {} foreign holders, {} kills, {} containers stopped",
            s.foreign_events, s.kills, s.container_stops
        );
        println!(
            "challenges  {} issued, {} answered, {} issued while the agent was down",
            s.challenges, s.challenges_answered, s.challenges_in_gaps
        );
        println!(
            "verdict     {}",
            match s.verdict_holds {
                Some(true) => "the coordinator judged it holds",
                Some(false) => "the coordinator judged it does not hold",
                None => "none that verifies",
            }
        );
    }
    if report.holds() {
        if !json {
            if keys.coordinator_key_source == "pinned" {
                println!("HOLDS");
            } else {
                println!("HOLDS (SELF-ASSERTED: the keys came from the bundle; this proves nothing against the node's owner)");
            }
        }
        return Ok(());
    }
    for f in &report.failures {
        eprintln!("{f}");
    }
    eprintln!("does NOT hold: {} problem(s)", report.failures.len());
    std::process::exit(1);
}

async fn mesh_up(ifname: &str, socket_dir: &Path, offload: bool) -> Result<()> {
    use std::sync::Arc;
    use warden_agent::mesh::{control, device::Device, tun::Tun};
    let tun = if offload {
        Tun::create(ifname)?
    } else {
        Tun::create_plain(ifname)?
    };
    // Dual-stack: IPv4 peers arrive as mapped addresses.
    let dev = Arc::new(Device::new(std::net::Ipv6Addr::UNSPECIFIED.into()));
    let path = control::socket_path(socket_dir, tun.name());
    let (listener, socket_file) =
        control::bind(&path).with_context(|| format!("UAPI socket {}", path.display()))?;
    eprintln!(
        "interface {} is up{}; configure it with `wg set {} …` (UAPI socket {})",
        tun.name(),
        if tun.offload() {
            " with TCP segmentation offload"
        } else {
            ""
        },
        tun.name(),
        path.display()
    );
    let shutdown = shutdown_on_signal();
    let control = tokio::spawn(control::serve(
        listener,
        socket_file,
        dev.clone(),
        shutdown.clone(),
    ));
    dev.run(tun, shutdown.clone()).await;
    let _ = control.await;
    Ok(())
}

/// Standard base64, as `wg` writes keys.
fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_credentials_fill_only_the_tls_paths_the_config_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), "cert").unwrap();
        let mut cfg = CoordinatorConfig::default();
        credentials_for_tls(&mut cfg, Some(dir.path().to_owned()));
        assert_eq!(cfg.tls.cert, Some(dir.path().join("tls.crt")));
        assert_eq!(cfg.tls.key, None, "no tls.key credential was passed");

        let mut cfg = CoordinatorConfig::default();
        cfg.tls.cert = Some("/etc/mine.pem".into());
        credentials_for_tls(&mut cfg, Some(dir.path().to_owned()));
        assert_eq!(cfg.tls.cert, Some(PathBuf::from("/etc/mine.pem")));

        let mut cfg = CoordinatorConfig::default();
        credentials_for_tls(&mut cfg, None);
        assert_eq!(cfg.tls.cert, None);
    }
}
