//! Which coordinator address the uplink's next stream goes to, without
//! I/O. `coordinator.address` may list replicas of one coordinator (one
//! signing key, one CA). The uplink stays on an address while its stream
//! lives; when the stream dies or a try fails it moves to the next address
//! at once, and waits (the exponential backoff) only after a whole round of
//! addresses failed. It never goes back to the first address by itself: a
//! stream that works is kept wherever it is.

use std::time::Duration;

/// How one try at an address ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A stream registered there and later ended, after being up `lived`.
    Dropped { lived: Duration },
    /// No stream: unreachable, refused, no answer, or a coordinator that
    /// signs with another key than the pinned one (nothing was sent to it).
    Failed,
}

/// What the uplink does after a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try the address at this index at once.
    Now(usize),
    /// Every address failed this round: wait the backoff of reconnect
    /// attempt `attempt` (0-based), then try the address at `index`.
    After { index: usize, attempt: u32 },
}

/// The address after `current` among `n`, round and round.
pub fn next_address(current: usize, n: usize) -> usize {
    (current + 1) % n.max(1)
}

/// The uplink's place in the list of addresses.
#[derive(Debug, Clone)]
pub struct Rotation {
    n: usize,
    current: usize,
    /// Tries that failed since a stream last stayed up, or since the last wait.
    failed: usize,
    /// Rounds that failed since a stream last stayed up: the backoff's attempt.
    rounds: u32,
    /// A stream up at least this long counts as having worked: its end
    /// starts a fresh round and a fresh backoff. A shorter one counts as a
    /// failed try, so coordinators that accept and drop at once are still
    /// tried with backoff, not in a tight loop.
    settled: Duration,
}

impl Rotation {
    /// At the first of `n` addresses (at least one).
    pub fn new(n: usize, settled: Duration) -> Rotation {
        Rotation {
            n: n.max(1),
            current: 0,
            failed: 0,
            rounds: 0,
            settled,
        }
    }

    /// The address to try now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The try at the current address ended so: where to go, and whether
    /// to wait first.
    pub fn ended(&mut self, outcome: Outcome) -> Next {
        match outcome {
            Outcome::Dropped { lived } if lived >= self.settled => {
                self.failed = 1;
                self.rounds = 0;
            }
            _ => self.failed += 1,
        }
        self.current = next_address(self.current, self.n);
        if self.failed < self.n {
            return Next::Now(self.current);
        }
        self.failed = 0;
        let attempt = self.rounds;
        self.rounds = self.rounds.saturating_add(1);
        Next::After {
            index: self.current,
            attempt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLED: Duration = Duration::from_secs(30);
    const LONG: Outcome = Outcome::Dropped {
        lived: Duration::from_secs(600),
    };
    const SHORT: Outcome = Outcome::Dropped {
        lived: Duration::from_secs(1),
    };

    #[test]
    fn next_address_goes_round() {
        assert_eq!(next_address(0, 3), 1);
        assert_eq!(next_address(2, 3), 0);
        assert_eq!(next_address(0, 1), 0);
        assert_eq!(next_address(0, 0), 0);
    }

    #[test]
    fn one_address_waits_after_every_end_as_before() {
        let mut r = Rotation::new(1, SETTLED);
        assert_eq!(
            r.ended(Outcome::Failed),
            Next::After {
                index: 0,
                attempt: 0
            }
        );
        assert_eq!(
            r.ended(Outcome::Failed),
            Next::After {
                index: 0,
                attempt: 1
            }
        );
        assert_eq!(
            r.ended(SHORT),
            Next::After {
                index: 0,
                attempt: 2
            }
        );
        // A connection that lived a while earns a fresh backoff.
        assert_eq!(
            r.ended(LONG),
            Next::After {
                index: 0,
                attempt: 0
            }
        );
    }

    #[test]
    fn a_dead_stream_moves_to_the_next_address_at_once_and_stays_there() {
        let mut r = Rotation::new(3, SETTLED);
        assert_eq!(r.current(), 0);
        // The stream on the first address dies: the second, at once.
        assert_eq!(r.ended(LONG), Next::Now(1));
        // Its stream works for a long time, then dies: the third, not the first.
        assert_eq!(r.ended(LONG), Next::Now(2));
        assert_eq!(r.ended(LONG), Next::Now(0));
        assert_eq!(r.current(), 0);
    }

    #[test]
    fn the_backoff_comes_only_after_a_whole_round_failed() {
        let mut r = Rotation::new(3, SETTLED);
        assert_eq!(r.ended(Outcome::Failed), Next::Now(1));
        assert_eq!(r.ended(Outcome::Failed), Next::Now(2));
        assert_eq!(
            r.ended(Outcome::Failed),
            Next::After {
                index: 0,
                attempt: 0
            }
        );
        // The next round, with a longer wait after it.
        assert_eq!(r.ended(Outcome::Failed), Next::Now(1));
        assert_eq!(r.ended(Outcome::Failed), Next::Now(2));
        assert_eq!(
            r.ended(Outcome::Failed),
            Next::After {
                index: 0,
                attempt: 1
            }
        );
        // The first address works again for a while: the waits start over,
        // and its end counts as its try in a fresh round.
        assert_eq!(r.ended(LONG), Next::Now(1));
        assert_eq!(r.ended(Outcome::Failed), Next::Now(2));
        assert_eq!(
            r.ended(Outcome::Failed),
            Next::After {
                index: 0,
                attempt: 0
            }
        );
    }

    #[test]
    fn a_coordinator_with_another_key_is_skipped_for_the_next() {
        // The first answers but signs with another key (a failed try,
        // nothing sent); the second is good and is kept.
        let mut r = Rotation::new(2, SETTLED);
        assert_eq!(r.ended(Outcome::Failed), Next::Now(1));
        assert_eq!(r.current(), 1);
        // Its stream dies after a long life: the first is tried again at
        // once (it may have been fixed), then the second after a wait.
        assert_eq!(r.ended(LONG), Next::Now(0));
        assert_eq!(
            r.ended(Outcome::Failed),
            Next::After {
                index: 1,
                attempt: 0
            }
        );
    }

    #[test]
    fn streams_that_drop_at_once_are_retried_with_backoff_not_in_a_loop() {
        let mut r = Rotation::new(2, SETTLED);
        let mut waits = Vec::new();
        for _ in 0..8 {
            if let Next::After { attempt, .. } = r.ended(SHORT) {
                waits.push(attempt);
            }
        }
        assert_eq!(waits, [0, 1, 2, 3], "one wait per round, growing");
    }
}
