//! `warden cluster`: nodes grouped into a cluster joined by a WireGuard
//! mesh, through the coordinator's admin socket.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::admin::{admin_client, cluster_named, clusters, leases, refused};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ClusterCommand,
    /// The coordinator's admin socket [default: the coordinator config's,
    /// else /var/lib/warden-coordinator/admin.sock].
    #[arg(long, global = true, env = "WARDEN_ADMIN_SOCKET")]
    socket: Option<PathBuf>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        cluster(self.command, self.socket).await
    }
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
    /// Hire a cluster: the coordinator picks nodes for the order, starts a
    /// lease on each and meshes them; waits until it is ready.
    Hire(Box<HireArgs>),
    /// One cluster: its phase, how long each step took, its members.
    Status {
        cluster_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put this machine (or another, with the file it writes) on the
    /// cluster's mesh: a WireGuard config for wg-quick, its private key made
    /// here (kept when FILE already holds one, so the address stays).
    Connect {
        cluster_id: String,
        /// A name for the machine, shown in status.
        #[arg(long, default_value = "renter")]
        name: String,
        /// Write the config here (mode 0600) instead of printing it.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, default_value_t = 30)]
        timeout: u32,
    },
    /// Grow a ready hired cluster (new members start, join the mesh and
    /// Ray) or shrink it (the newest members leave, their leases end), to
    /// a size of the kind it was ordered in.
    #[command(group(clap::ArgGroup::new("size").required(true).args(["gpus", "nodes"])))]
    Scale {
        cluster_id: String,
        /// The new number of GPUs (a cluster ordered with --gpus).
        #[arg(long)]
        gpus: Option<u32>,
        /// The new number of nodes (a cluster ordered with --nodes).
        #[arg(long)]
        nodes: Option<u32>,
        /// Seconds to wait for new members to be ready.
        #[arg(long, default_value_t = 90)]
        timeout: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print each member's encrypted scratch volume key (its gocryptfs
    /// password), which its node sealed to the key `cluster hire
    /// --scratch-key-to` named: one line per member, `LEASE NODE PASSWORD`.
    ScratchKeys {
        cluster_id: String,
        /// The private key: a file holding it in base64 (`wg genkey`), or a
        /// WireGuard config with a `PrivateKey =` line.
        #[arg(long, value_name = "FILE")]
        private_key: PathBuf,
    },
    /// Move a running hired cluster's end later.
    #[command(group(clap::ArgGroup::new("by").required(true).args(["hours", "duration"])))]
    Extend {
        cluster_id: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        hours: Option<u32>,
        /// Or a duration such as 30m.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// The cluster's proof: DIR/cluster.json (the record this coordinator
    /// signs: members, times, replacements) and DIR/lease-ID.json for every
    /// lease it ever had; `warden verify DIR` checks the set.
    Export {
        cluster_id: String,
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        /// Write into DIR even if it holds files already (an earlier
        /// export's cluster.json and lease-*.json are removed first, so
        /// the set is this export's alone; other files are left).
        #[arg(long)]
        force: bool,
    },
    /// End a hired cluster: its leases end, its members leave the mesh.
    End {
        cluster_id: String,
        /// Seconds the containers get between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 10)]
        grace: u32,
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("size").required(true).args(["gpus", "nodes"])))]
#[command(group(clap::ArgGroup::new("length").args(["hours", "duration"])))]
struct HireArgs {
    /// The cluster's name: 1 to 64 of [a-z0-9_.-].
    cluster_id: String,
    /// This many GPUs, on as few nodes as the filters allow.
    #[arg(long)]
    gpus: Option<u32>,
    /// This many nodes, each with every free GPU that passes the filters.
    #[arg(long)]
    nodes: Option<u32>,
    /// Only GPUs whose model contains this (e.g. H100).
    #[arg(long)]
    gpu_model: Option<String>,
    /// Only GPUs with at least this much memory (e.g. 40g).
    #[arg(long)]
    min_gpu_memory: Option<String>,
    /// Least connectivity tier of every node: basic, standard or premium.
    #[arg(long)]
    tier: Option<String>,
    /// Every node in this region.
    #[arg(long)]
    region: Option<String>,
    /// Every node declares this tag (repeat for more).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// How many hours the leases run (at least 1) [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    hours: Option<u32>,
    /// Or a duration such as 90m (a coordinator accepts nothing shorter
    /// than its clusters.min_duration, an hour).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// The image each member's container runs; without one the leases
    /// hold their GPUs and containers come later (`warden lease run`).
    #[arg(long)]
    image: Option<String>,
    /// The container's name.
    #[arg(long, default_value = "main")]
    name: String,
    /// KEY=VALUE (repeat for more).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Memory limit of each container: bytes, or with k, m, g.
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    cpus: Option<f64>,
    /// none (the containers as given) or ray.
    #[arg(long, default_value = "none")]
    purpose: String,
    #[arg(long, default_value = "")]
    renter: String,
    /// Have each member's node seal its encrypted scratch volume's key to
    /// this X25519 public key (base64, as `wg pubkey` prints it); `cluster
    /// scratch-keys` opens them with the private key.
    #[arg(long, value_name = "PUBLIC_KEY")]
    scratch_key_to: Option<String>,
    /// Print the plan; start nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait for the cluster to be ready.
    #[arg(long, default_value_t = 90)]
    timeout: u32,
    #[arg(long)]
    json: bool,
    /// The command each container runs.
    #[arg(last = true)]
    cmd: Vec<String>,
}

impl HireArgs {
    fn request(self) -> Result<warden_proto::pb::HireClusterRequest> {
        use warden_proto::pb;
        let duration_seconds = match (self.hours, self.duration) {
            (_, Some(d)) => d.as_secs(),
            (h, None) => u64::from(h.unwrap_or(1)) * 3600,
        };
        let memory_bytes = self
            .memory
            .as_deref()
            .map(super::lease::parse_size)
            .transpose()?
            .unwrap_or(0);
        Ok(pb::HireClusterRequest {
            cluster_id: self.cluster_id,
            order: Some(pb::ClusterOrder {
                gpus: self.gpus.unwrap_or(0),
                nodes: self.nodes.unwrap_or(0),
                gpu_model: self.gpu_model.unwrap_or_default(),
                min_gpu_memory_bytes: self
                    .min_gpu_memory
                    .as_deref()
                    .map(super::lease::parse_size)
                    .transpose()?
                    .unwrap_or(0),
                min_tier: self.tier.unwrap_or_default(),
                region: self.region.unwrap_or_default(),
                tags: self.tags,
                duration_seconds,
                container: self.image.map(|image| pb::ContainerSpec {
                    name: self.name,
                    image,
                    command: self.cmd,
                    env: self.env,
                    memory_bytes,
                    cpus: self.cpus.unwrap_or(0.0),
                    ..Default::default()
                }),
                purpose: self.purpose,
                renter: self.renter,
                scratch_key_to: match self.scratch_key_to {
                    None => Vec::new(),
                    Some(k) => super::lease::x25519_key(&k)
                        .context("--scratch-key-to")?
                        .to_vec(),
                },
            }),
            dry_run: self.dry_run,
            timeout_seconds: self.timeout,
        })
    }
}

/// The private key of a config this command wrote (a WireGuard config's
/// `PrivateKey =`).
pub(super) fn private_key_in(text: &str) -> Option<[u8; 32]> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("PrivateKey"))?
        .trim()
        .strip_prefix('=')?;
    super::lease::x25519_key(line).ok()
}

