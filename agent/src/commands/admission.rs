//! Which verified commands may be acted on (pure): one that names this
//! node, has not expired and was not acted on before. Every command goes
//! through here once, whatever task then carries it out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use warden_proto::pb;

/// Longest lease id and command id accepted.
const MAX_ID: usize = 128;

/// Whether an id (of a command or a lease) is one the agent accepts:
/// short, of `[A-Za-z0-9._-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The commands acted on, kept across restarts (`commands.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Admission {
    /// Command ids acted on, with their expiry: a replay is refused, and an
    /// id is forgotten only once its command could no longer be accepted.
    pub seen: BTreeMap<String, i64>,
}

impl Admission {
    /// Whether a verified command may be acted on now: it names this node,
    /// has not expired (allowing `skew_ms` for clocks) and is not a replay.
    pub fn admit(
        &self,
        cmd: &pb::Command,
        node_id: &str,
        now_ms: i64,
        skew_ms: i64,
    ) -> Result<(), String> {
        if cmd.node_id != node_id {
            return Err(format!(
                "command {} is for node {}, not this node ({node_id})",
                cmd.command_id, cmd.node_id
            ));
        }
        if !valid_id(&cmd.command_id) {
            return Err("command id is empty, too long or has odd characters".into());
        }
        if now_ms > cmd.expires_unix_ms + skew_ms {
            return Err(format!(
                "command {} expired {} ms ago (check both clocks)",
                cmd.command_id,
                now_ms - cmd.expires_unix_ms
            ));
        }
        if self.seen.contains_key(&cmd.command_id) {
            return Err(format!(
                "command {} was already acted on (a replay)",
                cmd.command_id
            ));
        }
        Ok(())
    }

    /// Remembers an admitted command and forgets those long expired.
    pub fn remember(&mut self, cmd: &pb::Command, now_ms: i64, skew_ms: i64) {
        self.seen.retain(|_, expires| *expires + skew_ms >= now_ms);
        self.seen
            .insert(cmd.command_id.clone(), cmd.expires_unix_ms);
    }

    /// The admission of an agent whose lease book (`book.json`, from before
    /// admission had a file of its own) holds `seen_commands`.
    pub fn from_legacy_book(book: &serde_json::Value) -> Admission {
        let seen = book
            .get("seen_commands")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        Admission { seen }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str, node: &str, expires: i64) -> pb::Command {
        pb::Command {
            node_id: node.into(),
            command_id: id.into(),
            issued_unix_ms: 0,
            expires_unix_ms: expires,
            body: None,
        }
    }

    #[test]
    fn commands_are_admitted_once_for_this_node_before_expiry() {
        let mut a = Admission::default();
        let c = cmd("c1", "n1", 1000);
        a.admit(&c, "n1", 900, 0).unwrap();
        assert!(a
            .admit(&c, "n2", 900, 0)
            .unwrap_err()
            .contains("not this node"));
        assert!(a
            .admit(&c, "n1", 1001, 0)
            .unwrap_err()
            .contains("expired 1 ms ago"));
        a.admit(&c, "n1", 1001, 5).unwrap(); // within the skew
        a.remember(&c, 900, 0);
        assert!(a.admit(&c, "n1", 950, 0).unwrap_err().contains("replay"));
        // Forgotten only once it could no longer be admitted anyway.
        a.remember(&cmd("c2", "n1", 5000), 1000, 0);
        assert!(a.seen.contains_key("c1"));
        a.remember(&cmd("c3", "n1", 9000), 1001, 0);
        assert!(!a.seen.contains_key("c1"));
        assert!(a.admit(&cmd("", "n1", 5000), "n1", 0, 0).is_err());
        let long = "x".repeat(MAX_ID + 1);
        assert!(a.admit(&cmd(&long, "n1", 5000), "n1", 0, 0).is_err());
    }

    #[test]
    fn an_old_books_commands_stay_refused_as_replays() {
        let book = serde_json::json!({"leases": {}, "seen_commands": {"c9": 5000}});
        let a = Admission::from_legacy_book(&book);
        assert!(a
            .admit(&cmd("c9", "n1", 5000), "n1", 0, 0)
            .unwrap_err()
            .contains("replay"));
        assert_eq!(
            Admission::from_legacy_book(&serde_json::json!({})),
            Admission::default()
        );
    }
}
