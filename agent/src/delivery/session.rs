//! One stream's decisions, without I/O: when a spool started empty stops
//! waiting for the coordinator's Welcome, what each message from the
//! coordinator means (verified against the pinned key, for this node), and
//! when the uplink must wake. Fed envelopes and the time; the uplink task
//! (`uplink.rs`) moves the bytes, reads and acks the spool, and logs.
//!
//! The in-flight bookkeeping itself is the [`Window`], which this holds.

use std::time::{Duration, Instant};

use warden_proto::{
    dsse::{self, VerifyingKey},
    pb::{self, Envelope},
    types,
};

use super::window::{OnReceipt, OnRefusal, Window};

/// What one coordinator message asks of the uplink.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A Welcome: anchor the spool after the coordinator's last stored seq.
    Anchor(u64),
    /// A receipt for the bytes in flight: the record leaves the spool.
    Ack(u64),
    /// A Receipts (several under one signature): those of `seqs` leave the
    /// spool; `wrong` are in flight with other bytes. Its other entries are
    /// for records no longer in flight (a set given again for a replay).
    Acks { seqs: Vec<u64>, wrong: Vec<u64> },
    /// A refusal for good: set the record aside, saying why.
    SetAside { seq: u64, why: String },
    /// A refusal for now: the record waits and goes again after `retry_in`.
    /// `first`: no other record was waiting (the uplink says so once).
    Retry {
        seq: u64,
        why: String,
        retry_in: Duration,
        first: bool,
    },
    /// A verified challenge for this node: to the time-lock.
    Challenge(pb::Challenge),
    /// A verified work challenge for this node: to the work runner.
    WorkChallenge(Box<pb::WorkChallenge>),
    /// A verified command: to the workload task (boxed: it may carry a
    /// whole container spec).
    Command(Box<pb::Command>),
    /// Nothing to do; the uplink logs why.
    Ignored(Ignored),
}