/// A wg-quick config: this machine's key and mesh address, every member a
/// peer at its announced endpoint.
fn wg_quick_config(
    cluster: &str,
    name: &str,
    private: &[u8; 32],
    r: &warden_proto::pb::ConnectClusterResponse,
) -> String {
    use base64::{engine::general_purpose::STANDARD as B64, Engine};
    let mut out = format!(
        "# {name} on cluster {cluster}'s mesh (warden cluster connect); `wg-quick up FILE`.\n\
         [Interface]\nPrivateKey = {}\nAddress = {}\n",
        B64.encode(private),
        r.address
    );
    for p in &r.peers {
        out.push_str(&format!(
            "\n# node {}\n[Peer]\nPublicKey = {}\n{}AllowedIPs = {}\nPersistentKeepalive = {}\n",
            p.node_id,
            B64.encode(&p.public_key),
            if p.endpoint.is_empty() {
                String::new()
            } else {
                format!("Endpoint = {}\n", p.endpoint)
            },
            p.allowed_ips.join(", "),
            p.keepalive_seconds
        ));
    }
    out
}

/// A plan, for people.
fn print_plan(p: &warden_proto::pb::ClusterPlan) {
    println!(
        "plan: {} node(s), {} GPU(s), region(s) {}, slowest tier {}",
        p.members.len(),
        p.members.iter().map(|m| m.gpu_uuids.len()).sum::<usize>(),
        if p.regions.iter().all(|r| r.is_empty()) {
            "-".to_owned()
        } else {
            p.regions.join(",")
        },
        p.tier
    );
    for m in &p.members {
        println!(
            "  {}  region {:<10} tier {:<10} rtt {:>6.1} ms  gpus {}",
            m.node_id,
            if m.region.is_empty() { "-" } else { &m.region },
            m.tier,
            m.rtt_ms,
            m.gpu_uuids.join(",")
        );
    }
}

