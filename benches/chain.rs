//! Sign and verify throughput of attestation records, on one core: the
//! agent signing an epoch's record, and a verifier (the coordinator, or
//! `warden verify`) checking a whole chain. Run with
//! `cargo bench --bench chain`; prints numbers, asserts nothing.

use std::time::Instant;

use warden_proto::{
    chain::{self, Chain, Head, Params},
    dsse::Signer,
    pb, types,
};

fn attestation(i: u64, gpus: usize) -> pb::Attestation {
    pb::Attestation {
        lease_id: "l-bench".into(),
        window_start_unix_ms: 1_000_000 + i as i64 * 10_000,
        window_end_unix_ms: 1_000_000 + (i as i64 + 1) * 10_000,
        sampled_ms: 10_000,
        gpus: (0..gpus)
            .map(|g| pb::GpuWindow {
                uuid: format!("GPU-{g:08x}-0000-4000-8000-000000000000"),
                samples: 10,
                util_min: 90,
                util_mean: 95.5,
                util_max: 99,
                memory_used_min_bytes: 40 << 30,
                memory_used_mean_bytes: 41e9,
                memory_used_max_bytes: 42 << 30,
            })
            .collect(),
        holders: (0..gpus)
            .map(|g| pb::HolderSeen {
                pid: 1000 + g as u32,
                exe: "/usr/bin/python3".into(),
                container: "a".repeat(64),
                gpu: format!("GPU-{g:08x}-0000-4000-8000-000000000000"),
                verdict: "lease-container".into(),
            })
            .collect(),
        ..Default::default()
    }
}

fn main() {
    let n: u64 = std::env::var("WARDEN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let node = Signer::from_seed(&[1; 32]);
    let mut head = Head::default();
    let mut records = Vec::with_capacity(n as usize);
    let t = Instant::now();
    for i in 0..n {
        let mut a = attestation(i, 8);
        head.link(&mut a);
        let seq = a.lease_seq;
        let env = node.sign_message(
            types::RECORD,
            &pb::Record {
                node_id: node.key_id().into(),
                seq: i + 1,
                time_unix_ms: 0,
                start_id: "s".into(),
                body: Some(pb::record::Body::Attestation(a)),
            },
        );
        head.advance(seq, &env.payload);
        records.push(env);
    }
    let sign = t.elapsed();
    let bytes: usize = records.iter().map(|r| r.payload.len()).sum::<usize>() / records.len();
    let t1 = 1_000_000;
    let t2 = t1 + n as i64 * 10_000;
    let proof = node.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: node.key_id().into(),
            seq: n + 1,
            time_unix_ms: 0,
            start_id: "s".into(),
            body: Some(pb::record::Body::LeaseProof(chain::proof_for(
                "l-bench", t1, t2, &records,
            ))),
        },
    );
    let key = node.verifying_key();
    let t = Instant::now();
    let report = chain::verify(
        &Chain {
            lease_id: "l-bench",
            node_key: &key,
            records: &records,
            proof: Some(&proof),
            challenges: &[],
            coordinator_key: None,
        },
        &Params::default(),
    );
    let verify = t.elapsed();
    assert!(report.holds(), "{:?}", report.failures);
    println!(
        "chain/sign n={n} (8 GPUs per record, {bytes} B payload): {:.0} records/s on one core",
        n as f64 / sign.as_secs_f64()
    );
    println!(
        "chain/verify n={n} (whole chain + proof): {:.0} records/s on one core",
        n as f64 / verify.as_secs_f64()
    );
}
