//! Hiring a cluster, the pure half: an order as the renter wrote it becomes
//! the matcher's [`Order`], what the store knows of nodes and leases
//! becomes the matcher's [`Candidate`]s, and a plan becomes the cluster
//! record that is stored before any lease starts. The admin service runs
//! the steps (leases in parallel, then the mesh) around these.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use prost::Message as _;
use warden_proto::{
    pb,
    states::{ClusterEventKind, ClusterPhase, ClusterPurpose, LeaseState},
};

use crate::{
    matcher::{Candidate, Gpu, Link, Order, Plan, Tier, Want},
    store::NodeStats,
};

/// The shortest hire the seed allows: one hour.
pub const MIN_DURATION: Duration = Duration::from_secs(3600);
/// The longest: a year (a bound, not a product limit).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// How long a member's node may be disconnected before it is replaced: a
/// minute rides out an agent restart or a short network cut.
pub const REPLACE_AFTER: Duration = Duration::from_secs(60);
/// How long a hire waits for ready by default: the seed promises 90 s.
pub const DEFAULT_READY_WAIT: Duration = Duration::from_secs(90);

/// Why an order is refused before matching; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("give a number of GPUs (--gpus) or of nodes (--nodes), not both")]
    GpusAndNodes,
    #[error("give a number of GPUs (--gpus N) or of nodes (--nodes N), at least 1")]
    NoSize,
    #[error("the order asks {0} hours; a hire lasts at least {min} hour(s)", min = .1.as_secs() as f64 / 3600.0)]
    TooShort(String, Duration),
    #[error("the order asks {0} seconds; at most a year")]
    TooLong(u64),
    #[error("unknown tier {0:?}: basic, standard or premium")]
    Tier(String),
    #[error("unknown purpose {0:?}: none or ray")]
    Purpose(String),
    #[error("--purpose ray needs an image with Ray (2.52 or later) in it (--image)")]
    RayNeedsImage,
    #[error("--purpose ray runs Ray as the containers' command: give no command")]
    RayCommand,
    #[error("scratch_key_to (the renter's X25519 public key): {0}")]
    ScratchKey(String),
}

/// The matcher's order for `o`, checked; `min_duration` is the
/// coordinator's (an hour unless a test lowers it).
pub fn order(
    o: &pb::ClusterOrder,
    seed: &str,
    min_duration: Duration,
) -> Result<Order, OrderError> {
    let want = match (o.gpus, o.nodes) {
        (0, 0) => return Err(OrderError::NoSize),
        (g, 0) => Want::Gpus(g),
        (0, n) => Want::Nodes(n),
        _ => return Err(OrderError::GpusAndNodes),
    };
    if o.duration_seconds < min_duration.as_secs() {
        return Err(OrderError::TooShort(
            format!("{:.2}", o.duration_seconds as f64 / 3600.0),
            min_duration,
        ));
    }
    if o.duration_seconds > MAX_DURATION.as_secs() {
        return Err(OrderError::TooLong(o.duration_seconds));
    }
    match ClusterPurpose::parse(if o.purpose.is_empty() {
        "none"
    } else {
        &o.purpose
    }) {
        Some(ClusterPurpose::None) => {}
        Some(ClusterPurpose::Ray) => match &o.container {
            Some(c) if !c.image.is_empty() && c.command.is_empty() => {}
            Some(c) if !c.image.is_empty() => return Err(OrderError::RayCommand),
            _ => return Err(OrderError::RayNeedsImage),
        },
        None => return Err(OrderError::Purpose(o.purpose.clone())),
    }
    if !o.scratch_key_to.is_empty() {
        warden_proto::sealed::key32(&o.scratch_key_to)
            .map_err(|e| OrderError::ScratchKey(e.to_string()))?;
    }
    let min_tier = match o.min_tier.as_str() {
        "" => Tier::Unmeasured,
        t => match Tier::parse(t) {
            Some(t @ (Tier::Basic | Tier::Standard | Tier::Premium)) => t,
            _ => return Err(OrderError::Tier(t.to_owned())),
        },
    };
    Ok(Order {
        want,
        gpu_model: Some(o.gpu_model.clone()).filter(|m| !m.is_empty()),
        min_gpu_memory_bytes: o.min_gpu_memory_bytes,
        min_tier,
        region: Some(o.region.clone()).filter(|r| !r.is_empty()),
        tags: o.tags.iter().cloned().collect(),
        exclude: BTreeSet::new(),
        seed: seed.to_owned(),
    })
}

/// Ray's ports on the head: its GCS, and the client server renters'
/// `ray://` clients dial.
pub const RAY_GCS_PORT: u16 = 6379;
pub const RAY_CLIENT_PORT: u16 = 10001;

