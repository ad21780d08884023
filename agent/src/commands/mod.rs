//! Commands from the coordinator, after the uplink verified their
//! signature: admitted once here ([`admission`]), then handed to the task
//! that carries them out, in the order they came: lease and container
//! commands and the Ray probe to the workload task, mesh configs to the
//! mesh task (through a lane of their own, which asks the workload task for
//! a lease's network namespace when a config names a lease). Whoever
//! carries a command out sends its answer ([`answer`]); a refusal is sent
//! from here.

pub mod admission;

use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use crate::{delivery::outbox::Outbox, mesh::place::Netns};

use admission::Admission;

/// What a command that succeeded gives back.
#[derive(Debug, Default)]
pub struct Success {
    pub containers: Vec<pb::ContainerState>,
    pub gpu_uuids: Vec<String>,
    pub ray_alive_addresses: Vec<String>,
    /// Notes that go with a success (peers a mesh config left out).
    pub note: String,
    /// A lease's scratch key sealed to the renter's (LeaseStart).
    pub sealed_scratch_key: Vec<u8>,
}

impl Success {
    pub fn containers(containers: Vec<pb::ContainerState>) -> Success {
        Success {
            containers,
            ..Default::default()
        }
    }
}

/// Sends a command's answer as a record.
pub async fn answer(
    outbox: &Outbox,
    command_id: &str,
    lease_id: String,
    outcome: Result<Success, String>,
) {
    let result = match outcome {
        Ok(s) => pb::CommandResult {
            command_id: command_id.to_owned(),
            lease_id,
            ok: true,
            error: s.note,
            containers: s.containers,
            gpu_uuids: s.gpu_uuids,
            ray_alive_nodes: s.ray_alive_addresses.len() as u32,
            ray_alive_addresses: s.ray_alive_addresses,
            logs: None,
            sealed_scratch_key: s.sealed_scratch_key,
        },
        Err(error) => {
            tracing::warn!(command = %command_id, lease = %lease_id, %error, "command refused or failed");
            pb::CommandResult {
                command_id: command_id.to_owned(),
                lease_id,
                ok: false,
                error,
                ..Default::default()
            }
        }
    };
    let _ = outbox.emit(pb::record::Body::CommandResult(result)).await;
}

/// The lease a command is about, if it names one.
pub fn lease_of(cmd: &pb::Command) -> String {
    match &cmd.body {
        Some(pb::command::Body::LeaseStart(x)) => x.lease_id.clone(),
        Some(pb::command::Body::LeaseEnd(x)) => x.lease_id.clone(),
        Some(pb::command::Body::RunContainer(x)) => x.lease_id.clone(),
        Some(pb::command::Body::StopContainer(x)) => x.lease_id.clone(),
        Some(pb::command::Body::RayProbe(x)) => x.lease_id.clone(),
        Some(pb::command::Body::ContainerLogs(x)) => x.lease_id.clone(),
        Some(pb::command::Body::MeshConfig(_)) | None => String::new(),
    }
}

/// What the workload task is asked.
pub enum ToWorkload {
    /// An admitted command to carry out (and answer).
    Command(Box<pb::Command>),
    /// The network namespace of a running lease's first container.
    LeaseNetns {
        lease_id: String,
        reply: oneshot::Sender<Result<Netns, String>>,
    },
}

/// Loads the admission (`commands.json`); an agent upgraded from when the
/// lease book held it takes it from `legacy_book`. Unreadable: empty, and
/// said (commands already acted on then could be acted on again until they
/// expire, minutes at most).
pub fn load(path: &Path, legacy_book: &Path) -> Admission {
    let read = |p: &Path| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    if path.exists() {
        return read(path)
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_else(|| {
                tracing::error!(path = %path.display(), "the admitted commands cannot be read; starting with none");
                Admission::default()
            });
    }
    read(legacy_book)
        .map(|b| Admission::from_legacy_book(&b))
        .unwrap_or_default()
}

fn save(path: &Path, a: &Admission) {
    let written = serde_json::to_vec_pretty(a)
        .map_err(std::io::Error::other)
        .and_then(|b| warden_state::file::write_private(path, &b));
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, "cannot save the admitted commands");
    }
}

