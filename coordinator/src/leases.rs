//! How a lease's record at the coordinator changes: pure functions of the
//! lease, the command that was sent and what the node answered or reported.

use warden_proto::{
    pb,
    states::{ContainerStatus, Judgement, LeaseState, WorkloadEventKind},
};

/// Which command a CommandResult answers (kept with the command id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    LeaseStart,
    LeaseEnd,
    RunContainer,
    StopContainer,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LeaseStart => "lease_start",
            Kind::LeaseEnd => "lease_end",
            Kind::RunContainer => "run_container",
            Kind::StopContainer => "stop_container",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "lease_start" => Kind::LeaseStart,
            "lease_end" => Kind::LeaseEnd,
            "run_container" => Kind::RunContainer,
            "stop_container" => Kind::StopContainer,
            _ => return None,
        })
    }

    pub fn of(cmd: &pb::Command) -> Option<Kind> {
        Some(match cmd.body.as_ref()? {
            pb::command::Body::LeaseStart(_) => Kind::LeaseStart,
            pb::command::Body::LeaseEnd(_) => Kind::LeaseEnd,
            pb::command::Body::RunContainer(_) => Kind::RunContainer,
            pb::command::Body::StopContainer(_) => Kind::StopContainer,
            // Not a lease command: the mesh keeps its own books, and a
            // Ray probe's answer goes only to whoever waits for it.
            pb::command::Body::MeshConfig(_)
            | pb::command::Body::RayProbe(_)
            | pb::command::Body::ContainerLogs(_) => return None,
        })
    }
}

/// Replaces or adds container states by name.
fn merge(into: &mut Vec<pb::ContainerState>, from: &[pb::ContainerState]) {
    for c in from {
        match into.iter_mut().find(|x| x.name == c.name) {
            Some(x) => *x = c.clone(),
            None => into.push(c.clone()),
        }
    }
}

/// Applies the node's answer to a command of `kind`.
pub fn apply_result(info: &mut pb::LeaseInfo, kind: Kind, r: &pb::CommandResult, now_ms: i64) {
    match (kind, r.ok) {
        (Kind::LeaseStart, true) => {
            info.state = LeaseState::Running.into();
            info.started_unix_ms = now_ms;
            // What "all GPUs" meant on the node: the GPUs the chain must report.
            if info.all_gpus && !r.gpu_uuids.is_empty() {
                info.gpu_uuids = r.gpu_uuids.clone();
            }
            info.error.clear();
            // A successful answer's `error` is a note for the renter.
            info.note = r.error.clone();
            info.sealed_scratch_key = r.sealed_scratch_key.clone();
            merge(&mut info.containers, &r.containers);
            settle(info);
        }
        (Kind::LeaseStart, false) => {
            info.state = LeaseState::Failed.into();
            info.error = r.error.clone();
        }
        (Kind::LeaseEnd, true) => {
            info.state = LeaseState::Ended.into();
            info.ended_unix_ms = now_ms;
            info.error.clear();
            merge(&mut info.containers, &r.containers);
        }
        (Kind::RunContainer | Kind::StopContainer, true) => {
            merge(&mut info.containers, &r.containers);
            settle(info);
        }
        (Kind::LeaseEnd, false) => {
            // The node still runs it: ending it can be tried again.
            if info.state == LeaseState::Ending {
                info.state = LeaseState::Running.into();
            }
            info.error = r.error.clone();
        }
        (_, false) => info.error = r.error.clone(),
    }
}

