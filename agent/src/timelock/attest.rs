//! One epoch of a lease, folded into an attestation: per leased GPU the
//! sample count and min/mean/max of utilization and memory, the holders
//! seen with their verdicts, the enforcement done, the challenge nonces
//! received, and how much of the window was covered by samples.
//!
//! Pure: the attestor task feeds it each cycle and closes it every epoch;
//! linking (`chain::Head`) and signing happen around it.

use std::collections::BTreeMap;

use warden_proto::{chain::Head, pb, states::GuardMode};

use super::guard::PreventedLog;

#[derive(Debug, Clone, Default, PartialEq)]
struct GpuStats {
    samples: u32,
    util_min: u32,
    util_max: u32,
    util_sum: u64,
    mem_min: u64,
    mem_max: u64,
    mem_sum: u128,
}

impl GpuStats {
    fn add(&mut self, s: &pb::GpuSample) {
        if self.samples == 0 {
            self.util_min = s.utilization_gpu;
            self.mem_min = s.memory_used_bytes;
        }
        self.samples += 1;
        self.util_min = self.util_min.min(s.utilization_gpu);
        self.util_max = self.util_max.max(s.utilization_gpu);
        self.util_sum += u64::from(s.utilization_gpu);
        self.mem_min = self.mem_min.min(s.memory_used_bytes);
        self.mem_max = self.mem_max.max(s.memory_used_bytes);
        self.mem_sum += u128::from(s.memory_used_bytes);
    }

    fn window(&self, uuid: &str) -> pb::GpuWindow {
        let n = f64::from(self.samples.max(1));
        pb::GpuWindow {
            uuid: uuid.to_owned(),
            samples: self.samples,
            util_min: self.util_min,
            util_mean: self.util_sum as f64 / n,
            util_max: self.util_max,
            memory_used_min_bytes: self.mem_min,
            memory_used_mean_bytes: self.mem_sum as f64 / n,
            memory_used_max_bytes: self.mem_max,
        }
    }
}

/// The open epoch of one lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Epoch {
    lease_id: String,
    gpus: Vec<String>,
    start_ms: i64,
    cycle_ms: i64,
    stats: BTreeMap<String, GpuStats>,
    covered_cycles: i64,
    holders: Vec<pb::HolderSeen>,
    enforcement: Vec<pb::EnforcementEvent>,
    challenges: Vec<Vec<u8>>,
    blind: Vec<String>,
    /// Why some cycle of the window was not guarded at the open (the first
    /// reason); None: every one was.
    unguarded: Option<String>,
    prevented: PreventedLog,
}

impl Epoch {
    /// Opens an epoch at `start_ms` for a lease holding `gpus`, sampled
    /// every `cycle_ms`.
    pub fn new(lease_id: &str, gpus: &[String], start_ms: i64, cycle_ms: i64) -> Epoch {
        Epoch {
            lease_id: lease_id.to_owned(),
            gpus: gpus.to_vec(),
            start_ms,
            cycle_ms: cycle_ms.max(1),
            stats: gpus
                .iter()
                .map(|g| (g.clone(), GpuStats::default()))
                .collect(),
            covered_cycles: 0,
            holders: Vec::new(),
            enforcement: Vec::new(),
            challenges: Vec::new(),
            blind: Vec::new(),
            unguarded: None,
            prevented: PreventedLog::default(),
        }
    }

    pub fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// One sampling cycle. It covers its interval only if every leased GPU
    /// answered (a lease without GPUs is covered by the cycle itself); the
    /// readings of the GPUs that did answer count either way.
    pub fn add_cycle(&mut self, samples: &[pb::GpuSample]) {
        let mut answered = 0;
        for s in samples.iter().filter(|s| s.error.is_empty()) {
            if let Some(st) = self.stats.get_mut(&s.uuid) {
                st.add(s);
                answered += 1;
            }
        }
        if answered == self.gpus.len() {
            self.covered_cycles += 1;
        }
    }

    /// A holder of a leased GPU this epoch; the same (pid, gpu, verdict) once.
    pub fn add_holder(&mut self, h: pb::HolderSeen) {
        if !self.holders.iter().any(|x| {
            x.pid == h.pid && x.gpu == h.gpu && x.verdict == h.verdict && x.container == h.container
        }) {
            self.holders.push(h);
        }
    }

    pub fn add_enforcement(&mut self, e: pb::EnforcementEvent) {
        self.enforcement.push(e);
    }

    pub fn add_challenge(&mut self, nonce: Vec<u8>) {
        if !self.challenges.contains(&nonce) {
            self.challenges.push(nonce);
        }
    }

    /// Something the agent could not see this epoch (a failed scan, a
    /// Docker call that failed): the window is attested as blind, never as
    /// clean, and counts as not covered. The same reason once.
    pub fn add_blind(&mut self, reason: String) {
        if !self.blind.contains(&reason) {
            self.blind.push(reason);
        }
    }

    /// A cycle not guarded at the open, for `why`: the window says "scan"
    /// (the first reason is kept).
    pub fn add_unguarded(&mut self, why: String) {
        self.unguarded.get_or_insert(why);
    }

    /// Opens denied during the window.
    pub fn add_prevented(&mut self, log: PreventedLog) {
        self.prevented.merge(log);
    }

