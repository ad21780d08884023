//! End to end: an agent given several coordinator addresses (replicas with
//! one signing key and one CA, each with its own database here) moves to
//! the next when its stream dies, and never trusts a coordinator that signs
//! with another key.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::*;

#[test]
fn agent_moves_to_the_next_coordinator_when_its_stream_dies_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first = Coordinator::start(&tmp.path().join("c1"), free_port());
    let second = first.start_beside(&tmp.path().join("c2"), free_port(), true);
    assert_eq!(first.public_key(), second.public_key(), "one signing key");
    const N: u64 = 1000;
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&first.link_toml_to(&[first.port, second.port]), "5ms", N),
    );

    // On the first address, and receipted there, while records still flow.
    wait_for(
        "records receipted by the first",
        Duration::from_secs(60),
        || {
            let s = connected_at(&agent, &first.address())?;
            let receipted = s["last_receipt_seq"].as_u64()?;
            (receipted >= 100 && count(&first.db(), "SELECT count(*) FROM receipts") >= 100)
                .then_some(())
        },
    );
    first.proc.kill9();
    let killed = Instant::now();
    let stored_at_kill = record_stats(&first.db()).0;
    assert!(stored_at_kill < N, "the stream was not cut mid-way");

    // At the second at once: no backoff between the addresses of one round.
    let s = wait_for(
        "the agent on the second coordinator",
        Duration::from_secs(15),
        || connected_at(&agent, &second.address()),
    );
    let moved_in = killed.elapsed();
    eprintln!("moved to the second coordinator in {moved_in:?}");
    let on_first = &s["coordinator"]["addresses"][0];
    assert_eq!(on_first["address"], first.address());
    assert!(on_first["last_error"].is_string(), "{s}");

    // Every record the agent produced is receipted, by one or the other.
    let s = wait_for("spool drained", Duration::from_secs(180), || {
        let s = agent.status()?;
        (s["spool"]["pending"] == 0 && s["spool"]["next_seq"].as_u64()? > N).then_some(s)
    });
    let last = s["spool"]["next_seq"].as_u64().unwrap() - 1;
    assert_eq!(
        s["coordinator"]["address"],
        second.address(),
        "still on the second"
    );
    let (a, b) = (stored_seqs(&first.db()), stored_seqs(&second.db()));
    for (name, seqs) in [("first", &a), ("second", &b)] {
        let distinct: BTreeSet<_> = seqs.iter().collect();
        assert_eq!(distinct.len(), seqs.len(), "a seq twice in the {name}");
    }
    let held: BTreeSet<u64> = a.iter().chain(&b).copied().collect();
    let missing: Vec<u64> = (1..=last).filter(|q| !held.contains(q)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(held.iter().all(|q| (1..=last).contains(q)), "{held:?}");
    assert!(!b.is_empty() && b.len() < last as usize, "both stored some");
    assert_eq!(count(&second.db(), "SELECT count(*) FROM nodes"), 1);
    let log = agent.proc.log_text();
    assert!(
        log.contains("trying the next coordinator address at once"),
        "{log}"
    );
}

#[test]
fn an_address_whose_coordinator_signs_with_another_key_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let good = Coordinator::start(&tmp.path().join("good"), free_port());
    // Same CA and certificate (TLS succeeds), another signing key.
    let other = good.start_beside(&tmp.path().join("other"), free_port(), false);
    assert_ne!(good.public_key(), other.public_key());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &fast_agent_toml(&good.link_toml_to(&[other.port, good.port]), "5ms", 20),
    );

    let s = wait_for("20 records receipted", Duration::from_secs(60), || {
        let s = connected_at(&agent, &good.address())?;
        (s["spool"]["pending"] == 0 && s["last_receipt_seq"] == 20).then_some(s)
    });
    // Nothing was sent to the other one: not even the Register.
    assert_eq!(count(&other.db(), "SELECT count(*) FROM nodes"), 0);
    assert_eq!(count(&other.db(), "SELECT count(*) FROM records"), 0);
    assert_eq!(record_stats(&good.db()), (20, 20, 1, 20));
    // Status says why the first address is not used; no PROBLEM, since
    // records are receipted.
    let skipped = &s["coordinator"]["addresses"][0];
    assert_eq!(skipped["address"], other.address());
    let why = skipped["last_error"].as_str().unwrap();
    assert!(why.contains("signs with key id"), "{why}");
    assert!(s["problem"].is_null(), "{s}");
    let out = std::process::Command::new(WARDEN)
        .args(["status", "--socket", agent.socket().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{} connected (address 2 of 2)", good.address())),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}: the coordinator at", other.address())),
        "{text}"
    );
    // One connection, kept.
    let log = agent.proc.log_text();
    assert_eq!(log.matches("connected to coordinator").count(), 1, "{log}");
}
