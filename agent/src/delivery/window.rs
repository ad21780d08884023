//! The uplink's bookkeeping of records on their way to the coordinator:
//! which are in flight (sent, with the digest of the bytes sent), which wait
//! to be sent again after a retryable refusal, and where the next read from
//! the spool starts. Plain data driven by events and a clock the caller
//! passes in; the uplink task only moves bytes.
//!
//! Refusals never hold delivery up: a record refused for good leaves the
//! window at once (the caller sets it aside), and one refused for now waits
//! outside the window, so new records keep flowing whatever the old ones do.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use warden_proto::pb::RefusalKind;

/// First wait before resending a record refused for now; it doubles per
/// refusal of that record up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// What a receipt means for the record it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReceipt {
    /// The record sent under this seq is stored: drop it from the spool.
    Ack,
    /// The digest differs from the bytes sent: not for this record.
    WrongDigest,
    /// No such record in flight (a late receipt from an earlier stream).
    Unknown,
}

/// What a refusal means for the record it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefusal {
    /// Never accepted as it is: set it aside.
    SetAside,
    /// Send it again at this time.
    RetryAt(Instant),
    /// Not about a record in flight with these bytes.
    Ignored,
}

/// The in-flight window of one stream.
#[derive(Debug, Clone)]
pub struct Window {
    max_in_flight: usize,
    /// seq -> SHA-256 of the payload sent.
    in_flight: BTreeMap<u64, [u8; 32]>,
    /// Records refused for now (or not handed to the stream): when they go again.
    retry: BTreeMap<u64, Instant>,
    /// How often each record was refused for now (its backoff), until it is
    /// receipted, set aside or forgotten.
    refusals: BTreeMap<u64, u32>,
    /// The next seq to read from the spool; every pending record is
    /// (re)sent on a new stream, so it starts at 0.
    cursor: u64,
}

impl Window {
    pub fn new(max_in_flight: usize) -> Window {
        Window {
            max_in_flight,
            in_flight: BTreeMap::new(),
            retry: BTreeMap::new(),
            refusals: BTreeMap::new(),
            cursor: 0,
        }
    }

    /// How many more records may be sent now. Records waiting for a retry
    /// take no room.
    pub fn room(&self) -> usize {
        self.max_in_flight.saturating_sub(self.in_flight.len())
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn retrying(&self) -> usize {
        self.retry.len()
    }

    /// Whether a record read from the spool at the cursor is new to this
    /// stream (not in flight, not waiting for a retry); the cursor moves past it.
    pub fn take_new(&mut self, seq: u64) -> bool {
        self.cursor = self.cursor.max(seq + 1);
        !self.in_flight.contains_key(&seq) && !self.retry.contains_key(&seq)
    }

    /// A record taken by [`Window::take_new`] could not be handed to the
    /// stream: the next read starts at it again.
    pub fn rewind(&mut self, seq: u64) {
        self.cursor = self.cursor.min(seq);
    }

    /// The spool had nothing at or after the cursor below `next_seq`.
    pub fn caught_up_to(&mut self, next_seq: u64) {
        self.cursor = self.cursor.max(next_seq);
    }

    /// A record went out with these payload bytes.
    pub fn sent(&mut self, seq: u64, digest: [u8; 32]) {
        self.retry.remove(&seq);
        self.in_flight.insert(seq, digest);
    }

    /// A record could not be handed to the stream: it waits as if refused
    /// for now (without counting as a refusal).
    pub fn unsent(&mut self, seq: u64, now: Instant) {
        self.in_flight.remove(&seq);
        self.retry.insert(seq, now + RETRY_INITIAL);
    }

    /// A verified receipt arrived.
    pub fn receipt(&mut self, seq: u64, digest: &[u8]) -> OnReceipt {
        match self.in_flight.get(&seq) {
            Some(d) if d.as_slice() == digest => {
                self.in_flight.remove(&seq);
                self.refusals.remove(&seq);
                OnReceipt::Ack
            }
            Some(_) => OnReceipt::WrongDigest,
            None => OnReceipt::Unknown,
        }
    }

    /// A verified refusal arrived. Only a refusal of the bytes in flight
    /// counts: one meant for other bytes under the same seq (an earlier
    /// stream's, before a renumbering) must not set this record aside.
    pub fn refusal(
        &mut self,
        seq: u64,
        digest: &[u8],
        kind: RefusalKind,
        now: Instant,
    ) -> OnRefusal {
        match self.in_flight.get(&seq) {
            Some(d) if d.as_slice() == digest => {}
            _ => return OnRefusal::Ignored,
        }
        self.in_flight.remove(&seq);
        if kind.is_final() {
            self.refusals.remove(&seq);
            return OnRefusal::SetAside;
        }
        let refusals = self.refusals.entry(seq).or_insert(0);
        *refusals += 1;
        let wait = RETRY_INITIAL
            .saturating_mul(1u32.checked_shl(*refusals - 1).unwrap_or(u32::MAX))
            .min(RETRY_MAX);
        let at = now + wait;
        self.retry.insert(seq, at);
        OnRefusal::RetryAt(at)
    }

    /// Records whose wait is over, oldest seq first, as many as there is
    /// room for; they stay listed until [`Window::sent`] (or are dropped by
    /// [`Window::forget`] when the spool no longer has them).
    pub fn due(&self, now: Instant) -> Vec<u64> {
        self.retry
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| *s)
            .take(self.room())
            .collect()
    }

