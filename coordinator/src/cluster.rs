//! Clusters and their mesh, as plain data: who is a member, which mesh
//! address each member has, and the `MeshConfig` each member is sent.
//! No I/O here: `mesh` sends what this module computes.

use std::{collections::HashMap, net::Ipv4Addr};

use ipnet::Ipv4Net;

use warden_proto::{pb, states::MemberState};

/// The prefix a new cluster's addresses come from when none is given.
pub const DEFAULT_SUBNET: &str = "10.90.0.0/24";
/// Keepalive the coordinator asks for: keeps NAT mappings open, so a peer
/// behind NAT stays reachable (WireGuard's usual 25 s).
pub const KEEPALIVE_SECONDS: u32 = 25;

/// Why a cluster change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster id `{0}` must be 1 to 64 of [a-z0-9_.-]")]
    BadId(String),
    #[error("subnet `{0}` is not an IPv4 prefix between /8 and /30 (such as 10.90.0.0/24)")]
    BadSubnet(String),
    #[error("node {0} is listed twice")]
    Duplicate(String),
    #[error("node {node} is already in cluster {cluster}; remove it there first")]
    Taken { node: String, cluster: String },
    #[error("subnet {subnet} has room for {room} members, not {wanted}")]
    Full {
        subnet: String,
        room: usize,
        wanted: usize,
    },
    #[error("the subnet of a cluster with members cannot change ({old} → {new}); delete and re-create it")]
    SubnetChange { old: String, new: String },
}

/// A cluster's subnet: an IPv4 prefix of /8 to /30, host bits masked
/// (`10.1.2.3/30` is `10.1.2.0/30`), as `ipnet` holds it.
fn parse_subnet(s: &str) -> Result<Ipv4Net, ClusterError> {
    let bad = || ClusterError::BadSubnet(s.to_owned());
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    Ok(Ipv4Net::new(addr, prefix).map_err(|_| bad())?.trunc())
}

/// How many members fit: its hosts, not the network, not the broadcast
/// (what `Ipv4Net::hosts` gives below /31).
fn room(subnet: &Ipv4Net) -> usize {
    (1usize << (32 - subnet.prefix_len())) - 2
}