/// Whether the order asks for a Ray cluster.
pub fn is_ray(o: &pb::ClusterOrder) -> bool {
    ClusterPurpose::parse(&o.purpose) == Some(ClusterPurpose::Ray)
}

/// A fresh Ray token (256 random bits, hex, as Ray makes its own).
pub fn ray_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

/// A member's container for a Ray cluster: the renter's image and
/// settings, with token authentication on, running the Ray head (the first
/// member) or a Ray node joining it, bound to the member's mesh address.
/// The node waits until its mesh address exists (the mesh comes up after
/// the container starts), and a joining node until the head answers.
pub fn ray_container(
    base: &pb::ContainerSpec,
    head: std::net::Ipv4Addr,
    me: std::net::Ipv4Addr,
    token: &str,
) -> pb::ContainerSpec {
    let wait_addr = format!(
        "until python3 -c 'import socket; socket.socket().bind((\"{me}\", 0))' 2>/dev/null; do sleep 0.2; done"
    );
    let mut flags = vec!["--disable-usage-stats".to_owned(), "--block".to_owned()];
    if base.cpus > 0.0 {
        flags.push(format!("--num-cpus {}", base.cpus.ceil() as u64));
    }
    if base.memory_bytes > 0 {
        // Ray's default takes 30 % of the machine's memory, not the container's.
        flags.push(format!(
            "--object-store-memory {}",
            (base.memory_bytes / 5).max(78 << 20)
        ));
    }
    let start = if head == me {
        format!(
            "exec ray start --head --node-ip-address {me} --port {RAY_GCS_PORT} --ray-client-server-port {RAY_CLIENT_PORT} --include-dashboard=false {}",
            flags.join(" ")
        )
    } else {
        format!(
            "until python3 -c 'import socket; socket.create_connection((\"{head}\", {RAY_GCS_PORT}), 1)' 2>/dev/null; do sleep 0.5; done; \
             exec ray start --address {head}:{RAY_GCS_PORT} --node-ip-address {me} {}",
            flags.join(" ")
        )
    };
    let mut spec = base.clone();
    spec.env.retain(|e| !e.starts_with("RAY_AUTH_"));
    spec.env.push("RAY_AUTH_MODE=token".into());
    spec.env.push(format!("RAY_AUTH_TOKEN={token}"));
    spec.command = vec!["sh".into(), "-c".into(), format!("{wait_addr}; {start}")];
    spec
}

/// A member's mesh host address ("10.90.0.2/24" → 10.90.0.2).
pub fn host_of(m: &pb::ClusterMember) -> Option<std::net::Ipv4Addr> {
    m.address.split('/').next()?.parse().ok()
}

/// The containers of member `m` of hired cluster `c`: none without an
/// image; for Ray, its part (the head is the first member, the token the
/// cluster's); otherwise the order's container.
pub fn member_containers(c: &pb::ClusterInfo, m: &pb::ClusterMember) -> Vec<pb::ContainerSpec> {
    let Some(base) = c
        .order
        .as_ref()
        .and_then(|o| o.container.as_ref())
        .filter(|b| !b.image.is_empty())
    else {
        return Vec::new();
    };
    let head = c.members.first().and_then(host_of);
    match (c.order.as_ref().is_some_and(is_ray), head, host_of(m)) {
        (true, Some(h), Some(me)) => vec![ray_container(base, h, me, &c.ray_token)],
        _ => vec![base.clone()],
    }
}

/// The lease states in which a lease holds its GPUs.
fn holds_gpus(state: &str) -> bool {
    LeaseState::parse(state).is_some_and(LeaseState::is_live)
}

/// What the matcher may choose from: every node the store knows, with the
/// GPUs no live lease holds, its last link probe and its labels.
/// `connected` says which nodes have a stream now.
pub fn candidates(
    nodes: &[NodeStats],
    leases: &[pb::LeaseInfo],
    connected: impl Fn(&str) -> bool,
) -> Vec<Candidate> {
    let mut held: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut whole: HashSet<&str> = HashSet::new();
    for l in leases.iter().filter(|l| holds_gpus(&l.state)) {
        if l.all_gpus {
            whole.insert(&l.node_id);
        }
        held.entry(&l.node_id)
            .or_default()
            .extend(l.gpu_uuids.iter().map(String::as_str));
    }
    nodes
        .iter()
        .map(|n| {
            let inventory =
                pb::InventorySummary::decode(n.inventory.as_slice()).unwrap_or_default();
            let samples: Vec<pb::GpuSample> = n
                .gpus
                .iter()
                .filter_map(|b| pb::GpuSample::decode(b.as_slice()).ok())
                .collect();
            let spool = n
                .spool_state
                .as_deref()
                .and_then(|b| pb::SpoolState::decode(b).ok());
            let taken = held.get(n.node_id.as_str());
            let gpus = inventory
                .gpus
                .iter()
                .map(|g| Gpu {
                    uuid: g.uuid.clone(),
                    model: g.name.clone(),
                    memory_bytes: g.memory_total_bytes,
                    free: !whole.contains(n.node_id.as_str())
                        && !taken.is_some_and(|t| t.contains(g.uuid.as_str())),
                    // The work gate decides, where it is on (Work::restrict).
                    verified: true,
                })
                .collect();
            Candidate {
                node_id: n.node_id.clone(),
                connected: connected(&n.node_id),
                // A node that lost a GPU or whose spool is full (evidence
                // would be refused) is not offered.
                healthy: !samples.iter().any(|s| s.lost) && !spool.is_some_and(|s| s.full),
                gpus,
                link: n
                    .link
                    .as_deref()
                    .and_then(|b| pb::LinkSample::decode(b).ok())
                    .as_ref()
                    .and_then(Link::from_sample),
                region: n.labels.region.clone(),
                tags: n.labels.tags.iter().cloned().collect(),
            }
        })
        .collect()
}

