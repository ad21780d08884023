//! Token buckets, fed the time by their caller (tests pass a simulated
//! clock): the enrollment rate and each node's throttle; and a gate that
//! keeps a recurring log line to one per period.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Holds up to `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate_per_second: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate: rate_per_second,
            burst,
            level: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.at {
            let dt = now.duration_since(self.at).as_secs_f64();
            self.level = (self.level + dt * self.rate).min(self.burst);
            self.at = now;
        }
    }

    /// How long until `n` tokens are there (zero: now).
    pub fn wait_for(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        if self.level >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.level) / self.rate)
        }
    }

    /// Takes `n` tokens if they are there; else how long until they are.
    pub fn try_take(&mut self, now: Instant, n: f64) -> Result<(), Duration> {
        match self.wait_for(now, n) {
            d if d.is_zero() => {
                self.level -= n;
                Ok(())
            }
            d => Err(d),
        }
    }

    /// Takes `n` tokens, into debt if need be, and says how long until the
    /// debt is paid: the pause that keeps the long-run rate.
    pub fn charge(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        self.level -= n;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate)
        }
    }

    /// Whether it has refilled completely (nothing to remember).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.burst
    }
}

/// Says a recurring event at most once per `every`, with how many happened
/// since it was last said (the first one at once), so a flood cannot flood
/// the journal.
#[derive(Debug)]
pub struct LogGate {
    every: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl LogGate {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Counts one event; Some(count) when a line is due now.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        match self.last {
            Some(t) if now.duration_since(t) < self.every => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.pending))
            }
        }
    }
}

/// A node may send this many seconds' worth of its rate at once (a replay
/// after an outage goes at full speed until then).
pub const BURST_SECONDS: f64 = 5.0;

/// Each node's rate of envelopes and payload bytes, shared by all its
/// streams (a second stream does not double it).
#[derive(Debug, Clone)]
pub struct NodeThrottle {
    nodes: Arc<Mutex<HashMap<String, [Bucket; 2]>>>,
    envelopes_per_second: f64,
    bytes_per_second: f64,
}

impl NodeThrottle {
    pub fn new(envelopes_per_second: u64, bytes_per_second: u64) -> Self {
        Self {
            nodes: Arc::default(),
            envelopes_per_second: envelopes_per_second as f64,
            bytes_per_second: bytes_per_second as f64,
        }
    }

    /// Charges `node` for what it just sent; how long its stream should
    /// pause before reading more.
    pub fn charge(&self, node: &str, envelopes: u64, bytes: u64, now: Instant) -> Duration {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let [e, b] = nodes.entry(node.to_owned()).or_insert_with(|| {
            [
                Bucket::new(
                    self.envelopes_per_second,
                    self.envelopes_per_second * BURST_SECONDS,
                    now,
                ),
                Bucket::new(
                    self.bytes_per_second,
                    self.bytes_per_second * BURST_SECONDS,
                    now,
                ),
            ]
        });
        e.charge(now, envelopes as f64)
            .max(b.charge(now, bytes as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, 3.0, t0);
        for _ in 0..3 {
            b.try_take(t0, 1.0).unwrap();
        }
        assert_eq!(b.try_take(t0, 1.0), Err(Duration::from_millis(500)));
        b.try_take(t0 + Duration::from_millis(500), 1.0).unwrap();
        // An hour idle refills only to the burst.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.is_full(later));
        for _ in 0..3 {
            b.try_take(later, 1.0).unwrap();
        }
        assert!(b.try_take(later, 1.0).is_err());
    }

    #[test]
    fn charging_into_debt_gives_the_pause_that_keeps_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, 500.0, t0);
        assert_eq!(b.charge(t0, 400.0), Duration::ZERO);
        // 300 more: 200 in debt, paid in 2 s at 100/s.
        assert_eq!(b.charge(t0, 300.0), Duration::from_secs(2));
        // Simulated: a sender that always waits as told gets 100/s over an hour.
        let (mut now, mut sent) = (t0 + Duration::from_secs(2), 0.0);
        let end = now + Duration::from_secs(3600);
        while now < end {
            now += b.charge(now, 50.0);
            sent += 50.0;
        }
        let rate = sent / 3600.0;
        assert!((99.0..=101.5).contains(&rate), "{rate}");
    }

    #[test]
    fn log_gate_says_the_first_at_once_then_a_count_per_period() {
        let t0 = Instant::now();
        let mut g = LogGate::new(Duration::from_secs(10));
        assert_eq!(g.hit(t0), Some(1));
        for i in 1..100 {
            assert_eq!(g.hit(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(g.hit(t0 + Duration::from_secs(10)), Some(100));
        assert_eq!(g.hit(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn a_node_is_throttled_on_its_own_across_streams() {
        let t0 = Instant::now();
        let t = NodeThrottle::new(10, 1000);
        // 50 envelopes is its 5 s burst; 20 more is 2 s of debt.
        assert_eq!(t.charge("a", 50, 100, t0), Duration::ZERO);
        assert_eq!(t.charge("a", 20, 100, t0), Duration::from_secs(2));
        // Another stream of the same node shares the debt.
        let t2 = t.clone();
        assert_eq!(t2.charge("a", 10, 0, t0), Duration::from_secs(3));
        // Another node is not touched.
        assert_eq!(t.charge("b", 50, 5000, t0), Duration::ZERO);
        // Bytes count too: 5000 burst, 2000 over is 2 s at 1000/s.
        assert_eq!(t.charge("b", 0, 2000, t0), Duration::from_secs(2));
    }
}