    /// A record waiting for a retry is no longer in the spool.
    pub fn forget(&mut self, seq: u64) {
        self.retry.remove(&seq);
        self.refusals.remove(&seq);
    }

    /// When the next retry falls due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry.values().min().copied()
    }

    /// When the uplink should wake to resend: the next retry, but only while
    /// there is room to send it (otherwise a receipt or refusal, which makes
    /// room, wakes it; waking for a due retry without room would spin).
    pub fn wake_for_retry(&self) -> Option<Instant> {
        self.next_retry().filter(|_| self.room() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seq: u64) -> [u8; 32] {
        let mut x = [0u8; 32];
        x[..8].copy_from_slice(&seq.to_le_bytes());
        x
    }

    /// Sends what the window has room for from a spool holding `1..next`.
    fn fill(w: &mut Window, spool: &[u64]) -> Vec<u64> {
        let mut sent = Vec::new();
        let (room, cursor) = (w.room(), w.cursor());
        for &seq in spool.iter().filter(|s| **s >= cursor).take(room) {
            if w.take_new(seq) {
                w.sent(seq, d(seq));
                sent.push(seq);
            }
        }
        sent
    }

    #[test]
    fn final_refusals_never_stall_new_records() {
        let t0 = Instant::now();
        let mut w = Window::new(8);
        let mut spool: Vec<u64> = (1..=1000).collect();
        let mut delivered = Vec::new();
        let mut set_aside = Vec::new();
        // The first 600 records are refused for good (an old key's), the rest stored.
        for _ in 0..1000 {
            let sent = fill(&mut w, &spool);
            if sent.is_empty() {
                break;
            }
            for seq in sent {
                if seq <= 600 {
                    assert_eq!(
                        w.refusal(seq, &d(seq), RefusalKind::WrongKey, t0),
                        OnRefusal::SetAside
                    );
                    set_aside.push(seq);
                } else {
                    assert_eq!(w.receipt(seq, &d(seq)), OnReceipt::Ack);
                    delivered.push(seq);
                }
                spool.retain(|s| *s != seq);
            }
        }
        assert_eq!(set_aside.len(), 600);
        assert_eq!(delivered, (601..=1000).collect::<Vec<_>>());
        assert_eq!((w.in_flight(), w.retrying()), (0, 0));
    }

    #[test]
    fn retryable_refusals_wait_outside_the_window_with_backoff() {
        let t0 = Instant::now();
        let mut w = Window::new(4);
        let spool: Vec<u64> = (1..=100).collect();
        assert_eq!(fill(&mut w, &spool), vec![1, 2, 3, 4]);
        for seq in 1..=4 {
            let r = w.refusal(seq, &d(seq), RefusalKind::RetryLater, t0);
            assert_eq!(r, OnRefusal::RetryAt(t0 + RETRY_INITIAL));
        }
        // Their waits take no room: the next four go out at once.
        assert_eq!(fill(&mut w, &spool), vec![5, 6, 7, 8]);
        assert!(w.due(t0).is_empty());
        assert_eq!(w.next_retry(), Some(t0 + RETRY_INITIAL));
        for seq in 5..=8 {
            w.receipt(seq, &d(seq));
        }
        // Due, and resent as room allows.
        let t1 = t0 + RETRY_INITIAL;
        assert_eq!(w.due(t1), vec![1, 2, 3, 4]);
        w.sent(1, d(1));
        // Refused again: the wait doubles, then caps.
        assert_eq!(
            w.refusal(1, &d(1), RefusalKind::Unspecified, t1),
            OnRefusal::RetryAt(t1 + 2 * RETRY_INITIAL)
        );
        let mut t = t1;
        let mut waits = Vec::new();
        for _ in 0..20 {
            w.sent(1, d(1));
            match w.refusal(1, &d(1), RefusalKind::RetryLater, t) {
                OnRefusal::RetryAt(at) => {
                    waits.push(at - t);
                    t = at;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits[0], 4 * RETRY_INITIAL);
        assert!(waits.iter().all(|w| *w <= RETRY_MAX));
        assert_eq!(waits.last(), Some(&RETRY_MAX));
        // A receipt ends the backoff: a later refusal starts from the first wait again.
        w.sent(1, d(1));
        assert_eq!(w.receipt(1, &d(1)), OnReceipt::Ack);
        w.sent(1, d(1));
        assert_eq!(
            w.refusal(1, &d(1), RefusalKind::RetryLater, t),
            OnRefusal::RetryAt(t + RETRY_INITIAL)
        );
        // A retry the spool no longer has is forgotten.
        w.forget(2);
        assert!(!w.due(t + RETRY_MAX).contains(&2));
    }

    #[test]
    fn a_due_retry_without_room_does_not_wake_the_uplink() {
        let t0 = Instant::now();
        let mut w = Window::new(1);
        w.sent(1, d(1));
        w.refusal(1, &d(1), RefusalKind::RetryLater, t0);
        assert_eq!(w.wake_for_retry(), Some(t0 + RETRY_INITIAL));
        w.sent(2, d(2)); // the window is full again
        assert!(
            w.due(t0 + RETRY_INITIAL).is_empty(),
            "no room, nothing due to send"
        );
        assert_eq!(w.wake_for_retry(), None);
        w.receipt(2, &d(2));
        assert_eq!(w.wake_for_retry(), Some(t0 + RETRY_INITIAL));
    }

    #[test]
    fn receipts_and_refusals_must_name_the_bytes_sent() {
        let t0 = Instant::now();
        let mut w = Window::new(4);
        w.take_new(7);
        w.sent(7, d(7));
        assert_eq!(w.receipt(7, &d(8)), OnReceipt::WrongDigest);
        assert_eq!(
            w.refusal(7, &d(8), RefusalKind::Conflict, t0),
            OnRefusal::Ignored,
            "a refusal of other bytes under seq 7 must not set this record aside"
        );
        assert_eq!(
            w.refusal(9, &d(9), RefusalKind::Conflict, t0),
            OnRefusal::Ignored
        );
        assert_eq!(w.receipt(7, &d(7)), OnReceipt::Ack);
        assert_eq!(w.receipt(7, &d(7)), OnReceipt::Unknown);
    }

    #[test]
    fn the_cursor_skips_what_is_already_on_its_way() {
        let t0 = Instant::now();
        let mut w = Window::new(2);
        assert!(w.take_new(1));
        w.sent(1, d(1));
        w.unsent(1, t0);
        assert!(!w.take_new(1), "waiting for a retry, not new");
        assert_eq!(w.cursor(), 2);
        assert!(w.take_new(2));
        w.rewind(2);
        assert_eq!(w.cursor(), 2);
        w.caught_up_to(10);
        assert_eq!(w.cursor(), 10);
        assert_eq!(w.due(t0 + RETRY_INITIAL), vec![1]);
    }
}
