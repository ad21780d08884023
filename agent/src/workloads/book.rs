//! The node's leases: which are active, which GPUs and containers each
//! holds, and what a lease command may do.
//!
//! Pure data and decisions; the workload task persists it (`book.json` in
//! the state directory, replaced atomically) so a restarted agent knows its
//! leases and adopts their containers. Which commands were acted on is
//! `commands::admission`'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use warden_proto::{pb, states};

/// Where a lease's container is, as this agent observed it: one of the
/// states the protocol names ([`states::ContainerStatus`]: running, exited,
/// oom-killed, removed, missing), or any other word Docker used (created,
/// paused, restarting, removing, dead, or a later Docker's), kept as said.
/// The text is the book's (`book.json`), the status document's and the
/// wire's (`ContainerState.state`, written in [`Container::to_pb`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ObservedStatus {
    /// A state the protocol names.
    Known(states::ContainerStatus),
    /// Docker's word for a state the protocol does not name.
    Docker(String),
}

impl ObservedStatus {
    /// The word on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ObservedStatus::Known(s) => s.as_str(),
            ObservedStatus::Docker(s) => s,
        }
    }

    /// A state as Docker words it (or as the book stored it).
    pub fn from_docker(state: &str) -> ObservedStatus {
        match states::ContainerStatus::parse(state) {
            Some(s) => ObservedStatus::Known(s),
            None => ObservedStatus::Docker(state.to_owned()),
        }
    }
}

impl From<states::ContainerStatus> for ObservedStatus {
    fn from(s: states::ContainerStatus) -> Self {
        ObservedStatus::Known(s)
    }
}

impl PartialEq<states::ContainerStatus> for ObservedStatus {
    fn eq(&self, other: &states::ContainerStatus) -> bool {
        *self == ObservedStatus::Known(*other)
    }
}

impl From<String> for ObservedStatus {
    fn from(s: String) -> Self {
        ObservedStatus::from_docker(&s)
    }
}

impl From<ObservedStatus> for String {
    fn from(s: ObservedStatus) -> String {
        match s {
            ObservedStatus::Known(k) => k.as_str().to_owned(),
            ObservedStatus::Docker(w) => w,
        }
    }
}

impl std::fmt::Display for ObservedStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One container of a lease, as the agent last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Docker's id once created.
    pub id: String,
    pub state: ObservedStatus,
    pub exit_code: i64,
    pub health: String,
    pub time_unix_ms: i64,
}

impl Container {
    pub fn to_pb(&self, lease_id: &str) -> pb::ContainerState {
        pb::ContainerState {
            lease_id: lease_id.to_owned(),
            name: self.name.clone(),
            id: self.id.clone(),
            state: self.state.to_string(),
            exit_code: self.exit_code,
            health: self.health.clone(),
            image: self.image.clone(),
            time_unix_ms: self.time_unix_ms,
        }
    }
}

/// An active lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub renter: String,
    /// GPU uuids, resolved (`all_gpus` becomes the list).
    pub gpus: Vec<String>,
    pub started_unix_ms: i64,
    pub containers: Vec<Container>,
}

impl Lease {
    pub fn container_states(&self) -> Vec<pb::ContainerState> {
        self.containers.iter().map(|c| c.to_pb(&self.id)).collect()
    }
}

/// Everything the agent must remember about leases across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub leases: BTreeMap<String, Lease>,
    /// The leases that got an encrypted scratch volume, and whether it
    /// still lives (`workloads::scratch`). Absent: the lease has none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scratch: BTreeMap<String, crate::workloads::scratch::Volume>,
}

impl Book {
    /// Which lease holds a GPU.
    pub fn gpu_owner(&self, uuid: &str) -> Option<&str> {
        self.leases
            .values()
            .find(|l| l.gpus.iter().any(|g| g == uuid))
            .map(|l| l.id.as_str())
    }