/// A plan as the admin API shows it.
pub fn plan_info(plan: &Plan, nodes: &[Candidate]) -> pb::ClusterPlan {
    let by_id: HashMap<&str, &Candidate> = nodes.iter().map(|c| (c.node_id.as_str(), c)).collect();
    pb::ClusterPlan {
        members: plan
            .members
            .iter()
            .map(|m| {
                let c = by_id.get(m.node_id.as_str());
                pb::PlannedMember {
                    node_id: m.node_id.clone(),
                    gpu_uuids: m.gpus.clone(),
                    region: c.map(|c| c.region.clone()).unwrap_or_default(),
                    tier: Tier::of(c.and_then(|c| c.link.as_ref())).name().into(),
                    rtt_ms: c.and_then(|c| c.link).map_or(0.0, |l| l.rtt_ms),
                }
            })
            .collect(),
        regions: plan.regions.clone(),
        tier: plan.tier.name().into(),
    }
}

/// The cluster record of a hire, before its leases start: the mesh
/// members (addresses from `meshed`, the record `cluster::set_members`
/// made), each with its lease id and GPUs.
pub fn starting(
    mut meshed: pb::ClusterInfo,
    plan: &Plan,
    order: &pb::ClusterOrder,
    lease_ids: &[String],
    now_ms: i64,
) -> pb::ClusterInfo {
    for (m, (planned, lease_id)) in meshed
        .members
        .iter_mut()
        .zip(plan.members.iter().zip(lease_ids))
    {
        debug_assert_eq!(m.node_id, planned.node_id);
        m.lease_id = lease_id.clone();
        m.gpu_uuids = planned.gpus.clone();
    }
    meshed.order = Some(order.clone());
    meshed.phase = ClusterPhase::Starting.into();
    meshed.ends_unix_ms =
        now_ms.saturating_add((order.duration_seconds as i64).saturating_mul(1000));
    meshed.timings = Some(pb::ClusterTimings::default());
    meshed
}

/// Why a cluster's end cannot move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtendError {
    #[error("cluster {0} was made with `cluster set`, not hired: it has no end")]
    NotHired(String),
    #[error("cluster {0} is {1}: only a running cluster is extended")]
    NotRunning(String, String),
    #[error("extend by at least a second")]
    Nothing,
    #[error("a hire lasts at most a year from its start")]
    TooLong,
}

/// The cluster with its end `add_seconds` later, or why not.
pub fn extend(c: &mut pb::ClusterInfo, add_seconds: u64) -> Result<(), ExtendError> {
    if c.order.is_none() {
        return Err(ExtendError::NotHired(c.cluster_id.clone()));
    }
    if !matches!(
        ClusterPhase::parse(&c.phase),
        Some(
            ClusterPhase::Starting
                | ClusterPhase::Meshing
                | ClusterPhase::Ray
                | ClusterPhase::Ready
                | ClusterPhase::Scaling
        )
    ) {
        return Err(ExtendError::NotRunning(
            c.cluster_id.clone(),
            c.phase.clone(),
        ));
    }
    if add_seconds == 0 {
        return Err(ExtendError::Nothing);
    }
    let add_ms =
        i64::try_from(add_seconds.saturating_mul(1000)).map_err(|_| ExtendError::TooLong)?;
    let end = c
        .ends_unix_ms
        .checked_add(add_ms)
        .ok_or(ExtendError::TooLong)?;
    if end - c.created_unix_ms > MAX_DURATION.as_millis() as i64 {
        return Err(ExtendError::TooLong);
    }
    c.ends_unix_ms = end;
    if let Some(o) = c.order.as_mut() {
        o.duration_seconds = o.duration_seconds.saturating_add(add_seconds);
    }
    Ok(())
}