/// The task that admits and routes commands.
pub struct Dispatch {
    pub node_id: String,
    pub admission: Admission,
    /// `commands.json` in the state directory.
    pub path: PathBuf,
    /// The clock difference allowed (`workload.clock_skew`, live).
    pub reload: watch::Receiver<crate::AgentConfig>,
    pub outbox: Outbox,
    pub workload: mpsc::Sender<ToWorkload>,
    pub mesh: mpsc::Sender<crate::mesh::node::Request>,
}

impl Dispatch {
    /// Runs until `shutdown` or until the uplink's side closes.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<pb::Command>,
        shutdown: CancellationToken,
    ) {
        let (lane, lane_rx) = mpsc::channel(64);
        let lane_task = tokio::spawn(mesh_lane(
            lane_rx,
            self.workload.clone(),
            self.mesh.clone(),
            self.outbox.clone(),
        ));
        loop {
            let cmd = tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
                },
            };
            let now = crate::now_ms();
            let skew = self.reload.borrow().workload.clock_skew.as_millis() as i64;
            if let Err(e) = self.admission.admit(&cmd, &self.node_id, now, skew) {
                answer(&self.outbox, &cmd.command_id, lease_of(&cmd), Err(e)).await;
                continue;
            }
            self.admission.remember(&cmd, now, skew);
            save(&self.path, &self.admission);
            let sent = match cmd.body {
                Some(pb::command::Body::MeshConfig(mc)) => lane
                    .send((cmd.command_id, mc))
                    .await
                    .map_err(|_| "the mesh lane has stopped"),
                _ => self
                    .workload
                    .send(ToWorkload::Command(Box::new(cmd)))
                    .await
                    .map_err(|_| "the workload task has stopped"),
            };
            if let Err(e) = sent {
                tracing::error!(error = e, "an admitted command could not be handed on");
            }
        }
        drop(lane);
        let _ = lane_task.await;
    }
}

/// Mesh configs, one at a time in the order admitted (a later generation
/// never overtakes an earlier one): each is applied by the mesh task and
/// answered. One that names a lease goes with the network namespace of its
/// first container, which the workload task finds.
async fn mesh_lane(
    mut configs: mpsc::Receiver<(String, pb::MeshConfig)>,
    workload: mpsc::Sender<ToWorkload>,
    mesh: mpsc::Sender<crate::mesh::node::Request>,
    outbox: Outbox,
) {
    while let Some((command_id, config)) = configs.recv().await {
        let outcome = apply(config, &workload, &mesh).await;
        let outcome = outcome.map(|note| Success {
            note,
            ..Default::default()
        });
        answer(&outbox, &command_id, String::new(), outcome).await;
    }
}

