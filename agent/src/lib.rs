//! The Warden agent: the host daemon that turns a GPU machine into a
//! rentable, verifiable node. Each folder is a subsystem (`delivery`,
//! `commands`, `workloads`, `timelock`, `host`, `mesh`); inside one, pure modules hold
//! the decisions and the tasks and edges around them do the I/O. `daemon`
//! wires the tasks together. docs/architecture.md draws the arrows.

pub mod commands;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod host;
pub mod mesh;
pub mod notify;
pub mod reload;
pub mod status;
pub mod timelock;
pub mod workloads;
pub mod workproof;

pub use config::AgentConfig;
pub use daemon::{run, AgentError, Reloader};

/// An error and its sources on one line, each cause once (many messages
/// already quote their source), so "transport error" says what failed
/// underneath. The one helper for it: logs, refusals and the binary's exit.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let next = s.to_string();
        if !msg.contains(&next) {
            msg.push_str(": ");
            msg.push_str(&next);
        }
        src = s.source();
    }
    msg
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random 128-bit id in hex (start ids).
pub fn random_id() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct E(String, #[source] Option<Box<E>>);

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let inner = E("connection refused".into(), None);
        let quoted = E("connect: connection refused".into(), Some(Box::new(inner)));
        let outer = E("transport error".into(), Some(Box::new(quoted)));
        assert_eq!(
            super::error_chain(&outer),
            "transport error: connect: connection refused"
        );
    }
}