/// Whether the cluster holds its members now: one made by hand always
/// does; a hired one until it has ended or failed (its record stays, for
/// `cluster status`, but its nodes are free again).
pub fn is_live(c: &pb::ClusterInfo) -> bool {
    use warden_proto::states::ClusterPhase;
    c.order.is_none()
        || !matches!(
            ClusterPhase::parse(&c.phase),
            Some(ClusterPhase::Ended | ClusterPhase::Failed)
        )
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// The cluster after setting its members to `nodes`: members that stay keep
/// their addresses, new ones get the lowest free address, every member is
/// `pending` for the new generation. Also returns the nodes that left.
/// `others` are the other clusters (a node is in one cluster at a time);
/// `now_ms` seeds the generation so it grows even across a re-created
/// cluster.
pub fn set_members(
    existing: Option<&pb::ClusterInfo>,
    cluster_id: &str,
    subnet: &str,
    nodes: &[String],
    others: &[pb::ClusterInfo],
    now_ms: i64,
) -> Result<(pb::ClusterInfo, Vec<String>), ClusterError> {
    if !valid_id(cluster_id) {
        return Err(ClusterError::BadId(cluster_id.to_owned()));
    }
    let subnet = match (existing, subnet) {
        (Some(c), "") => parse_subnet(&c.subnet)?,
        (None, "") => parse_subnet(DEFAULT_SUBNET)?,
        (_, s) => parse_subnet(s)?,
    };
    if let Some(c) = existing.filter(|c| !c.members.is_empty()) {
        let old = parse_subnet(&c.subnet)?;
        if old != subnet {
            return Err(ClusterError::SubnetChange {
                old: old.to_string(),
                new: subnet.to_string(),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    for n in nodes {
        if !seen.insert(n.as_str()) {
            return Err(ClusterError::Duplicate(n.clone()));
        }
        if let Some(o) = others
            .iter()
            .filter(|o| is_live(o))
            .find(|o| o.cluster_id != cluster_id && o.members.iter().any(|m| &m.node_id == n))
        {
            return Err(ClusterError::Taken {
                node: n.clone(),
                cluster: o.cluster_id.clone(),
            });
        }
    }
    if nodes.len() > room(&subnet) {
        return Err(ClusterError::Full {
            subnet: subnet.to_string(),
            room: room(&subnet),
            wanted: nodes.len(),
        });
    }
    let prev: HashMap<&str, &pb::ClusterMember> = existing
        .map(|c| c.members.iter().map(|m| (m.node_id.as_str(), m)).collect())
        .unwrap_or_default();
    let host = |m: &pb::ClusterMember| m.address.split('/').next().unwrap_or("").to_owned();
    // Members that stay keep theirs; renters' machines keep theirs.
    let taken: std::collections::HashSet<String> = nodes
        .iter()
        .filter_map(|n| prev.get(n.as_str()).map(|m| host(m)))
        .chain(existing.into_iter().flat_map(|c| {
            c.renter_peers
                .iter()
                .map(|r| r.address.split('/').next().unwrap_or("").to_owned())
        }))
        .collect();
    let mut free = subnet.hosts().filter(|a| !taken.contains(&a.to_string()));
    let mut members = Vec::with_capacity(nodes.len());
    for n in nodes {
        let (address, applied_generation) = match prev.get(n.as_str()) {
            Some(m) => (m.address.clone(), m.applied_generation),
            None => {
                // Room was checked above, so a free address exists.
                let a = free.next().ok_or(ClusterError::Full {
                    subnet: subnet.to_string(),
                    room: room(&subnet),
                    wanted: nodes.len(),
                })?;
                (format!("{a}/{}", subnet.prefix_len()), 0)
            }
        };
        members.push(pb::ClusterMember {
            node_id: n.clone(),
            address,
            state: MemberState::Pending.into(),
            error: String::new(),
            applied_generation,
            // A hired cluster's lease and GPUs stay with the member.
            lease_id: prev
                .get(n.as_str())
                .map(|m| m.lease_id.clone())
                .unwrap_or_default(),
            gpu_uuids: prev
                .get(n.as_str())
                .map(|m| m.gpu_uuids.clone())
                .unwrap_or_default(),
        });
    }
    let left = existing
        .map(|c| {
            c.members
                .iter()
                .filter(|m| !nodes.contains(&m.node_id))
                .map(|m| m.node_id.clone())
                .collect()
        })
        .unwrap_or_default();
    let generation = existing
        .map(|c| c.generation + 1)
        .unwrap_or(0)
        .max(now_ms.max(0) as u64);
    Ok((
        pb::ClusterInfo {
            cluster_id: cluster_id.to_owned(),
            subnet: subnet.to_string(),
            generation,
            members,
            created_unix_ms: existing.map(|c| c.created_unix_ms).unwrap_or(now_ms),
            // A hired cluster's order, phase and end stay as they were.
            ..existing.cloned().unwrap_or_default()
        },
        left,
    ))
}

/// Members after the answers to their leave config: `left`, `failed`
/// with the node's words, or still `pending` (it leaves when it next hears
/// from the coordinator).
pub fn note_left(members: &mut [pb::ClusterMember], answered: &HashMap<String, pb::CommandResult>) {
    for m in members {
        match answered.get(&m.node_id) {
            Some(res) if res.ok => {
                m.state = MemberState::Left.into();
                m.error.clear();
            }
            Some(res) => {
                m.state = MemberState::Failed.into();
                m.error = res.error.clone();
            }
            None => {
                m.state = MemberState::Pending.into();
                m.error = "did not answer: its interface goes when it next hears from us".into();
            }
        }
    }
}

/// Renters' machines one cluster takes at most.
pub const MAX_RENTER_PEERS: usize = 8;

/// Why a renter's machine cannot join a cluster's mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("a WireGuard public key is 32 bytes, not {0}")]
    BadKey(usize),
    #[error("cluster {0} has ended or failed")]
    NotLive(String),
    #[error("name {0:?} must be 1 to 32 of [a-z0-9_.-]")]
    BadName(String),
    #[error("the cluster has {MAX_RENTER_PEERS} renter machines already")]
    Full,
    #[error("the subnet has no free address left")]
    NoAddress,
}

/// Adds a renter's machine to the cluster's mesh, at the highest free
/// address (members fill the subnet from the bottom), or gives the same
/// key its address again; the generation moves on, so members apply it.
pub fn add_renter(
    c: &mut pb::ClusterInfo,
    key: &[u8],
    name: &str,
    now_ms: i64,
) -> Result<String, ExportError> {
    if key.len() != 32 {
        return Err(ExportError::BadKey(key.len()));
    }
    if !is_live(c) {
        return Err(ExportError::NotLive(c.cluster_id.clone()));
    }
    if name.is_empty() || name.len() > 32 || !valid_id(name) {
        return Err(ExportError::BadName(name.to_owned()));
    }
    if let Some(r) = c.renter_peers.iter().find(|r| r.public_key == key) {
        return Ok(r.address.clone());
    }
    if c.renter_peers.len() >= MAX_RENTER_PEERS {
        return Err(ExportError::Full);
    }
    let subnet = parse_subnet(&c.subnet).map_err(|_| ExportError::NoAddress)?;
    let host = |a: &str| a.split('/').next().unwrap_or("").to_owned();
    let taken: std::collections::HashSet<String> = c
        .members
        .iter()
        .map(|m| host(&m.address))
        .chain(c.renter_peers.iter().map(|r| host(&r.address)))
        .collect();
    // From the last host address down (not the broadcast address).
    let (first, last) = (
        u32::from(subnet.network()) + 1,
        u32::from(subnet.broadcast()) - 1,
    );
    let free = (first..=last)
        .rev()
        .map(Ipv4Addr::from)
        .find(|a| !taken.contains(&a.to_string()))
        .ok_or(ExportError::NoAddress)?;
    let address = format!("{free}/32");
    c.renter_peers.push(pb::RenterPeer {
        name: name.to_owned(),
        public_key: key.to_vec(),
        address: address.clone(),
    });
    c.generation = (c.generation + 1).max(now_ms.max(0) as u64);
    Ok(address)
}

/// What a node announced at Register: its mesh key and endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshIdentity {
    pub public_key: Vec<u8>,
    pub endpoints: Vec<String>,
}

/// The config one member is sent: its address, and every other member
/// that has announced a mesh key as a peer routed by its /32. A member
/// that has not (never registered) is left out until it does.
pub fn mesh_config(
    cluster: &pb::ClusterInfo,
    node_id: &str,
    identities: &HashMap<String, MeshIdentity>,
) -> Option<pb::MeshConfig> {
    let me = cluster.members.iter().find(|m| m.node_id == node_id)?;
    let peers: Vec<pb::MeshPeer> = cluster
        .members
        .iter()
        .filter(|m| m.node_id != node_id)
        .filter_map(|m| {
            let id = identities.get(&m.node_id)?;
            if id.public_key.len() != 32 {
                return None;
            }
            let host = m.address.split('/').next().unwrap_or_default();
            Some(pb::MeshPeer {
                node_id: m.node_id.clone(),
                public_key: id.public_key.clone(),
                endpoint: id.endpoints.first().cloned().unwrap_or_default(),
                allowed_ips: vec![format!("{host}/32")],
                keepalive_seconds: KEEPALIVE_SECONDS,
            })
        })
        .collect();
    // A hired cluster whose leases run containers meshes the containers.
    let in_lease = cluster
        .order
        .as_ref()
        .is_some_and(|o| o.container.as_ref().is_some_and(|c| !c.image.is_empty()));
    // The renters' machines call in: no endpoint, their keepalive.
    let peers = peers
        .into_iter()
        .chain(cluster.renter_peers.iter().map(|r| pb::MeshPeer {
            node_id: format!("renter:{}", r.name),
            public_key: r.public_key.clone(),
            endpoint: String::new(),
            allowed_ips: vec![r.address.clone()],
            keepalive_seconds: 0,
        }))
        .collect();
    Some(pb::MeshConfig {
        cluster_id: cluster.cluster_id.clone(),
        generation: cluster.generation,
        address: me.address.clone(),
        peers,
        lease_id: if in_lease {
            me.lease_id.clone()
        } else {
            String::new()
        },
    })
}

/// The config that takes a node out of every mesh.
pub fn leave_config(generation: u64) -> pb::MeshConfig {
    pb::MeshConfig {
        generation,
        ..Default::default()
    }
}

/// Records a member's answer to the config of `generation`.
pub fn apply_result(
    cluster: &mut pb::ClusterInfo,
    node_id: &str,
    generation: u64,
    result: &pb::CommandResult,
) {
    let current = cluster.generation;
    let Some(m) = cluster.members.iter_mut().find(|m| m.node_id == node_id) else {
        return;
    };
    if generation < m.applied_generation {
        return;
    }
    if result.ok {
        m.applied_generation = generation;
        if generation == current {
            m.state = MemberState::Applied.into();
            m.error = result.error.clone();
        }
    } else if generation == current {
        m.state = MemberState::Failed.into();
        m.error = result.error.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn addrs(c: &pb::ClusterInfo) -> Vec<(&str, &str)> {
        c.members
            .iter()
            .map(|m| (m.node_id.as_str(), m.address.as_str()))
            .collect()
    }

    #[test]
    fn members_keep_their_addresses_and_new_ones_take_the_lowest_free() {
        let (c, left) = set_members(None, "c1", "", &ids(&["a", "b", "c"]), &[], 1000).unwrap();
        assert!(left.is_empty());
        assert_eq!(c.subnet, "10.90.0.0/24");
        assert_eq!(
            addrs(&c),
            [
                ("a", "10.90.0.1/24"),
                ("b", "10.90.0.2/24"),
                ("c", "10.90.0.3/24")
            ]
        );
        assert_eq!(c.generation, 1000);
        // b leaves, d joins: d takes b's freed address, a and c keep theirs.
        let (c2, left) = set_members(Some(&c), "c1", "", &ids(&["a", "c", "d"]), &[], 5).unwrap();
        assert_eq!(left, ids(&["b"]));
        assert_eq!(
            addrs(&c2),
            [
                ("a", "10.90.0.1/24"),
                ("c", "10.90.0.3/24"),
                ("d", "10.90.0.2/24")
            ]
        );
        assert_eq!(c2.generation, 1001, "grows even when the clock does not");
        assert_eq!(c2.created_unix_ms, 1000);
        assert!(c2.members.iter().all(|m| m.state == "pending"));
    }

    #[test]
    fn bad_requests_are_refused_with_what_was_wrong() {
        let (c, _) = set_members(None, "c1", "10.1.2.3/30", &ids(&["a"]), &[], 1).unwrap();
        assert_eq!(c.subnet, "10.1.2.0/30", "host bits are masked");
        assert_eq!(
            set_members(None, "c2", "10.1.2.0/30", &ids(&["x", "y", "z"]), &[], 1).unwrap_err(),
            ClusterError::Full {
                subnet: "10.1.2.0/30".into(),
                room: 2,
                wanted: 3
            }
        );
        assert_eq!(
            set_members(None, "c2", "", &ids(&["a"]), std::slice::from_ref(&c), 1).unwrap_err(),
            ClusterError::Taken {
                node: "a".into(),
                cluster: "c1".into()
            }
        );
        assert_eq!(
            set_members(None, "c2", "", &ids(&["x", "x"]), &[], 1).unwrap_err(),
            ClusterError::Duplicate("x".into())
        );
        assert!(matches!(
            set_members(Some(&c), "c1", "10.9.0.0/24", &ids(&["a"]), &[], 1),
            Err(ClusterError::SubnetChange { .. })
        ));
        for s in ["10.0.0.0", "10.0.0.0/31", "10.0.0.0/7", "fd00::/64", "x/24"] {
            assert_eq!(
                set_members(None, "c", s, &[], &[], 1).unwrap_err(),
                ClusterError::BadSubnet(s.into())
            );
        }
        for id in ["", "Upper", "a/b", &"x".repeat(65)] {
            assert!(matches!(
                set_members(None, id, "", &[], &[], 1),
                Err(ClusterError::BadId(_))
            ));
        }
    }

    #[test]
    fn each_member_gets_the_others_as_peers_by_their_slash_32() {
        let (c, _) = set_members(None, "c1", "", &ids(&["a", "b", "c"]), &[], 7).unwrap();
        let mut who = HashMap::new();
        who.insert(
            "a".to_string(),
            MeshIdentity {
                public_key: vec![1; 32],
                endpoints: vec!["192.0.2.1:51820".into()],
            },
        );
        who.insert(
            "b".to_string(),
            MeshIdentity {
                public_key: vec![2; 32],
                endpoints: vec![],
            },
        );
        // c never announced a key: left out of the others' peers.
        let a = mesh_config(&c, "a", &who).unwrap();
        assert_eq!(a.address, "10.90.0.1/24");
        assert_eq!(a.generation, 7);
        assert_eq!(a.peers.len(), 1);
        assert_eq!(a.peers[0].node_id, "b");
        assert_eq!(a.peers[0].allowed_ips, ["10.90.0.2/32"]);
        assert_eq!(a.peers[0].endpoint, "");
        let c_cfg = mesh_config(&c, "c", &who).unwrap();
        assert_eq!(c_cfg.peers.len(), 2);
        assert_eq!(c_cfg.peers[0].endpoint, "192.0.2.1:51820");
        assert_eq!(c_cfg.peers[0].keepalive_seconds, KEEPALIVE_SECONDS);
        assert!(mesh_config(&c, "zz", &who).is_none());
        assert_eq!(a.lease_id, "", "a hand-made cluster meshes the hosts");

        // A hired cluster whose leases run containers meshes the containers;
        // one whose leases hold only GPUs meshes the hosts.
        let mut hired = c.clone();
        hired.members[0].lease_id = "l-a".into();
        hired.order = Some(pb::ClusterOrder {
            container: Some(pb::ContainerSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(mesh_config(&hired, "a", &who).unwrap().lease_id, "l-a");
        hired.order = Some(pb::ClusterOrder::default());
        assert_eq!(mesh_config(&hired, "a", &who).unwrap().lease_id, "");
    }

    #[test]
    fn a_renters_machine_takes_the_top_address_and_every_member_gets_it_as_a_peer() {
        let (mut c, _) =
            set_members(None, "c1", "10.90.0.0/29", &ids(&["a", "b"]), &[], 7).unwrap();
        assert_eq!(
            add_renter(&mut c, &[9; 32], "laptop", 8),
            Ok("10.90.0.6/32".into())
        );
        assert_eq!(c.generation, 8);
        assert_eq!(
            add_renter(&mut c, &[9; 32], "laptop", 9),
            Ok("10.90.0.6/32".into()),
            "same key"
        );
        assert_eq!(
            add_renter(&mut c, &[8; 32], "desk", 10),
            Ok("10.90.0.5/32".into())
        );
        assert_eq!(
            add_renter(&mut c, &[7; 31], "x", 11),
            Err(ExportError::BadKey(31))
        );
        assert_eq!(
            add_renter(&mut c, &[7; 32], "No Name", 11),
            Err(ExportError::BadName("No Name".into()))
        );
        let mut who = HashMap::new();
        who.insert(
            "b".to_string(),
            MeshIdentity {
                public_key: vec![2; 32],
                endpoints: vec![],
            },
        );
        let a = mesh_config(&c, "a", &who).unwrap();
        let renters: Vec<_> = a
            .peers
            .iter()
            .filter(|p| p.node_id.starts_with("renter:"))
            .collect();
        assert_eq!(renters.len(), 2);
        assert_eq!(renters[0].allowed_ips, ["10.90.0.6/32"]);
        assert_eq!(renters[0].endpoint, "", "the renter calls in");
        // A member added later does not take a renter's address.
        let (c2, _) =
            set_members(Some(&c), "c1", "", &ids(&["a", "b", "c", "d"]), &[], 12).unwrap();
        let addrs: Vec<&str> = c2.members.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "10.90.0.1/29",
                "10.90.0.2/29",
                "10.90.0.3/29",
                "10.90.0.4/29"
            ]
        );
        assert_eq!(c2.renter_peers.len(), 2, "kept");
        assert!(set_members(
            Some(&c),
            "c1",
            "",
            &ids(&["a", "b", "c", "d", "e"]),
            &[],
            12
        )
        .is_err());
    }

    #[test]
    fn answers_move_members_to_applied_or_failed_for_the_current_generation_only() {
        let (mut c, _) = set_members(None, "c1", "", &ids(&["a"]), &[], 10).unwrap();
        let ok = pb::CommandResult {
            ok: true,
            ..Default::default()
        };
        let bad = pb::CommandResult {
            ok: false,
            error: "no TUN".into(),
            ..Default::default()
        };
        apply_result(&mut c, "a", 9, &ok);
        assert_eq!(c.members[0].state, "pending", "an older generation");
        assert_eq!(c.members[0].applied_generation, 9);
        apply_result(&mut c, "a", 10, &bad);
        assert_eq!(
            (c.members[0].state.as_str(), c.members[0].error.as_str()),
            ("failed", "no TUN")
        );
        apply_result(&mut c, "a", 10, &ok);
        assert_eq!(c.members[0].state, "applied");
        assert_eq!(c.members[0].applied_generation, 10);
        apply_result(&mut c, "a", 8, &bad);
        assert_eq!(
            c.members[0].state, "applied",
            "a stale answer changes nothing"
        );
        apply_result(&mut c, "nobody", 10, &bad);
    }
}
