//! `warden verify` on lease bundles: an honest bundle holds (exit 0), and a
//! bundle tampered each way the spec lists is rejected (exit 1) naming the
//! rule it breaks.

use std::{path::Path, process::Command};

use warden_proto::{
    bundle::Bundle,
    chain::{self, Head},
    dsse::Signer,
    pb::{self, Envelope},
    types,
};

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");
const LEASE: &str = "l-0123456789abcdef";
const T1: i64 = 1_700_000_000_000;
const EPOCH: i64 = 10_000;

struct Evidence {
    node: Signer,
    coord: Signer,
    attestations: Vec<pb::Attestation>,
    start_ids: Vec<String>,
    challenges: Vec<Envelope>,
}

/// An honest lease of `n` epochs with one challenge answered in epoch 2, and
/// a restart of the agent before epoch 4 (a new start id, the chain goes on).
fn evidence(n: usize) -> Evidence {
    let node = Signer::from_seed(&[21; 32]);
    let coord = Signer::from_seed(&[42; 32]);
    let attestations = (0..n)
        .map(|i| pb::Attestation {
            lease_id: LEASE.into(),
            window_start_unix_ms: T1 + i as i64 * EPOCH,
            window_end_unix_ms: T1 + (i as i64 + 1) * EPOCH,
            sampled_ms: EPOCH - 100,
            gpus: vec![pb::GpuWindow {
                uuid: "GPU-a".into(),
                samples: 10,
                util_min: 90,
                util_mean: 95.0,
                util_max: 99,
                ..Default::default()
            }],
            challenges: if i == 1 {
                vec![b"nonce-42".to_vec()]
            } else {
                vec![]
            },
            ..Default::default()
        })
        .collect();
    let challenge = coord.sign_message(
        types::CHALLENGE,
        &pb::Challenge {
            node_id: node.key_id().into(),
            lease_id: LEASE.into(),
            nonce: b"nonce-42".to_vec(),
            issued_unix_ms: T1 + 12_000,
            deadline_unix_ms: T1 + 2 * EPOCH + 5_000,
        },
    );
    Evidence {
        node,
        coord,
        attestations,
        start_ids: (0..n)
            .map(|i| if i < 3 { "start-1" } else { "start-2" }.to_owned())
            .collect(),
        challenges: vec![challenge],
    }
}

impl Evidence {
    /// Links and signs the attestations as the agent does, then the proof.
    fn bundle(&self) -> Bundle {
        let mut head = Head::default();
        let records: Vec<Envelope> = self
            .attestations
            .iter()
            .zip(&self.start_ids)
            .enumerate()
            .map(|(i, (a, start_id))| {
                let mut a = a.clone();
                head.link(&mut a);
                let seq = a.lease_seq;
                let env = self.record(i as u64 * 4 + 7, start_id, pb::record::Body::Attestation(a));
                head.advance(seq, &env.payload);
                env
            })
            .collect();
        let t2 = T1 + self.attestations.len() as i64 * EPOCH;
        let proof = chain::proof_for(LEASE, T1, t2, &records);
        Bundle {
            lease_id: LEASE.into(),
            node_key: self.node.verifying_key(),
            coordinator_key: Some(self.coord.verifying_key()),
            proof: Some(self.record(9999, "start-2", pb::record::Body::LeaseProof(proof))),
            records,
            challenges: self.challenges.clone(),
            verdict: None,
        }
    }

    fn record(&self, seq: u64, start_id: &str, body: pb::record::Body) -> Envelope {
        self.node.sign_message(
            types::RECORD,
            &pb::Record {
                node_id: self.node.key_id().into(),
                seq,
                time_unix_ms: T1,
                start_id: start_id.into(),
                body: Some(body),
            },
        )
    }
}