    /// Closes the window `[start, end_ms)` as the link after `head`.
    pub fn finish(self, end_ms: i64, head: &Head) -> pb::Attestation {
        let window = (end_ms - self.start_ms).max(0);
        let mut a = pb::Attestation {
            lease_id: self.lease_id,
            window_start_unix_ms: self.start_ms,
            window_end_unix_ms: end_ms,
            sampled_ms: (self.covered_cycles * self.cycle_ms).min(window),
            gpus: self.stats.iter().map(|(uuid, s)| s.window(uuid)).collect(),
            holders: self.holders,
            enforcement: self.enforcement,
            challenges: self.challenges,
            blind: self.blind,
            guard: match self.unguarded {
                None => GuardMode::Open,
                Some(_) => GuardMode::Scan,
            }
            .as_str()
            .into(),
            unguarded: self.unguarded.unwrap_or_default(),
            prevented: self.prevented.entries,
            prevented_more: self.prevented.more,
            ..Default::default()
        };
        head.link(&mut a);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(uuid: &str, util: u32, mem: u64) -> pb::GpuSample {
        pb::GpuSample {
            uuid: uuid.into(),
            utilization_gpu: util,
            memory_used_bytes: mem,
            ..Default::default()
        }
    }

    #[test]
    fn folds_samples_into_min_mean_max_per_gpu() {
        let gpus = vec!["GPU-a".to_owned(), "GPU-b".to_owned()];
        let mut e = Epoch::new("l1", &gpus, 1_000, 1_000);
        e.add_cycle(&[
            sample("GPU-a", 50, 100),
            sample("GPU-b", 10, 5),
            sample("GPU-x", 99, 9),
        ]);
        e.add_cycle(&[sample("GPU-a", 100, 300), sample("GPU-b", 30, 15)]);
        let a = e.finish(11_000, &Head::default());
        assert_eq!(a.gpus.len(), 2, "only leased GPUs");
        let ga = &a.gpus[0];
        assert_eq!(
            (ga.uuid.as_str(), ga.samples, ga.util_min, ga.util_max),
            ("GPU-a", 2, 50, 100)
        );
        assert_eq!(ga.util_mean, 75.0);
        assert_eq!(
            (ga.memory_used_min_bytes, ga.memory_used_max_bytes),
            (100, 300)
        );
        assert_eq!(ga.memory_used_mean_bytes, 200.0);
        assert_eq!(a.sampled_ms, 2_000);
        assert_eq!(
            (a.window_start_unix_ms, a.window_end_unix_ms),
            (1_000, 11_000)
        );
        assert_eq!((a.lease_seq, a.prev_sha256.clone()), (1, vec![0; 32]));
    }

    #[test]
    fn a_cycle_with_a_lost_gpu_does_not_count_as_covered() {
        let gpus = vec!["GPU-a".to_owned(), "GPU-b".to_owned()];
        let mut e = Epoch::new("l1", &gpus, 0, 1_000);
        let mut lost = sample("GPU-b", 0, 0);
        lost.error = "GPU is lost".into();
        lost.lost = true;
        e.add_cycle(&[sample("GPU-a", 1, 1), lost]);
        e.add_cycle(&[sample("GPU-a", 1, 1), sample("GPU-b", 1, 1)]);
        let a = e.finish(10_000, &Head::default());
        assert_eq!(a.sampled_ms, 1_000);
        assert_eq!(a.gpus[0].samples, 2);
        assert_eq!(a.gpus[1].samples, 1);
    }

    #[test]
    fn coverage_never_exceeds_the_window_and_a_cpu_lease_is_covered_by_cycles() {
        let mut e = Epoch::new("l1", &[], 0, 1_000);
        for _ in 0..15 {
            e.add_cycle(&[]);
        }
        assert_eq!(e.finish(10_000, &Head::default()).sampled_ms, 10_000);
    }

    #[test]
    fn a_blind_epoch_says_so_and_counts_for_nothing() {
        let mut e = Epoch::new("l1", &["GPU-a".to_owned()], 0, 1_000);
        for _ in 0..10 {
            e.add_cycle(&[sample("GPU-a", 1, 1)]);
        }
        e.add_blind("the /proc scan failed".into());
        e.add_blind("the /proc scan failed".into());
        let a = e.finish(10_000, &Head::default());
        assert_eq!(a.blind, ["the /proc scan failed"]);
        // What the samples covered is still stated; the verifier counts none of it.
        assert_eq!(a.sampled_ms, 10_000);
        assert_eq!(warden_proto::chain::window_sampled(&a), 0);
    }

    #[test]
    fn holders_and_challenges_are_deduplicated_and_the_head_links() {
        let mut e = Epoch::new("l1", &["GPU-a".to_owned()], 0, 1_000);
        let h = pb::HolderSeen {
            pid: 7,
            gpu: "GPU-a".into(),
            verdict: "foreign".into(),
            ..Default::default()
        };
        e.add_holder(h.clone());
        e.add_holder(h);
        e.add_challenge(b"n".to_vec());
        e.add_challenge(b"n".to_vec());
        e.add_enforcement(pb::EnforcementEvent {
            pid: 7,
            action: "kill".into(),
            ..Default::default()
        });
        let head = Head {
            lease_seq: 4,
            sha256: [9; 32],
        };
        let a = e.finish(10_000, &head);
        assert_eq!(
            (a.holders.len(), a.challenges.len(), a.enforcement.len()),
            (1, 1, 1)
        );
        assert_eq!((a.lease_seq, a.prev_sha256), (5, vec![9; 32]));
    }
}
