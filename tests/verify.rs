//! `warden verify` against the conformance vectors in `tests/vectors/`:
//! the files are exactly what the generator (`warden_proto::vectors`)
//! makes, and the binary fails exactly the rules each one lists. Also the
//! trust flags: nothing holds on the bundle's own keys unless asked.
//!
//! `WARDEN_WRITE_VECTORS=1 cargo test --test verify` rewrites the files.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use warden_proto::vectors;

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap() + "\n"
}

#[test]
fn the_vector_files_are_what_the_generator_makes() {
    let dir = vectors_dir();
    let cases = vectors::cases();
    if std::env::var_os("WARDEN_WRITE_VECTORS").is_some() {
        for old in std::fs::read_dir(&dir).unwrap().flatten() {
            if old.path().extension().is_some_and(|e| e == "json") {
                std::fs::remove_file(old.path()).unwrap();
            }
        }
        for c in &cases {
            std::fs::write(dir.join(format!("{}.json", c.name)), pretty(&c.to_json())).unwrap();
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut names: Vec<String> = cases.iter().map(|c| format!("{}.json", c.name)).collect();
    names.sort();
    assert_eq!(on_disk, names, "regenerate with WARDEN_WRITE_VECTORS=1");
    for c in &cases {
        let text = std::fs::read_to_string(dir.join(format!("{}.json", c.name))).unwrap();
        assert!(
            text == pretty(&c.to_json()),
            "{} differs from the generator's: regenerate with WARDEN_WRITE_VECTORS=1",
            c.name
        );
    }
}

/// `warden verify` with the vector's trust and parameters, as flags.
fn verify_vector(file: &Path, v: &Value) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle.json");
    std::fs::write(&bundle, v["bundle"].to_string()).unwrap();
    let mut cmd = Command::new(WARDEN);
    cmd.arg("verify").arg(&bundle).arg("--json");
    let t = &v["trust"];
    if let Some(k) = t["coordinator_public_key"].as_str() {
        cmd.args(["--coordinator-key", k]);
    }
    if let Some(k) = t["node_public_key"].as_str() {
        cmd.args(["--node-key", k]);
    }
    if t["self_asserted"] == true {
        cmd.arg("--self-asserted");
    }
    let p = &v["params"];
    cmd.args(["--now", &p["now_unix_ms"].to_string()])
        .args(["--max-skew-ms", &p["max_skew_ms"].to_string()])
        .args(["--min-coverage", &p["min_coverage"].to_string()])
        .args(["--max-delay-ms", &p["max_delay_ms"].to_string()]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.code().is_some(),
        "{}: killed by a signal",
        file.display()
    );
    out
}

#[test]
fn warden_verify_fails_exactly_the_rules_of_every_vector() {
    let mut wrong = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "only {} vectors", files.len());
    for file in &files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let out = verify_vector(file, &v);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut got: Vec<String> = report["failures"]
            .as_array()
            .map(|f| {
                f.iter()
                    .map(|f| f["rule"].as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        got.sort();
        let expected: Vec<String> = v["expected"]["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        let holds = v["expected"]["holds"] == true;
        if got != expected || out.status.success() != holds || report["holds"] != holds {
            wrong.push(format!(
                "{}: exit {:?}, expected {expected:?}, got {got:?}\n{}",
                file.display(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// `tests/vectors/py/verify.py` was written from docs/attestation.md alone
/// (by someone who did not read the Rust): the document is enough to
/// agree with `warden verify` on every vector. Debian's python3 with
/// python3-cryptography (the test command installs it).
#[test]
fn a_verifier_written_from_the_spec_alone_agrees_on_every_vector() {
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .arg(vectors_dir().join("py/verify.py"))
        .arg("--all")
        .arg(vectors_dir())
        .output()
        .expect("python3");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("No module named 'cryptography'"),
        "install Debian's python3-cryptography (scripts/test.sh does): {text}"
    );
    assert!(out.status.success(), "{text}");
    let n = vectors::cases().len();
    assert!(text.contains(&format!("{n}/{n} vectors agree")), "{text}");
}

fn valid_bundle(dir: &Path) -> (PathBuf, Value) {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(vectors_dir().join("valid.json")).unwrap())
            .unwrap();
    let path = dir.join("bundle.json");
    std::fs::write(&path, v["bundle"].to_string()).unwrap();
    (path, v)
}

fn verify(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(WARDEN)
        .arg("verify")
        .args(args)
        .args(["--now", &(vectors::T1 + 3_600_000).to_string()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn trust_is_pinned_never_taken_from_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let (bundle, v) = valid_bundle(tmp.path());
    let bundle = bundle.to_str().unwrap();
    let key = v["trust"]["coordinator_public_key"].as_str().unwrap();

    // No key pinned: it does not hold, and says why.
    let (ok, _, err) = verify(&[bundle]);
    assert!(!ok);
    assert!(
        err.contains("untrusted: no coordinator key is pinned"),
        "{err}"
    );

    // Pinned on the command line, from a file, or from a keys file.
    let (ok, out, err) = verify(&[bundle, "--coordinator-key", key]);
    assert!(ok, "{err}");
    assert!(
        out.contains("coordinator key") && out.contains("(pinned)"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("HOLDS"), "{out}");
    let key_file = tmp.path().join("coordinator.pub");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let (ok, _, err) = verify(&[bundle, "--coordinator-key", key_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let keys = tmp.path().join("keys");
    let node = v["bundle"]["node_public_key"].as_str().unwrap();
    std::fs::write(
        &keys,
        format!("# trusted\ncoordinator {key}\nnode {node}\n"),
    )
    .unwrap();
    let (ok, out, err) = verify(&[bundle, "--keys", keys.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("node key") && out.ends_with("HOLDS\n"),
        "{out}"
    );

    // Another coordinator's key: nothing it signed verifies.
    let other = warden_proto::dsse::Signer::from_seed(&[3; 32])
        .verifying_key()
        .to_base64();
    let (ok, _, err) = verify(&[bundle, "--coordinator-key", &other]);
    assert!(!ok);
    assert!(
        err.contains("bad-verdict") && err.contains("bad-countersignature"),
        "{err}"
    );
    // Another node key pinned.
    let (ok, _, err) = verify(&[bundle, "--coordinator-key", key, "--node-key", &other]);
    assert!(!ok);
    assert!(err.contains("wrong-key: the bundle's node key"), "{err}");

    // Self-asserted: allowed only when asked, and said so.
    let (ok, out, _) = verify(&[bundle, "--self-asserted"]);
    assert!(ok);
    assert!(out.contains("HOLDS (SELF-ASSERTED"), "{out}");
    assert!(out.contains("bundle (self-asserted)"), "{out}");

    // A bad key on the command line is an error naming it.
    let (ok, _, err) = verify(&[bundle, "--coordinator-key", "nope"]);
    assert!(!ok);
    assert!(err.contains("--coordinator-key `nope`"), "{err}");
}

#[test]
fn a_bundle_that_is_not_one_is_an_error_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (bundle, v) = valid_bundle(tmp.path());
    let mut b = v["bundle"].clone();
    b["format"] = "warden.lease-bundle.v1".into();
    std::fs::write(&bundle, b.to_string()).unwrap();
    let (ok, _, err) = verify(&[bundle.to_str().unwrap(), "--self-asserted"]);
    assert!(!ok);
    assert!(err.contains("predates countersignatures"), "{err}");
    let mut b = v["bundle"].clone();
    b.as_object_mut().unwrap().remove("node_public_key");
    std::fs::write(&bundle, b.to_string()).unwrap();
    let (ok, _, err) = verify(&[bundle.to_str().unwrap(), "--self-asserted"]);
    assert!(!ok);
    assert!(err.contains("node_public_key"), "{err}");
}

/// A cluster's exported set (`warden cluster export`'s layout) holds with
/// the pinned key and fails, naming the lease, when a file goes missing or
/// the record is touched.
#[test]
fn a_cluster_set_is_checked_as_a_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c1");
    std::fs::create_dir(&dir).unwrap();
    let (record, bundles) = vectors::cluster_set(3);
    let record_path = dir.join("cluster.json");
    std::fs::write(&record_path, pretty(&warden_proto::dsse::to_json(&record))).unwrap();
    for b in &bundles {
        std::fs::write(
            dir.join(format!("lease-{}.json", b.lease_id)),
            pretty(&b.to_json()),
        )
        .unwrap();
    }
    let key = warden_proto::dsse::Signer::from_seed(&vectors::COORDINATOR_SEED)
        .verifying_key()
        .to_base64();
    let d = dir.to_str().unwrap();

    let (ok, out, err) = verify(&[d, "--coordinator-key", &key]);
    assert!(ok, "{out}{err}");
    assert_eq!(out.matches("lease       l-").count(), 3, "{out}");
    assert!(out.trim_end().ends_with("HOLDS"), "{out}");

    // Never on the record's own key unless asked.
    let (ok, _, err) = verify(&[d]);
    assert!(!ok);
    assert!(err.contains("untrusted"), "{err}");
    let (ok, out, _) = verify(&[d, "--self-asserted"]);
    assert!(ok);
    assert!(out.contains("HOLDS (SELF-ASSERTED"), "{out}");

    // A lease's file removed: missing, by name.
    let gone = dir.join(format!("lease-{}.json", bundles[1].lease_id));
    let text = std::fs::read(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let (ok, out, err) = verify(&[d, "--coordinator-key", &key]);
    assert!(!ok);
    assert!(
        err.contains(&format!("lease {}: missing-lease", bundles[1].lease_id)),
        "{err}"
    );
    assert!(out.contains("MISSING"), "{out}");
    std::fs::write(&gone, text).unwrap();

    // One byte of the record's payload changed.
    let mut env: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let mut payload = base64_decode(env["payload"].as_str().unwrap());
    let at = payload.len() / 2;
    payload[at] ^= 1;
    env["payload"] = base64_encode(&payload).into();
    std::fs::write(&record_path, env.to_string()).unwrap();
    let (ok, _, err) = verify(&[d, "--coordinator-key", &key]);
    assert!(!ok);
    assert!(err.contains("record: bad-record"), "{err}");
    assert!(err.contains("does NOT hold"), "{err}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn the_coordinator_prints_its_key_without_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let config = tmp.path().join("coordinator.toml");
    std::fs::write(&config, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let key = |json: bool| {
        let mut cmd = Command::new(WARDEN);
        cmd.args(["coordinator", "key", "--config", config.to_str().unwrap()]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = key(false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no coordinator key") && err.contains("first starts"),
        "{err}"
    );
    assert!(!state.join("coordinator.key").exists(), "nothing is made");

    std::fs::create_dir_all(&state).unwrap();
    let (signer, _) =
        warden_proto::identity::load_or_create(&state.join("coordinator.key")).unwrap();
    let out = key(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().next().unwrap(),
        signer.verifying_key().to_base64()
    );
    let out = key(true);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["key_id"], signer.key_id());
}
