//! Sign and verify figures of lease evidence, on one core: the agent
//! signing an epoch's record, and a verifier (the coordinator's judge, or
//! `warden verify`) checking a whole lease: records, countersignatures,
//! challenges, proof and verdict. Run with `cargo bench --bench chain`;
//! prints numbers, asserts nothing but that honest evidence holds.

use std::time::{Duration, Instant};

use warden_proto::{bundle::Trust, vectors::Lease};

/// A lease of `epochs` 10 s windows on `gpus` GPUs with a challenge a minute.
fn lease(epochs: usize, gpus: usize) -> Lease {
    let mut l = Lease::honest(epochs, gpus);
    l.challenges.clear();
    for a in &mut l.attestations {
        a.challenges.clear();
    }
    for e in (3..epochs).step_by(6) {
        l.challenge_in(e, 1_000);
    }
    l
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // The figure of docs/attestation.md: a one-hour lease, 8 GPUs.
    let l = lease(360, 8);
    let t = Instant::now();
    let ev = l.sign();
    let sign = t.elapsed();
    let bundle = ev.bundle();
    let trust = Trust {
        coordinator_key: Some(l.coordinator().verifying_key()),
        ..Default::default()
    };
    let params = warden_proto::chain::Params::default();
    let mut runs = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (report, _) = bundle.verify(&trust, &params);
        runs.push(t.elapsed());
        assert!(report.holds(), "{:?}", report.failures);
    }
    let bytes: usize = ev.records.iter().map(|r| r.payload.len()).sum::<usize>() / ev.records.len();
    println!(
        "chain/verify one-hour lease (360 epochs, 8 GPUs, {bytes} B per record, 360 countersignatures, {} challenges, proof, verdict): median {:.1} ms, min {:.1} ms over {} runs, one core",
        ev.challenges.len(),
        median(runs.clone()).as_secs_f64() * 1e3,
        runs.iter().min().unwrap().as_secs_f64() * 1e3,
        runs.len()
    );
    println!(
        "chain/sign the same lease as node and coordinator (records, receipts, challenges, proof, judged verdict): {:.1} ms",
        sign.as_secs_f64() * 1e3
    );

    let n: usize = std::env::var("WARDEN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let l = lease(n, 8);
    let ev = l.sign();
    let bundle = ev.bundle();
    let t = Instant::now();
    let (report, _) = bundle.verify(&trust_of(&l), &params);
    let verify = t.elapsed();
    assert!(report.holds(), "{:?}", report.failures);
    println!(
        "chain/verify n={n} (8 GPUs per record, whole evidence): {:.0} records/s on one core",
        n as f64 / verify.as_secs_f64()
    );
}

fn trust_of(l: &Lease) -> Trust {
    Trust {
        coordinator_key: Some(l.coordinator().verifying_key()),
        ..Default::default()
    }
}
