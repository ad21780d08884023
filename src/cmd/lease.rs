//! `warden lease`: start, run in, stop, export, list and end leases,
//! through the coordinator's admin socket.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::admin::{admin_client, refused};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: LeaseCommand,
    /// The coordinator's admin socket [default: the coordinator config's,
    /// else /var/lib/warden-coordinator/admin.sock].
    #[arg(long, global = true, env = "WARDEN_ADMIN_SOCKET")]
    socket: Option<PathBuf>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        lease(self.command, self.socket).await
    }
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
        /// Have the node seal the encrypted scratch volume's key to this
        /// X25519 public key (base64, as `wg pubkey` prints it); `lease
        /// scratch-key` opens it with the private key.
        #[arg(long, value_name = "PUBLIC_KEY")]
        scratch_key_to: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Print a lease's encrypted scratch volume key (its gocryptfs
    /// password), which the node sealed to the key `lease start
    /// --scratch-key-to` named.
    ScratchKey {
        lease_id: String,
        /// The private key: a file holding it in base64 (`wg genkey`), or a
        /// WireGuard config with a `PrivateKey =` line.
        #[arg(long, value_name = "FILE")]
        private_key: PathBuf,
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
    /// A lease container's output (stdout and stderr), from its node.
    Logs {
        lease_id: String,
        /// The container [default: the lease's first].
        #[arg(long)]
        name: Option<String>,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// The last this many lines.
        #[arg(long, default_value_t = 100)]
        tail: u32,
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

async fn lease(command: LeaseCommand, socket: Option<PathBuf>) -> Result<()> {
    use warden_proto::pb;
    let mut client = admin_client(socket).await?;
    match command {
        LeaseCommand::Start {
            node_id,
            gpu,
            gpus,
            renter,
            scratch_key_to,
            spec,
        } => {
            let scratch_key_to = match scratch_key_to {
                None => Vec::new(),
                Some(k) => x25519_key(&k).context("--scratch-key-to")?.to_vec(),
            };
            let timeout = spec.timeout;
            // Our own id, so that the image pull can be shown while we wait.
            let lease_id = format!("l-{}", warden_agent::random_id());
            let mut start = client.clone();
            let request = pb::StartLeaseRequest {
                node_id,
                gpu_uuids: gpu,
                all_gpus: gpus.is_some(),
                container: spec.spec()?,
                renter: renter.unwrap_or_default(),
                timeout_seconds: timeout,
                lease_id: lease_id.clone(),
                scratch_key_to,
            };
            let started = start.start_lease(request);
            tokio::pin!(started);
            let mut shown = String::new();
            let info = loop {
                tokio::select! {
                    r = &mut started => break r.map_err(refused)?.into_inner(),
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                        let Ok(list) = client.list_leases(pb::ListLeasesRequest {}).await else {
                            continue;
                        };
                        let progress = list
                            .into_inner()
                            .leases
                            .into_iter()
                            .find(|l| l.lease_id == lease_id)
                            .map(|l| l.progress)
                            .unwrap_or_default();
                        if !progress.is_empty() && progress != shown {
                            eprintln!("{progress}");
                            shown = progress;
                        }
                    }
                }
            };
            println!("{}", info.lease_id);
        }
        LeaseCommand::ScratchKey {
            lease_id,
            private_key,
        } => {
            let key = private_key_file(&private_key)?;
            let info = super::admin::lease_named(&mut client, &lease_id).await?;
            println!("{}", open_scratch_key(&info, &key)?);
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
        LeaseCommand::Logs {
            lease_id,
            name,
            follow,
            tail,
        } => {
            use std::io::Write;
            let mut since = 0;
            let mut tail = tail;
            loop {
                let r = client
                    .lease_logs(pb::LeaseLogsRequest {
                        lease_id: lease_id.clone(),
                        name: name.clone().unwrap_or_default(),
                        tail,
                        since_unix_ns: since,
                        timeout_seconds: 0,
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                let mut out = std::io::stdout().lock();
                out.write_all(&r.data)?;
                out.flush()?;
                since = since.max(r.last_unix_ns);
                // Following: from the last line on, every line; a full
                // answer is followed at once by the next.
                tail = 0;
                if r.truncated && !follow {
                    eprintln!("(more lines than one answer holds: use --tail, or --follow to read them all)");
                }
                if !follow {
                    break;
                }
                if !r.truncated {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
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
            let leases = super::admin::leases(&mut client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&leases)?);
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
                    match (l.error.is_empty(), l.note.is_empty()) {
                        (false, _) => format!("  error: {}", l.error),
                        (true, false) => format!("  note: {}", l.note),
                        (true, true) => String::new(),
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

/// `512m`, `2g`, `1048576`: bytes, 1024-based suffixes.
pub(super) fn parse_size(s: &str) -> Result<u64> {
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

/// The renter's X25519 private key from a file holding it in base64 (`wg
/// genkey`), or a WireGuard config with a `PrivateKey =` line.
pub(super) fn private_key_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<[u8; 32]>> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Ok(zeroize::Zeroizing::new(
        match super::cluster::private_key_in(&text) {
            Some(k) => k,
            None => x25519_key(&text).with_context(|| format!("the key in {}", path.display()))?,
        },
    ))
}

/// A lease's scratch volume password, opened from the sealed copy its node
/// made for the renter.
pub(super) fn open_scratch_key(
    info: &warden_proto::pb::LeaseInfo,
    key: &[u8; 32],
) -> Result<String> {
    let lease_id = &info.lease_id;
    if info.sealed_scratch_key.is_empty() {
        anyhow::bail!(
            "lease {lease_id} has no sealed scratch key: its start did not ask for one (--scratch-key-to), or it got no encrypted volume{}",
            if info.note.is_empty() { String::new() } else { format!(" ({})", info.note) }
        );
    }
    let password = warden_proto::sealed::open(key, lease_id.as_bytes(), &info.sealed_scratch_key)
        .with_context(|| format!("lease {lease_id}'s sealed scratch key"))?;
    Ok(String::from_utf8_lossy(&password).into_owned())
}

/// A 32-byte X25519 key in base64, as WireGuard's tools write them.
pub(super) fn x25519_key(text: &str) -> Result<[u8; 32]> {
    use base64::{engine::general_purpose::STANDARD as B64, Engine};
    let bytes = B64
        .decode(text.trim())
        .context("not base64 (a WireGuard-style X25519 key is 44 characters of base64)")?;
    Ok(warden_proto::sealed::key32(&bytes)?)
}