/// The hired clusters whose time is up at `now_ms` and that still run.
pub fn expired(clusters: &[pb::ClusterInfo], now_ms: i64) -> Vec<String> {
    clusters
        .iter()
        .filter(|c| c.order.is_some() && c.ends_unix_ms > 0 && c.ends_unix_ms <= now_ms)
        .filter(|c| {
            matches!(
                ClusterPhase::parse(&c.phase),
                Some(
                    ClusterPhase::Starting
                        | ClusterPhase::Meshing
                        | ClusterPhase::Ray
                        | ClusterPhase::Ready
                        | ClusterPhase::Scaling
                )
            )
        })
        .map(|c| c.cluster_id.clone())
        .collect()
}

/// How a hired cluster is to change size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resize {
    /// New members for this much more.
    Grow(Want),
    /// These members leave (newest first).
    Shrink(Vec<String>),
    Same,
}

/// Why a cluster cannot be scaled as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("cluster {0} was made with `cluster set`, not hired: change it with `cluster set`")]
    NotHired(String),
    #[error("cluster {0} is {1}: only a ready cluster is scaled")]
    NotReady(String, String),
    #[error("the cluster was ordered by {0}: scale it with --{0} N (at least 1)")]
    WrongKind(&'static str),
    #[error("members leave whole, newest first: the cluster can go to {above} or {below} GPU(s), not {wanted}")]
    Uneven { wanted: u32, above: u32, below: u32 },
}

/// How `c` goes from its size to `gpus` GPUs or `nodes` nodes (the kind
/// its order was given in). Members leave newest first, whole; the size
/// asked is at least one, so the first member (a Ray cluster's head) never
/// leaves.
pub fn resize(c: &pb::ClusterInfo, gpus: u32, nodes: u32) -> Result<Resize, ScaleError> {
    let Some(order) = &c.order else {
        return Err(ScaleError::NotHired(c.cluster_id.clone()));
    };
    if ClusterPhase::parse(&c.phase) != Some(ClusterPhase::Ready) {
        return Err(ScaleError::NotReady(c.cluster_id.clone(), c.phase.clone()));
    }
    let by_gpus = order.gpus > 0;
    let (want, held) = match (by_gpus, gpus, nodes) {
        (true, g, 0) if g > 0 => (g, c.members.iter().map(|m| m.gpu_uuids.len() as u32).sum()),
        (false, 0, n) if n > 0 => (n, c.members.len() as u32),
        (true, _, _) => return Err(ScaleError::WrongKind("gpus")),
        (false, _, _) => return Err(ScaleError::WrongKind("nodes")),
    };
    if want > held {
        return Ok(Resize::Grow(if by_gpus {
            Want::Gpus(want - held)
        } else {
            Want::Nodes(want - held)
        }));
    }
    if want == held {
        return Ok(Resize::Same);
    }
    let mut left = held;
    let mut leaving = Vec::new();
    for m in c.members.iter().rev() {
        let size = if by_gpus { m.gpu_uuids.len() as u32 } else { 1 };
        if left - size < want {
            return Err(ScaleError::Uneven {
                wanted: want,
                above: left,
                below: left - size,
            });
        }
        left -= size;
        leaving.push(m.node_id.clone());
        if left == want {
            return Ok(Resize::Shrink(leaving));
        }
    }
    // Members hold no GPUs at all: nothing to remove reaches `want`.
    Err(ScaleError::Uneven {
        wanted: want,
        above: left,
        below: left,
    })
}

/// What a replacement must bring: as many GPUs as the lost member held,
/// or one node.
pub fn replacement(c: &pb::ClusterInfo, lost: &pb::ClusterMember) -> Want {
    match &c.order {
        Some(o) if o.gpus > 0 => Want::Gpus(lost.gpu_uuids.len().max(1) as u32),
        _ => Want::Nodes(1),
    }
}

