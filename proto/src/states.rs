//! States and kinds that travel as text (`LeaseInfo.state`,
//! `ContainerState.state`, `WorkloadEvent.kind`, ...): one enum per field,
//! whose `as_str` is exactly the wire text, so code names a state the
//! compiler checks while the messages stay as they are. `parse` gives
//! `None` for text this version does not know (a newer peer's).

macro_rules! wire_text {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// The value `s` names, if this version knows it.
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $( $text => Some($name::$variant), )+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_owned()
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }
    };
}

wire_text! {
    /// Where a lease stands at the coordinator (`LeaseInfo.state`).
    pub enum LeaseState {
        /// LeaseStart sent, no answer yet.
        Starting => "starting",
        /// Its containers run (or it holds its GPUs with none yet).
        Running => "running",
        /// Every container of it has stopped (exited, killed for memory, or
        /// gone from Docker): `error` says how each did. It still holds its
        /// GPUs until it is ended; a container started in it makes it
        /// running again.
        Stopped => "stopped",
        /// The node refused or failed to start it.
        Failed => "failed",
        /// LeaseEnd sent, no answer yet.
        Ending => "ending",
        Ended => "ended",
    }
}

impl LeaseState {
    /// Whether the lease is live on its node: it holds its GPUs, takes
    /// container commands and is challenged.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            LeaseState::Starting | LeaseState::Running | LeaseState::Stopped | LeaseState::Ending
        )
    }
}

wire_text! {
    /// The coordinator's verdict on a lease's chain (`LeaseInfo.verdict`;
    /// empty while the lease runs).
    pub enum Judgement {
        Holds => "holds",
        Fails => "fails",
    }
}

impl Judgement {
    /// `Holds` when `holds`.
    pub fn of(holds: bool) -> Self {
        if holds {
            Judgement::Holds
        } else {
            Judgement::Fails
        }
    }
}

wire_text! {
    /// A cluster member's state (`ClusterMember.state`).
    pub enum MemberState {
        /// Sent, or to be sent when the node connects.
        Pending => "pending",
        /// The node applied this generation.
        Applied => "applied",
        Failed => "failed",
        /// No longer a member.
        Left => "left",
    }
}

wire_text! {
    /// A lease container's state (`ContainerState.state`).
    pub enum ContainerStatus {
        Running => "running",
        Exited => "exited",
        /// Killed for memory; stays the reason after the exit that follows.
        OomKilled => "oom-killed",
        Removed => "removed",
        /// Gone from Docker without the agent removing it.
        Missing => "missing",
    }
}

wire_text! {
    /// A hired cluster's phase (`ClusterInfo.phase`).
    pub enum ClusterPhase {
        /// Leases being started on the chosen nodes.
        Starting => "starting",
        /// Leases running; members applying the mesh.
        Meshing => "meshing",
        /// A Ray cluster's nodes joining its head.
        Ray => "ray",
        /// Every lease running and every member on the mesh.
        Ready => "ready",
        /// A ready cluster changing size (`cluster scale`) or replacing a
        /// lost member; its other members keep running.
        Scaling => "scaling",
        /// A step failed; what started was ended.
        Failed => "failed",
        /// Its leases being ended.
        Ending => "ending",
        Ended => "ended",
    }
}

wire_text! {
    /// What changed a hired cluster's members (`ClusterEvent.kind`).
    pub enum ClusterEventKind {
        ScaledUp => "scaled-up",
        ScaledDown => "scaled-down",
        /// A member's node left or its lease failed.
        Lost => "lost",
        /// A lost member's replacement runs.
        Replaced => "replaced",
        /// No replacement could be found or started.
        NotReplaced => "not-replaced",
    }
}

wire_text! {
    /// What a hired cluster is for (`ClusterOrder.purpose`).
    pub enum ClusterPurpose {
        /// The containers as the order gives them.
        None => "none",
        /// A Ray cluster: a head on the first member, the others join it.
        Ray => "ray",
    }
}

wire_text! {
    /// What happened to a lease's container, or to Docker (`WorkloadEvent.kind`).
    pub enum WorkloadEventKind {
        Started => "started",
        Exited => "exited",
        Oom => "oom",
        Health => "health",
        Pull => "pull",
        Adopted => "adopted",
        Missing => "missing",
        RemovedStale => "removed-stale",
        DockerDown => "docker-down",
        DockerUp => "docker-up",
        Stopped => "stopped",
        LeaseStarted => "lease-started",
        LeaseEnded => "lease-ended",
        /// A lease's encrypted scratch volume found dead (its gocryptfs
        /// ended, with the key): destroyed; its containers lose `/scratch`.
        ScratchLost => "scratch-lost",
        /// The scratch volume of no active lease, destroyed.
        ScratchRemoved => "scratch-removed",
    }
}

wire_text! {
    /// How the agent classed a GPU holder (`GpuHolder.verdict`).
    pub enum HolderClass {
        LeaseContainer => "lease-container",
        Agent => "agent",
        Allowlisted => "allowlisted",
        Foreign => "foreign",
    }
}

wire_text! {
    /// How a window's opens of the leased GPUs were guarded (`Attestation.guard`).
    pub enum GuardMode {
        /// Under fanotify permission marks: a foreign open is denied.
        Open => "open",
        /// Found by scanning /proc and ended.
        Scan => "scan",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_text_round_trips_and_unknown_text_is_none() {
        for s in LeaseState::ALL {
            assert_eq!(LeaseState::parse(s.as_str()), Some(*s));
        }
        for s in WorkloadEventKind::ALL {
            assert_eq!(WorkloadEventKind::parse(&s.to_string()), Some(*s));
        }
        assert_eq!(ContainerStatus::OomKilled.as_str(), "oom-killed");
        assert_eq!(LeaseState::parse("Running"), None);
        let on_the_wire: String = "ended".into();
        assert!(on_the_wire == LeaseState::Ended);
        assert_eq!(Judgement::of(false).as_str(), "fails");
        let holders: Vec<_> = HolderClass::ALL.iter().map(|h| h.as_str()).collect();
        assert_eq!(holders, crate::chain::HOLDER_VERDICTS);
        let guards: Vec<_> = GuardMode::ALL.iter().map(|g| g.as_str()).collect();
        assert_eq!(guards, crate::chain::GUARD_MODES);
    }
}
