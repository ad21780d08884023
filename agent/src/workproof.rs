//! The work challenge on the node (docs/attestation.md#work-challenge):
//! each verified `WorkChallenge` runs the operator's solver image in a
//! confined container on the named GPU; its answer, with the GPU's NVML
//! identity and confidential-computing report, goes back once on the live
//! stream (never spooled: a late answer is worthless).

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::{
    pb,
    workproof::contract::{Input, Output, MAX_OUTPUT},
};

use crate::{
    host::gpu::{GpuError, GpuSource},
    workloads::{
        book::Lease,
        confine::WorkloadConfig,
        docker::{ContainerCreateBody, Docker, HostConfig},
    },
};

/// `[work_challenge]` in agent.toml.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkConfig {
    /// The solver image, already on the node (pulled or loaded by the
    /// operator: a pull would eat the deadline). Empty: every challenge is
    /// answered with an error, and the node's GPUs stay out of matching.
    pub image: String,
}

/// Label on the solver's containers (not `warden.managed`: they are no lease's).
pub const LABEL: &str = "warden.work-challenge";

/// The confined one-shot container for a challenge: only the challenged
/// GPU, no network, no capabilities, no new privileges, read-only root.
pub fn container_config(input: &Input, image: &str, cfg: &WorkloadConfig) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(image.to_owned()),
        env: Some(input.to_env()),
        labels: Some([(LABEL.to_owned(), input.node_id.clone())].into()),
        host_config: Some(HostConfig {
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            pids_limit: Some(cfg.pids_limit),
            network_mode: Some("none".into()),
            ipc_mode: Some("private".into()),
            readonly_rootfs: Some(true),
            device_requests: Some(vec![bollard::models::DeviceRequest {
                driver: Some(cfg.gpu_driver.clone()),
                count: None,
                device_ids: Some(vec![input.gpu_uuid.clone()]),
                capabilities: Some(vec![vec!["gpu".to_owned()]]),
                options: None,
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How the solver ended, as far as the answer is concerned.
pub fn rounds_of(exit_code: Option<i64>, stdout: &[u8]) -> Result<Vec<pb::WorkRound>, String> {
    match exit_code {
        None => Err("the solver did not finish by the deadline".into()),
        Some(0) => Output::parse(stdout).map_err(|e| e.to_string()),
        Some(code) => Err(format!("the solver exited with status {code}")),
    }
}

/// The identity NVML gives GPU `uuid` now, from a fresh inventory.
fn identity(gpus: &dyn GpuSource, uuid: &str) -> Result<pb::GpuIdentity, GpuError> {
    let inv = gpus.inventory()?;
    let g = inv
        .gpus
        .iter()
        .find(|g| g.uuid == uuid)
        .ok_or_else(|| GpuError::Nvml(format!("no GPU {uuid} on this node")))?;
    Ok(warden_proto::workproof::identity::of(g))
}

/// The task: one challenge at a time (they are sent one per node).
pub struct WorkRunner {
    pub config: WorkConfig,
    pub workload: WorkloadConfig,
    pub node_id: String,
    pub gpus: Result<Arc<dyn GpuSource>, String>,
    /// To the uplink, sent once on the live stream.
    pub answers: mpsc::Sender<pb::WorkAnswer>,
    /// The active leases: a leased GPU is the renter's alone.
    pub leases: watch::Receiver<Vec<Lease>>,
}

/// The lease holding GPU `uuid`, if any.
pub fn leased_by<'a>(leases: &'a [Lease], uuid: &str) -> Option<&'a str> {
    leases
        .iter()
        .find(|l| l.gpus.iter().any(|g| g == uuid))
        .map(|l| l.id.as_str())
}

impl WorkRunner {
    pub async fn run(self, mut rx: mpsc::Receiver<pb::WorkChallenge>, stop: CancellationToken) {
        loop {
            let ch = tokio::select! {
                _ = stop.cancelled() => return,
                ch = rx.recv() => match ch { Some(c) => c, None => return },
            };
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                a = self.answer(&ch) => a,
            };
            if answer.error.is_empty() {
                tracing::info!(challenge = %ch.challenge_id, gpu = %ch.gpu_uuid, solve_ms = answer.solve_ms, "work challenge solved");
            } else {
                tracing::warn!(challenge = %ch.challenge_id, gpu = %ch.gpu_uuid, error = %answer.error, "work challenge not solved");
            }
            if self.answers.send(answer).await.is_err() {
                return;
            }
        }
    }

    async fn answer(&self, ch: &pb::WorkChallenge) -> pb::WorkAnswer {
        let mut answer = pb::WorkAnswer {
            node_id: self.node_id.clone(),
            challenge_id: ch.challenge_id.clone(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        match self.solve(ch).await {
            Ok(rounds) => answer.rounds = rounds,
            Err(e) => answer.error = e,
        }
        answer.solve_ms = started.elapsed().as_millis() as u64;
        if let Ok(gpus) = &self.gpus {
            let (gpus, uuid) = (gpus.clone(), ch.gpu_uuid.clone());
            let nonce: Option<[u8; 32]> = ch.cc_nonce.as_slice().try_into().ok();
            let read = tokio::task::spawn_blocking(move || {
                let id = identity(gpus.as_ref(), &uuid);
                let cc = match nonce {
                    Some(n) => gpus.cc_report(&uuid, n),
                    None => Err(GpuError::Nvml(
                        "the challenge carries no 32-byte nonce".into(),
                    )),
                };
                (id, cc)
            })
            .await;
            if let Ok((id, cc)) = read {
                match id {
                    Ok(id) => answer.identity = Some(id),
                    Err(e) if answer.error.is_empty() => answer.error = e.to_string(),
                    Err(_) => {}
                }
                match cc {
                    Ok(report) => {
                        answer.cc_report = report;
                        answer.cc_status = "ok".into();
                    }
                    Err(GpuError::Nvml(why) | GpuError::Load { reason: why, .. }) => {
                        answer.cc_status = why
                    }
                }
            }
        }
        answer.time_unix_ms = crate::now_ms();
        answer
    }

    async fn solve(&self, ch: &pb::WorkChallenge) -> Result<Vec<pb::WorkRound>, String> {
        if self.config.image.is_empty() {
            return Err("no solver image configured on the node (work_challenge.image)".into());
        }
        if ch.node_id != self.node_id {
            return Err(format!("the challenge names node {}", ch.node_id));
        }
        // The coordinator challenges free GPUs only, but a lease may have
        // started since it looked: the solver would take the renter's GPU
        // (and the time-lock would stop it as a stranger there).
        if let Some(lease) = leased_by(&self.leases.borrow(), &ch.gpu_uuid) {
            return Err(format!(
                "GPU {} is in lease {lease}: no challenge runs on a leased GPU",
                ch.gpu_uuid
            ));
        }
        let input = Input::of(ch).map_err(|e| e.to_string())?;
        let docker = Docker::connect(&self.workload.docker_socket)
            .await
            .map_err(|e| e.to_string())?;
        let left = ch.deadline_unix_ms - crate::now_ms();
        let limit = Duration::from_millis(left.max(0) as u64);
        let name = format!("warden-work-{}", ch.challenge_id);
        let config = container_config(&input, &self.config.image, &self.workload);
        let ended = docker
            .run_to_end(&name, config, limit, MAX_OUTPUT)
            .await
            .map_err(|e| e.to_string())?;
        rounds_of(ended.exit_code, &ended.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::workproof::Params;

    #[test]
    fn the_container_gets_one_gpu_no_network_and_no_privilege() {
        let input = Input {
            seed: [1; 32],
            node_id: "n".into(),
            params: Params {
                n: 64,
                rounds: 1,
                spot_tiles: 4,
            },
            gpu_uuid: "GPU-7".into(),
        };
        let c = container_config(&input, "solver:1", &WorkloadConfig::default());
        let h = c.host_config.unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.privileged, Some(false));
        let d = &h.device_requests.unwrap()[0];
        assert_eq!(d.device_ids, Some(vec!["GPU-7".to_owned()]));
        assert!(h.mounts.is_none() && h.binds.is_none());
        assert!(c.env.unwrap().contains(&"WARDEN_WORK_GPU=GPU-7".to_owned()));
    }

    #[tokio::test]
    async fn a_challenge_on_a_leased_gpu_is_refused_before_any_container() {
        let lease = Lease {
            id: "l-1".into(),
            renter: String::new(),
            gpus: vec!["GPU-7".into()],
            started_unix_ms: 0,
            containers: Vec::new(),
        };
        let (tx, leases) = watch::channel(vec![lease]);
        let (answers, _rx) = mpsc::channel(1);
        let runner = WorkRunner {
            config: WorkConfig {
                image: "solver:1".into(),
            },
            // No Docker there: a challenge that got that far would say so.
            workload: WorkloadConfig {
                docker_socket: "/nonexistent/docker.sock".into(),
                ..WorkloadConfig::default()
            },
            node_id: "n".into(),
            gpus: Err("no GPUs in this test".into()),
            answers,
            leases,
        };
        let ch = |gpu: &str| pb::WorkChallenge {
            node_id: "n".into(),
            challenge_id: "c".into(),
            gpu_uuid: gpu.into(),
            seed: vec![1; 32],
            n: 64,
            rounds: 1,
            spot_tiles: 4,
            deadline_unix_ms: i64::MAX,
            ..Default::default()
        };
        let refused = runner.answer(&ch("GPU-7")).await;
        assert_eq!(
            refused.error,
            "GPU GPU-7 is in lease l-1: no challenge runs on a leased GPU"
        );
        // Another GPU, or this one once the lease ended, goes on to Docker.
        let other = runner.answer(&ch("GPU-8")).await;
        assert!(!other.error.contains("lease"), "{}", other.error);
        tx.send_replace(Vec::new());
        let freed = runner.answer(&ch("GPU-7")).await;
        assert!(!freed.error.contains("lease"), "{}", freed.error);
    }

    #[test]
    fn a_solver_that_fails_or_says_nothing_useful_is_an_error_naming_why() {
        assert_eq!(
            rounds_of(None, b""),
            Err("the solver did not finish by the deadline".into())
        );
        assert_eq!(
            rounds_of(Some(3), b"{}"),
            Err("the solver exited with status 3".into())
        );
        assert!(rounds_of(Some(0), b"not json")
            .unwrap_err()
            .contains("not the answer JSON"));
        assert_eq!(rounds_of(Some(0), br#"{"rounds":[]}"#), Ok(vec![]));
    }
}
