//! The one way to command a lease: the lease is stored as the command
//! leaves it (so the node's answer always finds it), the signed command goes
//! down the node's stream, and the caller waits for the answer. Used by the
//! admin API's lease calls and by cluster hires, which send several at once.

use std::time::Duration;

use tonic::Status;
use warden_proto::{pb, states::LeaseState};

use crate::{
    leases::Kind,
    registry::{Pending, Registry},
    store::Store,
};

/// Lease commands, sent and answered; cheap to clone.
#[derive(Clone)]
pub struct LeaseControl {
    pub store: Store,
    pub registry: Registry,
}

/// A lease command on its way: wait for it with [`LeaseControl::answer`].
pub struct Sent {
    lease_id: String,
    pending: Pending,
}

impl LeaseControl {
    /// Stores `info` as the command leaves it and sends the command.
    pub async fn send(&self, info: pb::LeaseInfo, body: pb::command::Body) -> Result<Sent, Status> {
        let cmd = self
            .registry
            .command(&info.node_id, "c", body)
            .ok_or_else(|| {
                Status::failed_precondition(format!("node {} is not connected", info.node_id))
            })?;
        let kind = Kind::of(&cmd.command).ok_or_else(|| Status::internal("empty command"))?;
        let lease_id = info.lease_id.clone();
        self.store
            .put_lease(info, cmd.command.command_id.clone(), kind)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let pending = self
            .registry
            .send(cmd)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Sent { lease_id, pending })
    }

    /// Waits up to `wait` for the node's answer (stored by then) and returns
    /// the lease as it stands, or the node's reason as FAILED_PRECONDITION.
    pub async fn answer(&self, sent: Sent, wait: Duration) -> Result<pb::LeaseInfo, Status> {
        let Sent { lease_id, pending } = sent;
        let result = match tokio::time::timeout(wait, pending.answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(Status::unavailable("the coordinator is shutting down")),
            Err(_) => {
                self.registry.forget(&pending.command_id);
                return Err(Status::deadline_exceeded(format!(
                    "node did not answer within {}s; lease {lease_id} keeps its last state (see warden lease list)",
                    wait.as_secs()
                )));
            }
        };
        let info = self
            .store
            .get_lease(&lease_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::internal(format!("lease {lease_id} vanished")))?;
        if result.ok {
            Ok(info)
        } else {
            Err(Status::failed_precondition(result.error))
        }
    }

    /// Sends a command and waits for its answer.
    pub async fn command(
        &self,
        info: pb::LeaseInfo,
        body: pb::command::Body,
        wait: Duration,
    ) -> Result<pb::LeaseInfo, Status> {
        let sent = self.send(info, body).await?;
        self.answer(sent, wait).await
    }

    /// Ends a lease (an ended or failed one is returned as it is).
    pub async fn end(
        &self,
        lease_id: &str,
        grace_seconds: u32,
        wait: Duration,
    ) -> Result<pb::LeaseInfo, Status> {
        let mut info = self
            .store
            .get_lease(lease_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no lease {lease_id}")))?;
        // Nothing runs on the node for these.
        if info.state == LeaseState::Ended || info.state == LeaseState::Failed {
            return Ok(info);
        }
        info.state = LeaseState::Ending.into();
        let body = pb::command::Body::LeaseEnd(pb::LeaseEnd {
            lease_id: lease_id.to_owned(),
            grace_seconds,
        });
        self.command(info, body, wait).await
    }
}