fn run(dir: &Path, bundle: &serde_json::Value) -> (bool, String, String) {
    let path = dir.join("bundle.json");
    std::fs::write(&path, serde_json::to_vec_pretty(bundle).unwrap()).unwrap();
    let out = Command::new(WARDEN)
        .args(["verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rejected(dir: &Path, bundle: &serde_json::Value, rule: &str) {
    let (ok, _, err) = run(dir, bundle);
    assert!(!ok, "a bundle breaking {rule} was accepted");
    assert!(
        err.lines().any(|l| l.starts_with(&format!("{rule}: "))),
        "expected {rule}:\n{err}"
    );
}

#[test]
fn an_honest_bundle_holds_with_its_restart_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let b = evidence(6).bundle().to_json();
    let (ok, out, err) = run(tmp.path(), &b);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("HOLDS"));
    assert!(out.contains("6 records, lease seq 1..6"), "{out}");
    assert!(out.contains("1 restarts: start-1, start-2"), "{out}");
    assert!(out.contains("challenges  1 answered"));
}

#[test]
fn every_kind_of_tampering_is_rejected_with_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ev = evidence(6);
    let honest = ev.bundle().to_json();

    // A flipped byte in a record: its signature fails.
    let mut b = honest.clone();
    let p = b["records"][2]["payload"].as_str().unwrap().to_owned();
    let mut bytes = base64_decode(&p);
    bytes[3] ^= 0x10;
    b["records"][2]["payload"] = base64_encode(&bytes).into();
    rejected(dir, &b, "bad-signature");

    // The bundle claims another node key.
    let mut b = honest.clone();
    b["node_public_key"] = Signer::from_seed(&[5; 32])
        .verifying_key()
        .to_base64()
        .into();
    rejected(dir, &b, "wrong-key");

    // A record removed, a record repeated.
    let mut b = honest.clone();
    b["records"].as_array_mut().unwrap().remove(3);
    rejected(dir, &b, "seq-gap");
    let mut b = honest.clone();
    let dup = b["records"][1].clone();
    b["records"].as_array_mut().unwrap().insert(2, dup);
    rejected(dir, &b, "seq-repeat");

    // The agent's own key, misused: re-signed records that break the rules.
    let forged = |f: &dyn Fn(&mut Evidence)| {
        let mut e = evidence(6);
        f(&mut e);
        e.bundle().to_json()
    };
    // A record swapped for another with the right seq but different content:
    // the next link no longer matches.
    let mut b = honest.clone();
    let other = forged(&|e| e.attestations[2].sampled_ms = 1);
    b["records"][2] = other["records"][2].clone();
    rejected(dir, &b, "broken-link");
    rejected(
        dir,
        &forged(&|e| e.attestations[3].window_start_unix_ms -= 3_000),
        "window-overlap",
    );
    rejected(
        dir,
        &forged(&|e| e.attestations[3].window_end_unix_ms = e.attestations[3].window_start_unix_ms),
        "window-backward",
    );
    rejected(
        dir,
        &forged(&|e| {
            let last = e.attestations.len() - 1;
            e.attestations[last].window_end_unix_ms += 3_600_000;
        }),
        "window-outside-lease",
    );
    // Epochs far in the future of this machine's clock.
    rejected(
        dir,
        &forged(&|e| {
            for a in &mut e.attestations {
                a.window_start_unix_ms += 10 * 365 * 86_400_000;
                a.window_end_unix_ms += 10 * 365 * 86_400_000;
            }
        }),
        "window-future",
    );
    rejected(
        dir,
        &forged(&|e| e.attestations[1].challenges.clear()),
        "missing-challenge",
    );
    rejected(
        dir,
        &forged(&|e| {
            e.attestations
                .iter_mut()
                .for_each(|a| a.sampled_ms = EPOCH / 2)
        }),
        "low-coverage",
    );
    // A proof that disagrees with the records.
    let mut b = honest.clone();
    let other = forged(&|e| e.start_ids = vec!["start-1".to_owned(); 6]);
    b["proof"] = other["proof"].clone();
    rejected(dir, &b, "proof-mismatch");
    // A challenge the coordinator did not sign.
    let mut b = honest.clone();
    b["challenges"][0]["signatures"][0]["sig"] = base64_encode(&[0u8; 64]).into();
    rejected(dir, &b, "bad-challenge");
}

#[test]
fn a_malformed_bundle_is_an_error_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = evidence(2).bundle().to_json();
    b["records"] = "nope".into();
    let (ok, _, err) = run(tmp.path(), &b);
    assert!(!ok);
    assert!(err.contains("records"), "{err}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
