//! Why records are not being receipted, in words that name the cause and
//! the fix (pure): what `warden status`, /metrics and `warden doctor` show.
//! An agent that spools without delivering must say so, not look healthy.

use super::{spool::SpoolStats, uplink::UplinkStatus};

/// Connected, with records waiting, and no receipt for this long: stalled.
pub const STALL_MS: i64 = 60_000;

/// A delivery problem: a short kind (a metric label) and what to tell
/// the operator (cause and fix).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    pub kind: String,
    pub text: String,
}

fn said(kind: &str, text: String) -> Problem {
    Problem {
        kind: kind.to_owned(),
        text,
    }
}

/// The delivery problem at `now_ms`, or None while records are receipted
/// (or none wait).
pub fn problem(
    configured: bool,
    uplink: &UplinkStatus,
    spool: &SpoolStats,
    now_ms: i64,
) -> Option<Problem> {
    if !configured {
        return (spool.pending > 0).then(|| {
            said("not_configured", format!(
                "no [coordinator] is configured: {} record(s) wait in the spool. Fix: add the [coordinator] section your coordinator's operator gives you (docs/config.md), then restart the agent",
                spool.pending
            ))
        });
    }
    if spool.full {
        return Some(said("spool_full", format!(
            "the spool is full of evidence and refuses more ({} refused). Fix: restore delivery to the coordinator (below), or give the spool more room (spool.max_bytes)",
            spool.refused
        )));
    }
    if !uplink.connected {
        return Some(said(
            "disconnected",
            match (&uplink.problem, &uplink.last_error) {
                (Some(p), _) => p.clone(),
                (None, Some(e)) => format!("not connected to the coordinator: {e}"),
                (None, None) => "not connected to the coordinator yet".to_owned(),
            },
        ));
    }
    let since = uplink
        .last_receipt_unix_ms
        .max(uplink.connected_since_unix_ns);
    if spool.pending > 0 && now_ms - since >= STALL_MS {
        return Some(said("stalled", format!(
            "connected, but no receipt for {} s while {} record(s) wait. Fix: read the coordinator's log for this node's records (its refusals are in `warden status` as last refusal)",
            (now_ms - since) / 1000,
            spool.pending
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(n: u64) -> SpoolStats {
        SpoolStats {
            pending: n,
            ..Default::default()
        }
    }

    #[test]
    fn every_state_that_keeps_records_from_receipts_is_named() {
        let up = UplinkStatus {
            connected: true,
            connected_since_unix_ns: 1_000,
            ..Default::default()
        };
        // Connected and receipted: nothing to say, and nothing waiting is fine.
        assert_eq!(problem(true, &up, &waiting(0), 500_000), None);
        assert_eq!(problem(true, &up, &waiting(3), 30_000), None);
        // Connected, records waiting, no receipt for a minute: stalled.
        let p = problem(true, &up, &waiting(3), 61_000).unwrap();
        assert_eq!(p.kind, "stalled");
        assert!(p.text.contains("no receipt for 60 s while 3"), "{p:?}");
        let mut receipted = up.clone();
        receipted.last_receipt_unix_ms = 50_000;
        assert_eq!(problem(true, &receipted, &waiting(3), 61_000), None);
        // Not connected: the uplink's own words, cause and fix.
        let down = UplinkStatus {
            problem: Some("wrong key. Fix: set it".into()),
            last_error: Some("wrong key".into()),
            ..Default::default()
        };
        assert_eq!(
            problem(true, &down, &waiting(0), 0).unwrap(),
            said("disconnected", "wrong key. Fix: set it".into())
        );
        let fresh = UplinkStatus::default();
        assert!(problem(true, &fresh, &waiting(0), 0)
            .unwrap()
            .text
            .contains("not connected"));
        // No coordinator: only a problem once records pile up.
        assert_eq!(problem(false, &fresh, &waiting(0), 0), None);
        assert!(problem(false, &fresh, &waiting(2), 0)
            .unwrap()
            .text
            .contains("no [coordinator]"));
        // A full spool is said first.
        let full = SpoolStats {
            full: true,
            refused: 4,
            ..waiting(9)
        };
        assert_eq!(problem(true, &up, &full, 0).unwrap().kind, "spool_full");
    }
}