/// A cluster as JSON, or for people.
fn show(c: &warden_proto::pb::ClusterInfo, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(c)?);
    } else {
        print_status(c);
    }
    Ok(())
}

/// A cluster with its hire's phase and timings, for people.
fn print_status(c: &warden_proto::pb::ClusterInfo) {
    println!(
        "cluster {}  phase {}  subnet {}",
        c.cluster_id,
        if c.phase.is_empty() { "-" } else { &c.phase },
        c.subnet
    );
    if let Some(t) = &c.timings {
        let ms = |v: u64| {
            if v == 0 {
                "-".to_owned()
            } else {
                format!("{:.2} s", v as f64 / 1000.0)
            }
        };
        println!(
            "  match {}  leases {}  mesh {}  ray {}  ready after {}",
            ms(t.match_ms),
            ms(t.leases_ms),
            ms(t.mesh_ms),
            ms(t.ray_ms),
            ms(t.total_ms)
        );
    }
    if c.ends_unix_ms > 0 {
        let left = (c.ends_unix_ms - warden_agent::now_ms()).max(0) / 1000;
        println!(
            "  ends in {}",
            humantime::format_duration(std::time::Duration::from_secs(left as u64))
        );
    }
    if !c.error.is_empty() {
        println!("  error: {}", c.error);
    }
    if !c.ray_address.is_empty() {
        // What the renter needs: on the mesh (in a member, or a peer of it).
        println!(
            "  ray: head {}  client {}\n  connect with RAY_AUTH_MODE=token RAY_AUTH_TOKEN={}",
            c.ray_address, c.ray_client, c.ray_token
        );
    }
    for r in &c.renter_peers {
        println!("  renter machine {}  {}", r.name, r.address);
    }
    for m in &c.members {
        println!(
            "  {}  {:<16} {:<8} lease {}  gpus {}  {}",
            m.node_id,
            m.address,
            m.state,
            if m.lease_id.is_empty() {
                "-"
            } else {
                &m.lease_id
            },
            m.gpu_uuids.len(),
            m.error
        );
    }
    for e in &c.events {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.time_unix_ms as u64);
        let by = if e.replacement_node_id.is_empty() {
            String::new()
        } else {
            format!(
                " by {} (lease {})",
                e.replacement_node_id, e.replacement_lease_id
            )
        };
        println!(
            "  {} {:<12} {} (lease {}){by}{}{}",
            humantime::format_rfc3339_seconds(when),
            e.kind,
            e.node_id,
            e.lease_id,
            if e.detail.is_empty() { "" } else { ": " },
            e.detail
        );
    }
}