/// Applies a lifecycle event the node reported for one of the lease's containers.
pub fn apply_event(info: &mut pb::LeaseInfo, ev: &pb::WorkloadEvent) {
    // Pull progress belongs to the lease while it starts (no container yet).
    if WorkloadEventKind::parse(&ev.kind) == Some(WorkloadEventKind::Pull) {
        info.progress = ev.detail.clone();
        return;
    }
    let Some(c) = info.containers.iter_mut().find(|c| c.name == ev.name) else {
        return;
    };
    // Events can arrive after the answer to a later command: never go back
    // in time, and a removed container stays removed.
    if ev.time_unix_ms < c.time_unix_ms || c.state == ContainerStatus::Removed {
        return;
    }
    let Some(kind) = WorkloadEventKind::parse(&ev.kind) else {
        return;
    };
    match kind {
        WorkloadEventKind::Started | WorkloadEventKind::Adopted => {
            c.state = ContainerStatus::Running.into()
        }
        WorkloadEventKind::Exited => {
            if c.state != ContainerStatus::OomKilled {
                c.state = ContainerStatus::Exited.into();
            }
            c.exit_code = ev.exit_code;
        }
        WorkloadEventKind::Oom => c.state = ContainerStatus::OomKilled.into(),
        WorkloadEventKind::Health => c.health = ev.detail.clone(),
        WorkloadEventKind::Missing => c.state = ContainerStatus::Missing.into(),
        // Docker's own comings and goings, and the lease's: no container state.
        _ => return,
    }
    if !ev.container_id.is_empty() {
        c.id = ev.container_id.clone();
    }
    c.time_unix_ms = ev.time_unix_ms;
    settle(info);
}

/// A running lease whose containers have all stopped is `stopped`, with
/// how each stopped as its error; a stopped one with a container running
/// again is `running`. Containers removed by a stop command do not count
/// (a lease may hold its GPUs with none).
fn settle(info: &mut pb::LeaseInfo) {
    let state = LeaseState::parse(&info.state);
    if !matches!(state, Some(LeaseState::Running | LeaseState::Stopped)) {
        return;
    }
    let present: Vec<&pb::ContainerState> = info
        .containers
        .iter()
        .filter(|c| c.state != ContainerStatus::Removed)
        .collect();
    if present.is_empty() {
        return;
    }
    if present.iter().any(|c| c.state == ContainerStatus::Running) {
        if state == Some(LeaseState::Stopped) {
            info.state = LeaseState::Running.into();
            info.error.clear();
        }
        return;
    }
    info.state = LeaseState::Stopped.into();
    info.error = present
        .iter()
        .map(|c| how_it_stopped(c))
        .collect::<Vec<_>>()
        .join("; ");
}

/// "container main exited with 127 (its command was not found in the image)".
fn how_it_stopped(c: &pb::ContainerState) -> String {
    let name = &c.name;
    match ContainerStatus::parse(&c.state) {
        Some(ContainerStatus::OomKilled) => {
            format!("container {name} was killed for memory (raise its --memory)")
        }
        Some(ContainerStatus::Missing) => {
            format!("container {name} is gone from the node's Docker")
        }
        _ => {
            let why = match c.exit_code {
                0 => " (it finished)",
                126 => " (its command is not executable)",
                127 => " (its command was not found in the image)",
                137 => " (killed: SIGKILL)",
                143 => " (stopped: SIGTERM)",
                _ => "",
            };
            format!("container {name} exited with {}{why}", c.exit_code)
        }
    }
}