/// The members of a ready cluster that are lost at `now_ms`, each with
/// why: its lease failed or ended under it, or its node has not been
/// connected for `after_ms` (`seen`: a node's last contact, ms; `None`
/// while it is connected).
pub fn lost(
    c: &pb::ClusterInfo,
    leases: &[pb::LeaseInfo],
    seen: impl Fn(&str) -> Option<i64>,
    now_ms: i64,
    after_ms: i64,
) -> Vec<(pb::ClusterMember, String)> {
    if c.order.is_none() || ClusterPhase::parse(&c.phase) != Some(ClusterPhase::Ready) {
        return Vec::new();
    }
    let reported = |m: &pb::ClusterMember| {
        c.events.iter().any(|e| {
            e.lease_id == m.lease_id
                && ClusterEventKind::parse(&e.kind) == Some(ClusterEventKind::Lost)
        })
    };
    c.members
        .iter()
        .filter(|m| !reported(m))
        .filter_map(|m| {
            let lease = leases.iter().find(|l| l.lease_id == m.lease_id);
            let why = match lease.map(|l| LeaseState::parse(&l.state)) {
                Some(Some(LeaseState::Failed)) => Some(format!(
                    "its lease {} failed: {}",
                    m.lease_id,
                    lease.map_or("", |l| l.error.as_str())
                )),
                Some(Some(LeaseState::Ended)) => {
                    Some(format!("its lease {} was ended", m.lease_id))
                }
                Some(Some(LeaseState::Stopped)) => Some(format!(
                    "its lease {} stopped: {}",
                    m.lease_id,
                    lease.map_or("", |l| l.error.as_str())
                )),
                _ => None,
            }
            .or_else(|| {
                let last = seen(&m.node_id)?;
                (now_ms - last >= after_ms).then(|| {
                    format!(
                        "node {} has not been connected for {} s",
                        m.node_id,
                        (now_ms - last) / 1000
                    )
                })
            })?;
            Some((m.clone(), why))
        })
        .collect()
}