async fn cluster(command: ClusterCommand, socket: Option<PathBuf>) -> Result<()> {
    use warden_proto::pb;
    let mut client = admin_client(socket).await?;
    let print = |c: &pb::ClusterInfo, json: bool| -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(c)?);
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
        ClusterCommand::Hire(args) => {
            let json = args.json;
            let r = client
                .hire_cluster(args.request()?)
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                let out = serde_json::json!({ "plan": r.plan, "cluster": r.cluster });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            if let Some(p) = &r.plan {
                print_plan(p);
            }
            if let Some(c) = &r.cluster {
                print_status(c);
            }
        }
        ClusterCommand::ScratchKeys {
            cluster_id,
            private_key,
        } => {
            let key = super::lease::private_key_file(&private_key)?;
            let c = cluster_named(&mut client, &cluster_id).await?;
            if c.order.is_none() {
                anyhow::bail!("cluster {cluster_id} was not hired: its members hold no leases");
            }
            let leases = leases(&mut client).await?;
            // Every member's line that can be printed is; then the first
            // reason one could not.
            let mut failed = None;
            for m in c.members.iter().filter(|m| !m.lease_id.is_empty()) {
                let opened = leases
                    .iter()
                    .find(|l| l.lease_id == m.lease_id)
                    .with_context(|| format!("no lease {}", m.lease_id))
                    .and_then(|l| super::lease::open_scratch_key(l, &key));
                match opened {
                    Ok(password) => println!("{} {} {password}", m.lease_id, m.node_id),
                    Err(e) => {
                        eprintln!("node {}: {e:#}", m.node_id);
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        ClusterCommand::Status { cluster_id, json } => {
            show(&cluster_named(&mut client, &cluster_id).await?, json)?;
        }
        ClusterCommand::Connect {
            cluster_id,
            name,
            output,
            timeout,
        } => {
            let private = match output.as_deref().map(std::fs::read_to_string) {
                Some(Ok(text)) => private_key_in(&text).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} holds no PrivateKey line; move it away to make a new one",
                        output.as_ref().unwrap().display()
                    )
                })?,
                _ => {
                    use rand::RngCore;
                    let mut k = [0u8; 32];
                    rand::rng().fill_bytes(&mut k);
                    k
                }
            };
            let public = warden_agent::mesh::device::public_of(private);
            let r = client
                .connect_cluster(pb::ConnectClusterRequest {
                    cluster_id: cluster_id.clone(),
                    public_key: public.to_vec(),
                    name: name.clone(),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let text = wg_quick_config(&cluster_id, &name, &private, &r);
            match output {
                Some(path) => {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("writing {}", path.display()))?;
                    f.write_all(text.as_bytes())?;
                    eprintln!(
                        "{}: {} on cluster {cluster_id}'s mesh; bring it up with `wg-quick up {}`",
                        path.display(),
                        r.address,
                        path.display()
                    );
                }
                None => print!("{text}"),
            }
        }
        ClusterCommand::Scale {
            cluster_id,
            gpus,
            nodes,
            timeout,
            json,
        } => {
            let c = client
                .scale_cluster(pb::ScaleClusterRequest {
                    cluster_id,
                    gpus: gpus.unwrap_or(0),
                    nodes: nodes.unwrap_or(0),
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(&c, json)?;
        }
        ClusterCommand::Extend {
            cluster_id,
            hours,
            duration,
            json,
        } => {
            let add_seconds = match (hours, duration) {
                (_, Some(d)) => d.as_secs(),
                (h, None) => u64::from(h.unwrap_or(0)) * 3600,
            };
            let c = client
                .extend_cluster(pb::ExtendClusterRequest {
                    cluster_id,
                    add_seconds,
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(&c, json)?;
        }
        ClusterCommand::End {
            cluster_id,
            grace,
            timeout,
            json,
        } => {
            let c = client
                .end_cluster(pb::EndClusterRequest {
                    cluster_id,
                    grace_seconds: grace,
                    timeout_seconds: timeout,
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(&c, json)?;
        }
        ClusterCommand::Export {
            cluster_id,
            output,
            force,
        } => {
            // Checked before asking: a set mixed with an older export's
            // files would not verify (or worse, hide a lease).
            let occupied = match std::fs::read_dir(&output) {
                Ok(mut entries) => entries.next().is_some(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e).with_context(|| format!("reading {}", output.display())),
            };
            if occupied && !force {
                anyhow::bail!(
                    "{} is not empty; choose an empty directory or pass --force",
                    output.display()
                );
            }
            let r = client
                .export_cluster(pb::ExportClusterRequest {
                    cluster_id: cluster_id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if occupied {
                remove_old_set(&output)?;
            }
            export_files(&output, &r)?;
        }
        ClusterCommand::List { json } => {
            let list = clusters(&mut client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
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

/// Removes an earlier export's files from `dir`: a stale bundle left
/// beside a new record would be an extra lease.
fn remove_old_set(dir: &std::path::Path) -> Result<()> {
    use warden_proto::cluster_record::{is_lease_file, RECORD_FILE};
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == RECORD_FILE || is_lease_file(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Writes an export's files into `dir` and says what was written and which
/// leases have no bundle (the set will not verify without them).
fn export_files(dir: &std::path::Path, r: &warden_proto::pb::ExportClusterResponse) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    println!(
        "{}  the cluster record, signed by the coordinator",
        write(warden_proto::cluster_record::RECORD_FILE, &r.record_json)?.display()
    );
    let mut missing = 0;
    for l in &r.leases {
        if !l.error.is_empty() || l.bundle_json.is_empty() {
            missing += 1;
            println!(
                "  no bundle for lease {} on node {}: {}",
                l.lease_id, l.node_id, l.error
            );
            continue;
        }
        // The id comes from the coordinator, but it names a file here.
        let Some(name) = warden_proto::cluster_record::lease_file_name(&l.lease_id) else {
            anyhow::bail!(
                "the coordinator sent a lease id unfit for a file name: {:?}",
                l.lease_id
            );
        };
        println!(
            "{}  lease {} on node {}",
            write(&name, &l.bundle_json)?.display(),
            l.lease_id,
            l.node_id
        );
    }
    if missing > 0 {
        println!(
            "{missing} lease(s) without a bundle: `warden verify {}` will name them missing",
            dir.display()
        );
    }
    Ok(())
}