/// Notes the coordinator's verdict on the lease's row.
pub fn apply_verdict(info: &mut pb::LeaseInfo, v: pb::LeaseVerdict) {
    info.verdict = Judgement::of(v.holds).into();
    info.verdict_reasons = v.reasons;
    info.coverage = v.coverage;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_whose_containers_all_stopped_is_stopped_and_says_how() {
        let mut info = pb::LeaseInfo {
            state: LeaseState::Running.into(),
            containers: vec![c("main", "running", 1), c("side", "running", 1)],
            ..Default::default()
        };
        apply_event(&mut info, &ev("main", "exited", 127, 5));
        assert_eq!(info.state, "running", "one still runs");
        apply_event(&mut info, &ev("side", "oom", 137, 6));
        assert_eq!(info.state, "stopped");
        assert!(
            info.error
                .contains("main exited with 127 (its command was not found")
                && info.error.contains("side was killed for memory"),
            "{}",
            info.error
        );
        // A container started in it again: running, the error gone.
        apply_event(&mut info, &ev("main", "started", 0, 7));
        assert_eq!((info.state.as_str(), info.error.as_str()), ("running", ""));
        // Containers removed by a stop command do not make it stopped.
        let mut held = pb::LeaseInfo {
            state: LeaseState::Running.into(),
            containers: vec![c("main", "removed", 1)],
            ..Default::default()
        };
        settle(&mut held);
        assert_eq!(held.state, "running");
        // Ending or ended leases are not touched.
        let mut ending = pb::LeaseInfo {
            state: LeaseState::Ending.into(),
            containers: vec![c("main", "exited", 1)],
            ..Default::default()
        };
        settle(&mut ending);
        assert_eq!(ending.state, "ending");
    }

    fn c(name: &str, state: &str, t: i64) -> pb::ContainerState {
        pb::ContainerState {
            name: name.into(),
            state: state.into(),
            time_unix_ms: t,
            ..Default::default()
        }
    }

    fn ev(name: &str, kind: &str, code: i64, t: i64) -> pb::WorkloadEvent {
        pb::WorkloadEvent {
            name: name.into(),
            kind: kind.into(),
            exit_code: code,
            time_unix_ms: t,
            ..Default::default()
        }
    }

    #[test]
    fn the_nodes_note_on_a_started_lease_is_kept_for_the_renter() {
        let mut info = pb::LeaseInfo {
            state: "starting".into(),
            ..Default::default()
        };
        let note = "no encrypted scratch volume: workload.scratch is off on this node";
        apply_result(
            &mut info,
            Kind::LeaseStart,
            &pb::CommandResult {
                ok: true,
                error: note.into(),
                ..Default::default()
            },
            11,
        );
        assert_eq!(
            (info.state.as_str(), info.note.as_str(), info.error.as_str()),
            ("running", note, "")
        );
    }

    #[test]
    fn a_lease_goes_from_starting_to_running_to_ended() {
        let mut info = pb::LeaseInfo {
            state: "starting".into(),
            ..Default::default()
        };
        let ok = |containers| pb::CommandResult {
            ok: true,
            containers,
            ..Default::default()
        };
        apply_result(
            &mut info,
            Kind::LeaseStart,
            &ok(vec![c("main", "running", 10)]),
            11,
        );
        assert_eq!((info.state.as_str(), info.started_unix_ms), ("running", 11));
        apply_event(&mut info, &ev("main", "exited", 3, 20));
        assert_eq!(
            (
                info.containers[0].state.as_str(),
                info.containers[0].exit_code
            ),
            ("exited", 3)
        );
        apply_result(
            &mut info,
            Kind::LeaseEnd,
            &ok(vec![c("main", "removed", 30)]),
            31,
        );
        assert_eq!((info.state.as_str(), info.ended_unix_ms), ("ended", 31));
        assert_eq!(info.containers[0].state, "removed");
        // A late event does not bring a removed container back.
        apply_event(&mut info, &ev("main", "started", 0, 25));
        assert_eq!(info.containers[0].state, "removed");
    }

    #[test]
    fn failures_keep_the_reason() {
        let mut info = pb::LeaseInfo {
            state: "starting".into(),
            ..Default::default()
        };
        let no = pb::CommandResult {
            ok: false,
            error: "container main: privileged mode is refused".into(),
            ..Default::default()
        };
        apply_result(&mut info, Kind::LeaseStart, &no, 5);
        assert_eq!(info.state, "failed");
        assert!(info.error.contains("privileged"));
        let mut running = pb::LeaseInfo {
            state: "ending".into(),
            ..Default::default()
        };
        apply_result(&mut running, Kind::LeaseEnd, &no, 5);
        assert_eq!(
            running.state, "running",
            "a failed end leaves the lease running"
        );
        assert!(!running.error.is_empty());
    }

    #[test]
    fn an_oom_kill_stays_the_reason_after_the_exit() {
        let mut info = pb::LeaseInfo {
            containers: vec![c("main", "running", 1)],
            ..Default::default()
        };
        apply_event(&mut info, &ev("main", "oom", 0, 2));
        apply_event(&mut info, &ev("main", "exited", 137, 3));
        assert_eq!(info.containers[0].state, "oom-killed");
        assert_eq!(info.containers[0].exit_code, 137);
        apply_event(&mut info, &ev("other", "oom", 0, 4)); // not of this lease: ignored
        assert_eq!(info.containers.len(), 1);
        for k in [
            "lease_start",
            "lease_end",
            "run_container",
            "stop_container",
        ] {
            assert_eq!(Kind::parse(k).unwrap().as_str(), k);
        }
    }
}