    /// Checks a LeaseStart against the node's GPUs and the active leases;
    /// returns the GPUs the lease gets.
    pub fn plan_start(
        &self,
        ls: &pb::LeaseStart,
        node_gpus: &[String],
    ) -> Result<Vec<String>, String> {
        if !crate::commands::admission::valid_id(&ls.lease_id) {
            return Err(format!("lease id `{}` is not valid", ls.lease_id));
        }
        if self.leases.contains_key(&ls.lease_id) {
            return Err(format!("lease {} is already active", ls.lease_id));
        }
        let gpus: Vec<String> = if ls.all_gpus {
            if !ls.gpu_uuids.is_empty() {
                return Err("give GPU uuids or all GPUs, not both".into());
            }
            node_gpus.to_vec()
        } else {
            ls.gpu_uuids.clone()
        };
        for (i, g) in gpus.iter().enumerate() {
            if !node_gpus.contains(g) {
                return Err(format!(
                    "GPU {g} is not on this node (it has: {})",
                    if node_gpus.is_empty() {
                        "none".to_owned()
                    } else {
                        node_gpus.join(", ")
                    }
                ));
            }
            if gpus[..i].contains(g) {
                return Err(format!("GPU {g} is asked for twice"));
            }
            if let Some(other) = self.gpu_owner(g) {
                return Err(format!("GPU {g} is already leased ({other})"));
            }
        }
        let mut names: Vec<&str> = ls.containers.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("two containers are named {}", w[0]));
        }
        Ok(gpus)
    }

    /// A lease and container a Docker container belongs to, by its labels.
    pub fn find_container(&self, lease_id: &str, name: &str) -> Option<&Container> {
        self.leases
            .get(lease_id)?
            .containers
            .iter()
            .find(|c| c.name == name)
    }

    pub fn container_mut(&mut self, lease_id: &str, name: &str) -> Option<&mut Container> {
        self.leases
            .get_mut(lease_id)?
            .containers
            .iter_mut()
            .find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, gpus: &[&str]) -> Lease {
        Lease {
            id: id.into(),
            renter: String::new(),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            started_unix_ms: 1,
            containers: Vec::new(),
        }
    }

    #[test]
    fn gpus_go_to_one_lease_at_a_time() {
        let mut b = Book::default();
        let node = vec!["GPU-a".to_owned(), "GPU-b".to_owned()];
        let start = |id: &str, gpus: &[&str], all: bool| pb::LeaseStart {
            lease_id: id.into(),
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            all_gpus: all,
            ..Default::default()
        };
        assert_eq!(b.plan_start(&start("l1", &[], true), &node).unwrap(), node);
        assert_eq!(
            b.plan_start(&start("l1", &[], false), &node).unwrap(),
            Vec::<String>::new()
        );
        b.leases.insert("l1".into(), lease("l1", &["GPU-a"]));
        assert!(b
            .plan_start(&start("l1", &[], false), &node)
            .unwrap_err()
            .contains("already active"));
        assert!(b
            .plan_start(&start("l2", &["GPU-a"], false), &node)
            .unwrap_err()
            .contains("already leased (l1)"));
        assert!(b
            .plan_start(&start("l2", &[], true), &node)
            .unwrap_err()
            .contains("already leased"));
        assert_eq!(
            b.plan_start(&start("l2", &["GPU-b"], false), &node)
                .unwrap(),
            ["GPU-b"]
        );
        assert!(b
            .plan_start(&start("l2", &["GPU-z"], false), &node)
            .unwrap_err()
            .contains("not on this node"));
        assert!(b
            .plan_start(&start("l2", &["GPU-b", "GPU-b"], false), &node)
            .unwrap_err()
            .contains("twice"));
        assert!(b
            .plan_start(&start("l2", &["GPU-b"], true), &node)
            .unwrap_err()
            .contains("not both"));
        assert!(b.plan_start(&start("bad id", &[], false), &node).is_err());
        let mut two = start("l3", &[], false);
        two.containers = vec![
            pb::ContainerSpec {
                name: "x".into(),
                ..Default::default()
            },
            pb::ContainerSpec {
                name: "x".into(),
                ..Default::default()
            },
        ];
        assert!(b
            .plan_start(&two, &node)
            .unwrap_err()
            .contains("two containers are named x"));
        assert_eq!(b.gpu_owner("GPU-a"), Some("l1"));
        assert_eq!(b.gpu_owner("GPU-b"), None);
    }

    #[test]
    fn the_book_round_trips_through_json() {
        let mut b = Book::default();
        let mut l = lease("l1", &["GPU-a"]);
        l.containers.push(Container {
            name: "main".into(),
            image: "busybox".into(),
            id: "abc".into(),
            state: states::ContainerStatus::Running.into(),
            exit_code: 0,
            health: String::new(),
            time_unix_ms: 5,
        });
        b.leases.insert("l1".into(), l);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Book>(&json).unwrap(), b);
        assert_eq!(b.find_container("l1", "main").unwrap().id, "abc");
        assert_eq!(b.leases["l1"].container_states()[0].lease_id, "l1");
    }

    #[test]
    fn container_states_keep_their_words() {
        let words = states::ContainerStatus::ALL
            .iter()
            .map(|k| k.as_str())
            .chain(["created", "paused", "restarting", "removing", "dead"]);
        for word in words {
            let k = ObservedStatus::from_docker(word);
            assert_eq!(k.as_str(), word);
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{word}\""));
            assert_eq!(serde_json::from_str::<ObservedStatus>(&json).unwrap(), k);
        }
        assert_eq!(
            ObservedStatus::from_docker("oom-killed"),
            states::ContainerStatus::OomKilled
        );
        assert_eq!(
            ObservedStatus::from(states::ContainerStatus::OomKilled).as_str(),
            "oom-killed"
        );
        // A word Docker may add later, or none, is kept as said.
        for word in ["hibernating", "paused", ""] {
            let other = ObservedStatus::from_docker(word);
            assert_eq!(other, ObservedStatus::Docker(word.into()));
            let json = serde_json::to_string(&other).unwrap();
            assert_eq!(
                serde_json::from_str::<ObservedStatus>(&json).unwrap(),
                other
            );
        }
    }
}