async fn apply(
    config: pb::MeshConfig,
    workload: &mpsc::Sender<ToWorkload>,
    mesh: &mpsc::Sender<crate::mesh::node::Request>,
) -> Result<String, String> {
    let netns = if config.lease_id.is_empty() || config.cluster_id.is_empty() {
        None
    } else {
        let (reply, rx) = oneshot::channel();
        workload
            .send(ToWorkload::LeaseNetns {
                lease_id: config.lease_id.clone(),
                reply,
            })
            .await
            .map_err(|_| "the workload task has stopped")?;
        Some(
            rx.await
                .map_err(|_| "the workload task stopped while asked".to_owned())??,
        )
    };
    let (reply, rx) = oneshot::channel();
    mesh.send(crate::mesh::node::Request {
        config,
        netns,
        reply,
    })
    .await
    .map_err(|_| "the mesh task has stopped")?;
    rx.await
        .map_err(|_| "the mesh task stopped while applying".to_owned())?
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use prost::Message;
    use warden_proto::dsse::Signer;

    use super::*;
    use crate::delivery::outbox::{self, tests::small_spool, Stamp};

    fn command(id: &str, node: &str, body: pb::command::Body) -> pb::Command {
        pb::Command {
            node_id: node.into(),
            command_id: id.into(),
            issued_unix_ms: crate::now_ms(),
            expires_unix_ms: crate::now_ms() + 60_000,
            body: Some(body),
        }
    }

    /// The CommandResults spooled so far.
    async fn answers(outbox: &Outbox) -> Vec<pb::CommandResult> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        outbox
            .read(1, 100)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|p| {
                match pb::Record::decode(p.envelope.payload.as_slice())
                    .ok()?
                    .body?
                {
                    pb::record::Body::CommandResult(r) => Some(r),
                    _ => None,
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn each_command_is_admitted_once_even_across_a_restart_and_routed_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(Signer::from_seed(&[7; 32]));
        let stop = CancellationToken::new();
        let (outbox, _task) = outbox::spawn(
            small_spool(&dir.path().join("spool")),
            Stamp {
                signer: signer.clone(),
                node_id: "n1".into(),
                start_id: "s".into(),
            },
            stop.clone(),
        );
        let path = dir.path().join("commands.json");
        let (_config, reload) = watch::channel(crate::AgentConfig::default());
        let start = |admission| {
            let (workload, to_workload) = mpsc::channel(8);
            let (mesh, to_mesh) = mpsc::channel(8);
            let (commands, from_uplink) = mpsc::channel(8);
            let d = Dispatch {
                node_id: "n1".into(),
                admission,
                path: path.clone(),
                reload: reload.clone(),
                outbox: outbox.clone(),
                workload,
                mesh,
            };
            let task = tokio::spawn(d.run(from_uplink, stop.clone()));
            (commands, to_workload, to_mesh, task)
        };
        let end = pb::command::Body::LeaseEnd(pb::LeaseEnd {
            lease_id: "l1".into(),
            grace_seconds: 0,
        });
        let (commands, mut to_workload, mut to_mesh, task) = start(Admission::default());
        commands
            .send(command("c1", "n1", end.clone()))
            .await
            .unwrap();
        let Some(ToWorkload::Command(got)) = to_workload.recv().await else {
            panic!("the lease command did not reach the workload task");
        };
        assert_eq!(got.command_id, "c1");
        // The same command again, and one for another node: refused here.
        commands
            .send(command("c1", "n1", end.clone()))
            .await
            .unwrap();
        commands
            .send(command("c2", "n9", end.clone()))
            .await
            .unwrap();
        // A mesh config takes the mesh lane, not the workload task.
        let mesh = pb::command::Body::MeshConfig(pb::MeshConfig {
            cluster_id: "k".into(),
            ..Default::default()
        });
        commands.send(command("c3", "n1", mesh)).await.unwrap();
        let applied = tokio::time::timeout(Duration::from_secs(5), to_mesh.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(applied.config.cluster_id, "k");
        let _ = applied.reply.send(Ok(String::new()));
        let refused = answers(&outbox).await;
        let refused: Vec<(&str, &str)> = refused
            .iter()
            .map(|r| (r.command_id.as_str(), r.error.as_str()))
            .collect();
        assert!(
            refused
                .iter()
                .any(|(id, e)| *id == "c1" && e.contains("replay")),
            "{refused:?}"
        );
        assert!(
            refused
                .iter()
                .any(|(id, e)| *id == "c2" && e.contains("not this node")),
            "{refused:?}"
        );
        assert!(
            refused.iter().any(|(id, e)| *id == "c3" && e.is_empty()),
            "{refused:?}"
        );
        assert!(
            to_workload.try_recv().is_err(),
            "only c1 reached the workload task"
        );
        drop(commands);
        task.await.unwrap();

        // Restarted: the admission is read back, and c1 is still a replay.
        let (commands, mut to_workload, _to_mesh, _task) =
            start(load(&path, &dir.path().join("book.json")));
        commands
            .send(command("c1", "n1", end.clone()))
            .await
            .unwrap();
        commands.send(command("c4", "n1", end)).await.unwrap();
        let Some(ToWorkload::Command(got)) = to_workload.recv().await else {
            panic!("c4 did not reach the workload task");
        };
        assert_eq!(
            got.command_id, "c4",
            "c1 was acted on again after a restart"
        );
        stop.cancel();
    }
}