/// Why a coordinator message changed nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Ignored {
    /// Its signature does not verify against the pinned coordinator key.
    Unverified { what: &'static str, error: String },
    /// It names another node.
    OtherNode { what: &'static str, node: String },
    /// A receipt whose digest differs from the bytes sent.
    WrongDigest { seq: u64 },
    /// A receipt for a record not in flight (an earlier stream's).
    NotInFlight { seq: u64 },
    /// A refusal for a record not in flight with these bytes.
    RefusalNotInFlight { seq: u64, why: String },
    /// A payload type the agent does not take.
    Unexpected { payload_type: String },
}

/// One stream's state: the window, and whether the spool may still wait
/// for the Welcome.
#[derive(Debug)]
pub struct Session {
    node_id: String,
    pinned: VerifyingKey,
    window: Window,
    /// A spool started empty sends nothing before the coordinator said its
    /// last seq (the Welcome, its first message); an older coordinator that
    /// never says it gets until then.
    welcome_by: Instant,
    /// A Welcome came, or the wait for it is over.
    welcomed: bool,
}

impl Session {
    /// A stream registered at `now`, sending at most `max_in_flight`
    /// unacknowledged records and waiting up to `welcome_wait` for the Welcome.
    pub fn new(
        node_id: String,
        pinned: VerifyingKey,
        max_in_flight: usize,
        now: Instant,
        welcome_wait: Duration,
    ) -> Session {
        Session {
            node_id,
            pinned,
            window: Window::new(max_in_flight),
            welcome_by: now + welcome_wait,
            welcomed: false,
        }
    }

    /// The in-flight bookkeeping, for filling the window from the spool.
    pub fn window(&mut self) -> &mut Window {
        &mut self.window
    }

    /// Records waiting to be sent again.
    pub fn retrying(&self) -> usize {
        self.window.retrying()
    }

    /// With the spool not `anchored`: whether the wait for the Welcome is
    /// over at `now`, so the spool must be anchored after seq 0 (its own
    /// seqs kept). Says so once.
    pub fn welcome_overdue(&mut self, anchored: bool, now: Instant) -> bool {
        if anchored || self.welcomed || now < self.welcome_by {
            return false;
        }
        self.welcomed = true;
        true
    }

    /// Whether the uplink waits for the spool to change: it sent all there
    /// was below `next_seq`, or the spool is not anchored yet.
    pub fn wants_spool_change(&self, anchored: bool, next_seq: u64) -> bool {
        !anchored || self.window.cursor() >= next_seq
    }

    /// When the uplink must wake with nothing else happening: a retry falls
    /// due (while there is room to send it), or the wait for the Welcome ends.
    pub fn wake_at(&self, anchored: bool) -> Option<Instant> {
        let welcome = (!anchored && !self.welcomed).then_some(self.welcome_by);
        match (self.window.wake_for_retry(), welcome) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One message from the coordinator, arrived at `now`.
    pub fn handle(&mut self, env: &Envelope, now: Instant) -> Inbound {
        match env.payload_type.as_str() {
            types::WELCOME => match self.open::<pb::Welcome>(env, types::WELCOME, "welcome") {
                Ok(w) => match self.for_us("welcome", &w.node_id) {
                    Ok(()) => {
                        self.welcomed = true;
                        Inbound::Anchor(w.last_seq)
                    }
                    Err(i) => Inbound::Ignored(i),
                },
                Err(i) => Inbound::Ignored(i),
            },
            types::RECEIPT => {
                let r = match self.open::<pb::Receipt>(env, types::RECEIPT, "receipt") {
                    Ok(r) => r,
                    Err(i) => return Inbound::Ignored(i),
                };
                if let Err(i) = self.for_us("receipt", &r.node_id) {
                    return Inbound::Ignored(i);
                }
                let seq = r.seq;
                match self.window.receipt(seq, &r.payload_sha256) {
                    OnReceipt::Ack => Inbound::Ack(seq),
                    OnReceipt::WrongDigest => Inbound::Ignored(Ignored::WrongDigest { seq }),
                    OnReceipt::Unknown => Inbound::Ignored(Ignored::NotInFlight { seq }),
                }
            }
            types::RECEIPTS => {
                let set = match self.open::<pb::Receipts>(env, types::RECEIPTS, "receipts") {
                    Ok(r) => r,
                    Err(i) => return Inbound::Ignored(i),
                };
                if let Some(other) = set.receipts.iter().find(|r| r.node_id != self.node_id) {
                    return Inbound::Ignored(Ignored::OtherNode {
                        what: "receipts",
                        node: other.node_id.clone(),
                    });
                }
                let (mut seqs, mut wrong) = (Vec::new(), Vec::new());
                for r in &set.receipts {
                    match self.window.receipt(r.seq, &r.payload_sha256) {
                        OnReceipt::Ack => seqs.push(r.seq),
                        OnReceipt::WrongDigest => wrong.push(r.seq),
                        OnReceipt::Unknown => {}
                    }
                }
                Inbound::Acks { seqs, wrong }
            }
            types::REFUSAL => {
                let r = match self.open::<pb::Refusal>(env, types::REFUSAL, "refusal") {
                    Ok(r) => r,
                    Err(i) => return Inbound::Ignored(i),
                };
                if let Err(i) = self.for_us("refusal", &r.node_id) {
                    return Inbound::Ignored(i);
                }
                let kind = r.kind();
                let why = format!("{}: {}", kind.as_str_name(), r.reason);
                let seq = r.seq;
                match self.window.refusal(seq, &r.payload_sha256, kind, now) {
                    OnRefusal::SetAside => Inbound::SetAside { seq, why },
                    OnRefusal::RetryAt(at) => Inbound::Retry {
                        seq,
                        why,
                        retry_in: at.saturating_duration_since(now),
                        first: self.window.retrying() == 1,
                    },
                    OnRefusal::Ignored => {
                        Inbound::Ignored(Ignored::RefusalNotInFlight { seq, why })
                    }
                }
            }
            types::CHALLENGE => {
                match self.open::<pb::Challenge>(env, types::CHALLENGE, "challenge") {
                    Ok(c) => match self.for_us("challenge", &c.node_id) {
                        Ok(()) => Inbound::Challenge(c),
                        Err(i) => Inbound::Ignored(i),
                    },
                    Err(i) => Inbound::Ignored(i),
                }
            }
            types::WORK_CHALLENGE => {
                match self.open::<pb::WorkChallenge>(env, types::WORK_CHALLENGE, "work challenge") {
                    Ok(c) => match self.for_us("work challenge", &c.node_id) {
                        Ok(()) => Inbound::WorkChallenge(Box::new(c)),
                        Err(i) => Inbound::Ignored(i),
                    },
                    Err(i) => Inbound::Ignored(i),
                }
            }
            // The workload task admits a command (its node, expiry, replay).
            types::COMMAND => match self.open::<pb::Command>(env, types::COMMAND, "command") {
                Ok(c) => Inbound::Command(Box::new(c)),
                Err(i) => Inbound::Ignored(i),
            },
            other => Inbound::Ignored(Ignored::Unexpected {
                payload_type: other.to_owned(),
            }),
        }
    }

    fn open<M: prost::Message + Default>(
        &self,
        env: &Envelope,
        payload_type: &str,
        what: &'static str,
    ) -> Result<M, Ignored> {
        dsse::open::<M>(env, payload_type, &self.pinned).map_err(|e| Ignored::Unverified {
            what,
            error: e.to_string(),
        })
    }

    fn for_us(&self, what: &'static str, node: &str) -> Result<(), Ignored> {
        if node == self.node_id {
            Ok(())
        } else {
            Err(Ignored::OtherNode {
                what,
                node: node.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::{dsse::Signer, pb::RefusalKind};

    const NODE: &str = "node-a";
    const WAIT: Duration = Duration::from_secs(10);

    fn coordinator() -> Signer {
        Signer::from_seed(&[7; 32])
    }

    fn session(t0: Instant) -> Session {
        Session::new(NODE.into(), coordinator().verifying_key(), 4, t0, WAIT)
    }

    fn d(seq: u64) -> [u8; 32] {
        [seq as u8; 32]
    }

    fn welcome(node: &str, last_seq: u64) -> Envelope {
        coordinator().sign_message(
            types::WELCOME,
            &pb::Welcome {
                node_id: node.into(),
                last_seq,
                time_unix_ms: 0,
            },
        )
    }

    fn receipt(seq: u64, digest: [u8; 32]) -> Envelope {
        coordinator().sign_message(
            types::RECEIPT,
            &pb::Receipt {
                node_id: NODE.into(),
                seq,
                payload_sha256: digest.to_vec(),
                ..Default::default()
            },
        )
    }

    fn refusal(seq: u64, kind: RefusalKind) -> Envelope {
        coordinator().sign_message(
            types::REFUSAL,
            &pb::Refusal {
                node_id: NODE.into(),
                seq,
                payload_sha256: d(seq).to_vec(),
                reason: "busy".into(),
                time_unix_ms: 0,
                kind: kind as i32,
            },
        )
    }

    #[test]
    fn an_unanchored_spool_waits_for_the_welcome_until_the_deadline_only() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.wake_at(false), Some(t0 + WAIT));
        assert!(s.wants_spool_change(false, 1));
        assert!(!s.welcome_overdue(false, t0 + WAIT - Duration::from_millis(1)));
        assert!(s.welcome_overdue(false, t0 + WAIT));
        assert!(!s.welcome_overdue(false, t0 + WAIT * 2), "said once");
        assert_eq!(s.wake_at(false), None);
        // An anchored spool never waits for it.
        let mut s = session(t0);
        assert!(!s.welcome_overdue(true, t0 + WAIT * 100));
        assert_eq!(s.wake_at(true), None);
    }

    #[test]
    fn a_welcome_for_this_node_anchors_and_ends_the_wait() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(
            s.handle(&welcome("node-b", 9), t0),
            Inbound::Ignored(Ignored::OtherNode {
                what: "welcome",
                node: "node-b".into()
            })
        );
        assert_eq!(s.wake_at(false), Some(t0 + WAIT));
        assert_eq!(s.handle(&welcome(NODE, 41), t0), Inbound::Anchor(41));
        assert!(!s.welcome_overdue(false, t0 + WAIT));
        assert_eq!(s.wake_at(false), None);
        // A later Welcome (a spool anchored meanwhile) is still passed on.
        assert_eq!(s.handle(&welcome(NODE, 50), t0), Inbound::Anchor(50));
    }

    #[test]
    fn only_the_pinned_key_counts() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.window().sent(1, d(1));
        let forged = Signer::from_seed(&[8; 32]).sign_message(
            types::RECEIPT,
            &pb::Receipt {
                node_id: NODE.into(),
                seq: 1,
                payload_sha256: d(1).to_vec(),
                ..Default::default()
            },
        );
        assert!(matches!(
            s.handle(&forged, t0),
            Inbound::Ignored(Ignored::Unverified {
                what: "receipt",
                ..
            })
        ));
        assert_eq!(s.window().in_flight(), 1);
        assert_eq!(s.handle(&receipt(1, d(1)), t0), Inbound::Ack(1));
        assert_eq!(
            s.handle(&receipt(1, d(1)), t0),
            Inbound::Ignored(Ignored::NotInFlight { seq: 1 })
        );
        s.window().sent(2, d(2));
        assert_eq!(
            s.handle(&receipt(2, d(3)), t0),
            Inbound::Ignored(Ignored::WrongDigest { seq: 2 })
        );
    }

    #[test]
    fn a_receipts_acks_what_is_in_flight_with_those_bytes_and_nothing_unsigned_or_for_another() {
        let t0 = Instant::now();
        let mut s = session(t0);
        for seq in 1..=3 {
            s.window().sent(seq, d(seq));
        }
        let entry = |node: &str, seq: u64, digest: [u8; 32]| pb::Receipt {
            node_id: node.into(),
            seq,
            payload_sha256: digest.to_vec(),
            ..Default::default()
        };
        let set =
            |by: &Signer, receipts| by.sign_message(types::RECEIPTS, &pb::Receipts { receipts });
        // Signed by another key, or naming another node: nothing leaves.
        let stranger = Signer::from_seed(&[8; 32]);
        assert!(matches!(
            s.handle(&set(&stranger, vec![entry(NODE, 1, d(1))]), t0),
            Inbound::Ignored(Ignored::Unverified {
                what: "receipts",
                ..
            })
        ));
        assert_eq!(
            s.handle(
                &set(
                    &coordinator(),
                    vec![entry(NODE, 1, d(1)), entry("node-b", 2, d(2))]
                ),
                t0
            ),
            Inbound::Ignored(Ignored::OtherNode {
                what: "receipts",
                node: "node-b".into()
            })
        );
        assert_eq!(s.window().in_flight(), 3);
        // 1 and 2 acked, 3 in flight with other bytes, 9 long gone.
        let all = vec![
            entry(NODE, 1, d(1)),
            entry(NODE, 2, d(2)),
            entry(NODE, 3, d(4)),
            entry(NODE, 9, d(9)),
        ];
        assert_eq!(
            s.handle(&set(&coordinator(), all.clone()), t0),
            Inbound::Acks {
                seqs: vec![1, 2],
                wrong: vec![3]
            }
        );
        assert_eq!(s.window().in_flight(), 1);
        // Given again (a replay's answer): nothing more.
        assert_eq!(
            s.handle(&set(&coordinator(), all), t0),
            Inbound::Acks {
                seqs: vec![],
                wrong: vec![3]
            }
        );
    }

    #[test]
    fn refusals_set_aside_or_wait_and_wake_the_uplink_when_due() {
        let t0 = Instant::now();
        let mut s = session(t0);
        for seq in 1..=3 {
            s.window().sent(seq, d(seq));
        }
        assert!(matches!(
            s.handle(&refusal(1, RefusalKind::WrongKey), t0),
            Inbound::SetAside { seq: 1, ref why }
                if *why == format!("{}: busy", RefusalKind::WrongKey.as_str_name())
        ));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            s.handle(&refusal(2, RefusalKind::RetryLater), t1),
            Inbound::Retry {
                seq: 2,
                why: format!("{}: busy", RefusalKind::RetryLater.as_str_name()),
                retry_in: super::super::window::RETRY_INITIAL,
                first: true
            }
        );
        assert!(matches!(
            s.handle(&refusal(3, RefusalKind::RetryLater), t1),
            Inbound::Retry { first: false, .. }
        ));
        assert!(matches!(
            s.handle(&refusal(3, RefusalKind::RetryLater), t1),
            Inbound::Ignored(Ignored::RefusalNotInFlight { seq: 3, .. })
        ));
        assert_eq!(s.retrying(), 2);
        // Anchored: only the retries wake it; an hour later they are all due.
        let due = t1 + super::super::window::RETRY_INITIAL;
        assert_eq!(s.wake_at(true), Some(due));
        assert_eq!(s.window().due(due), vec![2, 3]);
        assert_eq!(s.window().due(t1 + Duration::from_secs(3600)), vec![2, 3]);
        // Unanchored: whichever comes first.
        assert_eq!(s.wake_at(false), Some(due.min(t0 + WAIT)));
    }

    #[test]
    fn work_challenges_are_passed_on_only_verified_and_for_this_node() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let ch = pb::WorkChallenge {
            node_id: NODE.into(),
            challenge_id: "wc-1".into(),
            ..Default::default()
        };
        let env = coordinator().sign_message(types::WORK_CHALLENGE, &ch);
        assert_eq!(
            s.handle(&env, t0),
            Inbound::WorkChallenge(Box::new(ch.clone()))
        );
        let other = pb::WorkChallenge {
            node_id: "node-b".into(),
            ..ch.clone()
        };
        let env = coordinator().sign_message(types::WORK_CHALLENGE, &other);
        assert!(matches!(
            s.handle(&env, t0),
            Inbound::Ignored(Ignored::OtherNode {
                what: "work challenge",
                ..
            })
        ));
        let (stranger, _) = warden_proto::dsse::Signer::generate().unwrap();
        let env = stranger.sign_message(types::WORK_CHALLENGE, &ch);
        assert!(matches!(
            s.handle(&env, t0),
            Inbound::Ignored(Ignored::Unverified {
                what: "work challenge",
                ..
            })
        ));
    }

    #[test]
    fn challenges_and_commands_are_passed_on_verified() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let ch = pb::Challenge {
            node_id: NODE.into(),
            ..Default::default()
        };
        let env = coordinator().sign_message(types::CHALLENGE, &ch);
        assert_eq!(s.handle(&env, t0), Inbound::Challenge(ch.clone()));
        let other = pb::Challenge {
            node_id: "node-b".into(),
            ..ch
        };
        let env = coordinator().sign_message(types::CHALLENGE, &other);
        assert!(matches!(
            s.handle(&env, t0),
            Inbound::Ignored(Ignored::OtherNode {
                what: "challenge",
                ..
            })
        ));
        let cmd = pb::Command {
            command_id: "c1".into(),
            ..Default::default()
        };
        let env = coordinator().sign_message(types::COMMAND, &cmd);
        assert_eq!(s.handle(&env, t0), Inbound::Command(Box::new(cmd)));
        let env = coordinator().sign_message(types::HEARTBEAT, &pb::Heartbeat::default());
        assert_eq!(
            s.handle(&env, t0),
            Inbound::Ignored(Ignored::Unexpected {
                payload_type: types::HEARTBEAT.into()
            })
        );
    }

    #[test]
    fn the_spool_is_watched_only_when_caught_up_or_unanchored() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert!(!s.wants_spool_change(true, 5), "records 0..5 still to read");
        s.window().caught_up_to(5);
        assert!(s.wants_spool_change(true, 5));
        assert!(!s.wants_spool_change(true, 6));
        assert!(s.wants_spool_change(false, 6));
    }
}