/// A member event, at `now_ms`.
pub fn event(
    kind: ClusterEventKind,
    m: &pb::ClusterMember,
    detail: String,
    now_ms: i64,
) -> pb::ClusterEvent {
    pb::ClusterEvent {
        time_unix_ms: now_ms,
        kind: kind.into(),
        node_id: m.node_id.clone(),
        lease_id: m.lease_id.clone(),
        detail,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher;

    fn spec() -> pb::ContainerSpec {
        pb::ContainerSpec {
            name: "main".into(),
            image: "busybox".into(),
            ..Default::default()
        }
    }

    fn an_order() -> pb::ClusterOrder {
        pb::ClusterOrder {
            gpus: 2,
            duration_seconds: 3600,
            container: Some(spec()),
            ..Default::default()
        }
    }

    #[test]
    fn an_order_is_checked_field_by_field() {
        let o = order(&an_order(), "c", MIN_DURATION).unwrap();
        assert_eq!(o.want, Want::Gpus(2));
        assert_eq!(o.min_tier, Tier::Unmeasured);
        let bad = |f: &dyn Fn(&mut pb::ClusterOrder)| {
            let mut o = an_order();
            f(&mut o);
            order(&o, "c", MIN_DURATION).unwrap_err()
        };
        assert_eq!(bad(&|o| o.nodes = 1), OrderError::GpusAndNodes);
        assert_eq!(bad(&|o| o.gpus = 0), OrderError::NoSize);
        assert!(matches!(
            bad(&|o| o.duration_seconds = 3599),
            OrderError::TooShort(..)
        ));
        assert_eq!(
            bad(&|o| o.duration_seconds = u64::MAX),
            OrderError::TooLong(u64::MAX)
        );
        // No container: the leases hold the GPUs; containers come later
        // (`warden lease run`).
        let mut bare = an_order();
        bare.container = None;
        assert!(order(&bare, "c", MIN_DURATION).is_ok());
        assert_eq!(
            bad(&|o| o.min_tier = "gold".into()),
            OrderError::Tier("gold".into())
        );
        assert_eq!(
            bad(&|o| o.min_tier = "below".into()),
            OrderError::Tier("below".into())
        );
        assert_eq!(
            bad(&|o| o.purpose = "mpi".into()),
            OrderError::Purpose("mpi".into())
        );
        assert_eq!(
            bad(&|o| {
                o.purpose = "ray".into();
                o.container.as_mut().unwrap().command = vec!["python3".into()];
            }),
            OrderError::RayCommand
        );
        let mut ray = an_order();
        ray.purpose = "ray".into();
        assert!(order(&ray, "c", MIN_DURATION).is_ok());
        assert_eq!(
            bad(&|o| {
                o.purpose = "ray".into();
                o.container = None;
            }),
            OrderError::RayNeedsImage
        );
        assert_eq!(
            bad(&|o| o.scratch_key_to = vec![7; 31]),
            OrderError::ScratchKey("an X25519 key is 32 bytes, not 31".into())
        );
        let mut sealed = an_order();
        sealed.scratch_key_to = vec![7; 32];
        assert!(order(&sealed, "c", MIN_DURATION).is_ok());
        // A test coordinator may allow shorter hires.
        let mut short = an_order();
        short.duration_seconds = 5;
        assert!(order(&short, "c", Duration::from_secs(1)).is_ok());
        let mut n = an_order();
        (n.gpus, n.nodes, n.min_tier, n.region) = (0, 3, "premium".into(), "eu".into());
        let o = order(&n, "c", MIN_DURATION).unwrap();
        assert_eq!((o.want, o.min_tier), (Want::Nodes(3), Tier::Premium));
        assert_eq!(o.region.as_deref(), Some("eu"));
    }

    #[test]
    fn ray_members_get_the_token_and_start_where_the_mesh_puts_them() {
        let base = pb::ContainerSpec {
            env: vec!["A=1".into(), "RAY_AUTH_TOKEN=renter-chosen".into()],
            cpus: 1.5,
            memory_bytes: 3 << 30,
            ..spec()
        };
        let (head, other) = ("10.90.0.1".parse().unwrap(), "10.90.0.2".parse().unwrap());
        let h = ray_container(&base, head, head, "tok");
        let w = ray_container(&base, head, other, "tok");
        for c in [&h, &w] {
            assert_eq!(c.env, ["A=1", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=tok"]);
            assert_eq!(c.command[..2], ["sh", "-c"]);
            assert!(c.command[2].contains("--num-cpus 2"), "{}", c.command[2]);
            assert!(c.command[2].contains("--block"));
        }
        let (hs, ws) = (&h.command[2], &w.command[2]);
        assert!(
            hs.contains("bind((\"10.90.0.1\", 0))")
                && hs.contains("--head --node-ip-address 10.90.0.1"),
            "{hs}"
        );
        assert!(ws.contains("bind((\"10.90.0.2\", 0))"), "{ws}");
        assert!(
            ws.contains("create_connection((\"10.90.0.1\", 6379)"),
            "{ws}"
        );
        assert!(
            ws.contains("--address 10.90.0.1:6379 --node-ip-address 10.90.0.2"),
            "{ws}"
        );
        assert_eq!(ray_token().len(), 64);
        assert_ne!(ray_token(), ray_token());
    }

    fn stats(id: &str, gpus: &[&str], link: Option<(f64, &str)>) -> NodeStats {
        NodeStats {
            node_id: id.into(),
            public_key: vec![],
            agent_version: String::new(),
            hostname: String::new(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            peer_address: String::new(),
            records: 0,
            last_seq: 0,
            spool_state: None,
            inventory: pb::InventorySummary {
                gpus: gpus
                    .iter()
                    .map(|u| pb::GpuInfo {
                        uuid: (*u).into(),
                        name: "NVIDIA H100".into(),
                        memory_total_bytes: 80 << 30,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
            .encode_to_vec(),
            gpus: vec![],
            link: link.map(|(mbps, error)| {
                pb::LinkSample {
                    download_mbps: mbps,
                    upload_mbps: mbps,
                    rtt_ms: 4.0,
                    error: error.into(),
                    ..Default::default()
                }
                .encode_to_vec()
            }),
            mesh_public_key: vec![],
            mesh_endpoints: vec![],
            missing: vec![],
            labels: pb::NodeLabels {
                region: "eu".into(),
                tags: vec!["soc2".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn gpus_in_live_leases_are_not_free_and_ended_leases_free_them() {
        let nodes = [
            stats("a", &["a0", "a1"], Some((1000.0, ""))),
            stats("b", &["b0"], Some((1000.0, "timed out"))),
            stats("c", &["c0"], None),
        ];
        let lease = |node: &str, gpus: &[&str], all, state: LeaseState| pb::LeaseInfo {
            node_id: node.into(),
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            all_gpus: all,
            state: state.into(),
            ..Default::default()
        };
        let leases = [
            lease("a", &["a0"], false, LeaseState::Running),
            lease("a", &["a1"], false, LeaseState::Ended),
            lease("b", &[], true, LeaseState::Starting),
            lease("c", &["c0"], false, LeaseState::Failed),
        ];
        let c = candidates(&nodes, &leases, |n| n != "c");
        let free = |i: usize| -> Vec<bool> { c[i].gpus.iter().map(|g| g.free).collect() };
        assert_eq!(free(0), [false, true]);
        assert_eq!(free(1), [false]);
        assert_eq!(free(2), [true]);
        assert_eq!((c[0].connected, c[2].connected), (true, false));
        assert!(c[0].link.is_some());
        assert!(c[1].link.is_none(), "a failed probe measured nothing");
        assert_eq!(c[0].region, "eu");
        assert!(c[0].tags.contains("soc2"));
        assert!(c.iter().all(|c| c.healthy));
    }

    #[test]
    fn a_node_with_a_lost_gpu_or_a_full_spool_is_not_healthy() {
        let mut lost = stats("a", &["a0"], None);
        lost.gpus = vec![pb::GpuSample {
            uuid: "a0".into(),
            lost: true,
            ..Default::default()
        }
        .encode_to_vec()];
        let mut full = stats("b", &["b0"], None);
        full.spool_state = Some(
            pb::SpoolState {
                full: true,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let c = candidates(&[lost, full, stats("c", &["c0"], None)], &[], |_| true);
        assert_eq!(
            c.iter().map(|c| c.healthy).collect::<Vec<_>>(),
            [false, false, true]
        );
    }

    #[test]
    fn the_starting_record_carries_leases_gpus_order_and_end() {
        let nodes = [
            stats("a", &["a0", "a1"], Some((1000.0, ""))),
            stats("b", &["b0", "b1"], Some((1000.0, ""))),
        ];
        let c = candidates(&nodes, &[], |_| true);
        let mut o = an_order();
        o.gpus = 4;
        let plan = matcher::plan(&c, &order(&o, "c1", MIN_DURATION).unwrap()).unwrap();
        let ids: Vec<String> = plan.members.iter().map(|m| m.node_id.clone()).collect();
        let (meshed, _) = crate::cluster::set_members(None, "c1", "", &ids, &[], 1_000).unwrap();
        let leases: Vec<String> = ids.iter().map(|n| format!("l-{n}")).collect();
        let info = starting(meshed, &plan, &o, &leases, 1_000);
        assert_eq!(info.phase, ClusterPhase::Starting);
        assert_eq!(info.ends_unix_ms, 1_000 + 3_600_000);
        for m in &info.members {
            assert_eq!(m.lease_id, format!("l-{}", m.node_id));
            assert_eq!(m.gpu_uuids.len(), 2);
            assert!(m.gpu_uuids.iter().all(|g| g.starts_with(&m.node_id)));
        }
        let shown = plan_info(&plan, &c);
        assert_eq!(shown.tier, "premium");
        assert_eq!(shown.members.len(), 2);
        assert_eq!(
            expired(std::slice::from_ref(&info), 3_600_999),
            Vec::<String>::new()
        );
        assert_eq!(expired(std::slice::from_ref(&info), 3_601_000), ["c1"]);
        let ended = pb::ClusterInfo {
            phase: ClusterPhase::Ended.into(),
            ..info
        };
        assert!(expired(std::slice::from_ref(&ended), 9_999_999_999).is_empty());
        assert!(matches!(
            extend(&mut ended.clone(), 60),
            Err(ExtendError::NotRunning(..))
        ));
        let mut running = pb::ClusterInfo {
            phase: ClusterPhase::Ready.into(),
            ..ended
        };
        extend(&mut running, 60).unwrap();
        assert_eq!(running.ends_unix_ms, 1_000 + 3_600_000 + 60_000);
        assert_eq!(running.order.as_ref().unwrap().duration_seconds, 3660);
        assert!(
            expired(std::slice::from_ref(&running), 3_601_000).is_empty(),
            "later now"
        );
        assert_eq!(extend(&mut running, 0), Err(ExtendError::Nothing));
        assert_eq!(
            extend(&mut running, 400 * 24 * 3600),
            Err(ExtendError::TooLong)
        );
        let mut by_hand = pb::ClusterInfo::default();
        assert!(matches!(
            extend(&mut by_hand, 60),
            Err(ExtendError::NotHired(_))
        ));
    }

    /// A ready hired cluster of members with these many GPUs each.
    fn ready(sizes: &[usize], ray: bool) -> pb::ClusterInfo {
        let mut o = an_order();
        o.gpus = sizes.iter().sum::<usize>() as u32;
        if ray {
            o.purpose = "ray".into();
        }
        pb::ClusterInfo {
            cluster_id: "c".into(),
            order: Some(o),
            phase: ClusterPhase::Ready.into(),
            ray_token: "t".into(),
            members: sizes
                .iter()
                .enumerate()
                .map(|(i, n)| pb::ClusterMember {
                    node_id: format!("n{i}"),
                    address: format!("10.90.0.{}/24", i + 1),
                    lease_id: format!("l{i}"),
                    gpu_uuids: (0..*n).map(|g| format!("GPU-{i}-{g}")).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_cluster_grows_by_what_is_missing_and_shrinks_newest_first() {
        let c = ready(&[2, 1, 2], false);
        assert_eq!(resize(&c, 7, 0), Ok(Resize::Grow(Want::Gpus(2))));
        assert_eq!(resize(&c, 5, 0), Ok(Resize::Same));
        assert_eq!(resize(&c, 3, 0), Ok(Resize::Shrink(vec!["n2".into()])));
        assert_eq!(
            resize(&c, 2, 0),
            Ok(Resize::Shrink(vec!["n2".into(), "n1".into()]))
        );
        // Members leave whole: 4 is not reachable from 2+1+2.
        assert_eq!(
            resize(&c, 4, 0),
            Err(ScaleError::Uneven {
                wanted: 4,
                above: 5,
                below: 3
            })
        );
        // The order's kind only, and a size of at least one.
        assert_eq!(resize(&c, 0, 2), Err(ScaleError::WrongKind("gpus")));
        assert_eq!(resize(&c, 0, 0), Err(ScaleError::WrongKind("gpus")));
        let mut by_nodes = c.clone();
        by_nodes.order.as_mut().unwrap().gpus = 0;
        by_nodes.order.as_mut().unwrap().nodes = 3;
        assert_eq!(resize(&by_nodes, 0, 4), Ok(Resize::Grow(Want::Nodes(1))));
        assert_eq!(
            resize(&by_nodes, 0, 1),
            Ok(Resize::Shrink(vec!["n2".into(), "n1".into()]))
        );
        // Only a ready hired cluster.
        let mut busy = c.clone();
        busy.phase = ClusterPhase::Scaling.into();
        assert!(matches!(resize(&busy, 7, 0), Err(ScaleError::NotReady(..))));
        let mut set = c;
        set.order = None;
        assert!(matches!(resize(&set, 7, 0), Err(ScaleError::NotHired(_))));
    }

    #[test]
    fn a_ray_cluster_never_loses_its_head_to_a_scale() {
        let c = ready(&[1, 1], true);
        assert_eq!(resize(&c, 1, 0), Ok(Resize::Shrink(vec!["n1".into()])));
        // The head holds two GPUs: going to one would take it away.
        let mut one = ready(&[2], true);
        one.members.truncate(1);
        assert_eq!(
            resize(&one, 1, 0),
            Err(ScaleError::Uneven {
                wanted: 1,
                above: 2,
                below: 0
            })
        );
    }

    #[test]
    fn members_are_lost_by_a_failed_lease_at_once_or_a_long_absence() {
        let c = ready(&[1, 1, 1], false);
        let lease = |id: &str, state: LeaseState| pb::LeaseInfo {
            lease_id: id.into(),
            state: state.into(),
            error: "exit 127".into(),
            ..Default::default()
        };
        let leases = [
            lease("l0", LeaseState::Running),
            lease("l1", LeaseState::Failed),
            lease("l2", LeaseState::Running),
        ];
        // n2 has been away 30 s of the 60 allowed; n0 is connected.
        let seen = |n: &str| (n == "n2").then_some(70_000);
        let lost_now = lost(&c, &leases, seen, 100_000, 60_000);
        assert_eq!(lost_now.len(), 1);
        assert_eq!(lost_now[0].0.node_id, "n1");
        assert!(
            lost_now[0].1.contains("failed: exit 127"),
            "{}",
            lost_now[0].1
        );
        // Later, n2's absence counts too.
        let later = lost(&c, &leases, seen, 130_000, 60_000);
        assert_eq!(
            later
                .iter()
                .map(|(m, _)| m.node_id.as_str())
                .collect::<Vec<_>>(),
            ["n1", "n2"]
        );
        assert!(
            later[1].1.contains("not been connected for 60 s"),
            "{}",
            later[1].1
        );
        // A member already reported lost is not reported again.
        let mut reported = c.clone();
        reported.events.push(event(
            ClusterEventKind::Lost,
            &c.members[1],
            String::new(),
            1,
        ));
        let again = lost(&reported, &leases, seen, 100_000, 60_000);
        assert!(again.is_empty(), "{again:?}");
        // Nothing is lost while the cluster changes or is not ready.
        let mut scaling = c;
        scaling.phase = ClusterPhase::Scaling.into();
        assert!(lost(&scaling, &leases, seen, 130_000, 60_000).is_empty());
    }

    #[test]
    fn a_replacement_brings_what_the_lost_member_held() {
        let c = ready(&[2, 1], false);
        assert_eq!(replacement(&c, &c.members[0]), Want::Gpus(2));
        let mut by_nodes = c.clone();
        by_nodes.order.as_mut().unwrap().gpus = 0;
        by_nodes.order.as_mut().unwrap().nodes = 2;
        assert_eq!(replacement(&by_nodes, &c.members[0]), Want::Nodes(1));
    }

    #[test]
    fn a_new_members_container_joins_the_existing_head() {
        let c = ready(&[1, 1, 1], true);
        let added = &c.members[2];
        let joining = &member_containers(&c, added)[0];
        let script = joining.command.join(" ");
        assert!(script.contains("--address 10.90.0.1:6379"), "{script}");
        assert!(script.contains("--node-ip-address 10.90.0.3"), "{script}");
        assert!(joining.env.contains(&"RAY_AUTH_TOKEN=t".to_owned()));
        let mut plain = ready(&[1], false);
        assert_eq!(
            member_containers(&plain, &plain.members[0].clone()),
            vec![spec()]
        );
        plain.order.as_mut().unwrap().container = None;
        assert!(member_containers(&plain, &plain.members[0].clone()).is_empty());
    }
}
